#!/usr/bin/env python3
"""Writes a DiT golden set with sizes unlike the public one, in the same layout.

Output folder: dit.json, dit_weights.safetensors (original checkpoint key names, random weights),
dit_io.safetensors (in.x, in.t, in.cap_feats, in.cap_mask, in.clip_text_pooled, mid.joint_mask,
mid.position_ids, out.velocity). The velocity comes from the PyTorch eager implementation in
worker/bench/pytorch_dit.py (fp32, CPU), written independently of the Rust model from the same
description; the joint mask and position ids follow the goldens README directly.

Configuration: dim 48, 3 query heads over 1 KV head (n_rep 3), head_dim 16 split as axes [8, 4, 4],
one refiner block per stream, 3 main blocks, FFN width rounded to a multiple of 40, caption
features of width 20, pooled vectors of width 12; batch 3 with caption lengths 5, 2, 7 padded to 8;
latent 16 x 6 x 10 (3 x 5 patches).

Usage: make_alt_goldens.py OUT_DIR
"""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from pytorch_dit import NextDitEager, write_safetensors  # noqa: E402

CONFIG = {
    "patch_size": 2,
    "in_channels": 16,
    "dim": 48,
    "n_layers": 3,
    "n_refiner_layers": 1,
    "n_heads": 3,
    "n_kv_heads": 1,
    "multiple_of": 40,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 20,
    "axes_dims": [8, 4, 4],
    "axes_lens": [32, 16, 16],
    "clip_text_dim": 12,
    "rope_theta": 10000.0,
    "qk_norm_eps": 1e-5,
    "clip_proj_norm_eps": 1e-5,
}
BATCH = 3
CAPTION_LENGTHS = [5, 2, 7]
CAPTION_PADDED = 8
LATENT_HW = (6, 10)
SEED = 2024


def param_shapes(c):
    dim, hd = c["dim"], c["dim"] // c["n_heads"]
    hidden = 4 * dim
    if c["ffn_dim_multiplier"] is not None:
        hidden = int(c["ffn_dim_multiplier"] * hidden)
    ffn = c["multiple_of"] * math.ceil(hidden / c["multiple_of"])
    temb = min(dim, 1024)
    patch = c["patch_size"] ** 2 * c["in_channels"]
    qkv = (c["n_heads"] + 2 * c["n_kv_heads"]) * hd
    s = {
        "cap_embedder.0.weight": [c["cap_feat_dim"]],
        "cap_embedder.1.weight": [dim, c["cap_feat_dim"]],
        "cap_embedder.1.bias": [dim],
        "clip_text_pooled_proj.0.weight": [c["clip_text_dim"]],
        "clip_text_pooled_proj.1.weight": [c["clip_text_dim"], c["clip_text_dim"]],
        "clip_text_pooled_proj.1.bias": [c["clip_text_dim"]],
        "t_embedder.mlp.0.weight": [temb, 256],
        "t_embedder.mlp.0.bias": [temb],
        "t_embedder.mlp.2.weight": [temb, temb],
        "t_embedder.mlp.2.bias": [temb],
        "time_text_embed.1.weight": [temb, temb + c["clip_text_dim"]],
        "time_text_embed.1.bias": [temb],
        "x_embedder.weight": [dim, patch],
        "x_embedder.bias": [dim],
        "norm_final.weight": [dim],
        "final_layer.adaLN_modulation.1.weight": [dim, temb],
        "final_layer.adaLN_modulation.1.bias": [dim],
        "final_layer.linear.weight": [patch, dim],
        "final_layer.linear.bias": [patch],
    }
    blocks = [(f"context_refiner.{i}.", False) for i in range(c["n_refiner_layers"])]
    blocks += [(f"noise_refiner.{i}.", True) for i in range(c["n_refiner_layers"])]
    blocks += [(f"layers.{i}.", True) for i in range(c["n_layers"])]
    for pre, modulated in blocks:
        s[pre + "attention.qkv.weight"] = [qkv, dim]
        s[pre + "attention.out.weight"] = [dim, c["n_heads"] * hd]
        s[pre + "attention.q_norm.weight"] = [hd]
        s[pre + "attention.k_norm.weight"] = [hd]
        for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            s[pre + n + ".weight"] = [dim]
        s[pre + "feed_forward.w1.weight"] = [ffn, dim]
        s[pre + "feed_forward.w2.weight"] = [dim, ffn]
        s[pre + "feed_forward.w3.weight"] = [ffn, dim]
        if modulated:
            s[pre + "adaLN_modulation.1.weight"] = [4 * dim, temb]
            s[pre + "adaLN_modulation.1.bias"] = [4 * dim]
    return s


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(SEED)

    weights = {}
    for name, shape in sorted(param_shapes(CONFIG).items()):
        r = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            w = r / math.sqrt(shape[1])
        elif name.endswith(".bias"):
            w = r * 0.1
        else:
            w = 1.0 + 0.1 * r
        weights[name] = w.contiguous()

    h, w = LATENT_HW
    x = torch.randn(BATCH, CONFIG["in_channels"], h, w, generator=g)
    t = torch.rand(BATCH, generator=g)
    cap = torch.randn(BATCH, CAPTION_PADDED, CONFIG["cap_feat_dim"], generator=g)
    cap_mask = (torch.arange(CAPTION_PADDED)[None] < torch.tensor(CAPTION_LENGTHS)[:, None]).long()
    pooled = torch.randn(BATCH, CONFIG["clip_text_dim"], generator=g)

    model = NextDitEager(CONFIG, weights, torch.device("cpu"), torch.float32)
    velocity = model.forward(x, t, cap, cap_mask, pooled)

    p = CONFIG["patch_size"]
    hp, wp = h // p, w // p
    n_img = hp * wp
    s_max = max(CAPTION_LENGTHS) + n_img
    joint_mask = torch.zeros(BATCH, s_max, dtype=torch.long)
    position_ids = torch.zeros(BATCH, s_max, 3, dtype=torch.long)
    for b, cl in enumerate(CAPTION_LENGTHS):
        joint_mask[b, : cl + n_img] = 1
        position_ids[b, :cl, 0] = torch.arange(cl)
        for r in range(hp):
            for c in range(wp):
                position_ids[b, cl + r * wp + c] = torch.tensor([cl, r, c])

    io = {
        "in.x": x,
        "in.t": t,
        "in.cap_feats": cap,
        "in.cap_mask": cap_mask,
        "in.clip_text_pooled": pooled,
        "mid.joint_mask": joint_mask,
        "mid.position_ids": position_ids,
        "out.velocity": velocity,
    }
    write_safetensors(out / "dit_weights.safetensors", weights)
    write_safetensors(out / "dit_io.safetensors", io)
    sidecar = {
        "component": "dit",
        "files": {"weights": "dit_weights.safetensors", "io": "dit_io.safetensors"},
        "reference": "worker/bench/pytorch_dit.py (PyTorch eager, fp32, CPU)",
        "config": dict(CONFIG, head_dim=CONFIG["dim"] // CONFIG["n_heads"]),
        "inputs": {"batch": BATCH, "latent": list(x.shape), "caption_len_padded": CAPTION_PADDED,
                   "caption_lengths": CAPTION_LENGTHS, "seed": SEED},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in io.items()},
        "torch": torch.__version__,
    }
    (out / "dit.json").write_text(json.dumps(sidecar, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch eager implementation of the NewBie Next-DiT forward pass, for side-by-side timing.

Driven by `newbie-bench --compare-pytorch worker/bench/pytorch_dit.py`, which writes the config, the
weights (original checkpoint key names) and the inputs to a temporary folder, runs this script with
the same thread count, device and precision, reads back the velocity and compares it with its own.

It follows the same description as the Rust crate (docs: shared newbie-model.md section 4): caption
features -> RMSNorm -> Linear; two unmodulated context-refiner blocks over the caption; patchify,
x_embedder, two modulated noise-refiner blocks; per-sample joint sequence [valid caption ; image]
padded to the longest; n_layers modulated blocks; final layer; unpatchify. Sandwich RMSNorm (f32
statistics), qk-norm, 3-axis RoPE on interleaved pairs, GQA by repeat-interleave, SDPA with a boolean
key mask (omitted when nothing is padded), tanh gates, scale-only modulation, SwiGLU.

Only torch is needed (safetensors files are read and written here directly).
Prints one JSON line: {"ms_median": .., "ms_mean": .., "ms_min": .., ...}.
"""

import argparse
import ctypes
import json
import math
import statistics
import struct
import time

import torch
import torch.nn.functional as F

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        buf = bytearray(data[base + start:base + end])
        dtype = ST_DTYPES[meta["dtype"]]
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(meta["shape"])
    return out


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hdr = json.dumps(header).encode()
    hdr += b" " * ((8 - len(hdr) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for b in blobs:
            f.write(b)


class NextDitEager:
    """The forward pass over a flat dict of weights in original key names."""

    def __init__(self, cfg, weights, device, dtype):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        self.dim = cfg["dim"]
        self.n_heads = cfg["n_heads"]
        self.n_kv = cfg["n_kv_heads"]
        self.head_dim = self.dim // self.n_heads
        self.p = cfg["patch_size"]
        self.c = cfg["in_channels"]
        self.eps = cfg.get("norm_eps", 1e-5)
        self.qk_eps = cfg.get("qk_norm_eps", 1e-5)
        self.clip_eps = cfg.get("clip_proj_norm_eps", 1e-5)
        theta = cfg.get("rope_theta", 10000.0)
        self.tables = []
        for d, length in zip(cfg["axes_dims"], cfg["axes_lens"]):
            omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            ang = torch.outer(torch.arange(length, dtype=torch.float64), omega).float().to(device)
            self.tables.append((ang.cos(), ang.sin()))

    def lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def rms(self, x, name, eps):
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return y * self.w[name + ".weight"]

    def freqs(self, ids):
        cos = torch.cat([tc[ids[..., a]] for a, (tc, _) in enumerate(self.tables)], -1)
        sin = torch.cat([ts[ids[..., a]] for a, (_, ts) in enumerate(self.tables)], -1)
        return cos, sin

    @staticmethod
    def rope(x, cos, sin):
        xf = x.float().unflatten(-1, (-1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2).to(x.dtype)

    def attention(self, pre, x, mask, cos, sin):
        b, s, _ = x.shape
        h, kv, hd = self.n_heads, self.n_kv, self.head_dim
        q, k, v = self.lin(x, pre + "qkv").split([h * hd, kv * hd, kv * hd], -1)
        q = self.rope(self.rms(q.view(b, s, h, hd), pre + "q_norm", self.qk_eps), cos, sin).transpose(1, 2)
        k = self.rope(self.rms(k.view(b, s, kv, hd), pre + "k_norm", self.qk_eps), cos, sin).transpose(1, 2)
        v = v.view(b, s, kv, hd).transpose(1, 2)
        if h != kv:
            k = k.repeat_interleave(h // kv, dim=1)
            v = v.repeat_interleave(h // kv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(hd))
        return self.lin(o.transpose(1, 2).reshape(b, s, h * hd), pre + "out")

    def ffn(self, pre, x):
        return self.lin(F.silu(self.lin(x, pre + "w1")) * self.lin(x, pre + "w3"), pre + "w2")

    def block(self, pre, x, mask, cos, sin, adaln):
        if adaln is None:
            x = x + self.rms(self.attention(pre + "attention.", self.rms(x, pre + "attention_norm1", self.eps), mask, cos, sin),
                             pre + "attention_norm2", self.eps)
            return x + self.rms(self.ffn(pre + "feed_forward.", self.rms(x, pre + "ffn_norm1", self.eps)), pre + "ffn_norm2", self.eps)
        sc_a, g_a, sc_f, g_f = self.lin(F.silu(adaln), pre + "adaLN_modulation.1").unsqueeze(1).chunk(4, -1)
        a = self.attention(pre + "attention.", self.rms(x, pre + "attention_norm1", self.eps) * (1 + sc_a), mask, cos, sin)
        x = x + g_a.tanh() * self.rms(a, pre + "attention_norm2", self.eps)
        f = self.ffn(pre + "feed_forward.", self.rms(x, pre + "ffn_norm1", self.eps) * (1 + sc_f))
        return x + g_f.tanh() * self.rms(f, pre + "ffn_norm2", self.eps)

    @torch.no_grad()
    def forward(self, x, t, cap, cap_mask, pooled):
        cfg, dev, dt = self.cfg, self.device, self.dtype
        b, _, hh, ww = x.shape
        p, c = self.p, self.c
        h, w = hh // p, ww // p
        n = h * w
        l = cap.shape[1]
        lens = cap_mask.ne(0).sum(1).tolist()

        half = 128
        f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=dev) / half)
        args = t.float()[:, None] * f[None]
        temb = self.lin(F.silu(self.lin(torch.cat([args.cos(), args.sin()], -1).to(dt), "t_embedder.mlp.0")), "t_embedder.mlp.2")
        clip = self.lin(self.rms(pooled.to(dt), "clip_text_pooled_proj.0", self.clip_eps), "clip_text_pooled_proj.1")
        adaln = self.lin(F.silu(torch.cat([temb, clip], -1)), "time_text_embed.1")

        capx = self.lin(self.rms(cap.to(dt), "cap_embedder.0", self.eps), "cap_embedder.1")
        lens_t = torch.tensor(lens, device=dev)
        cap_valid = torch.arange(l, device=dev)[None] < lens_t[:, None]
        cap_ids = torch.zeros(b, l, 3, dtype=torch.long, device=dev)
        cap_ids[..., 0] = torch.arange(l, device=dev)[None] * cap_valid
        ccos, csin = self.freqs(cap_ids)
        ccos, csin = ccos * cap_valid[..., None], csin * cap_valid[..., None]
        cmask = cap_valid[:, None, None, :] if min(lens) < l else None
        for i in range(cfg["n_refiner_layers"]):
            capx = self.block(f"context_refiner.{i}.", capx, cmask, ccos, csin, None)

        rows = torch.arange(h, device=dev).repeat_interleave(w)
        cols = torch.arange(w, device=dev).repeat(h)
        img_ids = torch.stack([lens_t[:, None].expand(b, n), rows[None].expand(b, n), cols[None].expand(b, n)], -1)
        icos, isin = self.freqs(img_ids)
        patches = x.to(dev, dt).view(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * c)
        img = self.lin(patches, "x_embedder")
        for i in range(cfg["n_refiner_layers"]):
            img = self.block(f"noise_refiner.{i}.", img, None, icos, isin, adaln)

        s_max = max(lens) + n
        joint = torch.zeros(b, s_max, self.dim, dtype=dt, device=dev)
        ids = torch.zeros(b, s_max, 3, dtype=torch.long, device=dev)
        valid = torch.zeros(b, s_max, dtype=torch.bool, device=dev)
        for i, cl in enumerate(lens):
            joint[i, :cl] = capx[i, :cl]
            joint[i, cl:cl + n] = img[i]
            ids[i, :cl, 0] = torch.arange(cl, device=dev)
            ids[i, cl:cl + n] = img_ids[i]
            valid[i, :cl + n] = True
        jcos, jsin = self.freqs(ids)
        jmask = valid[:, None, None, :] if min(lens) + n < s_max else None
        for i in range(cfg["n_layers"]):
            joint = self.block(f"layers.{i}.", joint, jmask, jcos, jsin, adaln)

        scale = self.lin(F.silu(adaln), "final_layer.adaLN_modulation.1").unsqueeze(1)
        normed = F.layer_norm(joint.float(), (self.dim,), eps=1e-6).to(dt)
        out = self.lin(normed * (1 + scale), "final_layer.linear")
        tokens = torch.stack([out[i, cl:cl + n] for i, cl in enumerate(lens)])
        return tokens.view(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hh, ww).float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
    with open(a.config) as f:
        cfg = json.load(f)
    model = NextDitEager(cfg, read_safetensors(a.weights), device, dtype)
    inp = {k: v.to(device) for k, v in read_safetensors(a.inputs).items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    args = (inp["x"], inp["t"], inp["cap_feats"], inp["cap_mask"], inp["clip_pooled"])
    for _ in range(max(a.warmup, 1)):
        out = model.forward(*args)
    sync()
    times = []
    for _ in range(a.iters):
        start = time.perf_counter()
        out = model.forward(*args)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    if a.out:
        write_safetensors(a.out, {"velocity": out})
    print(json.dumps({
        "ms_median": statistics.median(times), "ms_mean": statistics.fmean(times), "ms_min": min(times),
        "iters": a.iters, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": a.device, "precision": a.precision,
    }))


if __name__ == "__main__":
    main()

//! NewBie-image-Exp0.1 model code: one struct per block, field paths equal to checkpoint key names.
//!
//! * [`dit`]: the Next-DiT denoiser (`NextDiT_CLIP`).
//! * [`sampler`]: the flow-matching sampler (Euler / midpoint, CFG with truncation and renorm), apart
//!   from the network behind a `Denoiser` trait.
//! * [`gemma3`], [`jina`]: the two text encoders; [`tokenizer`]: their tokenizers.
//! * [`vae`]: the FLUX VAE decoder.
//! * [`sdpa`]: the order of libtorch's fused attention kernels (cuDNN first on Hopper, or the default).
//! * [`loading`]: strict checkpoint loading (key sets compared both ways, shapes, dtypes).
//! * [`rng`]: the lock every seed, random draw and model build holds on libtorch's global generators.
//! * [`pipeline`]: text to RGB images, the whole chain, with per-step callbacks and cancellation.

pub mod dit;
pub mod gemma3;
pub mod jina;
pub mod loading;
pub mod pipeline;
pub mod rng;
pub mod sampler;
pub mod sdpa;
pub mod tokenizer;
pub mod vae;

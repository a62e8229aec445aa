//! `farm-worker`: the NewBie-image pipeline in libtorch and the worker runtime around it.
//!
//! * [`model`]: the network code (Next-DiT, Gemma 3, Jina CLIP v2, FLUX VAE), the sampler and loading.

pub mod model;

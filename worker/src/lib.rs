//! `farm-worker`: the NewBie-image pipeline in libtorch and the worker runtime around it.
//!
//! * [`model`]: the network code (Next-DiT, Gemma 3, Jina CLIP v2, FLUX VAE), the sampler and loading.
//! * [`render`]: the renderer the GPU thread drives (the model, or a synthetic one for load tests).
//! * [`runtime`]: the session with the coordinator: credits, batching, progress, cancel, uploads, drain.
//! * [`pngmeta`]: PNG encoding with reproducibility metadata; [`device`]: device parsing and description.

pub mod device;
pub mod model;
pub mod pngmeta;
pub mod render;
pub mod runtime;
pub mod verify;

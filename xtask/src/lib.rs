//! Local infrastructure shared by `cargo xtask` and the end-to-end test harness (`farm-tests`):
//! child processes that die with their owner, throwaway PostgreSQL, Redis and S3-compatible (moto)
//! servers, the libtorch environment that builds and runs the worker, the farm binaries' admin
//! commands, and the paths of the workspace.
//!
//! Only std, anyhow and libc: `cargo xtask` must compile in seconds on a fresh machine.

pub mod farm;
pub mod moto;
pub mod paths;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod signal;
pub mod torch;

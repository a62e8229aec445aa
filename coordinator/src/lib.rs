//! `farm-coordinator`: stores jobs in PostgreSQL and hands render tasks to GPU workers over gRPC.
//!
//! * [`store`]: the scheduler and job store (leases, fencing tokens, fair share, requeues).
//! * [`submit`]: atomic, idempotent, streamed submissions (COPY in one transaction).
//! * [`queries`]: read-side status, listings, task history, results, workers.
//! * [`grpc_jobs`], [`grpc_workers`]: thin gRPC adapters; [`error`]: the one mapping to status codes.
//! * [`events`]: per-job event streams (Redis or in-process); [`blobs`]: result storage.
//! * [`auth`]: bearer tokens and roles; [`server`]: wiring, sweeper, listener, metrics.

pub mod auth;
pub mod blobs;
pub mod error;
pub mod events;
pub mod grpc_jobs;
pub mod grpc_workers;
pub mod params;
pub mod queries;
pub mod server;
pub mod state;
pub mod store;
pub mod submit;

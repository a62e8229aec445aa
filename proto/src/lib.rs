//! `farm-proto`: what both ends of the farm must agree on.
//!
//! * [`pb`]: the generated `farm.v1` gRPC types and service stubs (see `proto/farm/v1/*.proto`).
//! * [`prompt`]: the NewBie XML prompt language (parse, validate, limits, warnings).
//! * [`batch`]: the batch file formats the CLI reads (XML batch, JSONL, plain text).
//! * [`limits`]: render-parameter limits and defaults, checked by the coordinator and the worker alike.

pub mod batch;
pub mod limits;
pub mod prompt;

/// Generated `farm.v1` protobuf and gRPC code.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("farm.v1");

    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("farm_descriptor");
}

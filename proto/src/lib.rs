//! `farm-proto`: what both ends of the farm must agree on.
//!
//! * [`pb`]: the generated `farm.v1` gRPC types and service stubs (see `proto/farm/v1/*.proto`).
//! * [`prompt`]: the NewBie XML prompt language (parse, validate, limits, warnings).
//! * [`batch`]: the batch file formats the CLI reads (XML batch, JSONL, plain text).
//! * [`limits`]: render-parameter limits and defaults, checked by the coordinator and the worker alike.
//! * [`error_chain`]: an error with its sources, for messages about transport and TLS failures.

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

/// Whether a job state number is final: succeeded, failed or cancelled.
pub fn job_state_is_final(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state).unwrap_or(pb::JobState::Unspecified),
        pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
    )
}

/// An error and its sources, `a: b: c` (tonic's transport and TLS errors keep the detail in the
/// sources); a source whose text is already in the message is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Wrapped(&'static str, Option<Box<Wrapped>>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn error_chain_joins_sources_once() {
        let e = Wrapped("transport error", Some(Box::new(Wrapped("tls: bad certificate", Some(Box::new(Wrapped("bad certificate", None)))))));
        assert_eq!(super::error_chain(&e), "transport error: tls: bad certificate");
        assert_eq!(super::error_chain(&Wrapped("alone", None)), "alone");
    }
}

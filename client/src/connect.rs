//! The gRPC channel to the coordinator, with the bearer token attached to every call.

use std::time::Duration;

use farm_proto::pb::job_service_client::JobServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::config::Settings;
use crate::errors::{CliError, CliResult};

/// Adds `authorization: Bearer <token>` to every request when a token is configured.
#[derive(Clone, Default)]
pub struct AuthInterceptor {
    header: Option<MetadataValue<Ascii>>,
}

impl AuthInterceptor {
    pub fn new(token: Option<&str>) -> CliResult<Self> {
        let header = match token {
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| CliError::usage("the token contains characters not allowed in a header"))?,
            ),
            None => None,
        };
        Ok(AuthInterceptor { header })
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// The channel with the token interceptor: what every call goes through.
pub type Service = InterceptedService<Channel, AuthInterceptor>;

/// The JobService client the commands use.
pub type Client = JobServiceClient<Service>;

/// A connection to the coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Conn {
    channel: Channel,
    auth: AuthInterceptor,
}

impl Conn {
    pub fn new(channel: Channel, auth: AuthInterceptor) -> Self {
        Conn { channel, auth }
    }
    /// The generated JobService client.
    pub fn jobs(&self) -> Client {
        client_for(self.channel.clone(), self.auth.clone())
    }
    /// The raw service, for calls that need their own codec (see `submit`).
    pub fn service(&self) -> Service {
        InterceptedService::new(self.channel.clone(), self.auth.clone())
    }
}

/// Largest message the client accepts or sends (result chunks, big prompt chunks).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Builds a client. The connection is made lazily on the first call (and re-made after a disconnect),
/// so that `watch` can ride out coordinator restarts.
pub fn connect(settings: &Settings) -> CliResult<Conn> {
    if settings.ca_cert.is_some() || settings.endpoint.starts_with("https://") {
        return Err(CliError::usage(
            "TLS is not available in this build: tonic's `tls-ring` feature is not enabled in the workspace \
             (enable it on the `tonic` workspace dependency and rebuild), or use an http:// endpoint",
        ));
    }
    let endpoint = Endpoint::from_shared(settings.endpoint.clone())
        .map_err(|e| CliError::usage(format!("invalid endpoint {:?}: {e}", settings.endpoint)))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect_lazy();
    Ok(Conn::new(
        channel,
        AuthInterceptor::new(settings.token.as_deref())?,
    ))
}

/// Wraps an existing channel (tests and benchmarks build their own).
pub fn client_for(channel: Channel, auth: AuthInterceptor) -> Client {
    JobServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tonic::service::Interceptor;

    #[test]
    fn interceptor_sets_bearer_header() {
        let mut i = AuthInterceptor::new(Some("s3cret")).unwrap();
        let req = i.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer s3cret");
        let mut none = AuthInterceptor::new(None).unwrap();
        assert!(none
            .call(tonic::Request::new(()))
            .unwrap()
            .metadata()
            .get("authorization")
            .is_none());
        assert!(AuthInterceptor::new(Some("bad\ntoken")).is_err());
    }

    #[test]
    fn tls_is_refused_clearly() {
        let s = Settings {
            endpoint: "http://x:1".into(),
            token: None,
            ca_cert: Some(PathBuf::from("/ca.pem")),
        };
        let e = connect(&s).err().unwrap();
        assert!(e.message.contains("tls-ring"));
        assert_eq!(e.exit_code(), 2);
    }
}

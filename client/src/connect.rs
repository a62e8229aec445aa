//! The gRPC channel to the coordinator (plaintext or TLS), with the bearer token attached to every call.

use std::time::Duration;

use farm_proto::error_chain;
use farm_proto::pb::job_service_client::JobServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

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
/// so that `watch` can ride out coordinator restarts. `https://` endpoints use TLS (see [`tls_config`]);
/// `http://` ones are plaintext.
pub fn connect(settings: &Settings) -> CliResult<Conn> {
    let endpoint = Endpoint::from_shared(settings.endpoint.clone())
        .map_err(|e| CliError::usage(format!("invalid endpoint {:?}: {e}", settings.endpoint)))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let endpoint = match tls_config(settings)? {
        None => endpoint,
        Some(TlsTrust::Ca(config)) => endpoint.tls_config(config).map_err(|e| {
            CliError::usage(format!("TLS settings for {}: {}", settings.endpoint, error_chain(&e)))
        })?,
        // The system store may be missing or empty (minimal containers): the bundled roots then.
        Some(TlsTrust::PublicRoots) => match endpoint
            .clone()
            .tls_config(ClientTlsConfig::new().with_enabled_roots().timeout(TLS_HANDSHAKE_TIMEOUT))
        {
            Ok(e) => e,
            Err(_) => endpoint
                .tls_config(ClientTlsConfig::new().with_webpki_roots().timeout(TLS_HANDSHAKE_TIMEOUT))
                .map_err(|e| {
                    CliError::usage(format!("TLS settings for {}: {}", settings.endpoint, error_chain(&e)))
                })?,
        },
    };
    let channel = endpoint.connect_lazy();
    Ok(Conn::new(
        channel,
        AuthInterceptor::new(settings.token.as_deref())?,
    ))
}

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whom a TLS connection trusts.
pub enum TlsTrust {
    /// Only the CA certificate(s) of the `--ca-cert` file.
    Ca(ClientTlsConfig),
    /// The system's root store and the bundled webpki roots (public CAs).
    PublicRoots,
}

/// The TLS settings of an endpoint: `None` for `http://`; for `https://`, the CA file when one is set
/// (it then replaces the public roots), else the public roots. A CA file with an `http://` endpoint is
/// refused rather than ignored, so that a token never goes out in clear when TLS was asked for. A
/// missing or unreadable CA file, or one without a PEM certificate, is a usage error (exit 2).
pub fn tls_config(settings: &Settings) -> CliResult<Option<TlsTrust>> {
    let scheme = settings
        .endpoint
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    match (scheme.as_str(), &settings.ca_cert) {
        ("https", None) => Ok(Some(TlsTrust::PublicRoots)),
        ("https", Some(path)) => {
            let pem = std::fs::read(path).map_err(|e| {
                CliError::usage(format!(
                    "CA certificate {} (--ca-cert / FARM_CA_CERT / config ca_cert): {e}",
                    path.display()
                ))
            })?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(CliError::usage(format!(
                    "CA certificate {}: not a PEM certificate (no -----BEGIN CERTIFICATE----- block)",
                    path.display()
                )));
            }
            Ok(Some(TlsTrust::Ca(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .timeout(TLS_HANDSHAKE_TIMEOUT),
            )))
        }
        (_, Some(path)) => Err(CliError::usage(format!(
            "a CA certificate is set ({}) but the endpoint {} is not https://; use an https:// endpoint \
             for TLS, or unset --ca-cert / FARM_CA_CERT / the config file's ca_cert",
            path.display(),
            settings.endpoint
        ))),
        (_, None) => Ok(None),
    }
}

/// Whether the server behind a plaintext endpoint is a TLS server: sent the HTTP/2 preface, a TLS
/// server answers with a TLS record (an alert, or a handshake message), type 0x15 or 0x16 and major
/// version 3. Used to explain a failed plaintext call; false when anything goes otherwise.
pub async fn speaks_tls(endpoint: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(uri) = endpoint.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(80);
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), port)).await.ok()?;
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.ok()?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.ok()?;
        Some(matches!(head, [0x15 | 0x16, 0x03]))
    };
    tokio::time::timeout(Duration::from_secs(3), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
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

    fn settings(endpoint: &str, ca_cert: Option<PathBuf>) -> Settings {
        Settings {
            endpoint: endpoint.into(),
            token: None,
            ca_cert,
        }
    }

    #[test]
    fn tls_follows_the_scheme_and_the_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(tls_config(&settings("http://x:1", None)).unwrap().is_none());
        assert!(matches!(
            tls_config(&settings("https://x:1", None)).unwrap(),
            Some(TlsTrust::PublicRoots)
        ));

        let missing = dir.path().join("missing.pem");
        let e = tls_config(&settings("https://x:1", Some(missing.clone()))).err().unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(e.message.contains("missing.pem"), "{}", e.message);

        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let e = tls_config(&settings("https://x:1", Some(not_pem))).err().unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(e.message.contains("not a PEM certificate"), "{}", e.message);

        let e = tls_config(&settings("http://x:1", Some(missing))).err().unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(e.message.contains("not https://"), "{}", e.message);
    }

    /// A one-connection server that reads the preface and answers `reply`.
    async fn answering(reply: &'static [u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut preface = [0u8; 24];
            let _ = sock.read_exact(&mut preface).await;
            let _ = sock.write_all(reply).await;
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_tls_port_is_recognised() {
        // A TLS alert record (what a TLS server sends a client that does not speak TLS).
        assert!(speaks_tls(&answering(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]).await).await);
        // An HTTP/2 SETTINGS frame: a plaintext gRPC server.
        assert!(!speaks_tls(&answering(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await).await);
        assert!(!speaks_tls("http://127.0.0.1:1").await);
    }

    #[tokio::test]
    async fn connect_builds_tls_and_plain_channels() {
        assert!(connect(&settings("http://127.0.0.1:1", None)).is_ok());
        assert!(connect(&settings("https://127.0.0.1:1", None)).is_ok());
    }
}

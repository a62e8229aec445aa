//! Where the CLI connects and how it authenticates.
//!
//! Each setting is taken from, in order of precedence: the command-line flag, the environment variable,
//! the config file, the built-in default.
//!
//! | setting | flag | environment | config key | default |
//! |---------|------|-------------|------------|---------|
//! | endpoint | `--endpoint` | `FARM_ENDPOINT` | `endpoint` | `http://127.0.0.1:50051` |
//! | token | `--token` | `FARM_TOKEN` | `token` | none |
//! | TLS CA | `--ca-cert` | `FARM_CA_CERT` | `ca_cert` | none |
//!
//! TLS follows the endpoint's scheme: `https://` is TLS, trusting only the CA file when one is set and
//! the system's (else the bundled webpki) roots otherwise; `http://` is plaintext, and a CA file with an
//! `http://` endpoint is refused (see `connect::tls_config`). A bare `host:port` gets `http://`, or
//! `https://` when a CA file is set.
//!
//! The config file is `<config dir>/farm/config.json` (`~/.config/farm/config.json` on Linux), or
//! `config.toml` next to it when there is no JSON file; `--config PATH` / `FARM_CONFIG` names another
//! file. JSON: `{"endpoint": "https://coordinator:50051", "token": "...", "ca_cert": "/etc/farm/ca.pem"}`.
//! TOML: flat `key = "value"` lines (`#` comments allowed). A missing default file is not an error; a
//! named file that is missing or unreadable is. A relative `ca_cert` in a config file is taken relative
//! to that file's directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::errors::{CliError, CliResult};

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";
pub const ENV_ENDPOINT: &str = "FARM_ENDPOINT";
pub const ENV_TOKEN: &str = "FARM_TOKEN";
pub const ENV_CA_CERT: &str = "FARM_CA_CERT";
pub const ENV_CONFIG: &str = "FARM_CONFIG";

/// The settings a config file can hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub endpoint: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

/// The settings found in the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvConfig {
    pub endpoint: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

impl EnvConfig {
    /// Reads `FARM_ENDPOINT`, `FARM_TOKEN`, `FARM_CA_CERT` and `FARM_CONFIG`; empty values count as unset.
    pub fn from_process() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        EnvConfig {
            endpoint: get(ENV_ENDPOINT),
            token: get(ENV_TOKEN),
            ca_cert: get(ENV_CA_CERT).map(PathBuf::from),
            config: get(ENV_CONFIG).map(PathBuf::from),
        }
    }
}

/// The settings given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagConfig {
    pub endpoint: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

/// The resolved connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub endpoint: String,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

/// Applies the precedence flag > environment > file > default.
pub fn resolve(flags: &FlagConfig, env: &EnvConfig, file: Option<&FileConfig>) -> Settings {
    let file = file.cloned().unwrap_or_default();
    let endpoint = flags
        .endpoint
        .clone()
        .or_else(|| env.endpoint.clone())
        .or(file.endpoint)
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let ca_cert = flags
        .ca_cert
        .clone()
        .or_else(|| env.ca_cert.clone())
        .or(file.ca_cert);
    Settings {
        endpoint: if ca_cert.is_some() {
            normalize_tls_endpoint(&endpoint)
        } else {
            normalize_endpoint(&endpoint)
        },
        token: flags
            .token
            .clone()
            .or_else(|| env.token.clone())
            .or(file.token)
            .filter(|t| !t.is_empty()),
        ca_cert,
    }
}

/// Adds `http://` to a bare `host:port`.
pub fn normalize_endpoint(endpoint: &str) -> String {
    let e = endpoint.trim();
    if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

/// Adds `https://` to a bare `host:port` (when a CA file is set).
pub fn normalize_tls_endpoint(endpoint: &str) -> String {
    let e = endpoint.trim();
    if e.contains("://") {
        e.to_string()
    } else {
        format!("https://{e}")
    }
}

/// The config file to read: the one named by flag or environment (which must exist), else the default
/// location's `config.json` or `config.toml` when present.
pub fn config_path(flags: &FlagConfig, env: &EnvConfig) -> Option<(PathBuf, bool)> {
    if let Some(p) = flags.config.clone().or_else(|| env.config.clone()) {
        return Some((p, true));
    }
    let dir = dirs::config_dir()?.join("farm");
    for name in ["config.json", "config.toml"] {
        let p = dir.join(name);
        if p.is_file() {
            return Some((p, false));
        }
    }
    None
}

/// Reads a config file: JSON when the name ends in `.json` or the text starts with `{`, flat TOML otherwise.
/// A relative `ca_cert` is resolved against the file's directory.
pub fn load_file(path: &Path) -> CliResult<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("config file {}: {e}", path.display())))?;
    let mut cfg = parse_config(&text, path.extension().and_then(|e| e.to_str()) == Some("json"))
        .map_err(|e| CliError::usage(format!("config file {}: {e}", path.display())))?;
    if let (Some(ca), Some(dir)) = (&cfg.ca_cert, path.parent()) {
        if ca.is_relative() {
            cfg.ca_cert = Some(dir.join(ca));
        }
    }
    Ok(cfg)
}

/// Parses config text.
pub fn parse_config(text: &str, json: bool) -> Result<FileConfig, String> {
    if json || text.trim_start().starts_with('{') {
        return serde_json::from_str(text).map_err(|e| e.to_string());
    }
    let mut cfg = FileConfig::default();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {}: expected key = \"value\"", n + 1));
        };
        let key = key.trim();
        let value = parse_toml_string(value.trim())
            .ok_or_else(|| format!("line {}: expected a quoted string", n + 1))?;
        match key {
            "endpoint" => cfg.endpoint = Some(value),
            "token" => cfg.token = Some(value),
            "ca_cert" => cfg.ca_cert = Some(PathBuf::from(value)),
            other => return Err(format!("line {}: unknown key `{other}`", n + 1)),
        }
    }
    Ok(cfg)
}

/// A basic or literal TOML string, with an optional trailing comment.
fn parse_toml_string(v: &str) -> Option<String> {
    let quote = v.chars().next()?;
    if quote != '"' && quote != '\'' {
        return None;
    }
    let mut out = String::new();
    let mut chars = v[1..].chars();
    loop {
        let c = chars.next()?;
        if c == quote {
            break;
        }
        if c == '\\' && quote == '"' {
            match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                '\\' => out.push('\\'),
                '"' => out.push('"'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    let rest: String = chars.collect();
    let rest = rest.trim();
    if rest.is_empty() || rest.starts_with('#') {
        Some(out)
    } else {
        None
    }
}

/// Resolves the settings from flags, the process environment and the config file.
pub fn load(flags: &FlagConfig) -> CliResult<Settings> {
    let env = EnvConfig::from_process();
    let file = match config_path(flags, &env) {
        Some((path, required)) => {
            if !required && !path.exists() {
                None
            } else {
                Some(load_file(&path)?)
            }
        }
        None => None,
    };
    Ok(resolve(flags, &env, file.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> FileConfig {
        FileConfig {
            endpoint: Some("http://file:1".into()),
            token: Some("file-token".into()),
            ca_cert: Some("/file/ca.pem".into()),
        }
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let flags = FlagConfig {
            endpoint: Some("http://flag:1".into()),
            ..Default::default()
        };
        let env = EnvConfig {
            endpoint: Some("http://env:1".into()),
            token: Some("env-token".into()),
            ..Default::default()
        };
        let s = resolve(&flags, &env, Some(&file()));
        assert_eq!(s.endpoint, "http://flag:1");
        assert_eq!(s.token.as_deref(), Some("env-token"));
        assert_eq!(s.ca_cert, Some(PathBuf::from("/file/ca.pem")));

        let s = resolve(&FlagConfig::default(), &EnvConfig::default(), Some(&file()));
        assert_eq!(s.endpoint, "http://file:1");
        assert_eq!(s.token.as_deref(), Some("file-token"));

        let s = resolve(&FlagConfig::default(), &EnvConfig::default(), None);
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(s.token, None);
        assert_eq!(s.ca_cert, None);

        let flags = FlagConfig {
            token: Some("flag-token".into()),
            ..Default::default()
        };
        let s = resolve(&flags, &env, Some(&file()));
        assert_eq!(s.token.as_deref(), Some("flag-token"));
        assert_eq!(s.endpoint, "http://env:1");
    }

    #[test]
    fn bare_host_port_gets_a_scheme() {
        assert_eq!(normalize_endpoint("coord:50051"), "http://coord:50051");
        assert_eq!(normalize_endpoint("https://coord:443"), "https://coord:443");
        let flags = FlagConfig {
            endpoint: Some("coord:50051".into()),
            ..Default::default()
        };
        let s = resolve(&flags, &EnvConfig::default(), None);
        assert_eq!(s.endpoint, "http://coord:50051");
        let env = EnvConfig {
            ca_cert: Some("/ca.pem".into()),
            ..Default::default()
        };
        let s = resolve(&flags, &env, None);
        assert_eq!(s.endpoint, "https://coord:50051", "a CA file makes a bare host:port TLS");
        let flags = FlagConfig {
            endpoint: Some("http://coord:50051".into()),
            ..Default::default()
        };
        assert_eq!(resolve(&flags, &env, None).endpoint, "http://coord:50051");
    }

    #[test]
    fn parses_json_and_flat_toml() {
        let j = parse_config(r#"{"endpoint": "http://a:1", "token": "t"}"#, true).unwrap();
        assert_eq!(j.endpoint.as_deref(), Some("http://a:1"));
        assert_eq!(j.token.as_deref(), Some("t"));
        assert!(
            parse_config(r#"{"endpiont": "x"}"#, true).is_err(),
            "unknown keys are refused"
        );

        let t = parse_config(
            "# farm\nendpoint = \"http://b:2\"  # comment\ntoken = 'lit'\n",
            false,
        )
        .unwrap();
        assert_eq!(t.endpoint.as_deref(), Some("http://b:2"));
        assert_eq!(t.token.as_deref(), Some("lit"));
        assert!(parse_config("endpoint = http://b", false).is_err());
        assert!(parse_config("colour = \"red\"", false).is_err());
    }

    #[test]
    fn named_config_file_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(&p, r#"{"endpoint":"http://x:9"}"#).unwrap();
        assert_eq!(load_file(&p).unwrap().endpoint.as_deref(), Some("http://x:9"));
        let t = dir.path().join("c.toml");
        std::fs::write(&t, "ca_cert = \"certs/ca.pem\"\n").unwrap();
        assert_eq!(
            load_file(&t).unwrap().ca_cert,
            Some(dir.path().join("certs/ca.pem")),
            "a relative ca_cert is relative to the config file"
        );
        std::fs::write(&t, "ca_cert = \"/abs/ca.pem\"\n").unwrap();
        assert_eq!(load_file(&t).unwrap().ca_cert, Some(PathBuf::from("/abs/ca.pem")));
        let missing = load_file(&dir.path().join("nope.json")).unwrap_err();
        assert_eq!(missing.exit_code(), 2);
        let flags = FlagConfig {
            config: Some(p.clone()),
            ..Default::default()
        };
        assert_eq!(config_path(&flags, &EnvConfig::default()), Some((p, true)));
    }
}

//! TLS on the coordinator's gRPC port, with real processes and a throwaway PKI made per test run (a CA
//! and a server certificate for 127.0.0.1 and localhost, plus an unrelated CA):
//!
//! * `farm --ca-cert` (and `FARM_CA_CERT`) reaches the TLS coordinator; a worker with `--ca-cert`
//!   connects and renders a small job submitted over TLS;
//! * without the CA, or with the wrong one, the CLI fails with a "not trusted" message naming the
//!   endpoint and exit code 1; plaintext `http://` to the TLS port fails (exit 1, nothing served); a
//!   missing CA file is a usage error (exit 2); a worker without the CA logs why it cannot connect;
//! * `/metrics` stays plain HTTP next to a TLS gRPC port;
//! * the coordinator refuses to start on a missing file, a file that is not PEM, or a key that does not
//!   belong to the certificate, naming the file; the worker refuses a missing or non-PEM CA file and a
//!   CA file with an `http://` coordinator URL.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use farm_tests::{
    binary, free_port, fresh_database, Cli, Coordinator, CoordinatorOptions, Worker,
    TINY_CPU_WORKER,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// PEM files of a test PKI in a temporary directory.
struct Pki {
    _dir: tempfile::TempDir,
    /// The CA that signed `cert`.
    ca: PathBuf,
    /// A CA that signed nothing here.
    other_ca: PathBuf,
    /// Server certificate for 127.0.0.1 and localhost, and its key.
    cert: PathBuf,
    key: PathBuf,
    /// A key that does not belong to `cert`.
    stray_key: PathBuf,
}

fn new_ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap(), key)
}

fn make_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let (ca, ca_key) = new_ca("farm test CA");
    let (other_ca, _) = new_ca("unrelated CA");
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "farm coordinator");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let stray = KeyPair::generate().unwrap();
    let pki = Pki {
        ca: path("ca.pem"),
        other_ca: path("other-ca.pem"),
        cert: path("server.pem"),
        key: path("server-key.pem"),
        stray_key: path("stray-key.pem"),
        _dir: dir,
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.other_ca, other_ca.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    std::fs::write(&pki.stray_key, stray.serialize_pem()).unwrap();
    pki
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `GET /metrics` over plain HTTP/1.
fn http_get_metrics(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn cli_and_worker_over_tls() {
    let pki = make_pki();
    let db = fresh_database("tls_e2e");
    let metrics_port = free_port();
    let coord = Coordinator::spawn(
        CoordinatorOptions::new(&db)
            .tls(&pki.cert, &pki.key)
            .args(["--idle-poll-ms", "100", "--metrics-listen"])
            .arg(format!("127.0.0.1:{metrics_port}")),
    )
    .unwrap();
    let url = coord.https_url();
    let token = coord.token("tls-tenant", "client").unwrap();
    let cli = Cli::new(&url, &token).timeout(Duration::from_secs(300));

    // Trusting the CA: the call goes through (no jobs yet), by flag and by environment.
    let jobs = cli
        .run(&["--ca-cert", s(&pki.ca), "--json", "jobs"])
        .expect_success()
        .json();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0, "{jobs}");
    Cli::new(&url, &token)
        .env("FARM_CA_CERT", s(&pki.ca))
        .run(&["--json", "jobs"])
        .expect_success();
    // A config file's relative ca_cert is found next to the file.
    let cfg_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&pki.ca, cfg_dir.path().join("ca.pem")).unwrap();
    let cfg = cfg_dir.path().join("farm.toml");
    std::fs::write(&cfg, "ca_cert = \"ca.pem\"\n").unwrap();
    cli.run(&["--config", s(&cfg), "--json", "jobs"])
        .expect_success();

    // Without the CA (system roots only) and with an unrelated CA: not trusted, exit 1, endpoint named.
    // `watch`, which rides out outages, gives up at once too (a 60 s limit instead of its 10 minutes).
    for (what, args) in [
        ("no CA", vec!["jobs"]),
        ("other CA", vec!["--ca-cert", s(&pki.other_ca), "jobs"]),
        (
            "watch, no CA",
            vec!["watch", "00000000-0000-0000-0000-000000000000"],
        ),
    ] {
        let out = cli.clone().timeout(Duration::from_secs(60)).run(&args);
        assert_eq!(out.code, 1, "{what}: {}", out.stderr);
        assert!(
            out.stderr.contains("TLS handshake failed")
                && out.stderr.contains("not trusted")
                && out.stderr.contains(&url),
            "{what}: {}",
            out.stderr
        );
    }

    // Plaintext to the TLS port: nothing is served, and the message points at https://. Several
    // times, since what the client reads first (the TLS alert or the closed socket) is a race.
    let plain = Cli::new(&coord.url(), &token).timeout(Duration::from_secs(120));
    for _ in 0..3 {
        let out = plain.run(&["--json", "jobs"]);
        assert_eq!(out.code, 1, "plaintext to the TLS port: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        assert!(
            out.stderr.contains(&coord.url()) && out.stderr.contains("use an https:// endpoint"),
            "{}",
            out.stderr
        );
    }
    // A CA file that does not exist, or one with a plaintext endpoint: usage errors.
    let out = cli.run(&["--ca-cert", "/nonexistent/ca.pem", "jobs"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("/nonexistent/ca.pem"), "{}", out.stderr);
    let out = plain.run(&["--ca-cert", s(&pki.ca), "jobs"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("not https://"), "{}", out.stderr);

    // The metrics endpoint is still plain HTTP.
    let metrics = http_get_metrics(metrics_port);
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");

    // A worker without the CA cannot connect, and says why.
    let wtoken = coord.token("tls-tenant", "worker").unwrap();
    let mut untrusting = Worker::spawn(
        &url,
        &wtoken,
        &[
            "--renderer",
            "synthetic",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--no-warmup",
        ],
    )
    .unwrap();
    untrusting
        .wait_for_log("invalid peer certificate", Duration::from_secs(60))
        .unwrap();
    assert!(
        untrusting.log().contains("certificate is not trusted"),
        "{}",
        untrusting.log()
    );
    assert!(
        !untrusting.log().contains("connected to the coordinator"),
        "{}",
        untrusting.log()
    );
    untrusting.kill();

    // A worker with the CA renders a small job submitted over TLS.
    let mut args = TINY_CPU_WORKER.to_vec();
    args.extend(["--ca-cert", s(&pki.ca)]);
    let mut worker = Worker::spawn(&url, &wtoken, &args).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "1girl, solo, smile\nlandscape, sky\n").unwrap();
    let out = cli
        .run(&[
            "--ca-cert",
            s(&pki.ca),
            "--json",
            "submit",
            s(&prompts),
            "--model",
            "tiny",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            "3",
            "--wait",
        ])
        .expect_success();
    let lines = out.json_lines();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    let job = lines[0]["job_id"].as_str().unwrap().to_string();
    assert_eq!(lines[1]["job"]["state"], "succeeded", "{}", out.stdout);
    assert_eq!(lines[1]["job"]["counts"]["succeeded"], 2, "{}", out.stdout);
    assert!(
        worker.log().contains("connected to the coordinator"),
        "{}",
        worker.log()
    );

    // Results come back over TLS and are the images the worker made.
    let results = dir.path().join("out");
    let r = cli
        .run(&[
            "--ca-cert",
            s(&pki.ca),
            "--json",
            "results",
            &job,
            "-o",
            s(&results),
        ])
        .expect_success()
        .json();
    assert_eq!(r["downloaded"], 2, "{r}");
    let png = std::fs::read(results.join("000001.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    worker.kill();
}

/// Runs `farm-coordinator serve` with TLS files and returns (exit code, stderr). TLS is checked before
/// the database is reached, so no database is needed.
fn serve_with(cert: &Path, key: &Path) -> (Option<i32>, String) {
    let out = Command::new(binary("farm-coordinator"))
        .args(["serve", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--database-url", "postgres://farm@127.0.0.1:1/none"])
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .env_remove("FARM_TLS_CERT")
        .env_remove("FARM_TLS_KEY")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unusable_tls_settings_stop_the_start() {
    let pki = make_pki();
    let missing = pki.cert.with_file_name("missing.pem");
    let (code, err) = serve_with(&missing, &pki.key);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("--tls-cert") && err.contains("missing.pem"),
        "{err}"
    );

    let (code, err) = serve_with(&pki.cert, &missing);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("--tls-key") && err.contains("missing.pem"),
        "{err}"
    );

    // A certificate where the key should be, and the other way round.
    let (code, err) = serve_with(&pki.cert, &pki.cert);
    assert_ne!(code, Some(0));
    assert!(err.contains("not a PEM private key"), "{err}");
    let (code, err) = serve_with(&pki.key, &pki.key);
    assert_ne!(code, Some(0));
    assert!(err.contains("not a PEM certificate"), "{err}");

    // Well-formed files that do not belong together.
    let (code, err) = serve_with(&pki.cert, &pki.stray_key);
    assert_ne!(code, Some(0));
    assert!(err.contains("unusable TLS certificate or key"), "{err}");

    // One without the other is a usage error.
    let out = Command::new(binary("farm-coordinator"))
        .args([
            "serve",
            "--database-url",
            "postgres://x@127.0.0.1:1/none",
            "--tls-cert",
        ])
        .arg(&pki.cert)
        .env_remove("FARM_TLS_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tls-key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The worker checks its CA file and URL before loading anything.
    let synthetic = [
        "--renderer",
        "synthetic",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--no-warmup",
    ];
    for (url, ca, expect) in [
        ("https://127.0.0.1:1", s(&missing), "missing.pem"),
        ("https://127.0.0.1:1", s(&pki.key), "not a PEM certificate"),
        ("http://127.0.0.1:1", s(&pki.ca), "not https://"),
    ] {
        let mut args = synthetic.to_vec();
        args.extend(["--ca-cert", ca]);
        let mut worker = Worker::spawn(url, "farm_unused", &args).unwrap();
        let status = worker.wait_exit(Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| !s.success()),
            "{url} {ca}: {status:?}"
        );
        assert!(worker.log().contains(expect), "{}", worker.log());
    }
}

//! What operators and their tools see: settings from flags, environment and file in that
//! order; Prometheus metrics; JSON logs that never carry a body or subject; reflection,
//! exercised by `buf curl`, a client no one here wrote.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use audit_ledger::proto::{AppendBatchRequest, AppendRequest, CheckSenderRequest, Topic};
use common::{ChildServer, binary, communication, connect, free_port, tool};

fn serve_command(data_dir: &std::path::Path) -> Command {
    let mut command = Command::new(binary());
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "error")
        .env_remove("AUDIT_LEDGER_MAX_BATCH_RECORDS")
        .env_remove("AUDIT_LEDGER_LISTEN")
        .stderr(Stdio::inherit());
    command
}

/// The limit AppendBatch reports for a batch that is too big.
async fn batch_limit(address: &str) -> String {
    let mut client = connect(address).await;
    let status = client
        .append_batch(AppendBatchRequest {
            communications: (0..50).map(|n| communication("s", n)).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    status
        .message()
        .rsplit("limit of ")
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_come_from_flags_then_environment_then_file_then_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("settings.toml");
    std::fs::write(
        &settings,
        "listen = \"127.0.0.1:0\"\nmax_batch_records = 3\n",
    )
    .unwrap();
    let data = dir.path().join("data");

    // The file over the default (10,000).
    let mut command = serve_command(&data);
    command.arg("--config").arg(&settings);
    let server = ChildServer::spawn(command);
    assert_eq!(batch_limit(&server.address).await, "3");
    server.terminate();

    // The environment over the file.
    let mut command = serve_command(&data);
    command
        .arg("--config")
        .arg(&settings)
        .env("AUDIT_LEDGER_MAX_BATCH_RECORDS", "5");
    let server = ChildServer::spawn(command);
    assert_eq!(batch_limit(&server.address).await, "5");
    server.terminate();

    // A flag over the environment (and the file named by the environment).
    let mut command = serve_command(&data);
    command
        .args(["--max-batch-records", "2"])
        .env("AUDIT_LEDGER_CONFIG", &settings)
        .env("AUDIT_LEDGER_MAX_BATCH_RECORDS", "5");
    let server = ChildServer::spawn(command);
    assert_eq!(batch_limit(&server.address).await, "2");
    server.terminate();

    // A key that is no setting is refused, naming it.
    std::fs::write(&settings, "max_batch_recrods = 3\n").unwrap();
    let output = serve_command(&data)
        .arg("--config")
        .arg(&settings)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown setting \"max_batch_recrods\""),
        "{stderr}"
    );
}

/// A setting that requires another may come from a different source than it: the
/// certificate as a flag, its key from the environment or the file. The server then
/// serves TLS; with the key nowhere, it stops before announcing an address.
#[tokio::test(flavor = "multi_thread")]
async fn tls_settings_may_come_from_flag_environment_and_file_together() {
    use audit_ledger::proto::GetCheckpointRequest;
    use audit_ledger::proto::ledger_service_client::LedgerServiceClient;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let dir = tempfile::tempdir().unwrap();
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let certificate = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key_pair)
        .unwrap();
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server.key");
    std::fs::write(&cert, certificate.pem()).unwrap();
    std::fs::write(&key, key_pair.serialize_pem()).unwrap();
    let settings = dir.path().join("settings.toml");
    std::fs::write(
        &settings,
        format!(
            "listen = \"127.0.0.1:0\"\ntls_key = {:?}\n",
            key.to_str().unwrap()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let call = |address: String| {
        let ca = Certificate::from_pem(certificate.pem());
        async move {
            let port = address.rsplit(':').next().unwrap().to_owned();
            let channel = Channel::from_shared(format!("https://localhost:{port}"))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(ca)
                        .domain_name("localhost"),
                )
                .unwrap()
                .connect()
                .await
                .expect("TLS connection");
            LedgerServiceClient::new(channel)
                .get_checkpoint(GetCheckpointRequest::default())
                .await
                .expect("a call over TLS")
                .into_inner()
                .checkpoint
                .expect("a checkpoint")
                .size
        }
    };

    // The key from the file; the certificate as a flag, then from the environment.
    let mut as_flag = serve_command(&data);
    as_flag.arg("--tls-cert").arg(&cert);
    let mut from_environment = serve_command(&data);
    from_environment.env("AUDIT_LEDGER_TLS_CERT", &cert);
    for mut command in [as_flag, from_environment] {
        command
            .env_remove("AUDIT_LEDGER_TLS_KEY")
            .arg("--config")
            .arg(&settings);
        let server = ChildServer::spawn(command);
        assert_eq!(call(server.address.clone()).await, 0);
        server.terminate();
    }

    // No key anywhere: refused by the parse, nothing announced.
    let mut command = serve_command(&data);
    command
        .env_remove("AUDIT_LEDGER_TLS_KEY")
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert);
    refused_without_announcing(command, "--tls-key");

    // A key file that is not there: refused when the server opens, nothing announced.
    let mut command = serve_command(&data);
    command
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .env("AUDIT_LEDGER_TLS_KEY", dir.path().join("gone.key"));
    refused_without_announcing(command, "gone.key");
}

/// Runs a `serve` that must fail: it exits unsuccessfully, says `why` on stderr and never
/// prints the `listening on` line a supervisor waits for.
fn refused_without_announcing(mut command: Command, why: &str) {
    let output = command.stderr(Stdio::piped()).output().unwrap();
    assert!(!output.status.success());
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening on"),
        "an address was announced"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(why), "{stderr}");
}

/// GET /metrics over plain HTTP/1.0.
fn scrape(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1."), "{response}");
    response
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_appends_verdicts_calls_and_commits() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut command = serve_command(dir.path());
    command
        .args(["--listen", "127.0.0.1:0", "--metrics-listen"])
        .arg(format!("127.0.0.1:{port}"));
    let server = ChildServer::spawn(command);
    let mut client = connect(&server.address).await;
    for n in [1, 2, 3, 1] {
        client
            .append(AppendRequest {
                communication: Some(communication("partner-1", n)),
            })
            .await
            .unwrap();
    }
    let mut bad = communication("partner-1", 9);
    bad.customer_id.clear();
    client
        .append(AppendRequest {
            communication: Some(bad),
        })
        .await
        .unwrap_err();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut compliance =
        audit_ledger::proto::compliance_service_client::ComplianceServiceClient::new(channel);
    compliance
        .check_sender(CheckSenderRequest {
            sender_id: "partner-1".into(),
            customer_id: "customer-1".into(),
            topic: Topic::Support as i32,
            ..Default::default()
        })
        .await
        .unwrap();

    let metrics = scrape(port);
    let append = "method=\"/audit.ledger.v1.LedgerService/Append\"";
    assert_eq!(
        sample(&metrics, "audit_ledger_appends_total{result=\"appended\"}"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "audit_ledger_appends_total{result=\"duplicate\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&metrics, "audit_ledger_tree_size"), Some(3.0));
    assert_eq!(
        sample(
            &metrics,
            &format!("audit_ledger_grpc_requests_total{{{append},code=\"OK\"}}")
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("audit_ledger_grpc_requests_total{{{append},code=\"INVALID_ARGUMENT\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("audit_ledger_grpc_request_seconds_count{{{append}}}")
        ),
        Some(5.0)
    );
    // Four verdicts at ingestion (the duplicate is judged too) and one CheckSender.
    let verdicts: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("audit_ledger_verdicts_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(verdicts, 5.0, "{metrics}");
    assert_eq!(
        sample(&metrics, "audit_ledger_group_commit_entries_sum"),
        Some(3.0)
    );
    assert!(sample(&metrics, "audit_ledger_flush_seconds_count").unwrap() >= 3.0);
    drop((client, compliance));
    server.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_and_never_carry_a_body_or_subject() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut command = serve_command(&dir.path().join("data"));
    command
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(&log).unwrap());
    let server = ChildServer::spawn(command);
    let mut client = connect(&server.address).await;
    let mut secret = communication("partner-1", 1);
    secret.subject = "SECRET-SUBJECT-4711".into();
    secret.body = b"SECRET-BODY-4711".to_vec();
    client
        .append(AppendRequest {
            communication: Some(secret.clone()),
        })
        .await
        .unwrap();
    // And rejected once (a conflict), which is logged as a failure.
    secret.body = b"SECRET-BODY-4712".to_vec();
    client
        .append(AppendRequest {
            communication: Some(secret),
        })
        .await
        .unwrap_err();
    drop(client);
    assert!(server.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().filter(|line| !line.is_empty()).collect();
    assert!(lines.len() >= 3, "{text}");
    for line in lines {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        assert!(object.get("level").is_some() && object.get("timestamp").is_some());
        assert!(
            !line.contains("SECRET"),
            "a body or subject was logged: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn buf_curl_calls_every_service_through_reflection() {
    let Some(buf) = tool("AUDIT_LEDGER_BUF", "target/ci-tools/node_modules/.bin/buf") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut command = serve_command(dir.path());
    command.args(["--listen", "127.0.0.1:0"]);
    let server = ChildServer::spawn(command);
    let url = format!("http://{}", server.address);
    let curl = |args: &[&str]| {
        let output = Command::new(&buf)
            .args(["curl", "--protocol", "grpc", "--http2-prior-knowledge"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "buf curl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let methods = curl(&["--list-methods", &url]);
    for method in [
        "audit.ledger.v1.LedgerService/Append",
        "audit.ledger.v1.LedgerService/GetInclusionProof",
        "audit.ledger.v1.ComplianceService/CheckSender",
        "audit.ledger.v1.AccessLogService/ListAccessLog",
        "grpc.health.v1.Health/Check",
    ] {
        assert!(
            methods.lines().any(|line| line == method),
            "{method} in {methods}"
        );
    }
    let appended: serde_json::Value = serde_json::from_str(&curl(&[
        "-d",
        r#"{"communication":{"message_id":"m-1","sender_id":"partner-1","customer_id":"c-1","topic":"TOPIC_SUPPORT","channel":"email","sent_at":"2026-01-01T00:00:00Z","subject":"Renewal","body":"aGVsbG8="}}"#,
        &format!("{url}/audit.ledger.v1.LedgerService/Append"),
    ]))
    .unwrap();
    assert_eq!(appended["assessment"]["rule"], "UNKNOWN-SENDER");
    let checkpoint: serde_json::Value = serde_json::from_str(&curl(&[
        "-d",
        "{}",
        &format!("{url}/audit.ledger.v1.LedgerService/GetCheckpoint"),
    ]))
    .unwrap();
    assert_eq!(checkpoint["checkpoint"]["size"], "1");
    let verdict: serde_json::Value = serde_json::from_str(&curl(&[
        "-d",
        r#"{"sender_id":"partner-1","customer_id":"c-1","topic":"TOPIC_SUPPORT"}"#,
        &format!("{url}/audit.ledger.v1.ComplianceService/CheckSender"),
    ]))
    .unwrap();
    assert_eq!(verdict["assessment"]["verdict"], "VERDICT_VIOLATION");
    let health: serde_json::Value = serde_json::from_str(&curl(&[
        "-d",
        r#"{"service":"audit.ledger.v1.Writes"}"#,
        &format!("{url}/grpc.health.v1.Health/Check"),
    ]))
    .unwrap();
    assert_eq!(health["status"], "SERVING");
    server.terminate();
}

/// The `ENV` settings of the Dockerfile's runtime stage, as (name, value).
fn dockerfile_environment() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|line| line.trim_start().starts_with("ENV "))
        .expect("the Dockerfile sets its settings with ENV");
    line.trim_start()["ENV ".len()..]
        .split_whitespace()
        .map(|pair| {
            let (name, value) = pair.split_once('=').expect("ENV NAME=value");
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

/// No container engine runs on the build machines, so the image's contract is checked
/// here instead: the binary started with exactly the Dockerfile's environment (its /data and
/// /config mapped to temporary directories) and a settings file in /config serves on every
/// interface, logs JSON, and keeps its ledger in the data volume.
#[tokio::test(flavor = "multi_thread")]
async fn the_container_environment_serves_from_its_volume_and_settings_file() {
    let root = tempfile::tempdir().unwrap();
    let (data, config) = (root.path().join("data"), root.path().join("config"));
    std::fs::create_dir_all(&config).unwrap();
    let environment = dockerfile_environment();
    let names: Vec<&str> = environment.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "AUDIT_LEDGER_DATA_DIR",
            "AUDIT_LEDGER_LISTEN",
            "AUDIT_LEDGER_CONFIG",
            "AUDIT_LEDGER_LOG_FORMAT"
        ]
    );
    let mut command = Command::new(binary());
    command.arg("serve").env_clear().env("RUST_LOG", "info");
    for (name, value) in environment {
        let value = if let Some(rest) = value.strip_prefix("/data") {
            format!("{}{rest}", data.display())
        } else if let Some(rest) = value.strip_prefix("/config") {
            format!("{}{rest}", config.display())
        } else if name == "AUDIT_LEDGER_LISTEN" {
            // Every interface, as in the image; a free port instead of 50051.
            assert_eq!(value, "0.0.0.0:50051");
            "0.0.0.0:0".to_owned()
        } else {
            value
        };
        command.env(name, value);
    }
    // Without credentials and TLS the server refuses every interface: the settings file is
    // where an operator says otherwise (here, insecure, to keep the test small).
    std::fs::write(config.join("audit-ledger.toml"), "").unwrap();
    let refused = command.output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refusing to listen on 0.0.0.0"),
        "{refused:?}"
    );
    std::fs::write(
        config.join("audit-ledger.toml"),
        "insecure = true\nmax-batch-records = 7\n",
    )
    .unwrap();
    command.stderr(Stdio::piped());
    let mut server = ChildServer::spawn(command);
    let port = server.address.rsplit(':').next().unwrap().to_owned();
    assert!(server.address.starts_with("0.0.0.0:"), "{}", server.address);
    let address = format!("127.0.0.1:{port}");
    assert_eq!(batch_limit(&address).await, "7");
    assert!(data.join(audit_ledger::server::STORE_DIR_NAME).is_dir());
    assert!(data.join("signing.key").is_file());
    let mut stderr = server.child.stderr.take().unwrap();
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());
    let mut logs = String::new();
    stderr.read_to_string(&mut logs).unwrap();
    assert!(!logs.trim().is_empty());
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|error| panic!("not a JSON log line ({error}): {line}"));
    }
}

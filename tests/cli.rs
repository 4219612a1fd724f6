//! The command line for people, driven as a person would: load facts and communications
//! from JSON lines, ask `check`, list `violations` and `communications` in every format.

mod common;

use std::process::{Command, Output};

use common::{TestServer, binary};

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs the client off the async runtime (the server lives on it).
async fn run(server: &str, args: &[&str]) -> Output {
    let server = format!("http://{server}");
    let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(binary())
            .args(&args)
            .env("AUDIT_LEDGER_SERVER", server)
            .env_remove("AUDIT_LEDGER_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compliance_officer_loads_checks_and_lists() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let at = server.address.clone();

    let loaded = run(&at, &["fact", "--from-file", &data("facts.jsonl")]).await;
    assert!(loaded.status.success(), "{loaded:?}");
    assert_eq!(stdout(&loaded), "recorded 4, duplicates 0\n");
    let file = data("communications.jsonl");
    let appended = run(&at, &["append", "--from-file", &file]).await;
    assert_eq!(
        stdout(&appended),
        "appended 2, duplicates 0, violations 1, reviews 0\n"
    );
    // The same file again appends nothing twice.
    let again = run(&at, &["append", "--from-file", &file]).await;
    assert_eq!(
        stdout(&again),
        "appended 0, duplicates 2, violations 1, reviews 0\n"
    );

    // A violation: exit 1, the rule and its evidence.
    let check = [
        "check",
        "--sender",
        "vendor",
        "--customer",
        "c-alpha",
        "--topic",
        "Commercial",
        "--subscription",
        "sub-a1",
        "--at",
        "2026-02-02T00:00:00Z",
        "--output",
        "json",
    ];
    let verdict = run(&at, &check).await;
    assert_eq!(verdict.status.code(), Some(1));
    let answer: serde_json::Value = serde_json::from_str(stdout(&verdict).trim()).unwrap();
    assert_eq!(answer["verdict"], "violation");
    assert_eq!(answer["rule"], "VENDOR-CSP");
    assert_eq!(answer["evidence"], serde_json::json!([1, 3]));
    // The billing partner: allowed, exit 0, a table for people.
    let allowed = run(
        &at,
        &[
            "check",
            "--sender",
            "contoso",
            "--customer",
            "c-alpha",
            "--topic",
            "commercial",
            "--subscription",
            "sub-a1",
            "--at",
            "2026-02-02T00:00:00Z",
        ],
    )
    .await;
    assert_eq!(allowed.status.code(), Some(0));
    let table = stdout(&allowed);
    assert!(table.starts_with("VERDICT"), "{table}");
    assert!(
        table.lines().nth(1).unwrap().starts_with("allowed  BILLER"),
        "{table}"
    );

    let violations = run(&at, &["violations", "--output", "csv"]).await;
    assert_eq!(violations.status.code(), Some(1));
    let csv = stdout(&violations);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "index,sent_at,sender,customer,topic,subscription,message_id,verdict,rule,explanation,evidence"
    );
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[1].starts_with(
        "5,2026-02-02T00:00:00Z,vendor,c-alpha,commercial,sub-a1,m2,violation,VENDOR-CSP,"
    ));

    let listed = run(
        &at,
        &[
            "communications",
            "--customer",
            "c-alpha",
            "--output",
            "json",
        ],
    )
    .await;
    assert!(listed.status.success());
    let indices: Vec<u64> = stdout(&listed)
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["index"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(indices, [4, 5]);

    // Errors are one line, and say what to do; exit 2.
    let bad = run(
        &at,
        &[
            "check",
            "--sender",
            "s",
            "--customer",
            "c",
            "--topic",
            "gossip",
        ],
    )
    .await;
    assert_eq!(bad.status.code(), Some(2));
    let error = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(error.trim().lines().count(), 1, "{error}");
    assert!(error.contains("topic \"gossip\""), "{error}");
    let unreachable = run("127.0.0.1:1", &["violations"]).await;
    assert_eq!(unreachable.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("is it running?"));
    server.stop().await;
}

//! A real client no one here wrote: `examples/python/ledger_client.py` (grpcio, stubs
//! generated from proto/ by grpcio-tools, Ed25519 from `cryptography`) against a live server.

mod common;

use std::process::Command;

use common::{TestServer, tool};

fn verifier_key(data_dir: &std::path::Path) -> String {
    let output = Command::new(common::binary())
        .args(["verifier-key", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_appends_checks_and_verifies_by_itself() {
    let Some(python) = tool("AUDIT_LEDGER_PYTHON", "target/ci-tools/venv/bin/python") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/ledger_client.py"
    );
    let key = verifier_key(dir.path());
    let run = |key: &str| {
        let python = python.clone();
        let address = server.address.clone();
        let key = key.to_owned();
        std::thread::spawn(move || {
            Command::new(python)
                .arg(script)
                .args(["--server", &address, "--verifier-key", &key])
                .output()
                .unwrap()
        })
        .join()
        .unwrap()
    };

    let output = run(&key);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("VERDICT_ALLOWED by BILLER"), "{stdout}");
    assert!(
        stdout.contains("VERDICT_VIOLATION by UNKNOWN-SENDER"),
        "{stdout}"
    );
    assert!(stdout.contains("signature verified"), "{stdout}");
    assert!(
        stdout.contains("inclusion of entry 3 in tree 4: verified"),
        "{stdout}"
    );

    // The same client with another log's key refuses the checkpoint.
    let other = tempfile::tempdir().unwrap();
    TestServer::start(other.path()).await.stop().await;
    let output = run(&verifier_key(other.path()));
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is not signed by")
            || String::from_utf8_lossy(&output.stdout).contains("FAILED"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.stop().await;
}

//! What an auditor does with the command line: export entries with their proofs and check
//! the export later without the server (`export`, `verify --export`), and watch a running
//! ledger as a witness (`verify --server --checkpoint-file`), which must notice a fork and a
//! rollback even when every checkpoint carries a valid signature.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use audit_ledger::proto::AppendBatchRequest;
use common::{TestServer, binary, checkpoint, communication};
use sha2::Digest;

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs the binary off the async runtime (the server lives on it).
async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(binary())
            .args(&args)
            .env_remove("AUDIT_LEDGER_TOKEN")
            .env_remove("AUDIT_LEDGER_VERIFIER_KEY")
            .env_remove("AUDIT_LEDGER_SERVER")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|arg| arg.to_string()).collect()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn verifier_key(data_dir: &Path) -> String {
    let output = run(args(&[
        "verifier-key",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ]))
    .await;
    assert!(output.status.success(), "{}", text(&output));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

async fn append(server: &TestServer, sender: &str, numbers: std::ops::Range<u64>) {
    let mut client = server.client().await;
    client
        .append_batch(AppendBatchRequest {
            communications: numbers.map(|n| communication(sender, n)).collect(),
        })
        .await
        .unwrap();
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count()
}

/// Rewrites the manifest's export digest after an edit, as a forger would.
fn reseal(manifest: &Path, export: &Path) {
    let text = std::fs::read_to_string(manifest).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let mut header: serde_json::Value = serde_json::from_str(first).unwrap();
    let digest = sha2::Sha256::digest(std::fs::read(export).unwrap());
    header["export_sha256"] = hex::encode(digest).into();
    std::fs::write(manifest, format!("{header}\n{rest}")).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_is_verified_offline_and_edits_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let url = format!("http://{}", server.address);
    let key = verifier_key(dir.path()).await;
    for (command, file) in [("fact", "facts.jsonl"), ("append", "communications.jsonl")] {
        let output = run(args(&[
            command,
            "--server",
            &url,
            "--from-file",
            &data(file),
        ]))
        .await;
        assert!(output.status.success(), "{}", text(&output));
    }
    append(&server, "contoso", 0..40).await;
    let size = checkpoint(&mut server.client().await).await.size;
    assert_eq!(size, 46);

    let all = out.path().join("all.jsonl");
    let alpha = out.path().join("alpha.csv");
    let exported = run(args(&[
        "export",
        "--server",
        &url,
        "--out",
        all.to_str().unwrap(),
        "--verifier-key",
        &key,
    ]))
    .await;
    assert!(exported.status.success(), "{}", text(&exported));
    assert!(
        text(&exported).contains("exported 46 entries"),
        "{}",
        text(&exported)
    );
    assert_eq!(lines(&all), 46);
    assert_eq!(lines(&out.path().join("all.jsonl.manifest.jsonl")), 47);
    let exported = run(args(&[
        "export",
        "--server",
        &url,
        "--customer",
        "c-alpha",
        "--format",
        "csv",
        "--out",
        alpha.to_str().unwrap(),
    ]))
    .await;
    assert!(exported.status.success(), "{}", text(&exported));
    // A header and the two communications to c-alpha, facts excluded.
    assert_eq!(lines(&alpha), 3);
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&all)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["index"], 0);
    assert_eq!(first["kind"], "fact.party");

    // An export never overwrites.
    let again = run(args(&[
        "export",
        "--server",
        &url,
        "--out",
        all.to_str().unwrap(),
    ]))
    .await;
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("already exists"));

    // Offline: the server is gone.
    server.stop().await;
    let verify = |path: PathBuf, key: String| {
        run(vec![
            "verify".into(),
            "--export".into(),
            path.to_str().unwrap().into(),
            "--verifier-key".into(),
            key,
        ])
    };
    let verified = verify(out.path().to_owned(), key.clone()).await;
    assert!(verified.status.success(), "{}", text(&verified));
    assert_eq!(
        text(&verified).matches("ok: ").count(),
        2,
        "{}",
        text(&verified)
    );
    assert!(text(&verified).contains("46 entries"));

    // Without a pinned key there is nothing to verify against.
    let unpinned = run(args(&["verify", "--export", out.path().to_str().unwrap()])).await;
    assert_eq!(unpinned.status.code(), Some(2));
    assert!(text(&unpinned).contains("--verifier-key"));
    // Another log's key (same name) does not verify the checkpoint.
    let other = audit_ledger::ledger::CheckpointSigner::new(
        "localhost/audit-ledger",
        ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]),
    )
    .unwrap()
    .verifier_key();
    let foreign = verify(all.clone(), other).await;
    assert_eq!(foreign.status.code(), Some(1), "{}", text(&foreign));
    assert!(text(&foreign).contains("checkpoint"));

    // A changed subject, resealed: caught at its entry, naming the column.
    let original = std::fs::read_to_string(&all).unwrap();
    let edited = original.replacen(
        "Your subscription renewal #7\"",
        "Your subscription renewal #8\"",
        1,
    );
    assert_ne!(edited, original);
    std::fs::write(&all, &edited).unwrap();
    let manifest = out.path().join("all.jsonl.manifest.jsonl");
    let unsealed = verify(all.clone(), key.clone()).await;
    assert_eq!(unsealed.status.code(), Some(1));
    assert!(text(&unsealed).contains("SHA-256"), "{}", text(&unsealed));
    reseal(&manifest, &all);
    let caught = verify(all.clone(), key.clone()).await;
    assert_eq!(caught.status.code(), Some(1), "{}", text(&caught));
    assert!(
        text(&caught).contains("FAILED at entry 13") && text(&caught).contains("column subject"),
        "{}",
        text(&caught)
    );

    // A dropped line, resealed: the manifest still proves it.
    let dropped: String = original
        .lines()
        .filter(|line| !line.starts_with("{\"index\":20,"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&all, dropped).unwrap();
    reseal(&manifest, &all);
    let caught = verify(all.clone(), key.clone()).await;
    assert_eq!(caught.status.code(), Some(1), "{}", text(&caught));
    assert!(text(&caught).contains("entry 20"), "{}", text(&caught));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_witness_follows_growth_and_catches_a_rollback_and_a_fork() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let server = TestServer::start(&a).await;
    append(&server, "contoso", 0..10).await;
    server.stop().await;
    // The same ledger, key included, twice: later they diverge.
    copy_dir(&a, &b);
    let key = verifier_key(&a).await;
    let saved = root.path().join("seen.checkpoint");
    let witness = |address: String, extra: &[&str]| {
        let mut list = args(&["verify", "--server"]);
        list.push(format!("http://{address}"));
        list.extend(args(&["--verifier-key", &key, "--checkpoint-file"]));
        list.push(saved.to_str().unwrap().to_owned());
        list.extend(args(extra));
        run(list)
    };

    let server = TestServer::start(&a).await;
    let first = witness(server.address.clone(), &[]).await;
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("(trusted on first use): size 10"),
        "{}",
        text(&first)
    );
    assert!(std::fs::read_to_string(&saved).unwrap().contains("\n10\n"));
    append(&server, "contoso", 10..15).await;
    let grown = witness(server.address.clone(), &["--full"]).await;
    assert!(grown.status.success(), "{}", text(&grown));
    assert!(
        text(&grown).contains("size 10 -> 15") && text(&grown).contains("all 15 entries"),
        "{}",
        text(&grown)
    );
    server.stop().await;
    let seen = std::fs::read(&saved).unwrap();

    // The copy still at size 10: a rollback, though its checkpoint is validly signed.
    let other = TestServer::start(&b).await;
    let rolled_back = witness(other.address.clone(), &[]).await;
    assert_eq!(rolled_back.status.code(), Some(1), "{}", text(&rolled_back));
    assert!(text(&rolled_back).contains("older than the saved one"));
    // It grows past 15 with other entries: a fork.
    append(&other, "fabrikam", 100..107).await;
    let forked = witness(other.address.clone(), &[]).await;
    assert_eq!(forked.status.code(), Some(1), "{}", text(&forked));
    assert!(text(&forked).contains("fork"), "{}", text(&forked));
    // Nothing that failed replaced what was seen.
    assert_eq!(std::fs::read(&saved).unwrap(), seen);
    other.stop().await;

    // A body altered in the store behind the server's back: its checkpoint and proofs are
    // still fine, but a full check fetches every entry and names the altered one.
    let store_dir = b.join(audit_ledger::server::STORE_DIR_NAME);
    let log = store_dir.join(audit_ledger::storage::log_store::LOG_FILE);
    if log.exists() {
        let at =
            common::open_retrying(|| audit_ledger::storage::LogStore::open(&store_dir, 1 << 20))
                .unwrap()
                .entry_ranges(3)
                .unwrap()
                .unwrap()
                .body
                .start;
        let mut bytes = std::fs::read(&log).unwrap();
        bytes[at as usize] ^= 0x20;
        std::fs::write(&log, bytes).unwrap();
    } else {
        let store = common::open_store(&store_dir);
        let key = audit_ledger::storage::sled_store::body_key(3);
        let mut body = store.raw().get(key).unwrap().unwrap().to_vec();
        body[0] ^= 0x20;
        store.raw().insert(key, body).unwrap();
        store.raw().flush().unwrap();
    }
    let other = TestServer::start(&b).await;
    let mut list = args(&["verify", "--full", "--verifier-key", &key, "--server"]);
    list.push(format!("http://{}", other.address));
    let altered = run(list).await;
    assert_eq!(altered.status.code(), Some(1), "{}", text(&altered));
    assert!(
        text(&altered).contains("entry 3: body does not match"),
        "{}",
        text(&altered)
    );
    other.stop().await;
}

//! Durability and integrity: restart, SIGTERM, kill -9 under concurrent appends, and
//! `verify` / start-up finding a store altered on disk.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use audit_ledger::config::ServerConfig;
use audit_ledger::proto::{
    AppendBatchRequest, AppendRequest, Checkpoint, GetConsistencyProofRequest, GetEntryRequest,
};
use audit_ledger::server::{STORE_DIR_NAME, Server};
use audit_ledger::storage::sled_store::{checkpoint_key, leaf_key, nodes_key};
use common::{
    ChildServer, TestServer, checkpoint, communication, connect, hash32, rfc9162, run_verify,
};

async fn assert_consistent(client: &mut common::Client, old: &Checkpoint, new: &Checkpoint) {
    let proof = client
        .get_consistency_proof(GetConsistencyProofRequest {
            from_size: old.size,
            to_size: new.size,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        rfc9162::verify_consistency(
            old.size,
            new.size,
            &hash32(&old.root_hash),
            &hash32(&new.root_hash),
            &proof.hashes
        ),
        "checkpoint {} is not consistent with {}",
        new.size,
        old.size
    );
}

#[tokio::test]
async fn restart_keeps_every_entry_and_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    client
        .append_batch(AppendBatchRequest {
            communications: (0..25).map(|n| communication("s", n)).collect(),
        })
        .await
        .unwrap();
    let before = checkpoint(&mut client).await;
    let entry_before = client
        .get_entry(GetEntryRequest { index: 24 })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let after = checkpoint(&mut client).await;
    assert_eq!(
        after, before,
        "restart re-serves the same signed checkpoint"
    );
    let entry_after = client
        .get_entry(GetEntryRequest { index: 24 })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(entry_after, entry_before);

    // The chain continues from where it stopped.
    let next = client
        .append(AppendRequest {
            communication: Some(communication("s", 25)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.index, 25);
    let entry = client
        .get_entry(GetEntryRequest { index: 25 })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(entry.record.unwrap().prev_leaf_hash, entry_before.leaf_hash);
    let grown = checkpoint(&mut client).await;
    assert_consistent(&mut client, &before, &grown).await;
    // Idempotency survives the restart too.
    let retry = client
        .append(AppendRequest {
            communication: Some(communication("s", 3)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(retry.duplicate);
    assert_eq!(retry.index, 3);
    server.stop().await;

    let (ok, output) = run_verify(dir.path());
    assert!(ok, "{output}");
    assert!(output.starts_with("ok: 26 entries"), "{output}");
}

#[tokio::test]
async fn binary_prints_its_address_first_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path());
    let mut client = connect(&server.address).await;
    client
        .append(AppendRequest {
            communication: Some(communication("s", 1)),
        })
        .await
        .unwrap();
    // verifier-key works while the server holds the store.
    let output = Command::new(common::binary())
        .args(["verifier-key", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let key = String::from_utf8(output.stdout).unwrap();
    assert!(key.starts_with("localhost/audit-ledger+"), "{key}");
    // verify refuses a ledger in use instead of reading it half-way.
    let output = Command::new(common::binary())
        .args(["verify", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "verify must not run against a live store"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is the server running?"), "{stderr}");

    // The client stays connected: shutdown must not wait for it forever.
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    drop(client);
    let (ok, output) = run_verify(dir.path());
    assert!(ok, "{output}");

    // Data dir and key are owner-only.
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(dir.path().join("signing.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
}

/// Acknowledged appends: index -> (leaf hash, message id).
type Acknowledged = BTreeMap<u64, (Vec<u8>, String)>;

/// kill -9 at random moments under concurrent unary and batch appends, several times in a
/// row: every acknowledged entry is there with identical bytes, the ledger verifies, and
/// each checkpoint is consistent with every earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<Acknowledged>> = Arc::default();
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut next_message = 0u64;

    // KILL_ROUNDS=50 for a release check; 4 in CI.
    let rounds: u64 = std::env::var("KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for round in 0..rounds {
        let server = ChildServer::start(dir.path());
        let mut client = connect(&server.address).await;
        checkpoints.push(checkpoint(&mut client).await);

        let mut writers = Vec::new();
        for writer in 0..6u64 {
            let address = server.address.clone();
            let acked = acked.clone();
            let base = next_message + writer * 1_000_000;
            writers.push(tokio::spawn(async move {
                let mut client = connect(&address).await;
                for n in base.. {
                    let sender = format!("writer-{writer}");
                    if n % 3 == 0 {
                        let batch: Vec<_> =
                            (0..5).map(|k| communication(&sender, n * 10 + k)).collect();
                        let ids: Vec<String> = batch.iter().map(|c| c.message_id.clone()).collect();
                        match client
                            .append_batch(AppendBatchRequest {
                                communications: batch,
                            })
                            .await
                        {
                            Ok(response) => {
                                let mut acked = acked.lock().unwrap();
                                for (result, id) in
                                    response.into_inner().results.into_iter().zip(ids)
                                {
                                    acked.insert(result.index, (result.leaf_hash, id));
                                }
                            }
                            Err(_) => return,
                        }
                    } else {
                        let communication = communication(&sender, n * 10);
                        let id = communication.message_id.clone();
                        match client
                            .append(AppendRequest {
                                communication: Some(communication),
                            })
                            .await
                        {
                            Ok(response) => {
                                let response = response.into_inner();
                                acked
                                    .lock()
                                    .unwrap()
                                    .insert(response.index, (response.leaf_hash, id));
                            }
                            Err(_) => return,
                        }
                    }
                }
            }));
        }
        // A pseudo-random moment in the middle of the load.
        let pause = 150 + (round * 7919 + 31) % 250;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        server.kill();
        for writer in writers {
            writer.await.unwrap();
        }
        next_message += 10_000_000;
    }

    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "the load produced only {} acks",
        acked.len()
    );
    let server = ChildServer::start(dir.path());
    let mut client = connect(&server.address).await;
    let last = checkpoint(&mut client).await;
    for (index, (leaf_hash, message_id)) in &acked {
        let entry = client
            .get_entry(GetEntryRequest { index: *index })
            .await
            .unwrap_or_else(|status| panic!("acknowledged entry {index} lost: {status:?}"))
            .into_inner()
            .entry
            .unwrap();
        assert_eq!(&entry.leaf_hash, leaf_hash, "entry {index} changed");
        assert_eq!(rfc9162::leaf_hash(&entry.leaf).to_vec(), *leaf_hash);
        let Some(audit_ledger::proto::leaf_record::Record::Communication(c)) =
            entry.record.unwrap().record
        else {
            panic!("entry {index} is not a communication");
        };
        assert_eq!(&c.message_id, message_id);
    }
    for earlier in &checkpoints {
        assert_consistent(&mut client, earlier, &last).await;
    }
    drop(client);
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());
    let (ok, output) = run_verify(dir.path());
    assert!(ok, "{output}");
}

/// A stopped all-in-sled ledger of `count` communications (these tests alter sled keys).
async fn ledger_with_entries(dir: &Path, count: u64) {
    ledger_in(dir, audit_ledger::storage::StorageKind::Sled, count).await;
}

/// A stopped ledger of `count` communications on `storage`, written in groups of four.
async fn ledger_in(dir: &Path, storage: audit_ledger::storage::StorageKind, count: u64) {
    let mut config = ServerConfig::new(dir, "127.0.0.1:0".parse().unwrap());
    config.storage = storage;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    for chunk in (0..count).collect::<Vec<_>>().chunks(4) {
        client
            .append_batch(AppendBatchRequest {
                communications: chunk.iter().map(|&n| communication("s", n)).collect(),
            })
            .await
            .unwrap();
    }
    server.stop().await;
}

fn alter(dir: &Path, change: impl FnOnce(&sled::Db)) {
    let store = common::open_store(&dir.join(STORE_DIR_NAME));
    change(store.raw());
    store.raw().flush().unwrap();
}

fn flip_a_byte(db: &sled::Db, key: &[u8]) {
    let mut value = db.get(key).unwrap().expect("key exists").to_vec();
    let last = value.len() - 1;
    value[last] ^= 0x01;
    db.insert(key, value).unwrap();
}

#[tokio::test]
async fn verify_names_the_first_bad_index_of_an_altered_store() {
    // A changed leaf.
    let dir = tempfile::tempdir().unwrap();
    ledger_with_entries(dir.path(), 12).await;
    let (ok, output) = run_verify(dir.path());
    assert!(ok && output.starts_with("ok: 12 entries"), "{output}");
    alter(dir.path(), |db| flip_a_byte(db, &leaf_key(5)));
    let (ok, output) = run_verify(dir.path());
    assert!(!ok);
    assert!(output.starts_with("FAILED at entry 5"), "{output}");

    // A changed tree node.
    let dir = tempfile::tempdir().unwrap();
    ledger_with_entries(dir.path(), 12).await;
    alter(dir.path(), |db| flip_a_byte(db, &nodes_key(7)));
    let (ok, output) = run_verify(dir.path());
    assert!(!ok);
    assert!(output.starts_with("FAILED at entry 7"), "{output}");

    // A changed body.
    let dir = tempfile::tempdir().unwrap();
    ledger_with_entries(dir.path(), 12).await;
    alter(dir.path(), |db| {
        let mut key = leaf_key(2);
        key[0] = b'b';
        flip_a_byte(db, &key);
    });
    let (ok, output) = run_verify(dir.path());
    assert!(!ok);
    assert!(output.starts_with("FAILED at entry 2"), "{output}");

    // A removed entry in the middle.
    let dir = tempfile::tempdir().unwrap();
    ledger_with_entries(dir.path(), 12).await;
    alter(dir.path(), |db| {
        db.remove(leaf_key(9)).unwrap();
    });
    let (ok, output) = run_verify(dir.path());
    assert!(!ok);
    assert!(output.starts_with("FAILED at entry 9"), "{output}");

    // The idempotency index: one key points at another entry, another key is gone.
    for (tampered, change) in [(4u64, "repoint"), (6, "remove")] {
        let dir = tempfile::tempdir().unwrap();
        ledger_with_entries(dir.path(), 12).await;
        alter(dir.path(), |db| {
            let (key, mut value) = db
                .scan_prefix(b"i")
                .map(|item| item.unwrap())
                .find(|(_, value)| value[..8] == tampered.to_be_bytes())
                .map(|(key, value)| (key, value.to_vec()))
                .expect("entry has an idempotency record");
            if change == "remove" {
                db.remove(key).unwrap();
            } else {
                value[..8].copy_from_slice(&3u64.to_be_bytes());
                db.insert(key, value).unwrap();
            }
        });
        let (ok, output) = run_verify(dir.path());
        assert!(!ok);
        assert!(
            output.starts_with(&format!("FAILED at entry {tampered}")),
            "{change}: {output}"
        );
    }

    // A changed checkpoint.
    let dir = tempfile::tempdir().unwrap();
    ledger_with_entries(dir.path(), 12).await;
    alter(dir.path(), |db| {
        let note = db.get(checkpoint_key(12)).unwrap().unwrap().to_vec();
        let text = String::from_utf8(note)
            .unwrap()
            .replacen("\n12\n", "\n11\n", 1);
        db.insert(checkpoint_key(12), text.as_bytes()).unwrap();
    });
    let (ok, output) = run_verify(dir.path());
    assert!(!ok);
    assert!(output.contains("checkpoint for tree size 12"), "{output}");
}

#[tokio::test]
async fn the_first_bad_index_does_not_depend_on_how_verify_splits_the_work() {
    let dir = tempfile::tempdir().unwrap();
    ledger_with_entries(dir.path(), 40).await;
    let verify = |chunk: u64| {
        let signer =
            audit_ledger::keys::load(&audit_ledger::keys::key_path(dir.path(), None)).unwrap();
        let store = common::open_store(&dir.path().join(STORE_DIR_NAME));
        audit_ledger::verify::verify_store_in_chunks(&store, &signer.verifier(), chunk, |_, _| {})
            .map(|report| report.tree_size)
            .map_err(|error| error.first_bad_index())
    };
    for chunk in [1, 3, 7, 40, 1000] {
        assert_eq!(verify(chunk), Ok(40), "chunk {chunk}");
    }
    alter(dir.path(), |db| flip_a_byte(db, &nodes_key(33)));
    for chunk in [1, 3, 7, 40, 1000] {
        assert_eq!(verify(chunk), Err(Some(33)), "chunk {chunk}");
    }
    // A second, earlier fault wins whichever thread finds it.
    alter(dir.path(), |db| flip_a_byte(db, &leaf_key(9)));
    for chunk in [1, 3, 7, 40, 1000] {
        assert_eq!(verify(chunk), Err(Some(9)), "chunk {chunk}");
    }
}

#[tokio::test]
async fn a_store_that_does_not_match_its_checkpoint_serves_reads_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    ledger_with_entries(dir.path(), 9).await;
    alter(dir.path(), |db| flip_a_byte(db, &leaf_key(8)));
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let status = client
        .append(AppendRequest {
            communication: Some(communication("s", 100)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("entry 8"),
        "says why: {}",
        status.message()
    );
    // Reads go on, bounded by the newest checkpoint that still verifies.
    assert_eq!(checkpoint(&mut client).await.size, 9);
    client
        .get_entry(GetEntryRequest { index: 0 })
        .await
        .unwrap();
    // Health says writes are not served.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let writes = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: audit_ledger::server::WRITES_HEALTH_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        writes.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    server.stop().await;

    // A node changed under the tail: the root no longer matches what was signed.
    let dir = tempfile::tempdir().unwrap();
    ledger_with_entries(dir.path(), 9).await;
    alter(dir.path(), |db| flip_a_byte(db, &nodes_key(7)));
    let server = TestServer::start(dir.path()).await;
    let status = server
        .client()
        .await
        .append(AppendRequest {
            communication: Some(communication("s", 100)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("signed root"),
        "{}",
        status.message()
    );
    server.stop().await;

    // Another key cannot take over the ledger: no checkpoint verifies, nothing is served.
    let dir = tempfile::tempdir().unwrap();
    ledger_with_entries(dir.path(), 3).await;
    std::fs::remove_file(dir.path().join("signing.key")).unwrap();
    let config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    let message = Server::open(config)
        .err()
        .expect("start-up must fail")
        .to_string();
    assert!(message.contains("checkpoint"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_store_names_an_altered_entry_and_refuses_a_cut_log() {
    let dir = tempfile::tempdir().unwrap();
    ledger_in(dir.path(), audit_ledger::storage::StorageKind::Log, 20).await;
    let store_dir = dir.path().join(STORE_DIR_NAME);
    let log = store_dir.join(audit_ledger::storage::log_store::LOG_FILE);
    let (ranges, log_end) = {
        let store =
            common::open_retrying(|| audit_ledger::storage::LogStore::open(&store_dir, 1 << 20))
                .unwrap();
        (
            (
                store.entry_ranges(5).unwrap().unwrap(),
                store.entry_ranges(9).unwrap().unwrap(),
            ),
            store.log_end() as usize,
        )
    };
    let original = std::fs::read(&log).unwrap();
    let (ok, _) = run_verify(dir.path());
    assert!(ok);

    // One byte of entry 5's leaf, in a frame in the middle of the log.
    let mut bytes = original.clone();
    bytes[ranges.0.leaf.end as usize - 2] ^= 0x01;
    std::fs::write(&log, &bytes).unwrap();
    let (ok, stdout) = run_verify(dir.path());
    assert!(!ok && stdout.starts_with("FAILED at entry 5"), "{stdout}");

    // One byte of entry 9's body.
    let mut bytes = original.clone();
    bytes[ranges.1.body.start as usize] ^= 0x01;
    std::fs::write(&log, &bytes).unwrap();
    let (ok, stdout) = run_verify(dir.path());
    assert!(!ok && stdout.starts_with("FAILED at entry 9"), "{stdout}");
    assert!(stdout.contains("body"), "{stdout}");

    // The last group cut off after it was acknowledged: the store refuses to open rather
    // than take the shorter log for the whole ledger.
    std::fs::write(&log, &original[..log_end - 100]).unwrap();
    let config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    let error = common::open_retrying(|| Server::open(config.clone()))
        .err()
        .expect("the server refuses a cut log")
        .to_string();
    assert!(error.contains("truncated or altered"), "{error}");

    // Put back, everything verifies again.
    std::fs::write(&log, &original).unwrap();
    let (ok, stdout) = run_verify(dir.path());
    assert!(ok, "{stdout}");
}

/// `ledger.log` is the ledger: copied alone from a running server (sled, the index file and
/// the compliance indexes left behind), it opens as a verifiable prefix of the ledger,
/// everything else rebuilt from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_of_the_log_alone_taken_while_running_is_a_verifiable_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    config.storage = audit_ledger::storage::StorageKind::Log;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let appends = {
        let mut client = client.clone();
        tokio::spawn(async move {
            for n in 0..60u64 {
                client
                    .append_batch(AppendBatchRequest {
                        communications: (n * 5..n * 5 + 5).map(|m| communication("s", m)).collect(),
                    })
                    .await
                    .unwrap();
            }
        })
    };
    // Mid-stream, once something is acknowledged (on a loaded machine 30 ms may pass
    // before the first batch commits, and an empty copy proves nothing): the copy may end
    // inside a frame being written.
    let seen = loop {
        let seen = checkpoint(&mut client).await;
        if seen.size > 0 {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    std::fs::create_dir_all(copy.path().join(STORE_DIR_NAME)).unwrap();
    let log = audit_ledger::storage::log_store::LOG_FILE;
    std::fs::copy(
        dir.path().join(STORE_DIR_NAME).join(log),
        copy.path().join(STORE_DIR_NAME).join(log),
    )
    .unwrap();
    std::fs::copy(
        dir.path().join("signing.key"),
        copy.path().join("signing.key"),
    )
    .unwrap();
    appends.await.unwrap();
    server.stop().await;

    let restored = TestServer::start(copy.path()).await;
    let mut client = restored.client().await;
    let prefix = checkpoint(&mut client).await;
    assert!(prefix.size >= seen.size, "{} < {}", prefix.size, seen.size);
    assert!(prefix.size > 0);
    assert!(prefix.size <= 300);
    // Idempotency keys came back from the log: a retry is a duplicate, not a new entry.
    let retry = client
        .append(AppendRequest {
            communication: Some(communication("s", 0)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(retry.duplicate);
    assert_eq!(retry.index, 0);
    // The compliance lists were rebuilt from it too.
    let mut compliance =
        audit_ledger::proto::compliance_service_client::ComplianceServiceClient::connect(format!(
            "http://{}",
            restored.address
        ))
        .await
        .unwrap();
    let listed = compliance
        .list_communications(audit_ledger::proto::ListCommunicationsRequest {
            sender_id: "s".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len() as u64, prefix.size);
    restored.stop().await;
    let (ok, stdout) = run_verify(copy.path());
    assert!(ok, "{stdout}");
}

//! Damage to a stopped ledger's files, as an attacker or a failing disk would do it: every
//! change is detected by `verify` or at start-up, or is provably harmless (derived data
//! rebuilt, every entry and checkpoint as before); nothing acknowledged silently vanishes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use audit_ledger::config::ServerConfig;
use audit_ledger::proto::AppendBatchRequest;
use audit_ledger::server::STORE_DIR_NAME;
use audit_ledger::storage::log_store::{INDEX_FILE, KEYS_DIR, LOG_FILE};
use audit_ledger::storage::{LogStore, StorageKind};
use common::{
    ChildServer, TestServer, binary, communication, connect, open_retrying, run_binary, run_verify,
};

/// A server on a log store (these tests alter `ledger.log`), whatever the suite's backend.
async fn log_server(dir: &Path) -> TestServer {
    let mut config = ServerConfig::new(dir, "127.0.0.1:0".parse().unwrap());
    config.storage = StorageKind::Log;
    TestServer::start_with(config).await
}

/// The server binary on a log store, as a child process (to be killed with SIGKILL).
fn log_child_server(dir: &Path) -> ChildServer {
    let mut command = Command::new(binary());
    command
        .args([
            "serve",
            "--storage",
            "log",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .env("RUST_LOG", "error");
    ChildServer::spawn(command)
}

/// A stopped log-store ledger of `groups` groups of `per_group` communications.
async fn ledger(dir: &Path, groups: u64, per_group: u64) {
    let server = log_server(dir).await;
    let mut client = server.client().await;
    for group in 0..groups {
        client
            .append_batch(AppendBatchRequest {
                communications: (0..per_group)
                    .map(|n| communication("s", group * per_group + n))
                    .collect(),
            })
            .await
            .unwrap();
    }
    server.stop().await;
}

fn store_dir(dir: &Path) -> PathBuf {
    dir.join(STORE_DIR_NAME)
}

fn open_log_store(dir: &Path) -> LogStore {
    open_retrying(|| LogStore::open(&store_dir(dir), 1 << 20)).unwrap()
}

/// `audit-ledger serve` on `dir` that must refuse to start: its stderr.
fn refused_start(dir: &Path) -> String {
    let output = run_binary(&[
        "serve".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data-dir".as_ref(),
        dir.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "the server started: {stdout}");
    assert!(!stdout.contains("listening on"), "{stdout}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn cut_log(dir: &Path, at_entry: u64, confirm: bool) -> Output {
    let mut command = Command::new(binary());
    command
        .args(["cut-log", "--reason", "tamper test", "--data-dir"])
        .arg(dir)
        .arg("--at-entry")
        .arg(at_entry.to_string());
    if confirm {
        command.arg("--confirm");
    }
    command.output().unwrap()
}

/// Runs `audit-ledger verify`: (exit code, stdout and stderr).
fn verify_exit(dir: &Path) -> (i32, String) {
    let output = run_binary(&["verify".as_ref(), "--data-dir".as_ref(), dir.as_os_str()]);
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_last_frame_after_kill_9_stops_the_start_until_an_operator_cuts_it() {
    let dir = tempfile::tempdir().unwrap();
    // Acknowledged groups of 10, then kill -9.
    let server = log_child_server(dir.path());
    let mut client = connect(&server.address).await;
    for group in 0..10u64 {
        client
            .append_batch(AppendBatchRequest {
                communications: (0..10)
                    .map(|n| communication("k", group * 10 + n))
                    .collect(),
            })
            .await
            .unwrap();
    }
    drop(client);
    server.kill();

    let log = store_dir(dir.path()).join(LOG_FILE);
    let idx = store_dir(dir.path()).join(INDEX_FILE);
    let (last_leaf, last_frame) = {
        let store = open_log_store(dir.path());
        let spans = store.frame_spans().unwrap();
        (
            store.entry_ranges(99).unwrap().unwrap().leaf,
            spans.last().unwrap().clone(),
        )
    };
    let original = std::fs::read(&log).unwrap();
    for (what, at) in [
        ("a bit of the last leaf", last_leaf.start + 3),
        ("the last frame's magic", last_frame.start),
        ("the last frame's checksum", last_frame.end - 1),
    ] {
        let mut bytes = original.clone();
        bytes[at as usize] ^= 0x04;
        std::fs::write(&log, &bytes).unwrap();
        let idx_before = std::fs::read(&idx).unwrap();
        let stderr = refused_start(dir.path());
        assert!(stderr.contains("damaged from entry 90"), "{what}: {stderr}");
        assert_eq!(
            std::fs::read(&log).unwrap(),
            bytes,
            "{what}: the log is kept"
        );
        assert_eq!(
            std::fs::read(&idx).unwrap(),
            idx_before,
            "{what}: so is the index"
        );
        let (code, stdout) = verify_exit(dir.path());
        assert_eq!(code, 1, "{what}: {stdout}");
        assert!(stdout.starts_with("FAILED at entry 90"), "{what}: {stdout}");
    }

    // Cut at a frame boundary: the index file still vouches for the entries.
    std::fs::write(&log, &original[..last_frame.start as usize]).unwrap();
    let stderr = refused_start(dir.path());
    assert!(stderr.contains("damaged from entry 90"), "{stderr}");

    // Only when told: a plan first, which changes nothing; then the cut.
    let mut bytes = original.clone();
    bytes[last_leaf.start as usize + 3] ^= 0x04;
    std::fs::write(&log, &bytes).unwrap();
    let plan = cut_log(dir.path(), 90, false);
    assert!(plan.status.success(), "{plan:?}");
    assert!(String::from_utf8_lossy(&plan.stdout).contains("would cut"));
    assert_eq!(std::fs::read(&log).unwrap(), bytes);
    let cut = cut_log(dir.path(), 90, true);
    assert!(cut.status.success(), "{cut:?}");
    let cuts: Vec<PathBuf> = std::fs::read_dir(store_dir(dir.path()).join("cuts"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(cuts.len(), 1);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cuts[0].join("cut.json")).unwrap()).unwrap();
    assert_eq!(record["at_entry"], 90);
    assert_eq!(record["indexed_entries"], 100);
    let kept = std::fs::read(cuts[0].join("ledger.log.cut")).unwrap();
    assert_eq!(
        kept,
        bytes[last_frame.start as usize..last_frame.end as usize]
    );

    let (ok, stdout) = run_verify(dir.path());
    assert!(ok && stdout.contains("ok: 90 entries"), "{stdout}");
    let server = log_child_server(dir.path());
    let mut client = connect(&server.address).await;
    assert_eq!(common::checkpoint(&mut client).await.size, 90);
    drop(client);
    server.kill();
}

/// Clear tampering is exit 1 naming the first bad entry, never exit 2 ("cannot run").
#[tokio::test(flavor = "multi_thread")]
async fn verify_fails_with_the_first_bad_entry_on_cut_dropped_or_replayed_frames() {
    let dir = tempfile::tempdir().unwrap();
    ledger(dir.path(), 6, 5).await;
    let log = store_dir(dir.path()).join(LOG_FILE);
    let spans = open_log_store(dir.path()).frame_spans().unwrap();
    // The empty tree's checkpoint, then a frame of 5 entries per group.
    assert_eq!(spans.len(), 7);
    let original = std::fs::read(&log).unwrap();
    let frame = |n: usize| original[spans[n].start as usize..spans[n].end as usize].to_vec();
    let end = spans[6].end as usize;
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        (
            "cut inside the last frame",
            original[..end - 7].to_vec(),
            25,
        ),
        (
            "cut at the last frame",
            original[..spans[6].start as usize].to_vec(),
            25,
        ),
        (
            "cut in the middle",
            original[..spans[3].start as usize + 9].to_vec(),
            10,
        ),
        (
            "a middle frame dropped",
            [
                &original[..spans[3].start as usize],
                &original[spans[3].end as usize..],
            ]
            .concat(),
            10,
        ),
        (
            "a frame replayed at the end",
            [&original[..end], &frame(4)].concat(),
            30,
        ),
        (
            "a frame replayed in the middle",
            [
                &original[..spans[4].end as usize],
                &frame(4),
                &original[spans[5].start as usize..],
            ]
            .concat(),
            20,
        ),
    ];
    for (what, bytes, first_bad) in cases {
        std::fs::write(&log, &bytes).unwrap();
        let (code, stdout) = verify_exit(dir.path());
        assert_eq!(code, 1, "{what}: {stdout}");
        assert!(
            stdout.starts_with(&format!("FAILED at entry {first_bad}")),
            "{what}: {stdout}"
        );
        std::fs::write(&log, &original).unwrap();
    }

    // A run file of `keys/` deleted.
    let keys = store_dir(dir.path()).join(KEYS_DIR);
    let run = std::fs::read_dir(&keys)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|ext| ext == "run"))
        .expect("a run file");
    std::fs::remove_file(&run).unwrap();
    let (code, stdout) = verify_exit(dir.path());
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.starts_with("FAILED"), "{stdout}");
}

/// Every file the store keeps, as bytes, to put back between trials.
fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut folders = vec![root.to_owned()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

fn restore(root: &Path, files: &[(PathBuf, Vec<u8>)]) {
    std::fs::remove_dir_all(root).unwrap();
    for (path, bytes) in files {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// Every entry's (leaf, body), every checkpoint (size, note), and every idempotency key
/// with the entry it names, sorted.
type Contents = (
    Vec<(Vec<u8>, Vec<u8>)>,
    Vec<(u64, Vec<u8>)>,
    Vec<(Vec<u8>, u64)>,
);

/// What a reader of the ledger sees: every entry's leaf and body, and the checkpoint.
fn contents(dir: &Path) -> Contents {
    let opened = common::open_any_store(&store_dir(dir));
    let store = opened.store;
    let size = store.last_leaf_index().unwrap().map_or(0, |last| last + 1);
    let entries = (0..size)
        .map(|index| {
            (
                store.leaf(index).unwrap().unwrap(),
                store.body(index).unwrap().unwrap(),
            )
        })
        .collect();
    let checkpoints = store.checkpoints().map(Result::unwrap).collect();
    let mut keys: Vec<(Vec<u8>, u64)> = store
        .idempotency_records()
        .map(|item| item.map(|(key, record)| (key, record.index)).unwrap())
        .collect();
    keys.sort();
    (entries, checkpoints, keys)
}

/// A tiny deterministic generator (xorshift64*), so a failing trial can be replayed.
struct Trials(u64);

impl Trials {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % below.max(1)
    }
}

/// One random byte flipped in each kind of file in turn (TAMPER_TRIALS, default 100): the
/// damage is reported by `verify` (exit 1) or by the server refusing to start, or it is
/// harmless: `verify` passes and every entry and the checkpoint read back as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_byte_in_any_file_is_detected_or_harmless() {
    let dir = tempfile::tempdir().unwrap();
    ledger(dir.path(), 12, 4).await;
    let root = store_dir(dir.path());
    let files = snapshot(&root);
    let expected = contents(dir.path());
    let trials: u64 = std::env::var("TAMPER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let kinds: Vec<(&str, Vec<usize>)> = [
        LOG_FILE, INDEX_FILE, KEYS_DIR, "facts", "index", "derived", "db",
    ]
    .iter()
    .map(|kind| {
        let members = files
            .iter()
            .enumerate()
            .filter(|(_, (path, bytes))| {
                !bytes.is_empty() && path.strip_prefix(&root).unwrap().starts_with(kind)
            })
            .map(|(n, _)| n)
            .collect::<Vec<_>>();
        (*kind, members)
    })
    .filter(|(_, members)| !members.is_empty())
    .collect();
    let mut random = Trials(0x5eed_1e55_ba5e_ba11);
    let (mut detected, mut harmless) = (0, 0);
    for trial in 0..trials {
        let (kind, members) = &kinds[(trial % kinds.len() as u64) as usize];
        let (path, bytes) = &files[members[random.next(members.len() as u64) as usize]];
        // Bytes the ledger uses, mostly: the log's zeroed space ahead is a tenth of trials.
        let mut limit = bytes.len() as u64;
        if *kind == LOG_FILE && random.next(10) != 0 {
            limit = open_log_store(dir.path()).log_end();
        }
        let at = random.next(limit) as usize;
        let mut changed = bytes.clone();
        changed[at] ^= 1 << random.next(8);
        std::fs::write(path, &changed).unwrap();
        let name = format!("trial {trial}: {} byte {at}", path.display());
        let (code, stdout) = verify_exit(dir.path());
        match code {
            1 => detected += 1,
            0 => {
                let refused = open_retrying(|| {
                    let output = Command::new(binary())
                        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                        .arg(dir.path())
                        .stdout(std::process::Stdio::piped())
                        .spawn()
                        .unwrap();
                    Ok::<_, String>(output)
                })
                .unwrap();
                let mut server = refused;
                let mut first_line = String::new();
                use std::io::BufRead;
                std::io::BufReader::new(server.stdout.take().unwrap())
                    .read_line(&mut first_line)
                    .unwrap();
                let started = first_line.starts_with("listening on");
                let _ = server.kill();
                server.wait().unwrap();
                if started {
                    assert!(
                        contents(dir.path()) == expected,
                        "{name}: verify passed and the server started, but what it holds changed"
                    );
                    // Harmless only if it stays so once everything derived is rebuilt from
                    // the log (removing it is documented as safe on a stopped ledger).
                    for derived in [KEYS_DIR, "facts", "index"] {
                        let _ = std::fs::remove_dir_all(root.join(derived));
                    }
                    let _ = std::fs::remove_file(root.join(INDEX_FILE));
                    let (code, stdout) = verify_exit(dir.path());
                    assert_eq!(
                        code, 0,
                        "{name}: verify passed, then failed once derived data was rebuilt: {stdout}"
                    );
                    assert!(
                        contents(dir.path()) == expected,
                        "{name}: what the ledger holds changed once derived data was rebuilt"
                    );
                    harmless += 1;
                } else {
                    detected += 1;
                }
            }
            _ => panic!("{name}: verify could not run: {stdout}"),
        }
        restore(&root, &files);
    }
    eprintln!("{trials} trials: {detected} detected, {harmless} harmless");
    assert!(detected > 0);
}

/// Reads check what they serve: an entry whose stored leaf or body was altered behind the
/// running server's back is DATA_LOSS naming its index, never served, and the server
/// refuses writes from then on; intact entries are still served.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_entry_is_never_served_and_stops_writes() {
    let dir = tempfile::tempdir().unwrap();
    ledger(dir.path(), 3, 4).await;
    let (leaf_5, body_6) = {
        let store = open_log_store(dir.path());
        (
            store.entry_ranges(5).unwrap().unwrap().leaf,
            store.entry_ranges(6).unwrap().unwrap().body,
        )
    };
    let server = log_server(dir.path()).await;
    let mut client = server.client().await;
    let log = store_dir(dir.path()).join(LOG_FILE);
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[leaf_5.end as usize - 1] ^= 0x01;
    bytes[body_6.start as usize] ^= 0x01;
    let file = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0).unwrap();
    drop(file);

    let get = |index: u64| {
        let mut client = client.clone();
        async move {
            client
                .get_entry(audit_ledger::proto::GetEntryRequest { index })
                .await
        }
    };
    assert!(get(4).await.is_ok());
    for (index, what) in [(5, "leaf hash"), (6, "body")] {
        let status = get(index).await.expect_err("a damaged entry is not served");
        assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
        assert!(
            status.message().contains(&format!("entry {index}")),
            "{status:?}"
        );
        assert!(status.message().contains(what), "{status:?}");
    }
    let mut stream = client
        .list_entries(audit_ledger::proto::ListEntriesRequest {
            start_index: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut served = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => served += 1,
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(
        (served, status.code()),
        (5, tonic::Code::DataLoss),
        "{status:?}"
    );
    let refused = client
        .append(audit_ledger::proto::AppendRequest {
            communication: Some(communication("after", 1)),
        })
        .await
        .expect_err("writes are refused once damage was found");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    // The refusal names its real cause, not a checkpoint mismatch that did not happen.
    assert!(
        refused.message().contains("a read found a damaged entry")
            && !refused
                .message()
                .contains("does not match its signed checkpoint"),
        "{refused:?}"
    );
    server.stop().await;
}

/// `verify` checks every byte a frame holds, not only the entries in it: a flipped byte in
/// a middle frame's idempotency keys, checkpoint note, checksum, magic or length is exit 1
/// naming the frame's first entry; and with `keys/` removed as well (documented as safe),
/// the store refuses to open naming it too, instead of failing without an index.
#[tokio::test(flavor = "multi_thread")]
async fn verify_checks_every_byte_of_every_frame() {
    let dir = tempfile::tempdir().unwrap();
    ledger(dir.path(), 4, 5).await;
    let log = store_dir(dir.path()).join(LOG_FILE);
    let (frame, keys_start) = {
        let store = open_log_store(dir.path());
        let spans = store.frame_spans().unwrap();
        // Frame 2 holds entries 5..10; its keys follow entry 9's body.
        (
            spans[2].clone(),
            store.entry_ranges(9).unwrap().unwrap().body.end,
        )
    };
    let original = std::fs::read(&log).unwrap();
    for (what, at) in [
        ("an idempotency key", keys_start + 4),
        ("an idempotency record", keys_start + 30),
        ("the checkpoint note", frame.end - 32 - 20),
        ("the checksum", frame.end - 5),
        ("the magic", frame.start + 1),
        ("the length", frame.start + 4),
    ] {
        let mut bytes = original.clone();
        bytes[at as usize] ^= 0x01;
        std::fs::write(&log, &bytes).unwrap();
        let (code, stdout) = verify_exit(dir.path());
        assert_eq!(code, 1, "{what}: {stdout}");
        assert!(stdout.starts_with("FAILED at entry 5"), "{what}: {stdout}");
        std::fs::write(&log, &original).unwrap();
    }
    let mut bytes = original.clone();
    bytes[keys_start as usize + 4] ^= 0x01;
    std::fs::write(&log, &bytes).unwrap();
    std::fs::remove_dir_all(store_dir(dir.path()).join(KEYS_DIR)).unwrap();
    let stderr = refused_start(dir.path());
    assert!(stderr.contains("damaged from entry 5"), "{stderr}");
}

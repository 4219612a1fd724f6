//! A full disk: appends are refused with RESOURCE_EXHAUSTED (or UNAVAILABLE), nothing
//! half-written becomes visible, reads go on, and appends succeed again once space is
//! freed, without a restart — whether the ledger's own writes filled the disk or another
//! process did. Needs a small filesystem the test can mount (a tmpfs, as root); where it
//! cannot, it says so and skips.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use audit_ledger::config::ServerConfig;
use audit_ledger::proto::ledger_service_client::LedgerServiceClient;
use audit_ledger::proto::{
    AppendBatchRequest, AppendRequest, Communication, GetCheckpointRequest,
    GetConsistencyProofRequest, GetEntryRequest, GetInclusionProofRequest,
};
use audit_ledger::storage::StorageKind;
use common::{Bearer, TestServer, communication, token_add};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// Unmounts on drop, even when the test fails.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(path: &Path, size: &str) -> Result<Mounted, String> {
    let output = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(path)
        .output()
        .map_err(|error| error.to_string())?;
    if output.status.success() {
        Ok(Mounted(path.to_owned()))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

fn big(n: u64) -> Communication {
    let mut communication = communication("bulk-sender", n);
    communication.body = vec![b'a' + (n % 26) as u8; 64 * 1024];
    communication
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_appends_keeps_reads_and_recovers_without_restart() {
    let mount_point = tempfile::tempdir().unwrap();
    let _mounted = match mount_tmpfs(mount_point.path(), "32m") {
        Ok(mounted) => mounted,
        Err(reason) => {
            eprintln!(
                "SKIPPED a_full_disk_refuses_appends…: cannot mount a tmpfs here ({reason}); run as root to include it"
            );
            return;
        }
    };
    // Room to give back later.
    let filler = mount_point.path().join("filler");
    std::fs::write(&filler, vec![0u8; 12 * 1024 * 1024]).unwrap();

    let data = mount_point.path().join("data");
    let mut config = ServerConfig::new(&data, "127.0.0.1:0".parse().unwrap());
    config.cache_bytes = 4 * 1024 * 1024;
    config.min_free_bytes = 4 * 1024 * 1024;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;

    // Fill the disk.
    let mut acked: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut n = 0u64;
    let refusal = loop {
        let batch: Vec<Communication> = (n..n + 8).map(big).collect();
        n += 8;
        match client
            .append_batch(AppendBatchRequest {
                communications: batch,
            })
            .await
        {
            Ok(response) => {
                for result in response.into_inner().results {
                    acked.push((result.index, result.leaf_hash));
                }
            }
            Err(status) => break status,
        }
        assert!(n < 20_000, "the disk never filled");
    };
    assert!(
        matches!(refusal.code(), Code::ResourceExhausted | Code::Unavailable),
        "{refusal:?}"
    );
    assert!(!acked.is_empty());

    // Reads go on, and show exactly what was acknowledged: nothing half-written.
    let checkpoint = client
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(checkpoint.size, acked.len() as u64);
    for (index, leaf_hash) in &acked {
        let entry = client
            .get_entry(GetEntryRequest { index: *index })
            .await
            .unwrap()
            .into_inner()
            .entry
            .unwrap();
        assert_eq!(&entry.leaf_hash, leaf_hash);
    }
    let status = client
        .get_entry(GetEntryRequest {
            index: checkpoint.size,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);

    // Still full (sled may give some space back by itself, so take what is left): still
    // refused, and the refused batch is not there.
    let filler2 = mount_point.path().join("filler2");
    let left = fs2::available_space(mount_point.path()).unwrap();
    std::fs::write(
        &filler2,
        vec![0u8; left.saturating_sub(1024 * 1024) as usize],
    )
    .unwrap();
    let status = client
        .append_batch(AppendBatchRequest {
            communications: (n - 8..n).map(big).collect(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::Unavailable),
        "{status:?}"
    );
    assert!(status.message().contains("retry"), "{}", status.message());
    let unchanged = client
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(unchanged.size, checkpoint.size);

    // Free space; appends succeed again without a restart.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler2).unwrap();
    let appended = client
        .append(AppendRequest {
            communication: Some(communication("small", 2)),
        })
        .await
        .expect("appends succeed once space is freed")
        .into_inner();
    assert!(appended.index >= acked.len() as u64);
    // The refused batch, retried, now lands.
    let retried = client
        .append_batch(AppendBatchRequest {
            communications: (n - 8..n).map(big).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.results.len(), 8);
    assert!(retried.results.iter().all(|r| !r.duplicate));
    drop(client);
    server.stop().await;

    let output = Command::new(common::binary())
        .args(["verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Takes every byte still free on the filesystem of `dir` with a file of its own, as
/// another process would; removing the file gives the space back.
fn fill_disk(dir: &Path) -> PathBuf {
    let path = dir.join("filler-from-elsewhere");
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in [1 << 20, 4096, 1] {
        let bytes = vec![0xa5u8; chunk];
        while file.write_all(&bytes).is_ok() {}
    }
    path
}

/// The health status of `service`.
async fn health_of(address: &str, service: &str) -> i32 {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits (up to 10 s) until health reports `want` for writes; fails naming what it said.
async fn writes_health_becomes(address: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = health_of(address, audit_ledger::server::WRITES_HEALTH_SERVICE).await;
        if status == want as i32 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health says writes are {:?}, not {want:?}",
            ServingStatus::try_from(status)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type AuthedClient =
    LedgerServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

async fn client_as(address: &str, token: &str) -> AuthedClient {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    LedgerServiceClient::with_interceptor(channel, Bearer(Some(token.to_owned())))
}

/// What an auditor reads of a ledger of `size` entries: an entry, the checkpoint, an
/// inclusion proof and a consistency proof (four reads, four access records).
async fn audit_reads(auditor: &mut AuthedClient, size: u64) -> Result<(), tonic::Status> {
    auditor
        .get_entry(GetEntryRequest { index: size - 1 })
        .await?;
    let checkpoint = auditor
        .get_checkpoint(GetCheckpointRequest::default())
        .await?
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(checkpoint.size, size);
    auditor
        .get_inclusion_proof(GetInclusionProofRequest {
            index: 0,
            tree_size: size,
        })
        .await?;
    auditor
        .get_consistency_proof(GetConsistencyProofRequest {
            from_size: 1,
            to_size: size,
        })
        .await?;
    Ok(())
}

/// Issue 16, item 7: another process fills the disk. Appends are refused cleanly and
/// health says writes are not served; an auditor's reads — each recorded in the access
/// log — go on all the while (sled, which held the access log, never recovered from the
/// ENOSPC it met and refused every read after it until a restart); once the file is
/// removed, appends are accepted again and health says so, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_filling_the_disk_keeps_reads_served_and_writes_resume_by_themselves() {
    another_process_fills_the_disk(StorageKind::Log).await;
}

/// The same with everything in sled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_filling_the_disk_of_a_sled_ledger_keeps_reads_served_and_writes_resume() {
    another_process_fills_the_disk(StorageKind::Sled).await;
}

/// A ledger's data dir on a 48 MiB tmpfs of its own, with an auth file (a writer and an
/// auditor) beside it. Fields drop in order: the tmpfs is unmounted before its mount point
/// is removed.
struct OnTmpfs {
    _mounted: Mounted,
    mount_point: tempfile::TempDir,
    _outside: tempfile::TempDir,
    data: PathBuf,
    config: ServerConfig,
    writer_token: String,
    auditor_token: String,
}

/// [`OnTmpfs`], or `None` (said, and the test skipped) where no tmpfs can be mounted.
fn on_tmpfs(test: &str) -> Option<OnTmpfs> {
    let mount_point = tempfile::tempdir().unwrap();
    let mounted = match mount_tmpfs(mount_point.path(), "48m") {
        Ok(mounted) => mounted,
        Err(reason) => {
            eprintln!(
                "SKIPPED {test}: cannot mount a tmpfs here ({reason}); run as root to include it"
            );
            return None;
        }
    };
    let outside = tempfile::tempdir().unwrap();
    let auth_file = outside.path().join("auth.toml");
    let writer_token = token_add(&auth_file, "mail-gateway", "writer", None);
    let auditor_token = token_add(&auth_file, "compliance-tool", "auditor", None);
    let data = mount_point.path().join("data");
    let mut config = ServerConfig::new(&data, "127.0.0.1:0".parse().unwrap());
    config.cache_bytes = 4 * 1024 * 1024;
    config.min_free_bytes = 4 * 1024 * 1024;
    config.auth_file = Some(auth_file);
    Some(OnTmpfs {
        _mounted: mounted,
        mount_point,
        _outside: outside,
        data,
        config,
        writer_token,
        auditor_token,
    })
}

impl OnTmpfs {
    /// Starts the server, and connects its writer and its auditor.
    async fn start(&self) -> (TestServer, AuthedClient, AuthedClient) {
        let server = TestServer::start_with(self.config.clone()).await;
        let writer = client_as(&server.address, &self.writer_token).await;
        let auditor = client_as(&server.address, &self.auditor_token).await;
        (server, writer, auditor)
    }
}

async fn another_process_fills_the_disk(storage: StorageKind) {
    let Some(mut setup) = on_tmpfs("another_process_filling_the_disk…") else {
        return;
    };
    setup.config.storage = storage;
    let (server, mut writer, mut auditor) = setup.start().await;
    let (data, mount_point, address) = (&setup.data, setup.mount_point.path(), &server.address);

    let size = writer
        .append_batch(AppendBatchRequest {
            communications: (0..50).map(|n| communication("s", n)).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .len() as u64;
    audit_reads(&mut auditor, size).await.unwrap();
    let mut reads = 4;
    writes_health_becomes(address, ServingStatus::Serving).await;

    let filler = fill_disk(mount_point);
    let refused = writer
        .append(AppendRequest {
            communication: Some(communication("s", 1000)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    writes_health_becomes(address, ServingStatus::NotServing).await;
    // Reads go on while the disk stays full: long enough for every background flush
    // (the access log's, sled's timer) to have met the full disk.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        audit_reads(&mut auditor, size)
            .await
            .expect("an auditor's reads are served while another process holds the disk");
        reads += 4;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = writer
        .append(AppendRequest {
            communication: Some(communication("s", 1000)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    writes_health_becomes(address, ServingStatus::NotServing).await;

    // Space comes back: writes resume by themselves, and health says so.
    std::fs::remove_file(&filler).unwrap();
    let appended = writer
        .append(AppendRequest {
            communication: Some(communication("s", 1000)),
        })
        .await
        .expect("appends are accepted once space is freed, without a restart")
        .into_inner();
    assert_eq!(appended.index, size);
    writes_health_becomes(address, ServingStatus::Serving).await;
    audit_reads(&mut auditor, size + 1).await.unwrap();
    reads += 4;
    drop((writer, auditor));
    server.stop().await;

    let (ok, stdout) = common::run_verify(data);
    assert!(ok, "{stdout}");
    assert!(
        stdout.contains(&format!(" {reads} access records chained")),
        "every read served is in the access trail ({reads}): {stdout}"
    );
}

/// When the space kept for the access log is used up too, a recorded read is refused —
/// nothing is read unrecorded — with RESOURCE_EXHAUSTED that says why; once space
/// returns, the same reads are served and recorded again, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_cannot_be_recorded_are_refused_until_space_returns() {
    let Some(mut setup) = on_tmpfs("reads_that_cannot_be_recorded…") else {
        return;
    };
    setup.config.access_log_reserve_bytes = 4096;
    let (server, mut writer, mut auditor) = setup.start().await;
    let (data, mount_point) = (&setup.data, setup.mount_point.path());
    writer
        .append_batch(AppendBatchRequest {
            communications: (0..5).map(|n| communication("s", n)).collect(),
        })
        .await
        .unwrap();

    let filler = fill_disk(mount_point);
    let mut served = 0u64;
    let refused = loop {
        match audit_reads(&mut auditor, 5).await {
            Ok(()) => served += 4,
            Err(status) => break status,
        }
        assert!(served < 4000, "the access log's reserve never ran out");
    };
    assert!(served > 0, "the reserve kept reads going for a while");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("access log") && refused.message().contains("retry"),
        "{}",
        refused.message()
    );
    std::fs::remove_file(&filler).unwrap();
    audit_reads(&mut auditor, 5)
        .await
        .expect("reads are recorded and served again once space is freed");
    drop((writer, auditor));
    server.stop().await;
    let (ok, stdout) = common::run_verify(data);
    assert!(ok, "{stdout}");
}

/// A run index whose runs cannot be written for lack of space (its flusher met ENOSPC)
/// writes them once space returns: it used to stop for good, refusing every apply — and
/// with it every group commit — until a restart.
#[test]
fn a_run_index_that_met_a_full_disk_writes_its_runs_once_space_returns() {
    use audit_ledger::storage::{IndexStore, RunIndex, RunOptions};
    let mount_point = tempfile::tempdir().unwrap();
    let _mounted = match mount_tmpfs(mount_point.path(), "8m") {
        Ok(mounted) => mounted,
        Err(reason) => {
            eprintln!(
                "SKIPPED a_run_index_that_met_a_full_disk…: cannot mount a tmpfs here ({reason}); run as root to include it"
            );
            return;
        }
    };
    let options = RunOptions {
        memtable_bytes: 64 * 1024,
        max_frozen: 2,
        ..RunOptions::default()
    };
    let index = RunIndex::open(&mount_point.path().join("index"), options).unwrap();
    let key = |n: u32| format!("key {n:08}").into_bytes();
    let value = vec![7u8; 200];
    index
        .apply((0..100).map(|n| (key(n), Some(value.clone()))).collect())
        .unwrap();
    index.flush().unwrap();

    let filler = fill_disk(mount_point.path());
    // Tables fill and are frozen; none can be written: the index says so rather than wait.
    let mut applied = 100;
    let refused = loop {
        let batch = (applied..applied + 100).map(|n| (key(n), Some(value.clone())));
        if let Err(error) = index.apply(batch.collect()) {
            break error;
        }
        applied += 100;
        if let Err(error) = index.flush() {
            break error;
        }
        assert!(applied < 100_000, "the disk never filled");
    };
    assert!(
        matches!(refused, audit_ledger::storage::StorageError::NoSpace(_)),
        "{refused}"
    );

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(error) = index.flush() {
        assert!(
            Instant::now() < deadline,
            "the index still cannot write its runs: {error}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    index
        .apply(vec![(b"after".to_vec(), Some(b"space returned".to_vec()))])
        .unwrap();
    index.flush().unwrap();
    for probe in [0, 150, applied - 1] {
        assert_eq!(
            index.get(&key(probe)).unwrap(),
            Some(value.clone()),
            "{probe}"
        );
    }
    drop(index);
    let reopened = RunIndex::open(&mount_point.path().join("index"), options).unwrap();
    assert_eq!(reopened.get(&key(applied - 1)).unwrap(), Some(value));
    assert_eq!(
        reopened.get(b"after").unwrap(),
        Some(b"space returned".to_vec())
    );
}

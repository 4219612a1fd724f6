//! A full disk: appends are refused with RESOURCE_EXHAUSTED (or UNAVAILABLE), nothing
//! half-written becomes visible, reads go on, and appends succeed again once space is
//! freed, without a restart. Needs a small filesystem the test can mount (a tmpfs, as
//! root); where it cannot, it says so and skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use audit_ledger::config::ServerConfig;
use audit_ledger::proto::{
    AppendBatchRequest, AppendRequest, Communication, GetCheckpointRequest, GetEntryRequest,
};
use common::{TestServer, communication};
use tonic::Code;

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
        .get_checkpoint(GetCheckpointRequest {})
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
    assert_eq!(status.code(), Code::NotFound);

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
        .get_checkpoint(GetCheckpointRequest {})
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

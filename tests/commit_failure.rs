//! A commit that fails (an I/O error) is not acknowledged, is retried unchanged before
//! anything else, and once it lands, an idempotent retry of it finds it: no index is
//! reused and no second, inconsistent checkpoint is ever signed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use audit_ledger::config::RecordLimits;
use audit_ledger::ledger::{Ledger, LedgerError, LedgerOptions};
use audit_ledger::records::prepare_communication;
use audit_ledger::storage::{
    Checkpoints, CommitBatch, IdempotencyRecord, SledStore, StorageError, Store,
};

mod common;

/// The sled store, with commits that fail on demand (or, with `panicking`, panic).
struct Flaky {
    inner: SledStore,
    failing: AtomicBool,
    panicking: AtomicBool,
}

impl Flaky {
    fn open(dir: &std::path::Path) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner: SledStore::open(dir, 1 << 20).unwrap(),
            failing: AtomicBool::new(false),
            panicking: AtomicBool::new(false),
        })
    }
}

impl Store for Flaky {
    fn commit(&self, batch: &CommitBatch) -> Result<(), StorageError> {
        if self.panicking.load(Ordering::SeqCst) {
            panic!("injected bug in a commit");
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(StorageError::Backend("injected I/O error".into()));
        }
        self.inner.commit(batch)
    }
    fn leaf(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.leaf(index)
    }
    fn body(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.body(index)
    }
    fn leaf_nodes(
        &self,
        index: u64,
    ) -> Result<Option<Vec<audit_ledger::ledger::merkle::Hash>>, StorageError> {
        self.inner.leaf_nodes(index)
    }
    fn last_leaf_index(&self) -> Result<Option<u64>, StorageError> {
        self.inner.last_leaf_index()
    }
    fn idempotency_record(&self, key: &[u8]) -> Result<Option<IdempotencyRecord>, StorageError> {
        self.inner.idempotency_record(key)
    }
    fn idempotency_records(&self) -> audit_ledger::storage::IdempotencyRecords<'_> {
        self.inner.idempotency_records()
    }
    fn latest_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        self.inner.latest_checkpoint()
    }
    fn checkpoints(&self) -> Checkpoints<'_> {
        self.inner.checkpoints()
    }
}

#[tokio::test]
async fn a_failed_commit_is_retried_unchanged_and_found_by_an_idempotent_retry() {
    let dir = tempfile::tempdir().unwrap();
    let store = Flaky::open(dir.path());
    let signer = signer();
    let verifier = signer.verifier();
    let ledger = Ledger::open(store.clone(), signer, LedgerOptions::default(), None, None).unwrap();

    ledger.append(vec![record(0)]).await.unwrap();
    store.failing.store(true, Ordering::SeqCst);
    let error = ledger.append(vec![record(1)]).await.unwrap_err();
    assert!(matches!(error, LedgerError::Unavailable(_)), "{error:?}");
    assert_eq!(ledger.tree_size(), 1, "nothing unacknowledged is visible");
    // While the failed group cannot be written, nothing else is sequenced.
    let error = ledger.append(vec![record(2)]).await.unwrap_err();
    assert!(matches!(error, LedgerError::Unavailable(_)));

    store.failing.store(false, Ordering::SeqCst);
    // The next append first lands the held group, then itself.
    let next = ledger.append(vec![record(3)]).await.unwrap();
    assert_eq!(next[0].index, 2);
    assert_eq!(ledger.tree_size(), 3);
    // The client's retry of the failed append finds it.
    let retry = ledger.append(vec![record(1)]).await.unwrap();
    assert!(retry[0].duplicate);
    assert_eq!(retry[0].index, 1);
    ledger.shutdown().await;

    let report = audit_ledger::verify::verify_store(store.as_ref(), &verifier, |_, _| {}).unwrap();
    assert_eq!(report.tree_size, 3);
}

fn signer() -> audit_ledger::ledger::CheckpointSigner {
    audit_ledger::ledger::CheckpointSigner::new(
        "example.com/log",
        ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]),
    )
    .unwrap()
}

fn record(n: u64) -> audit_ledger::ledger::NewRecord {
    prepare_communication(
        common::communication("s", n),
        "communication",
        &RecordLimits::default(),
        "",
    )
    .unwrap()
}

/// A writer that fails (a bug: a panic in a commit) does not leave a ledger that looks
/// healthy with no one to write: every later write is refused naming the failure, the
/// write state (what health reports) says so, and reads go on.
#[tokio::test]
async fn a_writer_that_panics_refuses_writes_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = Flaky::open(dir.path());
    let ledger = Ledger::open(
        store.clone(),
        signer(),
        LedgerOptions::default(),
        None,
        None,
    )
    .unwrap();
    ledger.append(vec![record(0)]).await.unwrap();
    store.panicking.store(true, Ordering::SeqCst);
    assert!(ledger.append(vec![record(1)]).await.is_err());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let audit_ledger::ledger::WriteState::Refused(reason) = ledger.write_state() {
            assert!(reason.contains("writer failed"), "{reason}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the write state never said"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // What the health task watches was told too, before the writer's channel closed.
    assert!(matches!(
        &*ledger.writes().borrow(),
        audit_ledger::ledger::WriteState::Refused(reason) if reason.contains("writer failed")
    ));
    let refused = ledger.append(vec![record(2)]).await.unwrap_err();
    assert!(
        matches!(&refused, LedgerError::WritesRefused(reason) if reason.contains("injected bug")),
        "{refused:?}"
    );
    // Reads are served from what was acknowledged.
    assert_eq!(ledger.tree_size(), 1);
    assert!(ledger.entry(0).is_ok());
}

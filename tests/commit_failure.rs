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

/// The sled store, with commits that fail on demand.
struct Flaky {
    inner: SledStore,
    failing: AtomicBool,
}

impl Store for Flaky {
    fn commit(&self, batch: &CommitBatch) -> Result<(), StorageError> {
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
    let store = Arc::new(Flaky {
        inner: SledStore::open(dir.path(), 1 << 20).unwrap(),
        failing: AtomicBool::new(false),
    });
    let signer = audit_ledger::ledger::CheckpointSigner::new(
        "example.com/log",
        ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]),
    )
    .unwrap();
    let verifier = signer.verifier();
    let ledger = Ledger::open(store.clone(), signer, LedgerOptions::default(), None, None).unwrap();
    let record = |n| {
        prepare_communication(
            common::communication("s", n),
            "communication",
            &RecordLimits::default(),
            "",
        )
        .unwrap()
    };

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

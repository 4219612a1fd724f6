//! The ledger core: sequencing, the hash chain, the Merkle tree (RFC 9162) and signed
//! checkpoints. Plain Rust: no tonic, no sled, no generated proto types. It stores and
//! hashes opaque record bytes that `records` prepares.
//!
//! One writer thread ([`writer`]) owns sequencing, hashing and durability. Readers go
//! straight to the store, bounded by the published checkpoint, and never wait on it.

pub mod error;
mod writer;

// The primitives, where the ledger's users have always found them.
pub use audit_ledger_primitives::{checkpoint, leaf, merkle, time};

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};

use crate::store::{StorageError, Store};
pub use checkpoint::{CheckpointSigner, CheckpointVerifier, SignedCheckpoint, TrailAnchor};
pub use error::LedgerError;
use merkle::{Hash, NodeError, NodeSource};

/// A record to append, prepared (validated and encoded) by the caller.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Identifies the record across retries, e.g. (sender_id, message_id).
    pub idempotency_key: Vec<u8>,
    /// The record's encoded `LeafRecord` fields (everything but fields 1-3).
    pub content: Vec<u8>,
    /// Stored beside the leaf; `content` commits to it by digest.
    pub body: Vec<u8>,
    /// How the client names this record in errors, e.g. `communications[3]`.
    pub field: String,
}

/// The outcome of appending one record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Appended {
    pub index: u64,
    pub leaf_hash: Hash,
    /// The record was already in the ledger at `index`; nothing was appended.
    pub duplicate: bool,
}

/// One stored entry.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub index: u64,
    pub leaf: Vec<u8>,
    pub leaf_hash: Hash,
    pub body: Vec<u8>,
}

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Most records one group commit takes; bounds the latency a big group adds.
    pub max_group_records: usize,
    /// Append requests that may wait for the writer before callers are made to wait.
    pub queue_depth: usize,
    /// Appends are refused (RESOURCE_EXHAUSTED) while less than this is free on the store's
    /// filesystem, so the store never runs out of space in the middle of a write.
    pub min_free_bytes: u64,
    /// When the store does not match its signed checkpoint: serve reads and refuse writes
    /// (true, the server), or fail to open (false, offline tools).
    pub read_only_on_integrity_failure: bool,
    /// How a served entry's body is checked against the record in its leaf (the ledger
    /// core does not know the record's schema; `records` does). Every entry served is
    /// also checked against its stored leaf hash.
    pub body_check: Option<BodyCheck>,
}

/// Whether `body` is the one `leaf`'s record commits to: `Err` says what is wrong.
pub type BodyCheck = fn(leaf: &[u8], body: &[u8]) -> Result<(), String>;

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            max_group_records: 8192,
            queue_depth: 4096,
            min_free_bytes: 64 * 1024 * 1024,
            read_only_on_integrity_failure: false,
            body_check: None,
        }
    }
}

/// Whether the ledger accepts writes, as its writer last found: after every group, and
/// at every [`Ledger::probe_writes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteState {
    Accepting,
    /// Writes are refused, and why (the disk full, a group that cannot be written, a
    /// store that does not match its checkpoint, …).
    Refused(String),
}

/// Derived data kept in step with the ledger (query indexes). The writer calls it after each
/// durable commit and before publishing the new entries; `Ledger::open` first brings it up
/// to the stored size, so it never misses an entry, even after a crash.
pub trait Indexer: Send + 'static {
    /// Entries below this size are indexed.
    fn indexed_size(&self) -> Result<u64, StorageError>;
    /// Indexes consecutive entries `(index, leaf)`, the first at `indexed_size()`.
    fn index(&mut self, entries: &[(u64, &[u8])]) -> Result<(), StorageError>;
}

/// Where the writer finds the access trail's head, for each checkpoint to anchor
/// ([`TrailAnchor`]). Only what is durable may be anchored: a checkpoint outlives a crash,
/// and must not anchor records that did not.
pub trait TrailHead: Send + Sync + 'static {
    /// The head of what of the trail is on disk now.
    fn durable_head(&self) -> TrailAnchor;
}

/// Entries read per step when an indexer catches up at start-up.
const CATCH_UP_CHUNK: u64 = 1024;

/// What readers see: the latest checkpoint the writer made durable.
struct Published {
    checkpoint: ArcSwap<SignedCheckpoint>,
}

/// A cheap, cloneable handle to the ledger.
#[derive(Clone)]
pub struct Ledger {
    store: Arc<dyn Store>,
    published: Arc<Published>,
    requests: mpsc::Sender<writer::Command>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Set when the store did not match its signed checkpoint at start: reads only.
    refusal: Option<Arc<str>>,
    /// Set when a read found a stored entry damaged: from then on writes are refused and
    /// health says so, until an operator has run `verify` and restarted.
    damage: Arc<std::sync::OnceLock<String>>,
    /// Set when the writer thread failed (a panic): writes are refused for good and health
    /// says so, until a restart.
    writer_failure: Arc<std::sync::OnceLock<String>>,
    body_check: Option<BodyCheck>,
    /// Checks the checkpoints read back from the store before they are served.
    verifier: Arc<CheckpointVerifier>,
    /// Whether writes are accepted (the writer tells every change).
    writes: watch::Receiver<WriteState>,
}

impl Ledger {
    /// Opens the ledger on `store`: checks the stored tail against the last signed checkpoint
    /// (O(log n) reads, no replay), signs the empty tree on first start, and starts the writer.
    /// With `trail`, every checkpoint the writer signs anchors the access trail's head.
    pub fn open(
        store: Arc<dyn Store>,
        signer: CheckpointSigner,
        options: LedgerOptions,
        mut indexer: Option<Box<dyn Indexer>>,
        trail: Option<Arc<dyn TrailHead>>,
    ) -> Result<Ledger, LedgerError> {
        let state = match writer::recover(store.as_ref(), &signer) {
            Ok(state) => state,
            Err(LedgerError::Integrity(reason)) if options.read_only_on_integrity_failure => {
                return Self::open_read_only(store, &signer, reason);
            }
            Err(error) => return Err(error),
        };
        if let Some(indexer) = indexer.as_mut() {
            catch_up(store.as_ref(), indexer.as_mut(), state.checkpoint.size)?;
        }
        let published = Arc::new(Published {
            checkpoint: ArcSwap::from_pointee(state.checkpoint.clone()),
        });
        let (requests, queue) = mpsc::channel(options.queue_depth.max(1));
        let body_check = options.body_check;
        let (tell_writes, writes) = watch::channel(WriteState::Accepting);
        let verifier = Arc::new(signer.verifier());
        let writer_failure = Arc::new(std::sync::OnceLock::new());
        let handle = writer::spawn(
            store.clone(),
            signer,
            state,
            published.clone(),
            queue,
            options,
            indexer,
            trail,
            tell_writes,
            writer_failure.clone(),
        )?;
        Ok(Ledger {
            store,
            published,
            requests,
            writer: Arc::new(std::sync::Mutex::new(Some(handle))),
            refusal: None,
            damage: Arc::default(),
            writer_failure,
            body_check,
            verifier,
            writes,
        })
    }

    /// A ledger whose store does not match what it signed: it serves what the newest
    /// checkpoint whose signature still verifies covers, and refuses every write, saying
    /// why, until an operator has investigated (`audit-ledger verify`).
    fn open_read_only(
        store: Arc<dyn Store>,
        signer: &CheckpointSigner,
        reason: String,
    ) -> Result<Ledger, LedgerError> {
        let verifier = signer.verifier();
        let checkpoints: Vec<(u64, Vec<u8>)> = store.checkpoints().collect::<Result<_, _>>()?;
        let checkpoint = checkpoints
            .iter()
            .rev()
            .find_map(|(_, note)| verifier.verify(note).ok())
            .ok_or_else(|| {
                LedgerError::Integrity(format!(
                    "{reason}; and no stored checkpoint is signed by this log's key"
                ))
            })?;
        tracing::error!(
            %reason,
            serving_tree_size = checkpoint.size,
            "the store does not match its signed checkpoint: serving reads only, refusing writes"
        );
        // No writer: the queue's receiver is dropped, and `append` refuses before using it.
        let (requests, _) = mpsc::channel(1);
        let reason = format!("the store does not match its signed checkpoint ({reason})");
        let refused = LedgerError::WritesRefused(reason.clone()).to_string();
        let (_, writes) = watch::channel(WriteState::Refused(refused));
        Ok(Ledger {
            store,
            published: Arc::new(Published {
                checkpoint: ArcSwap::from_pointee(checkpoint),
            }),
            requests,
            writer: Arc::new(std::sync::Mutex::new(None)),
            refusal: Some(Arc::from(reason.as_str())),
            damage: Arc::default(),
            writer_failure: Arc::default(),
            body_check: None,
            verifier: Arc::new(verifier),
            writes,
        })
    }

    /// Why writes are refused, when they are: the store did not match its checkpoint at
    /// start, or a read has since found a damaged entry.
    pub fn write_refusal(&self) -> Option<&str> {
        self.refusal
            .as_deref()
            .or_else(|| self.damage.get().map(String::as_str))
            .or_else(|| self.writer_failure.get().map(String::as_str))
    }

    /// Whether writes are accepted, as the writer last found; changes are seen with
    /// `changed()` on the receiver. (Damage a read found is not among them: see
    /// [`Ledger::write_state`].)
    pub fn writes(&self) -> watch::Receiver<WriteState> {
        self.writes.clone()
    }

    /// Whether writes are accepted now: refused for good once a read found a damaged
    /// entry, otherwise as the writer last found.
    pub fn write_state(&self) -> WriteState {
        match self.damage.get().or_else(|| self.writer_failure.get()) {
            Some(reason) => WriteState::Refused(reason.clone()),
            None => self.writes.borrow().clone(),
        }
    }

    /// Asks the writer to find out again whether writes can be accepted — retrying a held
    /// group, looking at the free space — and to tell it through [`Ledger::writes`]. Does not
    /// wait: a writer busy with appends finds out with them.
    pub fn probe_writes(&self) {
        let _ = self.requests.try_send(writer::Command::Probe);
    }

    /// Asks the writer to anchor the access trail's durable head in a checkpoint of the
    /// published tree, if the trail grew since it was last anchored. The server asks every
    /// [`crate::config::ACCESS_ANCHOR_INTERVAL`], so that reads with no write after them
    /// are anchored within about that long; a full queue (appends, which anchor the trail
    /// themselves) skips it.
    pub fn anchor_trail(&self) {
        let _ = self.requests.try_send(writer::Command::Anchor);
    }

    /// Appends records, all or nothing, and returns once they are durable. New records get
    /// contiguous indices in the order given; a record whose idempotency key is already
    /// taken by identical content is reported as a duplicate of the earlier entry.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<Appended>, LedgerError> {
        if let Some(reason) = self.write_refusal() {
            return Err(LedgerError::WritesRefused(reason.to_owned()));
        }
        let (reply, response) = oneshot::channel();
        self.requests
            .send(writer::Command::Append { records, reply })
            .await
            .map_err(|_| self.writer_gone())?;
        response.await.map_err(|_| self.writer_gone())?
    }

    /// Why the writer no longer answers: it failed, or the ledger is shutting down.
    fn writer_gone(&self) -> LedgerError {
        match self.writer_failure.get() {
            Some(reason) => LedgerError::WritesRefused(reason.clone()),
            // Also what the call that met a failing writer sees first (the failure is
            // recorded as the writer unwinds, just after its reply was dropped).
            None => LedgerError::Unavailable(
                "the ledger's writer stopped: it is shutting down, or failed (see the server log)"
                    .into(),
            ),
        }
    }

    /// Appends one record (see [`Ledger::append`]).
    pub async fn append_one(&self, record: NewRecord) -> Result<Appended, LedgerError> {
        self.append(vec![record])
            .await?
            .pop()
            .ok_or_else(|| LedgerError::Unavailable("the writer returned no result".into()))
    }

    /// The latest signed checkpoint. Every acknowledged append is covered by it.
    pub fn checkpoint(&self) -> Arc<SignedCheckpoint> {
        self.published.checkpoint.load_full()
    }

    /// The checkpoint the ledger signed at `tree_size` (0: the latest), so that a client
    /// can check an old proof without having kept the note. When several were signed at
    /// one size, the latest of them. A size no group commit ended at is
    /// [`LedgerError::NoCheckpoint`], naming the signed sizes around it.
    pub fn checkpoint_at(&self, tree_size: u64) -> Result<Arc<SignedCheckpoint>, LedgerError> {
        let latest = self.checkpoint();
        if tree_size == 0 || tree_size == latest.size {
            return Ok(latest);
        }
        if tree_size > latest.size {
            return Err(LedgerError::size_past_the_tree(
                "tree_size",
                tree_size,
                latest.size,
            ));
        }
        let (mut found, mut above) = (None, None);
        for stored in self.store.checkpoints_from(tree_size) {
            let (size, note) = stored?;
            if size != tree_size {
                above = Some(size);
                break;
            }
            found = Some(note);
        }
        match found {
            Some(note) => self.verifier.verify(&note).map(Arc::new).map_err(|error| {
                LedgerError::Integrity(format!(
                    "the checkpoint stored for tree size {tree_size}: {error}"
                ))
            }),
            None => Err(LedgerError::NoCheckpoint {
                tree_size,
                below: self.signed_size_below(tree_size)?,
                above,
            }),
        }
    }

    /// The largest tree size below `size` a checkpoint was signed at. The stores read
    /// forward only, so this looks back from `size` in doubling steps: a group commit
    /// holds at most `max_group_records` entries, so it takes a few short scans.
    fn signed_size_below(&self, size: u64) -> Result<Option<u64>, LedgerError> {
        let mut step = 1u64;
        loop {
            let from = size.saturating_sub(step);
            let mut below = None;
            for stored in self.store.checkpoints_from(from) {
                let (signed, _) = stored?;
                if signed >= size {
                    break;
                }
                below = Some(signed);
            }
            if below.is_some() || from == 0 {
                return Ok(below);
            }
            step = step.saturating_mul(2);
        }
    }

    /// Number of entries in the published tree.
    pub fn tree_size(&self) -> u64 {
        self.published.checkpoint.load().size
    }

    /// Entry `index`, if it is in the published tree, checked before it is served: its
    /// leaf must hash to the stored leaf hash and its body match what the leaf commits to.
    /// A damaged entry is [`LedgerError::Integrity`] naming the index (never served), and
    /// the ledger refuses writes from then on.
    pub fn entry(&self, index: u64) -> Result<StoredEntry, LedgerError> {
        let current = self.tree_size();
        if index >= current {
            return Err(LedgerError::index_past_the_tree("index", index, current));
        }
        let checked = read_entry(self.store.as_ref(), index).and_then(|entry| {
            if merkle::leaf_hash(&entry.leaf) != entry.leaf_hash {
                return Err(LedgerError::Integrity(format!(
                    "entry {index}: the stored leaf does not hash to its leaf hash"
                )));
            }
            if let Some(check) = self.body_check {
                check(&entry.leaf, &entry.body).map_err(|problem| {
                    LedgerError::Integrity(format!("entry {index}: {problem}"))
                })?;
            }
            Ok(entry)
        });
        checked.map_err(|error| {
            let error = match error {
                LedgerError::Storage(storage) if storage.is_damage() => {
                    LedgerError::Integrity(format!("entry {index}: {storage}"))
                }
                other => other,
            };
            if let LedgerError::Integrity(reason) = &error {
                let reason = format!("a read found a damaged entry: {reason}");
                if self.damage.set(reason).is_ok() {
                    tracing::error!(index, %error, "a stored entry is damaged: writes are refused from now on");
                }
            }
            error
        })
    }

    /// Inclusion proof of entry `index` in the tree of `tree_size` entries (RFC 9162 §2.1.3).
    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<Hash>, LedgerError> {
        let current = self.tree_size();
        if tree_size > current {
            return Err(LedgerError::size_past_the_tree(
                "tree_size",
                tree_size,
                current,
            ));
        }
        if index >= current {
            return Err(LedgerError::index_past_the_tree("index", index, current));
        }
        if index >= tree_size {
            return Err(LedgerError::invalid(
                "index",
                format!("{index} is not less than tree_size {tree_size}"),
            ));
        }
        Ok(merkle::inclusion_proof(
            index,
            tree_size,
            &StoreNodes(self.store.as_ref()),
        )?)
    }

    /// Consistency proof from the tree of `from_size` to the tree of `to_size` entries
    /// (RFC 9162 §2.1.4).
    pub fn consistency_proof(
        &self,
        from_size: u64,
        to_size: u64,
    ) -> Result<Vec<Hash>, LedgerError> {
        let current = self.tree_size();
        if to_size > current {
            return Err(LedgerError::size_past_the_tree("to_size", to_size, current));
        }
        if from_size > current {
            return Err(LedgerError::size_past_the_tree(
                "from_size",
                from_size,
                current,
            ));
        }
        if from_size > to_size {
            return Err(LedgerError::invalid(
                "from_size",
                format!("{from_size} is greater than to_size {to_size}"),
            ));
        }
        Ok(merkle::consistency_proof(
            from_size,
            to_size,
            &StoreNodes(self.store.as_ref()),
        )?)
    }

    /// Root hash of the tree of `tree_size` entries.
    pub fn root_hash(&self, tree_size: u64) -> Result<Hash, LedgerError> {
        let current = self.tree_size();
        if tree_size > current {
            return Err(LedgerError::size_past_the_tree(
                "tree_size",
                tree_size,
                current,
            ));
        }
        Ok(merkle::root_hash(
            tree_size,
            &StoreNodes(self.store.as_ref()),
        )?)
    }

    /// Stops the writer after the appends already queued, and waits for it.
    pub async fn shutdown(&self) {
        let (done, finished) = oneshot::channel();
        if self
            .requests
            .send(writer::Command::Shutdown { done })
            .await
            .is_ok()
        {
            let _ = finished.await;
        }
        let handle = self.writer.lock().expect("writer handle lock").take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// Indexes the entries an indexer has not seen (after a crash, at most the last group; after
/// `clear`, all of them).
fn catch_up(store: &dyn Store, indexer: &mut dyn Indexer, size: u64) -> Result<(), LedgerError> {
    let mut next = indexer.indexed_size()?;
    if next > size {
        return Err(LedgerError::Integrity(format!(
            "the indexes cover {next} entries but the ledger has {size}; run reindex"
        )));
    }
    if next < size {
        tracing::info!(from = next, to = size, "bringing indexes up to date");
    }
    while next < size {
        let end = (next + CATCH_UP_CHUNK).min(size);
        let leaves = (next..end)
            .map(|index| {
                store.leaf(index)?.map(|leaf| (index, leaf)).ok_or_else(|| {
                    LedgerError::Integrity(format!("entry {index}: leaf is missing"))
                })
            })
            .collect::<Result<Vec<_>, LedgerError>>()?;
        let entries: Vec<(u64, &[u8])> = leaves
            .iter()
            .map(|(index, leaf)| (*index, leaf.as_slice()))
            .collect();
        indexer.index(&entries)?;
        next = end;
    }
    Ok(())
}

/// Reads entry `index` from the store, whatever the published size (for recovery and verify).
pub fn read_entry(store: &dyn Store, index: u64) -> Result<StoredEntry, LedgerError> {
    let leaf = store
        .leaf(index)?
        .ok_or_else(|| LedgerError::Integrity(format!("entry {index}: leaf is missing")))?;
    let leaf_hash = store
        .leaf_nodes(index)?
        .and_then(|nodes| nodes.first().copied())
        .ok_or_else(|| LedgerError::Integrity(format!("entry {index}: leaf hash is missing")))?;
    let body = store.body(index)?.unwrap_or_default();
    Ok(StoredEntry {
        index,
        leaf,
        leaf_hash,
        body,
    })
}

/// The store's tree nodes as a [`NodeSource`]. Node `(level, n)` of the stored-hash layout
/// was written with leaf `((n + 1) << level) - 1`, at position `level` of its node list.
pub struct StoreNodes<'a>(pub &'a dyn Store);

impl NodeSource for StoreNodes<'_> {
    fn nodes(&self, indices: &[u64]) -> Result<Vec<Hash>, NodeError> {
        let mut by_leaf: HashMap<u64, Vec<Hash>> = HashMap::new();
        indices
            .iter()
            .map(|&stored_index| {
                let (level, n) = tlog_tiles::split_stored_hash_index(stored_index);
                let leaf = n
                    .checked_add(1)
                    .and_then(|next| next.checked_shl(u32::from(level)))
                    .filter(|shifted| shifted >> level == n + 1)
                    .map(|shifted| shifted - 1)
                    .ok_or(NodeError::Missing(stored_index))?;
                let nodes = match by_leaf.entry(leaf) {
                    std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                    std::collections::hash_map::Entry::Vacant(slot) => slot.insert(
                        self.0
                            .leaf_nodes(leaf)
                            .map_err(|error| NodeError::Source(Box::new(error)))?
                            .ok_or(NodeError::Missing(stored_index))?,
                    ),
                };
                nodes
                    .get(usize::from(level))
                    .copied()
                    .ok_or(NodeError::Missing(stored_index))
            })
            .collect()
    }
}

//! The single writer: sequencing, chaining, hashing, signing and durability.
//!
//! It drains the queue into a group (up to `max_group_records`), gives the group's new
//! records contiguous indices, chains and hashes their leaves, extends the tree, signs one
//! checkpoint over the result, commits everything in one atomic store batch with one flush,
//! publishes the checkpoint and only then answers every waiter (group commit). Concurrent
//! appends therefore share a flush, get one total order with no gaps, and an acknowledged
//! entry is both durable and covered by the checkpoint readers see.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use super::checkpoint::{CheckpointSigner, SignedCheckpoint};
use super::error::LedgerError;
use super::leaf::{GENESIS_PREV_LEAF_HASH, LeafHeader, decode_header, encode_leaf};
use super::merkle::{self, Frontier, Hash};
use super::time::Timestamp;
use super::{
    Appended, Indexer, LedgerOptions, NewRecord, Published, StoreNodes, TrailHead, WriteState,
};
use crate::store::{CommitBatch, IdempotencyRecord, NewEntry, StorageError, Store};

pub(super) enum Command {
    Append {
        records: Vec<NewRecord>,
        reply: oneshot::Sender<Result<Vec<Appended>, LedgerError>>,
    },
    /// Find out again whether writes can be accepted: a held group is retried and the free
    /// space looked at, with no append waiting (so writes resume, and [`WriteState`] says
    /// so, when space returns while nobody writes).
    Probe,
    /// Anchor the access trail's durable head, if it grew since the published checkpoint
    /// anchored it, in a checkpoint of the same tree re-signed with it (so that reads with
    /// no write after them are anchored too).
    Anchor,
    /// Finish what is queued before this (and anchor the trail once more), then stop.
    Shutdown { done: oneshot::Sender<()> },
}

/// What the writer knows about the tip of the chain.
#[derive(Clone)]
pub(super) struct WriterState {
    pub checkpoint: SignedCheckpoint,
    last_leaf_hash: Hash,
    last_recorded_at: Timestamp,
    /// The tree's right edge: a group's new nodes and root are computed from it with no
    /// reads (reading them from the store was a `pread` per node per group).
    frontier: Frontier,
}

/// Checks the store's tail against its last signed checkpoint and returns the writer's
/// state. Signs and commits the empty tree's checkpoint on first start. Never replays the log.
pub(super) fn recover(
    store: &dyn Store,
    signer: &CheckpointSigner,
) -> Result<WriterState, LedgerError> {
    let Some((stored_size, note)) = store.latest_checkpoint()? else {
        if let Some(index) = store.last_leaf_index()? {
            return Err(LedgerError::Integrity(format!(
                "entry {index} is stored but no checkpoint was ever signed"
            )));
        }
        let frontier = Frontier::at(0, &StoreNodes(store))?;
        let checkpoint = signer.sign(0, frontier.root())?;
        store.commit(&CommitBatch {
            checkpoint: Some((0, checkpoint.note.clone().into_bytes())),
            ..CommitBatch::default()
        })?;
        return Ok(WriterState {
            checkpoint,
            last_leaf_hash: GENESIS_PREV_LEAF_HASH,
            last_recorded_at: Timestamp::default(),
            frontier,
        });
    };

    let checkpoint = signer.verifier().verify(&note).map_err(|error| {
        LedgerError::Integrity(format!(
            "the latest checkpoint (size {stored_size}): {error}"
        ))
    })?;
    if checkpoint.size != stored_size {
        return Err(LedgerError::Integrity(format!(
            "the checkpoint stored for size {stored_size} says size {}",
            checkpoint.size
        )));
    }
    let size = checkpoint.size;
    match store.last_leaf_index()? {
        Some(last) if last + 1 != size => {
            return Err(LedgerError::Integrity(format!(
                "the last stored entry is {last} but the last signed checkpoint covers {size} entries"
            )));
        }
        None if size != 0 => {
            return Err(LedgerError::Integrity(format!(
                "no entry is stored but the last signed checkpoint covers {size} entries"
            )));
        }
        _ => {}
    }
    let frontier = Frontier::at(size, &StoreNodes(store))?;
    if frontier.root() != checkpoint.root_hash {
        return Err(LedgerError::Integrity(format!(
            "the stored tree of {size} entries does not have the signed root hash"
        )));
    }
    if size == 0 {
        return Ok(WriterState {
            checkpoint,
            last_leaf_hash: GENESIS_PREV_LEAF_HASH,
            last_recorded_at: Timestamp::default(),
            frontier,
        });
    }
    let last = super::read_entry(store, size - 1)?;
    if merkle::leaf_hash(&last.leaf) != last.leaf_hash {
        return Err(LedgerError::Integrity(format!(
            "entry {}: leaf bytes do not match the leaf hash in the tree",
            size - 1
        )));
    }
    let header = decode_header(&last.leaf)
        .map_err(|error| LedgerError::Integrity(format!("entry {}: {error}", size - 1)))?;
    if header.index != size - 1 {
        return Err(LedgerError::Integrity(format!(
            "entry {} says it is entry {}",
            size - 1,
            header.index
        )));
    }
    Ok(WriterState {
        checkpoint,
        last_leaf_hash: last.leaf_hash,
        last_recorded_at: header.recorded_at,
        frontier,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn spawn(
    store: Arc<dyn Store>,
    signer: CheckpointSigner,
    state: WriterState,
    published: Arc<Published>,
    queue: mpsc::Receiver<Command>,
    options: LedgerOptions,
    indexer: Option<Box<dyn Indexer>>,
    trail: Option<Arc<dyn TrailHead>>,
    writes: watch::Sender<WriteState>,
    failure: Arc<std::sync::OnceLock<String>>,
) -> Result<std::thread::JoinHandle<()>, LedgerError> {
    let writer = Writer {
        store,
        signer,
        state,
        published,
        options,
        indexer,
        trail,
        limbo: None,
        failed: None,
        writes,
    };
    std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || {
            let mut writer = writer;
            // A panic here must not leave the ledger looking healthy with no one to write:
            // it is kept as the reason every later write is refused, and told to health
            // before the writer's state channel closes.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(queue)));
            if let Err(panic) = run {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                tracing::error!(panic = %what, "the ledger's writer failed: writes are refused");
                let reason = format!("the ledger's writer failed ({what})");
                let _ = failure.set(reason.clone());
                writer.writes.send_replace(WriteState::Refused(reason));
            }
        })
        .map_err(|error| LedgerError::Unavailable(format!("cannot start the writer: {error}")))
}

struct Writer {
    store: Arc<dyn Store>,
    signer: CheckpointSigner,
    state: WriterState,
    published: Arc<Published>,
    options: LedgerOptions,
    indexer: Option<Box<dyn Indexer>>,
    /// The access trail each checkpoint anchors.
    trail: Option<Arc<dyn TrailHead>>,
    /// A group whose commit failed, with the state it leads to: written before anything else.
    limbo: Option<(CommitBatch, WriterState)>,
    /// Set when sequencing or indexing failed for a reason other than space: no further
    /// write is attempted until a restart re-reads the store and re-derives the indexes.
    failed: Option<String>,
    /// Whether writes are accepted, as the last group or probe found: what health reports.
    writes: watch::Sender<WriteState>,
}

type Reply = oneshot::Sender<Result<Vec<Appended>, LedgerError>>;

impl Writer {
    fn run(&mut self, mut queue: mpsc::Receiver<Command>) {
        while let Some(command) = queue.blocking_recv() {
            let mut group: Vec<(Vec<NewRecord>, Reply)> = Vec::new();
            let mut records = 0usize;
            let mut shutdown = None;
            let mut probe = false;
            let mut anchor = false;
            let mut next = Some(command);
            while let Some(command) = next.take() {
                match command {
                    Command::Append {
                        records: batch,
                        reply,
                    } => {
                        records += batch.len();
                        group.push((batch, reply));
                    }
                    Command::Probe => probe = true,
                    Command::Anchor => anchor = true,
                    Command::Shutdown { done } => {
                        shutdown = Some(done);
                        break;
                    }
                }
                if records < self.options.max_group_records {
                    next = queue.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit_group(group);
            } else if probe {
                self.probe();
            }
            // A group just committed anchored the trail as it was: only what came since.
            if anchor || shutdown.is_some() {
                self.anchor_trail();
            }
            if let Some(done) = shutdown {
                let _ = done.send(());
                return;
            }
        }
    }

    /// Says whether writes are accepted (health reports it); only a change is told, and
    /// logged.
    fn tell(&self, state: WriteState) {
        self.writes.send_if_modified(|current| {
            if *current == state {
                return false;
            }
            match &state {
                WriteState::Refused(reason) => tracing::warn!(%reason, "refusing writes"),
                WriteState::Accepting => tracing::info!("accepting writes again"),
            }
            *current = state;
            true
        });
    }

    /// Why writes cannot be accepted now, before a group is sequenced: an earlier failure, a
    /// held group that still cannot be written (retried here first: its checkpoint is signed
    /// and may be partly on disk, so the ledger may only continue from exactly that state),
    /// or less free space than `needed` beyond the reserve.
    fn refusal(&mut self, needed: u64) -> Option<LedgerError> {
        if let Some(reason) = &self.failed {
            return Some(LedgerError::Unavailable(reason.clone()));
        }
        if let Some((batch, next_state)) = self.limbo.take() {
            if let Err(error) = self.store.commit(&batch) {
                tracing::debug!(%error, "the pending group still cannot be written");
                self.limbo = Some((batch, next_state));
                return Some(commit_failure(&error));
            }
            let size = next_state.checkpoint.size;
            if let Err(error) = self.publish(batch, next_state) {
                tracing::debug!(%error, "the pending group is written but still cannot be indexed");
                return Some(commit_failure(&error));
            }
            tracing::info!(
                tree_size = size,
                "the pending group is written; accepting appends again"
            );
        }
        let available = self.store.available_bytes()?;
        let needed = needed + self.options.min_free_bytes;
        if available >= needed {
            return None;
        }
        tracing::debug!(available, needed, "disk space below the reserve");
        Some(LedgerError::ResourceExhausted(format!(
            "the ledger's disk is full ({available} bytes free, {} reserved); nothing was appended: retry, idempotently, once space is freed",
            self.options.min_free_bytes
        )))
    }

    /// Finds out, with no append waiting, whether writes can be accepted (see
    /// [`Command::Probe`]).
    fn probe(&mut self) {
        match self.refusal(0) {
            Some(error) => self.tell(WriteState::Refused(error.to_string())),
            None => self.tell(WriteState::Accepting),
        }
    }

    /// Re-signs the published tree with the access trail's durable head when the trail
    /// has grown since the published checkpoint anchored it, and commits that checkpoint
    /// alone (with the log store, a frame without entries; see [`Command::Anchor`]). Same
    /// size, same root: it extends nothing and contradicts nothing. Not while writes are
    /// refused (for good, a held group that still cannot be written — it goes first, being
    /// signed already — or free space below the reserve: sled does not recover from an
    /// ENOSPC it meets itself, so nothing is committed past the reserve); a commit that
    /// fails is held like a group's.
    fn anchor_trail(&mut self) {
        if self.trail.is_none() || self.failed.is_some() {
            return;
        }
        if let Some(refusal) = self.refusal(0) {
            self.tell(WriteState::Refused(refusal.to_string()));
            return;
        }
        let Some(head) = self.trail.as_ref().map(|trail| trail.durable_head()) else {
            return;
        };
        let anchored = self.state.checkpoint.access_anchor;
        if anchored == Some(head) || (anchored.is_none() && head.records == 0) {
            return;
        }
        let size = self.state.checkpoint.size;
        let checkpoint =
            match self
                .signer
                .sign_anchoring(size, self.state.checkpoint.root_hash, Some(head))
            {
                Ok(checkpoint) => checkpoint,
                Err(error) => {
                    tracing::error!(%error, "signing the access trail's anchor failed");
                    return;
                }
            };
        let batch = CommitBatch {
            checkpoint: Some((size, checkpoint.note.clone().into_bytes())),
            ..CommitBatch::default()
        };
        let next_state = WriterState {
            checkpoint,
            ..self.state.clone()
        };
        let committed = match self.store.commit(&batch) {
            Ok(()) => self.publish(batch, next_state),
            Err(error) => {
                tracing::error!(%error, "the access trail's anchor cannot be written; holding it for retry");
                self.limbo = Some((batch, next_state));
                Err(error)
            }
        };
        match committed {
            Ok(()) => tracing::debug!(
                tree_size = size,
                access_records = head.records,
                "access trail anchored"
            ),
            Err(error) => self.tell(WriteState::Refused(commit_failure(&error).to_string())),
        }
    }

    fn commit_group(&mut self, group: Vec<(Vec<NewRecord>, Reply)>) {
        let refuse = |group: Vec<(Vec<NewRecord>, Reply)>, error: &dyn Fn() -> LedgerError| {
            for (_, reply) in group {
                let _ = reply.send(Err(error()));
            }
        };
        let needed: u64 = group
            .iter()
            .flat_map(|(records, _)| records)
            .map(|record| (record.content.len() + record.body.len()) as u64 * 4)
            .sum();
        if let Some(refusal) = self.refusal(needed) {
            let message = refusal.to_string();
            refuse(group, &|| match &refusal {
                LedgerError::Unavailable(reason) => LedgerError::Unavailable(reason.clone()),
                LedgerError::ResourceExhausted(reason) => {
                    LedgerError::ResourceExhausted(reason.clone())
                }
                other => LedgerError::Unavailable(other.to_string()),
            });
            self.tell(WriteState::Refused(message));
            return;
        }
        match self.sequence(&group) {
            Ok((outcomes, None)) => {
                for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Ok((outcomes, Some((batch, next_state)))) => {
                let committed = match self.timed_commit(&batch) {
                    Ok(()) => self.publish(batch, next_state),
                    Err(error) => {
                        // Not acknowledged. It may still reach the disk later (when retried),
                        // so a client's idempotent retry then finds it as a duplicate.
                        tracing::error!(%error, "group commit failed; holding it for retry");
                        self.limbo = Some((batch, next_state));
                        Err(error)
                    }
                };
                match committed {
                    Ok(()) => {
                        for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
                            let _ = reply.send(outcome);
                        }
                    }
                    Err(error) => {
                        refuse(group, &|| commit_failure(&error));
                        self.tell(WriteState::Refused(commit_failure(&error).to_string()));
                        return;
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, "sequencing failed; refusing further writes");
                let reason = format!("sequencing failed ({error}); restart the server");
                self.failed = Some(reason.clone());
                refuse(group, &|| LedgerError::Unavailable(reason.clone()));
            }
        }
        match &self.failed {
            Some(reason) => self.tell(WriteState::Refused(reason.clone())),
            None => self.tell(WriteState::Accepting),
        }
    }

    /// Commits one group, measuring its size and how long the write and flush took.
    fn timed_commit(&self, batch: &CommitBatch) -> Result<(), crate::store::StorageError> {
        let started = std::time::Instant::now();
        self.store.commit(batch)?;
        metrics::histogram!(crate::metric_names::FLUSH_SECONDS)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metric_names::GROUP_ENTRIES).record(batch.entries.len() as f64);
        Ok(())
    }

    /// After a durable commit: index the new entries, then publish the checkpoint. When the
    /// indexes have no room for them (their runs cannot be written), nothing is published:
    /// the group is held, like one whose commit failed, and published once a retry indexes
    /// it — so that readers never see entries whose facts are not indexed.
    fn publish(&mut self, batch: CommitBatch, next_state: WriterState) -> Result<(), StorageError> {
        // Derived indexes follow the durable commit and precede publication, so a reader
        // bounded by the published size finds them complete.
        if let Some(indexer) = self.indexer.as_mut() {
            let entries: Vec<(u64, &[u8])> = batch
                .entries
                .iter()
                .map(|entry| (entry.index, entry.leaf.as_slice()))
                .collect();
            match indexer.index(&entries) {
                Ok(()) => {}
                Err(error @ StorageError::NoSpace(_)) => {
                    tracing::warn!(%error, "no space to index a committed group; holding it for retry");
                    self.limbo = Some((batch, next_state));
                    return Err(error);
                }
                Err(error) => {
                    // The entries are durable: acknowledge them, but write no more until a
                    // restart re-derives the indexes from the ledger.
                    tracing::error!(%error, "indexing failed; refusing further writes");
                    self.failed = Some(format!("indexing failed ({error}); restart the server"));
                }
            }
        }
        self.published
            .checkpoint
            .store(Arc::new(next_state.checkpoint.clone()));
        tracing::debug!(tree_size = next_state.checkpoint.size, "group committed");
        metrics::gauge!(crate::metric_names::TREE_SIZE).set(next_state.checkpoint.size as f64);
        self.state = next_state;
        Ok(())
    }

    /// Decides every request of the group and builds the batch that makes the group's new
    /// entries durable. A request that fails (conflict) fails alone and appends nothing; an
    /// error returned from here is a store failure that fails the whole group.
    #[allow(clippy::type_complexity)]
    fn sequence(
        &self,
        group: &[(Vec<NewRecord>, Reply)],
    ) -> Result<
        (
            Vec<Result<Vec<Appended>, LedgerError>>,
            Option<(CommitBatch, WriterState)>,
        ),
        LedgerError,
    > {
        let store = self.store.as_ref();
        let mut frontier = self.state.frontier.clone();
        let mut batch = CommitBatch::default();
        // Sized up front: growing them would rehash every key a few times per group.
        let group_records: usize = group.iter().map(|(records, _)| records.len()).sum();
        let mut claimed: HashMap<Vec<u8>, IdempotencyRecord> =
            HashMap::with_capacity(group_records);
        let mut size = self.state.checkpoint.size;
        let mut prev_leaf_hash = self.state.last_leaf_hash;
        // recorded_at never decreases along the chain, even if the wall clock steps back.
        let recorded_at = Timestamp::now().max(self.state.last_recorded_at);
        let mut outcomes = Vec::with_capacity(group.len());

        for (records, _) in group {
            // Decide every record of the request before giving out any index.
            let mut decisions = Vec::with_capacity(records.len());
            let mut in_request: HashMap<&[u8], (usize, [u8; 32])> =
                HashMap::with_capacity(records.len());
            let mut rejected = None;
            for (position, record) in records.iter().enumerate() {
                let digest: [u8; 32] = Sha256::digest(&record.content).into();
                let earlier = match claimed.get(&record.idempotency_key) {
                    Some(existing) => Some(*existing),
                    None => store.idempotency_record(&record.idempotency_key)?,
                };
                let decision = if let Some(existing) = earlier {
                    if existing.content_digest != digest {
                        rejected = Some(LedgerError::Conflict {
                            field: record.field.clone(),
                            index: existing.index,
                        });
                        break;
                    }
                    Decision::Existing(existing.index)
                } else if let Some(&(first, first_digest)) =
                    in_request.get(record.idempotency_key.as_slice())
                {
                    if first_digest != digest {
                        rejected = Some(LedgerError::invalid(
                            record.field.clone(),
                            format!(
                                "repeats the idempotency key of {} with different content",
                                records[first].field
                            ),
                        ));
                        break;
                    }
                    Decision::SameAs(first)
                } else {
                    in_request.insert(&record.idempotency_key, (position, digest));
                    Decision::New(digest)
                };
                decisions.push(decision);
            }
            if let Some(error) = rejected {
                outcomes.push(Err(error));
                continue;
            }

            let mut appended: Vec<Appended> = Vec::with_capacity(records.len());
            for (record, decision) in records.iter().zip(decisions) {
                let outcome = match decision {
                    Decision::Existing(index) => Appended {
                        index,
                        leaf_hash: self.leaf_hash_of(index, &batch)?,
                        duplicate: true,
                    },
                    Decision::SameAs(position) => Appended {
                        duplicate: true,
                        ..appended[position]
                    },
                    Decision::New(content_digest) => {
                        let index = size;
                        let header = LeafHeader {
                            index,
                            prev_leaf_hash,
                            recorded_at,
                        };
                        let leaf = encode_leaf(&header, &record.content);
                        let leaf_hash = merkle::leaf_hash(&leaf);
                        let new_nodes = frontier.push(leaf_hash);
                        let claim = IdempotencyRecord {
                            index,
                            content_digest,
                        };
                        claimed.insert(record.idempotency_key.clone(), claim);
                        batch
                            .idempotency
                            .push((record.idempotency_key.clone(), claim));
                        batch.entries.push(NewEntry {
                            index,
                            leaf,
                            nodes: new_nodes,
                            body: record.body.clone(),
                        });
                        prev_leaf_hash = leaf_hash;
                        size += 1;
                        Appended {
                            index,
                            leaf_hash,
                            duplicate: false,
                        }
                    }
                };
                appended.push(outcome);
            }
            outcomes.push(Ok(appended));
        }

        if batch.entries.is_empty() {
            return Ok((outcomes, None));
        }
        debug_assert_eq!(frontier.size(), size);
        let anchor = self.trail.as_ref().map(|trail| trail.durable_head());
        let checkpoint = self.signer.sign_anchoring(size, frontier.root(), anchor)?;
        batch.checkpoint = Some((size, checkpoint.note.clone().into_bytes()));
        let next_state = WriterState {
            checkpoint,
            last_leaf_hash: prev_leaf_hash,
            last_recorded_at: recorded_at,
            frontier,
        };
        Ok((outcomes, Some((batch, next_state))))
    }

    /// The leaf hash of an entry that is either stored or in the batch being built.
    fn leaf_hash_of(&self, index: u64, batch: &CommitBatch) -> Result<Hash, LedgerError> {
        if let Some(first) = batch.entries.first() {
            if index >= first.index {
                let offset = usize::try_from(index - first.index).unwrap_or(usize::MAX);
                if let Some(entry) = batch.entries.get(offset) {
                    return Ok(entry.nodes[0]);
                }
            }
        }
        Ok(super::read_entry(self.store.as_ref(), index)?.leaf_hash)
    }
}

/// What the callers of a group whose commit failed are told.
fn commit_failure(error: &crate::store::StorageError) -> LedgerError {
    match error {
        crate::store::StorageError::NoSpace(_) => LedgerError::ResourceExhausted(format!(
            "the ledger's disk is full ({error}); nothing was acknowledged: retry, idempotently, once space is freed"
        )),
        _ => LedgerError::Unavailable(format!(
            "the ledger cannot write ({error}); nothing was acknowledged: retry, idempotently"
        )),
    }
}

enum Decision {
    /// Already in the ledger (or earlier in this group) with the same content.
    Existing(u64),
    /// Same key and content as an earlier record of the same request.
    SameAs(usize),
    New([u8; 32]),
}

//! Offline, end-to-end verification of a stopped ledger: every leaf, chain link, tree node,
//! body digest and idempotency key, the root against the latest signed checkpoint, and every
//! checkpoint ever signed against the tree. Trusts nothing but the verifier key.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::access_log::{AccessLog, BrokenChain, TrailMismatch};
use crate::ledger::leaf::{GENESIS_PREV_LEAF_HASH, LeafHeader, decode_header};
use crate::ledger::merkle::{self, Frontier, Hash};
use crate::ledger::time::Timestamp;
use crate::ledger::{CheckpointVerifier, StoreNodes};
use crate::proto::{LeafRecord, leaf_record};
use crate::records::communication::idempotency_key;
use crate::storage::{StorageError, Store};

/// What a successful verification covered.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub origin: String,
    pub tree_size: u64,
    pub root_hash: Hash,
    pub checkpoints: u64,
}

/// The first problem found.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Entry `index` is the first bad one.
    #[error("entry {index}: {problem}")]
    Entry { index: u64, problem: String },
    /// The signed checkpoint for tree size `size` is bad or does not match the tree.
    /// `first_unproven` is the size of the largest checkpoint that does verify against
    /// the tree: the first entry no good signed checkpoint covers.
    #[error("checkpoint for tree size {size}: {problem}")]
    Checkpoint {
        size: u64,
        problem: String,
        first_unproven: Option<u64>,
    },
    #[error("no signed checkpoint in the store")]
    NoCheckpoint,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl VerifyError {
    /// The first entry that cannot be trusted, whenever the data is wrong: the bad entry,
    /// the first entry no good signed checkpoint covers, or the first entry of a damaged
    /// part of the store. `None` only when the failure is not tied to the entries.
    pub fn first_bad_index(&self) -> Option<u64> {
        match self {
            VerifyError::Entry { index, .. } => Some(*index),
            VerifyError::Checkpoint { first_unproven, .. } => *first_unproven,
            VerifyError::NoCheckpoint => Some(0),
            VerifyError::Storage(error) => error.first_bad_index(),
        }
    }

    /// Whether the store's data is wrong (exit 1), rather than unreadable (exit 2).
    pub fn is_damage(&self) -> bool {
        match self {
            VerifyError::Storage(error) => error.is_damage(),
            _ => true,
        }
    }
}

fn checkpoint_error(size: u64, problem: impl Into<String>) -> VerifyError {
    VerifyError::Checkpoint {
        size,
        problem: problem.into(),
        first_unproven: None,
    }
}

fn entry_error(index: u64, problem: impl Into<String>) -> VerifyError {
    VerifyError::Entry {
        index,
        problem: problem.into(),
    }
}

/// Verifies everything in `store`. `progress(done, total)` is called as entries are checked.
pub fn verify_store(
    store: &dyn Store,
    verifier: &CheckpointVerifier,
    progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, VerifyError> {
    verify_store_in_chunks(store, verifier, CHUNK, progress)
}

/// [`verify_store`] with entries split among threads in chunks of `chunk` (tests use small
/// chunks to check that the first bad index does not depend on how the work is split).
pub fn verify_store_in_chunks(
    store: &dyn Store,
    verifier: &CheckpointVerifier,
    chunk: u64,
    progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, VerifyError> {
    verify_everything(store, verifier, chunk, progress).map_err(|error| match error {
        VerifyError::Checkpoint { size, problem, .. } => VerifyError::Checkpoint {
            size,
            problem,
            first_unproven: Some(largest_good_checkpoint(store, verifier)),
        },
        other => other,
    })
}

fn verify_everything(
    store: &dyn Store,
    verifier: &CheckpointVerifier,
    chunk: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, VerifyError> {
    let chunk = chunk.max(1);
    let (stored_size, note) = store
        .latest_checkpoint()?
        .ok_or(VerifyError::NoCheckpoint)?;
    let checkpoint = verifier
        .verify(&note)
        .map_err(|error| checkpoint_error(stored_size, error.to_string()))?;
    let size = checkpoint.size;
    if size != stored_size {
        return Err(checkpoint_error(
            stored_size,
            format!("the note says size {size}"),
        ));
    }
    if let Some(last) = store.last_leaf_index()? {
        if last >= size {
            return Err(entry_error(
                size,
                format!("stored beyond the signed checkpoint (entries up to {last} exist)"),
            ));
        }
    }

    let claims = verify_entries(store, size, chunk, &mut progress)?;
    let nodes = StoreNodes(store);

    let root_hash = merkle::root_hash(size, &nodes)
        .map_err(|error| checkpoint_error(size, error.to_string()))?;
    if root_hash != checkpoint.root_hash {
        return Err(checkpoint_error(
            size,
            "the signed root hash does not match the tree",
        ));
    }

    // Every checkpoint ever signed must be a checkpoint of this very tree.
    let mut checkpoints = 0;
    for item in store.checkpoints() {
        let (stored_size, note) = item?;
        check_checkpoint(verifier, &nodes, stored_size, &note, size)?;
        checkpoints += 1;
    }
    if let Some(groups) = store.groups() {
        verify_groups(groups, size, &claims, store.checkpoints())?;
    }

    Ok(VerifyReport {
        origin: checkpoint.origin,
        tree_size: size,
        root_hash,
        checkpoints,
    })
}

/// A stored checkpoint (`note`, kept for tree size `stored_size`) must be signed by the
/// log's key, for that size, and over this very tree (of `size` entries).
fn check_checkpoint(
    verifier: &CheckpointVerifier,
    nodes: &StoreNodes,
    stored_size: u64,
    note: &[u8],
    size: u64,
) -> Result<(), VerifyError> {
    let older = verifier
        .verify(note)
        .map_err(|error| checkpoint_error(stored_size, error.to_string()))?;
    let root = merkle::root_hash(older.size, nodes)
        .map_err(|error| checkpoint_error(older.size, error.to_string()))?;
    if older.size != stored_size || older.size > size || root != older.root_hash {
        return Err(checkpoint_error(
            stored_size,
            "signed a tree that is not a prefix of this ledger",
        ));
    }
    Ok(())
}

/// The size of the largest stored checkpoint that verifies against the stored tree: every
/// entry below it is proven by a good signature; the first one at or above it is not.
fn largest_good_checkpoint(store: &dyn Store, verifier: &CheckpointVerifier) -> u64 {
    let nodes = StoreNodes(store);
    let stored = store
        .last_leaf_index()
        .ok()
        .flatten()
        .map_or(0, |last| last + 1);
    store
        .checkpoints()
        .map_while(Result::ok)
        .filter(|(size, note)| check_checkpoint(verifier, &nodes, *size, note, stored).is_ok())
        .map(|(size, _)| size)
        .max()
        .unwrap_or(0)
}

/// Every byte of every group commit the backend keeps (`ledger.log`'s frames): each group
/// passes its checksum, the groups hold the entries in order with none missing or twice,
/// each group's idempotency keys are exactly its entries' keys, and each group's
/// checkpoint is signed, over this tree, for the size the group ends at, and the one the
/// store serves for that size (and the store serves no checkpoint that no group holds).
fn verify_groups(
    groups: crate::storage::StoredGroups<'_>,
    size: u64,
    expected: &[Claim],
    stored_checkpoints: crate::storage::Checkpoints<'_>,
) -> Result<(), VerifyError> {
    let mut claims = Vec::with_capacity(expected.len());
    // Both in ascending size: compared as they come, nothing held.
    let mut stored_checkpoints = stored_checkpoints.peekable();
    let mut next = 0u64;
    for group in groups {
        let group = group?;
        if group.first_index != next {
            return Err(entry_error(
                next,
                format!(
                    "the log's groups skip from entry {next} to {}",
                    group.first_index
                ),
            ));
        }
        let end = group.first_index + group.entries;
        for (key, record) in &group.idempotency {
            if !(group.first_index..end).contains(&record.index) {
                return Err(entry_error(
                    group.first_index,
                    format!(
                        "the group of entries {}..{end} holds an idempotency key for entry {}",
                        group.first_index, record.index
                    ),
                ));
            }
            claims.push((Sha256::digest(key).into(), record.index));
        }
        if let Some((checkpoint_size, note)) = &group.checkpoint {
            if *checkpoint_size != end {
                return Err(checkpoint_error(
                    *checkpoint_size,
                    format!(
                        "the group of entries {}..{end} holds a checkpoint for another size",
                        group.first_index
                    ),
                ));
            }
            // The store's copy was checked against the tree above: the same note is too.
            match stored_checkpoints.next().transpose()? {
                Some((stored_size, stored)) if stored_size == *checkpoint_size => {
                    if stored != *note {
                        return Err(checkpoint_error(
                            *checkpoint_size,
                            "the store serves another note than the log holds",
                        ));
                    }
                }
                Some((stored_size, _)) if stored_size < *checkpoint_size => {
                    return Err(checkpoint_error(
                        stored_size,
                        "served by the store, but no group of the log holds it",
                    ));
                }
                _ => {
                    return Err(checkpoint_error(
                        *checkpoint_size,
                        "signed in the log, but missing from the checkpoints the store serves",
                    ));
                }
            }
        }
        next = end;
    }
    if next != size {
        return Err(entry_error(
            next,
            format!("the log's groups end at entry {next}, the tree has {size}"),
        ));
    }
    if let Some((extra, _)) = stored_checkpoints.next().transpose()? {
        return Err(checkpoint_error(
            extra,
            "served by the store, but no group of the log holds it",
        ));
    }
    check_claims(size, expected, claims, "the log's groups")
}

/// Entries are checked in chunks of this many, on every core.
const CHUNK: u64 = 1 << 15;

/// Checks entries `0..size`: leaf, chain link, tree nodes, body, idempotency key. Chunks are
/// checked in parallel, each in one sequential scan that recomputes the tree's nodes from
/// the frontier at its start; the error returned is the one at the lowest index, exactly
/// what a sequential pass would report first.
fn verify_entries(
    store: &dyn Store,
    size: u64,
    chunk: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<Claim>, VerifyError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next_chunk = AtomicU64::new(0);
    let checked = AtomicU64::new(0);
    // The lowest failing index so far, and its error.
    let failed_at = AtomicU64::new(u64::MAX);
    let first_failure: Mutex<Option<(u64, VerifyError)>> = Mutex::new(None);
    let claims: Mutex<Vec<Claim>> = Mutex::new(Vec::new());
    let stored = std::thread::scope(|scope| {
        // The stored idempotency index is read alongside, for the comparison at the end.
        let stored = scope.spawn(|| stored_claims(store));
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    loop {
                        let start = next_chunk.fetch_add(chunk, Ordering::Relaxed);
                        // Chunks past a failure cannot lower the first bad index.
                        if start >= size || start > failed_at.load(Ordering::Relaxed) {
                            return;
                        }
                        let end = start.saturating_add(chunk).min(size);
                        match verify_chunk(store, start, end, &checked) {
                            Ok(mut chunk) => claims.lock().expect("claims lock").append(&mut chunk),
                            Err((index, error)) => {
                                let mut first = first_failure.lock().expect("failure lock");
                                if first.as_ref().is_none_or(|(known, _)| index < *known) {
                                    failed_at.store(index, Ordering::Relaxed);
                                    *first = Some((index, error));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        while !workers.iter().all(|worker| worker.is_finished()) {
            progress(checked.load(Ordering::Relaxed), size);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        stored.join().expect("the idempotency scan does not panic")
    });
    if let Some((_, error)) = first_failure.into_inner().expect("failure lock") {
        return Err(error);
    }
    let mut claims = claims.into_inner().expect("claims lock");
    claims.sort_unstable();
    check_claims(size, &claims, stored?, "the idempotency index")?;
    progress(size, size);
    Ok(claims)
}

/// The stored idempotency index as claims.
fn stored_claims(store: &dyn Store) -> Result<Vec<Claim>, StorageError> {
    store
        .idempotency_records()
        .map(|item| {
            let (key, record) = item?;
            Ok((Sha256::digest(&key).into(), record.index))
        })
        .collect()
}

/// What an entry's idempotency key must map to: `(SHA-256 of the key, entry index)`.
type Claim = ([u8; 32], u64);

/// Stored idempotency keys (`what` holds them) must be exactly the entries' keys, each
/// pointing at its own entry: one sorted comparison instead of a random look-up per
/// entry. A difference is reported at the lowest entry it concerns.
fn check_claims(
    size: u64,
    expected: &[Claim],
    mut stored: Vec<Claim>,
    what: &str,
) -> Result<(), VerifyError> {
    debug_assert!(expected.is_sorted());
    stored.sort_unstable();
    if expected == stored.as_slice() {
        return Ok(());
    }
    // The lowest index at which the two differ, on either side.
    let mut first_bad = u64::MAX;
    let (mut e, mut s) = (expected.iter().peekable(), stored.iter().peekable());
    loop {
        match (e.peek(), s.peek()) {
            (Some(a), Some(b)) if a == b => {
                e.next();
                s.next();
            }
            (Some(a), Some(b)) if a.0 == b.0 => {
                // The entry whose key points elsewhere.
                first_bad = first_bad.min(a.1);
                e.next();
                s.next();
            }
            (Some(a), Some(b)) if a.0 < b.0 => {
                first_bad = first_bad.min(a.1);
                e.next();
            }
            (Some(_), Some(b)) | (None, Some(b)) => {
                first_bad = first_bad.min(b.1);
                s.next();
            }
            (Some(a), None) => {
                first_bad = first_bad.min(a.1);
                e.next();
            }
            (None, None) => break,
        }
    }
    let index = first_bad.min(size);
    Err(entry_error(
        index,
        format!(
            "{what}: the idempotency key ((sender_id, message_id) or fact_id) does not point at this entry"
        ),
    ))
}

/// Checks entries `start..end`, given that the entries before `start` are checked by others.
fn verify_chunk(
    store: &dyn Store,
    start: u64,
    end: u64,
    checked: &AtomicU64,
) -> Result<Vec<Claim>, (u64, VerifyError)> {
    let mut claims = Vec::with_capacity(usize::try_from(end - start).unwrap_or(0));
    let at = |index: u64| move |error: VerifyError| (index, error);
    let mut frontier = Frontier::at(start, &StoreNodes(store))
        .map_err(|error| (start, entry_error(start, format!("tree nodes: {error}"))))?;
    // The link into this chunk: the previous entry's leaf (its own chunk checks it).
    let mut previous = match start.checked_sub(1) {
        None => GENESIS_LINK,
        Some(previous) => {
            let leaf = store
                .leaf(previous)
                .map_err(|error| (previous, error.into()))?
                .ok_or_else(|| (previous, entry_error(previous, "leaf is missing")))?;
            let header = decode_header(&leaf)
                .map_err(|error| (previous, entry_error(previous, error.to_string())))?;
            ChainLink {
                leaf_hash: merkle::leaf_hash(&leaf),
                recorded_at: header.recorded_at,
            }
        }
    };
    for entry in store.entries(start, end) {
        let entry = entry.map_err(|error| (start, error.into()))?;
        let index = entry.index;
        let leaf = entry
            .leaf
            .ok_or_else(|| entry_error(index, "leaf is missing"))
            .map_err(at(index))?;
        let (header, record) = check_entry(index, &leaf, entry.body.as_deref(), Some(previous))
            .map_err(|problem| (index, entry_error(index, problem)))?;
        let leaf_hash = merkle::leaf_hash(&leaf);
        let stored_nodes = entry
            .nodes
            .ok_or_else(|| entry_error(index, "tree nodes are missing"))
            .map_err(at(index))?;
        if stored_nodes.first() != Some(&leaf_hash) {
            return Err((
                index,
                entry_error(index, "leaf bytes do not match the leaf hash in the tree"),
            ));
        }
        if stored_nodes != frontier.push(leaf_hash) {
            return Err((
                index,
                entry_error(index, "stored tree nodes do not match the leaves"),
            ));
        }
        claims.push(claim(index, record));
        previous = ChainLink {
            leaf_hash,
            recorded_at: header.recorded_at,
        };
        if index % 4096 == 4095 {
            checked.fetch_add(4096, Ordering::Relaxed);
        }
    }
    Ok(claims)
}

/// The entry before another in the chain: what the next one's header must link to.
#[derive(Debug, Clone, Copy)]
pub struct ChainLink {
    pub leaf_hash: Hash,
    pub recorded_at: Timestamp,
}

/// Where every chain starts: what entry 0 links to.
pub const GENESIS_LINK: ChainLink = ChainLink {
    leaf_hash: GENESIS_PREV_LEAF_HASH,
    recorded_at: Timestamp {
        seconds: 0,
        nanos: 0,
    },
};

/// Checks one entry as anyone holding it can — the store's `verify`, an export's check and
/// a witness's full pass: its leaf names `index`, links to `previous` (when the entry before
/// is at hand) without going back in time, carries a record, and `body` matches it. Returns
/// the leaf's header and record, or what is wrong.
pub fn check_entry(
    index: u64,
    leaf: &[u8],
    body: Option<&[u8]>,
    previous: Option<ChainLink>,
) -> Result<(LeafHeader, leaf_record::Record), String> {
    let header = decode_header(leaf).map_err(|error| error.to_string())?;
    if header.index != index {
        return Err(format!("leaf says index {}", header.index));
    }
    if let Some(previous) = previous {
        if header.prev_leaf_hash != previous.leaf_hash {
            return Err("prev_leaf_hash does not link to the previous entry".into());
        }
        if header.recorded_at < previous.recorded_at {
            return Err("recorded_at goes back in time".into());
        }
    }
    let record = LeafRecord::decode(leaf)
        .map_err(|_| "leaf is not a LeafRecord".to_owned())?
        .record
        .ok_or_else(|| "leaf carries no record".to_owned())?;
    if let Some(problem) = body_problem(&record, body) {
        return Err(problem.to_owned());
    }
    Ok((header, record))
}

/// Whether `body` is the one `leaf`'s record commits to, for every entry the server serves
/// ([`crate::ledger::LedgerOptions::body_check`]).
pub fn served_body_problem(leaf: &[u8], body: &[u8]) -> Result<(), String> {
    let record = LeafRecord::decode(leaf)
        .map_err(|_| "leaf is not a LeafRecord".to_owned())?
        .record
        .ok_or_else(|| "leaf carries no record".to_owned())?;
    match body_problem(&record, Some(body)) {
        Some(problem) => Err(problem.to_owned()),
        None => Ok(()),
    }
}

/// The idempotency claim of a checked record.
fn claim(index: u64, record: leaf_record::Record) -> Claim {
    let key = match record {
        leaf_record::Record::Communication(communication) => {
            idempotency_key(&communication.sender_id, &communication.message_id)
        }
        leaf_record::Record::Fact(fact) => crate::records::fact::idempotency_key(&fact.fact_id),
    };
    (Sha256::digest(&key).into(), index)
}

/// What is wrong with the body stored beside a leaf's record, if anything: a
/// communication's body must have the size and SHA-256 its record commits to; a fact has
/// no body (an empty one is the same as none).
pub fn body_problem(record: &leaf_record::Record, body: Option<&[u8]>) -> Option<&'static str> {
    match record {
        leaf_record::Record::Communication(communication) => match body {
            None => Some("body is missing"),
            Some(body) => (body.len() as u64 != communication.body_size
                || Sha256::digest(body).as_slice() != communication.body_sha256.as_slice())
            .then_some("body does not match body_sha256"),
        },
        leaf_record::Record::Fact(_) => body
            .is_some_and(|body| !body.is_empty())
            .then_some("a fact carries a body"),
    }
}

/// What the access trail check covered.
#[derive(Debug, Clone)]
pub struct AccessTrailReport {
    /// Records in the trail, all chained.
    pub records: u64,
    /// `(tree size, records)`: the anchor of the latest signed checkpoint, which the trail
    /// holds; `None` when that checkpoint anchors none.
    pub anchored: Option<(u64, u64)>,
}

/// Why the access trail does not verify.
#[derive(Debug, thiserror::Error)]
pub enum AccessTrailError {
    #[error(transparent)]
    Anchor(#[from] TrailMismatch),
    #[error(transparent)]
    Chain(#[from] BrokenChain),
    #[error("the latest checkpoint, which anchors the access trail: {0}")]
    Checkpoint(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Checks the access trail beside the ledger: that it holds what the latest signed
/// checkpoint anchors — a trail removed or cut short still chains, so only the anchor
/// shows it — and then its hash chain, record by record.
pub fn verify_access_trail(
    store: &dyn Store,
    verifier: &CheckpointVerifier,
    access: &AccessLog,
) -> Result<AccessTrailReport, AccessTrailError> {
    let mut anchored = None;
    if let Some((_, note)) = store.latest_checkpoint()? {
        let checkpoint = verifier
            .verify(&note)
            .map_err(|error| AccessTrailError::Checkpoint(error.to_string()))?;
        if let Some(anchor) = &checkpoint.access_anchor {
            access.check_anchor(anchor, checkpoint.size)?;
            anchored = Some((checkpoint.size, anchor.records));
        }
    }
    let records = access.verify()?;
    Ok(AccessTrailReport { records, anchored })
}

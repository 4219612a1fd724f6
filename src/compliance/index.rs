//! The compliance indexes: derived from the ledger alone, kept in step by the writer
//! ([`ComplianceIndexer`]: facts before publication, communications on a thread of their
//! own), rebuilt by `audit-ledger reindex`.
//!
//! Two ordered key spaces (ids never contain NUL), each with its own watermark
//! `m/indexed` → u64 BE (entries below this index are indexed there):
//! - the fact lists (`facts/`): `F` ‖ dim ‖ id ‖ 0x00 ‖ index → the encoded `Fact`. dim `p`:
//!   facts about party `id` (its registration); `c`: facts about customer `id`
//!   (relationships, subscriptions, transfers of its subscriptions, direct agreements); `s`:
//!   facts about subscription `id`.
//! - the communication lists (`index/`): `C` ‖ dim ‖ id ‖ 0x00 ‖ sent_at ‖ index → empty.
//!   dim `t` (id empty): every communication; `c` customer; `s` sender; `u` subscription.
//!
//! Apart because every verdict reads three fact lists: among four communication keys per
//! communication, each read searched a table and filters grown by the communications
//! (10 % of the server's time under batch load). Stores from before kept both in `index/`;
//! [`ComplianceIndexer::new`] moves the facts out.
//!
//! `index` is a u64 BE; `sent_at` is 12 bytes that sort like the instant (sign-flipped
//! seconds BE, then nanos BE).

use std::sync::Arc;

use prost::Message;

use crate::background::{Shared, Worker};
use crate::ledger::Indexer;
use crate::ledger::time::Timestamp;
use crate::proto::{self, fact::Kind};
use crate::storage::{IndexStore, StorageError, Store};

const INDEXED_SIZE: &[u8] = b"m/indexed";

/// Entries the ledger grows by between two seals of the fact lists: at most about twice
/// this many entries are read again at start-up after a crash to find the facts among them.
const FACTS_SEAL_EVERY: u64 = 65_536;

/// Fact keys copied per step when the facts leave a store's `index/`.
const MOVE_CHUNK: usize = 65_536;

pub const FACT_BY_PARTY: u8 = b'p';
pub const FACT_BY_CUSTOMER: u8 = b'c';
pub const FACT_BY_SUBSCRIPTION: u8 = b's';

pub const COMMUNICATION_BY_TIME: u8 = b't';
pub const COMMUNICATION_BY_CUSTOMER: u8 = b'c';
pub const COMMUNICATION_BY_SENDER: u8 = b's';
pub const COMMUNICATION_BY_SUBSCRIPTION: u8 = b'u';

/// Length of an encoded instant.
pub const INSTANT_LEN: usize = 12;

pub fn encode_instant(at: Timestamp) -> [u8; INSTANT_LEN] {
    let mut out = [0u8; INSTANT_LEN];
    out[..8].copy_from_slice(&((at.seconds as u64) ^ (1 << 63)).to_be_bytes());
    out[8..].copy_from_slice(&(at.nanos.max(0) as u32).to_be_bytes());
    out
}

/// `kind ‖ dim ‖ id ‖ 0x00`: every key of one fact or communication list starts with it.
pub fn list_prefix(kind: u8, dim: u8, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(3 + id.len() + 20);
    key.push(kind);
    key.push(dim);
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key
}

/// The first key after every key that starts with `prefix` (which ends in 0x00).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

pub fn fact_key(dim: u8, id: &str, index: u64) -> Vec<u8> {
    let mut key = list_prefix(b'F', dim, id);
    key.extend_from_slice(&index.to_be_bytes());
    key
}

pub fn communication_key(dim: u8, id: &str, sent_at: Timestamp, index: u64) -> Vec<u8> {
    let mut key = list_prefix(b'C', dim, id);
    key.extend_from_slice(&encode_instant(sent_at));
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// The ledger index at the end of a fact or communication key.
pub fn index_of_key(key: &[u8]) -> Option<u64> {
    let tail = key.get(key.len().checked_sub(8)?..)?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

/// The instant and index at the end of a communication key.
pub fn position_of_key(key: &[u8]) -> Option<([u8; INSTANT_LEN], u64)> {
    let start = key.len().checked_sub(INSTANT_LEN + 8)?;
    let instant = key.get(start..start + INSTANT_LEN)?.try_into().ok()?;
    Some((instant, index_of_key(key)?))
}

fn timestamp(at: &Option<prost_types::Timestamp>) -> Timestamp {
    at.as_ref()
        .map(|t| Timestamp {
            seconds: t.seconds,
            nanos: t.nanos,
        })
        .unwrap_or_default()
}

/// How far the communication lists are indexed: every entry below the value. Fact lists
/// are always complete up to the published tree size; communication lists follow on a
/// thread of their own and readers wait for them ([`IndexProgress::communications_indexed`]).
#[derive(Clone)]
pub struct IndexProgress {
    communications: tokio::sync::watch::Receiver<u64>,
    /// The indexing worker's shared state: its target, and its failure when it failed.
    worker: Arc<Shared<u64>>,
}

impl IndexProgress {
    /// Waits until communications below `size` are indexed; an error when indexing failed
    /// or did not get there within `patience`.
    pub async fn communications_indexed(
        &self,
        size: u64,
        patience: std::time::Duration,
    ) -> Result<(), String> {
        let mut progress = self.communications.clone();
        let reached = tokio::time::timeout(patience, progress.wait_for(|&indexed| indexed >= size));
        match reached.await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.worker.failure().unwrap_or_else(|| {
                format!(
                    "the communication indexes are still catching up to entry {size}; retry shortly"
                )
            })),
        }
    }

    /// Communications below this size are indexed.
    pub fn communications(&self) -> u64 {
        *self.communications.borrow()
    }
}

/// Entries the communication indexer reads and indexes per step.
const TAIL_STEP: u64 = 4096;

/// Keeps the compliance indexes in step with the ledger. Fact keys are written by the writer
/// before it publishes (verdicts need them at once). Communication keys — four per
/// communication, the bulk of the work — are written by a thread of its own that follows
/// the ledger, reading the durable entries from the store: the ledger itself is its queue,
/// so appends never wait for it and a burst of any size costs no memory. `m/indexed`, written with each step of
/// communication keys, is where it starts again after a restart.
pub struct ComplianceIndexer {
    index: Arc<dyn IndexStore>,
    facts: Arc<dyn IndexStore>,
    /// The size when the fact lists were last sealed.
    facts_sealed_at: u64,
    /// The communication indexer; its state is the size to index up to. Dropped with the
    /// indexer, it stops after its current step: what it did not reach is indexed after the
    /// next start.
    worker: Worker<u64>,
}

/// What the communication lists need of a leaf, decoded without the rest: a
/// `LeafRecord` (ledger.proto) read through its `communication` field (tag 10) alone, and of
/// that only four fields; prost skips every other field unread. The lists were a quarter of
/// the indexer's time in decoding subjects, digests and attributes they never use.
#[derive(Clone, PartialEq, prost::Message)]
struct ListedLeaf {
    #[prost(message, optional, tag = "10")]
    communication: Option<ListedCommunication>,
}

/// A `LeafRecord` (ledger.proto) read through its `fact` field (tag 11) alone: the writer
/// indexes facts before publishing and skips the communications of its group unread.
#[derive(Clone, PartialEq, prost::Message)]
struct FactLeaf {
    #[prost(message, optional, tag = "11")]
    fact: Option<proto::Fact>,
}

/// The fields of a `CommunicationRecord` (ledger.proto) its list keys are made of.
#[derive(Clone, PartialEq, prost::Message)]
struct ListedCommunication {
    #[prost(string, tag = "2")]
    sender_id: String,
    #[prost(string, tag = "3")]
    customer_id: String,
    #[prost(message, optional, tag = "6")]
    sent_at: Option<prost_types::Timestamp>,
    #[prost(string, tag = "10")]
    subscription_id: String,
}

/// The communication keys of one leaf (none for a fact).
fn communication_keys(index: u64, leaf: &[u8]) -> Result<Vec<Vec<u8>>, StorageError> {
    let listed = ListedLeaf::decode(leaf)
        .map_err(|_| StorageError::Malformed(format!("entry {index} is not a LeafRecord")))?;
    let Some(c) = listed.communication else {
        return Ok(Vec::new());
    };
    let sent_at = timestamp(&c.sent_at);
    let mut keys = vec![
        communication_key(COMMUNICATION_BY_TIME, "", sent_at, index),
        communication_key(COMMUNICATION_BY_CUSTOMER, &c.customer_id, sent_at, index),
        communication_key(COMMUNICATION_BY_SENDER, &c.sender_id, sent_at, index),
    ];
    if !c.subscription_id.is_empty() {
        keys.push(communication_key(
            COMMUNICATION_BY_SUBSCRIPTION,
            &c.subscription_id,
            sent_at,
            index,
        ));
    }
    Ok(keys)
}

/// The communication indexer's loop: index from `m/indexed` up to the target, a step at a
/// time, until told to stop.
fn follow(
    index: &dyn IndexStore,
    store: &dyn Store,
    target: &Shared<u64>,
    progress: &tokio::sync::watch::Sender<u64>,
) -> Result<(), StorageError> {
    let mut indexed = read_indexed_size(index)?;
    loop {
        let goal = {
            let mut goal = target.lock();
            while !target.stopping() && *goal <= indexed {
                goal = target.wait_timeout(goal, std::time::Duration::from_secs(60));
            }
            if target.stopping() {
                return Ok(());
            }
            *goal
        };
        let end = goal.min(indexed + TAIL_STEP);
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for leaf in store.leaves(indexed, end) {
            let (index, leaf) = leaf?;
            for key in communication_keys(index, &leaf)? {
                writes.push((key, Some(Vec::new())));
            }
        }
        writes.push((INDEXED_SIZE.to_vec(), Some(end.to_be_bytes().to_vec())));
        index.apply(writes)?;
        indexed = end;
        progress.send_replace(end);
    }
}

impl ComplianceIndexer {
    /// The indexer of communication lists in `index` and fact lists in `facts`, following
    /// the ledger in `store`, and the progress its readers wait on. Facts still kept among
    /// the communication lists (a store from before) are moved to `facts` first.
    pub fn new(
        index: Arc<dyn IndexStore>,
        facts: Arc<dyn IndexStore>,
        store: Arc<dyn Store>,
    ) -> Result<(Self, IndexProgress), StorageError> {
        move_facts_out(index.as_ref(), facts.as_ref())?;
        let facts_sealed_at = read_indexed_size(facts.as_ref())?;
        let start = read_indexed_size(index.as_ref())?;
        let (progress, communications) = tokio::sync::watch::channel(start);
        let worker = {
            let index = index.clone();
            Worker::spawn("communication-indexer", start, move |target| {
                // A lack of space (the lists' runs cannot be written) is waited out: `follow`
                // starts again from the watermark. Anything else stops the lists for good.
                loop {
                    match follow(index.as_ref(), store.as_ref(), target, &progress) {
                        Ok(()) => return,
                        Err(StorageError::NoSpace(reason)) => {
                            tracing::warn!(%reason, "no space to index communications; trying again in a second");
                            let goal = target.lock();
                            if target.stopping() {
                                return;
                            }
                            drop(target.wait_timeout(goal, std::time::Duration::from_secs(1)));
                        }
                        Err(error) => {
                            tracing::error!(%error, "indexing communications failed");
                            target.fail(format!(
                                "indexing communications failed ({error}); restart the server"
                            ));
                            return;
                        }
                    }
                }
            })
            .map_err(StorageError::from)?
        };
        let shared = worker.share();
        Ok((
            ComplianceIndexer {
                index,
                facts,
                facts_sealed_at,
                worker,
            },
            IndexProgress {
                communications,
                worker: shared,
            },
        ))
    }
}

fn read_indexed_size(index: &dyn IndexStore) -> Result<u64, StorageError> {
    match index.get(INDEXED_SIZE)? {
        Some(bytes) => {
            Ok(u64::from_be_bytes(bytes.as_slice().try_into().map_err(
                |_| StorageError::Malformed("indexed size".into()),
            )?))
        }
        None => Ok(0),
    }
}

/// Moves the fact lists of a store from before they had a space of their own out of the
/// communication lists' `index`. Crash-safe in any step: the copy is durable, with the
/// watermark the facts had there, before anything is removed from `index`, and a copy
/// without its watermark is made again. (Fact lists that merely lost their watermark in a
/// crash, with no fact keys in `index`, are left to be indexed again from the start.)
fn move_facts_out(index: &dyn IndexStore, facts: &dyn IndexStore) -> Result<(), StorageError> {
    let (start, end) = (vec![b'F'], prefix_end(b"F"));
    if facts.get(INDEXED_SIZE)?.is_none()
        && !index.range(&start, &end, 1)?.is_empty()
        && let Some(indexed) = index.get(INDEXED_SIZE)?
    {
        // The writer applied an entry's facts before the communication lists could reach
        // it, and a crash keeps a prefix of applies: the facts there cover `indexed`.
        let mut from = start.clone();
        loop {
            let chunk = index.range(&from, &end, MOVE_CHUNK)?;
            let Some((last, _)) = chunk.last() else {
                break;
            };
            from = [last.as_slice(), &[0]].concat();
            let done = chunk.len() < MOVE_CHUNK;
            facts.apply(chunk.into_iter().map(|(k, v)| (k, Some(v))).collect())?;
            if done {
                break;
            }
        }
        facts.apply(vec![(INDEXED_SIZE.to_vec(), Some(indexed))])?;
        facts.flush()?;
        tracing::info!("fact lists moved to an index of their own");
    }
    loop {
        let chunk = index.range(&start, &end, MOVE_CHUNK)?;
        if chunk.is_empty() {
            return Ok(());
        }
        index.apply(chunk.into_iter().map(|(key, _)| (key, None)).collect())?;
    }
}

impl Indexer for ComplianceIndexer {
    /// Both kinds of lists cover the entries below this.
    fn indexed_size(&self) -> Result<u64, StorageError> {
        Ok(read_indexed_size(self.index.as_ref())?.min(read_indexed_size(self.facts.as_ref())?))
    }

    fn index(&mut self, entries: &[(u64, &[u8])]) -> Result<(), StorageError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for &(index, leaf) in entries {
            // Communications (skipped unread here): the following thread reads them.
            let Some(fact) = FactLeaf::decode(leaf)
                .map_err(|_| StorageError::Malformed(format!("entry {index} is not a LeafRecord")))?
                .fact
            else {
                continue;
            };
            let value = fact.encode_to_vec();
            let mut put = |dim, id: &str| {
                writes.push((fact_key(dim, id, index), Some(value.clone())));
            };
            match &fact.kind {
                Some(Kind::Party(party)) => put(FACT_BY_PARTY, &party.party_id),
                Some(Kind::ResellerRelationship(r)) => put(FACT_BY_CUSTOMER, &r.customer_id),
                Some(Kind::Subscription(s)) => {
                    put(FACT_BY_CUSTOMER, &s.customer_id);
                    put(FACT_BY_SUBSCRIPTION, &s.subscription_id);
                }
                // Listed under its subscription only: a question about a customer reads the
                // lists of every subscription the customer has had, whenever its
                // subscription fact was recorded (before or after the transfer).
                Some(Kind::Transfer(t)) => put(FACT_BY_SUBSCRIPTION, &t.subscription_id),
                Some(Kind::DirectAgreement(a)) => put(FACT_BY_CUSTOMER, &a.customer_id),
                None => {}
            }
        }
        let target = self.worker.shared();
        if let Some(reason) = target.failure() {
            return Err(StorageError::Backend(reason));
        }
        // The watermark goes with the facts, in the same apply: a crash keeps a prefix of
        // applies, so the facts below it are there.
        let size = last.0 + 1;
        writes.push((INDEXED_SIZE.to_vec(), Some(size.to_be_bytes().to_vec())));
        self.facts.apply(writes)?;
        if size >= self.facts_sealed_at + FACTS_SEAL_EVERY {
            self.facts.seal()?;
            self.facts_sealed_at = size;
        }
        let mut goal = target.lock();
        *goal = (*goal).max(size);
        drop(goal);
        target.notify();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CommunicationRecord, Fact, LeafRecord, Party, leaf_record};

    /// The keys from the partial decode are the ones the whole record gives.
    #[test]
    fn list_keys_from_the_partial_decode_match_the_whole_record() {
        let communication = CommunicationRecord {
            message_id: "m-1".into(),
            sender_id: "contoso".into(),
            customer_id: "c-alpha".into(),
            topic: 2,
            channel: "email".into(),
            sent_at: Some(prost_types::Timestamp {
                seconds: 1_767_225_600,
                nanos: 7,
            }),
            subject: "Renewal".into(),
            body_sha256: vec![9; 32],
            attributes: [("campaign".to_string(), "q1".to_string())].into(),
            subscription_id: "sub-a1".into(),
            product_id: String::new(),
            body_size: 300,
        };
        let leaf = LeafRecord {
            index: 41,
            prev_leaf_hash: vec![1; 32],
            recorded_at: Some(prost_types::Timestamp {
                seconds: 1_767_225_601,
                nanos: 0,
            }),
            submitted_by: "writer".into(),
            record: Some(leaf_record::Record::Communication(communication.clone())),
        }
        .encode_to_vec();
        let sent_at = timestamp(&communication.sent_at);
        assert_eq!(
            communication_keys(41, &leaf).unwrap(),
            vec![
                communication_key(COMMUNICATION_BY_TIME, "", sent_at, 41),
                communication_key(COMMUNICATION_BY_CUSTOMER, "c-alpha", sent_at, 41),
                communication_key(COMMUNICATION_BY_SENDER, "contoso", sent_at, 41),
                communication_key(COMMUNICATION_BY_SUBSCRIPTION, "sub-a1", sent_at, 41),
            ]
        );
        let fact = LeafRecord {
            index: 42,
            record: Some(leaf_record::Record::Fact(Fact {
                fact_id: "f-1".into(),
                effective_at: None,
                kind: Some(Kind::Party(Party {
                    party_id: "contoso".into(),
                    kind: 2,
                    display_name: "Contoso".into(),
                })),
            })),
            ..LeafRecord::default()
        }
        .encode_to_vec();
        assert!(communication_keys(42, &fact).unwrap().is_empty());
        // The writer's partial decode finds the fact, and nothing in a communication.
        let Some(Kind::Party(party)) = FactLeaf::decode(fact.as_slice())
            .unwrap()
            .fact
            .unwrap()
            .kind
        else {
            panic!("the party fact");
        };
        assert_eq!(party.display_name, "Contoso");
        assert!(FactLeaf::decode(leaf.as_slice()).unwrap().fact.is_none());
        assert!(communication_keys(43, b"\xff\xff\xff").is_err());
    }
}

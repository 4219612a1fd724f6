//! The access trail: who read what. Every read and query by an auditor or admin becomes a
//! record chained to the previous one
//! by SHA-256, so that a removed or edited record breaks the chain. Auditors of auditors
//! are a standard demand on communication archives.
//!
//! Records are appended to a file of their own ([`AccessFile`]) and made durable by a
//! background task within [`FLUSH_INTERVAL`]; a read fails rather than go unrecorded. Space
//! is kept allocated ahead of the records, so reads go on being recorded while another
//! process holds the rest of the disk; when that runs out too, recorded reads are refused
//! until space returns, and then served again without a restart.
//!
//! A chain shows a record removed or edited, but not the end of the trail cut off, nor
//! the whole trail removed: what is left still chains. So every checkpoint the ledger
//! signs anchors the trail's durable head ([`TrailAnchor`]: records, hash of the last),
//! and [`AccessLog::check_anchor`] finds a trail that no longer holds what was anchored —
//! at every start, and in `audit-ledger verify`.
//!
//! Reading the trail is itself a read by an admin, so the trail grows by one record per
//! page read. A listing ([`AccessLog::page`]) is therefore pinned, by its page token, to
//! the trail's size when its first page was asked for, as `ListViolations` is to the
//! ledger's tree size; otherwise paging to the end would never get there.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use sha2::{Digest, Sha256};

use crate::compliance::page_token::{PagePosition, PageTokens, fingerprint};
use crate::ledger::LedgerError;
use crate::ledger::merkle::Hash;
use crate::ledger::time::Timestamp;
use crate::ledger::{TrailAnchor, TrailHead};
use crate::proto::AccessRecord;
use crate::storage::{AccessFile, StorageError};

/// How often written access records are flushed to disk.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// What to record of one call.
pub struct Access<'a> {
    pub principal: &'a str,
    pub role: &'a str,
    pub method: &'a str,
    pub request: String,
    pub result_count: u64,
}

/// Page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page; larger requests are capped.
pub const MAX_PAGE_SIZE: usize = 1000;

/// One page of a listing of the trail.
#[derive(Debug)]
pub struct AccessPage {
    pub records: Vec<AccessRecord>,
    /// Where the next page starts; on the last page, the size the listing is pinned to.
    pub next_index: u64,
    /// Empty on the last page.
    pub next_page_token: String,
    /// The trail size the listing is pinned to: no record at or past it is listed.
    pub trail_size: u64,
}

/// Where a listing of the access trail starts and what it is pinned to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listing {
    /// The first record of the listing.
    pub start_index: u64,
    /// List only records below this trail size; 0 pins the listing to the trail's size
    /// when its first page is read. A client paging by index passes the first page's
    /// `trail_size` back here, so that its listing ends although each call is recorded.
    pub as_of_trail_size: u64,
}

struct Tip {
    size: u64,
    hash: [u8; 32],
}

/// The hash-chained access log.
#[derive(Clone)]
pub struct AccessLog {
    file: Arc<AccessFile>,
    tip: Arc<Mutex<Tip>>,
    /// The head of what is on disk (as of the last flush): what checkpoints may anchor.
    durable: Arc<Mutex<TrailAnchor>>,
}

/// Records read per step when the whole chain is checked.
const VERIFY_CHUNK: usize = 4096;

fn record_hash(record: &AccessRecord) -> [u8; 32] {
    let unhashed = AccessRecord {
        record_hash: Vec::new(),
        ..record.clone()
    };
    Sha256::digest(unhashed.encode_to_vec()).into()
}

/// A trail that does not hold what a checkpoint anchors.
#[derive(Debug, thiserror::Error)]
pub enum TrailMismatch {
    #[error(
        "the access log holds {records} records but the checkpoint at size {size} anchors {anchored}: records were removed from the access trail"
    )]
    Short {
        records: u64,
        anchored: u64,
        size: u64,
    },
    #[error(
        "access record {index} is not the one the checkpoint at size {size} anchors: the access trail was altered or replaced"
    )]
    Differs { index: u64, size: u64 },
    /// The message says the storage error, so it is not a `source()` too (the chain
    /// would say it twice).
    #[error("the access log cannot be read: {0}")]
    Unreadable(StorageError),
}

impl From<StorageError> for TrailMismatch {
    fn from(error: StorageError) -> Self {
        TrailMismatch::Unreadable(error)
    }
}

/// The first broken link of a chain.
#[derive(Debug, thiserror::Error)]
#[error("access record {index}: {problem}")]
pub struct BrokenChain {
    pub index: u64,
    pub problem: String,
}

impl AccessLog {
    /// Opens the log kept in `file` and finds its tip.
    pub fn open(file: AccessFile) -> Result<AccessLog, StorageError> {
        let tip = match file.last()? {
            Some(value) => {
                let record = AccessRecord::decode(value.as_slice())
                    .map_err(|_| StorageError::Malformed("access record".into()))?;
                Tip {
                    size: record.index + 1,
                    hash: record
                        .record_hash
                        .as_slice()
                        .try_into()
                        .map_err(|_| StorageError::Malformed("access record hash".into()))?,
                }
            }
            None => Tip {
                size: 0,
                hash: [0u8; 32],
            },
        };
        // What was written before this open is made durable now, so that it may be anchored.
        file.sync()?;
        let durable = TrailAnchor {
            records: tip.size,
            head: Hash(tip.hash),
        };
        Ok(AccessLog {
            file: Arc::new(file),
            tip: Arc::new(Mutex::new(tip)),
            durable: Arc::new(Mutex::new(durable)),
        })
    }

    /// Whether the trail holds what `anchor`, from the checkpoint for tree size `size`,
    /// commits to: at least as many records, the last of them the one anchored. O(1): the
    /// records before it are vouched for by the chain, which `verify` checks.
    pub fn check_anchor(&self, anchor: &TrailAnchor, size: u64) -> Result<(), TrailMismatch> {
        let records = self.file.count();
        if records < anchor.records {
            return Err(TrailMismatch::Short {
                records,
                anchored: anchor.records,
                size,
            });
        }
        let Some(index) = anchor.records.checked_sub(1) else {
            return Ok(());
        };
        let value = self.file.read(index, 1)?.pop().ok_or_else(|| {
            TrailMismatch::Unreadable(StorageError::Malformed(format!("access record {index}")))
        })?;
        let anchored = AccessRecord::decode(value.as_slice()).is_ok_and(|record| {
            record.index == index
                && record.record_hash == anchor.head.0
                && record_hash(&record) == anchor.head.0
        });
        if anchored {
            Ok(())
        } else {
            Err(TrailMismatch::Differs { index, size })
        }
    }

    /// Keeps `bytes` allocated ahead of the records (see the module docs).
    pub fn reserve(&self, bytes: u64) {
        self.file.reserve(bytes);
    }

    /// Appends one record.
    pub fn record(&self, access: Access<'_>) -> Result<(), StorageError> {
        let mut tip = self.tip.lock().expect("access log lock");
        let now = Timestamp::now();
        let mut record = AccessRecord {
            index: tip.size,
            prev_hash: tip.hash.to_vec(),
            at: Some(prost_types::Timestamp {
                seconds: now.seconds,
                nanos: now.nanos,
            }),
            principal: access.principal.to_owned(),
            role: access.role.to_owned(),
            method: access.method.to_owned(),
            request: access.request,
            result_count: access.result_count,
            record_hash: Vec::new(),
        };
        let hash = record_hash(&record);
        record.record_hash = hash.to_vec();
        self.file.append(&record.encode_to_vec())?;
        tip.size += 1;
        tip.hash = hash;
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.tip.lock().expect("access log lock").size
    }

    /// One page of the listing that starts at `listing.start_index`: the first
    /// (`page_token` empty) pins the listing to `listing.as_of_trail_size`, or when that is 0
    /// to the trail's current size, before this call is recorded; each later page continues
    /// from its token and never goes past that size, so the listing ends even though every
    /// page read adds a record. A start or a pinned size past the trail is out of range.
    pub fn page(
        &self,
        tokens: &PageTokens,
        listing: Listing,
        page_size: i32,
        page_token: &str,
    ) -> Result<AccessPage, LedgerError> {
        let page_size = match page_size {
            size if size < 0 => {
                return Err(LedgerError::invalid("page_size", "must not be negative"));
            }
            0 => DEFAULT_PAGE_SIZE,
            size => (size as usize).min(MAX_PAGE_SIZE),
        };
        let Listing {
            start_index,
            as_of_trail_size,
        } = listing;
        // A token continues only the listing it came from (not another listing's, nor
        // one from another start or pinned to another size).
        let fingerprint = fingerprint(&[
            b"access log",
            &start_index.to_be_bytes(),
            &as_of_trail_size.to_be_bytes(),
        ]);
        let (size, from) = if page_token.is_empty() {
            let current = self.size();
            let size = match as_of_trail_size {
                0 => current,
                size if size > current => {
                    return Err(LedgerError::out_of_range(
                        "as_of_trail_size",
                        format!("{size} is past the trail's current size {current}"),
                    ));
                }
                size => size,
            };
            if start_index > size {
                return Err(LedgerError::out_of_range(
                    "start_index",
                    format!("{start_index} is past the trail's size {size}"),
                ));
            }
            (size, start_index)
        } else {
            let position = tokens.check(page_token, fingerprint).map_err(|_| {
                LedgerError::invalid(
                    "page_token",
                    "was not issued by this server for a listing from this start_index and as_of_trail_size",
                )
            })?;
            (position.tree_size, position.index)
        };
        let records = self.list(from, size, page_size)?;
        let next_index = records
            .last()
            .map_or(from.max(size), |record| record.index + 1);
        let next_page_token = if next_index < size {
            tokens.issue(fingerprint, PagePosition::in_order(size, next_index))
        } else {
            String::new()
        };
        Ok(AccessPage {
            records,
            next_index,
            next_page_token,
            trail_size: size,
        })
    }

    /// Records from `start` below `end`, at most `limit`.
    fn list(&self, start: u64, end: u64, limit: usize) -> Result<Vec<AccessRecord>, StorageError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let limit = limit.min(usize::try_from(end - start).unwrap_or(usize::MAX));
        self.file
            .read(start, limit)?
            .into_iter()
            .map(|value| {
                AccessRecord::decode(value.as_slice())
                    .map_err(|_| StorageError::Malformed("access record".into()))
            })
            .collect()
    }

    /// Checks the whole chain; returns its length.
    pub fn verify(&self) -> Result<u64, BrokenChain> {
        let mut prev = [0u8; 32];
        let mut expected = 0u64;
        loop {
            let values = self
                .file
                .read(expected, VERIFY_CHUNK)
                .map_err(|error| BrokenChain {
                    index: expected,
                    problem: error.to_string(),
                })?;
            if values.is_empty() {
                return Ok(expected);
            }
            for value in values {
                let broken = |problem: &str| BrokenChain {
                    index: expected,
                    problem: problem.to_owned(),
                };
                let record = AccessRecord::decode(value.as_slice())
                    .map_err(|_| broken("not an AccessRecord"))?;
                if record.index != expected {
                    return Err(broken("missing (the chain has a gap)"));
                }
                if record.prev_hash != prev {
                    return Err(broken("does not link to the previous record"));
                }
                if record.record_hash != record_hash(&record) {
                    return Err(broken("its content does not match its hash"));
                }
                prev = record_hash(&record);
                expected += 1;
            }
        }
    }

    /// Flushes written records to disk; what they end with may then be anchored.
    pub fn flush(&self) -> Result<(), StorageError> {
        let head = {
            let tip = self.tip.lock().expect("access log lock");
            TrailAnchor {
                records: tip.size,
                head: Hash(tip.hash),
            }
        };
        self.file.sync()?;
        *self.durable.lock().expect("durable head lock") = head;
        Ok(())
    }

    /// Flushes every [`FLUSH_INTERVAL`] until the returned task is aborted.
    pub fn spawn_flusher(&self) -> tokio::task::JoinHandle<()> {
        let log = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(FLUSH_INTERVAL);
            let mut flushed = log.size();
            loop {
                interval.tick().await;
                let size = log.size();
                if size != flushed {
                    // Inline, not on the blocking pool: when the task is aborted at shutdown
                    // nothing may keep the store open behind it.
                    match log.flush() {
                        Ok(()) => flushed = size,
                        Err(error) => tracing::error!(%error, "access log flush failed"),
                    }
                }
            }
        })
    }
}

impl TrailHead for AccessLog {
    fn durable_head(&self) -> TrailAnchor {
        *self.durable.lock().expect("durable head lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::access_file::ACCESS_FILE;

    fn log_of(dir: &std::path::Path, principal: &str, reads: u64) -> AccessLog {
        let log = AccessLog::open(AccessFile::open(&dir.join(ACCESS_FILE)).unwrap()).unwrap();
        for n in 0..reads {
            log.record(Access {
                principal,
                role: "auditor",
                method: "/audit.ledger.v1.LedgerService/GetEntry",
                request: format!("index={n}"),
                result_count: 1,
            })
            .unwrap();
        }
        log
    }

    #[test]
    fn a_trail_meets_an_anchor_only_while_it_holds_the_anchored_record() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of(dir.path(), "compliance-tool", 3);
        assert_eq!(log.durable_head().records, 0, "nothing flushed yet");
        log.flush().unwrap();
        let anchor = log.durable_head();
        assert_eq!(anchor.records, 3);
        log_of(dir.path(), "compliance-tool", 0)
            .check_anchor(&anchor, 7)
            .unwrap();
        // More records than anchored: the anchor still holds.
        log_of(dir.path(), "compliance-tool", 2)
            .check_anchor(&anchor, 7)
            .unwrap();
        // Another trail as long (another principal's reads) does not.
        let other = tempfile::tempdir().unwrap();
        let error = log_of(other.path(), "someone-else", 3)
            .check_anchor(&anchor, 7)
            .unwrap_err();
        assert!(
            matches!(error, TrailMismatch::Differs { index: 2, size: 7 }),
            "{error}"
        );
        // A shorter one does not either; the empty anchor holds for any trail.
        let error = log_of(other.path(), "x", 0)
            .check_anchor(
                &TrailAnchor {
                    records: 9,
                    ..anchor
                },
                7,
            )
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the access log holds 3 records but the checkpoint at size 7 anchors 9: records were removed from the access trail"
        );
        let empty = TrailAnchor {
            records: 0,
            head: Hash([0; 32]),
        };
        log_of(other.path(), "x", 0)
            .check_anchor(&empty, 7)
            .unwrap();
    }

    fn read(log: &AccessLog, n: u64) {
        log.record(Access {
            principal: "ops",
            role: "admin",
            method: "/audit.ledger.v1.AccessLogService/ListAccessLog",
            request: format!("read {n}"),
            result_count: n,
        })
        .unwrap();
    }

    /// A trail of five reads in a temporary directory (kept alive by the first value), and
    /// the page tokens to list it with.
    fn trail_of_five_reads() -> (tempfile::TempDir, AccessLog, PageTokens) {
        let dir = tempfile::tempdir().unwrap();
        let log =
            AccessLog::open(AccessFile::open(&dir.path().join(ACCESS_FILE)).unwrap()).unwrap();
        for n in 0..5 {
            read(&log, n);
        }
        (dir, log, PageTokens::new(b"secret"))
    }

    #[test]
    fn a_listing_ends_at_the_size_its_first_page_saw() {
        let (_dir, log, tokens) = trail_of_five_reads();
        let mut seen = Vec::new();
        let mut token = String::new();
        for _ in 0..10 {
            let page = log.page(&tokens, from(1), 2, &token).unwrap();
            // Each page read is recorded, as the service does.
            read(&log, 99);
            seen.extend(page.records.iter().map(|record| record.index));
            token = page.next_page_token;
            if token.is_empty() {
                assert_eq!(page.next_index, 5);
                break;
            }
        }
        assert!(token.is_empty(), "the listing did not end");
        assert_eq!(seen, [1, 2, 3, 4]);

        // A token continues only its own listing.
        let first = log.page(&tokens, from(0), 2, "").unwrap();
        for (start, token) in [(1, first.next_page_token.as_str()), (0, "forged")] {
            let error = log.page(&tokens, from(start), 2, token).unwrap_err();
            assert!(error.to_string().starts_with("page_token"), "{error}");
        }
        let error = log.page(&tokens, from(0), -1, "").unwrap_err();
        assert!(error.to_string().starts_with("page_size"), "{error}");
        // At the end: empty, and done; past it: out of range.
        let size = log.size();
        let end = log.page(&tokens, from(size), 0, "").unwrap();
        assert!(end.records.is_empty() && end.next_page_token.is_empty());
        assert_eq!((end.next_index, end.trail_size), (size, size));
        let past = log.page(&tokens, from(size + 1), 0, "").unwrap_err();
        assert!(matches!(past, LedgerError::OutOfRange { .. }), "{past}");
        assert!(past.to_string().starts_with("start_index"), "{past}");
    }

    fn from(start_index: u64) -> Listing {
        Listing {
            start_index,
            as_of_trail_size: 0,
        }
    }

    /// Paging by index (no tokens) ends when each call passes back the first page's
    /// `trail_size`, though every call is recorded; without it, it would never end.
    #[test]
    fn paging_by_index_ends_at_the_pinned_size() {
        let (_dir, log, tokens) = trail_of_five_reads();
        let mut listing = from(0);
        let mut seen = Vec::new();
        for _ in 0..10 {
            let page = log.page(&tokens, listing, 2, "").unwrap();
            read(&log, 99);
            if page.records.is_empty() {
                break;
            }
            seen.extend(page.records.iter().map(|record| record.index));
            listing = Listing {
                start_index: page.next_index,
                as_of_trail_size: page.trail_size,
            };
        }
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        let error = log
            .page(
                &tokens,
                Listing {
                    start_index: 0,
                    as_of_trail_size: log.size() + 1,
                },
                2,
                "",
            )
            .unwrap_err();
        assert!(error.to_string().starts_with("as_of_trail_size"), "{error}");
    }
}

//! Compliance answers over the ledger: recorded facts, `CheckSender`, violations and
//! communication search. Verdicts are derived from the facts on every question, never
//! stored as truth; the indexes in [`index`] only find the facts and communications fast,
//! and can be rebuilt from the ledger alone.

pub mod index;
pub mod page_token;
mod request;

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;

use crate::ledger::time::Timestamp;
use crate::ledger::{Ledger, LedgerError, StoredEntry};
use crate::policy::{self, Assessment, Question, RecordedFact, Rule, Verdict};
use crate::proto::{self, CommunicationRecord, LeafRecord, leaf_record};
use crate::records::communication::question;
use crate::records::fact::to_policy;
use crate::storage::IndexStore;
use index::{
    COMMUNICATION_BY_CUSTOMER, COMMUNICATION_BY_SENDER, COMMUNICATION_BY_SUBSCRIPTION,
    COMMUNICATION_BY_TIME, FACT_BY_CUSTOMER, FACT_BY_PARTY, FACT_BY_SUBSCRIPTION, encode_instant,
    list_prefix, position_of_key, prefix_end,
};
use page_token::{PagePosition, PageTokens, fingerprint};

/// Fact lists already read, by list prefix: `(ledger index, fact)`.
type FactLists = HashMap<Vec<u8>, Vec<(u64, proto::Fact)>>;

/// Paging limits.
#[derive(Debug, Clone)]
pub struct QueryLimits {
    /// Page size when the request says 0.
    pub default_page_size: usize,
    /// Largest page; larger requests are capped.
    pub max_page_size: usize,
    /// Most candidates one page examines before it returns (possibly short, with a token),
    /// so a selective query over a large ledger cannot hold a request for long.
    pub max_scan_per_page: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            default_page_size: 100,
            max_page_size: 1000,
            max_scan_per_page: 20_000,
        }
    }
}

/// Filters of `ListCommunications`; empty strings and `None` match everything.
#[derive(Debug, Clone, Default)]
pub struct CommunicationFilter {
    pub customer_id: String,
    pub sender_id: String,
    /// A proto `Topic` value; 0 (unspecified) matches every topic.
    pub topic: i32,
    pub subscription_id: String,
    /// The non-CSP product (no index: filtered on the candidates of another list).
    pub product_id: String,
    /// sent_at from (inclusive) ...
    pub from: Option<Timestamp>,
    /// ... to (exclusive).
    pub to: Option<Timestamp>,
}

/// Which verdicts a violations listing keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerdictsWanted {
    #[default]
    Violations,
    Reviews,
    ViolationsAndReviews,
}

impl VerdictsWanted {
    fn wants(self, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Violation => self != VerdictsWanted::Reviews,
            Verdict::Review => self != VerdictsWanted::Violations,
            Verdict::Allowed => false,
        }
    }

    /// How a page token's fingerprint tells them apart (0 and 1 as the `include_review`
    /// flag that came before, so tokens issued before stay valid).
    fn code(self) -> u8 {
        match self {
            VerdictsWanted::Violations => 0,
            VerdictsWanted::ViolationsAndReviews => 1,
            VerdictsWanted::Reviews => 2,
        }
    }
}

/// Filters of `ListViolations`.
#[derive(Debug, Clone, Default)]
pub struct ViolationFilter {
    pub communications: CommunicationFilter,
    pub rule: Option<Rule>,
    pub verdicts: VerdictsWanted,
    pub as_of_tree_size: u64,
}

/// An answer with what it was judged at — the business instant and the ledger size — so
/// that it can be reproduced from itself alone.
#[derive(Debug, Clone)]
pub struct Answer {
    pub assessment: Assessment,
    /// The business instant judged (`Question::at`).
    pub at: Timestamp,
    /// Only facts at ledger indices below this counted.
    pub tree_size: u64,
}

/// One page of results.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The ledger size every item was judged at (pinned by the first page).
    pub tree_size: u64,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// A recorded communication with its verdict.
pub type Judged = (StoredEntry, Answer);

/// Entries read from an index per step of a scan.
const SCAN_CHUNK: usize = 256;

/// The compliance side of the ledger.
#[derive(Clone)]
pub struct Compliance {
    ledger: Ledger,
    /// The communication lists.
    index: Arc<dyn IndexStore>,
    /// The fact lists.
    facts: Arc<dyn IndexStore>,
    progress: index::IndexProgress,
    tokens: PageTokens,
    limits: QueryLimits,
}

/// How long a communication listing waits for the indexes to reach the published size.
const INDEX_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

impl Compliance {
    pub fn new(
        ledger: Ledger,
        index: Arc<dyn IndexStore>,
        facts: Arc<dyn IndexStore>,
        progress: index::IndexProgress,
        token_secret: &[u8],
        limits: QueryLimits,
    ) -> Self {
        Compliance {
            ledger,
            index,
            facts,
            progress,
            tokens: PageTokens::new(token_secret),
            limits,
        }
    }

    /// Waits until the communication lists cover every published entry, so that a listing
    /// started now sees all of them (fact lists always do).
    pub async fn communications_ready(&self) -> Result<(), LedgerError> {
        self.progress
            .communications_indexed(self.ledger.tree_size(), INDEX_PATIENCE)
            .await
            .map_err(LedgerError::Unavailable)
    }

    /// The ledger size an `as_of_tree_size` stands for: 0 is the current size.
    pub fn tree_size_as_of(&self, as_of_tree_size: u64) -> Result<u64, LedgerError> {
        let current = self.ledger.tree_size();
        match as_of_tree_size {
            0 => Ok(current),
            size if size > current => Err(LedgerError::size_past_the_tree(
                "as_of_tree_size",
                size,
                current,
            )),
            size => Ok(size),
        }
    }

    /// The recorded facts `question` can rest on, at indices below `tree_size`: the
    /// sender's party facts, the customer's facts (relationships, agreements, its
    /// subscriptions' facts), every fact of the named subscription (its transfers, and any
    /// later fact that moved it elsewhere) and, when the rules read them
    /// ([`Question::reads_every_subscription`]), every fact of each subscription the customer
    /// has had. Prefix scans of index lists, independent of ledger size. Each list is taken
    /// from `lists` (lists read at `tree_size`), read and kept there when it is not held yet.
    ///
    /// Whether a subscription is the customer's at the question's instant, and so whether
    /// anything reached through it counts, is the policy's to decide
    /// ([`policy::Snapshot::subscription_of`]); this only gathers.
    fn facts_from(
        &self,
        question: &Question,
        tree_size: u64,
        lists: &mut FactLists,
    ) -> Result<Vec<RecordedFact>, LedgerError> {
        let customer = list_prefix(b'F', FACT_BY_CUSTOMER, &question.customer_id);
        let mut prefixes = vec![
            list_prefix(b'F', FACT_BY_PARTY, &question.sender_id),
            customer.clone(),
        ];
        let mut subscriptions: Vec<&str> = Vec::new();
        if question.reads_every_subscription() {
            self.read_list(&customer, tree_size, lists)?;
            subscriptions.extend(lists[&customer].iter().filter_map(
                |(_, fact)| match &fact.kind {
                    Some(proto::fact::Kind::Subscription(s)) => Some(s.subscription_id.as_str()),
                    _ => None,
                },
            ));
        }
        if !question.subscription_id.is_empty() {
            subscriptions.push(&question.subscription_id);
        }
        subscriptions.sort_unstable();
        subscriptions.dedup();
        prefixes.extend(
            subscriptions
                .into_iter()
                .map(|s| list_prefix(b'F', FACT_BY_SUBSCRIPTION, s)),
        );
        let mut facts: Vec<RecordedFact> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for prefix in prefixes {
            self.read_list(&prefix, tree_size, lists)?;
            for (index, fact) in &lists[&prefix] {
                // A fact can be listed under several keys (e.g. a subscription under its
                // customer and itself); count it once.
                if seen.insert(*index) {
                    facts.extend(to_policy(*index, fact));
                }
            }
        }
        Ok(facts)
    }

    /// Reads the list under `prefix` into `lists` unless it is held already.
    fn read_list(
        &self,
        prefix: &[u8],
        tree_size: u64,
        lists: &mut FactLists,
    ) -> Result<(), LedgerError> {
        if !lists.contains_key(prefix) {
            let list = self.fact_list(prefix, tree_size)?;
            lists.insert(prefix.to_vec(), list);
        }
        Ok(())
    }

    /// The facts of one index list at indices below `tree_size`, decoded.
    fn fact_list(
        &self,
        prefix: &[u8],
        tree_size: u64,
    ) -> Result<Vec<(u64, proto::Fact)>, LedgerError> {
        let mut list = Vec::new();
        for (key, value) in self.facts.range(prefix, &prefix_end(prefix), usize::MAX)? {
            let Some(index) = index::index_of_key(&key) else {
                continue;
            };
            if index >= tree_size {
                continue;
            }
            let fact = proto::Fact::decode(value.as_slice()).map_err(|_| {
                LedgerError::Integrity(format!("the index holds an undecodable fact {index}"))
            })?;
            list.push((index, fact));
        }
        Ok(list)
    }

    /// Judges a question on the facts recorded below `as_of_tree_size` (0: all so far).
    pub fn check(&self, question: &Question, as_of_tree_size: u64) -> Result<Answer, LedgerError> {
        let tree_size = self.tree_size_as_of(as_of_tree_size)?;
        self.answer(question, tree_size, &mut FactLists::new())
    }

    /// [`Compliance::assess_from`] with what it judged at.
    fn answer(
        &self,
        question: &Question,
        tree_size: u64,
        lists: &mut FactLists,
    ) -> Result<Answer, LedgerError> {
        Ok(Answer {
            assessment: self.assess_from(question, tree_size, lists)?,
            at: question.at,
            tree_size,
        })
    }

    /// Judges `question` on the facts below `tree_size`, its fact lists taken from `lists`
    /// (and kept there when read).
    fn assess_from(
        &self,
        question: &Question,
        tree_size: u64,
        lists: &mut FactLists,
    ) -> Result<Assessment, LedgerError> {
        let facts = self.facts_from(question, tree_size, lists)?;
        Ok(policy::assess(question, &facts))
    }

    /// Judges many questions on every fact recorded so far, all at one tree size, reading
    /// each fact list once: a batch's communications share senders, and often customers
    /// and subscriptions.
    pub fn check_many(&self, questions: &[Question]) -> Result<Vec<Answer>, LedgerError> {
        let tree_size = self.ledger.tree_size();
        let mut lists = FactLists::new();
        questions
            .iter()
            .map(|question| self.answer(question, tree_size, &mut lists))
            .collect()
    }

    pub fn list_communications(
        &self,
        filter: &CommunicationFilter,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<StoredEntry>, LedgerError> {
        let filters = fingerprint(&[b"communications", &filter_bytes(filter)]);
        let (page_size, position) = self.page_start(page_size, page_token, filters)?;
        let tree_size = match position {
            Some(position) => position.tree_size,
            None => self.ledger.tree_size(),
        };
        let (items, next) = self.scan(filter, tree_size, position, page_size, |entry, _| {
            Ok(Some(entry))
        })?;
        Ok(Page {
            items,
            tree_size,
            next_page_token: next
                .map(|next| self.tokens.issue(filters, next))
                .unwrap_or_default(),
        })
    }

    pub fn list_violations(
        &self,
        filter: &ViolationFilter,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<Judged>, LedgerError> {
        let mut described = filter_bytes(&filter.communications);
        described.extend_from_slice(filter.rule.map_or("", |rule| rule.name()).as_bytes());
        described.push(filter.verdicts.code());
        described.extend_from_slice(&filter.as_of_tree_size.to_be_bytes());
        let filters = fingerprint(&[b"violations", &described]);
        let (page_size, position) = self.page_start(page_size, page_token, filters)?;
        let tree_size = match position {
            Some(position) => position.tree_size,
            None => self.tree_size_as_of(filter.as_of_tree_size)?,
        };
        // Each fact list read once per page (as for a batch at ingestion).
        let mut lists = FactLists::new();
        let (items, next) = self.scan(
            &filter.communications,
            tree_size,
            position,
            page_size,
            |entry, record| {
                let Some(question) = question(record) else {
                    return Ok(None);
                };
                let answer = self.answer(&question, tree_size, &mut lists)?;
                let assessment = &answer.assessment;
                let wanted = filter.verdicts.wants(assessment.verdict)
                    && filter.rule.is_none_or(|rule| rule == assessment.rule);
                Ok(wanted.then_some((entry, answer)))
            },
        )?;
        Ok(Page {
            items,
            tree_size,
            next_page_token: next
                .map(|next| self.tokens.issue(filters, next))
                .unwrap_or_default(),
        })
    }

    fn page_start(
        &self,
        page_size: i32,
        page_token: &str,
        filters: [u8; 16],
    ) -> Result<(usize, Option<PagePosition>), LedgerError> {
        let page_size = match page_size {
            size if size < 0 => {
                return Err(LedgerError::invalid("page_size", "must not be negative"));
            }
            0 => self.limits.default_page_size,
            size => (size as usize).min(self.limits.max_page_size),
        };
        if page_token.is_empty() {
            return Ok((page_size, None));
        }
        let position = self.tokens.check(page_token, filters).map_err(|_| {
            LedgerError::invalid(
                "page_token",
                "was not issued by this server for a request with these filters",
            )
        })?;
        Ok((page_size, Some(position)))
    }

    /// Walks the best index for `filter` in sent_at order from `position`, keeping what
    /// `visit` returns, until a page is full, the scan budget is spent or the list ends.
    /// A position to go on from comes back only when the listing may go on (AIP-158): a
    /// full page looks on for one more result and resumes the next page at it, so a page
    /// that ends the listing says so even when it is full.
    fn scan<T>(
        &self,
        filter: &CommunicationFilter,
        tree_size: u64,
        position: Option<PagePosition>,
        page_size: usize,
        mut visit: impl FnMut(StoredEntry, &CommunicationRecord) -> Result<Option<T>, LedgerError>,
    ) -> Result<(Vec<T>, Option<PagePosition>), LedgerError> {
        let (dim, id) = if !filter.customer_id.is_empty() {
            (COMMUNICATION_BY_CUSTOMER, filter.customer_id.as_str())
        } else if !filter.subscription_id.is_empty() {
            (
                COMMUNICATION_BY_SUBSCRIPTION,
                filter.subscription_id.as_str(),
            )
        } else if !filter.sender_id.is_empty() {
            (COMMUNICATION_BY_SENDER, filter.sender_id.as_str())
        } else {
            (COMMUNICATION_BY_TIME, "")
        };
        let prefix = list_prefix(b'C', dim, id);
        let at = |instant: &[u8], index: Option<u64>| {
            let mut key = prefix.clone();
            key.extend_from_slice(instant);
            if let Some(index) = index {
                key.extend_from_slice(&index.to_be_bytes());
            }
            key
        };
        let mut start = match (position, filter.from) {
            (Some(position), _) => at(&position.instant, Some(position.index)),
            (None, Some(from)) => at(&encode_instant(from), None),
            (None, None) => prefix.clone(),
        };
        let end = match filter.to {
            Some(to) => at(&encode_instant(to), None),
            None => prefix_end(&prefix),
        };

        let mut items = Vec::new();
        let mut scanned = 0usize;
        loop {
            let chunk = self.index.range(&start, &end, SCAN_CHUNK)?;
            let chunk_len = chunk.len();
            for (key, _) in chunk {
                let Some((instant, index)) = position_of_key(&key) else {
                    continue;
                };
                // This candidate, where the next page resumes if this one stops here.
                let here = PagePosition {
                    tree_size,
                    instant,
                    index,
                };
                if scanned >= self.limits.max_scan_per_page {
                    return Ok((items, Some(here)));
                }
                scanned += 1;
                start = at(&instant, Some(index + 1));
                // Entries at or past the tree size (not yet published, or after an
                // as_of_tree_size) do not exist for this listing.
                if index >= tree_size {
                    continue;
                }
                let entry = self.ledger.entry(index)?;
                let Some(record) = communication_record(&entry) else {
                    continue;
                };
                if !matches(filter, &record) {
                    continue;
                }
                if let Some(item) = visit(entry, &record)? {
                    if items.len() == page_size {
                        // One result past a full page: the listing goes on, from here.
                        return Ok((items, Some(here)));
                    }
                    items.push(item);
                }
            }
            if chunk_len < SCAN_CHUNK {
                return Ok((items, None));
            }
        }
    }
}

fn communication_record(entry: &StoredEntry) -> Option<CommunicationRecord> {
    match LeafRecord::decode(entry.leaf.as_slice()).ok()?.record? {
        leaf_record::Record::Communication(record) => Some(record),
        leaf_record::Record::Fact(_) => None,
    }
}

fn matches(filter: &CommunicationFilter, record: &CommunicationRecord) -> bool {
    (filter.customer_id.is_empty() || filter.customer_id == record.customer_id)
        && (filter.sender_id.is_empty() || filter.sender_id == record.sender_id)
        && (filter.subscription_id.is_empty() || filter.subscription_id == record.subscription_id)
        && (filter.product_id.is_empty() || filter.product_id == record.product_id)
        && (filter.topic == 0 || filter.topic == record.topic)
}

fn filter_bytes(filter: &CommunicationFilter) -> Vec<u8> {
    let instant = |at: Option<Timestamp>| at.map(encode_instant).unwrap_or([0xff; 12]);
    let mut out = Vec::new();
    for part in [
        &filter.customer_id,
        &filter.sender_id,
        &filter.subscription_id,
    ] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(&filter.topic.to_be_bytes());
    out.extend_from_slice(&instant(filter.from));
    out.extend_from_slice(&instant(filter.to));
    // Only when set, so that the tokens of listings without it stay valid.
    if !filter.product_id.is_empty() {
        out.extend_from_slice(&(filter.product_id.len() as u32).to_be_bytes());
        out.extend_from_slice(filter.product_id.as_bytes());
    }
    out
}

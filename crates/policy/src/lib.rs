//! Who may send what to whom, and when: the decision table of docs/COMPLIANCE.md as pure functions.
//!
//! No I/O, no gRPC types: [`assess`] takes a question and the recorded facts that concern it
//! (the caller may pass more; facts effective after the question's instant are ignored) and
//! returns a verdict, the rule that decided and the ledger indices of the facts it rested on,
//! so that anyone holding those entries can re-derive the answer.

pub mod facts;
pub mod rules;

pub use facts::{Fact, PartyKind, RecordedFact, Snapshot, TransferState};
pub use rules::{RULES, Rule, assess};

use audit_ledger_primitives::time::Timestamp;

/// Version of the rule table that decides, reported with every assessment. Bump it when a
/// rule's meaning changes, so that stored answers can be told apart.
pub const POLICY_VERSION: &str = "domain-table/2";

/// What a communication is about (docs/COMPLIANCE.md "The model").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Commercial,
    Support,
    Operational,
    Transition,
    General,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Violation,
    /// The rules do not decide; a person must.
    Review,
}

/// "Was this sender allowed to contact this customer about this at that time?"
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub sender_id: String,
    pub customer_id: String,
    pub topic: Topic,
    /// The CSP subscription the communication is about (empty: none).
    pub subscription_id: String,
    /// The non-CSP product the communication is about (empty: none).
    pub product_id: String,
    pub at: Timestamp,
}

impl Question {
    /// Whether the rules read the customer's subscriptions other than the one named: only
    /// row 12 does (transition talk about any of the customer's transfers in progress), so
    /// only for `TRANSITION`. [`assess`] reads them on that condition alone, and a caller
    /// gathering facts may skip them otherwise.
    pub fn reads_every_subscription(&self) -> bool {
        self.topic == Topic::Transition
    }
}

/// The answer, with what it rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    pub verdict: Verdict,
    pub rule: Rule,
    pub explanation: String,
    /// Ledger indices of the facts the verdict rested on, ascending.
    pub evidence: Vec<u64>,
}

#[cfg(test)]
mod tests;

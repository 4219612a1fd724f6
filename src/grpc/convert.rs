//! Conversions between proto messages and the core's types.

use crate::compliance::Answer;
use crate::ledger::StoredEntry;
use crate::ledger::time::Timestamp;
use crate::policy::{self, POLICY_VERSION};
use crate::proto::{self, Entry, LeafRecord};
use prost::Message;

pub fn entry_message(entry: StoredEntry) -> Entry {
    // Stored leaves were encoded by this server; one that no longer decodes is reported
    // as-is (leaf bytes intact) with no decoded record, rather than hidden.
    let record = LeafRecord::decode(entry.leaf.as_slice()).ok();
    Entry {
        index: entry.index,
        leaf: entry.leaf,
        leaf_hash: entry.leaf_hash.0.to_vec(),
        body: entry.body,
        record,
    }
}

pub fn assessment_message(answer: Answer) -> proto::Assessment {
    let Answer {
        assessment,
        at,
        tree_size,
    } = answer;
    proto::Assessment {
        verdict: match assessment.verdict {
            policy::Verdict::Allowed => proto::Verdict::Allowed,
            policy::Verdict::Violation => proto::Verdict::Violation,
            policy::Verdict::Review => proto::Verdict::Review,
        } as i32,
        rule: assessment.rule.name().to_owned(),
        explanation: assessment.explanation,
        evidence: assessment.evidence,
        tree_size,
        policy_version: POLICY_VERSION.to_owned(),
        at: Some(prost_types::Timestamp {
            seconds: at.seconds,
            nanos: at.nanos,
        }),
    }
}

pub fn timestamp(at: &prost_types::Timestamp) -> Timestamp {
    Timestamp {
        seconds: at.seconds,
        nanos: at.nanos,
    }
}

//! A leaf described for people: the named, plain-text columns that the client prints and
//! that exports carry beside the leaf bytes. Everything here is derived from the leaf alone,
//! so a verifier can re-derive the columns and notice any that were edited.

use prost::Message;

use crate::ledger::leaf::decode_header;
use crate::proto::{self, LeafRecord, fact::Kind, leaf_record};

/// A proto enum value by its short lower-case name (`VERDICT_VIOLATION` → `violation`);
/// an unknown value prints as its number.
pub fn short_name<E: TryFrom<i32>>(
    value: i32,
    prefix: &str,
    name: fn(&E) -> &'static str,
) -> String {
    E::try_from(value)
        .map(|known| name(&known).trim_start_matches(prefix).to_ascii_lowercase())
        .unwrap_or_else(|_| value.to_string())
}

pub fn verdict_name(verdict: i32) -> String {
    short_name(verdict, "VERDICT_", |v: &proto::Verdict| v.as_str_name())
}

pub fn topic_name(topic: i32) -> String {
    short_name(topic, "TOPIC_", |t: &proto::Topic| t.as_str_name())
}

/// RFC 3339 in UTC, or empty when unset or before 1970.
pub fn time_text(at: &Option<prost_types::Timestamp>) -> String {
    at.as_ref()
        .and_then(|at| {
            let since = std::time::Duration::new(
                u64::try_from(at.seconds).ok()?,
                u32::try_from(at.nanos).ok()?,
            );
            Some(humantime::format_rfc3339(std::time::UNIX_EPOCH + since).to_string())
        })
        .unwrap_or_default()
}

/// The descriptive columns of a leaf, in this order.
pub const COLUMNS: [&str; 12] = [
    "recorded_at",
    "submitted_by",
    "kind",
    "id",
    "sender",
    "customer",
    "topic",
    "subscription",
    "product",
    "channel",
    "at",
    "subject",
];

/// Why a leaf cannot be described.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescribeError {
    #[error("the leaf is not a LeafRecord")]
    Undecodable,
    #[error("the leaf carries no record")]
    NoRecord,
}

/// The values of [`COLUMNS`] for a leaf. `kind` is `communication` or `fact.<kind>`; `id`
/// the message or fact id; `at` the communication's `sent_at` or the fact's `effective_at`.
pub fn describe(leaf: &[u8]) -> Result<[String; 12], DescribeError> {
    decode_header(leaf).map_err(|_| DescribeError::Undecodable)?;
    let record = LeafRecord::decode(leaf).map_err(|_| DescribeError::Undecodable)?;
    let recorded_at = time_text(&record.recorded_at);
    let submitted_by = record.submitted_by;
    Ok(match record.record.ok_or(DescribeError::NoRecord)? {
        leaf_record::Record::Communication(c) => [
            recorded_at,
            submitted_by,
            "communication".to_owned(),
            c.message_id,
            c.sender_id,
            c.customer_id,
            topic_name(c.topic),
            c.subscription_id,
            c.product_id,
            c.channel,
            time_text(&c.sent_at),
            c.subject,
        ],
        leaf_record::Record::Fact(fact) => {
            let (kind, sender, customer, subscription, product) = match &fact.kind {
                Some(Kind::Party(party)) => ("party", party.party_id.clone(), "", "", ""),
                Some(Kind::ResellerRelationship(r)) => (
                    "reseller_relationship",
                    r.partner_id.clone(),
                    r.customer_id.as_str(),
                    "",
                    "",
                ),
                Some(Kind::Subscription(s)) => (
                    "subscription",
                    s.biller_id.clone(),
                    s.customer_id.as_str(),
                    s.subscription_id.as_str(),
                    "",
                ),
                Some(Kind::Transfer(t)) => (
                    "transfer",
                    t.to_partner_id.clone(),
                    "",
                    t.subscription_id.as_str(),
                    "",
                ),
                Some(Kind::DirectAgreement(d)) => (
                    "direct_agreement",
                    String::new(),
                    d.customer_id.as_str(),
                    "",
                    d.product_id.as_str(),
                ),
                None => ("unknown", String::new(), "", "", ""),
            };
            [
                recorded_at,
                submitted_by,
                format!("fact.{kind}"),
                fact.fact_id.clone(),
                sender,
                customer.to_owned(),
                String::new(),
                subscription.to_owned(),
                product.to_owned(),
                String::new(),
                time_text(&fact.effective_at),
                String::new(),
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::leaf::{GENESIS_PREV_LEAF_HASH, LeafHeader, encode_leaf};
    use crate::ledger::time::Timestamp;

    fn leaf(record: leaf_record::Record) -> Vec<u8> {
        let body = LeafRecord {
            record: Some(record),
            submitted_by: "mailer".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let header = LeafHeader {
            index: 0,
            prev_leaf_hash: GENESIS_PREV_LEAF_HASH,
            recorded_at: Timestamp {
                seconds: 1_767_225_600,
                nanos: 0,
            },
        };
        encode_leaf(&header, &body)
    }

    #[test]
    fn a_communication_is_described_by_its_own_fields() {
        let columns = describe(&leaf(leaf_record::Record::Communication(
            proto::CommunicationRecord {
                message_id: "m-1".into(),
                sender_id: "partner-a".into(),
                customer_id: "cust-1".into(),
                topic: proto::Topic::Support as i32,
                channel: "email".into(),
                sent_at: Some(prost_types::Timestamp {
                    seconds: 1_767_225_600,
                    nanos: 0,
                }),
                subject: "Ticket, \"42\"".into(),
                subscription_id: "sub-1".into(),
                ..Default::default()
            },
        )))
        .unwrap();
        assert_eq!(
            columns,
            [
                "2026-01-01T00:00:00Z",
                "mailer",
                "communication",
                "m-1",
                "partner-a",
                "cust-1",
                "support",
                "sub-1",
                "",
                "email",
                "2026-01-01T00:00:00Z",
                "Ticket, \"42\"",
            ]
        );
    }

    #[test]
    fn a_fact_names_its_kind_and_parties() {
        let columns = describe(&leaf(leaf_record::Record::Fact(proto::Fact {
            fact_id: "f-1".into(),
            effective_at: None,
            kind: Some(Kind::Subscription(proto::Subscription {
                subscription_id: "sub-1".into(),
                customer_id: "cust-1".into(),
                biller_id: "partner-a".into(),
                active: true,
                ..Default::default()
            })),
        })))
        .unwrap();
        assert_eq!(columns[2], "fact.subscription");
        assert_eq!(columns[3], "f-1");
        assert_eq!(columns[4], "partner-a");
        assert_eq!(columns[5], "cust-1");
        assert_eq!(columns[7], "sub-1");
        assert_eq!(columns[10], "");
    }

    #[test]
    fn garbage_is_not_described() {
        assert_eq!(describe(&[0xff, 0x01]), Err(DescribeError::Undecodable));
    }
}

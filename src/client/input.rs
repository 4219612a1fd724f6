//! Reading communications and facts from JSON lines, and the short, case-insensitive enum
//! names people type (`support`, `direct_bill_partner`, `violation`).

use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;

use crate::proto::{self, fact::Kind};

/// A proto enum value from its short name (`support`) or full name (`TOPIC_SUPPORT`), in
/// any case.
pub fn enum_value(
    prefix: &str,
    what: &str,
    text: &str,
    from_name: impl Fn(&str) -> Option<i32>,
) -> anyhow::Result<i32> {
    let upper = text.trim().to_ascii_uppercase().replace('-', "_");
    let full = if upper.starts_with(prefix) {
        upper
    } else {
        format!("{prefix}{upper}")
    };
    from_name(&full).ok_or_else(|| anyhow::anyhow!("{what} {text:?} is not one of the known names"))
}

pub fn topic(text: &str) -> anyhow::Result<i32> {
    enum_value("TOPIC_", "topic", text, |name| {
        proto::Topic::from_str_name(name).map(|topic| topic as i32)
    })
}

/// Which verdicts `violations` lists: `violations`, `reviews` or `violations_and_reviews`
/// (also `both`).
pub fn verdict_filter(text: &str) -> anyhow::Result<i32> {
    let text = if text.trim().eq_ignore_ascii_case("both") {
        "violations_and_reviews"
    } else {
        text
    };
    enum_value("VERDICT_FILTER_", "verdicts", text, |name| {
        proto::VerdictFilter::from_str_name(name).map(|filter| filter as i32)
    })
}

/// An RFC 3339 instant (`2026-01-23T00:00:00Z`).
pub fn instant(field: &str, text: &str) -> anyhow::Result<prost_types::Timestamp> {
    let at = humantime::parse_rfc3339_weak(text)
        .map_err(|error| anyhow::anyhow!("{field} {text:?} is not an RFC 3339 time ({error})"))?;
    let since = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| anyhow::anyhow!("{field} {text:?} is before 1970"))?;
    Ok(prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    })
}

/// One communication per line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommunicationLine {
    message_id: String,
    sender_id: String,
    customer_id: String,
    topic: String,
    #[serde(default)]
    channel: String,
    sent_at: String,
    #[serde(default)]
    subject: String,
    /// The body as text ...
    #[serde(default)]
    body: Option<String>,
    /// ... or as base64 bytes.
    #[serde(default)]
    body_base64: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    subscription_id: String,
    #[serde(default)]
    product_id: String,
}

pub fn communication(line: &str) -> anyhow::Result<proto::Communication> {
    let parsed: CommunicationLine = serde_json::from_str(line)?;
    let body = match (parsed.body, parsed.body_base64) {
        (Some(_), Some(_)) => anyhow::bail!("give body or body_base64, not both"),
        (Some(text), None) => text.into_bytes(),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|error| anyhow::anyhow!("body_base64: {error}"))?,
        (None, None) => Vec::new(),
    };
    Ok(proto::Communication {
        message_id: parsed.message_id,
        sender_id: parsed.sender_id,
        customer_id: parsed.customer_id,
        topic: topic(&parsed.topic)?,
        channel: parsed.channel,
        sent_at: Some(instant("sent_at", &parsed.sent_at)?),
        subject: parsed.subject,
        body,
        attributes: parsed.attributes,
        subscription_id: parsed.subscription_id,
        product_id: parsed.product_id,
    })
}

/// One fact per line: `fact_id`, `effective_at` and exactly one kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FactLine {
    fact_id: String,
    effective_at: String,
    party: Option<PartyLine>,
    reseller_relationship: Option<RelationshipLine>,
    subscription: Option<SubscriptionLine>,
    transfer: Option<TransferLine>,
    direct_agreement: Option<AgreementLine>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartyLine {
    party_id: String,
    kind: String,
    #[serde(default)]
    display_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelationshipLine {
    customer_id: String,
    partner_id: String,
    active: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionLine {
    subscription_id: String,
    customer_id: String,
    #[serde(default)]
    biller_id: String,
    #[serde(default)]
    support_contact_id: String,
    #[serde(default)]
    provider_id: String,
    active: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferLine {
    subscription_id: String,
    from_partner_id: String,
    to_partner_id: String,
    state: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgreementLine {
    customer_id: String,
    product_id: String,
    active: bool,
}

pub fn fact(line: &str) -> anyhow::Result<proto::Fact> {
    let parsed: FactLine = serde_json::from_str(line)?;
    let mut kinds = Vec::new();
    if let Some(party) = parsed.party {
        kinds.push(Kind::Party(proto::Party {
            party_id: party.party_id,
            kind: enum_value("PARTY_KIND_", "party kind", &party.kind, |name| {
                proto::PartyKind::from_str_name(name).map(|kind| kind as i32)
            })?,
            display_name: party.display_name,
        }));
    }
    if let Some(r) = parsed.reseller_relationship {
        kinds.push(Kind::ResellerRelationship(proto::ResellerRelationship {
            customer_id: r.customer_id,
            partner_id: r.partner_id,
            active: r.active,
        }));
    }
    if let Some(s) = parsed.subscription {
        kinds.push(Kind::Subscription(proto::Subscription {
            subscription_id: s.subscription_id,
            customer_id: s.customer_id,
            biller_id: s.biller_id,
            support_contact_id: s.support_contact_id,
            provider_id: s.provider_id,
            active: s.active,
        }));
    }
    if let Some(t) = parsed.transfer {
        kinds.push(Kind::Transfer(proto::Transfer {
            subscription_id: t.subscription_id,
            from_partner_id: t.from_partner_id,
            to_partner_id: t.to_partner_id,
            state: enum_value("TRANSFER_STATE_", "transfer state", &t.state, |name| {
                proto::TransferState::from_str_name(name).map(|state| state as i32)
            })?,
        }));
    }
    if let Some(a) = parsed.direct_agreement {
        kinds.push(Kind::DirectAgreement(proto::DirectAgreement {
            customer_id: a.customer_id,
            product_id: a.product_id,
            active: a.active,
        }));
    }
    if kinds.len() != 1 {
        anyhow::bail!(
            "a fact has exactly one of party, reseller_relationship, subscription, transfer, direct_agreement ({} given)",
            kinds.len()
        );
    }
    Ok(proto::Fact {
        fact_id: parsed.fact_id,
        effective_at: Some(instant("effective_at", &parsed.effective_at)?),
        kind: kinds.pop(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_names_are_short_or_full_in_any_case() {
        assert_eq!(topic("support").unwrap(), proto::Topic::Support as i32);
        assert_eq!(
            topic("TOPIC_Commercial").unwrap(),
            proto::Topic::Commercial as i32
        );
        assert!(topic("gossip").unwrap_err().to_string().contains("gossip"));
    }

    #[test]
    fn lines_become_records() {
        let c = communication(
            r#"{"message_id":"m","sender_id":"p","customer_id":"c","topic":"support","sent_at":"2026-01-02T03:04:05Z","body":"hi"}"#,
        )
        .unwrap();
        assert_eq!(c.body, b"hi");
        assert_eq!(c.sent_at.unwrap().seconds, 1_767_323_045);
        let f = fact(
            r#"{"fact_id":"f","effective_at":"2026-01-01T00:00:00Z","transfer":{"subscription_id":"s","from_partner_id":"a","to_partner_id":"b","state":"completed"}}"#,
        )
        .unwrap();
        assert!(
            matches!(f.kind, Some(Kind::Transfer(t)) if t.state == proto::TransferState::Completed as i32)
        );
        assert!(fact(r#"{"fact_id":"f","effective_at":"2026-01-01T00:00:00Z"}"#).is_err());
        assert!(communication(r#"{"message_id":"m","bogus":1}"#).is_err());
    }
}

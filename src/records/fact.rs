//! Facts: the checks a submission must pass, its leaf record, and its meaning for the policy.

use prost::Message;

use super::RecordLimits;
use super::validate;
use super::validate::Invalid;
use crate::ledger::NewRecord;
use crate::ledger::time::Timestamp;
use crate::policy;
use crate::proto::{self, LeafRecord, PartyKind, TransferState, fact::Kind, leaf_record};

/// Namespace byte of fact idempotency keys (communications use `c`).
const KEY_NAMESPACE: u8 = b'f';

/// Longest party display name, in bytes.
const MAX_DISPLAY_NAME_BYTES: usize = 1024;

/// The idempotency key of a fact: its `fact_id`.
pub fn idempotency_key(fact_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + fact_id.len());
    key.push(KEY_NAMESPACE);
    key.extend_from_slice(fact_id.as_bytes());
    key
}

/// Validates a fact (named `field` in errors) and prepares its leaf record. Referential
/// checks that need the ledger (a transfer's subscription must exist) are the caller's.
pub fn prepare_fact(
    fact: proto::Fact,
    field: &str,
    limits: &RecordLimits,
    submitted_by: &str,
) -> Result<NewRecord, Invalid> {
    let name = |sub| validate::Sub(field, sub);
    let max = limits.max_id_bytes;
    validate::required_id(name("fact_id"), &fact.fact_id, max)?;
    let effective_at = fact
        .effective_at
        .ok_or_else(|| Invalid::new(name("effective_at"), "must be set"))?;
    validate::timestamp(name("effective_at"), &effective_at)?;
    match &fact.kind {
        None => return Err(Invalid::new(name("kind"), "must be set")),
        Some(Kind::Party(party)) => {
            validate::required_id(name("party.party_id"), &party.party_id, max)?;
            match PartyKind::try_from(party.kind) {
                Ok(PartyKind::Unspecified) => {
                    return Err(Invalid::new(name("party.kind"), "must be set"));
                }
                Err(_) => {
                    return Err(Invalid::new(
                        name("party.kind"),
                        format!("{} is not a known party kind", party.kind),
                    ));
                }
                Ok(_) => {}
            }
            validate::max_len(
                name("party.display_name"),
                party.display_name.len(),
                MAX_DISPLAY_NAME_BYTES,
            )?;
        }
        Some(Kind::ResellerRelationship(relationship)) => {
            let sub = |f| validate::Sub(name("reseller_relationship"), f);
            validate::required_id(sub("customer_id"), &relationship.customer_id, max)?;
            validate::required_id(sub("partner_id"), &relationship.partner_id, max)?;
        }
        Some(Kind::Subscription(subscription)) => {
            let sub = |f| validate::Sub(name("subscription"), f);
            validate::required_id(sub("subscription_id"), &subscription.subscription_id, max)?;
            validate::required_id(sub("customer_id"), &subscription.customer_id, max)?;
            validate::required_id(sub("biller_id"), &subscription.biller_id, max)?;
            validate::optional_id(
                sub("support_contact_id"),
                &subscription.support_contact_id,
                max,
            )?;
            validate::optional_id(sub("provider_id"), &subscription.provider_id, max)?;
        }
        Some(Kind::Transfer(transfer)) => {
            let sub = |f| validate::Sub(name("transfer"), f);
            validate::required_id(sub("subscription_id"), &transfer.subscription_id, max)?;
            validate::required_id(sub("from_partner_id"), &transfer.from_partner_id, max)?;
            validate::required_id(sub("to_partner_id"), &transfer.to_partner_id, max)?;
            if transfer.from_partner_id == transfer.to_partner_id {
                return Err(Invalid::new(
                    sub("to_partner_id"),
                    "a transfer moves a subscription to another partner",
                ));
            }
            match TransferState::try_from(transfer.state) {
                Ok(TransferState::Unspecified) => {
                    return Err(Invalid::new(sub("state"), "must be set"));
                }
                Err(_) => {
                    return Err(Invalid::new(
                        sub("state"),
                        format!("{} is not a known transfer state", transfer.state),
                    ));
                }
                Ok(_) => {}
            }
        }
        Some(Kind::DirectAgreement(agreement)) => {
            let sub = |f| validate::Sub(name("direct_agreement"), f);
            validate::required_id(sub("customer_id"), &agreement.customer_id, max)?;
            validate::optional_id(sub("product_id"), &agreement.product_id, max)?;
        }
    }
    let idempotency_key = idempotency_key(&fact.fact_id);
    let content = LeafRecord {
        submitted_by: submitted_by.to_owned(),
        record: Some(leaf_record::Record::Fact(fact)),
        ..LeafRecord::default()
    }
    .encode_to_vec();
    Ok(NewRecord {
        idempotency_key,
        content,
        body: Vec::new(),
        field: field.to_owned(),
    })
}

/// The policy's view of a recorded fact. `None` for a fact this build cannot interpret
/// (it was validated on the way in, so only a newer writer could have produced one).
pub fn to_policy(index: u64, fact: &proto::Fact) -> Option<policy::RecordedFact> {
    let effective_at = fact.effective_at.as_ref()?;
    let kind = match fact.kind.as_ref()? {
        Kind::Party(party) => policy::Fact::Party {
            party_id: party.party_id.clone(),
            kind: match PartyKind::try_from(party.kind).ok()? {
                PartyKind::Vendor => policy::PartyKind::Vendor,
                PartyKind::DirectBillPartner => policy::PartyKind::DirectBillPartner,
                PartyKind::IndirectProvider => policy::PartyKind::IndirectProvider,
                PartyKind::IndirectReseller => policy::PartyKind::IndirectReseller,
                PartyKind::Unspecified => return None,
            },
        },
        Kind::ResellerRelationship(r) => policy::Fact::ResellerRelationship {
            customer_id: r.customer_id.clone(),
            partner_id: r.partner_id.clone(),
            active: r.active,
        },
        Kind::Subscription(s) => policy::Fact::Subscription {
            subscription_id: s.subscription_id.clone(),
            customer_id: s.customer_id.clone(),
            biller_id: s.biller_id.clone(),
            support_contact_id: s.support_contact_id.clone(),
            provider_id: s.provider_id.clone(),
            active: s.active,
        },
        Kind::Transfer(t) => policy::Fact::Transfer {
            subscription_id: t.subscription_id.clone(),
            from_partner_id: t.from_partner_id.clone(),
            to_partner_id: t.to_partner_id.clone(),
            state: match TransferState::try_from(t.state).ok()? {
                TransferState::Started => policy::TransferState::Started,
                TransferState::Completed => policy::TransferState::Completed,
                TransferState::Cancelled => policy::TransferState::Cancelled,
                TransferState::Unspecified => return None,
            },
        },
        Kind::DirectAgreement(a) => policy::Fact::DirectAgreement {
            customer_id: a.customer_id.clone(),
            product_id: a.product_id.clone(),
            active: a.active,
        },
    };
    Some(policy::RecordedFact {
        index,
        effective_at: Timestamp {
            seconds: effective_at.seconds,
            nanos: effective_at.nanos,
        },
        fact: kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Fact, Party, Transfer};

    fn party_fact() -> Fact {
        Fact {
            fact_id: "f-1".into(),
            effective_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            kind: Some(Kind::Party(Party {
                party_id: "contoso".into(),
                kind: PartyKind::DirectBillPartner as i32,
                display_name: "Contoso Ltd".into(),
            })),
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let limits = RecordLimits::default();
        type Breakage = Box<dyn Fn(&mut Fact)>;
        let cases: Vec<(&str, Breakage)> = vec![
            ("fact.fact_id", Box::new(|f| f.fact_id.clear())),
            ("fact.effective_at", Box::new(|f| f.effective_at = None)),
            ("fact.kind", Box::new(|f| f.kind = None)),
            (
                "fact.party.kind",
                Box::new(|f| {
                    if let Some(Kind::Party(p)) = &mut f.kind {
                        p.kind = 77;
                    }
                }),
            ),
            (
                "fact.party.party_id",
                Box::new(|f| {
                    if let Some(Kind::Party(p)) = &mut f.kind {
                        p.party_id.clear();
                    }
                }),
            ),
            (
                "fact.transfer.state",
                Box::new(|f| {
                    f.kind = Some(Kind::Transfer(Transfer {
                        subscription_id: "s".into(),
                        from_partner_id: "a".into(),
                        to_partner_id: "b".into(),
                        state: 0,
                    }))
                }),
            ),
        ];
        for (field, break_it) in cases {
            let mut fact = party_fact();
            break_it(&mut fact);
            match prepare_fact(fact, "fact", &limits, "") {
                Err(Invalid { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn policy_view_of_a_fact() {
        let recorded = to_policy(9, &party_fact()).unwrap();
        assert_eq!(recorded.index, 9);
        assert_eq!(
            recorded.fact,
            policy::Fact::Party {
                party_id: "contoso".into(),
                kind: policy::PartyKind::DirectBillPartner
            }
        );
    }
}

//! The facts that decide who may talk to a customer (DOMAIN.md "The model"), and what they
//! say at a point in business time.
//!
//! Facts are ledger entries. Each takes effect at its `effective_at`; a later fact about the
//! same thing (same party, same customer–partner pair, same subscription, ...) replaces the
//! earlier one from its own `effective_at`. Facts with equal `effective_at` apply in ledger
//! order. [`Snapshot`] answers questions about the facts in force at one instant.

use crate::ledger::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartyKind {
    Vendor,
    DirectBillPartner,
    IndirectProvider,
    IndirectReseller,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    Started,
    Completed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fact {
    /// A registered party.
    Party { party_id: String, kind: PartyKind },
    /// Partner P is (active) or stops being (not active) a reseller of record for customer C.
    ResellerRelationship {
        customer_id: String,
        partner_id: String,
        active: bool,
    },
    /// CSP subscription S of customer C, its biller, support contact (empty: the biller) and
    /// provider (two-tier). A later fact for S replaces this one.
    Subscription {
        subscription_id: String,
        customer_id: String,
        biller_id: String,
        support_contact_id: String,
        provider_id: String,
        active: bool,
    },
    /// S moving from one partner to another. Completion makes `to_partner_id` the biller and
    /// support contact of S from its `effective_at`.
    Transfer {
        subscription_id: String,
        from_partner_id: String,
        to_partner_id: String,
        state: TransferState,
    },
    /// Customer C's direct commercial relationship with the vendor covering product X
    /// (empty: every non-CSP product).
    DirectAgreement {
        customer_id: String,
        product_id: String,
        active: bool,
    },
}

/// A fact as recorded: where it sits in the ledger and when it takes effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedFact {
    pub index: u64,
    pub effective_at: Timestamp,
    pub fact: Fact,
}

/// Whether a partner has a reseller relationship with a customer at the instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relationship {
    /// In force, established by the fact at this index.
    InForce(u64),
    /// Ended before the instant, by the fact at this index.
    Ended(u64),
    None,
}

/// A subscription as it stands at the instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionState {
    pub customer_id: String,
    pub biller_id: String,
    pub support_contact_id: String,
    pub provider_id: String,
    pub active: bool,
    /// The facts this state rests on (the subscription fact, completed transfers after it).
    pub evidence: Vec<u64>,
}

/// A transfer started and neither completed nor cancelled at the instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTransfer {
    pub subscription_id: String,
    pub from_partner_id: String,
    pub to_partner_id: String,
    pub index: u64,
    /// The facts that tie the subscription to its customer (when found through the customer).
    pub subscription_evidence: Vec<u64>,
}

/// The facts in force at one instant. Built from any set of recorded facts; facts that take
/// effect after `at` are ignored.
pub struct Snapshot<'a> {
    /// In force at `at`, ordered by (effective_at, ledger index).
    facts: Vec<&'a RecordedFact>,
}

impl<'a> Snapshot<'a> {
    pub fn at(facts: &'a [RecordedFact], at: Timestamp) -> Self {
        let mut facts: Vec<&RecordedFact> = facts
            .iter()
            .filter(|fact| fact.effective_at <= at)
            .collect();
        facts.sort_by_key(|fact| (fact.effective_at, fact.index));
        Snapshot { facts }
    }

    /// The party's kind and the index of the fact that registered it.
    pub fn party(&self, party_id: &str) -> Option<(PartyKind, u64)> {
        self.facts
            .iter()
            .rev()
            .find_map(|recorded| match &recorded.fact {
                Fact::Party { party_id: id, kind } if id == party_id => {
                    Some((*kind, recorded.index))
                }
                _ => None,
            })
    }

    pub fn relationship(&self, customer_id: &str, partner_id: &str) -> Relationship {
        let latest = self
            .facts
            .iter()
            .rev()
            .find_map(|recorded| match &recorded.fact {
                Fact::ResellerRelationship {
                    customer_id: c,
                    partner_id: p,
                    active,
                } if c == customer_id && p == partner_id => Some((*active, recorded.index)),
                _ => None,
            });
        match latest {
            Some((true, index)) => Relationship::InForce(index),
            Some((false, index)) => Relationship::Ended(index),
            None => Relationship::None,
        }
    }

    /// Partners of record of the customer: `(partner, index of the relationship fact)`.
    pub fn partners_of_record(&self, customer_id: &str) -> Vec<(String, u64)> {
        let mut partners: Vec<String> = self
            .facts
            .iter()
            .filter_map(|recorded| match &recorded.fact {
                Fact::ResellerRelationship {
                    customer_id: c,
                    partner_id,
                    ..
                } if c == customer_id => Some(partner_id.clone()),
                _ => None,
            })
            .collect();
        partners.sort();
        partners.dedup();
        partners
            .into_iter()
            .filter_map(|partner| match self.relationship(customer_id, &partner) {
                Relationship::InForce(index) => Some((partner, index)),
                _ => None,
            })
            .collect()
    }

    /// The subscription's state, and every partner that billed it earlier but no longer does,
    /// with the facts that show it: the one that made it the biller and the one that moved
    /// the subscription away.
    pub fn subscription(
        &self,
        subscription_id: &str,
    ) -> (Option<SubscriptionState>, Vec<(String, Vec<u64>)>) {
        let mut state: Option<SubscriptionState> = None;
        let mut former: Vec<(String, Vec<u64>)> = Vec::new();
        for recorded in &self.facts {
            let previous_biller = state.as_ref().map(|s| s.biller_id.clone());
            // What showed the previous biller to be the biller: its subscription fact and the
            // completed transfers applied on top of it.
            let previous_evidence = state
                .as_ref()
                .map(|s| s.evidence.clone())
                .unwrap_or_default();
            match &recorded.fact {
                Fact::Subscription {
                    subscription_id: id,
                    customer_id,
                    biller_id,
                    support_contact_id,
                    provider_id,
                    active,
                } if id == subscription_id => {
                    state = Some(SubscriptionState {
                        customer_id: customer_id.clone(),
                        biller_id: biller_id.clone(),
                        support_contact_id: if support_contact_id.is_empty() {
                            biller_id.clone()
                        } else {
                            support_contact_id.clone()
                        },
                        provider_id: provider_id.clone(),
                        active: *active,
                        evidence: vec![recorded.index],
                    });
                }
                Fact::Transfer {
                    subscription_id: id,
                    to_partner_id,
                    state: TransferState::Completed,
                    ..
                } if id == subscription_id => {
                    if let Some(current) = state.as_mut() {
                        current.biller_id = to_partner_id.clone();
                        current.support_contact_id = to_partner_id.clone();
                        current.evidence.push(recorded.index);
                    }
                }
                _ => continue,
            }
            let now = state.as_ref().map(|s| s.biller_id.clone());
            if let (Some(before), Some(now)) = (previous_biller, now) {
                if before != now {
                    former.retain(|(partner, _)| *partner != now);
                    let mut shown_by = previous_evidence;
                    shown_by.push(recorded.index);
                    former.push((before, shown_by));
                }
            }
        }
        (state, former)
    }

    /// The transfer of the subscription in progress at the instant, if any.
    pub fn pending_transfer(&self, subscription_id: &str) -> Option<PendingTransfer> {
        self.facts
            .iter()
            .rev()
            .find_map(|recorded| match &recorded.fact {
                Fact::Transfer {
                    subscription_id: id,
                    from_partner_id,
                    to_partner_id,
                    state,
                } if id == subscription_id => Some(match state {
                    TransferState::Started => Some(PendingTransfer {
                        subscription_id: id.clone(),
                        from_partner_id: from_partner_id.clone(),
                        to_partner_id: to_partner_id.clone(),
                        index: recorded.index,
                        subscription_evidence: Vec::new(),
                    }),
                    _ => None,
                }),
                _ => None,
            })?
    }

    /// Transfers in progress of any subscription of the customer.
    pub fn pending_transfers_of_customer(&self, customer_id: &str) -> Vec<PendingTransfer> {
        let mut subscriptions: Vec<&str> = self
            .facts
            .iter()
            .filter_map(|recorded| match &recorded.fact {
                Fact::Subscription {
                    subscription_id,
                    customer_id: c,
                    ..
                } if c == customer_id => Some(subscription_id.as_str()),
                _ => None,
            })
            .collect();
        subscriptions.sort_unstable();
        subscriptions.dedup();
        subscriptions
            .into_iter()
            .filter_map(|subscription| {
                let (state, _) = self.subscription(subscription);
                // Only subscriptions that belong to this customer at the instant.
                let state = state.filter(|s| s.customer_id == customer_id)?;
                let mut transfer = self.pending_transfer(subscription)?;
                transfer.subscription_evidence = state.evidence;
                Some(transfer)
            })
            .collect()
    }

    /// The direct agreement in force covering `product_id` (`None`: any agreement at all).
    pub fn direct_agreement(&self, customer_id: &str, product_id: Option<&str>) -> Option<u64> {
        // Agreements are keyed by (customer, product); the latest fact per key decides.
        let mut latest: Vec<(&str, bool, u64)> = Vec::new();
        for recorded in &self.facts {
            if let Fact::DirectAgreement {
                customer_id: c,
                product_id: p,
                active,
            } = &recorded.fact
            {
                if c == customer_id {
                    latest.retain(|(product, _, _)| product != p);
                    latest.push((p.as_str(), *active, recorded.index));
                }
            }
        }
        latest
            .iter()
            .filter(|(_, active, _)| *active)
            .filter(|(product, _, _)| match product_id {
                None => true,
                Some(wanted) => product.is_empty() || *product == wanted,
            })
            .map(|(_, _, index)| *index)
            .max()
    }
}

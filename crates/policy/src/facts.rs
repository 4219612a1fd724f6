//! The facts that decide who may talk to a customer (docs/COMPLIANCE.md "The model"), and what they
//! say at a point in business time.
//!
//! Facts are ledger entries. Each takes effect at its `effective_at`; a later fact about the
//! same thing (same party, same customer–partner pair, same subscription, ...) replaces the
//! earlier one from its own `effective_at`. Facts with equal `effective_at` apply in ledger
//! order. [`Snapshot`] answers questions about the facts in force at one instant.

use audit_ledger_primitives::time::Timestamp;

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
    /// The facts this state rests on: the subscription fact that ties it to its customer and
    /// the transfers completed after it.
    pub evidence: Vec<u64>,
}

/// A transfer started and neither completed nor cancelled at the instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTransfer {
    pub subscription_id: String,
    pub from_partner_id: String,
    pub to_partner_id: String,
    pub index: u64,
}

/// One of a customer's subscriptions at the instant, with everything reached through it.
///
/// This is the only way the rules see a subscription: built by
/// [`Snapshot::subscription_of`], which answers `None` for a subscription that is not the
/// customer's, so no fact reached through another customer's subscription (its billers,
/// its transfers) ever reaches an answer about this customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerSubscription {
    pub subscription_id: String,
    pub state: SubscriptionState,
    /// Partners that billed it (while it was this customer's) and no longer do, each with
    /// the facts that show it: the ones that made it the biller and the one that moved the
    /// subscription away.
    pub former_billers: Vec<(String, Vec<u64>)>,
    /// Its transfer in progress, if any.
    pub pending_transfer: Option<PendingTransfer>,
}

impl CustomerSubscription {
    /// The facts that tie the subscription, as it stands, to the customer: cited by every
    /// answer that reads anything reached through it.
    pub fn tie(&self) -> &[u64] {
        &self.state.evidence
    }
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

    /// Subscription `subscription_id` if it is `customer_id`'s at the instant (its latest
    /// subscription fact names the customer), with its billers past and present and its
    /// transfer in progress; `None` for a subscription of another customer or one not
    /// recorded. When a subscription fact moves it from one customer to another, what was
    /// said of it before (billers, transfers) is not carried over to the new customer.
    pub fn subscription_of(
        &self,
        customer_id: &str,
        subscription_id: &str,
    ) -> Option<CustomerSubscription> {
        let mut state: Option<SubscriptionState> = None;
        let mut former: Vec<(String, Vec<u64>)> = Vec::new();
        let mut latest_transfer: Option<(&Fact, u64)> = None;
        for recorded in &self.facts {
            let previous = state.clone();
            match &recorded.fact {
                Fact::Subscription {
                    subscription_id: id,
                    customer_id: owner,
                    biller_id,
                    support_contact_id,
                    provider_id,
                    active,
                } if id == subscription_id => {
                    if previous.as_ref().is_some_and(|p| p.customer_id != *owner) {
                        // Another customer's subscription now: its history stays behind.
                        former.clear();
                        latest_transfer = None;
                    }
                    state = Some(SubscriptionState {
                        customer_id: owner.clone(),
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
                    state: transfer_state,
                    ..
                } if id == subscription_id => {
                    latest_transfer = Some((&recorded.fact, recorded.index));
                    if *transfer_state != TransferState::Completed {
                        continue;
                    }
                    if let Some(current) = state.as_mut() {
                        current.biller_id = to_partner_id.clone();
                        current.support_contact_id = to_partner_id.clone();
                        current.evidence.push(recorded.index);
                    }
                }
                _ => continue,
            }
            let (Some(before), Some(now)) = (previous, state.as_ref()) else {
                continue;
            };
            if before.customer_id == now.customer_id && before.biller_id != now.biller_id {
                former.retain(|(partner, _)| *partner != now.biller_id);
                let mut shown_by = before.evidence;
                shown_by.push(recorded.index);
                former.push((before.biller_id, shown_by));
            }
        }
        let state = state.filter(|s| s.customer_id == customer_id)?;
        let pending_transfer = match latest_transfer {
            Some((
                Fact::Transfer {
                    from_partner_id,
                    to_partner_id,
                    state: TransferState::Started,
                    ..
                },
                index,
            )) => Some(PendingTransfer {
                subscription_id: subscription_id.to_string(),
                from_partner_id: from_partner_id.clone(),
                to_partner_id: to_partner_id.clone(),
                index,
            }),
            _ => None,
        };
        Some(CustomerSubscription {
            subscription_id: subscription_id.to_string(),
            state,
            former_billers: former,
            pending_transfer,
        })
    }

    /// Every subscription that is the customer's at the instant.
    pub fn subscriptions_of(&self, customer_id: &str) -> Vec<CustomerSubscription> {
        let mut named: Vec<&str> = self
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
        named.sort_unstable();
        named.dedup();
        named
            .into_iter()
            .filter_map(|subscription| self.subscription_of(customer_id, subscription))
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

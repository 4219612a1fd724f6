//! The decision table of docs/COMPLIANCE.md, in one place. Rows are tried top to bottom; the first
//! that matches decides. Rule names are public API: compliance tools filter on them.

use super::facts::{CustomerSubscription, PartyKind, PendingTransfer, Relationship, Snapshot};
use super::{Assessment, Question, RecordedFact, Topic, Verdict};

/// The rules, by docs/COMPLIANCE.md row number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    UnknownSender,
    Ops,
    VendorCsp,
    VendorDirect,
    VendorNoDirect,
    VendorDirectCustomer,
    VendorGeneral,
    VendorNotCsp,
    Biller,
    SupportContact,
    TransferPending,
    Transition,
    FormerPartner,
    NotBiller,
    MultiPartner,
    PartnerOfRecord,
    NotAPartner,
}

/// The table: (rule, public name, verdict when it matches), in the order rows are tried.
pub const RULES: [(Rule, &str, Verdict); 17] = [
    (Rule::UnknownSender, "UNKNOWN-SENDER", Verdict::Violation),
    (Rule::Ops, "OPS", Verdict::Allowed),
    (Rule::VendorCsp, "VENDOR-CSP", Verdict::Violation),
    (Rule::VendorDirect, "VENDOR-DIRECT", Verdict::Allowed),
    (Rule::VendorNoDirect, "VENDOR-NO-DIRECT", Verdict::Review),
    (
        Rule::VendorDirectCustomer,
        "VENDOR-DIRECT-CUSTOMER",
        Verdict::Allowed,
    ),
    (Rule::VendorGeneral, "VENDOR-GENERAL", Verdict::Violation),
    (Rule::VendorNotCsp, "VENDOR-NOT-CSP", Verdict::Review),
    (Rule::Biller, "BILLER", Verdict::Allowed),
    (Rule::SupportContact, "SUPPORT-CONTACT", Verdict::Allowed),
    (
        Rule::TransferPending,
        "TRANSFER-PENDING",
        Verdict::Violation,
    ),
    (Rule::Transition, "TRANSITION", Verdict::Allowed),
    (Rule::FormerPartner, "FORMER-PARTNER", Verdict::Violation),
    (Rule::NotBiller, "NOT-BILLER", Verdict::Violation),
    (Rule::MultiPartner, "MULTI-PARTNER", Verdict::Allowed),
    (Rule::PartnerOfRecord, "PARTNER-OF-RECORD", Verdict::Allowed),
    (Rule::NotAPartner, "NOT-A-PARTNER", Verdict::Violation),
];

impl Rule {
    fn row(self) -> &'static (Rule, &'static str, Verdict) {
        RULES
            .iter()
            .find(|(rule, _, _)| *rule == self)
            .expect("every rule has a row")
    }

    /// The docs/COMPLIANCE.md rule name, e.g. `VENDOR-CSP`.
    pub fn name(self) -> &'static str {
        self.row().1
    }

    pub fn verdict(self) -> Verdict {
        self.row().2
    }

    pub fn from_name(name: &str) -> Option<Rule> {
        RULES
            .iter()
            .find(|(_, row_name, _)| *row_name == name)
            .map(|(rule, _, _)| *rule)
    }
}

/// Everything the rows look at, derived once from the facts in force.
struct Situation<'q> {
    question: &'q Question,
    /// The sender's kind and its party fact.
    sender: Option<(PartyKind, u64)>,
    /// The sender's reseller relationship with the customer.
    relationship: Relationship,
    /// Partners of record of the customer (any partner, the sender included).
    partners_of_record: Vec<(String, u64)>,
    /// The subscription the communication is about, when it names one of this customer's
    /// (a subscription of another customer, or one not recorded, is unknown: `None`).
    subscription: Option<CustomerSubscription>,
    /// Every subscription of the customer, for the transfers in progress among them.
    subscriptions: Vec<CustomerSubscription>,
    /// A direct agreement covering the named product (or, with no product, any agreement).
    agreement: Option<u64>,
}

/// A matching row's explanation and the facts it rests on.
type Match = (String, Vec<u64>);

impl Situation<'_> {
    fn about_subscription(&self) -> bool {
        !self.question.subscription_id.is_empty()
    }

    fn about_product(&self) -> bool {
        !self.question.product_id.is_empty()
    }

    fn sender_is_vendor(&self) -> bool {
        matches!(self.sender, Some((PartyKind::Vendor, _)))
    }

    fn sender_is_partner(&self) -> bool {
        matches!(self.sender, Some((kind, _)) if kind != PartyKind::Vendor)
    }

    fn party_evidence(&self) -> Vec<u64> {
        self.sender
            .map(|(_, index)| vec![index])
            .unwrap_or_default()
    }

    fn with_party(&self, more: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut evidence = self.party_evidence();
        evidence.extend(more);
        evidence
    }

    /// The facts that tie the named subscription to the customer (none when it is not the
    /// customer's).
    fn subscription_evidence(&self) -> Vec<u64> {
        self.subscription
            .as_ref()
            .map(|s| s.tie().to_vec())
            .unwrap_or_default()
    }

    /// The transfer in progress to the sender that allows TRANSITION talk (row 12), with the
    /// subscription it moves: the named subscription's own when there is one, else one of
    /// any of the customer's subscriptions.
    fn transition_transfer(&self) -> Option<(&CustomerSubscription, &PendingTransfer)> {
        let to_sender = |s: &'_ CustomerSubscription| {
            s.pending_transfer
                .as_ref()
                .filter(|t| t.to_partner_id == self.question.sender_id)
                .is_some()
        };
        let subscription = self
            .subscription
            .iter()
            .find(|s| to_sender(s))
            .or_else(|| self.subscriptions.iter().find(|s| to_sender(s)))?;
        Some((subscription, subscription.pending_transfer.as_ref()?))
    }

    /// Partner of record of the customer: the sender's own relationship is in force.
    fn sender_of_record(&self) -> Option<u64> {
        match self.relationship {
            Relationship::InForce(index) => Some(index),
            _ => None,
        }
    }

    fn sender_id(&self) -> &str {
        &self.question.sender_id
    }

    /// Evaluates one row; `Some` when it matches.
    fn matches(&self, rule: Rule) -> Option<Match> {
        let q = self.question;
        let sender = self.sender_id();
        let customer = &q.customer_id;
        match rule {
            Rule::UnknownSender => self
                .sender
                .is_none()
                .then(|| (format!("{sender} is not a registered party"), vec![])),
            Rule::Ops => {
                if q.topic != Topic::Operational {
                    return None;
                }
                if self.sender_is_vendor() {
                    return Some((
                        "the vendor may send operational information directly".into(),
                        self.party_evidence(),
                    ));
                }
                let of_record = self.sender_of_record()?;
                Some((
                    format!("{sender} is a partner of record of {customer}; operational information"),
                    self.with_party([of_record]),
                ))
            }
            Rule::VendorCsp => (self.sender_is_vendor()
                && matches!(q.topic, Topic::Commercial | Topic::Support)
                && self.about_subscription())
            .then(|| {
                (
                    format!(
                        "the vendor does not write to a CSP customer about subscription {}: its partner owns the billing relationship",
                        q.subscription_id
                    ),
                    self.with_party(self.subscription_evidence()),
                )
            }),
            Rule::VendorDirect => {
                if !(self.sender_is_vendor() && self.about_product()) {
                    return None;
                }
                let agreement = self.agreement?;
                Some((
                    format!(
                        "{customer} has a direct agreement covering {}",
                        q.product_id
                    ),
                    self.with_party([agreement]),
                ))
            }
            Rule::VendorNoDirect => (self.sender_is_vendor()
                && self.about_product()
                && self.agreement.is_none())
            .then(|| {
                (
                    format!(
                        "no direct agreement of {customer} covers {}; a person must decide",
                        q.product_id
                    ),
                    self.party_evidence(),
                )
            }),
            Rule::VendorDirectCustomer => {
                if !self.sender_is_vendor()
                    || self.about_subscription()
                    || self.about_product()
                    || !self.partners_of_record.is_empty()
                {
                    return None;
                }
                let agreement = self.agreement?;
                Some((
                    format!("{customer} has a direct agreement and no partner of record"),
                    self.with_party([agreement]),
                ))
            }
            Rule::VendorGeneral => {
                if !self.sender_is_vendor() || self.partners_of_record.is_empty() {
                    return None;
                }
                let partners: Vec<&str> =
                    self.partners_of_record.iter().map(|(p, _)| p.as_str()).collect();
                Some((
                    format!(
                        "{customer} buys through {}; the vendor does not write to it about this",
                        partners.join(", ")
                    ),
                    self.with_party(self.partners_of_record.iter().map(|(_, i)| *i)),
                ))
            }
            // Also the vendor's fallback: every vendor question the rows above leave open
            // (e.g. a customer with an agreement, no partner, and a message naming a
            // subscription) is one the rules do not decide.
            Rule::VendorNotCsp => self.sender_is_vendor().then(|| {
                (
                    format!(
                        "{customer} has no partner of record{}; a person must decide",
                        if self.agreement.is_none() {
                            " and no direct agreement"
                        } else {
                            ""
                        }
                    ),
                    self.with_party(self.agreement),
                )
            }),
            Rule::Biller => {
                let subscription = &self.subscription.as_ref()?.state;
                let of_record = self.sender_of_record()?;
                (self.sender_is_partner() && subscription.active && subscription.biller_id == sender)
                    .then(|| {
                        (
                            format!("{sender} bills subscription {}", q.subscription_id),
                            self.with_party(
                                subscription.evidence.iter().copied().chain([of_record]),
                            ),
                        )
                    })
            }
            Rule::SupportContact => {
                let subscription = &self.subscription.as_ref()?.state;
                (self.sender_is_partner()
                    && q.topic == Topic::Support
                    && subscription.active
                    && subscription.support_contact_id == sender)
                    .then(|| {
                        (
                            format!(
                                "{sender} is the support contact of subscription {}",
                                q.subscription_id
                            ),
                            self.with_party(subscription.evidence.iter().copied()),
                        )
                    })
            }
            Rule::TransferPending => {
                let subscription = self.subscription.as_ref()?;
                let transfer = subscription.pending_transfer.as_ref()?;
                (matches!(q.topic, Topic::Commercial | Topic::Support)
                    && transfer.to_partner_id == sender)
                    .then(|| {
                        (
                            format!(
                                "the transfer of {} to {sender} is not complete; billing and support stay with {}",
                                transfer.subscription_id, transfer.from_partner_id
                            ),
                            self.with_party(subscription.tie().iter().copied().chain([transfer.index])),
                        )
                    })
            }
            // One reading of rows 11-12 (docs/COMPLIANCE.md): a prospective partner may talk
            // transition with the customer while any transfer of its subscriptions to that
            // partner is in progress, whichever of the customer's subscriptions the message
            // names, or none. A subscription that is not the customer's is none of them.
            Rule::Transition => {
                if q.topic != Topic::Transition
                    || (self.about_subscription() && self.subscription.is_none())
                {
                    return None;
                }
                let (moving, transfer) = self.transition_transfer()?;
                Some((
                    format!(
                        "{sender} is the prospective partner of the transfer of {} in progress",
                        transfer.subscription_id
                    ),
                    self.with_party(
                        moving
                            .tie()
                            .iter()
                            .copied()
                            .chain([transfer.index])
                            .chain(self.subscription_evidence()),
                    ),
                ))
            }
            Rule::FormerPartner => {
                if !self.sender_is_partner() {
                    return None;
                }
                if let Relationship::Ended(index) = self.relationship {
                    return Some((
                        format!("{sender}'s relationship with {customer} ended"),
                        self.with_party([index]),
                    ));
                }
                if !self.about_subscription() {
                    return None;
                }
                let subscription = self.subscription.as_ref()?;
                let (_, shown_by) = subscription
                    .former_billers
                    .iter()
                    .find(|(p, _)| p == sender)?;
                // With the subscription as it stands: what shows that the rows about its
                // biller and support contact do not apply.
                Some((
                    format!("subscription {} moved away from {sender}", q.subscription_id),
                    self.with_party(shown_by.iter().chain(subscription.tie()).copied()),
                ))
            }
            Rule::NotBiller => {
                let of_record = self.sender_of_record()?;
                (self.about_subscription() && q.topic == Topic::Commercial && !self.bills())
                    .then(|| {
                        (
                            format!(
                                "{sender} is a partner of record of {customer} but does not bill subscription {}",
                                q.subscription_id
                            ),
                            self.with_party(
                                self.subscription_evidence().into_iter().chain([of_record]),
                            ),
                        )
                    })
            }
            Rule::MultiPartner => {
                let of_record = self.sender_of_record()?;
                (self.about_subscription() && !self.bills()).then(|| {
                    (
                        format!(
                            "{sender} is a partner of record of {customer}; not the biller of {}, but not commercial",
                            q.subscription_id
                        ),
                        self.with_party(self.subscription_evidence().into_iter().chain([of_record])),
                    )
                })
            }
            Rule::PartnerOfRecord => {
                let of_record = self.sender_of_record()?;
                (!self.about_subscription()).then(|| {
                    (
                        format!("{sender} is a partner of record of {customer}"),
                        self.with_party([of_record]),
                    )
                })
            }
            Rule::NotAPartner => self.sender_is_partner().then(|| {
                (
                    format!("{sender} has no relationship with {customer}"),
                    self.party_evidence(),
                )
            }),
        }
    }

    fn bills(&self) -> bool {
        self.subscription
            .as_ref()
            .is_some_and(|s| s.state.active && s.state.biller_id == self.question.sender_id)
    }
}

/// Judges `question` on the facts in force at `question.at`.
pub fn assess(question: &Question, facts: &[RecordedFact]) -> Assessment {
    let snapshot = Snapshot::at(facts, question.at);
    let product = (!question.product_id.is_empty()).then_some(question.product_id.as_str());
    let situation = Situation {
        question,
        sender: snapshot.party(&question.sender_id),
        relationship: snapshot.relationship(&question.customer_id, &question.sender_id),
        partners_of_record: snapshot.partners_of_record(&question.customer_id),
        subscription: (!question.subscription_id.is_empty())
            .then(|| snapshot.subscription_of(&question.customer_id, &question.subscription_id))
            .flatten(),
        subscriptions: if question.reads_every_subscription() {
            snapshot.subscriptions_of(&question.customer_id)
        } else {
            Vec::new()
        },
        agreement: snapshot.direct_agreement(&question.customer_id, product),
    };
    for (rule, _, verdict) in RULES {
        if let Some((explanation, mut evidence)) = situation.matches(rule) {
            evidence.sort_unstable();
            evidence.dedup();
            return Assessment {
                verdict,
                rule,
                explanation,
                evidence,
            };
        }
    }
    // Unreachable: a registered party is the vendor (row 8 catches every vendor question)
    // or a partner (row 17 catches every partner question); an unknown one is row 1.
    Assessment {
        verdict: Verdict::Review,
        rule: Rule::VendorNotCsp,
        explanation: "no rule decides".into(),
        evidence: situation.party_evidence(),
    }
}

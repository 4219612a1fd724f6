//! Every row of the docs/COMPLIANCE.md table, the order rows are tried in, and the edge cases.

use super::facts::Fact;
use super::*;

const DAY: i64 = 86_400;

/// A fact base built day by day; each fact gets the next ledger index.
#[derive(Default)]
struct World {
    facts: Vec<RecordedFact>,
}

impl World {
    /// Standard cast: vendor `msft`, direct-bill partner `contoso`, provider `tdsynnex`,
    /// resellers `fabrikam` and `litware`, partner `adatum` with no customer.
    fn new() -> World {
        let mut world = World::default();
        world.party("msft", PartyKind::Vendor);
        world.party("contoso", PartyKind::DirectBillPartner);
        world.party("tdsynnex", PartyKind::IndirectProvider);
        world.party("fabrikam", PartyKind::IndirectReseller);
        world.party("litware", PartyKind::IndirectReseller);
        world.party("adatum", PartyKind::DirectBillPartner);
        world
    }

    fn record(&mut self, day: i64, fact: Fact) -> u64 {
        let index = self.facts.len() as u64;
        self.facts.push(RecordedFact {
            index,
            effective_at: Timestamp {
                seconds: day * DAY,
                nanos: 0,
            },
            fact,
        });
        index
    }

    fn party(&mut self, id: &str, kind: PartyKind) -> u64 {
        self.record(
            0,
            Fact::Party {
                party_id: id.into(),
                kind,
            },
        )
    }

    fn reseller(&mut self, day: i64, customer: &str, partner: &str, active: bool) -> u64 {
        self.record(
            day,
            Fact::ResellerRelationship {
                customer_id: customer.into(),
                partner_id: partner.into(),
                active,
            },
        )
    }

    fn subscription(
        &mut self,
        day: i64,
        id: &str,
        customer: &str,
        biller: &str,
        support: &str,
        provider: &str,
    ) -> u64 {
        self.record(
            day,
            Fact::Subscription {
                subscription_id: id.into(),
                customer_id: customer.into(),
                biller_id: biller.into(),
                support_contact_id: support.into(),
                provider_id: provider.into(),
                active: true,
            },
        )
    }

    fn transfer(
        &mut self,
        day: i64,
        subscription: &str,
        from: &str,
        to: &str,
        state: TransferState,
    ) -> u64 {
        self.record(
            day,
            Fact::Transfer {
                subscription_id: subscription.into(),
                from_partner_id: from.into(),
                to_partner_id: to.into(),
                state,
            },
        )
    }

    fn agreement(&mut self, day: i64, customer: &str, product: &str, active: bool) -> u64 {
        self.record(
            day,
            Fact::DirectAgreement {
                customer_id: customer.into(),
                product_id: product.into(),
                active,
            },
        )
    }

    fn ask(
        &self,
        sender: &str,
        customer: &str,
        topic: Topic,
        subscription: &str,
        product: &str,
        day: i64,
    ) -> Assessment {
        assess(
            &Question {
                sender_id: sender.into(),
                customer_id: customer.into(),
                topic,
                subscription_id: subscription.into(),
                product_id: product.into(),
                at: Timestamp {
                    seconds: day * DAY + 1,
                    nanos: 0,
                },
            },
            &self.facts,
        )
    }
}

/// Contoso bills `sub-1` of customer `c1` directly since day 1.
fn direct_bill_world() -> World {
    let mut world = World::new();
    world.reseller(1, "c1", "contoso", true);
    world.subscription(1, "sub-1", "c1", "contoso", "", "");
    world
}

#[track_caller]
fn expect(assessment: &Assessment, rule: Rule, verdict: Verdict) {
    assert_eq!(
        (assessment.rule, assessment.verdict),
        (rule, verdict),
        "{}: {}",
        assessment.rule.name(),
        assessment.explanation
    );
}

#[test]
fn the_table_has_seventeen_named_rows_in_domain_order() {
    let names: Vec<&str> = RULES.iter().map(|(_, name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "UNKNOWN-SENDER",
            "OPS",
            "VENDOR-CSP",
            "VENDOR-DIRECT",
            "VENDOR-NO-DIRECT",
            "VENDOR-DIRECT-CUSTOMER",
            "VENDOR-GENERAL",
            "VENDOR-NOT-CSP",
            "BILLER",
            "SUPPORT-CONTACT",
            "TRANSFER-PENDING",
            "TRANSITION",
            "FORMER-PARTNER",
            "NOT-BILLER",
            "MULTI-PARTNER",
            "PARTNER-OF-RECORD",
            "NOT-A-PARTNER",
        ]
    );
    for (rule, name, verdict) in RULES {
        assert_eq!(Rule::from_name(name), Some(rule));
        assert_eq!(rule.verdict(), verdict);
    }
}

#[test]
fn row_1_unknown_sender() {
    let world = direct_bill_world();
    let answer = world.ask("spoofer", "c1", Topic::Operational, "", "", 5);
    expect(&answer, Rule::UnknownSender, Verdict::Violation);
    assert!(answer.evidence.is_empty());
    // A party registered only later is unknown before it.
    let mut world = direct_bill_world();
    world.record(
        10,
        Fact::Party {
            party_id: "late".into(),
            kind: PartyKind::DirectBillPartner,
        },
    );
    expect(
        &world.ask("late", "c1", Topic::General, "", "", 5),
        Rule::UnknownSender,
        Verdict::Violation,
    );
}

#[test]
fn row_2_ops_for_the_vendor_and_partners_of_record() {
    let world = direct_bill_world();
    let vendor = world.ask("msft", "c1", Topic::Operational, "sub-1", "", 5);
    expect(&vendor, Rule::Ops, Verdict::Allowed);
    assert_eq!(vendor.evidence, vec![0], "the vendor's party fact");
    let partner = world.ask("contoso", "c1", Topic::Operational, "", "", 5);
    expect(&partner, Rule::Ops, Verdict::Allowed);
    assert_eq!(partner.evidence, vec![1, 6]);
    // Operational news from a partner with no relationship is not OPS.
    expect(
        &world.ask("adatum", "c1", Topic::Operational, "", "", 5),
        Rule::NotAPartner,
        Verdict::Violation,
    );
}

#[test]
fn row_3_vendor_csp_even_with_a_direct_agreement() {
    let mut world = direct_bill_world();
    world.agreement(1, "c1", "", true);
    for topic in [Topic::Commercial, Topic::Support] {
        let answer = world.ask("msft", "c1", topic, "sub-1", "", 5);
        expect(&answer, Rule::VendorCsp, Verdict::Violation);
        assert_eq!(
            answer.evidence,
            vec![0, 7],
            "vendor party and the subscription"
        );
    }
}

#[test]
fn rows_4_and_5_vendor_about_a_non_csp_product() {
    let mut world = direct_bill_world();
    let agreement = world.agreement(3, "c1", "azure-ea", true);
    let with = world.ask("msft", "c1", Topic::Commercial, "", "azure-ea", 5);
    expect(&with, Rule::VendorDirect, Verdict::Allowed);
    assert_eq!(with.evidence, vec![0, agreement]);
    // Another product is not covered; before the agreement nothing is.
    expect(
        &world.ask("msft", "c1", Topic::Commercial, "", "dynamics", 5),
        Rule::VendorNoDirect,
        Verdict::Review,
    );
    expect(
        &world.ask("msft", "c1", Topic::Support, "", "azure-ea", 2),
        Rule::VendorNoDirect,
        Verdict::Review,
    );
    // An agreement covering every non-CSP product covers this one; an ended one does not.
    world.agreement(4, "c1", "", true);
    expect(
        &world.ask("msft", "c1", Topic::General, "", "dynamics", 5),
        Rule::VendorDirect,
        Verdict::Allowed,
    );
    world.agreement(6, "c1", "", false);
    world.agreement(6, "c1", "azure-ea", false);
    expect(
        &world.ask("msft", "c1", Topic::General, "", "azure-ea", 7),
        Rule::VendorNoDirect,
        Verdict::Review,
    );
}

#[test]
fn rows_6_7_8_vendor_not_about_a_subscription_or_product() {
    let mut world = World::new();
    let agreement = world.agreement(1, "direct-only", "", true);
    let answer = world.ask("msft", "direct-only", Topic::General, "", "", 5);
    expect(&answer, Rule::VendorDirectCustomer, Verdict::Allowed);
    assert_eq!(answer.evidence, vec![0, agreement]);

    // A customer with a partner of record, even with a direct agreement.
    let mut world = direct_bill_world();
    world.agreement(1, "c1", "", true);
    let answer = world.ask("msft", "c1", Topic::General, "", "", 5);
    expect(&answer, Rule::VendorGeneral, Verdict::Violation);
    assert!(
        answer.evidence.contains(&6),
        "rests on contoso's relationship"
    );
    expect(
        &world.ask("msft", "c1", Topic::Transition, "", "", 5),
        Rule::VendorGeneral,
        Verdict::Violation,
    );

    // Neither a partner nor an agreement: the rules do not decide.
    let world = World::new();
    expect(
        &world.ask("msft", "stranger", Topic::General, "", "", 5),
        Rule::VendorNotCsp,
        Verdict::Review,
    );
}

#[test]
fn rows_9_and_10_biller_and_support_contact() {
    let mut world = World::new();
    world.reseller(1, "c2", "fabrikam", true);
    world.reseller(1, "c2", "tdsynnex", true);
    let subscription = world.subscription(1, "sub-2", "c2", "fabrikam", "tdsynnex", "tdsynnex");
    let answer = world.ask("fabrikam", "c2", Topic::Commercial, "sub-2", "", 5);
    expect(&answer, Rule::Biller, Verdict::Allowed);
    assert!(answer.evidence.contains(&subscription));
    expect(
        &world.ask("fabrikam", "c2", Topic::General, "sub-2", "", 5),
        Rule::Biller,
        Verdict::Allowed,
    );
    let support = world.ask("tdsynnex", "c2", Topic::Support, "sub-2", "", 5);
    expect(&support, Rule::SupportContact, Verdict::Allowed);
    assert!(support.evidence.contains(&subscription));
}

#[test]
fn two_tier_reseller_bills_and_provider_does_not() {
    let mut world = World::new();
    world.reseller(1, "c3", "fabrikam", true);
    world.reseller(1, "c3", "tdsynnex", true);
    world.subscription(1, "sub-3", "c3", "fabrikam", "", "tdsynnex");
    expect(
        &world.ask("fabrikam", "c3", Topic::Commercial, "sub-3", "", 5),
        Rule::Biller,
        Verdict::Allowed,
    );
    expect(
        &world.ask("tdsynnex", "c3", Topic::Commercial, "sub-3", "", 5),
        Rule::NotBiller,
        Verdict::Violation,
    );
    expect(
        &world.ask("tdsynnex", "c3", Topic::Support, "sub-3", "", 5),
        Rule::MultiPartner,
        Verdict::Allowed,
    );
    expect(
        &world.ask("tdsynnex", "c3", Topic::General, "", "", 5),
        Rule::PartnerOfRecord,
        Verdict::Allowed,
    );

    // And the reverse: the provider bills, the reseller does not.
    let mut world = World::new();
    world.reseller(1, "c4", "fabrikam", true);
    world.reseller(1, "c4", "tdsynnex", true);
    world.subscription(1, "sub-4", "c4", "tdsynnex", "", "tdsynnex");
    expect(
        &world.ask("tdsynnex", "c4", Topic::Commercial, "sub-4", "", 5),
        Rule::Biller,
        Verdict::Allowed,
    );
    expect(
        &world.ask("fabrikam", "c4", Topic::Commercial, "sub-4", "", 5),
        Rule::NotBiller,
        Verdict::Violation,
    );
    expect(
        &world.ask("fabrikam", "c4", Topic::Operational, "sub-4", "", 5),
        Rule::Ops,
        Verdict::Allowed,
    );
}

#[test]
fn transfer_moves_legitimacy_at_completion_not_before() {
    let mut world = direct_bill_world();
    world.reseller(2, "c1", "litware", true);
    let started = world.transfer(3, "sub-1", "contoso", "litware", TransferState::Started);
    let completed = world.transfer(6, "sub-1", "contoso", "litware", TransferState::Completed);
    world.reseller(8, "c1", "contoso", false);

    // Before completion: the source partner still bills; the prospective one may only talk transition.
    expect(
        &world.ask("contoso", "c1", Topic::Commercial, "sub-1", "", 4),
        Rule::Biller,
        Verdict::Allowed,
    );
    let pending = world.ask("litware", "c1", Topic::Commercial, "sub-1", "", 4);
    expect(&pending, Rule::TransferPending, Verdict::Violation);
    assert!(pending.evidence.contains(&started));
    expect(
        &world.ask("litware", "c1", Topic::Support, "sub-1", "", 4),
        Rule::TransferPending,
        Verdict::Violation,
    );
    let transition = world.ask("litware", "c1", Topic::Transition, "sub-1", "", 4);
    expect(&transition, Rule::Transition, Verdict::Allowed);
    expect(
        &world.ask("litware", "c1", Topic::Transition, "", "", 4),
        Rule::Transition,
        Verdict::Allowed,
    );

    // After completion: the other way round.
    let new_biller = world.ask("litware", "c1", Topic::Commercial, "sub-1", "", 7);
    expect(&new_biller, Rule::Biller, Verdict::Allowed);
    assert!(new_biller.evidence.contains(&completed));
    expect(
        &world.ask("litware", "c1", Topic::Support, "sub-1", "", 7),
        Rule::Biller,
        Verdict::Allowed,
    );
    let former = world.ask("contoso", "c1", Topic::Commercial, "sub-1", "", 7);
    expect(&former, Rule::FormerPartner, Verdict::Violation);
    assert!(former.evidence.contains(&completed));
    // Contoso is still a partner of record (until day 8) for things not about sub-1.
    expect(
        &world.ask("contoso", "c1", Topic::General, "", "", 7),
        Rule::PartnerOfRecord,
        Verdict::Allowed,
    );
    // After its relationship ended, anything from contoso is a violation.
    expect(
        &world.ask("contoso", "c1", Topic::Operational, "", "", 9),
        Rule::FormerPartner,
        Verdict::Violation,
    );
}

#[test]
fn a_cancelled_transfer_changes_nothing() {
    let mut world = direct_bill_world();
    world.transfer(3, "sub-1", "contoso", "litware", TransferState::Started);
    world.transfer(5, "sub-1", "contoso", "litware", TransferState::Cancelled);
    expect(
        &world.ask("contoso", "c1", Topic::Commercial, "sub-1", "", 6),
        Rule::Biller,
        Verdict::Allowed,
    );
    expect(
        &world.ask("litware", "c1", Topic::Transition, "sub-1", "", 6),
        Rule::NotAPartner,
        Verdict::Violation,
    );
    expect(
        &world.ask("litware", "c1", Topic::Commercial, "sub-1", "", 6),
        Rule::NotAPartner,
        Verdict::Violation,
    );
    // While it was pending, transition talk was fine.
    expect(
        &world.ask("litware", "c1", Topic::Transition, "sub-1", "", 4),
        Rule::Transition,
        Verdict::Allowed,
    );
}

#[test]
fn row_13_former_partner_after_the_relationship_ended() {
    let mut world = direct_bill_world();
    let ended = world.reseller(4, "c1", "contoso", false);
    let answer = world.ask("contoso", "c1", Topic::General, "", "", 5);
    expect(&answer, Rule::FormerPartner, Verdict::Violation);
    assert_eq!(answer.evidence, vec![1, ended]);
    // Before it ended, the same message was fine.
    expect(
        &world.ask("contoso", "c1", Topic::General, "", "", 3),
        Rule::PartnerOfRecord,
        Verdict::Allowed,
    );
    // A relationship that starts again is in force again.
    world.reseller(6, "c1", "contoso", true);
    expect(
        &world.ask("contoso", "c1", Topic::General, "", "", 7),
        Rule::PartnerOfRecord,
        Verdict::Allowed,
    );
}

#[test]
fn rows_14_15_16_partners_of_record_that_do_not_bill() {
    let mut world = direct_bill_world();
    world.reseller(1, "c1", "litware", true);
    expect(
        &world.ask("litware", "c1", Topic::Commercial, "sub-1", "", 5),
        Rule::NotBiller,
        Verdict::Violation,
    );
    expect(
        &world.ask("litware", "c1", Topic::Support, "sub-1", "", 5),
        Rule::MultiPartner,
        Verdict::Allowed,
    );
    expect(
        &world.ask("litware", "c1", Topic::General, "sub-1", "", 5),
        Rule::MultiPartner,
        Verdict::Allowed,
    );
    let general = world.ask("litware", "c1", Topic::General, "", "", 5);
    expect(&general, Rule::PartnerOfRecord, Verdict::Allowed);
    assert_eq!(general.evidence, vec![4, 8]);
}

#[test]
fn row_17_a_partner_with_no_relationship() {
    let world = direct_bill_world();
    for topic in [
        Topic::Commercial,
        Topic::Support,
        Topic::Operational,
        Topic::Transition,
        Topic::General,
    ] {
        expect(
            &world.ask("adatum", "c1", topic, "", "", 5),
            Rule::NotAPartner,
            Verdict::Violation,
        );
    }
    // Before its relationship begins, contoso too has none.
    expect(
        &world.ask("contoso", "c1", Topic::General, "", "", 0),
        Rule::NotAPartner,
        Verdict::Violation,
    );
}

#[test]
fn a_customer_with_a_csp_subscription_and_a_direct_agreement() {
    let mut world = direct_bill_world();
    world.agreement(1, "c1", "office-ea", true);
    expect(
        &world.ask("msft", "c1", Topic::Commercial, "sub-1", "", 5),
        Rule::VendorCsp,
        Verdict::Violation,
    );
    expect(
        &world.ask("msft", "c1", Topic::Commercial, "", "office-ea", 5),
        Rule::VendorDirect,
        Verdict::Allowed,
    );
    expect(
        &world.ask("msft", "c1", Topic::General, "", "", 5),
        Rule::VendorGeneral,
        Verdict::Violation,
    );
    expect(
        &world.ask("msft", "c1", Topic::Operational, "", "", 5),
        Rule::Ops,
        Verdict::Allowed,
    );
    expect(
        &world.ask("contoso", "c1", Topic::Commercial, "sub-1", "", 5),
        Rule::Biller,
        Verdict::Allowed,
    );
}

#[test]
fn rows_are_tried_in_order() {
    // OPS (row 2) wins over VENDOR-CSP (row 3) for the vendor's operational notice about S.
    let world = direct_bill_world();
    expect(
        &world.ask("msft", "c1", Topic::Operational, "sub-1", "", 5),
        Rule::Ops,
        Verdict::Allowed,
    );
    // BILLER (9) wins over SUPPORT-CONTACT (10) when the biller is also the support contact.
    expect(
        &world.ask("contoso", "c1", Topic::Support, "sub-1", "", 5),
        Rule::Biller,
        Verdict::Allowed,
    );
    // TRANSFER-PENDING (11) wins over NOT-BILLER (14) for a prospective partner already of record.
    let mut world = direct_bill_world();
    world.reseller(1, "c1", "litware", true);
    world.transfer(3, "sub-1", "contoso", "litware", TransferState::Started);
    expect(
        &world.ask("litware", "c1", Topic::Commercial, "sub-1", "", 4),
        Rule::TransferPending,
        Verdict::Violation,
    );
    // FORMER-PARTNER (13) wins over MULTI-PARTNER (15) for a partner still of record whose S moved.
    world.transfer(5, "sub-1", "contoso", "litware", TransferState::Completed);
    expect(
        &world.ask("contoso", "c1", Topic::Support, "sub-1", "", 6),
        Rule::FormerPartner,
        Verdict::Violation,
    );
}

#[test]
fn a_later_subscription_fact_replaces_the_earlier_one_from_its_effective_time() {
    let mut world = direct_bill_world();
    world.reseller(1, "c1", "litware", true);
    world.record(
        10,
        Fact::Subscription {
            subscription_id: "sub-1".into(),
            customer_id: "c1".into(),
            biller_id: "litware".into(),
            support_contact_id: String::new(),
            provider_id: String::new(),
            active: true,
        },
    );
    expect(
        &world.ask("contoso", "c1", Topic::Commercial, "sub-1", "", 9),
        Rule::Biller,
        Verdict::Allowed,
    );
    expect(
        &world.ask("contoso", "c1", Topic::Commercial, "sub-1", "", 11),
        Rule::FormerPartner,
        Verdict::Violation,
    );
    expect(
        &world.ask("litware", "c1", Topic::Commercial, "sub-1", "", 11),
        Rule::Biller,
        Verdict::Allowed,
    );
}

/// The subscription moved away from the sender, then a fact of the same instant ended it:
/// the "moved away" answer must carry that last fact too, or the evidence alone would show
/// an active subscription the sender supports (a case the property below found).
#[test]
fn moved_away_evidence_includes_the_subscription_as_it_stands() {
    let mut world = World::new();
    let earlier = world.record(
        0,
        Fact::Subscription {
            subscription_id: "s2".into(),
            customer_id: "c1".into(),
            biller_id: "adatum".into(),
            support_contact_id: String::new(),
            provider_id: String::new(),
            active: false,
        },
    );
    let moved = world.subscription(17, "s2", "c1", "contoso", "adatum", "");
    let ended = world.record(
        17,
        Fact::Subscription {
            subscription_id: "s2".into(),
            customer_id: "c1".into(),
            biller_id: "contoso".into(),
            support_contact_id: "adatum".into(),
            provider_id: String::new(),
            active: false,
        },
    );
    let answer = world.ask("adatum", "c1", Topic::Support, "s2", "", 17);
    expect(&answer, Rule::FormerPartner, Verdict::Violation);
    for index in [earlier, moved, ended] {
        assert!(
            answer.evidence.contains(&index),
            "{index} missing from {:?}",
            answer.evidence
        );
    }
    let evidence: Vec<RecordedFact> = world
        .facts
        .iter()
        .filter(|fact| answer.evidence.contains(&fact.index))
        .cloned()
        .collect();
    let rederived = assess(
        &Question {
            sender_id: "adatum".into(),
            customer_id: "c1".into(),
            topic: Topic::Support,
            subscription_id: "s2".into(),
            product_id: String::new(),
            at: Timestamp {
                seconds: 17 * DAY + 1,
                nanos: 0,
            },
        },
        &evidence,
    );
    expect(&rederived, Rule::FormerPartner, Verdict::Violation);
}

/// Issue 17: a subscription of another customer is unknown for this one, and so is every
/// fact reached through it. Here `sub-d` is customer `d`'s and litware is the prospective
/// partner of its transfer; nothing about it may reach an answer about c1.
#[test]
fn another_customers_transfer_never_reaches_this_customer() {
    let mut world = direct_bill_world();
    world.reseller(1, "d", "contoso", true);
    world.subscription(1, "sub-d", "d", "contoso", "", "");
    world.transfer(3, "sub-d", "contoso", "litware", TransferState::Started);
    for topic in [Topic::Transition, Topic::Commercial, Topic::Support] {
        expect(
            &world.ask("litware", "c1", topic, "sub-d", "", 4),
            Rule::NotAPartner,
            Verdict::Violation,
        );
        expect(
            &world.ask("litware", "c1", topic, "", "", 4),
            Rule::NotAPartner,
            Verdict::Violation,
        );
    }
    // For d itself the transfer is in progress.
    expect(
        &world.ask("litware", "d", Topic::Transition, "sub-d", "", 4),
        Rule::Transition,
        Verdict::Allowed,
    );
}

/// Issue 17: one reading of rows 11-12. While a transfer of one of c1's subscriptions to
/// litware is in progress, TRANSITION talk is allowed whichever of c1's subscriptions it
/// names, or none; commercial and support talk about the moving subscription is not.
#[test]
fn transition_talk_does_not_depend_on_which_of_the_customers_subscriptions_is_named() {
    let mut world = direct_bill_world();
    // sub-1's subscription fact, the last of direct_bill_world.
    let moving = world.facts.len() as u64 - 1;
    let other = world.subscription(1, "sub-2", "c1", "contoso", "", "");
    let started = world.transfer(3, "sub-1", "contoso", "litware", TransferState::Started);
    for named in ["sub-1", "sub-2", ""] {
        let answer = world.ask("litware", "c1", Topic::Transition, named, "", 4);
        expect(&answer, Rule::Transition, Verdict::Allowed);
        // The evidence ties the moving subscription, and the one named, to c1.
        assert!(
            answer.evidence.contains(&started),
            "{named}: {:?}",
            answer.evidence
        );
        assert!(
            answer.evidence.contains(&moving),
            "{named}: {:?}",
            answer.evidence
        );
        if named == "sub-2" {
            assert!(answer.evidence.contains(&other), "{:?}", answer.evidence);
        }
    }
    // Row 11 is about the moving subscription only: commercial talk naming sub-2 from a
    // partner with no relationship is row 17's.
    expect(
        &world.ask("litware", "c1", Topic::Commercial, "sub-1", "", 4),
        Rule::TransferPending,
        Verdict::Violation,
    );
    expect(
        &world.ask("litware", "c1", Topic::Commercial, "sub-2", "", 4),
        Rule::NotAPartner,
        Verdict::Violation,
    );
    // A subscription that is not c1's is none of c1's subscriptions.
    world.subscription(1, "sub-d", "d", "contoso", "", "");
    expect(
        &world.ask("litware", "c1", Topic::Transition, "sub-d", "", 4),
        Rule::NotAPartner,
        Verdict::Violation,
    );
}

/// Issue 17: a transfer recorded before the subscription it moves (feeds deliver facts in
/// any order) is judged with what is in force at each instant.
#[test]
fn a_transfer_recorded_before_its_subscription_counts_once_the_subscription_is_in_force() {
    let mut world = World::new();
    world.reseller(1, "c1", "contoso", true);
    let started = world.transfer(3, "sub-1", "contoso", "litware", TransferState::Started);
    // Not yet known as c1's: the transfer reaches no customer.
    expect(
        &world.ask("litware", "c1", Topic::Transition, "", "", 4),
        Rule::NotAPartner,
        Verdict::Violation,
    );
    // Recorded later, in force from day 1: the transfer is c1's from day 3.
    let subscription = world.subscription(1, "sub-1", "c1", "contoso", "", "");
    let answer = world.ask("litware", "c1", Topic::Transition, "", "", 4);
    expect(&answer, Rule::Transition, Verdict::Allowed);
    assert!(answer.evidence.contains(&started) && answer.evidence.contains(&subscription));
    expect(
        &world.ask("litware", "c1", Topic::Transition, "", "", 2),
        Rule::NotAPartner,
        Verdict::Violation,
    );
}

/// A subscription moved to another customer takes its history with it: its former billers
/// and transfers say nothing about the customer it left, nor about the one it joined.
#[test]
fn a_subscription_that_changes_customer_leaves_its_history_behind() {
    let mut world = direct_bill_world();
    world.reseller(1, "d", "litware", true);
    world.transfer(2, "sub-1", "contoso", "fabrikam", TransferState::Started);
    world.subscription(3, "sub-1", "d", "litware", "", "");
    // For c1, sub-1 is no longer its subscription: contoso (still of record) is row 15's.
    expect(
        &world.ask("contoso", "c1", Topic::Support, "sub-1", "", 4),
        Rule::MultiPartner,
        Verdict::Allowed,
    );
    // For d, the transfer started while sub-1 was c1's is not d's transfer.
    expect(
        &world.ask("fabrikam", "d", Topic::Transition, "sub-1", "", 4),
        Rule::NotAPartner,
        Verdict::Violation,
    );
    expect(
        &world.ask("litware", "d", Topic::Commercial, "sub-1", "", 4),
        Rule::Biller,
        Verdict::Allowed,
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    const SENDERS: [&str; 5] = ["msft", "contoso", "fabrikam", "litware", "nobody"];
    const CUSTOMERS: [&str; 2] = ["c1", "c2"];
    const SUBSCRIPTIONS: [&str; 3] = ["s1", "s2", ""];

    fn pick(options: &[&'static str]) -> impl Strategy<Value = &'static str> + use<> {
        prop::sample::select(options.to_vec())
    }

    fn fact() -> impl Strategy<Value = Fact> {
        let party = (pick(&SENDERS[..4]), 0..4u8).prop_map(|(id, kind)| Fact::Party {
            party_id: id.into(),
            kind: [
                PartyKind::Vendor,
                PartyKind::DirectBillPartner,
                PartyKind::IndirectProvider,
                PartyKind::IndirectReseller,
            ][kind as usize],
        });
        let reseller =
            (pick(&CUSTOMERS), pick(&SENDERS), any::<bool>()).prop_map(|(c, p, active)| {
                Fact::ResellerRelationship {
                    customer_id: c.into(),
                    partner_id: p.into(),
                    active,
                }
            });
        let subscription = (
            pick(&SUBSCRIPTIONS[..2]),
            pick(&CUSTOMERS),
            pick(&SENDERS),
            pick(&SENDERS),
            any::<bool>(),
        )
            .prop_map(|(s, c, biller, support, active)| Fact::Subscription {
                subscription_id: s.into(),
                customer_id: c.into(),
                biller_id: biller.into(),
                support_contact_id: if support == biller {
                    String::new()
                } else {
                    support.into()
                },
                provider_id: String::new(),
                active,
            });
        let transfer = (
            pick(&SUBSCRIPTIONS[..2]),
            pick(&SENDERS),
            pick(&SENDERS),
            0..3u8,
        )
            .prop_map(|(s, from, to, state)| Fact::Transfer {
                subscription_id: s.into(),
                from_partner_id: from.into(),
                to_partner_id: to.into(),
                state: [
                    TransferState::Started,
                    TransferState::Completed,
                    TransferState::Cancelled,
                ][state as usize],
            });
        let agreement = (
            pick(&CUSTOMERS),
            prop::sample::select(vec!["", "x", "y"]),
            any::<bool>(),
        )
            .prop_map(|(c, p, active)| Fact::DirectAgreement {
                customer_id: c.into(),
                product_id: p.into(),
                active,
            });
        prop_oneof![party, reseller, subscription, transfer, agreement]
    }

    /// Facts of customer `d`, whose subscriptions `d1` and `d2` no other customer ever has.
    fn other_customer_fact() -> impl Strategy<Value = Fact> {
        let reseller =
            (pick(&SENDERS), any::<bool>()).prop_map(|(p, active)| Fact::ResellerRelationship {
                customer_id: "d".into(),
                partner_id: p.into(),
                active,
            });
        let subscription =
            (pick(&["d1", "d2"]), pick(&SENDERS), any::<bool>()).prop_map(|(s, biller, active)| {
                Fact::Subscription {
                    subscription_id: s.into(),
                    customer_id: "d".into(),
                    biller_id: biller.into(),
                    support_contact_id: String::new(),
                    provider_id: String::new(),
                    active,
                }
            });
        let transfer = (pick(&["d1", "d2"]), pick(&SENDERS), pick(&SENDERS), 0..3u8).prop_map(
            |(s, from, to, state)| Fact::Transfer {
                subscription_id: s.into(),
                from_partner_id: from.into(),
                to_partner_id: to.into(),
                state: [
                    TransferState::Started,
                    TransferState::Completed,
                    TransferState::Cancelled,
                ][state as usize],
            },
        );
        let agreement =
            (pick(&["", "x"]), any::<bool>()).prop_map(|(p, active)| Fact::DirectAgreement {
                customer_id: "d".into(),
                product_id: p.into(),
                active,
            });
        prop_oneof![reseller, subscription, transfer, agreement]
    }

    /// Whether an auditor holding only the evidence can tell that every fact in it concerns
    /// the question: the sender's party fact, the customer's relationships, agreements and
    /// subscriptions, and transfers of a subscription the evidence itself shows to be the
    /// customer's.
    fn tied_to_the_question(question: &Question, evidence: &[RecordedFact]) -> Result<(), String> {
        let customers = |subscription: &str| {
            evidence.iter().any(|recorded| {
                matches!(&recorded.fact, Fact::Subscription { subscription_id, customer_id, .. }
                    if subscription_id == subscription && *customer_id == question.customer_id)
            })
        };
        for recorded in evidence {
            let tied = match &recorded.fact {
                Fact::Party { party_id, .. } => *party_id == question.sender_id,
                Fact::ResellerRelationship { customer_id, .. }
                | Fact::Subscription { customer_id, .. }
                | Fact::DirectAgreement { customer_id, .. } => *customer_id == question.customer_id,
                Fact::Transfer {
                    subscription_id, ..
                } => customers(subscription_id),
            };
            if !tied {
                return Err(format!(
                    "evidence {} does not show it concerns {} ({:?})",
                    recorded.index, question.customer_id, recorded.fact
                ));
            }
        }
        Ok(())
    }

    fn question() -> impl Strategy<Value = Question> {
        (
            pick(&SENDERS),
            pick(&CUSTOMERS),
            0..5u8,
            pick(&SUBSCRIPTIONS),
            prop::sample::select(vec!["", "x", "z"]),
            0..40i64,
        )
            .prop_map(
                |(sender, customer, topic, subscription, product, day)| Question {
                    sender_id: sender.into(),
                    customer_id: customer.into(),
                    topic: [
                        Topic::Commercial,
                        Topic::Support,
                        Topic::Operational,
                        Topic::Transition,
                        Topic::General,
                    ][topic as usize],
                    subscription_id: subscription.into(),
                    // A communication names a subscription or a product, not both.
                    product_id: if subscription.is_empty() {
                        product.into()
                    } else {
                        String::new()
                    },
                    at: Timestamp {
                        seconds: day * DAY,
                        nanos: 0,
                    },
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Over random histories: the answer rests only on facts in force at the instant,
        /// the evidence alone re-derives it, and facts in force later change nothing.
        #[test]
        fn evidence_always_re_derives_the_answer(
            facts in prop::collection::vec((fact(), 0..40i64), 0..24),
            question in question(),
        ) {
            let recorded: Vec<RecordedFact> = facts
                .into_iter()
                .enumerate()
                .map(|(index, (fact, day))| RecordedFact {
                    index: index as u64,
                    effective_at: Timestamp { seconds: day * DAY, nanos: 0 },
                    fact,
                })
                .collect();
            let answer = assess(&question, &recorded);
            prop_assert_eq!(answer.verdict, answer.rule.verdict());
            for index in &answer.evidence {
                let fact = &recorded[*index as usize];
                prop_assert!(fact.effective_at <= question.at, "evidence {} is not in force yet", index);
            }
            let evidence: Vec<RecordedFact> = recorded
                .iter()
                .filter(|fact| answer.evidence.contains(&fact.index))
                .cloned()
                .collect();
            let rederived = assess(&question, &evidence);
            prop_assert_eq!((rederived.rule, rederived.verdict), (answer.rule, answer.verdict));
            if let Err(loose) = tied_to_the_question(&question, &evidence) {
                prop_assert!(false, "{}: {}", answer.rule.name(), loose);
            }
            let in_force: Vec<RecordedFact> = recorded
                .iter()
                .filter(|fact| fact.effective_at <= question.at)
                .cloned()
                .collect();
            prop_assert_eq!(assess(&question, &in_force), answer);
        }

        /// Facts about another customer (its relationships, agreements, subscriptions and
        /// their transfers) never change an answer about this one, whatever it names.
        #[test]
        fn facts_about_other_customers_never_change_an_answer(
            facts in prop::collection::vec((fact(), 0..40i64), 0..20),
            others in prop::collection::vec((other_customer_fact(), 0..40i64), 0..12),
            question in question(),
            named_other in prop::sample::select(vec![None, Some("d1"), Some("d2")]),
            order in prop::collection::vec(any::<bool>(), 32),
        ) {
            let mut question = question;
            if let Some(subscription) = named_other {
                question.subscription_id = subscription.into();
                question.product_id = String::new();
            }
            // Interleave the two histories in ledger order.
            let (mut ours, mut theirs) = (facts.into_iter(), others.into_iter());
            let mut recorded = Vec::new();
            let mut own = Vec::new();
            for pick_ours in order.into_iter().chain(std::iter::repeat(true)) {
                let mut ours_next = || ours.next().map(|f| (f, true));
                let mut theirs_next = || theirs.next().map(|f| (f, false));
                let next = if pick_ours {
                    ours_next().or_else(theirs_next)
                } else {
                    theirs_next().or_else(ours_next)
                };
                let Some(((fact, day), is_ours)) = next else {
                    break;
                };
                let fact = RecordedFact {
                    index: recorded.len() as u64,
                    effective_at: Timestamp { seconds: day * DAY, nanos: 0 },
                    fact,
                };
                if is_ours {
                    own.push(fact.clone());
                }
                recorded.push(fact);
            }
            prop_assert_eq!(assess(&question, &recorded), assess(&question, &own));
        }
    }
}

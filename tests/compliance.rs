//! ComplianceService through the real server: a realistic scenario recorded as facts and
//! communications, then CheckSender, ListViolations and ListCommunications asserted one by
//! one; bitemporal answers; evidence checked by inclusion proofs; reindex.

mod common;

use audit_ledger::proto::compliance_service_client::ComplianceServiceClient;
use audit_ledger::proto::{
    AppendBatchRequest, AppendRequest, Assessment, CheckSenderRequest, Communication,
    DirectAgreement, Fact, GetCheckpointRequest, GetEntryRequest, GetInclusionProofRequest,
    ListCommunicationsRequest, ListViolationsRequest, Party, PartyKind, RecordFactRequest,
    ResellerRelationship, Subscription, Topic, Transfer, TransferState, Verdict, fact::Kind,
    leaf_record,
};
use common::{TestServer, hash32, rfc9162};
use tonic::Code;
use tonic::transport::Channel;

const DAY: i64 = 86_400;
const EPOCH: i64 = 1_767_225_600; // 2026-01-01

type Compliance = ComplianceServiceClient<Channel>;

fn at(day: i64, offset: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: EPOCH + day * DAY + offset,
        nanos: 0,
    }
}

struct Scenario {
    ledger: common::Client,
    compliance: Compliance,
    facts: u64,
}

impl Scenario {
    async fn new(address: &str) -> Scenario {
        let channel = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Scenario {
            ledger: common::connect(address).await,
            compliance: ComplianceServiceClient::new(channel),
            facts: 0,
        }
    }

    async fn fact(&mut self, day: i64, kind: Kind) -> u64 {
        self.facts += 1;
        self.compliance
            .record_fact(RecordFactRequest {
                fact: Some(Fact {
                    fact_id: format!("fact-{}", self.facts),
                    effective_at: Some(at(day, 0)),
                    kind: Some(kind),
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .index
    }

    async fn party(&mut self, id: &str, kind: PartyKind) -> u64 {
        self.fact(
            0,
            Kind::Party(Party {
                party_id: id.into(),
                kind: kind as i32,
                display_name: format!("{id} Ltd"),
            }),
        )
        .await
    }

    async fn reseller(&mut self, day: i64, customer: &str, partner: &str, active: bool) -> u64 {
        self.fact(
            day,
            Kind::ResellerRelationship(ResellerRelationship {
                customer_id: customer.into(),
                partner_id: partner.into(),
                active,
            }),
        )
        .await
    }

    async fn send(&mut self, message: Message<'_>) -> (u64, Assessment) {
        let Message {
            n,
            sender,
            customer,
            topic,
            subscription,
            product,
            day,
        } = message;
        let response = self
            .ledger
            .append(AppendRequest {
                communication: Some(Communication {
                    message_id: format!("m-{n}"),
                    sender_id: sender.into(),
                    customer_id: customer.into(),
                    topic: topic as i32,
                    channel: "email".into(),
                    sent_at: Some(at(day, n)),
                    subject: format!("Message {n}"),
                    body: format!("Body of message {n}").into_bytes(),
                    attributes: Default::default(),
                    subscription_id: subscription.into(),
                    product_id: product.into(),
                }),
            })
            .await
            .unwrap()
            .into_inner();
        (
            response.index,
            response
                .assessment
                .expect("appends carry the verdict at ingestion"),
        )
    }

    async fn check(
        &mut self,
        sender: &str,
        customer: &str,
        topic: Topic,
        subscription: &str,
        day: i64,
        as_of: u64,
    ) -> Assessment {
        self.compliance
            .check_sender(CheckSenderRequest {
                sender_id: sender.into(),
                customer_id: customer.into(),
                topic: topic as i32,
                subscription_id: subscription.into(),
                product_id: String::new(),
                at: Some(at(day, 0)),
                as_of_tree_size: as_of,
            })
            .await
            .unwrap()
            .into_inner()
            .assessment
            .unwrap()
    }

    async fn tree_size(&mut self) -> u64 {
        self.ledger
            .get_checkpoint(GetCheckpointRequest::default())
            .await
            .unwrap()
            .into_inner()
            .checkpoint
            .unwrap()
            .size
    }

    /// Every page of a violations listing, concatenated, as (message id, rule).
    async fn violations(&mut self, request: ListViolationsRequest) -> Vec<(String, String)> {
        let mut request = request;
        let mut all = Vec::new();
        loop {
            let page = self
                .compliance
                .list_violations(request.clone())
                .await
                .unwrap()
                .into_inner();
            assert!(
                page.violations.len() <= request.page_size.max(1) as usize
                    || request.page_size == 0
            );
            for violation in page.violations {
                let record = violation.entry.unwrap().record.unwrap().record.unwrap();
                let leaf_record::Record::Communication(c) = record else {
                    panic!("not a communication")
                };
                all.push((c.message_id, violation.assessment.unwrap().rule));
            }
            if page.next_page_token.is_empty() {
                return all;
            }
            request.page_token = page.next_page_token;
        }
    }

    async fn communications(&mut self, request: ListCommunicationsRequest) -> Vec<String> {
        let mut request = request;
        let mut all = Vec::new();
        loop {
            let page = self
                .compliance
                .list_communications(request.clone())
                .await
                .unwrap()
                .into_inner();
            for entry in page.entries {
                let leaf_record::Record::Communication(c) = entry.record.unwrap().record.unwrap()
                else {
                    panic!("not a communication")
                };
                all.push(c.message_id);
            }
            if page.next_page_token.is_empty() {
                return all;
            }
            request.page_token = page.next_page_token;
        }
    }
}

/// A planned communication and the verdict it must get: number, sender, customer, topic,
/// subscription, product, day, rule, verdict.
type Planned = (
    i64,
    &'static str,
    &'static str,
    Topic,
    &'static str,
    &'static str,
    i64,
    &'static str,
    Verdict,
);

/// A communication of the scenario: number, sender, customer, topic, about, day sent.
struct Message<'a> {
    n: i64,
    sender: &'a str,
    customer: &'a str,
    topic: Topic,
    subscription: &'a str,
    product: &'a str,
    day: i64,
}

fn rule_and_verdict(assessment: &Assessment) -> (&str, Verdict) {
    (
        assessment.rule.as_str(),
        Verdict::try_from(assessment.verdict).unwrap(),
    )
}

/// Records the scenario; returns the communications' expected (message id, rule, verdict).
async fn record_scenario(s: &mut Scenario) -> Vec<(String, &'static str, Verdict)> {
    s.party("msft", PartyKind::Vendor).await;
    s.party("contoso", PartyKind::DirectBillPartner).await;
    s.party("tdsynnex", PartyKind::IndirectProvider).await;
    s.party("fabrikam", PartyKind::IndirectReseller).await;
    s.party("litware", PartyKind::IndirectReseller).await;
    s.party("adatum", PartyKind::DirectBillPartner).await;
    // c-alpha: contoso bills sub-a1, which moves to litware (started day 10, completed day 20);
    // contoso's relationship ends on day 30.
    s.reseller(1, "c-alpha", "contoso", true).await;
    s.fact(
        1,
        Kind::Subscription(Subscription {
            subscription_id: "sub-a1".into(),
            customer_id: "c-alpha".into(),
            biller_id: "contoso".into(),
            support_contact_id: String::new(),
            provider_id: String::new(),
            active: true,
        }),
    )
    .await;
    s.reseller(10, "c-alpha", "litware", true).await;
    let transfer = |state: TransferState| {
        Kind::Transfer(Transfer {
            subscription_id: "sub-a1".into(),
            from_partner_id: "contoso".into(),
            to_partner_id: "litware".into(),
            state: state as i32,
        })
    };
    s.fact(10, transfer(TransferState::Started)).await;
    s.fact(20, transfer(TransferState::Completed)).await;
    s.reseller(30, "c-alpha", "contoso", false).await;
    // c-beta: two-tier, fabrikam bills sub-b1, tdsynnex provides and supports it.
    s.reseller(1, "c-beta", "fabrikam", true).await;
    s.reseller(1, "c-beta", "tdsynnex", true).await;
    s.fact(
        1,
        Kind::Subscription(Subscription {
            subscription_id: "sub-b1".into(),
            customer_id: "c-beta".into(),
            biller_id: "fabrikam".into(),
            support_contact_id: "tdsynnex".into(),
            provider_id: "tdsynnex".into(),
            active: true,
        }),
    )
    .await;
    // c-gamma: a direct agreement for dynamics-365, no partner.
    s.fact(
        1,
        Kind::DirectAgreement(DirectAgreement {
            customer_id: "c-gamma".into(),
            product_id: "dynamics-365".into(),
            active: true,
        }),
    )
    .await;

    use Topic::*;
    let plan: Vec<Planned> = vec![
        (
            1,
            "contoso",
            "c-alpha",
            Commercial,
            "sub-a1",
            "",
            5,
            "BILLER",
            Verdict::Allowed,
        ),
        (
            2,
            "msft",
            "c-alpha",
            Commercial,
            "sub-a1",
            "",
            6,
            "VENDOR-CSP",
            Verdict::Violation,
        ),
        (
            3,
            "msft",
            "c-alpha",
            Operational,
            "",
            "",
            7,
            "OPS",
            Verdict::Allowed,
        ),
        (
            4,
            "litware",
            "c-alpha",
            Commercial,
            "sub-a1",
            "",
            12,
            "TRANSFER-PENDING",
            Verdict::Violation,
        ),
        (
            5,
            "litware",
            "c-alpha",
            Transition,
            "sub-a1",
            "",
            13,
            "TRANSITION",
            Verdict::Allowed,
        ),
        (
            6,
            "contoso",
            "c-alpha",
            Commercial,
            "sub-a1",
            "",
            22,
            "FORMER-PARTNER",
            Verdict::Violation,
        ),
        (
            7,
            "litware",
            "c-alpha",
            Support,
            "sub-a1",
            "",
            23,
            "BILLER",
            Verdict::Allowed,
        ),
        (
            8,
            "tdsynnex",
            "c-beta",
            Commercial,
            "sub-b1",
            "",
            5,
            "NOT-BILLER",
            Verdict::Violation,
        ),
        (
            9,
            "tdsynnex",
            "c-beta",
            Support,
            "sub-b1",
            "",
            5,
            "SUPPORT-CONTACT",
            Verdict::Allowed,
        ),
        (
            10,
            "msft",
            "c-gamma",
            Commercial,
            "",
            "dynamics-365",
            5,
            "VENDOR-DIRECT",
            Verdict::Allowed,
        ),
        (
            11,
            "msft",
            "c-gamma",
            General,
            "",
            "azure-sphere",
            5,
            "VENDOR-NO-DIRECT",
            Verdict::Review,
        ),
        (
            12,
            "spoofer",
            "c-beta",
            General,
            "",
            "",
            5,
            "UNKNOWN-SENDER",
            Verdict::Violation,
        ),
        (
            13,
            "adatum",
            "c-beta",
            General,
            "",
            "",
            6,
            "NOT-A-PARTNER",
            Verdict::Violation,
        ),
        (
            14,
            "contoso",
            "c-alpha",
            General,
            "",
            "",
            31,
            "FORMER-PARTNER",
            Verdict::Violation,
        ),
    ];
    let mut expected = Vec::new();
    for (n, sender, customer, topic, subscription, product, day, rule, verdict) in plan {
        let (_, assessment) = s
            .send(Message {
                n,
                sender,
                customer,
                topic,
                subscription,
                product,
                day,
            })
            .await;
        assert_eq!(
            rule_and_verdict(&assessment),
            (rule, verdict),
            "message {n}: {}",
            assessment.explanation
        );
        assert_eq!(assessment.policy_version, "domain-table/2");
        expected.push((format!("m-{n}"), rule, verdict));
    }
    expected
}

fn ids(list: &[(String, String)]) -> Vec<&str> {
    list.iter().map(|(id, _)| id.as_str()).collect()
}

#[tokio::test]
async fn scenario_answers_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut s = Scenario::new(&server.address).await;
    record_scenario(&mut s).await;

    // CheckSender before sending, at several instants.
    let check = s
        .check("contoso", "c-alpha", Topic::Commercial, "sub-a1", 15, 0)
        .await;
    assert_eq!(rule_and_verdict(&check), ("BILLER", Verdict::Allowed));
    assert!(!check.evidence.is_empty());
    let check = s
        .check("litware", "c-alpha", Topic::Commercial, "sub-a1", 21, 0)
        .await;
    assert_eq!(rule_and_verdict(&check), ("BILLER", Verdict::Allowed));
    let check = s
        .check("unknown-co", "c-alpha", Topic::General, "", 21, 0)
        .await;
    assert_eq!(
        rule_and_verdict(&check),
        ("UNKNOWN-SENDER", Verdict::Violation)
    );
    assert_eq!(check.tree_size, s.tree_size().await);

    // The remaining examples of docs/COMPLIANCE.md.
    let examples = [
        (
            "msft",
            "c-gamma",
            Topic::General,
            "",
            5,
            "VENDOR-DIRECT-CUSTOMER",
            Verdict::Allowed,
        ),
        (
            "msft",
            "c-alpha",
            Topic::General,
            "",
            5,
            "VENDOR-GENERAL",
            Verdict::Violation,
        ),
        (
            "tdsynnex",
            "c-beta",
            Topic::General,
            "sub-b1",
            5,
            "MULTI-PARTNER",
            Verdict::Allowed,
        ),
        (
            "tdsynnex",
            "c-beta",
            Topic::General,
            "",
            5,
            "PARTNER-OF-RECORD",
            Verdict::Allowed,
        ),
    ];
    for (sender, customer, topic, subscription, day, rule, verdict) in examples {
        let answer = s.check(sender, customer, topic, subscription, day, 0).await;
        assert_eq!(
            rule_and_verdict(&answer),
            (rule, verdict),
            "{sender} -> {customer}"
        );
    }
    // The worked answer of docs/COMPLIANCE.md: contoso's party (1), the subscription fact
    // that made it the biller (7), the completed transfer that moved sub-a1 away (10).
    let former = s
        .check("contoso", "c-alpha", Topic::Commercial, "sub-a1", 22, 0)
        .await;
    assert_eq!(
        rule_and_verdict(&former),
        ("FORMER-PARTNER", Verdict::Violation)
    );
    assert_eq!(former.evidence, vec![1, 7, 10]);
    assert_eq!(
        former.explanation,
        "subscription sub-a1 moved away from contoso"
    );
    assert_eq!(former.tree_size, 30);

    // Every violation, oldest sent_at first, paged by 2.
    let all = s
        .violations(ListViolationsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await;
    assert_eq!(
        ids(&all),
        ["m-8", "m-12", "m-2", "m-13", "m-4", "m-6", "m-14"]
    );
    assert_eq!(all[0].1, "NOT-BILLER");
    let with_review = s
        .violations(ListViolationsRequest {
            include_review: true,
            ..Default::default()
        })
        .await;
    assert_eq!(
        ids(&with_review),
        ["m-8", "m-11", "m-12", "m-2", "m-13", "m-4", "m-6", "m-14"]
    );
    let alpha = s
        .violations(ListViolationsRequest {
            customer_id: "c-alpha".into(),
            page_size: 3,
            ..Default::default()
        })
        .await;
    assert_eq!(ids(&alpha), ["m-2", "m-4", "m-6", "m-14"]);
    let contoso = s
        .violations(ListViolationsRequest {
            sender_id: "contoso".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(ids(&contoso), ["m-6", "m-14"]);
    let former = s
        .violations(ListViolationsRequest {
            rule: "FORMER-PARTNER".into(),
            page_size: 1,
            ..Default::default()
        })
        .await;
    assert_eq!(ids(&former), ["m-6", "m-14"]);
    let window = s
        .violations(ListViolationsRequest {
            from: Some(at(10, 0)),
            to: Some(at(25, 0)),
            ..Default::default()
        })
        .await;
    assert_eq!(ids(&window), ["m-4", "m-6"]);

    // Communications: by customer, topic and subscription, paged.
    let alpha = s
        .communications(ListCommunicationsRequest {
            customer_id: "c-alpha".into(),
            page_size: 3,
            ..Default::default()
        })
        .await;
    assert_eq!(
        alpha,
        ["m-1", "m-2", "m-3", "m-4", "m-5", "m-6", "m-7", "m-14"]
    );
    let commercial = s
        .communications(ListCommunicationsRequest {
            customer_id: "c-alpha".into(),
            topic: Topic::Commercial as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(commercial, ["m-1", "m-2", "m-4", "m-6"]);
    let beta_sub = s
        .communications(ListCommunicationsRequest {
            subscription_id: "sub-b1".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(beta_sub, ["m-8", "m-9"]);
    let by_sender_and_time = s
        .communications(ListCommunicationsRequest {
            sender_id: "msft".into(),
            from: Some(at(6, 0)),
            ..Default::default()
        })
        .await;
    assert_eq!(by_sender_and_time, ["m-2", "m-3"]);
    let everything = s
        .communications(ListCommunicationsRequest {
            page_size: 5,
            ..Default::default()
        })
        .await;
    assert_eq!(everything.len(), 14);
    server.stop().await;
}

/// A batch's verdicts at ingestion (judged together, each fact list read once) are the
/// ones CheckSender gives for each communication alone, at the same tree size.
#[tokio::test]
async fn a_batch_is_judged_as_each_communication_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut s = Scenario::new(&server.address).await;
    record_scenario(&mut s).await;
    let asked = [
        ("contoso", "c-alpha", Topic::Commercial, "sub-a1", 15),
        ("litware", "c-alpha", Topic::Commercial, "sub-a1", 15),
        ("litware", "c-alpha", Topic::Transition, "", 15),
        ("contoso", "c-alpha", Topic::Commercial, "sub-a1", 25),
        ("fabrikam", "c-beta", Topic::Commercial, "sub-b1", 5),
        ("tdsynnex", "c-beta", Topic::Support, "sub-b1", 5),
        ("tdsynnex", "c-beta", Topic::Commercial, "sub-b1", 5),
        ("msft", "c-beta", Topic::Commercial, "sub-b1", 5),
        ("msft", "c-alpha", Topic::Operational, "", 5),
        ("unknown-co", "c-alpha", Topic::General, "", 5),
    ];
    let communications = asked
        .iter()
        .enumerate()
        .map(
            |(n, (sender, customer, topic, subscription, day))| Communication {
                message_id: format!("batch-{n}"),
                sender_id: (*sender).into(),
                customer_id: (*customer).into(),
                topic: *topic as i32,
                channel: "email".into(),
                sent_at: Some(at(*day, n as i64)),
                subject: format!("Batch message {n}"),
                body: b"body".to_vec(),
                attributes: Default::default(),
                subscription_id: (*subscription).into(),
                product_id: String::new(),
            },
        )
        .collect();
    let results = s
        .ledger
        .append_batch(AppendBatchRequest { communications })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), asked.len());
    let mut rules = std::collections::HashSet::new();
    for ((sender, customer, topic, subscription, day), result) in asked.iter().zip(results) {
        let judged = result.assessment.expect("each result carries its verdict");
        let mut alone = s
            .check(
                sender,
                customer,
                *topic,
                subscription,
                *day,
                judged.tree_size,
            )
            .await;
        // CheckSender asks at the instant given; the communication was judged at its
        // sent_at, a few seconds later the same day: no fact changes in between. (Each
        // answer names the instant it judged.)
        alone.explanation.clone_from(&judged.explanation);
        alone.at = judged.at;
        assert_eq!(
            judged, alone,
            "{sender} -> {customer} about {topic:?} on day {day}"
        );
        rules.insert(judged.rule);
    }
    assert!(rules.len() >= 6, "the batch spans many rules: {rules:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_late_fact_changes_todays_answer_but_not_the_answer_as_of_then() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut s = Scenario::new(&server.address).await;
    record_scenario(&mut s).await;
    let then = s.tree_size().await;
    let before = s.check("adatum", "c-beta", Topic::General, "", 6, 0).await;
    assert_eq!(
        rule_and_verdict(&before),
        ("NOT-A-PARTNER", Verdict::Violation)
    );

    // Recorded today, effective since day 1: adatum was a partner of record of c-beta all along.
    let late = s.reseller(1, "c-beta", "adatum", true).await;
    let now = s.check("adatum", "c-beta", Topic::General, "", 6, 0).await;
    assert_eq!(
        rule_and_verdict(&now),
        ("PARTNER-OF-RECORD", Verdict::Allowed)
    );
    assert!(now.evidence.contains(&late));
    let as_of_then = s
        .check("adatum", "c-beta", Topic::General, "", 6, then)
        .await;
    assert_eq!(
        as_of_then,
        Assessment {
            tree_size: then,
            ..before.clone()
        }
    );

    let today = s.violations(ListViolationsRequest::default()).await;
    assert!(!ids(&today).contains(&"m-13"));
    let back_then = s
        .violations(ListViolationsRequest {
            as_of_tree_size: then,
            page_size: 2,
            ..Default::default()
        })
        .await;
    assert!(ids(&back_then).contains(&"m-13"));
    server.stop().await;
}

#[tokio::test]
async fn evidence_is_provable_and_re_derives_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut s = Scenario::new(&server.address).await;
    record_scenario(&mut s).await;
    let verifier_key = audit_ledger::keys::load(&dir.path().join("signing.key"))
        .unwrap()
        .verifier_key();

    let question = audit_ledger::policy::Question {
        sender_id: "contoso".into(),
        customer_id: "c-alpha".into(),
        topic: audit_ledger::policy::Topic::Commercial,
        subscription_id: "sub-a1".into(),
        product_id: String::new(),
        at: audit_ledger::ledger::time::Timestamp {
            seconds: EPOCH + 22 * DAY,
            nanos: 0,
        },
    };
    let answer = s
        .check("contoso", "c-alpha", Topic::Commercial, "sub-a1", 22, 0)
        .await;
    assert_eq!(
        rule_and_verdict(&answer),
        ("FORMER-PARTNER", Verdict::Violation)
    );

    let facts = proven_evidence(&mut s, &answer, &verifier_key).await;
    // The evidence alone re-derives the verdict.
    let rederived = audit_ledger::policy::assess(&question, &facts);
    assert_eq!(rederived.rule.name(), answer.rule);
    assert_eq!(rederived.evidence, answer.evidence);
    server.stop().await;
}

/// The answer's evidence, each entry proven included in the latest signed checkpoint (its
/// signature checked against `verifier_key`) and decoded from the proven leaf bytes.
async fn proven_evidence(
    s: &mut Scenario,
    answer: &Assessment,
    verifier_key: &str,
) -> Vec<audit_ledger::policy::RecordedFact> {
    let checkpoint = s
        .ledger
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    let verifier = signed_note::StandardVerifier::new(verifier_key).unwrap();
    signed_note::Note::from_bytes(checkpoint.note.as_bytes())
        .unwrap()
        .verify(&signed_note::VerifierList::new(vec![Box::new(verifier)]))
        .expect("checkpoint signature");
    let root = hash32(&checkpoint.root_hash);
    let mut facts = Vec::new();
    for &index in &answer.evidence {
        assert!(index < answer.tree_size);
        let entry = s
            .ledger
            .get_entry(GetEntryRequest { index })
            .await
            .unwrap()
            .into_inner()
            .entry
            .unwrap();
        let proof = s
            .ledger
            .get_inclusion_proof(GetInclusionProofRequest {
                index,
                tree_size: checkpoint.size,
            })
            .await
            .unwrap()
            .into_inner();
        let leaf_hash = rfc9162::leaf_hash(&entry.leaf);
        assert!(rfc9162::verify_inclusion(
            index,
            checkpoint.size,
            &leaf_hash,
            &proof.hashes,
            &root
        ));
        use prost::Message;
        let record = audit_ledger::proto::LeafRecord::decode(entry.leaf.as_slice()).unwrap();
        let Some(leaf_record::Record::Fact(fact)) = record.record else {
            panic!("evidence {index} is not a fact");
        };
        facts.push(audit_ledger::records::fact::to_policy(index, &fact).unwrap());
    }
    facts
}

#[tokio::test]
async fn reindex_gives_identical_answers() {
    let dir = tempfile::tempdir().unwrap();
    let answers = scenario_answers(dir.path(), true).await;
    let check = answers.2.clone();

    // Damage the derived indexes behind the server's back: c-alpha's facts vanish.
    {
        let store = common::open_any_store(&dir.path().join(audit_ledger::server::STORE_DIR_NAME));
        let index = store.facts;
        let prefix = audit_ledger::compliance::index::list_prefix(b'F', b'c', "c-alpha");
        let end = audit_ledger::compliance::index::prefix_end(&prefix);
        let keys = index.range(&prefix, &end, usize::MAX).unwrap();
        assert!(!keys.is_empty());
        index
            .apply(keys.into_iter().map(|(key, _)| (key, None)).collect())
            .unwrap();
        index.flush().unwrap();
    }
    let damaged = scenario_answers(dir.path(), false).await.2;
    assert_ne!(damaged, check, "the answers come from the indexes");

    let output = std::process::Command::new(common::binary())
        .args(["reindex", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("reindexed 30 entries"),
        "{output:?}"
    );

    assert_eq!(scenario_answers(dir.path(), false).await, answers);
    assert_eq!(rule_and_verdict(&check), ("TRANSITION", Verdict::Allowed));

    // Facts verify like every other entry.
    let output = std::process::Command::new(common::binary())
        .args(["verify", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.starts_with("ok: 30 entries"),
        "{stdout}"
    );
}

/// Every violation, every communication and c-alpha's transition verdict, from a server
/// started on `dir` (and stopped again); with `record`, the scenario is recorded first.
async fn scenario_answers(
    dir: &std::path::Path,
    record: bool,
) -> (Vec<(String, String)>, Vec<String>, Assessment) {
    let server = TestServer::start(dir).await;
    let mut s = Scenario::new(&server.address).await;
    if record {
        record_scenario(&mut s).await;
    }
    let violations = s
        .violations(ListViolationsRequest {
            include_review: true,
            ..Default::default()
        })
        .await;
    let communications = s.communications(ListCommunicationsRequest::default()).await;
    let check = s
        .check("litware", "c-alpha", Topic::Transition, "", 12, 0)
        .await;
    drop(s);
    server.stop().await;
    (violations, communications, check)
}

/// A store from before the fact lists had an index of their own kept them among the
/// communication lists: the first start moves them out, and every answer stays the same.
#[tokio::test]
async fn facts_kept_among_the_communication_lists_are_moved_out() {
    let dir = tempfile::tempdir().unwrap();
    let answers = scenario_answers(dir.path(), true).await;

    let store_dir = dir.path().join(audit_ledger::server::STORE_DIR_NAME);
    let fact_keys = |index: &dyn audit_ledger::storage::IndexStore| {
        index.range(b"F", b"G", usize::MAX).unwrap()
    };
    let moved = {
        // Lay the store out as before: the fact keys in `index`, no `facts` at all.
        let store = common::open_any_store(&store_dir);
        let moved = fact_keys(store.facts.as_ref());
        assert!(moved.len() > 10, "{}", moved.len());
        store
            .index
            .apply(moved.iter().cloned().map(|(k, v)| (k, Some(v))).collect())
            .unwrap();
        store.index.flush().unwrap();
        store.facts.clear().unwrap();
        store.facts.flush().unwrap();
        moved
    };
    assert_eq!(scenario_answers(dir.path(), false).await, answers);
    {
        let store = common::open_any_store(&store_dir);
        assert_eq!(fact_keys(store.facts.as_ref()), moved);
        assert!(fact_keys(store.index.as_ref()).is_empty());
        // A crash that lost the fact lists and their watermark, not the communication
        // lists (they are written apart): the facts are indexed again from the ledger.
        store.facts.clear().unwrap();
        store.facts.flush().unwrap();
    }
    assert_eq!(scenario_answers(dir.path(), false).await, answers);
    let store = common::open_any_store(&store_dir);
    assert_eq!(fact_keys(store.facts.as_ref()), moved);
}

#[tokio::test]
async fn bad_compliance_input_is_invalid_argument_and_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut s = Scenario::new(&server.address).await;
    s.party("contoso", PartyKind::DirectBillPartner).await;
    let size = s.tree_size().await;

    let good = || Fact {
        fact_id: "f-x".into(),
        effective_at: Some(at(1, 0)),
        kind: Some(Kind::Party(Party {
            party_id: "p".into(),
            kind: PartyKind::Vendor as i32,
            display_name: String::new(),
        })),
    };
    let cases: Vec<(&str, Option<Fact>)> = vec![
        ("fact", None),
        (
            "fact.fact_id",
            Some(Fact {
                fact_id: String::new(),
                ..good()
            }),
        ),
        (
            "fact.effective_at",
            Some(Fact {
                effective_at: None,
                ..good()
            }),
        ),
        (
            "fact.kind",
            Some(Fact {
                kind: None,
                ..good()
            }),
        ),
        (
            "fact.party.kind",
            Some(Fact {
                kind: Some(Kind::Party(Party {
                    party_id: "p".into(),
                    kind: 99,
                    display_name: String::new(),
                })),
                ..good()
            }),
        ),
        (
            "fact.reseller_relationship.customer_id",
            Some(Fact {
                kind: Some(Kind::ResellerRelationship(ResellerRelationship {
                    customer_id: String::new(),
                    partner_id: "p".into(),
                    active: true,
                })),
                ..good()
            }),
        ),
        (
            "fact.transfer.subscription_id",
            Some(Fact {
                kind: Some(Kind::Transfer(Transfer {
                    // A transfer may name a subscription not recorded yet (facts arrive in
                    // any order), but it must name one.
                    subscription_id: String::new(),
                    from_partner_id: "a".into(),
                    to_partner_id: "b".into(),
                    state: TransferState::Started as i32,
                })),
                ..good()
            }),
        ),
    ];
    for (field, fact) in cases {
        let status = s
            .compliance
            .record_fact(RecordFactRequest { fact })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    assert_eq!(s.tree_size().await, size, "nothing recorded");

    // Facts are idempotent by fact_id.
    let first = s
        .compliance
        .record_fact(RecordFactRequest { fact: Some(good()) })
        .await
        .unwrap()
        .into_inner();
    let again = s
        .compliance
        .record_fact(RecordFactRequest { fact: Some(good()) })
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate && again.index == first.index);
    let conflict = s
        .compliance
        .record_fact(RecordFactRequest {
            fact: Some(Fact {
                effective_at: Some(at(2, 0)),
                ..good()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);

    let check = |sender: &str, topic: i32, as_of: u64| CheckSenderRequest {
        sender_id: sender.into(),
        customer_id: "c".into(),
        topic,
        subscription_id: String::new(),
        product_id: String::new(),
        at: None,
        as_of_tree_size: as_of,
    };
    for (request, field) in [
        (check("", Topic::General as i32, 0), "sender_id"),
        (check("contoso", 0, 0), "topic"),
        (check("contoso", 42, 0), "topic"),
        (
            check("contoso", Topic::General as i32, 1_000_000),
            "as_of_tree_size",
        ),
    ] {
        let status = s.compliance.check_sender(request).await.unwrap_err();
        // A size past the tree is OUT_OF_RANGE, in every method.
        let code = if field == "as_of_tree_size" {
            Code::OutOfRange
        } else {
            Code::InvalidArgument
        };
        assert_eq!(status.code(), code);
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    // An unknown sender is an answer, not an error; `at` unset means now.
    let unknown = s
        .compliance
        .check_sender(check("nobody", Topic::General as i32, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unknown.assessment.unwrap().rule, "UNKNOWN-SENDER");

    for (request, field) in [
        (
            ListViolationsRequest {
                page_token: "forged".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListViolationsRequest {
                rule: "NOT-A-RULE".into(),
                ..Default::default()
            },
            "rule",
        ),
        (
            ListViolationsRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListViolationsRequest {
                as_of_tree_size: 1_000_000,
                ..Default::default()
            },
            "as_of_tree_size",
        ),
        (
            ListViolationsRequest {
                from: Some(at(5, 0)),
                to: Some(at(4, 0)),
                ..Default::default()
            },
            "to",
        ),
    ] {
        let status = s.compliance.list_violations(request).await.unwrap_err();
        let code = if field == "as_of_tree_size" {
            Code::OutOfRange
        } else {
            Code::InvalidArgument
        };
        assert_eq!(status.code(), code);
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    // A token issued for another listing (or other filters) is refused too.
    for n in 0..3 {
        s.send(Message {
            n,
            sender: "contoso",
            customer: "c",
            topic: Topic::General,
            subscription: "",
            product: "",
            day: 1,
        })
        .await;
    }
    let page = s
        .compliance
        .list_communications(ListCommunicationsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!page.next_page_token.is_empty());
    let status = s
        .compliance
        .list_violations(ListViolationsRequest {
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = s
        .compliance
        .list_communications(ListCommunicationsRequest {
            customer_id: "other".into(),
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(status.message().starts_with("page_token"));
    server.stop().await;
}

/// Facts of the issue-17 world: c1 holds sub-1 and sub-2 (billed by contoso), whose sub-1 is
/// moving to fabrikam from day 3; customer d holds sub-d, moving to litware from day 3.
/// Returns the indices of sub-1's and sub-2's subscription facts.
async fn record_two_customers_with_transfers(s: &mut Scenario) -> (u64, u64) {
    s.party("contoso", PartyKind::DirectBillPartner).await;
    s.party("fabrikam", PartyKind::IndirectReseller).await;
    s.party("litware", PartyKind::IndirectReseller).await;
    let subscription = |id: &str, customer: &str| {
        Kind::Subscription(Subscription {
            subscription_id: id.into(),
            customer_id: customer.into(),
            biller_id: "contoso".into(),
            support_contact_id: String::new(),
            provider_id: String::new(),
            active: true,
        })
    };
    let transfer = |id: &str, to: &str| {
        Kind::Transfer(Transfer {
            subscription_id: id.into(),
            from_partner_id: "contoso".into(),
            to_partner_id: to.into(),
            state: TransferState::Started as i32,
        })
    };
    s.reseller(1, "c1", "contoso", true).await;
    let sub_1 = s.fact(1, subscription("sub-1", "c1")).await;
    let sub_2 = s.fact(1, subscription("sub-2", "c1")).await;
    s.reseller(1, "d", "contoso", true).await;
    s.fact(1, subscription("sub-d", "d")).await;
    s.fact(3, transfer("sub-1", "fabrikam")).await;
    s.fact(3, transfer("sub-d", "litware")).await;
    (sub_1, sub_2)
}

/// Issue 17: another customer's subscription is unknown for c1, and so is everything reached
/// through it — at ingestion, in CheckSender and in ListViolations.
#[tokio::test]
async fn another_customers_transfer_never_reaches_this_customers_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut s = Scenario::new(&server.address).await;
    record_two_customers_with_transfers(&mut s).await;
    let message = |n, sender, customer, subscription| Message {
        n,
        sender,
        customer,
        topic: Topic::Transition,
        subscription,
        product: "",
        day: 4,
    };
    for (n, sender, customer, subscription, expected) in [
        (
            1,
            "litware",
            "c1",
            "sub-d",
            ("NOT-A-PARTNER", Verdict::Violation),
        ),
        (
            2,
            "litware",
            "c1",
            "",
            ("NOT-A-PARTNER", Verdict::Violation),
        ),
        (
            3,
            "fabrikam",
            "c1",
            "sub-d",
            ("NOT-A-PARTNER", Verdict::Violation),
        ),
        (4, "litware", "d", "sub-d", ("TRANSITION", Verdict::Allowed)),
    ] {
        let (_, at_ingestion) = s.send(message(n, sender, customer, subscription)).await;
        assert_eq!(rule_and_verdict(&at_ingestion), expected, "m-{n}");
        let checked = s
            .check(sender, customer, Topic::Transition, subscription, 4, 0)
            .await;
        assert_eq!(rule_and_verdict(&checked), expected, "m-{n}");
    }
    let violations = s
        .violations(ListViolationsRequest {
            customer_id: "c1".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        violations,
        vec![
            ("m-1".to_string(), "NOT-A-PARTNER".to_string()),
            ("m-2".to_string(), "NOT-A-PARTNER".to_string()),
            ("m-3".to_string(), "NOT-A-PARTNER".to_string()),
        ]
    );
    server.stop().await;
}

/// Issue 17: one reading of rows 11-12. While sub-1 of c1 moves to fabrikam, fabrikam may talk
/// TRANSITION with c1 whichever of c1's subscriptions it names, or none; the evidence ties
/// the moving subscription and the named one to c1, is provable, and re-derives the answer.
#[tokio::test]
async fn transition_talk_is_allowed_whichever_of_the_customers_subscriptions_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut s = Scenario::new(&server.address).await;
    let (sub_1, sub_2) = record_two_customers_with_transfers(&mut s).await;
    let verifier_key = audit_ledger::keys::load(&dir.path().join("signing.key"))
        .unwrap()
        .verifier_key();
    for (topic, named, expected) in [
        (Topic::Transition, "sub-1", ("TRANSITION", Verdict::Allowed)),
        (Topic::Transition, "sub-2", ("TRANSITION", Verdict::Allowed)),
        (Topic::Transition, "", ("TRANSITION", Verdict::Allowed)),
        (
            Topic::Commercial,
            "sub-1",
            ("TRANSFER-PENDING", Verdict::Violation),
        ),
        (
            Topic::Support,
            "sub-1",
            ("TRANSFER-PENDING", Verdict::Violation),
        ),
    ] {
        let answer = s.check("fabrikam", "c1", topic, named, 4, 0).await;
        assert_eq!(rule_and_verdict(&answer), expected, "{topic:?} {named:?}");
        assert!(
            answer.evidence.contains(&sub_1),
            "{named:?}: {:?}",
            answer.evidence
        );
        if named == "sub-2" {
            assert!(answer.evidence.contains(&sub_2), "{:?}", answer.evidence);
        }
        let facts = proven_evidence(&mut s, &answer, &verifier_key).await;
        // Every transfer cited is shown, by the evidence itself, to move c1's subscription.
        for fact in &facts {
            if let audit_ledger::policy::Fact::Transfer {
                subscription_id, ..
            } = &fact.fact
            {
                assert!(facts.iter().any(|f| matches!(&f.fact,
                    audit_ledger::policy::Fact::Subscription { subscription_id: s, customer_id, .. }
                        if s == subscription_id && customer_id == "c1")));
            }
        }
        let question = audit_ledger::policy::Question {
            sender_id: "fabrikam".into(),
            customer_id: "c1".into(),
            topic: match topic {
                Topic::Commercial => audit_ledger::policy::Topic::Commercial,
                Topic::Support => audit_ledger::policy::Topic::Support,
                _ => audit_ledger::policy::Topic::Transition,
            },
            subscription_id: named.into(),
            product_id: String::new(),
            at: audit_ledger::ledger::time::Timestamp {
                seconds: EPOCH + 4 * DAY,
                nanos: 0,
            },
        };
        let rederived = audit_ledger::policy::assess(&question, &facts);
        assert_eq!(rederived.rule.name(), answer.rule);
        assert_eq!(rederived.evidence, answer.evidence);
    }
    server.stop().await;
}

/// Issue 17: facts arrive in any order. A transfer whose subscription is not recorded yet,
/// and a relationship whose partner is not registered yet, are accepted; until the missing
/// fact arrives the question is answered without it (the transfer reaches no customer, the
/// partner is an unknown sender), afterwards with it, and the earlier answer stays
/// reproducible as of its tree size.
#[tokio::test]
async fn facts_recorded_in_any_order_are_accepted_and_judged_as_they_stand() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut s = Scenario::new(&server.address).await;
    s.party("contoso", PartyKind::DirectBillPartner).await;
    s.party("fabrikam", PartyKind::IndirectReseller).await;
    s.reseller(1, "c1", "contoso", true).await;
    let transfer = s
        .fact(
            3,
            Kind::Transfer(Transfer {
                subscription_id: "sub-1".into(),
                from_partner_id: "contoso".into(),
                to_partner_id: "fabrikam".into(),
                state: TransferState::Started as i32,
            }),
        )
        .await;
    let partnerless = s.reseller(1, "c1", "northwind", true).await;
    let before = s.tree_size().await;
    let transition = s.check("fabrikam", "c1", Topic::Transition, "", 4, 0).await;
    assert_eq!(
        rule_and_verdict(&transition),
        ("NOT-A-PARTNER", Verdict::Violation)
    );
    let unknown = s.check("northwind", "c1", Topic::General, "", 4, 0).await;
    assert_eq!(
        rule_and_verdict(&unknown),
        ("UNKNOWN-SENDER", Verdict::Violation)
    );

    // The missing facts arrive, effective from day 1.
    let subscription = s
        .fact(
            1,
            Kind::Subscription(Subscription {
                subscription_id: "sub-1".into(),
                customer_id: "c1".into(),
                biller_id: "contoso".into(),
                support_contact_id: String::new(),
                provider_id: String::new(),
                active: true,
            }),
        )
        .await;
    let party = s.party("northwind", PartyKind::DirectBillPartner).await;
    let now = s.check("fabrikam", "c1", Topic::Transition, "", 4, 0).await;
    assert_eq!(rule_and_verdict(&now), ("TRANSITION", Verdict::Allowed));
    assert!(now.evidence.contains(&transfer) && now.evidence.contains(&subscription));
    let partner = s.check("northwind", "c1", Topic::General, "", 4, 0).await;
    assert_eq!(
        rule_and_verdict(&partner),
        ("PARTNER-OF-RECORD", Verdict::Allowed)
    );
    assert!(partner.evidence.contains(&partnerless) && partner.evidence.contains(&party));
    // Before the transfer took effect, it was not in progress.
    let earlier = s.check("fabrikam", "c1", Topic::Transition, "", 2, 0).await;
    assert_eq!(
        rule_and_verdict(&earlier),
        ("NOT-A-PARTNER", Verdict::Violation)
    );
    // As of the tree size before they arrived, the old answers, unchanged.
    let as_of = s
        .check("fabrikam", "c1", Topic::Transition, "", 4, before)
        .await;
    assert_eq!(as_of, transition);
    server.stop().await;
}

//! The compliance API as tools use it, through the real server: answers that carry what
//! they judged at, violation filters, and paging that says when a listing ends (AIP-158).

mod common;

use audit_ledger::config::ServerConfig;
use audit_ledger::proto::access_log_service_client::AccessLogServiceClient;
use audit_ledger::proto::compliance_service_client::ComplianceServiceClient;
use audit_ledger::proto::fact::Kind;
use audit_ledger::proto::{
    AppendBatchRequest, AppendRequest, Assessment, CheckSenderRequest, Communication,
    DirectAgreement, Fact, ListAccessLogRequest, ListCommunicationsRequest, ListViolationsRequest,
    Party, PartyKind, RecordFactRequest, ResellerRelationship, Subscription, Topic, VerdictFilter,
    leaf_record,
};
use common::TestServer;
use tonic::transport::Channel;

const DAY: i64 = 86_400;
/// 2026-01-01T00:00:00Z.
const YEAR_START: i64 = 1_767_225_600;

fn day(n: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: YEAR_START + n * DAY,
        nanos: 0,
    }
}

struct Api {
    ledger: common::Client,
    compliance: ComplianceServiceClient<Channel>,
    access: AccessLogServiceClient<Channel>,
    facts: u64,
}

impl Api {
    async fn new(address: &str) -> Api {
        let channel = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Api {
            ledger: common::connect(address).await,
            compliance: ComplianceServiceClient::new(channel.clone()),
            access: AccessLogServiceClient::new(channel),
            facts: 0,
        }
    }

    async fn fact(&mut self, kind: Kind) -> u64 {
        self.facts += 1;
        self.compliance
            .record_fact(RecordFactRequest {
                fact: Some(Fact {
                    fact_id: format!("fact-{}", self.facts),
                    effective_at: Some(day(0)),
                    kind: Some(kind),
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .index
    }

    /// msft (vendor), contoso (partner of record of c-alpha, bills sub-a1 and sub-a2),
    /// adatum (a partner with no relationship), and c-alpha's direct agreement for
    /// dynamics.
    async fn history(&mut self) {
        for (party_id, kind) in [
            ("msft", PartyKind::Vendor),
            ("contoso", PartyKind::DirectBillPartner),
            ("adatum", PartyKind::DirectBillPartner),
        ] {
            self.fact(Kind::Party(Party {
                party_id: party_id.into(),
                kind: kind as i32,
                display_name: party_id.into(),
            }))
            .await;
        }
        self.fact(Kind::ResellerRelationship(ResellerRelationship {
            customer_id: "c-alpha".into(),
            partner_id: "contoso".into(),
            active: true,
        }))
        .await;
        for subscription_id in ["sub-a1", "sub-a2"] {
            self.fact(Kind::Subscription(Subscription {
                subscription_id: subscription_id.into(),
                customer_id: "c-alpha".into(),
                biller_id: "contoso".into(),
                active: true,
                ..Default::default()
            }))
            .await;
        }
        self.fact(Kind::DirectAgreement(DirectAgreement {
            customer_id: "c-alpha".into(),
            product_id: "dynamics".into(),
            active: true,
        }))
        .await;
    }

    async fn send(&mut self, message: Communication) -> Assessment {
        self.ledger
            .append(AppendRequest {
                communication: Some(message),
            })
            .await
            .unwrap()
            .into_inner()
            .assessment
            .unwrap()
    }

    /// Every page of a violations listing: (message ids, pages it took).
    async fn violations(&mut self, request: ListViolationsRequest) -> (Vec<String>, usize) {
        let mut request = request;
        let (mut ids, mut pages) = (Vec::new(), 0);
        loop {
            let page = self
                .compliance
                .list_violations(request.clone())
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            ids.extend(
                page.violations
                    .into_iter()
                    .map(|v| message_id(&v.entry.unwrap())),
            );
            if page.next_page_token.is_empty() {
                return (ids, pages);
            }
            request.page_token = page.next_page_token;
        }
    }
}

fn message_id(entry: &audit_ledger::proto::Entry) -> String {
    match entry.record.as_ref().unwrap().record.as_ref().unwrap() {
        leaf_record::Record::Communication(c) => c.message_id.clone(),
        leaf_record::Record::Fact(_) => panic!("not a communication"),
    }
}

/// A communication to c-alpha on day `on`.
fn message(id: &str, sender: &str, topic: Topic, about: (&str, &str), on: i64) -> Communication {
    Communication {
        message_id: id.into(),
        sender_id: sender.into(),
        customer_id: "c-alpha".into(),
        topic: topic as i32,
        channel: "email".into(),
        sent_at: Some(day(on)),
        subject: format!("message {id}"),
        body: b"text".to_vec(),
        attributes: Default::default(),
        subscription_id: about.0.into(),
        product_id: about.1.into(),
    }
}

/// The communications of the filter tests, with the verdict each gets: violations m1, m2,
/// m3, m7; reviews m4, m5; allowed m6, m8.
fn mixed() -> Vec<Communication> {
    vec![
        message("m1", "adatum", Topic::General, ("", ""), 3),
        message("m2", "adatum", Topic::Commercial, ("sub-a1", ""), 4),
        message("m3", "msft", Topic::Commercial, ("sub-a1", ""), 5),
        message("m4", "msft", Topic::General, ("", "azure-sphere"), 6),
        message("m5", "msft", Topic::Support, ("", "azure-sphere"), 7),
        message("m6", "contoso", Topic::Commercial, ("sub-a1", ""), 8),
        message("m7", "adatum", Topic::Support, ("", "azure-sphere"), 9),
        message("m8", "msft", Topic::Commercial, ("", "dynamics"), 10),
    ]
}

#[tokio::test]
async fn every_assessment_names_the_instant_it_judged_and_reproduces_from_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut api = Api::new(&server.address).await;
    api.history().await;

    // Append: judged at its sent_at.
    let appended = api
        .send(message("m3", "msft", Topic::Commercial, ("sub-a1", ""), 5))
        .await;
    assert_eq!(appended.at, Some(day(5)));
    assert_eq!(appended.rule, "VENDOR-CSP");
    // AppendBatch: each at its own sent_at.
    let batch = api
        .ledger
        .append_batch(AppendBatchRequest {
            communications: vec![
                message("m1", "adatum", Topic::General, ("", ""), 3),
                message("m6", "contoso", Topic::Commercial, ("sub-a1", ""), 8),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let instants: Vec<_> = batch
        .results
        .iter()
        .map(|result| result.assessment.as_ref().unwrap().at)
        .collect();
    assert_eq!(instants, [Some(day(3)), Some(day(8))]);

    // CheckSender with `at`: that instant. Without: the instant actually used, now.
    let question = |at| CheckSenderRequest {
        sender_id: "contoso".into(),
        customer_id: "c-alpha".into(),
        topic: Topic::Commercial as i32,
        subscription_id: "sub-a1".into(),
        at,
        ..Default::default()
    };
    let answer = |response: tonic::Response<audit_ledger::proto::CheckSenderResponse>| {
        response.into_inner().assessment.unwrap()
    };
    let given = answer(
        api.compliance
            .check_sender(question(Some(day(2))))
            .await
            .unwrap(),
    );
    assert_eq!(given.at, Some(day(2)));
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let unset = answer(api.compliance.check_sender(question(None)).await.unwrap());
    let after = before + 60;
    let at = unset.at.expect("the instant used is filled in");
    assert!(
        (before..=after).contains(&at.seconds),
        "{at:?} is not the time of the call"
    );

    // The answer alone reproduces it, whatever is recorded after.
    api.send(message("m9", "contoso", Topic::General, ("", ""), 12))
        .await;
    let again = answer(
        api.compliance
            .check_sender(CheckSenderRequest {
                at: unset.at,
                as_of_tree_size: unset.tree_size,
                ..question(None)
            })
            .await
            .unwrap(),
    );
    assert_eq!(again, unset);

    // ListViolations: each judged at its sent_at, at the listing's tree size.
    let page = api
        .compliance
        .list_violations(ListViolationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<_> = page
        .violations
        .iter()
        .map(|v| {
            let assessment = v.assessment.as_ref().unwrap();
            (message_id(v.entry.as_ref().unwrap()), assessment.at)
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("m1".to_string(), Some(day(3))),
            ("m3".into(), Some(day(5)))
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn violations_filter_by_topic_subscription_product_and_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut api = Api::new(&server.address).await;
    api.history().await;
    for communication in mixed() {
        api.send(communication).await;
    }
    let ids = |list: &[&str]| list.iter().map(|id| id.to_string()).collect::<Vec<_>>();
    let both = VerdictFilter::ViolationsAndReviews as i32;
    for (request, expected) in [
        // Unset: violations only, as before the filter; include_review adds the reviews.
        (
            ListViolationsRequest::default(),
            ids(&["m1", "m2", "m3", "m7"]),
        ),
        (
            ListViolationsRequest {
                include_review: true,
                ..Default::default()
            },
            ids(&["m1", "m2", "m3", "m4", "m5", "m7"]),
        ),
        (
            ListViolationsRequest {
                verdicts: VerdictFilter::Violations as i32,
                include_review: true,
                ..Default::default()
            },
            ids(&["m1", "m2", "m3", "m7"]),
        ),
        (
            ListViolationsRequest {
                verdicts: VerdictFilter::Reviews as i32,
                ..Default::default()
            },
            ids(&["m4", "m5"]),
        ),
        (
            ListViolationsRequest {
                verdicts: both,
                ..Default::default()
            },
            ids(&["m1", "m2", "m3", "m4", "m5", "m7"]),
        ),
        (
            ListViolationsRequest {
                topic: Topic::Commercial as i32,
                ..Default::default()
            },
            ids(&["m2", "m3"]),
        ),
        (
            ListViolationsRequest {
                subscription_id: "sub-a1".into(),
                ..Default::default()
            },
            ids(&["m2", "m3"]),
        ),
        (
            ListViolationsRequest {
                product_id: "azure-sphere".into(),
                ..Default::default()
            },
            ids(&["m7"]),
        ),
        (
            ListViolationsRequest {
                product_id: "azure-sphere".into(),
                verdicts: both,
                ..Default::default()
            },
            ids(&["m4", "m5", "m7"]),
        ),
        // Filters combine with AND.
        (
            ListViolationsRequest {
                subscription_id: "sub-a1".into(),
                sender_id: "adatum".into(),
                ..Default::default()
            },
            ids(&["m2"]),
        ),
        (
            ListViolationsRequest {
                product_id: "azure-sphere".into(),
                topic: Topic::Support as i32,
                verdicts: VerdictFilter::Reviews as i32,
                ..Default::default()
            },
            ids(&["m5"]),
        ),
        (
            ListViolationsRequest {
                subscription_id: "sub-a2".into(),
                verdicts: both,
                ..Default::default()
            },
            ids(&[]),
        ),
    ] {
        let described = format!("{request:?}");
        for page_size in [0, 1] {
            let (found, _) = api
                .violations(ListViolationsRequest {
                    page_size,
                    ..request.clone()
                })
                .await;
            assert_eq!(found, expected, "{described} page_size {page_size}");
        }
    }
    // A filter that names no known verdict filter, or both a subscription and a product.
    for request in [
        ListViolationsRequest {
            verdicts: 99,
            ..Default::default()
        },
        ListViolationsRequest {
            subscription_id: "sub-a1".into(),
            product_id: "azure-sphere".into(),
            ..Default::default()
        },
    ] {
        let status = api.compliance.list_violations(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    server.stop().await;
}

/// ListCommunications filters by product as ListViolations does, combined with the others
/// by AND; naming a subscription and a product at once is INVALID_ARGUMENT naming
/// `product_id`.
#[tokio::test]
async fn communications_filter_by_product() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut api = Api::new(&server.address).await;
    api.history().await;
    for communication in mixed() {
        api.send(communication).await;
    }
    for (request, expected) in [
        (
            ListCommunicationsRequest {
                product_id: "azure-sphere".into(),
                ..Default::default()
            },
            vec!["m4", "m5", "m7"],
        ),
        (
            ListCommunicationsRequest {
                product_id: "azure-sphere".into(),
                sender_id: "msft".into(),
                topic: Topic::Support as i32,
                ..Default::default()
            },
            vec!["m5"],
        ),
        (
            ListCommunicationsRequest {
                product_id: "dynamics".into(),
                ..Default::default()
            },
            vec!["m8"],
        ),
    ] {
        let found: Vec<String> = api
            .compliance
            .list_communications(request.clone())
            .await
            .unwrap()
            .into_inner()
            .entries
            .iter()
            .map(message_id)
            .collect();
        assert_eq!(found, expected, "{request:?}");
    }
    let status = api
        .compliance
        .list_communications(ListCommunicationsRequest {
            subscription_id: "sub-a1".into(),
            product_id: "dynamics".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("product_id"), "{status:?}");
    server.stop().await;
}

/// A filter with an index is answered from it: among many other communications, the few
/// about one subscription come in one page even when a page may look at few candidates;
/// and paging stays pinned to the first page's tree size.
#[tokio::test]
async fn an_indexed_filter_reads_its_index_and_paging_stays_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    if let Ok(kind) = std::env::var("AUDIT_LEDGER_STORAGE") {
        config.storage = kind.parse().unwrap();
    }
    config.query_limits.max_scan_per_page = 10;
    let server = TestServer::start_with(config).await;
    let mut api = Api::new(&server.address).await;
    api.history().await;
    for n in 0..40 {
        api.send(message(
            &format!("other-{n}"),
            "adatum",
            Topic::Commercial,
            ("sub-a2", ""),
            20,
        ))
        .await;
    }
    api.send(message(
        "m2",
        "adatum",
        Topic::Commercial,
        ("sub-a1", ""),
        4,
    ))
    .await;
    api.send(message("m3", "msft", Topic::Commercial, ("sub-a1", ""), 5))
        .await;
    let by_subscription = ListViolationsRequest {
        subscription_id: "sub-a1".into(),
        ..Default::default()
    };
    assert_eq!(
        api.violations(by_subscription.clone()).await,
        (vec!["m2".to_string(), "m3".to_string()], 1),
        "the subscription's list, not a scan of every communication"
    );
    // A filter with no index (topic) scans, so its pages are bounded by the budget.
    let (found, pages) = api
        .violations(ListViolationsRequest {
            topic: Topic::Commercial as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(found.len(), 42);
    assert!(pages > 1);

    // Pinned: a violation recorded after the first page is not in the listing, and every
    // page is judged at the first page's tree size.
    let first = api
        .compliance
        .list_violations(ListViolationsRequest {
            page_size: 1,
            ..by_subscription.clone()
        })
        .await
        .unwrap()
        .into_inner();
    let pinned = first.violations[0].assessment.as_ref().unwrap().tree_size;
    api.send(message("late", "adatum", Topic::Support, ("sub-a1", ""), 6))
        .await;
    let second = api
        .compliance
        .list_violations(ListViolationsRequest {
            page_size: 1,
            page_token: first.next_page_token,
            ..by_subscription.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        message_id(second.violations[0].entry.as_ref().unwrap()),
        "m3"
    );
    assert_eq!(
        second.violations[0].assessment.as_ref().unwrap().tree_size,
        pinned
    );
    assert!(second.next_page_token.is_empty());
    server.stop().await;
}

/// AIP-158: no next-page token when the page ends the listing, so N results at page size
/// N take one call; one fewer per page takes two, the second ending it.
#[tokio::test]
async fn a_listing_of_n_at_page_size_n_takes_one_call_in_every_paged_method() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut api = Api::new(&server.address).await;
    api.history().await;
    for communication in mixed() {
        api.send(communication).await;
    }
    // Violations: 4 (m1, m2, m3, m7).
    for (page_size, pages) in [(4, 1), (5, 1), (3, 2), (2, 2)] {
        let (found, took) = api
            .violations(ListViolationsRequest {
                page_size,
                ..Default::default()
            })
            .await;
        assert_eq!(found.len(), 4);
        assert_eq!(took, pages, "violations at page_size {page_size}");
    }
    // Communications: 8.
    let page = api
        .compliance
        .list_communications(ListCommunicationsRequest {
            page_size: 8,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), 8);
    assert!(page.next_page_token.is_empty(), "8 of 8 in one call");
    let page = api
        .compliance
        .list_communications(ListCommunicationsRequest {
            page_size: 7,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!page.next_page_token.is_empty());
    let rest = api
        .compliance
        .list_communications(ListCommunicationsRequest {
            page_size: 7,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.entries.len(), 1);
    assert!(rest.next_page_token.is_empty());
    // An empty listing: one call, no token.
    let none = api
        .compliance
        .list_communications(ListCommunicationsRequest {
            customer_id: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty() && none.next_page_token.is_empty());

    // The access log, a page of one at a time: as many calls as records, the last without
    // a token (an empty trail: one call).
    let (mut records, mut calls, mut token) = (0usize, 0usize, String::new());
    loop {
        let page = api
            .access
            .list_access_log(ListAccessLogRequest {
                page_size: 1,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        calls += 1;
        records += page.records.len();
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(calls, records.max(1));
    server.stop().await;
}

/// The `violations` example of docs/INTEGRATION.md: the new filters from the command line.
#[tokio::test]
async fn the_violations_command_filters_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut api = Api::new(&server.address).await;
    api.history().await;
    for communication in mixed() {
        api.send(communication).await;
    }
    let url = format!("http://{}", server.address);
    let run = |args: Vec<&str>| {
        let url = url.clone();
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::binary())
                .arg("violations")
                .args(["--server", &url])
                .args(&args)
                .output()
                .unwrap()
        })
    };
    let output = run(vec![
        "--subscription",
        "sub-a1",
        "--topic",
        "commercial",
        "--verdicts",
        "both",
        "--output",
        "json",
    ])
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let ids: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            row["message_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids, ["m2", "m3"]);
    let output = run(vec!["--product", "azure-sphere", "--verdicts", "reviews"])
        .await
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("m4") && text.contains("m5") && !text.contains("m7"),
        "{text}"
    );
    server.stop().await;
}

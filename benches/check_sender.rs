//! CheckSender at scale: 100,000 customers and 1,000,000 facts, judged in process (no gRPC),
//! so the number is the cost of the compliance read path itself.
//!
//! `cargo bench --bench check_sender` (env `CUSTOMERS`, `QUESTIONS` to change the scale).

use std::time::{Duration, Instant};

use audit_ledger::config::ServerConfig;
use audit_ledger::ledger::time::Timestamp;
use audit_ledger::policy::{Question, Topic};
use audit_ledger::proto::{
    DirectAgreement, Fact, Party, PartyKind, ResellerRelationship, Subscription, Transfer,
    TransferState, fact::Kind,
};
use audit_ledger::records::prepare_fact;
use audit_ledger::server::Server;

const DAY: i64 = 86_400;
const PARTNERS: u64 = 1_000;

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn fact(id: u64, day: i64, kind: Kind) -> Fact {
    Fact {
        fact_id: format!("fact-{id:09}"),
        effective_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000 + day * DAY,
            nanos: 0,
        }),
        kind: Some(kind),
    }
}

/// Ten facts per customer: two relationships (one ended), three subscriptions, a completed
/// transfer (two facts), two direct agreements, and a re-issued subscription.
fn customer_facts(customer: u64, partners: (u64, u64), next_id: &mut u64) -> Vec<Fact> {
    let c = format!("customer-{customer:06}");
    let p1 = format!("partner-{:04}", partners.0);
    let p2 = format!("partner-{:04}", partners.1);
    let mut facts = Vec::with_capacity(10);
    let mut push = |day, kind| {
        *next_id += 1;
        facts.push(fact(*next_id, day, kind));
    };
    let relationship = |partner: &str, active| {
        Kind::ResellerRelationship(ResellerRelationship {
            customer_id: c.clone(),
            partner_id: partner.to_owned(),
            active,
        })
    };
    let subscription = |n: u32, biller: &str| {
        Kind::Subscription(Subscription {
            subscription_id: format!("{c}-sub-{n}"),
            customer_id: c.clone(),
            biller_id: biller.to_owned(),
            support_contact_id: String::new(),
            provider_id: String::new(),
            active: true,
        })
    };
    push(1, relationship(&p1, true));
    push(1, relationship(&p2, true));
    push(2, subscription(1, &p1));
    push(2, subscription(2, &p1));
    push(3, subscription(3, &p2));
    let transfer = |state| {
        Kind::Transfer(Transfer {
            subscription_id: format!("{c}-sub-1"),
            from_partner_id: p1.clone(),
            to_partner_id: p2.clone(),
            state: state as i32,
        })
    };
    if p1 != p2 {
        push(10, transfer(TransferState::Started));
        push(20, transfer(TransferState::Completed));
    } else {
        push(10, relationship(&p1, true));
        push(20, relationship(&p1, true));
    }
    push(
        5,
        Kind::DirectAgreement(DirectAgreement {
            customer_id: c.clone(),
            product_id: "dynamics-365".into(),
            active: true,
        }),
    );
    push(
        6,
        Kind::DirectAgreement(DirectAgreement {
            customer_id: c.clone(),
            product_id: String::new(),
            active: false,
        }),
    );
    push(25, subscription(2, &p2));
    facts
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let customers: u64 = std::env::var("CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let questions: usize = std::env::var("QUESTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    if let Some(cache) = std::env::var("CACHE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.cache_bytes = cache;
    }
    let limits = config.record_limits.clone();
    let server = Server::open(config).unwrap();
    let ledger = server.ledger().clone();

    // Populate through the real write path (validation, group commit, indexer).
    let started = Instant::now();
    let mut next_id = 0u64;
    let mut pending = vec![
        prepare_fact(
            fact(
                0,
                0,
                Kind::Party(Party {
                    party_id: "msft".into(),
                    kind: PartyKind::Vendor as i32,
                    display_name: "Vendor".into(),
                }),
            ),
            "fact",
            &limits,
            "bench",
        )
        .unwrap(),
    ];
    for p in 0..PARTNERS {
        next_id += 1;
        let party = Party {
            party_id: format!("partner-{p:04}"),
            kind: PartyKind::DirectBillPartner as i32,
            display_name: String::new(),
        };
        pending.push(
            prepare_fact(
                fact(1_000_000_000 + p, 0, Kind::Party(party)),
                "fact",
                &limits,
                "bench",
            )
            .unwrap(),
        );
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let partners_of: Vec<(u64, u64)> = (0..customers)
        .map(|_| (rng.below(PARTNERS), rng.below(PARTNERS)))
        .collect();
    for customer in 0..customers {
        for f in customer_facts(customer, partners_of[customer as usize], &mut next_id) {
            pending.push(prepare_fact(f, "fact", &limits, "bench").unwrap());
        }
        if pending.len() >= 2_000 {
            runtime
                .block_on(ledger.append(std::mem::take(&mut pending)))
                .unwrap();
        }
    }
    runtime.block_on(ledger.append(pending)).unwrap();
    let facts = ledger.tree_size();
    let populate = started.elapsed();
    println!(
        "populated {facts} facts for {customers} customers in {:.1}s ({:.0} facts/s)",
        populate.as_secs_f64(),
        facts as f64 / populate.as_secs_f64()
    );

    let compliance = server.compliance().clone();
    let topics = [
        Topic::Commercial,
        Topic::Support,
        Topic::Operational,
        Topic::Transition,
        Topic::General,
    ];
    // Two passes over fresh random questions: the first right after loading (cold), the
    // second as a server that has been up for a while sees it (warm).
    for pass in ["cold", "warm"] {
        let mut latencies = Vec::with_capacity(questions);
        let mut rules = std::collections::BTreeMap::new();
        let started = Instant::now();
        for _ in 0..questions {
            let customer = rng.below(customers);
            // Mostly the customer's own partners or the vendor, sometimes anyone.
            let (p1, p2) = partners_of[customer as usize];
            let sender = match rng.below(10) {
                0..=3 => format!("partner-{p1:04}"),
                4..=6 => format!("partner-{p2:04}"),
                7 => "msft".to_owned(),
                _ => format!("partner-{:04}", rng.below(PARTNERS)),
            };
            let question = Question {
                sender_id: sender,
                customer_id: format!("customer-{customer:06}"),
                topic: topics[rng.below(5) as usize],
                subscription_id: format!("customer-{customer:06}-sub-{}", 1 + rng.below(3)),
                product_id: String::new(),
                at: Timestamp {
                    seconds: 1_700_000_000 + rng.below(30) as i64 * DAY,
                    nanos: 0,
                },
            };
            let one = Instant::now();
            let assessment = compliance.check(&question, 0).unwrap().assessment;
            latencies.push(one.elapsed());
            *rules.entry(assessment.rule.name()).or_insert(0u64) += 1;
        }
        let elapsed = started.elapsed();
        latencies.sort();
        println!(
            "check_sender ({pass}): {questions} questions, {:.0}/s on one thread, p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
            questions as f64 / elapsed.as_secs_f64(),
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            percentile(&latencies, 0.999),
            latencies.last().unwrap()
        );
        println!("rules decided ({pass}): {rules:?}");
    }
    runtime.block_on(ledger.shutdown());
}

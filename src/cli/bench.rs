//! `audit-ledger bench`: load a running server over real gRPC and report throughput and
//! latency percentiles per scenario, beside the `noop` ceiling of the RPC stack (the health
//! check) measured the same way on the same machine. Part of the binary: it drives the
//! service from outside, through the library's public items only.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use tonic::transport::Channel;

use audit_ledger::client::output::Progress;
use audit_ledger::client::{Authed, Bearer};
use audit_ledger::config::ServerConfig;

use audit_ledger::proto::compliance_service_client::ComplianceServiceClient;
use audit_ledger::proto::ledger_service_client::LedgerServiceClient;
use audit_ledger::proto::{
    AppendBatchRequest, AppendRequest, CheckSenderRequest, Communication, Fact,
    GetCheckpointRequest, GetConsistencyProofRequest, GetInclusionProofRequest, Party, PartyKind,
    RecordFactRequest, ResellerRelationship, Subscription, Topic, fact::Kind,
};

/// `audit-ledger bench`'s flags.
#[derive(Args)]
pub struct BenchArgs {
    /// The server to load.
    #[arg(long, default_value_t = super::client::default_server())]
    server: String,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// gRPC connections the requests share.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Communications per AppendBatch (batch scenario, and --populate).
    #[arg(long, default_value_t = super::client::DEFAULT_BATCH)]
    batch: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Instead of measuring, fill the ledger with N communications (N facts with
    /// --scenario check, which needs a registrar's or an admin's token) through batches,
    /// and exit.
    #[arg(long)]
    populate: Option<u64>,
    /// Bearer token.
    #[arg(long, env = "AUDIT_LEDGER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data dir of a stopped ledger (verify scenario).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Run N rounds of noop then the scenario, each --duration long, and report the
    /// scenario's share of noop per round (the JSON line: the median round).
    #[arg(long, value_name = "ROUNDS")]
    versus_noop: Option<usize>,
}

/// `audit-ledger bench`: the verify scenario offline, `--populate`, `--versus-noop` rounds,
/// or one scenario; a line for people, and with `--json` one JSON object last.
pub fn command(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.scenario == Scenario::Verify {
        let data_dir = args
            .data_dir
            .context("the verify scenario needs --data-dir of a stopped ledger")?;
        let (entries, elapsed) = verify_throughput(&data_dir)?;
        let seconds = elapsed.as_secs_f64();
        let rate = entries as f64 / seconds;
        println!("verify: {entries} entries in {seconds:.2}s, {rate:.0} entries/s");
        if args.json {
            let ms = rounded(seconds * 1000.0, 3);
            let line = json!({
                "scenario": "verify",
                "ops_per_sec": rounded(1.0 / seconds, 3),
                "entries_per_sec": rounded(rate, 1),
                "p50_ms": ms,
                "p99_ms": ms,
                "p999_ms": ms,
            });
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    if let Some(count) = args.populate {
        let what = if args.scenario == Scenario::Check {
            "facts"
        } else {
            "communications"
        };
        let progress = Progress::new(Some(count), what);
        let started = Instant::now();
        let written = runtime.block_on(populate(
            &args.server,
            &args.token,
            args.scenario,
            count,
            args.batch,
            |done| progress.set(done, Some(count)),
        ));
        progress.finish();
        let written = written?;
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "populated {written} {what} in {elapsed:.1}s ({:.0}/s)",
            written as f64 / elapsed
        );
        return Ok(ExitCode::SUCCESS);
    }
    let options = BenchOptions {
        server: args.server,
        scenario: args.scenario,
        concurrency: args.concurrency,
        connections: args.connections,
        duration: Duration::from_secs(args.duration.max(1)),
        batch: args.batch,
        token: args.token,
    };
    if let Some(rounds) = args.versus_noop {
        let rounds = runtime.block_on(run_paired(&options, rounds))?;
        for (n, round) in rounds.iter().enumerate() {
            println!(
                "round {}: noop {:.0} calls/s, {} {:.0} ops/s ({:.0} entries/s, p99 {:.3} ms) = {:.1} % of noop",
                n + 1,
                round.noop.ops_per_sec(),
                scenario_name(round.scenario.scenario),
                round.scenario.ops_per_sec(),
                round.scenario.entries_per_sec(),
                round.scenario.p99.as_secs_f64() * 1000.0,
                round.ratio() * 100.0
            );
        }
        if args.json {
            println!("{}", paired_json(&rounds));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let report = runtime.block_on(run(&options))?;
    println!(
        "{}: {} ops in {:.1}s: {:.0} ops/s, {:.0} entries/s; latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms ({} in flight over {} connections)",
        scenario_name(report.scenario),
        report.operations,
        report.elapsed.as_secs_f64(),
        report.ops_per_sec(),
        report.entries_per_sec(),
        report.p50.as_secs_f64() * 1000.0,
        report.p99.as_secs_f64() * 1000.0,
        report.p999.as_secs_f64() * 1000.0,
        options.concurrency,
        options.connections
    );
    if args.json {
        println!("{}", report.json());
    }
    Ok(ExitCode::SUCCESS)
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub server: String,
    pub scenario: Scenario,
    pub concurrency: usize,
    pub connections: usize,
    pub duration: Duration,
    pub batch: usize,
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Unary Append.
    Append,
    /// AppendBatch of `--batch` communications.
    Batch,
    /// grpc.health.v1.Health/Check: the ceiling of the RPC stack.
    Noop,
    /// GetInclusionProof and GetConsistencyProof at random indices and sizes.
    Proof,
    /// CheckSender over the fact base written by `--populate` with `--scenario check`.
    Check,
    /// Offline `verify` of a stopped ledger (`--data-dir`), in entries per second.
    Verify,
}

/// One scenario's result.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub scenario: Scenario,
    pub operations: u64,
    pub entries: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
}

impl BenchReport {
    pub fn ops_per_sec(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64()
    }

    pub fn entries_per_sec(&self) -> f64 {
        self.entries as f64 / self.elapsed.as_secs_f64()
    }

    /// The one-line JSON object the `--json` mode prints last.
    pub fn json(&self) -> serde_json::Value {
        let ms = |d: Duration| rounded(d.as_secs_f64() * 1000.0, 3);
        json!({
            "scenario": scenario_name(self.scenario),
            "ops_per_sec": rounded(self.ops_per_sec(), 1),
            "entries_per_sec": rounded(self.entries_per_sec(), 1),
            "p50_ms": ms(self.p50),
            "p99_ms": ms(self.p99),
            "p999_ms": ms(self.p999),
        })
    }
}

/// One round of a scenario measured right after `noop` under the same load.
#[derive(Debug, Clone)]
pub struct PairedRound {
    pub noop: BenchReport,
    pub scenario: BenchReport,
}

impl PairedRound {
    /// The scenario's calls per second as a share of the noop ceiling's.
    pub fn ratio(&self) -> f64 {
        self.scenario.ops_per_sec() / self.noop.ops_per_sec()
    }
}

/// Runs `noop` then the scenario, `rounds` times, each for the configured duration: the
/// issue-5 targets are ratios to the RPC stack's ceiling, and on a machine whose speed
/// changes from one minute to the next (steal, neighbours) a ratio is only meaningful when
/// both sides are measured in the same minute.
pub async fn run_paired(options: &BenchOptions, rounds: usize) -> anyhow::Result<Vec<PairedRound>> {
    anyhow::ensure!(
        !matches!(options.scenario, Scenario::Noop | Scenario::Verify),
        "--versus-noop compares another online scenario with noop"
    );
    let noop = BenchOptions {
        scenario: Scenario::Noop,
        ..options.clone()
    };
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let noop = run(&noop).await?;
        let scenario = run(options).await?;
        out.push(PairedRound { noop, scenario });
    }
    Ok(out)
}

/// The `--json` line of paired rounds: the round with the median ratio (its scenario's
/// numbers, its noop's calls per second, the ratio), and every round's ratio.
pub fn paired_json(rounds: &[PairedRound]) -> serde_json::Value {
    let mut order: Vec<&PairedRound> = rounds.iter().collect();
    order.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    let median = order[order.len() / 2];
    let mut json = median.scenario.json();
    json["noop_ops_per_sec"] = rounded(median.noop.ops_per_sec(), 1).into();
    json["ratio_to_noop"] = rounded(median.ratio(), 4).into();
    json["ratios"] = rounds
        .iter()
        .map(|round| rounded(round.ratio(), 4))
        .collect();
    json
}

/// `value` to `places` decimals, as the JSON lines print it.
fn rounded(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

pub fn scenario_name(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Append => "append",
        Scenario::Batch => "batch",
        Scenario::Noop => "noop",
        Scenario::Proof => "proof",
        Scenario::Check => "check",
        Scenario::Verify => "verify",
    }
}

async fn channels(server: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        out.push(
            Channel::from_shared(server.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

/// A deterministic generator, one per task.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// Customers and partners of the synthetic fact base.
const CUSTOMERS: u64 = 100_000;
const PARTNERS: u64 = 1_000;

/// A realistic communication: ids of real length, a subject, a ~300-byte body, mixed topics.
pub fn sample_communication(run: u64, task: u64, n: u64, rng_seed: u64) -> Communication {
    let mut rng = Rng(rng_seed | 1);
    let customer = rng.below(CUSTOMERS);
    let partner = rng.below(PARTNERS);
    let topic = [
        Topic::Commercial,
        Topic::Support,
        Topic::Operational,
        Topic::General,
        Topic::Transition,
    ][rng.below(5) as usize];
    let body = format!(
        "Dear customer {customer:06}, this message concerns your Microsoft 365 Business Premium subscription \
         and the renewal planned for next month. Your partner-{partner:04} account team will contact you about \
         licences, seats and billing changes. Reference {run:x}-{task}-{n}. Please do not reply to this automated \
         message; contact your partner's support desk for questions."
    );
    Communication {
        message_id: format!("msg-{run:016x}-{task:04}-{n:010}"),
        sender_id: format!("partner-{partner:04}"),
        customer_id: format!("customer-{customer:06}"),
        topic: topic as i32,
        channel: "email".into(),
        sent_at: Some(prost_types::Timestamp {
            seconds: 1_767_225_600 + (n % 86_400) as i64,
            nanos: 0,
        }),
        subject: format!("Your subscription renewal (ref {n})"),
        body: body.into_bytes(),
        attributes: [("campaign".to_string(), "renewals-2026-q1".to_string())]
            .into_iter()
            .collect(),
        subscription_id: format!("sub-{customer:06}-{}", rng.below(3)),
        product_id: String::new(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs one scenario for the configured duration.
pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        options.scenario != Scenario::Verify,
        "the verify scenario runs offline: use --data-dir"
    );
    let channels = channels(&options.server, options.connections).await?;
    let interceptor = Bearer::new(options.token.as_deref())?;
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    // The tree size for proofs, read once.
    let tree_size = if options.scenario == Scenario::Proof {
        let mut client =
            LedgerServiceClient::with_interceptor(channels[0].clone(), interceptor.clone());
        let size = client
            .get_checkpoint(GetCheckpointRequest::default())
            .await?
            .into_inner()
            .checkpoint
            .map_or(0, |c| c.size);
        anyhow::ensure!(
            size >= 2,
            "the proof scenario needs a populated ledger (--populate)"
        );
        size
    } else {
        0
    };
    let started = Instant::now();
    let deadline = started + options.duration;
    let mut tasks = Vec::with_capacity(options.concurrency);
    for task in 0..options.concurrency.max(1) {
        let channel = channels[task % channels.len()].clone();
        let interceptor = interceptor.clone();
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            worker(
                options,
                channel,
                interceptor,
                task as u64,
                run_id,
                tree_size,
                deadline,
            )
            .await
        }));
    }
    let mut latencies = Vec::new();
    let (mut operations, mut entries) = (0u64, 0u64);
    for task in tasks {
        let (lat, ops, ents) = task.await??;
        latencies.extend(lat);
        operations += ops;
        entries += ents;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(BenchReport {
        scenario: options.scenario,
        operations,
        entries,
        elapsed,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        p999: percentile(&latencies, 0.999),
    })
}

async fn worker(
    options: BenchOptions,
    channel: Channel,
    interceptor: Bearer,
    task: u64,
    run_id: u64,
    tree_size: u64,
    deadline: Instant,
) -> anyhow::Result<(Vec<Duration>, u64, u64)> {
    let mut ledger: LedgerServiceClient<Authed> =
        LedgerServiceClient::with_interceptor(channel.clone(), interceptor.clone())
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024);
    let mut compliance = ComplianceServiceClient::with_interceptor(channel.clone(), interceptor);
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (task + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut latencies = Vec::new();
    let (mut operations, mut entries, mut n) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        let one = Instant::now();
        match options.scenario {
            Scenario::Append => {
                let communication = sample_communication(run_id, task, n, rng.next());
                n += 1;
                ledger
                    .append(AppendRequest {
                        communication: Some(communication),
                    })
                    .await?;
                entries += 1;
            }
            Scenario::Batch => {
                let communications = (0..options.batch.max(1))
                    .map(|_| {
                        n += 1;
                        sample_communication(run_id, task, n, rng.next())
                    })
                    .collect();
                ledger
                    .append_batch(AppendBatchRequest { communications })
                    .await?;
                entries += options.batch.max(1) as u64;
            }
            Scenario::Noop => {
                health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?;
            }
            Scenario::Proof => {
                if rng.below(2) == 0 {
                    let size = 1 + rng.below(tree_size);
                    let index = rng.below(size);
                    ledger
                        .get_inclusion_proof(GetInclusionProofRequest {
                            index,
                            tree_size: size,
                        })
                        .await?;
                } else {
                    let to_size = 1 + rng.below(tree_size);
                    let from_size = 1 + rng.below(to_size);
                    ledger
                        .get_consistency_proof(GetConsistencyProofRequest { from_size, to_size })
                        .await?;
                }
            }
            Scenario::Verify => unreachable!("refused by run()"),
            Scenario::Check => {
                let customer = rng.below(CUSTOMERS);
                compliance
                    .check_sender(CheckSenderRequest {
                        sender_id: format!(
                            "partner-{:04}",
                            (customer * 7 + rng.below(2)) % PARTNERS
                        ),
                        customer_id: format!("customer-{customer:06}"),
                        topic: [Topic::Commercial, Topic::Support, Topic::Operational]
                            [rng.below(3) as usize] as i32,
                        subscription_id: format!("sub-{customer:06}-{}", rng.below(3)),
                        product_id: String::new(),
                        at: None,
                        as_of_tree_size: 0,
                    })
                    .await?;
            }
        }
        latencies.push(one.elapsed());
        operations += 1;
    }
    Ok((latencies, operations, entries))
}

/// Fills the ledger quickly through batches: `count` communications, or for the `check`
/// scenario a fact base of `count` facts (parties, then per customer a relationship with two
/// partners and three subscriptions).
pub async fn populate(
    server: &str,
    token: &Option<String>,
    scenario: Scenario,
    count: u64,
    batch: usize,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<u64> {
    let channel = channels(server, 1).await?.remove(0);
    let interceptor = Bearer::new(token.as_deref())?;
    if scenario == Scenario::Check {
        let mut compliance = ComplianceServiceClient::with_interceptor(channel, interceptor);
        return populate_facts(&mut compliance, count, progress).await;
    }
    let mut ledger = LedgerServiceClient::with_interceptor(channel, interceptor)
        .max_encoding_message_size(256 * 1024 * 1024);
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut rng = Rng(run_id | 1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Communication>>(4);
    // Build batches on one task while the other sends: the client is not the bottleneck.
    let batch = batch.max(1) as u64;
    let producer = tokio::spawn(async move {
        let mut n = 0;
        while n < count {
            let size = batch.min(count - n);
            let communications = (n..n + size)
                .map(|i| sample_communication(run_id, 0, i, rng.next()))
                .collect();
            n += size;
            if tx.send(communications).await.is_err() {
                break;
            }
        }
    });
    let mut written = 0;
    while let Some(communications) = rx.recv().await {
        written += communications.len() as u64;
        ledger
            .append_batch(AppendBatchRequest { communications })
            .await?;
        progress(written);
    }
    producer.await?;
    Ok(written)
}

async fn populate_facts(
    compliance: &mut ComplianceServiceClient<Authed>,
    count: u64,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<u64> {
    let fact = |id: String, kind: Kind| Fact {
        fact_id: id,
        effective_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        kind: Some(kind),
    };
    let mut facts: Vec<Fact> = (0..PARTNERS)
        .map(|p| {
            fact(
                format!("bench-party-{p}"),
                Kind::Party(Party {
                    party_id: format!("partner-{p:04}"),
                    kind: PartyKind::DirectBillPartner as i32,
                    display_name: String::new(),
                }),
            )
        })
        .collect();
    let mut customer = 0u64;
    while (facts.len() as u64) < count {
        let c = format!("customer-{customer:06}");
        for k in 0..2u64 {
            facts.push(fact(
                format!("bench-rel-{customer}-{k}"),
                Kind::ResellerRelationship(ResellerRelationship {
                    customer_id: c.clone(),
                    partner_id: format!("partner-{:04}", (customer * 7 + k) % PARTNERS),
                    active: true,
                }),
            ));
        }
        for s in 0..3u64 {
            facts.push(fact(
                format!("bench-sub-{customer}-{s}"),
                Kind::Subscription(Subscription {
                    subscription_id: format!("sub-{customer:06}-{s}"),
                    customer_id: c.clone(),
                    biller_id: format!("partner-{:04}", (customer * 7) % PARTNERS),
                    support_contact_id: String::new(),
                    provider_id: String::new(),
                    active: true,
                }),
            ));
        }
        customer = (customer + 1) % CUSTOMERS;
    }
    facts.truncate(count as usize);
    // RecordFact is unary: many in flight keep the writer's groups full.
    const IN_FLIGHT: usize = 64;
    let mut written = 0u64;
    for chunk in facts.chunks(IN_FLIGHT * 16) {
        let mut tasks = Vec::new();
        for part in chunk.chunks(16) {
            let mut client = compliance.clone();
            let part = part.to_vec();
            tasks.push(tokio::spawn(async move {
                for f in part {
                    client
                        .record_fact(RecordFactRequest { fact: Some(f) })
                        .await?;
                }
                Ok::<_, tonic::Status>(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        written += chunk.len() as u64;
        progress(written);
    }
    Ok(written)
}

/// Offline `verify` throughput over a stopped ledger, in entries per second.
pub fn verify_throughput(data_dir: &std::path::Path) -> anyhow::Result<(u64, Duration)> {
    let signer = audit_ledger::keys::load(&audit_ledger::keys::key_path(data_dir, None))?;
    let defaults = ServerConfig::default();
    let opened = audit_ledger::storage::open_store(
        &data_dir.join(audit_ledger::server::STORE_DIR_NAME),
        defaults.storage,
        defaults.cache_bytes,
    )?;
    let started = Instant::now();
    let report =
        audit_ledger::verify::verify_store(opened.store.as_ref(), &signer.verifier(), |_, _| {})
            .map_err(|error| anyhow::anyhow!("{error}"))?;
    Ok((report.tree_size, started.elapsed()))
}

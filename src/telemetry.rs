//! Logs and metrics: how the server reports on itself.
//!
//! Logs go through `tracing` (filtered by `RUST_LOG`, human-readable or JSON lines).
//! Metrics go through the `metrics` facade, which costs next to nothing until a recorder is
//! installed: [`serve_metrics`] installs the Prometheus one and its HTTP endpoint. No body,
//! subject or credential is ever put in a log line or a metric label.

use std::net::SocketAddr;

/// Names of every metric, in one place (the catalogue is in docs/OPERATIONS.md).
pub mod names {
    /// Communications submitted, by `result`: appended, duplicate, rejected.
    pub const APPENDS: &str = "audit_ledger_appends_total";
    /// Facts submitted, by `result`: appended, duplicate, rejected.
    pub const FACTS: &str = "audit_ledger_facts_total";
    /// The ledger core's own: group commit size and time, tree size.
    pub use audit_ledger_core::metric_names::*;
    /// Verdicts given (CheckSender and at ingestion), by `verdict` and `rule`.
    pub const VERDICTS: &str = "audit_ledger_verdicts_total";
    /// gRPC calls, by `method` and `code`.
    pub const GRPC_REQUESTS: &str = "audit_ledger_grpc_requests_total";
    /// Seconds a gRPC call took in the server, by `method` (append latency is this metric
    /// for `/audit.ledger.v1.LedgerService/Append`).
    pub const GRPC_SECONDS: &str = "audit_ledger_grpc_request_seconds";
    /// Calls refused before reaching a service, by `reason`: missing, malformed, unknown
    /// (credentials), permission_denied, load_shed, stream_limit.
    pub const GATE_REFUSALS: &str = "audit_ledger_gate_refusals_total";
    /// Calls reset because their client took none of the response for the idle timeout.
    pub const STALLED_RESPONSES: &str = "audit_ledger_stalled_responses_total";
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global `tracing` subscriber: `RUST_LOG` filters (default `info`), to stderr.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Counts one verdict given.
pub fn count_verdict(assessment: &crate::policy::Assessment) {
    let verdict = match assessment.verdict {
        crate::policy::Verdict::Allowed => "allowed",
        crate::policy::Verdict::Violation => "violation",
        crate::policy::Verdict::Review => "review",
    };
    metrics::counter!(names::VERDICTS, "verdict" => verdict, "rule" => assessment.rule.name())
        .increment(1);
}

/// Counts submitted records (`kind`: [`names::APPENDS`] or [`names::FACTS`]) by result.
pub fn count_records(kind: &'static str, result: &'static str, count: u64) {
    metrics::counter!(kind, "result" => result).increment(count);
}

/// Installs the Prometheus recorder and serves its text format on `http://ADDR/metrics`.
/// Must run inside the tokio runtime (the endpoint is a task on it).
pub fn serve_metrics(address: SocketAddr) -> Result<(), String> {
    // Latency buckets from 50 µs to 10 s; group sizes from 1 to 16k entries.
    let seconds = [
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 10.0,
    ];
    let entries = [
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
        16384.0,
    ];
    let matcher = |name: &str| metrics_exporter_prometheus::Matcher::Full(name.to_owned());
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets_for_metric(matcher(names::FLUSH_SECONDS), &seconds)
        .and_then(|b| b.set_buckets_for_metric(matcher(names::GRPC_SECONDS), &seconds))
        .and_then(|b| b.set_buckets_for_metric(matcher(names::GROUP_ENTRIES), &entries))
        .map_err(|error| error.to_string())?
        .install()
        .map_err(|error| format!("cannot serve metrics on {address}: {error}"))?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(names::APPENDS, "Communications submitted, by result");
    describe_counter!(names::FACTS, "Facts submitted, by result");
    describe_histogram!(names::GROUP_ENTRIES, "New entries per group commit");
    describe_histogram!(
        names::FLUSH_SECONDS,
        Unit::Seconds,
        "Time to write and flush one group commit"
    );
    describe_gauge!(names::TREE_SIZE, "Entries in the published tree");
    describe_counter!(names::VERDICTS, "Verdicts given, by verdict and rule");
    describe_counter!(names::GRPC_REQUESTS, "gRPC calls, by method and code");
    describe_histogram!(
        names::GRPC_SECONDS,
        Unit::Seconds,
        "Server time of gRPC calls, by method"
    );
    describe_counter!(
        names::GATE_REFUSALS,
        "Calls refused before reaching a service, by reason"
    );
    describe_counter!(
        names::STALLED_RESPONSES,
        "Calls reset because their client took none of the response for the idle timeout"
    );
}

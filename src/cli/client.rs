//! The client commands' flags and their runs: `check`, `violations`, `communications`,
//! `append`, `fact`, `export` and `verify --server` talk to a running server through
//! [`audit_ledger::client`], which does the work and prints result rows; the one-line
//! reports of what a command did are printed here.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use audit_ledger::client::output::{Format, Progress};
use audit_ledger::client::{self, Connection, commands};
use audit_ledger::config::ServerConfig;
use audit_ledger::ledger::CheckpointVerifier;

use super::hex_string;

/// Communications per `AppendBatch` when a command loads them in batches.
pub const DEFAULT_BATCH: usize = 1000;

/// The server a client command reaches by default: a `serve` run with its defaults.
pub fn default_server() -> String {
    format!("http://{}", ServerConfig::default().listen)
}

/// How a client command reaches the server.
#[derive(Args)]
pub struct ServerArgs {
    /// The server: http://HOST:PORT, or https://HOST:PORT with --tls-ca.
    #[arg(long, env = "AUDIT_LEDGER_SERVER", default_value_t = default_server())]
    server: String,
    /// Bearer token.
    #[arg(long, env = "AUDIT_LEDGER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) of the server's TLS certificate.
    #[arg(long, env = "AUDIT_LEDGER_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

impl ServerArgs {
    fn connection(self) -> Connection {
        Connection {
            server: self.server,
            token: self.token,
            tls_ca: self.tls_ca,
        }
    }
}

/// How a client command reaches the server and prints.
#[derive(Args)]
pub struct ClientArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// table for people; json (one object per line) or csv for programs.
    #[arg(long, value_enum, default_value_t = Format::default())]
    output: Format,
}

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    question: commands::CheckQuestion,
}

/// The filters every listing has.
#[derive(Args)]
pub struct ListFilters {
    #[arg(long)]
    customer: Option<String>,
    #[arg(long)]
    sender: Option<String>,
    /// From this instant (RFC 3339), inclusive.
    #[arg(long)]
    from: Option<String>,
    /// Before this instant (RFC 3339).
    #[arg(long)]
    to: Option<String>,
}

/// What a communications listing or an export may be narrowed to beyond [`ListFilters`].
#[derive(Args)]
pub struct Subject {
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    subscription: Option<String>,
    /// Only communications about this non-CSP product.
    #[arg(long)]
    product: Option<String>,
}

impl ListFilters {
    /// The client's filters: these and the subject's.
    fn with(self, subject: Subject) -> commands::Filters {
        commands::Filters {
            customer: self.customer,
            sender: self.sender,
            from: self.from,
            to: self.to,
            topic: subject.topic,
            subscription: subject.subscription,
            product: subject.product,
            ..Default::default()
        }
    }
}

#[derive(Args)]
pub struct ViolationsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    filters: ListFilters,
    /// Only this rule (e.g. NOT-BILLER).
    #[arg(long)]
    rule: Option<String>,
    /// Also list REVIEW verdicts.
    #[arg(long)]
    include_review: bool,
    /// Which verdicts: violations, reviews or both (overrides --include-review).
    #[arg(long)]
    verdicts: Option<String>,
    #[command(flatten)]
    subject: Subject,
    #[arg(long, default_value_t = 0)]
    as_of_tree_size: u64,
}

#[derive(Args)]
pub struct CommunicationsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    filters: ListFilters,
    #[command(flatten)]
    subject: Subject,
}

#[derive(Args)]
pub struct AppendArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// JSON lines, one communication each (see docs/INTEGRATION.md).
    #[arg(long)]
    from_file: PathBuf,
    /// Communications per AppendBatch.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    batch: usize,
}

#[derive(Args)]
pub struct FactArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// JSON lines, one fact each (see docs/INTEGRATION.md).
    #[arg(long)]
    from_file: PathBuf,
}

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    filters: ListFilters,
    #[command(flatten)]
    subject: Subject,
    /// jsonl (one JSON object per line) or csv.
    #[arg(long, default_value = "jsonl")]
    format: audit_ledger::export::Format,
    /// The export file; the manifest is written beside it as FILE.manifest.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// Check the server's checkpoint against the log's key while exporting.
    #[arg(long, env = "AUDIT_LEDGER_VERIFIER_KEY")]
    verifier_key: Option<String>,
}

/// Runs a client command on a small runtime; its result is the exit code.
pub fn run(command: impl Future<Output = anyhow::Result<u8>>) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(ExitCode::from(runtime.block_on(command)?))
}

pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let connection = args.client.server.connection();
    run(commands::check(
        &connection,
        args.question,
        args.client.output,
    ))
}

pub fn violations(args: ViolationsArgs) -> anyhow::Result<ExitCode> {
    let filters = commands::Filters {
        rule: args.rule,
        include_review: args.include_review,
        verdicts: args.verdicts,
        as_of_tree_size: args.as_of_tree_size,
        ..args.filters.with(args.subject)
    };
    let connection = args.client.server.connection();
    run(commands::violations(
        &connection,
        filters,
        args.client.output,
    ))
}

pub fn communications(args: CommunicationsArgs) -> anyhow::Result<ExitCode> {
    let filters = args.filters.with(args.subject);
    let connection = args.client.server.connection();
    run(commands::communications(
        &connection,
        filters,
        args.client.output,
    ))
}

pub fn append(args: AppendArgs) -> anyhow::Result<ExitCode> {
    let connection = args.client.server.connection();
    run(async move {
        let summary = commands::append_file(&connection, &args.from_file, args.batch).await?;
        println!(
            "appended {}, duplicates {}, violations {}, reviews {}",
            summary.appended, summary.duplicates, summary.violations, summary.reviews
        );
        Ok(0)
    })
}

pub fn fact(args: FactArgs) -> anyhow::Result<ExitCode> {
    let connection = args.client.server.connection();
    run(async move {
        let summary = commands::fact_file(&connection, &args.from_file).await?;
        println!(
            "recorded {}, duplicates {}",
            summary.appended, summary.duplicates
        );
        Ok(0)
    })
}

pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let verifier = args
        .verifier_key
        .as_deref()
        .map(CheckpointVerifier::new)
        .transpose()?;
    let request = client::export::ExportRequest {
        filters: args.filters.with(args.subject),
        format: args.format,
        out: args.out,
        verifier,
    };
    let connection = args.server.connection();
    run(async move {
        let progress = Progress::new(None, "entries");
        let summary = client::export::export(&connection, request, |done, total| {
            progress.set(done, total)
        })
        .await;
        progress.finish();
        let summary = summary?;
        println!(
            "exported {} entries, proven in the checkpoint of tree size {}, to {} (manifest {})",
            summary.entries,
            summary.tree_size,
            summary.out.display(),
            summary.manifest.display()
        );
        Ok(0)
    })
}

/// `verify --server`: a running server checked as a witness, against the checkpoint saved
/// by the previous run; exit 1 naming why it does not hold up.
pub fn witness(
    connection: Connection,
    verifier: CheckpointVerifier,
    checkpoint_file: Option<PathBuf>,
    full: bool,
) -> anyhow::Result<ExitCode> {
    use client::witness::Outcome;
    run(async move {
        let progress = Progress::new(None, "entries");
        let outcome = client::witness::witness(
            &connection,
            &verifier,
            checkpoint_file.as_deref(),
            full,
            |done, total| progress.set(done, Some(total)),
        )
        .await;
        progress.finish();
        match outcome? {
            Outcome::Failed(reason) => {
                println!("FAILED: {reason}");
                Ok(1)
            }
            Outcome::Consistent {
                previous,
                latest,
                entries_checked,
            } => {
                let from = match &previous {
                    Some(previous) => format!(
                        "consistent with the saved checkpoint: size {} -> {}",
                        previous.size, latest.size
                    ),
                    None if checkpoint_file.is_some() => format!(
                        "no saved checkpoint yet (trusted on first use): size {}",
                        latest.size
                    ),
                    None => format!("signed checkpoint: size {}", latest.size),
                };
                let full = entries_checked
                    .map(|count| format!(", all {count} entries fetched and rehashed to the root"))
                    .unwrap_or_default();
                let saved = checkpoint_file
                    .as_ref()
                    .map(|path| format!("; saved to {}", path.display()))
                    .unwrap_or_default();
                println!(
                    "ok: {} {from}, root {}{full}{saved}",
                    latest.origin,
                    hex_string(&latest.root_hash.0)
                );
                Ok(0)
            }
        }
    })
}

//! The command line of the `audit-ledger` binary: its flags and what each command does with
//! them, over the library's public API.
//!
//! - [`serve`]: `serve`'s flags, the settings file under them, the run.
//! - [`offline`]: `verifier-key`, `verify`, `reindex`, `cut-log`, `token`.
//! - [`client`]: the commands that talk to a running server.
//! - [`bench`]: the load generator.
//!
//! Every server default comes from [`ServerConfig::default`]; clap prints it in `--help`.

pub mod bench;
pub mod client;
pub mod offline;
pub mod serve;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::LazyLock;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use audit_ledger::config::ServerConfig;
use audit_ledger::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "audit-ledger",
    version,
    about = "Append-only, verifiable ledger of customer communications"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as human-readable text or as one JSON object per line (RUST_LOG filters).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "AUDIT_LEDGER_LOG_FORMAT",
        default_value_t = LogFormat::default()
    )]
    pub log_format: LogFormat,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gRPC service.
    Serve(serve::ServeArgs),
    /// Print the log's public key as a C2SP note verifier key (works while the server runs).
    VerifierKey(KeyArgs),
    /// Verify a stopped ledger end to end, a running server as a witness (--server), or an
    /// export offline (--export); exit 1 naming what failed (the first bad index).
    Verify(offline::VerifyArgs),
    /// Rebuild a stopped ledger's derived indexes from its entries alone.
    Reindex(KeyArgs),
    /// Cut a stopped ledger's damaged log where an entry begins: what is cut is kept in
    /// `store/cuts/`, with a record of it. Without --confirm, only says what it would cut.
    CutLog(offline::CutLogArgs),
    /// Load a running server over gRPC and report throughput and latency percentiles.
    Bench(bench::BenchArgs),
    /// Manage the principals of an auth file.
    #[command(subcommand)]
    Token(offline::TokenCommand),
    /// Was this sender allowed to contact this customer about this topic (then)? Exit 0
    /// when allowed, 1 for a violation or review.
    Check(client::CheckArgs),
    /// List communications judged violations (exit 1 when there is any).
    Violations(client::ViolationsArgs),
    /// List recorded communications.
    Communications(client::CommunicationsArgs),
    /// Append the communications of a JSON-lines file, in batches (idempotent: re-running
    /// the same file appends nothing twice).
    Append(client::AppendArgs),
    /// Record the facts of a JSON-lines file, in order (with authentication, a registrar's
    /// or an admin's token: writers record no facts).
    Fact(client::FactArgs),
    /// Write the matching entries (all, without filters) to a file, with a manifest of
    /// inclusion proofs beside it that `verify --export` checks offline.
    Export(client::ExportArgs),
}

/// Where a ledger is, for the commands that open one.
#[derive(Args)]
pub struct KeyArgs {
    /// Data directory of the ledger.
    #[arg(long, env = "AUDIT_LEDGER_DATA_DIR", default_value_os_t = defaults().data_dir.clone())]
    pub data_dir: PathBuf,
    /// Signing key file [default: <data-dir>/signing.key].
    #[arg(long, env = "AUDIT_LEDGER_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
}

/// The server's defaults, the flags' defaults.
fn defaults() -> &'static ServerConfig {
    static DEFAULTS: LazyLock<ServerConfig> = LazyLock::new(ServerConfig::default);
    &DEFAULTS
}

/// Parses the process's command line, with `serve --config FILE`'s settings under the
/// flags and the environment ([`serve::with_settings_file`]). `--help`, `--version` and a
/// command line clap refuses end the process as clap does.
pub fn parse() -> anyhow::Result<Cli> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let argv = serve::with_settings_file(&Cli::command(), argv)?;
    Ok(Cli::from_arg_matches(
        &Cli::command().get_matches_from(argv),
    )?)
}

/// Bytes as lower-case hex, as the reports print hashes.
fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

//! The `audit-ledger` binary: parse the command line, set up logging, run a command.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// sled allocates and frees a node copy on every insert and read; mimalloc measured faster
/// than the system allocator for it (docs/BENCHMARKS.md). Built with `no_thp`: mimalloc
/// otherwise asks for transparent huge pages on its arenas, and every 2 MiB page touched
/// then counts whole — 50 MiB of resident memory at start and 80–100 MiB more at the peak
/// under load, for no measured gain in throughput (eighth pass).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Args, Parser, Subcommand};

use audit_ledger::access_log::AccessLog;
use audit_ledger::client;
use audit_ledger::config::{ServerConfig, TlsFiles};
use audit_ledger::keys;
use audit_ledger::ledger::CheckpointVerifier;
use audit_ledger::server::{self, STORE_DIR_NAME, Server};
use audit_ledger::telemetry::{self, LogFormat};
use audit_ledger::verify::{verify_access_trail, verify_store};

#[derive(Parser)]
#[command(
    name = "audit-ledger",
    version,
    about = "Append-only, verifiable ledger of customer communications"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as human-readable text or as one JSON object per line (RUST_LOG filters).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "AUDIT_LEDGER_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC service.
    Serve(ServeArgs),
    /// Print the log's public key as a C2SP note verifier key (works while the server runs).
    VerifierKey(KeyArgs),
    /// Verify a stopped ledger end to end, a running server as a witness (--server), or an
    /// export offline (--export); exit 1 naming what failed (the first bad index).
    Verify(VerifyArgs),
    /// Rebuild a stopped ledger's derived indexes from its entries alone.
    Reindex(KeyArgs),
    /// Cut a stopped ledger's damaged log where an entry begins: what is cut is kept in
    /// `store/cuts/`, with a record of it. Without --confirm, only says what it would cut.
    CutLog(CutLogArgs),
    /// Load a running server over gRPC and report throughput and latency percentiles.
    Bench(BenchArgs),
    /// Manage the principals of an auth file.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Was this sender allowed to contact this customer about this topic (then)? Exit 0
    /// when allowed, 1 for a violation or review.
    Check(CheckArgs),
    /// List communications judged violations (exit 1 when there is any).
    Violations(ViolationsArgs),
    /// List recorded communications.
    Communications(CommunicationsArgs),
    /// Append the communications of a JSON-lines file, in batches (idempotent: re-running
    /// the same file appends nothing twice).
    Append(AppendArgs),
    /// Record the facts of a JSON-lines file, in order (with authentication, a registrar's
    /// or an admin's token: writers record no facts).
    Fact(FactArgs),
    /// Write the matching entries (all, without filters) to a file, with a manifest of
    /// inclusion proofs beside it that `verify --export` checks offline.
    Export(ExportArgs),
}

/// How a client command reaches the server.
#[derive(Args)]
struct ServerArgs {
    /// The server: http://HOST:PORT, or https://HOST:PORT with --tls-ca.
    #[arg(
        long,
        env = "AUDIT_LEDGER_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Bearer token.
    #[arg(long, env = "AUDIT_LEDGER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) of the server's TLS certificate.
    #[arg(long, env = "AUDIT_LEDGER_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

impl ServerArgs {
    fn connection(&self) -> client::Connection {
        client::Connection {
            server: self.server.clone(),
            token: self.token.clone(),
            tls_ca: self.tls_ca.clone(),
        }
    }
}

/// How a client command reaches the server and prints.
#[derive(Args)]
struct ClientArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// table for people; json (one object per line) or csv for programs.
    #[arg(long, value_enum, default_value = "table")]
    output: client::output::Format,
}

impl ClientArgs {
    fn connection(&self) -> client::Connection {
        self.server.connection()
    }
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long)]
    sender: String,
    #[arg(long)]
    customer: String,
    /// commercial, support, operational, transition or general.
    #[arg(long)]
    topic: String,
    #[arg(long)]
    subscription: Option<String>,
    #[arg(long)]
    product: Option<String>,
    /// The instant asked about (RFC 3339) [default: now].
    #[arg(long)]
    at: Option<String>,
    /// Judge on what the ledger held at this size (0: everything).
    #[arg(long, default_value_t = 0)]
    as_of_tree_size: u64,
}

#[derive(Args)]
struct ListFilters {
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

impl ListFilters {
    /// The client's filters for a communications listing or export.
    fn communications(
        self,
        topic: Option<String>,
        subscription: Option<String>,
        product: Option<String>,
    ) -> client::commands::Filters {
        client::commands::Filters {
            customer: self.customer,
            sender: self.sender,
            from: self.from,
            to: self.to,
            topic,
            subscription,
            product,
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct ViolationsArgs {
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
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    subscription: Option<String>,
    /// Only communications about this non-CSP product.
    #[arg(long)]
    product: Option<String>,
    #[arg(long, default_value_t = 0)]
    as_of_tree_size: u64,
}

#[derive(Args)]
struct CommunicationsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    filters: ListFilters,
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    subscription: Option<String>,
    /// Only communications about this non-CSP product.
    #[arg(long)]
    product: Option<String>,
}

#[derive(Args)]
struct AppendArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// JSON lines, one communication each (see docs/INTEGRATION.md).
    #[arg(long)]
    from_file: PathBuf,
    /// Communications per AppendBatch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    filters: ListFilters,
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    subscription: Option<String>,
    /// Only communications about this non-CSP product.
    #[arg(long)]
    product: Option<String>,
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

#[derive(Args)]
struct FactArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// JSON lines, one fact each (see docs/INTEGRATION.md).
    #[arg(long)]
    from_file: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    /// The server to load.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    #[arg(long, value_enum)]
    scenario: audit_ledger::bench::Scenario,
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
    #[arg(long, default_value_t = 1000)]
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
    data_dir: Option<PathBuf>,
    /// Run N rounds of noop then the scenario, each --duration long, and report the
    /// scenario's share of noop per round (the JSON line: the median round).
    #[arg(long, value_name = "ROUNDS")]
    versus_noop: Option<usize>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Add a principal with a new bearer token; the token is printed once, alone on the last line.
    Add {
        /// Principal name (recorded as submitted_by on what it submits).
        name: String,
        /// writer (appends, CheckSender), registrar (records facts, CheckSender), auditor
        /// (reads and queries) or admin (everything).
        #[arg(long)]
        role: audit_ledger::auth::Role,
        /// The auth file (TOML), created 0600 if missing.
        #[arg(long, env = "AUDIT_LEDGER_AUTH_FILE")]
        auth_file: PathBuf,
        /// Sender ids a writer may submit communications for (comma-separated); default any.
        #[arg(long, value_delimiter = ',')]
        senders: Vec<String>,
    },
}

#[derive(Args)]
struct KeyArgs {
    /// Data directory of the ledger.
    #[arg(long, env = "AUDIT_LEDGER_DATA_DIR", default_value = "./ledger-data")]
    data_dir: PathBuf,
    /// Signing key file [default: <data-dir>/signing.key].
    #[arg(long, env = "AUDIT_LEDGER_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
}

#[derive(Args)]
struct CutLogArgs {
    /// Data directory of the (stopped) ledger.
    #[arg(long, env = "AUDIT_LEDGER_DATA_DIR", default_value = "./ledger-data")]
    data_dir: PathBuf,
    /// The first entry to cut (the one the refusal to start named); entries before it stay.
    #[arg(long)]
    at_entry: u64,
    /// Why, for the record kept with what is cut.
    #[arg(long)]
    reason: String,
    /// Cut. Without it, nothing changes.
    #[arg(long)]
    confirm: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Settings file (TOML): any flag below by its long name, e.g. `listen = "0.0.0.0:50051"`,
    /// `max-in-flight = 512`. Precedence: flag > environment > this file > default.
    #[arg(long, env = "AUDIT_LEDGER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    key: KeyArgs,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "AUDIT_LEDGER_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// The log's name (checkpoint origin and key name) [default: the key's name, or
    /// localhost/audit-ledger on first start].
    #[arg(long, env = "AUDIT_LEDGER_ORIGIN")]
    origin: Option<String>,
    /// Largest communication body, in bytes.
    #[arg(long, env = "AUDIT_LEDGER_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// Most communications in one AppendBatch.
    #[arg(long, env = "AUDIT_LEDGER_MAX_BATCH_RECORDS", default_value_t = 10_000)]
    max_batch_records: usize,
    /// Largest gRPC request, in bytes.
    #[arg(long, env = "AUDIT_LEDGER_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Most entries one ListEntries call streams.
    #[arg(long, env = "AUDIT_LEDGER_MAX_LIST_ENTRIES", default_value_t = 10_000)]
    max_list_entries: u64,
    /// Backend of a new ledger: log (entries in an append-only file with one fdatasync per
    /// group, keys and indexes in sorted run files derived from it) or sled (everything in
    /// sled). An existing ledger
    /// keeps its own.
    #[arg(long, env = "AUDIT_LEDGER_STORAGE", default_value = "log")]
    storage: audit_ledger::storage::StorageKind,
    /// sled page cache size, in bytes (the sled backend).
    #[arg(long, env = "AUDIT_LEDGER_CACHE_BYTES", default_value_t = 256 * 1024 * 1024)]
    cache_bytes: u64,
    /// Free space kept on the data dir's filesystem; appends are refused below it.
    #[arg(long, env = "AUDIT_LEDGER_MIN_FREE_BYTES", default_value_t = 64 * 1024 * 1024)]
    min_free_bytes: u64,
    /// Space kept allocated ahead of the access log's records, in bytes: reads by auditors
    /// and admins go on being recorded (about 200 bytes each) while the disk is full.
    #[arg(
        long,
        env = "AUDIT_LEDGER_ACCESS_LOG_RESERVE_BYTES",
        default_value_t = 4 * 1024 * 1024
    )]
    access_log_reserve_bytes: u64,
    /// Principals and credentials (TOML); without it the server is unauthenticated and
    /// loopback only.
    #[arg(long, env = "AUDIT_LEDGER_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    /// Server certificate chain (PEM); enables TLS.
    #[arg(long, env = "AUDIT_LEDGER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "AUDIT_LEDGER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates may authenticate (mTLS).
    #[arg(long, env = "AUDIT_LEDGER_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Allow a non-loopback address without authentication and TLS.
    #[arg(long, env = "AUDIT_LEDGER_INSECURE")]
    insecure: bool,
    /// Requests in flight at once before new ones are shed with RESOURCE_EXHAUSTED.
    #[arg(long, env = "AUDIT_LEDGER_MAX_IN_FLIGHT", default_value_t = 1024)]
    max_in_flight: usize,
    /// Server-streaming calls (ListEntries) open at once before new ones are refused with
    /// RESOURCE_EXHAUSTED; a stream holds its place until it ends.
    #[arg(long, env = "AUDIT_LEDGER_MAX_STREAMS", default_value_t = 128)]
    max_streams: usize,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(
        long,
        env = "AUDIT_LEDGER_MAX_CONCURRENT_STREAMS",
        default_value_t = 256
    )]
    max_concurrent_streams: u32,
    /// Seconds after which a call whose response has not started is cancelled (a stream
    /// that is sending is never cut by it).
    #[arg(long, env = "AUDIT_LEDGER_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    request_timeout_secs: u64,
    /// Seconds a response may wait for a client that takes none of it before it is reset.
    #[arg(
        long,
        env = "AUDIT_LEDGER_STREAM_IDLE_TIMEOUT_SECS",
        default_value_t = 30
    )]
    stream_idle_timeout_secs: u64,
    /// Serve Prometheus metrics on http://ADDR/metrics [default: off].
    #[arg(long, env = "AUDIT_LEDGER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

/// Three ways to verify: a stopped ledger's store (the default), a running server as a
/// witness (--server), or an export offline (--export).
#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// The log's note verifier key (`audit-ledger verifier-key`); required with --server and
    /// --export, else derived from the signing key.
    #[arg(long, env = "AUDIT_LEDGER_VERIFIER_KEY")]
    verifier_key: Option<String>,
    /// Verify a running server (http://HOST:PORT): its checkpoint must be signed by the key
    /// and extend the one in --checkpoint-file.
    #[arg(long, conflicts_with = "export")]
    server: Option<String>,
    /// Bearer token (--server).
    #[arg(long, env = "AUDIT_LEDGER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) of the server's TLS certificate (--server).
    #[arg(long, env = "AUDIT_LEDGER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The checkpoint seen last time (a signed note); checked against, then replaced by
    /// the server's current one. Created on first use.
    #[arg(long, requires = "server")]
    checkpoint_file: Option<PathBuf>,
    /// Also fetch every entry and recompute the tree (--server).
    #[arg(long, requires = "server")]
    full: bool,
    /// An export to check offline: a directory (every *.manifest.jsonl in it), an export
    /// file, or its manifest.
    #[arg(long)]
    export: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::VerifierKey(args) => verifier_key(args),
        Command::Verify(args) => verify(args),
        Command::Reindex(args) => reindex(args),
        Command::CutLog(args) => cut_log(args),
        Command::Bench(args) => bench(args),
        Command::Token(TokenCommand::Add {
            name,
            role,
            auth_file,
            senders,
        }) => token_add(&name, role, &auth_file, senders),
        Command::Check(args) => client_command(async move {
            let connection = args.client.connection();
            let question = client::commands::CheckQuestion {
                sender: args.sender,
                customer: args.customer,
                topic: args.topic,
                subscription: args.subscription,
                product: args.product,
                at: args.at,
                as_of_tree_size: args.as_of_tree_size,
            };
            client::commands::check(&connection, question, args.client.output).await
        }),
        Command::Violations(args) => client_command(async move {
            let filters = client::commands::Filters {
                customer: args.filters.customer,
                sender: args.filters.sender,
                from: args.filters.from,
                to: args.filters.to,
                topic: args.topic,
                subscription: args.subscription,
                product: args.product,
                rule: args.rule,
                include_review: args.include_review,
                verdicts: args.verdicts,
                as_of_tree_size: args.as_of_tree_size,
            };
            client::commands::violations(&args.client.connection(), filters, args.client.output)
                .await
        }),
        Command::Communications(args) => client_command(async move {
            let filters = args
                .filters
                .communications(args.topic, args.subscription, args.product);
            client::commands::communications(&args.client.connection(), filters, args.client.output)
                .await
        }),
        Command::Append(args) => client_command(async move {
            let summary = client::commands::append_file(
                &args.client.connection(),
                &args.from_file,
                args.batch,
            )
            .await?;
            println!(
                "appended {}, duplicates {}, violations {}, reviews {}",
                summary.appended, summary.duplicates, summary.violations, summary.reviews
            );
            Ok(0)
        }),
        Command::Fact(args) => client_command(async move {
            let summary =
                client::commands::fact_file(&args.client.connection(), &args.from_file).await?;
            println!(
                "recorded {}, duplicates {}",
                summary.appended, summary.duplicates
            );
            Ok(0)
        }),
        Command::Export(args) => client_command(async move {
            let filters = args
                .filters
                .communications(args.topic, args.subscription, args.product);
            let verifier = args
                .verifier_key
                .as_deref()
                .map(CheckpointVerifier::new)
                .transpose()?;
            let bar = indicatif::ProgressBar::new_spinner().with_style(
                indicatif::ProgressStyle::with_template("{spinner} {pos} entries ({per_sec})")
                    .expect("valid template"),
            );
            let request = client::export::ExportRequest {
                filters,
                format: args.format,
                out: args.out,
                verifier,
            };
            let summary =
                client::export::export(&args.server.connection(), request, |done, total| {
                    if let Some(total) = total.filter(|_| bar.length().is_none()) {
                        bar.set_length(total);
                        bar.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{bar:40} {pos}/{len} entries ({per_sec}, eta {eta})",
                            )
                            .expect("valid template"),
                        );
                    }
                    bar.set_position(done);
                })
                .await;
            bar.finish_and_clear();
            let summary = summary?;
            println!(
                "exported {} entries, proven in the checkpoint of tree size {}, to {} (manifest {})",
                summary.entries,
                summary.tree_size,
                summary.out.display(),
                summary.manifest.display()
            );
            Ok(0)
        }),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Parses the command line; for `serve --config FILE`, settings from the file fill in what
/// neither a flag nor an environment variable gave (flag > env > file > default).
fn parse_command_line() -> anyhow::Result<Cli> {
    use clap::{CommandFactory, FromArgMatches};
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The first look only finds the settings file: a setting another one requires may be
    // in the file (`--tls-cert` given, `tls_key` in the file), so rules between arguments
    // wait for the full parse below, which also reports every error.
    let first = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(&argv);
    if let Ok(first) = &first
        && let Some(("serve", serve)) = first.subcommand()
        && let Some(path) = serve.get_one::<PathBuf>("config")
    {
        let mut command = Cli::command();
        command.build();
        let serve_command = command
            .find_subcommand("serve")
            .expect("serve is a subcommand");
        argv.extend(settings_file_args(path, serve_command, serve)?);
    }
    Ok(Cli::from_arg_matches(
        &Cli::command().get_matches_from(&argv),
    )?)
}

/// The settings of a TOML file as command-line flags, leaving out those a flag or an
/// environment variable already set.
fn settings_file_args(
    path: &std::path::Path,
    command: &clap::Command,
    given: &clap::ArgMatches,
) -> anyhow::Result<Vec<std::ffi::OsString>> {
    use clap::parser::ValueSource;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the settings file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut args = Vec::new();
    for (key, value) in table {
        let name = key.replace('_', "-");
        let Some(arg) = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(name.as_str()) && name != "config")
        else {
            anyhow::bail!(
                "{}: unknown setting {key:?} (settings are the long flags of `audit-ledger serve --help`)",
                path.display()
            );
        };
        if matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let value = match value {
            toml::Value::Boolean(true) => {
                args.push(format!("--{name}").into());
                continue;
            }
            toml::Value::Boolean(false) => continue,
            toml::Value::String(text) => text,
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => anyhow::bail!(
                "{}: setting {key:?} has an unsupported value {other}",
                path.display()
            ),
        };
        args.push(format!("--{name}={value}").into());
    }
    Ok(args)
}

/// Runs a client command on a small runtime; its result is the exit code.
fn client_command(
    command: impl std::future::Future<Output = anyhow::Result<u8>>,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(ExitCode::from(runtime.block_on(command)?))
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = ServerConfig::new(args.key.data_dir, args.listen);
    config.origin = args.origin;
    config.signing_key = args.key.signing_key;
    config.record_limits.max_body_bytes = args.max_body_bytes;
    config.max_batch_records = args.max_batch_records;
    config.max_message_bytes = args.max_message_bytes;
    config.max_list_entries = args.max_list_entries;
    config.cache_bytes = args.cache_bytes;
    config.storage = args.storage;
    config.min_free_bytes = args.min_free_bytes;
    config.access_log_reserve_bytes = args.access_log_reserve_bytes;
    config.auth_file = args.auth_file;
    config.tls = args.tls_cert.zip(args.tls_key).map(|(cert, key)| TlsFiles {
        cert,
        key,
        client_ca: args.tls_client_ca,
    });
    config.insecure = args.insecure;
    config.max_in_flight = args.max_in_flight;
    config.max_streams = args.max_streams;
    config.max_concurrent_streams = args.max_concurrent_streams;
    config.request_timeout = std::time::Duration::from_secs(args.request_timeout_secs.max(1));
    config.stream_idle_timeout =
        std::time::Duration::from_secs(args.stream_idle_timeout_secs.max(1));
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let metrics_listen = args.metrics_listen;
    runtime.block_on(async move {
        if let Some(address) = metrics_listen {
            telemetry::serve_metrics(address).map_err(|error| anyhow::anyhow!(error))?;
            tracing::info!(%address, "serving metrics at /metrics");
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let server = Server::open(config)?;
        let address = listener.local_addr()?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on {address}")?;
        stdout.flush()?;
        tracing::info!(%address, "serving");
        server.serve(listener, server::shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn verifier_key(args: KeyArgs) -> anyhow::Result<ExitCode> {
    let path = keys::key_path(&args.data_dir, args.signing_key.as_deref());
    let signer = keys::load(&path)?;
    println!("{}", signer.verifier_key());
    Ok(ExitCode::SUCCESS)
}

fn pinned_verifier(args: &VerifyArgs, what: &str) -> anyhow::Result<CheckpointVerifier> {
    let key = args.verifier_key.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "{what} needs --verifier-key (or AUDIT_LEDGER_VERIFIER_KEY): the log's key as you \
             pinned it, from `audit-ledger verifier-key` where the ledger runs"
        )
    })?;
    Ok(CheckpointVerifier::new(key)?)
}

fn verify_export(args: &VerifyArgs, path: &std::path::Path) -> anyhow::Result<ExitCode> {
    use audit_ledger::export::check;
    let verifier = pinned_verifier(args, "verify --export")?;
    let manifests = check::manifests_at(path).map_err(|error| anyhow::anyhow!(error))?;
    let mut failed = false;
    for manifest in manifests {
        let bar = indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} entries ({per_sec})")
                .expect("valid template"),
        );
        let result = check::verify_export(&manifest, &verifier, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        });
        bar.finish_and_clear();
        match result {
            Ok(report) => println!(
                "ok: {}: {} entries, each proven in the checkpoint of tree size {} (root {}) signed by {}",
                report.export_file.display(),
                report.entries,
                report.tree_size,
                hex_string(&report.root_hash.0),
                report.origin
            ),
            Err(error) => {
                failed = true;
                match error.first_bad_index() {
                    Some(index) => println!("FAILED at entry {index}: {error}"),
                    None => println!("FAILED: {error}"),
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn verify_server(args: &VerifyArgs, server: &str) -> anyhow::Result<ExitCode> {
    use client::witness::{Outcome, witness};
    let verifier = pinned_verifier(args, "verify --server")?;
    let connection = client::Connection {
        server: server.to_owned(),
        token: args.token.clone(),
        tls_ca: args.tls_ca.clone(),
    };
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} entries ({per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    let outcome = client_command(async {
        let outcome = witness(
            &connection,
            &verifier,
            args.checkpoint_file.as_deref(),
            args.full,
            |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            },
        )
        .await;
        bar.finish_and_clear();
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
                    None if args.checkpoint_file.is_some() => format!(
                        "no saved checkpoint yet (trusted on first use): size {}",
                        latest.size
                    ),
                    None => format!("signed checkpoint: size {}", latest.size),
                };
                let full = entries_checked
                    .map(|count| format!(", all {count} entries fetched and rehashed to the root"))
                    .unwrap_or_default();
                let saved = args
                    .checkpoint_file
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
    })?;
    Ok(outcome)
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.export {
        return verify_export(&args, path);
    }
    if let Some(server) = &args.server {
        return verify_server(&args, server);
    }
    let verifier = match args.verifier_key {
        Some(key) => CheckpointVerifier::new(&key)?,
        None => {
            let path = keys::key_path(&args.key.data_dir, args.key.signing_key.as_deref());
            keys::load(&path)?.verifier()
        }
    };
    let store_dir = args.key.data_dir.join(STORE_DIR_NAME);
    if !store_dir.is_dir() {
        anyhow::bail!("{} holds no ledger store", args.key.data_dir.display());
    }
    let opened = match audit_ledger::storage::open_store(
        &store_dir,
        audit_ledger::storage::StorageKind::default(),
        64 * 1024 * 1024,
    ) {
        Ok(opened) => opened,
        // The store refused to open because its data is wrong: that is a verdict.
        Err(error) if error.is_damage() => {
            return Ok(verify_failed(error.first_bad_index(), &error));
        }
        Err(error) => return Err(error.into()),
    };
    let store = opened.store;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} entries ({per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    let started = std::time::Instant::now();
    let result = verify_store(store.as_ref(), &verifier, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let access = AccessLog::open(opened.access)?;
    match result {
        Ok(report) => match verify_access_trail(store.as_ref(), &verifier, &access) {
            Ok(trail) => {
                let anchored = match trail.anchored {
                    Some((size, records)) => format!(" ({records} anchored at size {size})"),
                    None => String::new(),
                };
                println!(
                    "ok: {} entries, root {}, {} signed checkpoints consistent, {} access records chained{anchored}, origin {} ({:.1}s)",
                    report.tree_size,
                    hex_string(&report.root_hash.0),
                    report.checkpoints,
                    trail.records,
                    report.origin,
                    started.elapsed().as_secs_f64()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(broken) => {
                println!("FAILED: {broken}");
                Ok(ExitCode::from(1))
            }
        },
        // Exit 1 when the data is wrong, naming the first entry it leaves untrusted; exit 2
        // (an error) only when the store could not be read.
        Err(error) if error.is_damage() => Ok(verify_failed(error.first_bad_index(), &error)),
        Err(error) => Err(error.into()),
    }
}

/// `verify`'s report of wrong data: exit 1, `FAILED at entry N: …` whenever the damage is
/// tied to an entry.
fn verify_failed(first_bad_index: Option<u64>, error: &dyn std::fmt::Display) -> ExitCode {
    match first_bad_index {
        Some(index) => println!("FAILED at entry {index}: {error}"),
        None => println!("FAILED: {error}"),
    }
    ExitCode::from(1)
}

fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    use audit_ledger::bench::{self, BenchOptions, Scenario};
    if args.scenario == Scenario::Verify {
        let data_dir = args
            .data_dir
            .context("the verify scenario needs --data-dir of a stopped ledger")?;
        let (entries, elapsed) = bench::verify_throughput(&data_dir)?;
        let rate = entries as f64 / elapsed.as_secs_f64();
        println!(
            "verify: {entries} entries in {:.2}s, {rate:.0} entries/s",
            elapsed.as_secs_f64()
        );
        if args.json {
            let ms = elapsed.as_secs_f64() * 1000.0;
            println!(
                "{{\"scenario\":\"verify\",\"ops_per_sec\":{:.3},\"entries_per_sec\":{rate:.1},\"p50_ms\":{ms:.3},\"p99_ms\":{ms:.3},\"p999_ms\":{ms:.3}}}",
                1.0 / elapsed.as_secs_f64()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    if let Some(count) = args.populate {
        let bar = indicatif::ProgressBar::new(count);
        let started = std::time::Instant::now();
        let written = runtime.block_on(bench::populate(
            &args.server,
            &args.token,
            args.scenario,
            count,
            args.batch,
            |done| bar.set_position(done),
        ))?;
        bar.finish_and_clear();
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "populated {written} {} in {elapsed:.1}s ({:.0}/s)",
            if args.scenario == Scenario::Check {
                "facts"
            } else {
                "communications"
            },
            written as f64 / elapsed
        );
        return Ok(ExitCode::SUCCESS);
    }
    let options = BenchOptions {
        server: args.server,
        scenario: args.scenario,
        concurrency: args.concurrency,
        connections: args.connections,
        duration: std::time::Duration::from_secs(args.duration.max(1)),
        batch: args.batch,
        token: args.token,
    };
    if let Some(rounds) = args.versus_noop {
        let rounds = runtime.block_on(bench::run_paired(&options, rounds))?;
        for (n, round) in rounds.iter().enumerate() {
            println!(
                "round {}: noop {:.0} calls/s, {} {:.0} ops/s ({:.0} entries/s, p99 {:.3} ms) = {:.1} % of noop",
                n + 1,
                round.noop.ops_per_sec(),
                bench::scenario_name(round.scenario.scenario),
                round.scenario.ops_per_sec(),
                round.scenario.entries_per_sec(),
                round.scenario.p99.as_secs_f64() * 1000.0,
                round.ratio() * 100.0
            );
        }
        if args.json {
            println!("{}", bench::paired_json(&rounds));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let report = runtime.block_on(bench::run(&options))?;
    println!(
        "{}: {} ops in {:.1}s: {:.0} ops/s, {:.0} entries/s; latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms ({} in flight over {} connections)",
        bench::scenario_name(report.scenario),
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

fn token_add(
    name: &str,
    role: audit_ledger::auth::Role,
    auth_file: &std::path::Path,
    senders: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let token = audit_ledger::auth::add_token(auth_file, name, role, senders)?;
    println!(
        "added principal {name} (role {role}) to {}",
        auth_file.display()
    );
    println!("the token follows; it is shown only this once and not stored:");
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn reindex(args: KeyArgs) -> anyhow::Result<ExitCode> {
    if !args.data_dir.join(STORE_DIR_NAME).is_dir() {
        anyhow::bail!("{} holds no ledger store", args.data_dir.display());
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let started = std::time::Instant::now();
    let size = runtime.block_on(server::reindex(&args.data_dir, args.signing_key.as_deref()))?;
    println!(
        "reindexed {size} entries ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn cut_log(args: CutLogArgs) -> anyhow::Result<ExitCode> {
    let store_dir = args.data_dir.join(STORE_DIR_NAME);
    if !store_dir
        .join(audit_ledger::storage::log_store::LOG_FILE)
        .is_file()
    {
        anyhow::bail!("{} holds no log store", args.data_dir.display());
    }
    let cut = audit_ledger::storage::log_store::cut_log(
        &store_dir,
        args.at_entry,
        &args.reason,
        args.confirm,
    )?;
    let lost = cut
        .indexed_entries
        .max(cut.intact_entries)
        .saturating_sub(cut.at_entry);
    let verb = if args.confirm { "cut" } else { "would cut" };
    println!(
        "{verb} {LOG} at byte {} (entry {}): {} bytes (sha256 {}); intact frames held {} entries, the index file vouched for {}; at least {lost} entries are gone; signed checkpoints past the cut: {:?}",
        cut.at_byte,
        cut.at_entry,
        cut.cut_bytes,
        cut.cut_sha256,
        cut.intact_entries,
        cut.indexed_entries,
        cut.checkpoints_cut,
        LOG = audit_ledger::storage::log_store::LOG_FILE,
    );
    match &cut.kept_in {
        Some(folder) => println!(
            "kept what was cut, the index file and cut.json in {}; derived data is rebuilt at the next start",
            folder.display()
        ),
        None => println!("nothing was changed; add --confirm to cut"),
    }
    Ok(ExitCode::SUCCESS)
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

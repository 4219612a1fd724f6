//! `audit-ledger serve`: its flags (defaults from [`ServerConfig::default`]), the settings
//! file under them, and the run.

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clap::parser::ValueSource;

use audit_ledger::config::{RecordLimits, ServerConfig, TlsFiles};
use audit_ledger::server::{self, Server};
use audit_ledger::storage::StorageKind;
use audit_ledger::telemetry;

use super::{KeyArgs, defaults};

#[derive(Args)]
pub struct ServeArgs {
    /// Settings file (TOML): any flag below by its long name, e.g. `listen = "0.0.0.0:50051"`,
    /// `max-in-flight = 512`. Precedence: flag > environment > this file > default.
    #[arg(long, env = "AUDIT_LEDGER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    key: KeyArgs,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "AUDIT_LEDGER_LISTEN", default_value_t = defaults().listen)]
    listen: SocketAddr,
    /// The log's name (checkpoint origin and key name) [default: the key's name, or
    /// localhost/audit-ledger on first start].
    #[arg(long, env = "AUDIT_LEDGER_ORIGIN")]
    origin: Option<String>,
    /// Largest communication body, in bytes.
    #[arg(
        long,
        env = "AUDIT_LEDGER_MAX_BODY_BYTES",
        default_value_t = defaults().record_limits.max_body_bytes
    )]
    max_body_bytes: usize,
    /// Most communications in one AppendBatch.
    #[arg(
        long,
        env = "AUDIT_LEDGER_MAX_BATCH_RECORDS",
        default_value_t = defaults().max_batch_records
    )]
    max_batch_records: usize,
    /// Largest gRPC request, in bytes.
    #[arg(
        long,
        env = "AUDIT_LEDGER_MAX_MESSAGE_BYTES",
        default_value_t = defaults().max_message_bytes
    )]
    max_message_bytes: usize,
    /// Most entries one ListEntries call streams.
    #[arg(
        long,
        env = "AUDIT_LEDGER_MAX_LIST_ENTRIES",
        default_value_t = defaults().max_list_entries
    )]
    max_list_entries: u64,
    /// Backend of a new ledger: log (entries in an append-only file with one fdatasync per
    /// group, keys and indexes in sorted run files derived from it) or sled (everything in
    /// sled). An existing ledger
    /// keeps its own.
    #[arg(
        long,
        env = "AUDIT_LEDGER_STORAGE",
        default_value = storage_name(defaults().storage)
    )]
    storage: StorageKind,
    /// sled page cache size, in bytes (the sled backend).
    #[arg(long, env = "AUDIT_LEDGER_CACHE_BYTES", default_value_t = defaults().cache_bytes)]
    cache_bytes: u64,
    /// Free space kept on the data dir's filesystem; appends are refused below it.
    #[arg(
        long,
        env = "AUDIT_LEDGER_MIN_FREE_BYTES",
        default_value_t = defaults().min_free_bytes
    )]
    min_free_bytes: u64,
    /// Space kept allocated ahead of the access log's records, in bytes: reads by auditors
    /// and admins go on being recorded (about 200 bytes each) while the disk is full.
    #[arg(
        long,
        env = "AUDIT_LEDGER_ACCESS_LOG_RESERVE_BYTES",
        default_value_t = defaults().access_log_reserve_bytes
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
    #[arg(
        long,
        env = "AUDIT_LEDGER_MAX_IN_FLIGHT",
        default_value_t = defaults().max_in_flight
    )]
    max_in_flight: usize,
    /// Server-streaming calls (ListEntries) open at once before new ones are refused with
    /// RESOURCE_EXHAUSTED; a stream holds its place until it ends.
    #[arg(long, env = "AUDIT_LEDGER_MAX_STREAMS", default_value_t = defaults().max_streams)]
    max_streams: usize,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(
        long,
        env = "AUDIT_LEDGER_MAX_CONCURRENT_STREAMS",
        default_value_t = defaults().max_concurrent_streams
    )]
    max_concurrent_streams: u32,
    /// Seconds after which a call whose response has not started is cancelled (a stream
    /// that is sending is never cut by it).
    #[arg(
        long,
        env = "AUDIT_LEDGER_REQUEST_TIMEOUT_SECS",
        default_value_t = defaults().request_timeout.as_secs()
    )]
    request_timeout_secs: u64,
    /// Seconds a response may wait for a client that takes none of it before it is reset.
    #[arg(
        long,
        env = "AUDIT_LEDGER_STREAM_IDLE_TIMEOUT_SECS",
        default_value_t = defaults().stream_idle_timeout.as_secs()
    )]
    stream_idle_timeout_secs: u64,
    /// Serve Prometheus metrics on http://ADDR/metrics [default: off].
    #[arg(long, env = "AUDIT_LEDGER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

/// `--storage`'s name of a backend.
fn storage_name(kind: StorageKind) -> &'static str {
    match kind {
        StorageKind::Log => "log",
        StorageKind::Sled => "sled",
    }
}

impl ServeArgs {
    /// The server's configuration: these settings over [`ServerConfig::default`].
    fn into_config(self) -> ServerConfig {
        let defaults = ServerConfig::default();
        let seconds = |seconds: u64| std::time::Duration::from_secs(seconds.max(1));
        ServerConfig {
            data_dir: self.key.data_dir,
            listen: self.listen,
            origin: self.origin,
            signing_key: self.key.signing_key,
            record_limits: RecordLimits {
                max_body_bytes: self.max_body_bytes,
                ..defaults.record_limits
            },
            max_batch_records: self.max_batch_records,
            max_message_bytes: self.max_message_bytes,
            max_list_entries: self.max_list_entries,
            cache_bytes: self.cache_bytes,
            storage: self.storage,
            min_free_bytes: self.min_free_bytes,
            access_log_reserve_bytes: self.access_log_reserve_bytes,
            auth_file: self.auth_file,
            tls: self.tls_cert.zip(self.tls_key).map(|(cert, key)| TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            insecure: self.insecure,
            max_in_flight: self.max_in_flight,
            max_streams: self.max_streams,
            max_concurrent_streams: self.max_concurrent_streams,
            request_timeout: seconds(self.request_timeout_secs),
            stream_idle_timeout: seconds(self.stream_idle_timeout_secs),
            ..defaults
        }
    }
}

/// Runs the service until SIGTERM or Ctrl-C; the first line on stdout says where it listens.
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let metrics_listen = args.metrics_listen;
    let config = args.into_config();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
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

/// The command line `argv` for the command `cli`, with the settings of a
/// `serve --config FILE` (or `AUDIT_LEDGER_CONFIG`) added as flags where neither a flag nor
/// an environment variable set them: flag > environment > file > default. A key of the file
/// that is not a long flag of `serve` is an error.
pub fn with_settings_file(
    cli: &clap::Command,
    mut argv: Vec<OsString>,
) -> anyhow::Result<Vec<OsString>> {
    // The first look only finds the settings file: a setting another one requires may be
    // in the file (`--tls-cert` given, `tls_key` in the file), so rules between arguments
    // wait for the caller's full parse, which also reports every error.
    let first = cli.clone().ignore_errors(true).try_get_matches_from(&argv);
    let Ok(first) = &first else {
        return Ok(argv);
    };
    let Some(("serve", given)) = first.subcommand() else {
        return Ok(argv);
    };
    let Some(path) = given.get_one::<PathBuf>("config") else {
        return Ok(argv);
    };
    let mut built = cli.clone();
    built.build();
    let serve = built
        .find_subcommand("serve")
        .expect("serve is a subcommand");
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the settings file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    for (key, value) in table {
        let name = key.replace('_', "-");
        let Some(arg) = serve
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
        if let Some(flag) = setting_as_flag(path, &key, &name, value)? {
            argv.push(flag);
        }
    }
    Ok(argv)
}

/// One setting of the file as a `--name=value` flag (`true` as a bare `--name`, `false` as
/// nothing, a list joined by commas).
fn setting_as_flag(
    path: &Path,
    key: &str,
    name: &str,
    value: toml::Value,
) -> anyhow::Result<Option<OsString>> {
    let value = match value {
        toml::Value::Boolean(true) => return Ok(Some(format!("--{name}").into())),
        toml::Value::Boolean(false) => return Ok(None),
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
    Ok(Some(format!("--{name}={value}").into()))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::super::{Cli, Command};
    use super::*;

    /// The server configuration `audit-ledger ARGS` would serve with.
    fn config(args: &[&str]) -> anyhow::Result<ServerConfig> {
        let argv = std::iter::once("audit-ledger")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let argv = with_settings_file(&Cli::command(), argv)?;
        let cli = Cli::from_arg_matches(&Cli::command().try_get_matches_from(argv)?)?;
        match cli.command {
            Command::Serve(args) => Ok(args.into_config()),
            _ => unreachable!("a serve command line"),
        }
    }

    /// Held by the tests that set or depend on the environment: tests run on threads of
    /// one process.
    static ENVIRONMENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The environment without any `AUDIT_LEDGER_*` variable (the test suite itself may
    /// run with some, e.g. `AUDIT_LEDGER_STORAGE=sled`), for as long as this is held; the
    /// variables come back when it is dropped.
    struct CleanEnvironment {
        saved: Vec<(OsString, OsString)>,
        _held: std::sync::MutexGuard<'static, ()>,
    }

    fn clean_environment() -> CleanEnvironment {
        let held = ENVIRONMENT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let saved: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(name, _)| name.to_string_lossy().starts_with("AUDIT_LEDGER_"))
            .collect();
        for (name, _) in &saved {
            // SAFETY: every test of this module holds ENVIRONMENT, and nothing outside
            // Rust's own environment lock reads the environment in this process's tests.
            unsafe { std::env::remove_var(name) };
        }
        CleanEnvironment { saved, _held: held }
    }

    impl Drop for CleanEnvironment {
        fn drop(&mut self) {
            for (name, value) in &self.saved {
                // SAFETY: as above.
                unsafe { std::env::set_var(name, value) };
            }
        }
    }

    fn settings_file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn without_flags_the_defaults_are_the_configs() {
        let _environment = clean_environment();
        let served = config(&["serve"]).unwrap();
        let defaults = ServerConfig::default();
        assert_eq!(format!("{served:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
        let _environment = clean_environment();
        let file = settings_file(
            "max_in_flight = 7\nmax-streams = 9\nmax_concurrent_streams = 11\ninsecure = true\n",
        );
        let path = file.path().to_str().unwrap();
        let from_file = config(&["serve", "--config", path]).unwrap();
        assert_eq!(from_file.max_in_flight, 7);
        assert_eq!(from_file.max_streams, 9);
        assert!(from_file.insecure);
        assert_eq!(from_file.max_list_entries, defaults().max_list_entries);
        let flagged = config(&["serve", "--config", path, "--max-in-flight", "3"]).unwrap();
        assert_eq!((flagged.max_in_flight, flagged.max_streams), (3, 9));
        // SAFETY: the tests that look at this variable hold ENVIRONMENT, and nothing outside
        // Rust's own environment lock reads the environment in this process's tests.
        unsafe { std::env::set_var("AUDIT_LEDGER_MAX_CONCURRENT_STREAMS", "13") };
        let from_env = config(&["serve", "--config", path]);
        let beaten_by_flag = config(&["serve", "--config", path, "--max-concurrent-streams", "15"]);
        // SAFETY: as above.
        unsafe { std::env::remove_var("AUDIT_LEDGER_MAX_CONCURRENT_STREAMS") };
        assert_eq!(from_env.unwrap().max_concurrent_streams, 13);
        assert_eq!(beaten_by_flag.unwrap().max_concurrent_streams, 15);
        assert_eq!(
            config(&["serve", "--config", path])
                .unwrap()
                .max_concurrent_streams,
            11
        );
    }

    #[test]
    fn a_setting_the_file_requires_may_come_from_the_command_line() {
        let _environment = clean_environment();
        let file = settings_file("tls_key = \"key.pem\"\n");
        let path = file.path().to_str().unwrap();
        let served = config(&["serve", "--config", path, "--tls-cert", "cert.pem"]).unwrap();
        let tls = served.tls.expect("TLS from a flag and the file");
        assert_eq!(
            (tls.cert, tls.key),
            (PathBuf::from("cert.pem"), PathBuf::from("key.pem"))
        );
    }

    #[test]
    fn an_unknown_or_unusable_setting_is_an_error_naming_it() {
        let _environment = clean_environment();
        let file = settings_file("max_batch_recrods = 3\n");
        let error = config(&["serve", "--config", file.path().to_str().unwrap()]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("unknown setting \"max_batch_recrods\""),
            "{error}"
        );
        let file = settings_file("[listen]\nport = 1\n");
        let error = config(&["serve", "--config", file.path().to_str().unwrap()]).unwrap_err();
        assert!(error.to_string().contains("unsupported value"), "{error}");
    }
}

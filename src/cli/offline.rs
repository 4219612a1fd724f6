//! The commands that work on files rather than a running server (and `verify`, whose
//! `--server` mode is a client's): `verifier-key`, `verify`, `reindex`, `cut-log` and
//! `token add`, with the one-line reports they print.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};

use audit_ledger::access_log::AccessLog;
use audit_ledger::client::{Connection, output::Progress};
use audit_ledger::export::check;
use audit_ledger::keys;
use audit_ledger::ledger::CheckpointVerifier;
use audit_ledger::server::{self, OFFLINE_CACHE_BYTES, STORE_DIR_NAME};
use audit_ledger::storage::{StorageKind, log_store};
use audit_ledger::verify::{verify_access_trail, verify_store};

use super::{KeyArgs, hex_string};

#[derive(Args)]
pub struct CutLogArgs {
    /// Data directory of the (stopped) ledger.
    #[arg(long, env = "AUDIT_LEDGER_DATA_DIR", default_value_os_t = super::defaults().data_dir.clone())]
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

#[derive(Subcommand)]
pub enum TokenCommand {
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

/// Three ways to verify: a stopped ledger's store (the default), a running server as a
/// witness (--server), or an export offline (--export).
#[derive(Args)]
pub struct VerifyArgs {
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

pub fn verifier_key(args: KeyArgs) -> anyhow::Result<ExitCode> {
    let path = keys::key_path(&args.data_dir, args.signing_key.as_deref());
    let signer = keys::load(&path)?;
    println!("{}", signer.verifier_key());
    Ok(ExitCode::SUCCESS)
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.export {
        return verify_export(&pinned_verifier(&args, "verify --export")?, path);
    }
    if let Some(server) = &args.server {
        let verifier = pinned_verifier(&args, "verify --server")?;
        let connection = Connection {
            server: server.clone(),
            token: args.token,
            tls_ca: args.tls_ca,
        };
        return super::client::witness(connection, verifier, args.checkpoint_file, args.full);
    }
    let verifier = match args.verifier_key {
        Some(key) => CheckpointVerifier::new(&key)?,
        None => {
            let path = keys::key_path(&args.key.data_dir, args.key.signing_key.as_deref());
            keys::load(&path)?.verifier()
        }
    };
    verify_stopped_ledger(&args.key.data_dir, &verifier)
}

/// The verifier key `--server` and `--export` need: the one pinned by the user.
fn pinned_verifier(args: &VerifyArgs, what: &str) -> anyhow::Result<CheckpointVerifier> {
    let key = args.verifier_key.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "{what} needs --verifier-key (or AUDIT_LEDGER_VERIFIER_KEY): the log's key as you \
             pinned it, from `audit-ledger verifier-key` where the ledger runs"
        )
    })?;
    Ok(CheckpointVerifier::new(key)?)
}

fn verify_export(verifier: &CheckpointVerifier, path: &Path) -> anyhow::Result<ExitCode> {
    let manifests = check::manifests_at(path).map_err(|error| anyhow::anyhow!(error))?;
    let mut failed = false;
    for manifest in manifests {
        let progress = Progress::new(None, "entries");
        let result = check::verify_export(&manifest, verifier, |done, total| {
            progress.set(done, Some(total))
        });
        progress.finish();
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
                print_failure(error.first_bad_index(), &error);
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `verify` of a stopped ledger: exit 1 when the data is wrong, naming the first entry it
/// leaves untrusted; exit 2 (an error) only when the store could not be read.
fn verify_stopped_ledger(
    data_dir: &Path,
    verifier: &CheckpointVerifier,
) -> anyhow::Result<ExitCode> {
    let store_dir = stopped_store(data_dir)?;
    let opened = match audit_ledger::storage::open_store(
        &store_dir,
        StorageKind::default(),
        OFFLINE_CACHE_BYTES,
    ) {
        Ok(opened) => opened,
        // The store refused to open because its data is wrong: that is a verdict.
        Err(error) if error.is_damage() => {
            print_failure(error.first_bad_index(), &error);
            return Ok(ExitCode::from(1));
        }
        Err(error) => return Err(error.into()),
    };
    let store = opened.store;
    let progress = Progress::new(None, "entries");
    let started = Instant::now();
    let result = verify_store(store.as_ref(), verifier, |done, total| {
        progress.set(done, Some(total))
    });
    progress.finish();
    let access = AccessLog::open(opened.access)?;
    let report = match result {
        Ok(report) => report,
        Err(error) if error.is_damage() => {
            print_failure(error.first_bad_index(), &error);
            return Ok(ExitCode::from(1));
        }
        Err(error) => return Err(error.into()),
    };
    match verify_access_trail(store.as_ref(), verifier, &access) {
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
    }
}

/// `verify`'s report of wrong data: `FAILED at entry N: …` whenever the damage is tied to
/// an entry.
fn print_failure(first_bad_index: Option<u64>, error: &dyn std::fmt::Display) {
    match first_bad_index {
        Some(index) => println!("FAILED at entry {index}: {error}"),
        None => println!("FAILED: {error}"),
    }
}

/// The store directory of the ledger in `data_dir`, which must hold one.
fn stopped_store(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let store_dir = data_dir.join(STORE_DIR_NAME);
    if !store_dir.is_dir() {
        anyhow::bail!("{} holds no ledger store", data_dir.display());
    }
    Ok(store_dir)
}

pub fn reindex(args: KeyArgs) -> anyhow::Result<ExitCode> {
    stopped_store(&args.data_dir)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let started = Instant::now();
    let size = runtime.block_on(server::reindex(&args.data_dir, args.signing_key.as_deref()))?;
    println!(
        "reindexed {size} entries ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn cut_log(args: CutLogArgs) -> anyhow::Result<ExitCode> {
    let store_dir = args.data_dir.join(STORE_DIR_NAME);
    if !store_dir.join(log_store::LOG_FILE).is_file() {
        anyhow::bail!("{} holds no log store", args.data_dir.display());
    }
    let cut = log_store::cut_log(&store_dir, args.at_entry, &args.reason, args.confirm)?;
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
        LOG = log_store::LOG_FILE,
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

pub fn token(command: TokenCommand) -> anyhow::Result<ExitCode> {
    let TokenCommand::Add {
        name,
        role,
        auth_file,
        senders,
    } = command;
    let token = audit_ledger::auth::add_token(&auth_file, &name, role, senders)?;
    println!(
        "added principal {name} (role {role}) to {}",
        auth_file.display()
    );
    println!("the token follows; it is shown only this once and not stored:");
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

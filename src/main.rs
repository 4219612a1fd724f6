//! The `audit-ledger` binary: parse the command line, set up logging, run a command. The
//! commands live in [`cli`]; the service in the `audit_ledger` library.

mod cli;

use std::process::ExitCode;

use cli::{Command, client, offline, serve};

/// The server allocates and frees many small buffers per request and per stored key;
/// mimalloc is faster than the system allocator for that (docs/BENCHMARKS.md). Built with
/// `no_thp`: mimalloc otherwise asks for transparent huge pages on its arenas, and every
/// 2 MiB page touched then counts whole in resident memory, for no gain in throughput.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit codes: 0 done, 1 done with something to look at (a violation, a failed
/// verification), 2 could not run (one line on stderr says why).
fn main() -> ExitCode {
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    audit_ledger::telemetry::init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::VerifierKey(args) => offline::verifier_key(args),
        Command::Verify(args) => offline::verify(args),
        Command::Reindex(args) => offline::reindex(args),
        Command::CutLog(args) => offline::cut_log(args),
        Command::Token(command) => offline::token(command),
        Command::Bench(args) => cli::bench::command(args),
        Command::Check(args) => client::check(args),
        Command::Violations(args) => client::violations(args),
        Command::Communications(args) => client::communications(args),
        Command::Append(args) => client::append(args),
        Command::Fact(args) => client::fact(args),
        Command::Export(args) => client::export(args),
    };
    result.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::from(2)
    })
}

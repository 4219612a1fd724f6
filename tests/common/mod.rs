//! Helpers shared by the integration tests: a real server on an ephemeral loopback port
//! (in-process, or as a child process), a client, and sample communications.
#![allow(dead_code)]

pub mod rfc9162;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use audit_ledger::config::ServerConfig;
use audit_ledger::proto::ledger_service_client::LedgerServiceClient;
use audit_ledger::proto::{Communication, Topic};
use audit_ledger::server::Server;
use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::Channel;

pub type Client = LedgerServiceClient<Channel>;

/// A server running inside the test process.
pub struct TestServer {
    pub address: String,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server; `AUDIT_LEDGER_STORAGE` (as for the binary) picks the backend of a
    /// new store, so the whole suite can run against either.
    pub async fn start(data_dir: &Path) -> TestServer {
        let mut config = ServerConfig::new(data_dir, "127.0.0.1:0".parse().unwrap());
        if let Ok(kind) = std::env::var("AUDIT_LEDGER_STORAGE") {
            config.storage = kind.parse().expect("AUDIT_LEDGER_STORAGE is sled or log");
        }
        Self::start_with(config).await
    }

    pub async fn start_with(config: ServerConfig) -> TestServer {
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let data_dir = config.data_dir.clone();
        let server = open_retrying(|| Server::open(config.clone())).expect("server opens");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
                .expect("server runs");
        });
        TestServer {
            address,
            data_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.address).await
    }

    /// Graceful stop: in-flight calls finish, the writer drains, the store closes.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        // Connection tasks still winding down may hold the store for a moment after
        // `serve` returns (a process exit would release it); wait until it is free so the
        // next test step can open it.
        let store = self.data_dir.join(audit_ledger::server::STORE_DIR_NAME);
        for _ in 0..200 {
            match audit_ledger::storage::open_store(
                &store,
                audit_ledger::storage::StorageKind::default(),
                1 << 20,
            ) {
                Ok(_) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
        panic!("{} stayed locked after the server stopped", store.display());
    }
}

/// Runs `open` until the store is no longer "in use": sled's background threads keep the
/// store's lock for a moment after a `Db` in this same process is dropped (a separate
/// process would see it released at exit), so a test step that reopens a store it just
/// closed may find it briefly locked.
pub fn open_retrying<T, E: std::fmt::Display>(
    mut open: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    for _ in 0..200 {
        match open() {
            Err(error) if error.to_string().contains("in use") => {
                std::thread::sleep(Duration::from_millis(25));
            }
            other => return other,
        }
    }
    open()
}

/// Opens a stopped all-in-sled ledger's store directly (see [`open_retrying`]).
pub fn open_store(path: &Path) -> audit_ledger::storage::SledStore {
    open_retrying(|| audit_ledger::storage::SledStore::open(path, 1 << 20)).expect("store opens")
}

/// Opens a stopped ledger's store, whichever backend it is (see [`open_retrying`]).
pub fn open_any_store(path: &Path) -> audit_ledger::storage::OpenedStore {
    open_retrying(|| {
        audit_ledger::storage::open_store(
            path,
            audit_ledger::storage::StorageKind::default(),
            1 << 20,
        )
    })
    .map_err(|error| error.to_string())
    .expect("store opens")
}

pub async fn connect(address: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .expect("client connects");
    client_over(channel)
}

/// A ledger client on `channel` that takes messages as large as the server sends.
pub fn client_over(channel: Channel) -> Client {
    LedgerServiceClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024)
}

/// The `audit-ledger` binary built for this test run.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_audit-ledger")
}

/// A server running as a child process, so it can be killed with SIGKILL.
pub struct ChildServer {
    pub child: Child,
    pub address: String,
}

impl ChildServer {
    pub fn start(data_dir: &Path) -> ChildServer {
        let mut command = Command::new(binary());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "error")
            .stderr(Stdio::inherit());
        Self::spawn(command)
    }

    /// Runs `command` (a prepared `audit-ledger serve ...`) and waits for its first line.
    pub fn spawn(mut command: Command) -> ChildServer {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("server binary starts");
        let stdout = child.stdout.take().unwrap();
        let mut first_line = String::new();
        BufReader::new(stdout).read_line(&mut first_line).unwrap();
        let address = first_line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first_line:?}"))
            .to_owned();
        ChildServer { child, address }
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        // Up to 30 s: the server's shutdown grace for open connections is 10 s.
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not stop on SIGTERM");
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// `audit-ledger token add NAME --role ROLE [--senders …]`: the new principal's token.
pub fn token_add(auth_file: &Path, name: &str, role: &str, senders: Option<&str>) -> String {
    let mut command = Command::new(binary());
    command
        .args(["token", "add", name, "--role", role, "--auth-file"])
        .arg(auth_file);
    if let Some(senders) = senders {
        command.args(["--senders", senders]);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    // The token is alone on the last line.
    stdout.lines().last().unwrap().to_owned()
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tool the tests drive (buf, Python with grpcio): from `env_var`, else from `fallback`
/// (relative to the crate root), else `None`. CI sets `AUDIT_LEDGER_REQUIRE_TOOLS`, and
/// then a missing tool fails the test instead of skipping it.
pub fn tool(env_var: &str, fallback: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(fallback));
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("AUDIT_LEDGER_REQUIRE_TOOLS").is_some() {
        panic!(
            "{} is missing ({env_var} or {fallback}); .ci/run installs it",
            path.display()
        );
    }
    eprintln!(
        "skipped: {} not found (set {env_var}; .ci/run installs it)",
        path.display()
    );
    None
}

/// A realistic communication, unique by `n`.
pub fn communication(sender: &str, n: u64) -> Communication {
    Communication {
        message_id: format!("msg-{n:08}"),
        sender_id: sender.to_owned(),
        customer_id: format!("customer-{}", n % 17),
        topic: [
            Topic::Commercial,
            Topic::Support,
            Topic::Operational,
            Topic::General,
        ][(n % 4) as usize] as i32,
        channel: "email".into(),
        sent_at: Some(prost_types::Timestamp {
            seconds: 1_760_000_000 + n as i64,
            nanos: 0,
        }),
        subject: format!("Your subscription renewal #{n}"),
        body: format!("Dear customer, this is message {n} about your subscription.").into_bytes(),
        attributes: [("campaign".to_string(), "renewals-2026".to_string())]
            .into_iter()
            .collect(),
        subscription_id: format!("sub-{}", n % 5),
        product_id: String::new(),
    }
}

/// The latest signed checkpoint.
pub async fn checkpoint(client: &mut Client) -> audit_ledger::proto::Checkpoint {
    client
        .get_checkpoint(audit_ledger::proto::GetCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap()
}

/// Runs the binary with `args` to its end. Run again while the store is "in use": a store
/// this process altered and just closed keeps sled's lock for a moment (see
/// [`open_retrying`]), and a command that found it locked once failed a test.
pub fn run_binary(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let run = || {
        let output = Command::new(binary()).args(args).output().unwrap();
        if String::from_utf8_lossy(&output.stderr).contains("in use") {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(output)
    };
    open_retrying(run).expect("the store is released")
}

/// Runs `audit-ledger verify` on a stopped ledger: (success, stdout).
pub fn run_verify(data_dir: &Path) -> (bool, String) {
    let output = run_binary(&[
        "verify".as_ref(),
        "--data-dir".as_ref(),
        data_dir.as_os_str(),
    ]);
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
    )
}

pub fn hash32(bytes: &[u8]) -> rfc9162::Hash {
    bytes.try_into().expect("32-byte hash")
}

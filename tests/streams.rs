//! Streams under load and against clients that stop reading: open streams count against
//! a limit of their own for their whole life, a stream whose client takes nothing for the
//! idle timeout is reset and gives its place back, and a slow but steady reader is never
//! cut, however long its stream takes.
//!
//! The clients here open HTTP/2 streams with a 64 KiB window and the ledger holds entries
//! of about 60 KiB, so a client that does not read stops the server within an entry or
//! two, and one that reads reopens its window with every entry it takes.

mod common;

use std::time::{Duration, Instant};

use audit_ledger::config::ServerConfig;
use audit_ledger::proto::{AppendBatchRequest, ListEntriesRequest, ListEntriesResponse};
use common::{ChildServer, Client, TestServer, binary, communication};
use tonic::Code;
use tonic::Streaming;
use tonic::transport::Channel;

/// Entries in the ledger; every test's stream lists them all.
const ENTRIES: u64 = 40;
/// Each entry's body: together they are far more than a client's window.
const BODY_BYTES: usize = 60 * 1024;
/// The client's HTTP/2 window per stream.
const WINDOW: u32 = 64 * 1024;
/// How long a test waits for something the server does on its own (reset a stream, give
/// a place back): far beyond what it needs, so that a busy machine does not fail it.
const PATIENCE: Duration = Duration::from_secs(30);

fn config(dir: &std::path::Path) -> ServerConfig {
    let mut config = ServerConfig::new(dir, "127.0.0.1:0".parse().unwrap());
    if let Ok(kind) = std::env::var("AUDIT_LEDGER_STORAGE") {
        config.storage = kind.parse().expect("AUDIT_LEDGER_STORAGE is sled or log");
    }
    config
}

/// A populated server that admits one stream at a time and resets a response after 1 s
/// without a read, and a [`reader`] of it.
async fn one_stream_idle_for_a_second(dir: &std::path::Path) -> (TestServer, Client) {
    let mut config = config(dir);
    config.max_streams = 1;
    config.stream_idle_timeout = Duration::from_secs(1);
    let server = TestServer::start_with(config).await;
    populate(&server.address).await;
    let client = reader(&server.address).await;
    (server, client)
}

/// A client whose streams get a window of [`WINDOW`] bytes.
async fn reader(address: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW * 64)
        .connect()
        .await
        .expect("client connects");
    common::client_over(channel)
}

async fn populate(address: &str) {
    let mut client = common::connect(address).await;
    let communications = (0..ENTRIES)
        .map(|n| {
            let mut communication = communication("streams", n);
            communication.body = vec![b'x'; BODY_BYTES];
            communication
        })
        .collect();
    client
        .append_batch(AppendBatchRequest { communications })
        .await
        .expect("entries appended");
}

/// Opens a stream of every entry; `Err` is the status it was refused with.
async fn open(client: &mut Client) -> Result<Streaming<ListEntriesResponse>, tonic::Status> {
    client
        .list_entries(ListEntriesRequest {
            start_index: 0,
            limit: 0,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn refused(opened: Result<Streaming<ListEntriesResponse>, tonic::Status>) -> tonic::Status {
    match opened {
        Ok(_) => panic!("a stream beyond the limit was admitted"),
        Err(status) => status,
    }
}

/// Opens a stream as soon as the server admits one again, within [`PATIENCE`].
async fn open_when_admitted(client: &mut Client) -> Streaming<ListEntriesResponse> {
    let started = Instant::now();
    loop {
        match open(client).await {
            Ok(stream) => return stream,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    started.elapsed() < PATIENCE,
                    "no stream admitted for {PATIENCE:?}: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("unexpected refusal {status:?}"),
        }
    }
}

/// Reads a stream to its end: the indices it delivered, and how it ended.
async fn drain(
    stream: &mut Streaming<ListEntriesResponse>,
) -> (Vec<u64>, Result<(), tonic::Status>) {
    let mut indices = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(item)) => indices.push(item.entry.expect("an entry").index),
            Ok(None) => return (indices, Ok(())),
            Err(status) => return (indices, Err(status)),
        }
    }
}

/// Reads a stream that must end well: the indices it delivered.
async fn read_whole(stream: &mut Streaming<ListEntriesResponse>) -> Vec<u64> {
    let (indices, ended) = drain(stream).await;
    if let Err(status) = ended {
        panic!(
            "the stream failed after {} entries: {status:?}",
            indices.len()
        );
    }
    indices
}

fn every_entry() -> Vec<u64> {
    (0..ENTRIES).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_beyond_the_limit_is_refused_at_once_until_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_streams = 2;
    let server = TestServer::start_with(config).await;
    populate(&server.address).await;
    let mut client = reader(&server.address).await;

    // Two streams nobody reads: the server cannot finish them, they stay open.
    let first = open(&mut client).await.expect("first stream");
    let mut second = open(&mut client).await.expect("second stream");
    let status = refused(open(&mut client).await);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("open streams"), "{status:?}");
    // From another connection too: the limit is the server's, not the connection's.
    let status = refused(open(&mut reader(&server.address).await).await);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Unary calls are not streams: they still pass.
    client
        .get_entry(audit_ledger::proto::GetEntryRequest { index: 0 })
        .await
        .expect("a unary call beside two open streams");

    // The client drops one: its place comes back, and the next stream is served in full.
    drop(first);
    let mut third = open_when_admitted(&mut client).await;
    assert_eq!(read_whole(&mut third).await, every_entry());
    // The one still open was waiting all along, and is whole too.
    assert_eq!(read_whole(&mut second).await, every_entry());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_whose_client_stops_reading_is_reset_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = one_stream_idle_for_a_second(dir.path()).await;

    let mut stalled = open(&mut client).await.expect("stream");
    let first = stalled
        .message()
        .await
        .expect("an entry")
        .expect("an entry");
    assert_eq!(first.entry.unwrap().index, 0);
    // The client stops reading; while the server waits for it, the stream holds its place.
    let status = refused(open(&mut client).await);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // After the idle timeout the server resets it, and its place is free again.
    let started = Instant::now();
    let mut next = open_when_admitted(&mut client).await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the place came back after {:?}, before the client was idle for long",
        started.elapsed()
    );
    assert_eq!(read_whole(&mut next).await, every_entry());

    // The stalled stream's client, reading again, gets what was in flight, then the reset.
    let (delivered, ended) = drain(&mut stalled).await;
    let status = ended.expect_err("a reset stream does not end well");
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(
        (delivered.len() as u64) < ENTRIES - 1,
        "{} entries delivered after a reset",
        delivered.len()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_read_slowly_but_steadily_outlives_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = one_stream_idle_for_a_second(dir.path()).await;

    // One entry every 150 ms: six seconds in all, six idle timeouts, and never idle.
    let mut stream = open(&mut client).await.expect("stream");
    let started = Instant::now();
    let mut indices = Vec::new();
    while let Some(item) = stream.message().await.expect("the stream goes on") {
        indices.push(item.entry.expect("an entry").index);
        tokio::time::sleep(Duration::from_millis(150)).await;
        if indices.len() == 10 {
            // Well past the idle timeout, the stream still holds its place.
            let status = refused(open(&mut client).await);
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        }
    }
    assert_eq!(indices, every_entry());
    assert!(started.elapsed() > Duration::from_secs(3));

    // Ended: its place is free.
    let mut next = open_when_admitted(&mut client).await;
    assert_eq!(read_whole(&mut next).await, every_entry());
    server.stop().await;
}

/// The settings reach the server from the settings file and the environment like every
/// other (`--max-streams`, `--stream-idle-timeout-secs`).
#[tokio::test(flavor = "multi_thread")]
async fn the_stream_settings_come_from_the_settings_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("settings.toml");
    std::fs::write(&settings, "listen = \"127.0.0.1:0\"\nmax_streams = 1\n").unwrap();
    let mut command = std::process::Command::new(binary());
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&settings)
        .env("RUST_LOG", "error")
        .env_remove("AUDIT_LEDGER_LISTEN")
        .env_remove("AUDIT_LEDGER_MAX_STREAMS")
        .env("AUDIT_LEDGER_STREAM_IDLE_TIMEOUT_SECS", "1")
        .stderr(std::process::Stdio::inherit());
    let server = ChildServer::spawn(command);
    populate(&server.address).await;
    let mut client = reader(&server.address).await;

    let mut stalled = open(&mut client).await.expect("stream");
    let status = refused(open(&mut client).await);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limit of 1 open streams"),
        "{status:?}"
    );
    let mut next = open_when_admitted(&mut client).await;
    assert_eq!(read_whole(&mut next).await, every_entry());
    let (_, ended) = drain(&mut stalled).await;
    assert_eq!(
        ended.expect_err("reset").code(),
        Code::Cancelled,
        "the stalled stream was reset"
    );
    server.terminate();
}

//! Every limit and default of the service, in one place: [`ServerConfig::default`] is the
//! only source of the server's defaults. The binary's flags (each with an `AUDIT_LEDGER_…`
//! environment fall-back) take their defaults from it and override its fields.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Limits on what one record may carry: owned by `records`, which enforces them.
pub use crate::records::RecordLimits;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the sled store and the signing key live.
    pub data_dir: PathBuf,
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// The log's name: the origin line of its checkpoints and its key name. `None` uses the
    /// name the data dir's key already has, or [`DEFAULT_ORIGIN`] on first start.
    pub origin: Option<String>,
    /// A signing key file to use instead of `<data_dir>/signing.key`.
    pub signing_key: Option<PathBuf>,
    pub record_limits: RecordLimits,
    /// Most communications in one `AppendBatch`.
    pub max_batch_records: usize,
    /// Largest gRPC message the server decodes (a whole `AppendBatch`), in bytes.
    pub max_message_bytes: usize,
    /// Most entries one `ListEntries` call streams.
    pub max_list_entries: u64,
    /// Most records one group commit takes.
    pub max_group_records: usize,
    /// sled page cache, in bytes: the sled backend's (the log store's run indexes are read
    /// through the OS page cache).
    pub cache_bytes: u64,
    /// The backend of a new store (an existing one keeps its own).
    pub storage: crate::storage::StorageKind,
    /// Free space kept on the data dir's filesystem: appends are refused below it.
    pub min_free_bytes: u64,
    /// Space kept allocated ahead of the access log's records: what reads recorded in it
    /// may use while another process holds the rest of the disk (about 200 bytes a read).
    pub access_log_reserve_bytes: u64,
    /// Principals and their credentials; `None` runs without authentication, which is only
    /// allowed on a loopback address.
    pub auth_file: Option<PathBuf>,
    /// TLS for the gRPC port.
    pub tls: Option<TlsFiles>,
    /// Allow a non-loopback address without authentication and TLS.
    pub insecure: bool,
    /// Requests in flight at once, over all connections; beyond it calls are answered
    /// `RESOURCE_EXHAUSTED` at once (load shedding), not queued.
    pub max_in_flight: usize,
    /// Server-streaming calls (`ListEntries`) open at once, over all connections; beyond it
    /// a new one is answered `RESOURCE_EXHAUSTED` at once. A stream holds its place from
    /// the moment it is admitted until its response ends, fails or is reset, because its
    /// cost (a reader and up to one message in buffers) lasts as long as the stream, not
    /// only while the handler runs.
    pub max_streams: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// A call whose response has not started after this long is cancelled: all of a unary
    /// call, the setup of a stream. It never ends a stream that is sending: that is
    /// `stream_idle_timeout`'s, so a slow reader of a long export is not cut.
    pub request_timeout: std::time::Duration,
    /// A response (a stream's or a unary call's) of which the client has taken nothing for
    /// this long, while the server had data for it, is reset (`RST_STREAM`, the client sees
    /// `CANCELLED`): a client that stops reading does not hold memory and a place forever.
    /// "Taken" is what HTTP/2 flow control shows: the client's window reopening.
    pub stream_idle_timeout: std::time::Duration,
    /// Page sizes and scan budgets of the compliance listings.
    pub query_limits: crate::compliance::QueryLimits,
    /// How long a shutdown waits for in-flight calls before closing connections.
    pub shutdown_grace: std::time::Duration,
}

/// PEM files of the server's TLS identity, and of the CA that signs client certificates
/// (mTLS, optional: clients may still authenticate with a bearer token).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Origin used when neither `--origin` nor an existing key names the log.
pub const DEFAULT_ORIGIN: &str = "localhost/audit-ledger";

/// How often the server asks the writer to anchor the access trail when it has grown
/// with no write since (`Ledger::anchor_trail`): with the access log's flush interval
/// (`access_log::FLUSH_INTERVAL`), how long a read may stay unanchored.
pub const ACCESS_ANCHOR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Default for ServerConfig {
    /// What `audit-ledger serve` runs with when nothing is set: a ledger in
    /// `./ledger-data`, on loopback port 50051.
    fn default() -> Self {
        ServerConfig::new("./ledger-data", SocketAddr::from(([127, 0, 0, 1], 50051)))
    }
}

impl ServerConfig {
    /// Defaults for a ledger in `data_dir` listening on `listen`.
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            listen,
            origin: None,
            signing_key: None,
            record_limits: RecordLimits::default(),
            max_batch_records: 10_000,
            max_message_bytes: 64 * 1024 * 1024,
            max_list_entries: 10_000,
            // The ledger core's own options keep their defaults there.
            max_group_records: crate::ledger::LedgerOptions::default().max_group_records,
            cache_bytes: 256 * 1024 * 1024,
            storage: crate::storage::StorageKind::default(),
            min_free_bytes: crate::ledger::LedgerOptions::default().min_free_bytes,
            access_log_reserve_bytes: 4 * 1024 * 1024,
            shutdown_grace: std::time::Duration::from_secs(10),
            query_limits: crate::compliance::QueryLimits::default(),
            auth_file: None,
            tls: None,
            insecure: false,
            max_in_flight: 1024,
            max_streams: 128,
            max_concurrent_streams: 256,
            request_timeout: std::time::Duration::from_secs(30),
            stream_idle_timeout: std::time::Duration::from_secs(30),
        }
    }
}

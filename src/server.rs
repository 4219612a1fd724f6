//! Wiring: open the signing key, the store and the ledger; serve gRPC until shutdown; then
//! let the writer finish what it acknowledged and close the store.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::auth::Authenticator;
use crate::grpc::framing::FramingLayer;
use crate::grpc::metrics::MetricsLayer;
use crate::grpc::middleware::{GateLayer, GateLimits};
use crate::grpc::transport::{self, DeadlineLayer};

use crate::access_log::AccessLog;
use crate::compliance::Compliance;
use crate::compliance::index::ComplianceIndexer;
use crate::compliance::page_token::PageTokens;
use crate::config::{ACCESS_ANCHOR_INTERVAL, DEFAULT_ORIGIN, ServerConfig, TlsFiles};
use crate::grpc::{AccessLogApi, ComplianceApi, LedgerApi};
use crate::keys::{self, KeyError};
use crate::ledger::{Ledger, LedgerError, LedgerOptions, WriteState};
use crate::proto::access_log_service_server::AccessLogServiceServer;
use crate::proto::compliance_service_server::ComplianceServiceServer;
use crate::proto::ledger_service_server::LedgerServiceServer;
use crate::storage::{IndexStore, StorageError, StorageKind, open_store};

/// Health-check service name that reports whether writes are accepted.
pub const WRITES_HEALTH_SERVICE: &str = "audit.ledger.v1.Writes";

/// How often the writer is asked to look again at whether writes can be accepted, when
/// nothing else would make it (see [`report_writes`]).
const WRITES_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Directory of the sled store inside the data dir.
pub const STORE_DIR_NAME: &str = "store";

/// Why the server cannot start. Each variant says its cause in its own message, so none
/// returns it as `source()` as well: `main` prints an error with its chain of sources, which
/// would say the cause twice (hence `From` below rather than `#[from]`, which implies
/// `#[source]`).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Config(String),
    #[error("auth: {0}")]
    Auth(crate::auth::AuthError),
    #[error("signing key: {0}")]
    Key(KeyError),
    #[error("store: {0}")]
    Storage(StorageError),
    #[error("{0}")]
    Ledger(LedgerError),
    /// The access trail does not hold what the latest signed checkpoint anchors.
    #[error(
        "refusing to start: {0}. Every read by an auditor or admin must stay on record; put back store/access.log as it was (a copy at least as new as that checkpoint) and run `audit-ledger verify`"
    )]
    AccessTrail(crate::access_log::TrailMismatch),
}

macro_rules! server_error_from {
    ($($variant:ident($cause:ty)),* $(,)?) => {
        $(impl From<$cause> for ServerError {
            fn from(cause: $cause) -> Self {
                ServerError::$variant(cause)
            }
        })*
    };
}

server_error_from!(
    Auth(crate::auth::AuthError),
    Key(KeyError),
    Storage(StorageError),
    Ledger(LedgerError),
    AccessTrail(crate::access_log::TrailMismatch),
);

/// An opened ledger, ready to serve.
pub struct Server {
    ledger: Ledger,
    compliance: Compliance,
    access: AccessLog,
    /// Keys the access log listing's page tokens.
    page_tokens: PageTokens,
    authenticator: Option<Arc<Authenticator>>,
    /// The TLS identity and client CA, read and checked at open.
    tls: Option<TlsAcceptor>,
    config: ServerConfig,
}

/// Refuses configurations that would expose the ledger: no authentication, or tokens in
/// clear text, on an address other hosts can reach (unless `insecure`).
fn check_exposure(config: &ServerConfig) -> Result<(), ServerError> {
    let loopback = config.listen.ip().is_loopback();
    if config.auth_file.is_none() {
        if !loopback && !config.insecure {
            return Err(ServerError::Config(format!(
                "refusing to listen on {} without --auth-file and TLS (anyone could write); \
                 use a loopback address, configure --auth-file and --tls-cert/--tls-key, or pass --insecure",
                config.listen
            )));
        }
        tracing::warn!(listen = %config.listen, "no --auth-file: every caller is trusted; loopback only");
    } else if config.tls.is_none() && !loopback && !config.insecure {
        return Err(ServerError::Config(format!(
            "refusing to listen on {} with bearer tokens but no TLS (tokens would cross the network in clear); \
             configure --tls-cert/--tls-key or pass --insecure",
            config.listen
        )));
    }
    if config.insecure && !loopback {
        tracing::warn!(listen = %config.listen, "--insecure: serving a non-loopback address without the usual protections");
    }
    Ok(())
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|error| ServerError::Config(format!("{}: {error}", path.display())))
}

/// Reads the certificate chain, key and client CA, and has the TLS stack parse them: a
/// missing or unreadable file, or PEM that is not a certificate and its key, stops the
/// start before anything is opened or announced. A client certificate is optional (a
/// client may still authenticate with a bearer token); one that is presented must chain
/// to the client CA. HTTP/2 is the only protocol offered (ALPN `h2`).
fn load_tls(files: &TlsFiles) -> Result<TlsAcceptor, ServerError> {
    let failed = |reason: String| {
        ServerError::Config(format!(
            "TLS ({} and {}): {reason}",
            files.cert.display(),
            files.key.display()
        ))
    };
    let chain = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| failed(format!("{}: {error}", files.cert.display())))?;
    if chain.is_empty() {
        return Err(failed(format!(
            "{}: no certificate in it",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|error| {
        failed(format!(
            "{}: no private key in it ({error})",
            files.key.display()
        ))
    })?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_slice_iter(&read(ca)?) {
                let certificate =
                    certificate.map_err(|error| failed(format!("{}: {error}", ca.display())))?;
                roots
                    .add(certificate)
                    .map_err(|error| failed(format!("{}: {error}", ca.display())))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .map_err(|error| failed(format!("{}: {error}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|error| failed(error.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Server {
    /// Opens (creating on first start) the data dir, key, store and ledger. Fails, saying
    /// why, when the store does not match what the key signed.
    pub fn open(config: ServerConfig) -> Result<Server, ServerError> {
        check_exposure(&config)?;
        let tls = config.tls.as_ref().map(load_tls).transpose()?;
        let authenticator = match &config.auth_file {
            Some(path) => Some(Arc::new(Authenticator::load(path)?)),
            None => None,
        };
        keys::create_private_dir(&config.data_dir)?;
        let key_path = keys::key_path(&config.data_dir, config.signing_key.as_deref());
        let signer = keys::load_or_create(
            &key_path,
            config.origin.as_deref(),
            DEFAULT_ORIGIN,
            config.signing_key.is_none(),
        )?;
        let opened = open_store(
            &config.data_dir.join(STORE_DIR_NAME),
            config.storage,
            config.cache_bytes,
        )?;
        let index: Arc<dyn IndexStore> = opened.index;
        let facts: Arc<dyn IndexStore> = opened.facts;
        let access = AccessLog::open(opened.access)?;
        access.reserve(config.access_log_reserve_bytes);
        let token_secret = signer.secret_bytes();
        let (indexer, progress) =
            ComplianceIndexer::new(index.clone(), facts.clone(), opened.store.clone())?;
        let ledger = Ledger::open(
            opened.store,
            signer,
            LedgerOptions {
                max_group_records: config.max_group_records,
                min_free_bytes: config.min_free_bytes,
                read_only_on_integrity_failure: true,
                body_check: Some(crate::verify::served_body_problem),
                ..LedgerOptions::default()
            },
            Some(Box::new(indexer)),
            Some(Arc::new(access.clone())),
        )?;
        // The trail must hold what the ledger anchored: a trail removed or cut (what is left
        // still chains) is found here, before anything is served or recorded after it.
        let checkpoint = ledger.checkpoint();
        if let Some(anchor) = &checkpoint.access_anchor {
            access.check_anchor(anchor, checkpoint.size)?;
        }
        let compliance = Compliance::new(
            ledger.clone(),
            index,
            facts,
            progress,
            &token_secret,
            config.query_limits.clone(),
        );
        tracing::info!(
            origin = %ledger.checkpoint().origin,
            tree_size = ledger.tree_size(),
            data_dir = %config.data_dir.display(),
            "ledger open"
        );
        Ok(Server {
            ledger,
            compliance,
            access,
            page_tokens: PageTokens::new(&token_secret),
            authenticator,
            tls,
            config,
        })
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn compliance(&self) -> &Compliance {
        &self.compliance
    }

    /// Serves on `listener` until `shutdown` completes, then lets in-flight calls finish
    /// (for at most `shutdown_grace`), stops the writer after what it already took, and
    /// closes the store.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let ledger_service = LedgerServiceServer::new(LedgerApi::new(
            self.ledger.clone(),
            self.compliance.clone(),
            self.access.clone(),
            self.config.clone(),
        ))
        .max_decoding_message_size(self.config.max_message_bytes)
        .max_encoding_message_size(self.config.max_message_bytes);
        let compliance_service = ComplianceServiceServer::new(ComplianceApi::new(
            self.ledger.clone(),
            self.compliance.clone(),
            self.access.clone(),
            self.config.clone(),
        ))
        .max_decoding_message_size(self.config.max_message_bytes)
        .max_encoding_message_size(self.config.max_message_bytes);
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<LedgerServiceServer<LedgerApi>>().await;
        health
            .set_serving::<ComplianceServiceServer<ComplianceApi>>()
            .await;
        // Writes have a health entry of their own: reads may be served while writes are not.
        let writes_status = serving_status(&self.ledger.write_state());
        health
            .set_service_status(WRITES_HEALTH_SERVICE, writes_status)
            .await;
        let writes_reporter = tokio::spawn(report_writes(
            self.ledger.clone(),
            health.clone(),
            writes_status,
        ));
        // Reflection (v1 and the older v1alpha that some tools still ask for): grpcurl,
        // buf curl, Postman and Evans need no proto files.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|error| ServerError::Config(format!("reflection: {error}")))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|error| ServerError::Config(format!("reflection: {error}")))?;
        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(ledger_service)
            .add_service(compliance_service)
            .add_service(AccessLogServiceServer::new(AccessLogApi::new(
                self.access.clone(),
                self.page_tokens.clone(),
            )))
            .prepare();
        let descriptors = [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ];
        let service = tower::ServiceBuilder::new()
            // Outermost, so that the gate's refusals and timeouts are counted too.
            .layer(MetricsLayer::new(&descriptors))
            .layer(DeadlineLayer::new(self.config.request_timeout))
            .layer(GateLayer::new(
                self.authenticator.clone(),
                GateLimits {
                    max_in_flight: self.config.max_in_flight,
                    max_streams: self.config.max_streams,
                },
                &descriptors,
            ))
            // Innermost: the request's framing is checked as the service reads it.
            .layer(FramingLayer::new(&descriptors))
            .service(routes);
        let stop = Arc::new(tokio::sync::Notify::new());
        let serving = transport::serve(
            listener,
            service,
            transport::Settings {
                tls: self.tls.clone(),
                max_concurrent_streams: self.config.max_concurrent_streams,
                idle_timeout: self.config.stream_idle_timeout,
            },
            {
                let stop = stop.clone();
                async move { stop.notified().await }
            },
        );
        tokio::pin!(serving);
        let flusher = self.access.spawn_flusher();
        let anchorer = tokio::spawn(anchor_access_trail(self.ledger.clone()));
        tokio::select! {
            () = &mut serving => {}
            () = shutdown => {
                stop.notify_one();
                // Clients that keep their connections open must not hold the shutdown
                // hostage: past the grace, dropping `serving` closes them.
                if tokio::time::timeout(self.config.shutdown_grace, &mut serving).await.is_err() {
                    tracing::warn!(grace = ?self.config.shutdown_grace, "connections still open; closing them");
                }
            }
        }
        flusher.abort();
        let _ = flusher.await;
        anchorer.abort();
        let _ = anchorer.await;
        writes_reporter.abort();
        let _ = writes_reporter.await;
        if let Err(error) = self.access.flush() {
            tracing::error!(%error, "access log flush at shutdown failed");
        }
        // The writer anchors what was just flushed before it stops.
        self.ledger.shutdown().await;
        tracing::info!(tree_size = self.ledger.tree_size(), "ledger closed");
        Ok(())
    }
}

/// Keeps the health of writes ([`WRITES_HEALTH_SERVICE`]) in step with the writer:
/// `NOT_SERVING` as soon as it refuses writes (the disk full, a group that cannot be
/// written, a store that does not match its checkpoint), `SERVING` as soon as it accepts
/// them again. The writer is asked every [`WRITES_PROBE_INTERVAL`] to look again, so a disk
/// filled or freed by another process while nobody writes is reported too.
async fn report_writes(
    ledger: Ledger,
    health: tonic_health::server::HealthReporter,
    mut reported: tonic_health::ServingStatus,
) {
    let mut writes = ledger.writes();
    let mut probe = tokio::time::interval(WRITES_PROBE_INTERVAL);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        writes.borrow_and_update();
        let status = serving_status(&ledger.write_state());
        if status != reported {
            health
                .set_service_status(WRITES_HEALTH_SERVICE, status)
                .await;
            reported = status;
        }
        tokio::select! {
            changed = writes.changed() => {
                if changed.is_err() {
                    // No writer (a read-only ledger, or one shut down): nothing changes now.
                    return;
                }
            }
            _ = probe.tick() => ledger.probe_writes(),
        }
    }
}

/// Asks the writer every [`ACCESS_ANCHOR_INTERVAL`] to anchor the access trail, so that
/// reads recorded with no write after them are anchored too (it does nothing when the
/// trail has not grown since its last anchor).
async fn anchor_access_trail(ledger: Ledger) {
    let mut tick = tokio::time::interval(ACCESS_ANCHOR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        ledger.anchor_trail();
    }
}

fn serving_status(writes: &WriteState) -> tonic_health::ServingStatus {
    match writes {
        WriteState::Accepting => tonic_health::ServingStatus::Serving,
        WriteState::Refused(_) => tonic_health::ServingStatus::NotServing,
    }
}

/// The sled page cache of the offline tools (`reindex`, `verify`) on a stopped ledger.
pub const OFFLINE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Rebuilds the derived indexes of a stopped ledger from its entries alone, and returns
/// the number of entries indexed. The ledger's tail is checked against its signed
/// checkpoint first, as at every start.
pub async fn reindex(data_dir: &Path, signing_key: Option<&Path>) -> Result<u64, ServerError> {
    let signer = keys::load(&keys::key_path(data_dir, signing_key))?;
    let opened = open_store(
        &data_dir.join(STORE_DIR_NAME),
        StorageKind::default(),
        OFFLINE_CACHE_BYTES,
    )?;
    opened.index.clear()?;
    opened.facts.clear()?;
    let (indexer, progress) =
        ComplianceIndexer::new(opened.index, opened.facts, opened.store.clone())?;
    let ledger = Ledger::open(
        opened.store,
        signer,
        LedgerOptions::default(),
        Some(Box::new(indexer)),
        None,
    )?;
    let size = ledger.tree_size();
    // Fact lists are complete once the ledger is open; communication lists follow.
    progress
        .communications_indexed(size, std::time::Duration::from_secs(365 * 24 * 3600))
        .await
        .map_err(|reason| ServerError::Ledger(LedgerError::Unavailable(reason)))?;
    ledger.shutdown().await;
    Ok(size)
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown requested");
}

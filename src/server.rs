//! Wiring: open the signing key, the store and the ledger; serve gRPC until shutdown; then
//! let the writer finish what it acknowledged and close the store.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::compliance::Compliance;
use crate::compliance::index::ComplianceIndexer;
use crate::config::{DEFAULT_ORIGIN, ServerConfig};
use crate::grpc::{ComplianceApi, LedgerApi};
use crate::keys::{self, KeyError};
use crate::ledger::{Ledger, LedgerError, LedgerOptions};
use crate::proto::compliance_service_server::ComplianceServiceServer;
use crate::proto::ledger_service_server::LedgerServiceServer;
use crate::storage::{IndexStore, SledStore, StorageError};

/// Directory of the sled store inside the data dir.
pub const STORE_DIR_NAME: &str = "store";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("signing key: {0}")]
    Key(#[from] KeyError),
    #[error("store: {0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// An opened ledger, ready to serve.
pub struct Server {
    ledger: Ledger,
    compliance: Compliance,
    config: ServerConfig,
}

impl Server {
    /// Opens (creating on first start) the data dir, key, store and ledger. Fails, saying
    /// why, when the store does not match what the key signed.
    pub fn open(config: ServerConfig) -> Result<Server, ServerError> {
        keys::create_private_dir(&config.data_dir)?;
        let key_path = keys::key_path(&config.data_dir, config.signing_key.as_deref());
        let signer = keys::load_or_create(
            &key_path,
            config.origin.as_deref(),
            DEFAULT_ORIGIN,
            config.signing_key.is_none(),
        )?;
        let store = SledStore::open(&config.data_dir.join(STORE_DIR_NAME), config.cache_bytes)?;
        let index: Arc<dyn IndexStore> = Arc::new(store.index()?);
        let token_secret = signer.secret_bytes();
        let ledger = Ledger::open(
            Arc::new(store),
            signer,
            LedgerOptions {
                max_group_records: config.max_group_records,
                ..LedgerOptions::default()
            },
            Some(Box::new(ComplianceIndexer::new(index.clone()))),
        )?;
        let compliance = Compliance::new(
            ledger.clone(),
            index,
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
            self.config.clone(),
        ))
        .max_decoding_message_size(self.config.max_message_bytes)
        .max_encoding_message_size(self.config.max_message_bytes);
        let compliance_service = ComplianceServiceServer::new(ComplianceApi::new(
            self.ledger.clone(),
            self.compliance.clone(),
            self.config.clone(),
        ))
        .max_decoding_message_size(self.config.max_message_bytes)
        .max_encoding_message_size(self.config.max_message_bytes);
        // Responses go out as several small HTTP/2 frames: without TCP_NODELAY, Nagle's
        // algorithm and the peer's delayed ACK add ~40 ms to a call.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let stop = Arc::new(tokio::sync::Notify::new());
        let serving = tonic::transport::Server::builder()
            .add_service(ledger_service)
            .add_service(compliance_service)
            .serve_with_incoming_shutdown(incoming, {
                let stop = stop.clone();
                async move { stop.notified().await }
            });
        tokio::pin!(serving);
        let result = tokio::select! {
            result = &mut serving => result,
            () = shutdown => {
                stop.notify_one();
                // Clients that keep their connections open must not hold the shutdown hostage.
                match tokio::time::timeout(self.config.shutdown_grace, &mut serving).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!(grace = ?self.config.shutdown_grace, "connections still open; closing them");
                        Ok(())
                    }
                }
            }
        };
        self.ledger.shutdown().await;
        tracing::info!(tree_size = self.ledger.tree_size(), "ledger closed");
        Ok(result?)
    }
}

/// Rebuilds the derived indexes of a stopped ledger from its entries alone, and returns
/// the number of entries indexed. The ledger's tail is checked against its signed
/// checkpoint first, as at every start.
pub async fn reindex(data_dir: &Path, signing_key: Option<&Path>) -> Result<u64, ServerError> {
    let signer = keys::load(&keys::key_path(data_dir, signing_key))?;
    let store = SledStore::open(&data_dir.join(STORE_DIR_NAME), 64 * 1024 * 1024)?;
    let index = store.index()?;
    index.clear()?;
    let ledger = Ledger::open(
        Arc::new(store),
        signer,
        LedgerOptions::default(),
        Some(Box::new(ComplianceIndexer::new(Arc::new(index)))),
    )?;
    let size = ledger.tree_size();
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

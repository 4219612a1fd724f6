//! The command-line client: how `audit-ledger check|violations|communications|append|fact`
//! talk to a running server, read their input and print their results. Uses the same
//! generated gRPC clients any other client would.

pub mod commands;
pub mod export;
pub mod input;
pub mod output;
pub mod witness;

use std::path::PathBuf;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::proto::compliance_service_client::ComplianceServiceClient;
use crate::proto::ledger_service_client::LedgerServiceClient;

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        Ok(Bearer(match token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| anyhow::anyhow!("the token holds characters a header cannot"))?,
            ),
            None => None,
        }))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the bearer token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Where the server is and how to reach it.
#[derive(Debug, Clone)]
pub struct Connection {
    /// `http://HOST:PORT`, or `https://...` for TLS.
    pub server: String,
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate (https).
    pub tls_ca: Option<PathBuf>,
}

/// Both services over one connection.
pub struct Clients {
    pub ledger: LedgerServiceClient<Authed>,
    pub compliance: ComplianceServiceClient<Authed>,
}

impl Connection {
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let mut endpoint = Channel::from_shared(self.server.clone())
            .map_err(|_| anyhow::anyhow!("--server {:?} is not a URL", self.server))?
            .tcp_nodelay(true);
        if let Some(ca) = &self.tls_ca {
            let pem = std::fs::read(ca)
                .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", ca.display()))?;
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
        }
        endpoint.connect().await.map_err(|error| {
            anyhow::anyhow!(
                "cannot reach the server at {} ({}); is it running? (--server)",
                self.server,
                cause_chain(&error)
            )
        })
    }

    pub async fn clients(&self) -> anyhow::Result<Clients> {
        let channel = self.channel().await?;
        let bearer = Bearer::new(self.token.as_deref())?;
        // As large a message as a server with the default settings takes (a whole batch).
        let limit = crate::config::ServerConfig::default().max_message_bytes;
        Ok(Clients {
            ledger: LedgerServiceClient::with_interceptor(channel.clone(), bearer.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            compliance: ComplianceServiceClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        })
    }
}

/// A failed call as one line: what failed and the server's reason.
pub fn call_error(what: &str, status: tonic::Status) -> anyhow::Error {
    let hint = match status.code() {
        tonic::Code::Unauthenticated => " (set AUDIT_LEDGER_TOKEN or --token)",
        tonic::Code::PermissionDenied => " (the token's role does not allow this)",
        tonic::Code::Unavailable => " (is the server running? --server)",
        _ => "",
    };
    anyhow::anyhow!(
        "{what} failed: {:?}: {}{hint}",
        status.code(),
        status.message()
    )
}

/// An error and its sources as one line, each cause said once: tonic's transport error says
/// only "transport error" and keeps the reason (connection refused, a TLS failure, ...) in
/// its sources; a source whose text the line already holds is left out.
fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::cause_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Plain(&'static str);

    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, Plain("refused"));
        assert_eq!(cause_chain(&Outer(refused)), "transport error: refused");
        let said = std::io::Error::other("transport error");
        assert_eq!(cause_chain(&Outer(said)), "transport error");
    }
}

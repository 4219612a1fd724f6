//! The gRPC layer: the only code that sees tonic. It turns requests into calls on the
//! ledger core and `records`, and core results and errors into responses and statuses.

pub mod access;
pub mod codec;
mod compliance_service;
pub mod convert;
pub mod framing;
mod ledger_service;
pub mod metrics;
pub mod middleware;
pub mod status;
pub mod transport;

pub use access::AccessLogApi;
pub use compliance_service::ComplianceApi;
pub use ledger_service::LedgerApi;

/// What the tower layers in front of the services return.
pub(crate) type BoxFuture<T, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send + 'static>>;

/// Tower's clone-and-swap: the service that was polled ready is the one to call, and a
/// fresh clone stays behind for the next `poll_ready`.
pub(crate) fn take_ready<S: Clone>(service: &mut S) -> S {
    let clone = service.clone();
    std::mem::replace(service, clone)
}

/// A method of a descriptor set, as the layers in front of the services need to know it.
pub(crate) struct Method {
    /// `/package.Service/Method`.
    pub path: String,
    /// The client sends a stream of messages (else exactly one).
    pub client_streaming: bool,
    /// The server answers with a stream of messages.
    pub server_streaming: bool,
}

/// Every method of the given encoded descriptor sets.
pub(crate) fn methods(descriptor_sets: &[&[u8]]) -> Vec<Method> {
    use prost::Message;
    let mut methods = Vec::new();
    for encoded in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*encoded) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                for method in service.method {
                    methods.push(Method {
                        path: format!(
                            "/{package}.{service_name}/{}",
                            method.name.unwrap_or_default()
                        ),
                        client_streaming: method.client_streaming.unwrap_or(false),
                        server_streaming: method.server_streaming.unwrap_or(false),
                    });
                }
            }
        }
    }
    methods
}

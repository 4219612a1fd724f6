//! The gate every call passes before reaching a service: load shedding (a bound on requests
//! in flight, answered `RESOURCE_EXHAUSTED` at once rather than queued), then
//! authentication (`UNAUTHENTICATED`) and authorization by role (`PERMISSION_DENIED`).
//! The authenticated [`Principal`] rides on the request's extensions to the handlers.
//! Health checks and reflection pass freely.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::BoxFuture;

use crate::auth::{Authenticator, Principal, Rejection, Role, is_open};

#[derive(Clone)]
pub struct GateLayer {
    authenticator: Option<Arc<Authenticator>>,
    in_flight: Arc<Semaphore>,
}

impl GateLayer {
    /// `authenticator: None` lets every caller through unauthenticated (loopback mode).
    pub fn new(authenticator: Option<Arc<Authenticator>>, max_in_flight: usize) -> Self {
        GateLayer {
            authenticator,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    layer: GateLayer,
}

fn refused(reason: &'static str) {
    metrics::counter!(crate::telemetry::names::GATE_REFUSALS, "reason" => reason).increment(1);
}

/// "registrar or admin": the roles that may call `path`, for a refusal that says what to ask for.
fn needed_roles(path: &str) -> String {
    let names: Vec<String> = Role::allowing(path)
        .into_iter()
        .map(|role| role.to_string())
        .collect();
    names.join(" or ")
}

fn reject<E: Send + 'static>(status: Status) -> BoxFuture<http::Response<Body>, E> {
    Box::pin(std::future::ready(Ok(status.into_http())))
}

impl<S, B> Service<http::Request<B>> for Gate<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let mut inner = super::take_ready(&mut self.inner);
        let path = request.uri().path().to_owned();
        if is_open(&path) {
            return Box::pin(inner.call(request));
        }
        let Ok(permit) = self.layer.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(%path, "load shed: in-flight limit reached");
            refused("load_shed");
            return reject(Status::resource_exhausted(
                "the server is at its limit of requests in flight; retry with backoff",
            ));
        };
        if let Some(authenticator) = &self.layer.authenticator {
            let authorization = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|value| value.as_bytes().to_vec());
            let certificate = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.peer_certs())
                .and_then(|certs| certs.first().map(|cert| cert.as_ref().to_vec()));
            let principal: Principal = match authenticator
                .authenticate(authorization.as_deref(), certificate.as_deref())
            {
                Ok(principal) => principal.clone(),
                Err(rejection) => {
                    tracing::warn!(%path, ?rejection, "authentication failed");
                    refused(match rejection {
                        Rejection::Missing => "missing",
                        Rejection::Malformed => "malformed",
                        Rejection::Unknown => "unknown",
                    });
                    return reject(Status::unauthenticated(match rejection {
                        Rejection::Missing => {
                            "credentials required: authorization: Bearer <token>, or a client certificate"
                        }
                        Rejection::Malformed => "authorization must be 'Bearer <token>'",
                        Rejection::Unknown => "unknown credentials",
                    }));
                }
            };
            if !principal.role.allows(&path) {
                tracing::warn!(%path, principal = %principal.name, role = %principal.role, "permission denied");
                refused("permission_denied");
                return reject(Status::permission_denied(format!(
                    "principal {} (role {}) may not call {path}; it needs the role {}",
                    principal.name,
                    principal.role,
                    needed_roles(&path)
                )));
            }
            request.extensions_mut().insert(principal);
        }
        let response = inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(permit);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    /// A service that holds every call until a permit is released for it.
    fn held(
        release: Arc<Semaphore>,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = BoxFuture<http::Response<Body>, Infallible>,
    > + Clone {
        tower::service_fn(move |_request: http::Request<()>| {
            let release = release.clone();
            Box::pin(async move {
                release.acquire().await.unwrap().forget();
                Ok::<_, Infallible>(http::Response::new(Body::default()))
            }) as BoxFuture<_, _>
        })
    }

    fn grpc_status(response: &http::Response<Body>) -> Option<String> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
    }

    fn call(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn sheds_load_beyond_the_in_flight_limit_at_once() {
        let release = Arc::new(Semaphore::new(0));
        let mut gate = GateLayer::new(None, 2).layer(held(release.clone()));
        let path = "/audit.ledger.v1.LedgerService/Append";
        // Two calls take the two in-flight places (the permit is taken in `call`).
        let first = tokio::spawn(gate.call(call(path)));
        let second = tokio::spawn(gate.call(call(path)));
        // The third is answered at once, without waiting for the others.
        let shed = tokio::time::timeout(std::time::Duration::from_secs(1), gate.call(call(path)))
            .await
            .expect("shedding does not wait")
            .unwrap();
        assert_eq!(
            grpc_status(&shed),
            Some((tonic::Code::ResourceExhausted as i32).to_string())
        );
        // Health checks are never shed.
        let health = tokio::spawn(gate.call(call("/grpc.health.v1.Health/Check")));
        release.add_permits(3);
        for task in [first, second, health] {
            let response = task.await.unwrap().unwrap();
            assert_eq!(grpc_status(&response), None, "passed through");
        }
        // Capacity is back once they finished.
        release.add_permits(1);
        let again = gate.call(call(path)).await.unwrap();
        assert_eq!(grpc_status(&again), None);
    }
}

//! The gate every call passes before reaching a service: load shedding (a bound on requests
//! in flight, answered `RESOURCE_EXHAUSTED` at once rather than queued), then
//! authentication (`UNAUTHENTICATED`) and authorization by role (`PERMISSION_DENIED`),
//! then, for a server-streaming method, a place among the open streams
//! (`RESOURCE_EXHAUSTED` at once when there is none).
//! The authenticated [`Principal`] rides on the request's extensions to the handlers.
//! Health checks and reflection pass freely.
//!
//! A place is held for as long as the call costs something, which is until its response
//! body ends, fails or is dropped (the client reset the stream, the transport reset a
//! response its client stopped taking, the connection closed) — not only until the
//! handler returned: a unary call keeps its place in flight until its answer is out; a
//! stream gives its place in flight back once its response starts and keeps its place
//! among the streams for its whole life, so that long exports do not crowd out unary
//! calls, nor unread streams pile up.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::Frame;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::BoxFuture;

use crate::auth::{Authenticator, Principal, Rejection, Role, is_open};

/// The places the gate hands out.
#[derive(Debug, Clone, Copy)]
pub struct GateLimits {
    /// Calls in flight at once (a stream counts until its response starts).
    pub max_in_flight: usize,
    /// Server-streaming calls open at once.
    pub max_streams: usize,
}

#[derive(Clone)]
pub struct GateLayer {
    authenticator: Option<Arc<Authenticator>>,
    in_flight: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    max_streams: usize,
    /// Paths of the server-streaming methods.
    streaming: Arc<HashSet<String>>,
}

impl GateLayer {
    /// `authenticator: None` lets every caller through unauthenticated (loopback mode).
    /// The streaming methods are those of `descriptor_sets` that stream their response.
    pub fn new(
        authenticator: Option<Arc<Authenticator>>,
        limits: GateLimits,
        descriptor_sets: &[&[u8]],
    ) -> Self {
        let streaming = super::methods(descriptor_sets)
            .into_iter()
            .filter(|method| method.server_streaming)
            .map(|method| method.path)
            .collect();
        GateLayer {
            authenticator,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
            streams: Arc::new(Semaphore::new(limits.max_streams.max(1))),
            max_streams: limits.max_streams.max(1),
            streaming: Arc::new(streaming),
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
        let stream_place = if self.layer.streaming.contains(&path) {
            let Ok(place) = self.layer.streams.clone().try_acquire_owned() else {
                tracing::warn!(%path, "stream refused: open stream limit reached");
                refused("stream_limit");
                return reject(Status::resource_exhausted(format!(
                    "the server is at its limit of {} open streams; retry with backoff",
                    self.layer.max_streams
                )));
            };
            Some(place)
        } else {
            None
        };
        let response = inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let place = match stream_place {
                Some(stream_place) => {
                    drop(permit);
                    stream_place
                }
                None => permit,
            };
            Ok(response.map(|body| {
                Body::new(Holding {
                    inner: body,
                    place: Some(place),
                })
            }))
        })
    }
}

/// A response body that holds its call's place until it ends, fails or is dropped.
struct Holding {
    inner: Body,
    place: Option<OwnedSemaphorePermit>,
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            Poll::Ready(Some(Err(_)) | None) => true,
            Poll::Pending => false,
        };
        if ended {
            this.place = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
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

    fn limits(max_in_flight: usize, max_streams: usize) -> GateLimits {
        GateLimits {
            max_in_flight,
            max_streams,
        }
    }

    #[tokio::test]
    async fn sheds_load_beyond_the_in_flight_limit_at_once() {
        let release = Arc::new(Semaphore::new(0));
        let mut gate = GateLayer::new(None, limits(2, 2), &[]).layer(held(release.clone()));
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

    /// A service whose every response is a body that stays open until `end` is notified.
    fn streaming(
        end: Arc<tokio::sync::Notify>,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = BoxFuture<http::Response<Body>, Infallible>,
    > + Clone {
        tower::service_fn(move |_request: http::Request<()>| {
            let end = end.clone();
            let body = http_body_util::StreamBody::new(futures_util::stream::once(async move {
                end.notified().await;
                Ok::<_, Status>(Frame::data(bytes::Bytes::from_static(b"done")))
            }));
            Box::pin(async move { Ok::<_, Infallible>(http::Response::new(Body::new(body))) })
                as BoxFuture<_, _>
        })
    }

    #[tokio::test]
    async fn a_stream_holds_its_place_until_its_body_is_gone_and_not_a_place_in_flight() {
        let end = Arc::new(tokio::sync::Notify::new());
        let mut gate = GateLayer::new(None, limits(1, 2), &[crate::proto::FILE_DESCRIPTOR_SET])
            .layer(streaming(end.clone()));
        let list = "/audit.ledger.v1.LedgerService/ListEntries";
        let first = gate.call(call(list)).await.unwrap();
        let second = gate.call(call(list)).await.unwrap();
        assert_eq!(grpc_status(&first), None);
        assert_eq!(grpc_status(&second), None);
        // Two open streams: a third is refused at once, though nothing else is in flight.
        let refused = gate.call(call(list)).await.unwrap();
        assert_eq!(
            grpc_status(&refused),
            Some((tonic::Code::ResourceExhausted as i32).to_string())
        );
        let unary = gate
            .call(call("/audit.ledger.v1.LedgerService/GetCheckpoint"))
            .await
            .unwrap();
        assert_eq!(grpc_status(&unary), None, "streams take no place in flight");
        drop(unary);
        // A body dropped (the client went away) gives its place back.
        drop(first);
        let third = gate.call(call(list)).await.unwrap();
        assert_eq!(grpc_status(&third), None);
        // A body read to its end gives its place back too.
        end.notify_one();
        let mut second = second.into_body();
        while let Some(frame) =
            std::future::poll_fn(|cx| Pin::new(&mut second).poll_frame(cx)).await
        {
            frame.unwrap();
        }
        let fourth = gate.call(call(list)).await.unwrap();
        assert_eq!(grpc_status(&fourth), None);
    }
}

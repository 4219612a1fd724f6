//! The outermost layer: counts every gRPC call by method and status code and times it, the
//! gate's refusals included. The code is read from the response headers (trailers-only
//! responses: errors) or from the trailers at the end of the body (successes, streams).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::Frame;
use tonic::body::Body;
use tower::{Layer, Service};

use super::BoxFuture;

use crate::telemetry::names;

#[derive(Clone)]
pub struct MetricsLayer {
    /// Method paths that get a label of their own; anything else is counted as "other", so
    /// a caller cannot grow the label set.
    known: Arc<HashSet<String>>,
}

impl MetricsLayer {
    /// Knows every method of the given encoded descriptor sets.
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut known: HashSet<String> = super::methods(descriptor_sets)
            .into_iter()
            .map(|method| method.path)
            .collect();
        known.insert("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
        known.insert("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".into());
        MetricsLayer {
            known: Arc::new(known),
        }
    }

    fn label(&self, path: &str) -> String {
        if self.known.contains(path) {
            path.to_owned()
        } else {
            "other".to_owned()
        }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metered<S>;
    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    layer: MetricsLayer,
}

impl<S, B> Service<http::Request<B>> for Metered<S>
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

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = super::take_ready(&mut self.inner);
        let method = self.layer.label(request.uri().path());
        let started = Instant::now();
        let response = inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let call = Call { method, started };
            if let Some(code) = grpc_code(response.headers()) {
                call.finish(code);
                return Ok(response);
            }
            Ok(response.map(|body| {
                Body::new(Recorded {
                    inner: body,
                    call: Some(call),
                })
            }))
        })
    }
}

/// A call whose outcome is not recorded yet.
struct Call {
    method: String,
    started: Instant,
}

impl Call {
    fn finish(self, code: &str) {
        metrics::counter!(names::GRPC_REQUESTS, "method" => self.method.clone(), "code" => code.to_owned())
            .increment(1);
        metrics::histogram!(names::GRPC_SECONDS, "method" => self.method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// The numeric `grpc-status` as the code's name (`OK`, `INVALID_ARGUMENT`, ...).
fn grpc_code(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(code_name(tonic::Code::from_i32(value)))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A response body that records its call when the trailers go by (or, if the client goes
/// away first, as `CANCELLED`).
struct Recorded {
    inner: Body,
    call: Option<Call>,
}

impl http_body::Body for Recorded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
                    if let Some(call) = this.call.take() {
                        call.finish(code);
                    }
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(call) = this.call.take() {
                    call.finish(code_name(status.code()));
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = this.call.take() {
                    call.finish("OK");
                }
            }
            Poll::Pending => {}
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

impl Drop for Recorded {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.finish("CANCELLED");
        }
    }
}

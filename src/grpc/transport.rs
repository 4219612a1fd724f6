//! The HTTP/2 server under the services: connections (TLS when configured), the deadline of
//! a call, and the watch that resets a response its client has stopped taking.
//!
//! hyper runs each call (an HTTP/2 stream) on a task of its own, started through an
//! executor. Once a response's body is handed over, hyper alone drives it, and it waits
//! for the client's flow-control window as long as it takes: a client that stops reading
//! would keep the call, its buffers and whatever the handler holds (a stream's place among
//! `max_streams`) for as long as the connection lives, and nothing above hyper can end one
//! call. So each call's task is started here, by [`CallExecutor`], beside a
//! [`ResponseWatch`]: the response body ([`Watched`]) tells the watch when it handed data
//! to hyper and when hyper came back for more. hyper comes back only once the client's
//! window has room; if it does not for `idle_timeout` while data waits, the task is
//! dropped, and with it the call: h2 resets the stream (`RST_STREAM(CANCEL)`, the client
//! sees `CANCELLED`) and drops what it buffered. A response the server is still producing
//! is not idle, however long it takes; a client that reads slowly but steadily reopens its
//! window and is never cut.
//!
//! [`Watched`] also hands the body to hyper in pieces of at most [`PIECE_BYTES`], copied:
//! hyper takes the next piece once the window has any room at all, so a response whose
//! client does not read stops, and is watched, with at most a piece or two buffered below
//! it, instead of finishing with a whole message parked in h2's send buffer, out of
//! anyone's reach.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::Connected;
use tower::{Layer, Service};

use super::BoxFuture;
use crate::telemetry::names;

/// Largest piece of a response body handed to hyper at once: one HTTP/2 frame at the
/// protocol's default `SETTINGS_MAX_FRAME_SIZE`.
pub const PIECE_BYTES: usize = 16 * 1024;

/// What every connection is served with.
#[derive(Clone)]
pub struct Settings {
    /// TLS, when configured; the handshake happens on the connection's own task.
    pub tls: Option<TlsAcceptor>,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// How long a response may wait for a client that takes none of it.
    pub idle_timeout: Duration,
}

/// What a connection serves: the services behind their layers, one clone per call.
pub trait Calls:
    Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> Calls for S where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Accepts connections on `listener` and serves `service` on each until `shutdown`
/// completes; then asks every connection to finish its calls (HTTP/2 `GOAWAY`) and
/// returns when all have closed. Dropping the returned future closes them at once.
pub async fn serve(
    listener: TcpListener,
    service: impl Calls,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) {
    let mut http2 =
        hyper::server::conn::http2::Builder::new(CallExecutor::new(settings.idle_timeout));
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams);
    let http2 = Arc::new(http2);
    // Connection tasks live in the set, so that dropping this future aborts them.
    let mut connections = JoinSet::new();
    let (closing, closing_seen) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    connections.spawn(connection(
                        tcp,
                        settings.tls.clone(),
                        http2.clone(),
                        service.clone(),
                        closing_seen.clone(),
                    ));
                }
                Err(error) => accept_failed(error).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
}

/// A failed `accept`: the peer's trouble (reset before it was accepted) is no news; the
/// server's (out of file descriptors) is logged and given a moment, rather than retried
/// in a busy loop.
async fn accept_failed(error: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | BrokenPipe | Interrupted | WouldBlock | TimedOut
    ) {
        tracing::debug!(%error, "accept");
        return;
    }
    tracing::warn!(%error, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

type Http2 = hyper::server::conn::http2::Builder<CallExecutor>;

/// One connection: the TLS handshake if configured, then HTTP/2 until the peer leaves or
/// the server closes.
async fn connection(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    http2: Arc<Http2>,
    service: impl Calls,
    closing: watch::Receiver<bool>,
) {
    // Responses go out as several small HTTP/2 frames: without TCP_NODELAY, Nagle's
    // algorithm and the peer's delayed ACK add ~40 ms to a call.
    let _ = tcp.set_nodelay(true);
    match tls {
        None => serve_http2(tcp, &http2, service, closing).await,
        Some(tls) => match tls.accept(tcp).await {
            Ok(tls_stream) => serve_http2(tls_stream, &http2, service, closing).await,
            Err(error) => tracing::debug!(%error, "TLS handshake failed"),
        },
    }
}

async fn serve_http2<IO>(
    io: IO,
    http2: &Http2,
    service: impl Calls,
    mut closing: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
{
    // The same extension tonic's own server adds: `TcpConnectInfo`, or
    // `TlsConnectInfo<TcpConnectInfo>` with the client's certificates.
    let connect_info = io.connect_info();
    let calls = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(connect_info.clone());
        let path = request.uri().path().to_owned();
        let mut service = service.clone();
        async move {
            // Polled on the call's own task, where the executor put its watch.
            let watch = ResponseWatch::current();
            if let Some(watch) = &watch {
                watch.set_path(path);
            }
            std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
            let response = service.call(request).await?;
            Ok::<_, Infallible>(match watch {
                Some(watch) => response.map(|body| Body::new(Watched::new(body, watch))),
                None => response,
            })
        }
    });
    let connection = http2.serve_connection(TokioIo::new(io), calls);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended");
            }
            return;
        }
        _ = closing.wait_for(|closing| *closing) => {}
    }
    connection.as_mut().graceful_shutdown();
    if let Err(error) = connection.await {
        tracing::debug!(%error, "connection ended while closing");
    }
}

tokio::task_local! {
    /// The watch of the call whose task is running.
    static WATCH: Arc<ResponseWatch>;
}

/// Starts hyper's call tasks, each beside the watch of its response.
#[derive(Clone)]
struct CallExecutor {
    idle_timeout: Duration,
}

impl CallExecutor {
    fn new(idle_timeout: Duration) -> Self {
        CallExecutor { idle_timeout }
    }
}

impl<F> hyper::rt::Executor<F> for CallExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, call: F) {
        let watch = Arc::new(ResponseWatch::default());
        let idle_timeout = self.idle_timeout;
        tokio::spawn(WATCH.scope(watch.clone(), async move {
            tokio::select! {
                () = call => {}
                () = watch.stalled(idle_timeout) => {
                    metrics::counter!(names::STALLED_RESPONSES).increment(1);
                    tracing::warn!(
                        path = %watch.path(),
                        ?idle_timeout,
                        "the client took none of its response for the idle timeout; call reset"
                    );
                }
            }
        }));
    }
}

/// Whether a call's client is holding up its response.
#[derive(Default)]
struct ResponseWatch {
    state: Mutex<WatchState>,
    /// Woken when data is handed over, so that the watch starts its clock.
    handed: Notify,
}

#[derive(Default)]
struct WatchState {
    /// When data was handed to hyper that hyper has not come back after: the client's
    /// window was shut then. `None` while the server owes the next frame.
    waiting_since: Option<Instant>,
    /// The method, for the log line.
    path: String,
}

impl ResponseWatch {
    fn current() -> Option<Arc<ResponseWatch>> {
        WATCH.try_with(Arc::clone).ok()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WatchState> {
        // Nothing panics while holding it; a poisoned state is still a valid one.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_path(&self, path: String) {
        self.state().path = path;
    }

    fn path(&self) -> String {
        self.state().path.clone()
    }

    /// hyper asks for the next frame: what it was handed went out.
    fn asked(&self) {
        self.state().waiting_since = None;
    }

    /// A frame was handed to hyper.
    fn handed(&self) {
        self.state().waiting_since = Some(Instant::now());
        self.handed.notify_one();
    }

    /// Completes once data has waited `idle_timeout` for hyper to come back.
    async fn stalled(&self, idle_timeout: Duration) {
        loop {
            let waiting_since = self.state().waiting_since;
            match waiting_since {
                None => self.handed.notified().await,
                Some(since) => {
                    let deadline = since + idle_timeout;
                    if Instant::now() >= deadline {
                        return;
                    }
                    tokio::time::sleep_until(deadline).await;
                }
            }
        }
    }
}

/// A response body that reports to its call's watch and hands its data over in pieces.
struct Watched {
    inner: Body,
    watch: Arc<ResponseWatch>,
    /// What `inner` gave that is not handed over yet.
    rest: Bytes,
}

impl Watched {
    fn new(inner: Body, watch: Arc<ResponseWatch>) -> Self {
        Watched {
            inner,
            watch,
            rest: Bytes::new(),
        }
    }

    /// The next piece of `rest`, copied so that a piece left in h2's buffer does not keep
    /// the whole encoded message (tonic's buffer) alive.
    fn next_piece(&mut self) -> Bytes {
        let length = self.rest.len().min(PIECE_BYTES);
        let piece = Bytes::copy_from_slice(&self.rest[..length]);
        if length == self.rest.len() {
            self.rest = Bytes::new();
        } else {
            self.rest.advance(length);
        }
        self.watch.handed();
        piece
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        this.watch.asked();
        if !this.rest.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(this.next_piece()))));
        }
        loop {
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                other => return other,
            };
            match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => {
                    this.rest = data;
                    return Poll::Ready(Some(Ok(Frame::data(this.next_piece()))));
                }
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }
}

/// Cancels a call whose response has not started after the server's request timeout, or
/// the client's own deadline (`grpc-timeout`) if that is sooner, as tonic's server does.
/// It ends the handler's work, not a response that is being sent: streams are the
/// [`ResponseWatch`]'s.
#[derive(Clone)]
pub struct DeadlineLayer {
    timeout: Duration,
}

impl DeadlineLayer {
    pub fn new(timeout: Duration) -> Self {
        DeadlineLayer { timeout }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B> Service<http::Request<B>> for Deadline<S>
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
        let timeout = match grpc_timeout(request.headers()) {
            Some(asked) => asked.min(self.timeout),
            None => self.timeout,
        };
        let response = super::take_ready(&mut self.inner).call(request);
        Box::pin(async move {
            match tokio::time::timeout(timeout, response).await {
                Ok(response) => response,
                Err(_) => Ok(Status::cancelled("Timeout expired").into_http()),
            }
        })
    }
}

/// The client's deadline: `grpc-timeout` is 1 to 8 digits and a unit, `H`, `M`, `S`, `m`,
/// `u` or `n` (gRPC over HTTP/2, "Requests"). Anything else is ignored.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if amount.is_empty() || amount.len() > 8 || !amount.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    fn headers(timeout: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", timeout.parse().unwrap());
        headers
    }

    #[test]
    fn grpc_timeout_is_read_as_the_protocol_writes_it() {
        assert_eq!(grpc_timeout(&headers("3S")), Some(Duration::from_secs(3)));
        assert_eq!(
            grpc_timeout(&headers("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            grpc_timeout(&headers("99999999H")),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in ["", "S", "3", "3s", "-3S", "+3S", "123456789S", "3 S"] {
            assert_eq!(grpc_timeout(&headers(bad)), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn a_body_goes_out_in_copied_pieces_then_its_trailers() {
        let message = Bytes::from(vec![7u8; 2 * PIECE_BYTES + 5]);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = vec![
            Ok::<_, Status>(Frame::data(message.clone())),
            Ok(Frame::trailers(trailers)),
        ];
        let inner = Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)));
        let watch = Arc::new(ResponseWatch::default());
        let mut body = Watched::new(inner, watch.clone());
        let mut pieces = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.unwrap();
            if frame.is_trailers() {
                assert_eq!(watch.state().waiting_since, None);
                break;
            }
            assert!(watch.state().waiting_since.is_some());
            let piece = frame.into_data().unwrap();
            let shared = message.as_ptr_range();
            assert!(
                !shared.contains(&piece.as_ptr()),
                "a piece shares the message's buffer"
            );
            pieces.push(piece);
        }
        assert_eq!(
            pieces.iter().map(Bytes::len).collect::<Vec<_>>(),
            vec![PIECE_BYTES, PIECE_BYTES, 5]
        );
        assert_eq!(pieces.concat(), message.to_vec());
    }
}

//! The request's gRPC framing, checked before tonic reads it: every call's request body
//! passes [`Checked`], which follows the length-prefixed messages ("Length-Prefixed-Message"
//! of gRPC over HTTP/2: a compressed flag, a 4-byte length, the message) as they arrive.
//!
//! tonic answers a request whose framing is broken `INTERNAL` — a body that ends inside a
//! message or its header, a flag other than 0 or 1, a compressed message without a
//! `grpc-encoding`, a unary call without a message — and its own codec (health,
//! reflection) a message that does not decode too. Those are the caller's mistakes, and
//! an `INTERNAL` pages an operator for anyone's garbage: such a request is
//! `INVALID_ARGUMENT`, naming the defect ([`status::malformed_request`]). (The gRPC
//! compression document asks for `INTERNAL` on a compressed flag without an encoding;
//! here it is the request's defect like the others.)
//!
//! The defect is found here, from the bytes themselves, and never inferred from a status:
//! the body hands tonic an error in place of the defective bytes (so tonic never decodes
//! them), and the call's final status is rewritten to the defect's only when a defect was
//! found — which covers a handler that swallows its request stream's error (reflection
//! ends its response with `OK`). A server-side `INTERNAL` after a well-formed request is
//! never touched. Our own services' messages are checked by their codec (`codec`); for
//! the services on tonic's codec each message is decoded here once more, as the request
//! type of its path ([`stock_codec_requests`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use super::BoxFuture;
use super::status::malformed_request;

/// A message's prefix: the compressed flag and the length (u32, big-endian).
const PREFIX: usize = 5;
/// tonic's own decoding limit for the services built with its defaults (health,
/// reflection): a longer message is refused by tonic (`OUT_OF_RANGE`), so not buffered here.
const STOCK_CODEC_LIMIT: usize = 4 * 1024 * 1024;

/// Decodes one message as a path's request type: `Err` names what is wrong.
type Validator = fn(&[u8]) -> Result<(), String>;

fn decodes<M: prost::Message + Default>(bytes: &[u8]) -> Result<(), String> {
    M::decode(bytes)
        .map(drop)
        .map_err(|error| error.to_string())
}

/// The services that decode with tonic's codec rather than ours: path, request message
/// name, and its decoder.
fn stock_codec_requests() -> Vec<(&'static str, &'static str, Validator)> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::{v1, v1alpha};
    const HEALTH: &str = "grpc.health.v1.HealthCheckRequest";
    const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflectionRequest";
    const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflectionRequest";
    vec![
        (
            "/grpc.health.v1.Health/Check",
            HEALTH,
            decodes::<HealthCheckRequest>,
        ),
        (
            "/grpc.health.v1.Health/Watch",
            HEALTH,
            decodes::<HealthCheckRequest>,
        ),
        (
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            REFLECTION_V1,
            decodes::<v1::ServerReflectionRequest>,
        ),
        (
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            REFLECTION_V1ALPHA,
            decodes::<v1alpha::ServerReflectionRequest>,
        ),
    ]
}

/// What is known of a path's requests.
#[derive(Clone, Copy, Default)]
struct Rule {
    /// The client sends exactly one message (a unary or server-streaming method).
    single_message: bool,
    /// The request type's name and decoder, for a service on tonic's codec.
    stock_codec: Option<(&'static str, Validator)>,
}

#[derive(Clone)]
pub struct FramingLayer {
    rules: Arc<HashMap<String, Rule>>,
}

impl FramingLayer {
    /// Knows the methods of `descriptor_sets` (which take one message) and the services on
    /// tonic's codec; any other path may send any number of well-framed messages.
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut rules: HashMap<String, Rule> = HashMap::new();
        for method in super::methods(descriptor_sets) {
            rules.entry(method.path).or_default().single_message = !method.client_streaming;
        }
        for (path, name, validator) in stock_codec_requests() {
            rules.entry(path.to_owned()).or_default().stock_codec = Some((name, validator));
        }
        FramingLayer {
            rules: Arc::new(rules),
        }
    }
}

impl<S> Layer<S> for FramingLayer {
    type Service = Framing<S>;
    fn layer(&self, inner: S) -> Framing<S> {
        Framing {
            inner,
            rules: self.rules.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Framing<S> {
    inner: S,
    rules: Arc<HashMap<String, Rule>>,
}

impl<S> Service<http::Request<Body>> for Framing<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let rule = self
            .rules
            .get(request.uri().path())
            .copied()
            .unwrap_or_default();
        // A compressed message needs an encoding to decompress it with; an encoding the
        // server does not have is refused by tonic (`UNIMPLEMENTED`) before the body.
        let compression_named = request
            .headers()
            .get("grpc-encoding")
            .is_some_and(|encoding| encoding != "identity");
        let defect: Arc<OnceLock<String>> = Arc::default();
        let request = request.map(|body| {
            Body::new(Checked {
                inner: body,
                frames: Frames::new(rule, compression_named),
                defect: defect.clone(),
                done: false,
            })
        });
        let response = super::take_ready(&mut self.inner).call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(answer(response, defect))
        })
    }
}

/// The response as the handler gave it, unless the request had a defect: then its status
/// is the defect's. A response already ended (trailers-only: the status in its headers)
/// is replaced; a streaming one gets its trailers rewritten when they come.
fn answer(response: http::Response<Body>, defect: Arc<OnceLock<String>>) -> http::Response<Body> {
    if let Some(defect) = defect.get()
        && response.headers().contains_key("grpc-status")
    {
        return malformed_request(defect).into_http();
    }
    response.map(|body| {
        Body::new(Answer {
            inner: body,
            defect,
        })
    })
}

/// Where the reading of the request's messages is.
struct Frames {
    rule: Rule,
    compression_named: bool,
    /// Bytes of the current message's prefix seen so far.
    prefix: [u8; PREFIX],
    prefix_len: usize,
    /// Bytes of the current message still to come, once its prefix is complete.
    message_left: Option<usize>,
    /// The current message's declared length.
    message_len: usize,
    /// The current message so far, for a service on tonic's codec.
    message: Vec<u8>,
    messages: u64,
}

impl Frames {
    fn new(rule: Rule, compression_named: bool) -> Self {
        Frames {
            rule,
            compression_named,
            prefix: [0; PREFIX],
            prefix_len: 0,
            message_left: None,
            message_len: 0,
            message: Vec::new(),
            messages: 0,
        }
    }

    /// Follows `data`; `Err` names the first defect in it.
    fn take(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() {
            match self.message_left {
                None => {
                    let n = (PREFIX - self.prefix_len).min(data.len());
                    self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
                    self.prefix_len += n;
                    data = &data[n..];
                    if self.prefix_len == PREFIX {
                        self.start_message()?;
                    }
                }
                Some(left) => {
                    let n = left.min(data.len());
                    if self.buffering() {
                        self.message.extend_from_slice(&data[..n]);
                    }
                    self.message_left = Some(left - n);
                    data = &data[n..];
                    if left == n {
                        self.end_message()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn buffering(&self) -> bool {
        self.rule.stock_codec.is_some() && self.message_len <= STOCK_CODEC_LIMIT
    }

    fn start_message(&mut self) -> Result<(), String> {
        self.messages += 1;
        if self.rule.single_message && self.messages > 1 {
            return Err("the method takes one request message, and the request holds more".into());
        }
        match self.prefix[0] {
            0 => {}
            1 if self.compression_named => {}
            1 => {
                return Err(
                    "a message is marked compressed, but the request names no grpc-encoding".into(),
                );
            }
            flag => {
                return Err(format!(
                    "a message's compressed flag is {flag} (it is 0 or 1)"
                ));
            }
        }
        let length = u32::from_be_bytes(self.prefix[1..].try_into().expect("4 bytes"));
        self.message_len = length as usize;
        self.message_left = Some(self.message_len);
        self.message.clear();
        if self.message_len == 0 {
            self.end_message()?;
        }
        Ok(())
    }

    fn end_message(&mut self) -> Result<(), String> {
        self.message_left = None;
        self.prefix_len = 0;
        // A compressed message is tonic's to decompress (and to refuse).
        if let Some((name, validator)) = self.rule.stock_codec
            && self.buffering()
            && self.prefix[0] == 0
        {
            validator(&self.message)
                .map_err(|error| format!("the message is not a valid {name}: {error}"))?;
        }
        Ok(())
    }

    /// The body ended: `Err` if it ended inside a message, or without the one it needs.
    fn end(&self) -> Result<(), String> {
        if let Some(left) = self.message_left {
            return Err(format!(
                "the body ends {left} bytes into the {}-byte message its prefix declares, {} short",
                self.message_len - left,
                left
            ));
        }
        if self.prefix_len > 0 {
            return Err(format!(
                "the body ends {} bytes into a message's 5-byte prefix",
                self.prefix_len
            ));
        }
        if self.rule.single_message && self.messages == 0 {
            return Err("the method takes one request message, and the body holds none".into());
        }
        Ok(())
    }
}

/// A request body whose framing is followed as tonic reads it: a defect is recorded and
/// handed to tonic as the body's error, in place of the bytes that hold it.
struct Checked {
    inner: Body,
    frames: Frames,
    defect: Arc<OnceLock<String>>,
    /// A defect was handed over: the body is over.
    done: bool,
}

impl Checked {
    fn defective(&mut self, defect: String) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        let status = malformed_request(&defect);
        tracing::debug!(%defect, "malformed request");
        let _ = self.defect.set(defect);
        Poll::Ready(Some(Err(status)))
    }
}

impl http_body::Body for Checked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(defect) = this.frames.take(data)
                {
                    return this.defective(defect);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => match this.frames.end() {
                Ok(()) => Poll::Ready(None),
                Err(defect) => this.defective(defect),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        // The end is where the last checks are made: it must be polled for.
        self.done
    }
}

/// A response body whose trailers carry the request's defect, if it had one.
struct Answer {
    inner: Body,
    defect: Arc<OnceLock<String>>,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let Some(defect) = this.defect.get() else {
                    return Poll::Ready(Some(Ok(frame)));
                };
                let mut trailers = frame.into_trailers().unwrap_or_default();
                for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                    trailers.remove(name);
                }
                let _ = malformed_request(defect).add_header(&mut trailers);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            other => other,
        }
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

    fn unary() -> Rule {
        Rule {
            single_message: true,
            stock_codec: None,
        }
    }

    fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut bytes = vec![flag];
        bytes.extend_from_slice(&(message.len() as u32).to_be_bytes());
        bytes.extend_from_slice(message);
        bytes
    }

    /// Feeds `body` one byte at a time (the hardest split) and then ends it.
    fn check(rule: Rule, compression_named: bool, body: &[u8]) -> Result<(), String> {
        let mut frames = Frames::new(rule, compression_named);
        for byte in body {
            frames.take(std::slice::from_ref(byte))?;
        }
        let mut whole = Frames::new(rule, compression_named);
        let at_once = whole.take(body).and_then(|()| whole.end());
        let result = frames.end();
        assert_eq!(result, at_once, "the same however the body is split");
        result
    }

    #[test]
    fn well_framed_requests_pass() {
        assert_eq!(check(unary(), false, &framed(0, b"\x08\x01")), Ok(()));
        assert_eq!(check(unary(), false, &framed(0, b"")), Ok(()));
        assert_eq!(check(unary(), true, &framed(1, b"zz")), Ok(()));
        let streaming = Rule::default();
        assert_eq!(check(streaming, false, b""), Ok(()));
        let two = [framed(0, b"a"), framed(0, b"bc")].concat();
        assert_eq!(check(streaming, false, &two), Ok(()));
    }

    #[test]
    fn every_framing_defect_is_named() {
        let defect = |rule, compression_named, body: &[u8]| {
            check(rule, compression_named, body).expect_err("a defect")
        };
        let whole = framed(0, b"\x08\x01\x10\x02");
        assert!(defect(unary(), false, &whole[..whole.len() - 1]).contains("1 short"));
        assert!(defect(unary(), false, &whole[..3]).contains("5-byte prefix"));
        let longer = [whole.clone(), vec![0, 0]].concat();
        assert!(defect(unary(), false, &longer).contains("prefix"));
        let two = [whole.clone(), framed(0, b"")].concat();
        assert!(defect(unary(), false, &two).contains("holds more"));
        assert!(defect(unary(), false, &framed(1, b"x")).contains("grpc-encoding"));
        assert!(defect(unary(), false, &framed(7, b"x")).contains("flag is 7"));
        assert!(defect(unary(), false, b"").contains("holds none"));
    }

    #[test]
    fn messages_for_tonics_codec_are_decoded_here() {
        let (_, name, validator) = stock_codec_requests()[0];
        let health = Rule {
            single_message: true,
            stock_codec: Some((name, validator)),
        };
        // HealthCheckRequest { service (1): "" } and a field 1 that is not UTF-8.
        assert_eq!(check(health, false, &framed(0, b"\x0a\x00")), Ok(()));
        let error = check(health, false, &framed(0, b"\x0a\x02\xff\xfe")).unwrap_err();
        assert!(
            error.contains("grpc.health.v1.HealthCheckRequest"),
            "{error}"
        );
    }
}

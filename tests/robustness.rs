//! Bad input from the network: arbitrary bytes as requests, invalid UTF-8, oversized
//! messages, huge limits and page sizes, arbitrary communications and facts. No panic, no
//! hang, every rejection a clean status (never INTERNAL: bad input is the caller's
//! mistake), and the ledger still verifies afterwards.

mod common;

use audit_ledger::config::RecordLimits;
use audit_ledger::proto::compliance_service_client::ComplianceServiceClient;
use audit_ledger::proto::{
    AppendRequest, Communication, Fact, GetCheckpointRequest, ListCommunicationsRequest,
    ListEntriesRequest, fact::Kind,
};
use audit_ledger::records::{prepare_communication, prepare_fact};
use bytes::{Buf, BufMut};
use common::{TestServer, communication};
use proptest::prelude::*;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Sends and receives raw protobuf bytes, so tests can put anything on the wire.
#[derive(Default, Clone)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn raw_call(channel: &Channel, path: &str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        path.parse::<http::uri::PathAndQuery>().unwrap(),
        RawCodec,
    )
    .await
    .map(|response| response.into_inner())
}

/// Sends `body` as the whole body of a gRPC call to `path`, byte for byte (no framing
/// added: the test writes the message prefixes itself), with `headers` besides the usual
/// ones, and returns the call's status code and message.
async fn raw_body_call(
    channel: &Channel,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (i32, String) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut request = http::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(body),
        )))
        .unwrap();
    let response = channel.clone().oneshot(request).await.unwrap();
    let status_of = |headers: &http::HeaderMap| {
        let code = headers
            .get("grpc-status")?
            .to_str()
            .ok()?
            .parse::<i32>()
            .ok()?;
        let message = headers
            .get("grpc-message")
            .map(|value| percent_decode(value.as_bytes()))
            .unwrap_or_default();
        Some((code, message))
    };
    if let Some(status) = status_of(response.headers()) {
        return status;
    }
    let trailers = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .trailers()
        .cloned()
        .unwrap_or_default();
    status_of(&trailers).expect("a grpc-status in the trailers")
}

/// grpc-message is percent-encoded.
fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => {
                let hex = std::str::from_utf8(hex).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A message with its gRPC prefix: the compressed flag and the length.
fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut bytes = vec![flag];
    bytes.extend_from_slice(&(message.len() as u32).to_be_bytes());
    bytes.extend_from_slice(message);
    bytes
}

/// Issue 16, item 6: a request whose gRPC framing is broken is the caller's mistake too.
/// tonic answered INTERNAL for each of these (and health and reflection, on tonic's own
/// codec, for a message that does not decode; reflection ended such a call `OK`): every
/// service answers INVALID_ARGUMENT naming the defect, and well-formed calls still pass.
#[tokio::test]
async fn framing_defects_are_invalid_argument_for_every_service() {
    let dir = tempfile::tempdir().unwrap();
    let (server, channel, mut client) = serve_one_entry(dir.path()).await;
    const GET_ENTRY: &str = "/audit.ledger.v1.LedgerService/GetEntry";
    const HEALTH: &str = "/grpc.health.v1.Health/Check";
    const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    // GetEntryRequest { index: 0 }; HealthCheckRequest {}; ServerReflectionRequest {
    // list_services: "" }.
    let messages: [(&str, &[u8], bool); 3] = [
        (GET_ENTRY, b"\x08\x00", true),
        (HEALTH, b"", true),
        (REFLECTION, b"\x3a\x00", false),
    ];
    for (path, message, unary) in messages {
        let whole = framed(0, message);
        assert_eq!(
            raw_body_call(&channel, path, &[], whole.clone()).await.0,
            0,
            "{path}: a well-formed call"
        );
        let declared_longer = {
            let mut body = framed(0, &[message, b"\x08\x00\x08\x00"].concat());
            body.truncate(whole.len() + 2);
            body
        };
        // What is wrong, the body, and headers besides the usual ones.
        type Defect<'a> = (&'a str, Vec<u8>, Vec<(&'a str, &'a str)>);
        let mut defects: Vec<Defect> = vec![
            (
                "a body shorter than its prefix declares",
                declared_longer,
                vec![],
            ),
            (
                "a body longer than its prefix declares",
                [whole.clone(), vec![0, 0, 1]].concat(),
                vec![],
            ),
            ("a body cut inside the prefix", whole[..3].to_vec(), vec![]),
            (
                "the compressed flag with no encoding",
                framed(1, message),
                vec![],
            ),
            (
                "the compressed flag with the identity encoding",
                framed(1, message),
                vec![("grpc-encoding", "identity")],
            ),
            ("a flag that is neither 0 nor 1", framed(2, message), vec![]),
        ];
        if unary {
            defects.push(("an empty body", Vec::new(), vec![]));
            defects.push((
                "two messages for a unary method",
                [whole.clone(), whole.clone()].concat(),
                vec![],
            ));
        }
        if path != GET_ENTRY {
            // Field 1 (health's service, reflection's host) a string that is not UTF-8.
            defects.push((
                "a message that does not decode",
                framed(0, b"\x0a\x02\xff\xfe"),
                vec![],
            ));
        }
        for (what, body, headers) in defects {
            let (code, message) = raw_body_call(&channel, path, &headers, body).await;
            assert_eq!(
                code,
                Code::InvalidArgument as i32,
                "{path}, {what}: {message}"
            );
            assert!(
                message.starts_with("the request is not well-formed gRPC: "),
                "{path}, {what}: {message}"
            );
        }
    }
    assert_eq!(common::checkpoint(&mut client).await.size, 1);
    server.stop().await;
}

/// A deterministic byte generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const PATHS: [&str; 8] = [
    "/audit.ledger.v1.LedgerService/Append",
    "/audit.ledger.v1.LedgerService/AppendBatch",
    "/audit.ledger.v1.LedgerService/GetEntry",
    "/audit.ledger.v1.LedgerService/GetInclusionProof",
    "/audit.ledger.v1.LedgerService/GetConsistencyProof",
    "/audit.ledger.v1.ComplianceService/RecordFact",
    "/audit.ledger.v1.ComplianceService/CheckSender",
    "/audit.ledger.v1.ComplianceService/ListViolations",
];

/// A server holding one communication, a channel for raw calls, and a client.
async fn serve_one_entry(dir: &std::path::Path) -> (TestServer, Channel, common::Client) {
    let server = TestServer::start(dir).await;
    let channel = Channel::from_shared(format!("http://{}", server.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = server.client().await;
    client
        .append(AppendRequest {
            communication: Some(communication("s", 1)),
        })
        .await
        .unwrap();
    (server, channel, client)
}

#[tokio::test]
async fn arbitrary_bytes_on_the_wire_get_clean_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let (server, channel, mut client) = serve_one_entry(dir.path()).await;

    let iterations: usize = std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for i in 0..iterations {
        let len = (rng.next() % 300) as usize;
        let mut body: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half the time, start from a valid request and corrupt some bytes: deeper parsing.
        if i % 2 == 0 {
            use prost::Message;
            body = AppendRequest {
                communication: Some(communication("s", i as u64 + 10)),
            }
            .encode_to_vec();
            for _ in 0..1 + rng.next() % 4 {
                let at = (rng.next() as usize) % body.len();
                body[at] = rng.next() as u8;
            }
        }
        let path = PATHS[(rng.next() as usize) % PATHS.len()];
        if let Err(status) = raw_call(&channel, path, body).await {
            assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument | Code::NotFound | Code::OutOfRange | Code::AlreadyExists
                ),
                "{path}: {status:?}"
            );
        }
    }
    // Still serving, and whatever got appended forms a ledger that verifies.
    client
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .unwrap();
    server.stop().await;
    let output = std::process::Command::new(common::binary())
        .args(["verify", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Every method of the ledger's services, from the descriptor set the server serves by
/// reflection: a method added later is covered without touching this list.
fn every_method() -> Vec<String> {
    use prost::Message;
    let set =
        prost_types::FileDescriptorSet::decode(audit_ledger::proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut paths = Vec::new();
    for file in set.file {
        let package = file.package().to_owned();
        if package != "audit.ledger.v1" {
            continue;
        }
        for service in file.service {
            for method in &service.method {
                paths.push(format!("/{package}.{}/{}", service.name(), method.name()));
            }
        }
    }
    paths
}

/// Issue 16: a request that does not decode is the caller's mistake. tonic answered
/// INTERNAL ("failed to decode Protobuf message"), which pages an operator for anyone's
/// garbage; every method answers INVALID_ARGUMENT, naming the message, and nothing is
/// appended.
#[tokio::test]
async fn undecodable_requests_are_invalid_argument_for_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let (server, channel, mut client) = serve_one_entry(dir.path()).await;

    let methods = every_method();
    assert_eq!(methods.len(), 12, "{methods:?}");
    // Field 1 as a string (or a message holding one, as field 1 again) that is not UTF-8:
    // the first field of every request with a string there.
    let invalid_utf8_top = vec![0x0a, 0x02, 0xff, 0xfe];
    let invalid_utf8_nested = vec![0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe];
    for path in &methods {
        let mut bodies = vec![
            ("a varint that never ends", vec![0xff, 0xff, 0xff, 0xff]),
            ("wire type 7", vec![0x0f]),
            ("a length past the end", vec![0x0a, 0x7f, 0x00]),
        ];
        let method = path.rsplit('/').next().unwrap();
        match method {
            "Append" | "AppendBatch" | "RecordFact" => {
                bodies.push(("a nested string not UTF-8", invalid_utf8_nested.clone()))
            }
            "CheckSender" | "ListViolations" | "ListCommunications" => {
                bodies.push(("a string not UTF-8", invalid_utf8_top.clone()))
            }
            _ => {}
        }
        for (what, body) in bodies {
            let status = raw_call(&channel, path, body).await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{path}, {what}: {status:?}"
            );
            assert!(
                status.message().starts_with(&format!(
                    "the request is not a valid audit.ledger.v1.{method}Request"
                )),
                "{path}, {what}: {}",
                status.message()
            );
            if what.contains("UTF-8") {
                assert!(status.message().contains("UTF-8"), "{}", status.message());
            }
        }
    }
    assert_eq!(
        common::checkpoint(&mut client).await.size,
        1,
        "nothing from the undecodable requests was appended"
    );
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_oversized_and_huge_values_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        audit_ledger::config::ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    config.max_message_bytes = 4 * 1024 * 1024;
    let server = TestServer::start_with(config).await;
    let channel = Channel::from_shared(format!("http://{}", server.address))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // AppendRequest { communication (1) { message_id (1): 0xff 0xfe } }: not UTF-8.
    let invalid_utf8 = vec![0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe];
    let status = raw_call(
        &channel,
        "/audit.ledger.v1.LedgerService/Append",
        invalid_utf8,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Nested unknown groups far past prost's recursion limit.
    let mut nested = Vec::new();
    for _ in 0..200 {
        nested.extend_from_slice(&[0x7b]); // field 15, start group
    }
    let status = raw_call(&channel, "/audit.ledger.v1.LedgerService/Append", nested)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A request over the message limit.
    let mut big = communication("s", 1);
    big.body = vec![b'x'; 5 * 1024 * 1024];
    let mut client = server.client().await;
    let status = client
        .append(AppendRequest {
            communication: Some(big),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );

    // Huge limits are capped, not errors.
    for n in 0..3 {
        client
            .append(AppendRequest {
                communication: Some(communication("s", n)),
            })
            .await
            .unwrap();
    }
    let mut stream = client
        .list_entries(ListEntriesRequest {
            start_index: 0,
            limit: u64::MAX,
        })
        .await
        .unwrap()
        .into_inner();
    let mut count = 0;
    while stream.message().await.unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count, 3);
    let mut compliance = ComplianceServiceClient::new(channel);
    let page = compliance
        .list_communications(ListCommunicationsRequest {
            page_size: i32::MAX,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), 3);
    assert_eq!(
        common::checkpoint(&mut client).await.size,
        3,
        "nothing from the bad requests was appended"
    );
    server.stop().await;
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9-]{1,12}",
        any::<String>(),
        "[\\x00-\\x1f]{1,3}",
        Just("x".repeat(300)),
    ]
}

fn any_timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any communication is either prepared or refused as INVALID_ARGUMENT naming a field.
    #[test]
    fn arbitrary_communications_never_panic(
        message_id in any_text(), sender_id in any_text(), customer_id in any_text(),
        topic in any::<i32>(), sent_at in any_timestamp(), subject in any_text(),
        subscription_id in any_text(), product_id in any_text(), body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let communication = Communication {
            message_id, sender_id, customer_id, topic, channel: String::new(), sent_at, subject,
            body, attributes: Default::default(), subscription_id, product_id,
        };
        match prepare_communication(communication, "communication", &RecordLimits::default(), "") {
            Ok(_) => {}
            Err(audit_ledger::records::Invalid { field, .. }) => {
                prop_assert!(field.starts_with("communication."), "{}", field);
            }
        }
    }

    /// Any fact is either prepared or refused as INVALID_ARGUMENT naming a field.
    #[test]
    fn arbitrary_facts_never_panic(fact_id in any_text(), effective_at in any_timestamp(), a in any_text(), b in any_text(), state in any::<i32>(), kind in 0..6u8) {
        let kind = match kind {
            0 => None,
            1 => Some(Kind::Party(audit_ledger::proto::Party { party_id: a, kind: state, display_name: b })),
            2 => Some(Kind::ResellerRelationship(audit_ledger::proto::ResellerRelationship { customer_id: a, partner_id: b, active: state % 2 == 0 })),
            3 => Some(Kind::Subscription(audit_ledger::proto::Subscription { subscription_id: a.clone(), customer_id: a, biller_id: b, ..Default::default() })),
            4 => Some(Kind::Transfer(audit_ledger::proto::Transfer { subscription_id: a.clone(), from_partner_id: a, to_partner_id: b, state })),
            _ => Some(Kind::DirectAgreement(audit_ledger::proto::DirectAgreement { customer_id: a, product_id: b, active: true })),
        };
        match prepare_fact(Fact { fact_id, effective_at, kind }, "fact", &RecordLimits::default(), "") {
            Ok(_) => {}
            Err(audit_ledger::records::Invalid { field, .. }) => prop_assert!(field.starts_with("fact"), "{}", field),
        }
    }

    /// Any bytes as a stored leaf: decoding and header parsing fail cleanly.
    #[test]
    fn arbitrary_leaves_never_panic(leaf in prop::collection::vec(any::<u8>(), 0..512)) {
        use prost::Message;
        let _ = audit_ledger::proto::LeafRecord::decode(leaf.as_slice());
        let _ = audit_ledger::ledger::leaf::decode_header(&leaf);
        let (mut indexer, _) = audit_ledger::compliance::index::ComplianceIndexer::new(std::sync::Arc::new(MemoryIndex::default()), std::sync::Arc::new(MemoryIndex::default()), empty_store()).unwrap();
        use audit_ledger::ledger::Indexer;
        let _ = indexer.index(&[(0, leaf.as_slice())]);
    }
}

/// An empty ledger store, shared by the indexer fuzz cases (opening one per case is slow).
fn empty_store() -> std::sync::Arc<dyn audit_ledger::storage::Store> {
    static STORE: std::sync::OnceLock<std::sync::Arc<audit_ledger::storage::LogStore>> =
        std::sync::OnceLock::new();
    STORE
        .get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("audit-ledger-fuzz-{}", std::process::id()));
            std::sync::Arc::new(audit_ledger::storage::LogStore::open(&dir, 1 << 20).unwrap())
        })
        .clone()
}

/// An in-memory index, for the indexer fuzz case.
#[derive(Default)]
struct MemoryIndex(std::sync::Mutex<std::collections::BTreeMap<Vec<u8>, Vec<u8>>>);

impl audit_ledger::storage::IndexStore for MemoryIndex {
    fn apply(
        &self,
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<(), audit_ledger::storage::StorageError> {
        let mut map = self.0.lock().unwrap();
        for (key, value) in writes {
            match value {
                Some(value) => map.insert(key, value),
                None => map.remove(&key),
            };
        }
        Ok(())
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, audit_ledger::storage::StorageError> {
        Ok(self.0.lock().unwrap().get(key).cloned())
    }
    fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<audit_ledger::storage::KeyValue>, audit_ledger::storage::StorageError> {
        if start >= end {
            return Ok(Vec::new());
        }
        Ok(self
            .0
            .lock()
            .unwrap()
            .range(start.to_vec()..end.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn clear(&self) -> Result<(), audit_ledger::storage::StorageError> {
        self.0.lock().unwrap().clear();
        Ok(())
    }
    fn flush(&self) -> Result<(), audit_ledger::storage::StorageError> {
        Ok(())
    }
    fn seal(&self) -> Result<(), audit_ledger::storage::StorageError> {
        Ok(())
    }
}

#[tokio::test]
async fn calls_past_the_request_timeout_are_cancelled_not_left_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        audit_ledger::config::ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    // Far shorter than a durable batch of thousands (tokio's timer has 1 ms resolution).
    config.request_timeout = std::time::Duration::from_millis(1);
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let batch = (0..5_000).map(|n| communication("s", n)).collect();
    let status = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.append_batch(audit_ledger::proto::AppendBatchRequest {
            communications: batch,
        }),
    )
    .await
    .expect("the server answers instead of hanging")
    .unwrap_err();
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    server.stop().await;
}

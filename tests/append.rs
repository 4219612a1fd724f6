//! Appends through the real gRPC server: unary, batch, concurrency, chaining,
//! idempotency and every kind of bad input.

mod common;

use std::collections::BTreeSet;

use audit_ledger::proto::{
    AppendBatchRequest, AppendRequest, Communication, GetCheckpointRequest, GetEntryRequest,
    ListEntriesRequest, leaf_record,
};
use common::{TestServer, communication, rfc9162};
use sha2::{Digest, Sha256};
use tonic::Code;

#[tokio::test]
async fn unary_and_batch_appends_get_contiguous_indices_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;

    let first = client
        .append(AppendRequest {
            communication: Some(communication("contoso-mail", 0)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.index, 0);
    assert!(!first.duplicate);

    let batch = client
        .append_batch(AppendBatchRequest {
            communications: (1..=5).map(|n| communication("contoso-mail", n)).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let indices: Vec<u64> = batch.results.iter().map(|r| r.index).collect();
    assert_eq!(indices, vec![1, 2, 3, 4, 5]);

    // Every entry: leaf hash is SHA-256(0x00 ‖ leaf), the chain links, the record and body match.
    let mut prev = vec![0u8; 32];
    for index in 0..6u64 {
        let entry = client
            .get_entry(GetEntryRequest { index })
            .await
            .unwrap()
            .into_inner()
            .entry
            .unwrap();
        assert_eq!(entry.index, index);
        assert_eq!(entry.leaf_hash, rfc9162::leaf_hash(&entry.leaf).to_vec());
        let record = entry.record.unwrap();
        assert_eq!(record.index, index);
        assert_eq!(record.prev_leaf_hash, prev, "chain link of entry {index}");
        let Some(leaf_record::Record::Communication(c)) = record.record else {
            panic!("entry {index} is not a communication");
        };
        assert_eq!(c.message_id, format!("msg-{index:08}"));
        assert_eq!(entry.body, communication("contoso-mail", index).body);
        assert_eq!(c.body_sha256, Sha256::digest(&entry.body).to_vec());
        assert_eq!(c.body_size, entry.body.len() as u64);
        prev = entry.leaf_hash.clone();
    }
    // The batch's leaf hashes are the stored ones.
    assert_eq!(batch.results[4].leaf_hash, prev);

    let checkpoint = client
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(checkpoint.size, 6);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_clients_get_one_total_order_without_gaps_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let clients = 8u64;
    let per_client = 40u64;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..per_client {
                let sender = format!("sender-{c}");
                let response = if n % 5 == 0 {
                    let batch = client
                        .append_batch(AppendBatchRequest {
                            communications: vec![
                                communication(&sender, n * 1000),
                                communication(&sender, n * 1000 + 1),
                            ],
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    let idx: Vec<u64> = batch.results.iter().map(|r| r.index).collect();
                    assert_eq!(idx[1], idx[0] + 1, "a batch gets contiguous indices");
                    idx
                } else {
                    vec![
                        client
                            .append(AppendRequest {
                                communication: Some(communication(&sender, n * 1000)),
                            })
                            .await
                            .unwrap()
                            .into_inner()
                            .index,
                    ]
                };
                acked.extend(response);
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let expected = clients * (per_client + per_client / 5);
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(distinct.len() as u64, expected, "no index given twice");
    assert_eq!(
        distinct.iter().copied().collect::<Vec<_>>(),
        (0..expected).collect::<Vec<_>>()
    );

    // The chain links across everything the concurrent writers produced.
    let mut client = server.client().await;
    let mut stream = client
        .list_entries(ListEntriesRequest {
            start_index: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut prev = vec![0u8; 32];
    let mut seen = 0;
    while let Some(item) = stream.message().await.unwrap() {
        let entry = item.entry.unwrap();
        assert_eq!(entry.index, seen);
        assert_eq!(entry.record.unwrap().prev_leaf_hash, prev);
        prev = entry.leaf_hash;
        seen += 1;
    }
    assert_eq!(seen, expected);
    server.stop().await;
}

#[tokio::test]
async fn retries_are_idempotent_and_conflicts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let original = communication("contoso-billing", 7);
    let first = client
        .append(AppendRequest {
            communication: Some(original.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let retry = client
        .append(AppendRequest {
            communication: Some(original.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(retry.duplicate);
    assert_eq!(retry.index, first.index);
    assert_eq!(retry.leaf_hash, first.leaf_hash);

    // Same key, different content.
    let mut altered = original.clone();
    altered.body = b"a different body".to_vec();
    let status = client
        .append(AppendRequest {
            communication: Some(altered.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains("index 0"), "{}", status.message());

    // The same message id from another sender is a different communication.
    let mut other_sender = original.clone();
    other_sender.sender_id = "fabrikam".into();
    let other = client
        .append(AppendRequest {
            communication: Some(other_sender),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.index, 1);

    // A batch mixing a retry and a new record: the retry points back, the new one appends.
    let batch = client
        .append_batch(AppendBatchRequest {
            communications: vec![original.clone(), communication("contoso-billing", 8)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(batch.results[0].duplicate);
    assert_eq!(batch.results[0].index, 0);
    assert!(!batch.results[1].duplicate);
    assert_eq!(batch.results[1].index, 2);

    // A batch with a conflicting record appends nothing at all.
    let status = client
        .append_batch(AppendBatchRequest {
            communications: vec![communication("contoso-billing", 9), altered],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(
        status.message().contains("communications[1]"),
        "{}",
        status.message()
    );
    let size = client
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap()
        .size;
    assert_eq!(size, 3);

    // Concurrent retries of one new message: exactly one entry.
    let fresh = communication("contoso-billing", 100);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut client = server.client().await;
        let fresh = fresh.clone();
        tasks.push(tokio::spawn(async move {
            client
                .append(AppendRequest {
                    communication: Some(fresh),
                })
                .await
                .unwrap()
                .into_inner()
        }));
    }
    let mut indices = BTreeSet::new();
    let mut originals = 0;
    for task in tasks {
        let response = task.await.unwrap();
        indices.insert(response.index);
        originals += usize::from(!response.duplicate);
    }
    assert_eq!(indices.len(), 1);
    assert_eq!(originals, 1);
    server.stop().await;
}

async fn expect_invalid(client: &mut common::Client, communication: Communication, field: &str) {
    let status = client
        .append(AppendRequest {
            communication: Some(communication),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
    assert!(
        status.message().starts_with(field),
        "message {:?} should name {field}",
        status.message()
    );
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let good = || communication("contoso-mail", 1);
    let cases: Vec<(&str, Communication)> = vec![
        (
            "communication.message_id",
            Communication {
                message_id: String::new(),
                ..good()
            },
        ),
        (
            "communication.sender_id",
            Communication {
                sender_id: String::new(),
                ..good()
            },
        ),
        (
            "communication.customer_id",
            Communication {
                customer_id: String::new(),
                ..good()
            },
        ),
        ("communication.topic", Communication { topic: 0, ..good() }),
        (
            "communication.topic",
            Communication {
                topic: 42,
                ..good()
            },
        ),
        (
            "communication.sent_at",
            Communication {
                sent_at: None,
                ..good()
            },
        ),
        (
            "communication.sent_at",
            Communication {
                sent_at: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -5,
                }),
                ..good()
            },
        ),
        (
            "communication.message_id",
            Communication {
                message_id: "m".repeat(257),
                ..good()
            },
        ),
        (
            "communication.sender_id",
            Communication {
                sender_id: "a\tb".into(),
                ..good()
            },
        ),
        (
            "communication.customer_id",
            Communication {
                customer_id: "c\u{1b}[31m".into(),
                ..good()
            },
        ),
        (
            "communication.body",
            Communication {
                body: vec![b'x'; 1024 * 1024 + 1],
                ..good()
            },
        ),
    ];
    for (field, communication) in cases {
        expect_invalid(&mut client, communication, field).await;
    }
    let missing = client
        .append(AppendRequest {
            communication: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(missing.message().starts_with("communication"));

    // An id of exactly 256 bytes is fine.
    client
        .append(AppendRequest {
            communication: Some(Communication {
                message_id: "m".repeat(256),
                ..good()
            }),
        })
        .await
        .unwrap();

    // Batches: one bad communication rejects the whole batch, naming its position.
    let mut batch: Vec<Communication> =
        (10..15).map(|n| communication("contoso-mail", n)).collect();
    batch[3].customer_id.clear();
    let status = client
        .append_batch(AppendBatchRequest {
            communications: batch,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("communications[3].customer_id"),
        "{}",
        status.message()
    );
    let status = client
        .append_batch(AppendBatchRequest {
            communications: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("communications"));
    let too_many: Vec<Communication> = (0..10_001).map(|n| communication("bulk", n)).collect();
    let status = client
        .append_batch(AppendBatchRequest {
            communications: too_many,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("limit"), "{}", status.message());

    // Only the one good append landed.
    let checkpoint = client
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(checkpoint.size, 1);

    // Reads past the end.
    let status = client
        .get_entry(GetEntryRequest { index: 1 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    let status = client
        .get_entry(GetEntryRequest { index: u64::MAX })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    let status = client
        .list_entries(ListEntriesRequest {
            start_index: 5,
            limit: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    server.stop().await;
}

#[tokio::test]
async fn list_entries_pages_by_start_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    client
        .append_batch(AppendBatchRequest {
            communications: (0..20).map(|n| communication("s", n)).collect(),
        })
        .await
        .unwrap();
    let mut stream = client
        .list_entries(ListEntriesRequest {
            start_index: 5,
            limit: 4,
        })
        .await
        .unwrap()
        .into_inner();
    let mut indices = Vec::new();
    while let Some(item) = stream.message().await.unwrap() {
        indices.push(item.entry.unwrap().index);
    }
    assert_eq!(indices, vec![5, 6, 7, 8]);
    // A huge limit is capped, not an error; the end of the ledger ends the stream.
    let mut stream = client
        .list_entries(ListEntriesRequest {
            start_index: 18,
            limit: u64::MAX,
        })
        .await
        .unwrap()
        .into_inner();
    let mut count = 0;
    while stream.message().await.unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count, 2);
    server.stop().await;
}

//! Many writers and readers at once: while tens of clients append thousands of entries,
//! readers fetch checkpoints and proofs; every proof verifies against the checkpoint it
//! names, and every checkpoint is consistent with every earlier one.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use audit_ledger::proto::{
    AppendBatchRequest, AppendRequest, Checkpoint, GetCheckpointRequest,
    GetConsistencyProofRequest, GetEntryRequest, GetInclusionProofRequest,
};
use common::{TestServer, communication, hash32, rfc9162};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_fetched_while_writing_verify_against_their_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let writers = 24u64;
    let per_writer = 100u64;
    let done = Arc::new(AtomicBool::new(false));

    let mut writer_tasks = Vec::new();
    for w in 0..writers {
        let mut client = server.client().await;
        writer_tasks.push(tokio::spawn(async move {
            let sender = format!("writer-{w}");
            let mut n = 0;
            while n < per_writer {
                if n % 10 == 0 {
                    let batch = (n..n + 5).map(|k| communication(&sender, k)).collect();
                    client
                        .append_batch(AppendBatchRequest {
                            communications: batch,
                        })
                        .await
                        .unwrap();
                    n += 5;
                } else {
                    client
                        .append(AppendRequest {
                            communication: Some(communication(&sender, n)),
                        })
                        .await
                        .unwrap();
                    n += 1;
                }
            }
        }));
    }

    let mut reader_tasks = Vec::new();
    for r in 0..8u64 {
        let mut client = server.client().await;
        let done = done.clone();
        reader_tasks.push(tokio::spawn(async move {
            let mut seen: Vec<Checkpoint> = Vec::new();
            let mut proofs = 0u64;
            while !done.load(Ordering::Relaxed) || proofs == 0 {
                let checkpoint = client
                    .get_checkpoint(GetCheckpointRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .checkpoint
                    .unwrap();
                if checkpoint.size == 0 {
                    continue;
                }
                let root = hash32(&checkpoint.root_hash);
                // An entry inside the checkpoint, proven against exactly that tree size.
                let index = (proofs * 7919 + r * 104_729) % checkpoint.size;
                let entry = client
                    .get_entry(GetEntryRequest { index })
                    .await
                    .unwrap()
                    .into_inner()
                    .entry
                    .unwrap();
                let proof = client
                    .get_inclusion_proof(GetInclusionProofRequest {
                        index,
                        tree_size: checkpoint.size,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(
                    rfc9162::verify_inclusion(
                        index,
                        checkpoint.size,
                        &rfc9162::leaf_hash(&entry.leaf),
                        &proof.hashes,
                        &root
                    ),
                    "inclusion of {index} in {}",
                    checkpoint.size
                );
                // And the tree only ever grew.
                if let Some(previous) = seen.last() {
                    assert!(previous.size <= checkpoint.size);
                    let consistency = client
                        .get_consistency_proof(GetConsistencyProofRequest {
                            from_size: previous.size,
                            to_size: checkpoint.size,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(rfc9162::verify_consistency(
                        previous.size,
                        checkpoint.size,
                        &hash32(&previous.root_hash),
                        &root,
                        &consistency.hashes
                    ));
                }
                seen.push(checkpoint);
                proofs += 1;
            }
            proofs
        }));
    }

    for task in writer_tasks {
        task.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut proofs = 0;
    for task in reader_tasks {
        proofs += task.await.unwrap();
    }
    assert!(proofs >= 8, "readers ran alongside the writers");
    let mut client = server.client().await;
    let last = client
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(last.size, writers * per_writer, "no gaps, no duplicates");
    server.stop().await;
}

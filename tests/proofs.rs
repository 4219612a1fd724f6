//! Proofs and checkpoints through the real server, checked by an independent RFC 9162
//! verifier (tests/common/rfc9162.rs) and by the `signed_note` crate.

mod common;

use audit_ledger::proto::{
    AppendRequest, GetConsistencyProofRequest, GetEntryRequest, GetInclusionProofRequest,
};
use common::{TestServer, checkpoint, communication, hash32, rfc9162};
use signed_note::{Note, StandardVerifier, VerifierList};
use tonic::Code;

/// Verifies the note with the verifier key and returns (origin, size, root) from its text:
/// its first three lines, then (C2SP tlog-checkpoint) non-empty extension lines — here at
/// most the access trail's anchor.
fn verify_note(note: &str, verifier_key: &str) -> (String, u64, [u8; 32]) {
    let verifier = StandardVerifier::new(verifier_key).expect("verifier key parses");
    let parsed = Note::from_bytes(note.as_bytes()).expect("note parses");
    parsed
        .verify(&VerifierList::new(vec![Box::new(verifier)]))
        .expect("signature verifies");
    let text = std::str::from_utf8(parsed.text()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "origin, size, root: {text:?}");
    for extension in &lines[3..] {
        assert!(
            extension.starts_with("access-log "),
            "an extension line: {text:?}"
        );
    }
    use base64::Engine as _;
    let root = base64::engine::general_purpose::STANDARD
        .decode(lines[2])
        .unwrap();
    (
        lines[0].to_owned(),
        lines[1].parse().unwrap(),
        hash32(&root),
    )
}

fn verifier_key_from_cli(data_dir: &std::path::Path) -> String {
    let output = std::process::Command::new(common::binary())
        .arg("verifier-key")
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn empty_ledger_has_a_signed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let checkpoint = checkpoint(&mut client).await;
    assert_eq!(checkpoint.size, 0);
    let empty_root: [u8; 32] = sha2::Sha256::digest_empty();
    assert_eq!(checkpoint.root_hash, empty_root.to_vec());
    let verifier_key = verifier_key_from_cli(dir.path());
    let (origin, size, root) = verify_note(&checkpoint.note, &verifier_key);
    assert_eq!(
        (origin.as_str(), size, root),
        (checkpoint.origin.as_str(), 0, empty_root)
    );
    assert_eq!(origin, "localhost/audit-ledger");
    server.stop().await;
}

trait DigestEmpty {
    fn digest_empty() -> [u8; 32];
}
impl DigestEmpty for sha2::Sha256 {
    fn digest_empty() -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest([]).into()
    }
}

#[tokio::test]
async fn every_inclusion_and_consistency_proof_verifies() {
    const N: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let verifier_key = verifier_key_from_cli(dir.path());
    let mut client = server.client().await;

    // One append at a time, so that every size 1..=N has a signed checkpoint.
    let mut roots = vec![checkpoint(&mut client).await.root_hash];
    let mut leaf_hashes = Vec::new();
    for n in 0..N {
        let appended = client
            .append(AppendRequest {
                communication: Some(communication("contoso-mail", n)),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(appended.index, n);
        let checkpoint = checkpoint(&mut client).await;
        // The checkpoint a client sees after an ack covers its entry.
        assert_eq!(checkpoint.size, n + 1);
        let (_, size, root) = verify_note(&checkpoint.note, &verifier_key);
        assert_eq!(size, n + 1);
        assert_eq!(root.to_vec(), checkpoint.root_hash);
        roots.push(checkpoint.root_hash);
        leaf_hashes.push(hash32(&appended.leaf_hash));
    }
    // Each signed root is MTH of the leaves so far, by the RFC's recursive definition.
    for size in 0..=N as usize {
        assert_eq!(
            rfc9162::root_from_leaves(&leaf_hashes[..size]).to_vec(),
            roots[size]
        );
    }

    for tree_size in 1..=N {
        let root = hash32(&roots[tree_size as usize]);
        for index in 0..tree_size {
            let proof = client
                .get_inclusion_proof(GetInclusionProofRequest { index, tree_size })
                .await
                .unwrap()
                .into_inner();
            assert_eq!((proof.index, proof.tree_size), (index, tree_size));
            assert!(
                rfc9162::verify_inclusion(
                    index,
                    tree_size,
                    &leaf_hashes[index as usize],
                    &proof.hashes,
                    &root
                ),
                "inclusion of {index} in {tree_size}"
            );
            // A proof for another leaf must not verify.
            let other = leaf_hashes[((index + 1) % N) as usize];
            assert!(!rfc9162::verify_inclusion(
                index,
                tree_size,
                &other,
                &proof.hashes,
                &root
            ));
        }
    }

    // (to_size 0 means "latest", tested below.)
    for to_size in 1..=N {
        for from_size in 0..=to_size {
            let proof = client
                .get_consistency_proof(GetConsistencyProofRequest { from_size, to_size })
                .await
                .unwrap()
                .into_inner();
            assert_eq!((proof.from_size, proof.to_size), (from_size, to_size));
            let (old, new) = (
                hash32(&roots[from_size as usize]),
                hash32(&roots[to_size as usize]),
            );
            assert!(
                rfc9162::verify_consistency(from_size, to_size, &old, &new, &proof.hashes),
                "consistency {from_size} -> {to_size}"
            );
            if 0 < from_size && from_size < to_size {
                let wrong = hash32(&roots[(from_size - 1) as usize]);
                assert!(!rfc9162::verify_consistency(
                    from_size,
                    to_size,
                    &wrong,
                    &new,
                    &proof.hashes
                ));
            }
        }
    }

    // Size 0 means "the latest checkpoint".
    let latest = client
        .get_inclusion_proof(GetInclusionProofRequest {
            index: 3,
            tree_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.tree_size, N);
    let latest = client
        .get_consistency_proof(GetConsistencyProofRequest {
            from_size: 7,
            to_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.to_size, N);
    server.stop().await;
}

#[tokio::test]
async fn proofs_past_the_tree_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    for n in 0..5 {
        client
            .append(AppendRequest {
                communication: Some(communication("s", n)),
            })
            .await
            .unwrap();
    }
    let inclusion = |index, tree_size| GetInclusionProofRequest { index, tree_size };
    // An index or size past the current tree (5 entries) is OUT_OF_RANGE; within it, a
    // request that describes no proof is INVALID_ARGUMENT.
    for (request, code) in [
        (inclusion(5, 5), Code::OutOfRange),
        (inclusion(9, 5), Code::OutOfRange),
        (inclusion(4, 3), Code::InvalidArgument),
        (inclusion(0, 6), Code::OutOfRange),
        (inclusion(0, u64::MAX), Code::OutOfRange),
        (inclusion(u64::MAX, u64::MAX), Code::OutOfRange),
        (inclusion(7, 0), Code::OutOfRange),
    ] {
        let status = client.get_inclusion_proof(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
    }
    let consistency = |from_size, to_size| GetConsistencyProofRequest { from_size, to_size };
    for (request, code) in [
        (consistency(3, 6), Code::OutOfRange),
        (consistency(4, 3), Code::InvalidArgument),
        (consistency(u64::MAX - 1, u64::MAX), Code::OutOfRange),
        (consistency(u64::MAX, 0), Code::OutOfRange),
        (consistency(6, 5), Code::OutOfRange),
        (consistency(6, 0), Code::OutOfRange),
    ] {
        let status = client.get_consistency_proof(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
    }
    let status = client
        .get_entry(GetEntryRequest { index: 5 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    server.stop().await;
}

/// The one rule, in every method: a size or index past the current tree is OUT_OF_RANGE.
/// `ListEntries` from the tree size itself is an empty stream (nothing recorded there yet).
#[tokio::test]
async fn a_size_or_index_past_the_tree_is_out_of_range_in_every_method() {
    use audit_ledger::proto::compliance_service_client::ComplianceServiceClient;
    use audit_ledger::proto::{
        CheckSenderRequest, GetCheckpointRequest, ListEntriesRequest, ListViolationsRequest, Topic,
    };
    use tokio_stream::StreamExt;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let mut compliance = ComplianceServiceClient::connect(format!("http://{}", server.address))
        .await
        .unwrap();
    for n in 0..3 {
        client
            .append(AppendRequest {
                communication: Some(communication("s", n)),
            })
            .await
            .unwrap();
    }
    let size = checkpoint(&mut client).await.size;
    assert_eq!(size, 3);
    let mut statuses = vec![
        client
            .get_entry(GetEntryRequest { index: size })
            .await
            .unwrap_err(),
        client
            .get_inclusion_proof(GetInclusionProofRequest {
                index: size,
                tree_size: 0,
            })
            .await
            .unwrap_err(),
        client
            .get_consistency_proof(GetConsistencyProofRequest {
                from_size: size + 1,
                to_size: 0,
            })
            .await
            .unwrap_err(),
        client
            .get_consistency_proof(GetConsistencyProofRequest {
                from_size: 1,
                to_size: size + 1,
            })
            .await
            .unwrap_err(),
        client
            .list_entries(ListEntriesRequest {
                start_index: size + 1,
                limit: 0,
            })
            .await
            .unwrap_err(),
        client
            .get_checkpoint(GetCheckpointRequest {
                tree_size: size + 1,
            })
            .await
            .unwrap_err(),
        compliance
            .check_sender(CheckSenderRequest {
                sender_id: "s".into(),
                customer_id: "c".into(),
                topic: Topic::General as i32,
                as_of_tree_size: size + 1,
                ..Default::default()
            })
            .await
            .unwrap_err(),
        compliance
            .list_violations(ListViolationsRequest {
                as_of_tree_size: size + 1,
                ..Default::default()
            })
            .await
            .unwrap_err(),
    ];
    for status in statuses.drain(..) {
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(
            status.message().contains("past the current tree size 3")
                || status
                    .message()
                    .contains("not below the current tree size 3"),
            "{status:?}"
        );
    }
    // From the tree size: an empty stream, as documented.
    let stream = client
        .list_entries(ListEntriesRequest {
            start_index: size,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let entries: Vec<_> = stream.collect().await;
    assert!(entries.is_empty(), "{entries:?}");
    server.stop().await;
}

/// Every group commit's checkpoint is kept and served by size (also after a restart), so
/// an old proof can be checked against the note the ledger signed then; a size inside a
/// group is NOT_FOUND naming the signed sizes around it.
#[tokio::test]
async fn every_signed_checkpoint_is_served_by_its_tree_size() {
    use audit_ledger::proto::AppendBatchRequest;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let verifier_key = verifier_key_from_cli(dir.path());
    let mut client = server.client().await;
    let mut seen = Vec::new();
    let mut leaf_hashes = Vec::new();
    for group in 0..4u64 {
        // Groups of 1, 3, 1, 3 entries: sizes 1, 4, 5, 8.
        let count = if group % 2 == 0 { 1 } else { 3 };
        let results = client
            .append_batch(AppendBatchRequest {
                communications: (0..count)
                    .map(|n| communication("s", group * 10 + n))
                    .collect(),
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        leaf_hashes.extend(results.iter().map(|r| hash32(&r.leaf_hash)));
        seen.push(checkpoint(&mut client).await);
    }
    let sizes: Vec<u64> = seen.iter().map(|c| c.size).collect();
    assert_eq!(sizes, [1, 4, 5, 8]);
    served_by_size(&mut client, &seen, &leaf_hashes, &verifier_key).await;
    server.stop().await;
    // Kept durably: the same after a restart.
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    served_by_size(&mut client, &seen, &leaf_hashes, &verifier_key).await;
    server.stop().await;
}

/// Each checkpoint `seen` is served again by its size, and an old proof checks against it.
async fn served_by_size(
    client: &mut common::Client,
    seen: &[audit_ledger::proto::Checkpoint],
    leaf_hashes: &[rfc9162::Hash],
    verifier_key: &str,
) {
    use audit_ledger::proto::GetCheckpointRequest;
    let at = |tree_size| GetCheckpointRequest { tree_size };
    for old in seen {
        let served = client
            .get_checkpoint(at(old.size))
            .await
            .unwrap()
            .into_inner()
            .checkpoint
            .unwrap();
        assert_eq!(&served, old, "the note signed at size {}", old.size);
        let (_, size, root) = verify_note(&served.note, verifier_key);
        assert_eq!(size, old.size);
        let proof = client
            .get_inclusion_proof(GetInclusionProofRequest {
                index: 0,
                tree_size: size,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(rfc9162::verify_inclusion(
            0,
            size,
            &leaf_hashes[0],
            &proof.hashes,
            &root
        ));
    }
    // 0: the latest.
    let latest = client
        .get_checkpoint(at(0))
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(latest.size, 8);
    // Inside a group: NOT_FOUND, naming the signed sizes around it.
    for (inside, below, above) in [(2, 1, 4), (3, 1, 4), (6, 5, 8), (7, 5, 8)] {
        let status = client.get_checkpoint(at(inside)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(
            status.message(),
            format!(
                "tree_size: no checkpoint was signed at tree size {inside} (the nearest signed sizes are {below} and {above})"
            )
        );
    }
    let status = client.get_checkpoint(at(9)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}

/// An error's reason is said once, not again by each error that wraps it (an invalid
/// `--origin` said its reason twice, a missing auth file three times).
#[test]
fn a_startup_error_says_its_reason_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-auth-file");
    for (args, reason) in [
        (
            vec!["--origin", "has space"],
            "is not a valid note key name".to_owned(),
        ),
        (
            vec!["--auth-file", missing.to_str().unwrap()],
            "No such file or directory".to_owned(),
        ),
    ] {
        let output = std::process::Command::new(common::binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let error = stderr
            .lines()
            .find(|line| line.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line: {stderr}"));
        assert_eq!(error.matches(reason.as_str()).count(), 1, "{error}");
    }
}

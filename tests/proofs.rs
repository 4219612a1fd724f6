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
    for (request, code) in [
        (inclusion(5, 5), Code::InvalidArgument),
        (inclusion(9, 5), Code::InvalidArgument),
        (inclusion(0, 6), Code::OutOfRange),
        (inclusion(0, u64::MAX), Code::OutOfRange),
        (inclusion(u64::MAX, u64::MAX), Code::OutOfRange),
        (inclusion(7, 0), Code::InvalidArgument),
    ] {
        let status = client.get_inclusion_proof(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
    }
    let consistency = |from_size, to_size| GetConsistencyProofRequest { from_size, to_size };
    for (request, code) in [
        (consistency(3, 6), Code::OutOfRange),
        (consistency(4, 3), Code::InvalidArgument),
        (consistency(u64::MAX - 1, u64::MAX), Code::OutOfRange),
        (consistency(u64::MAX, 0), Code::InvalidArgument),
    ] {
        let status = client.get_consistency_proof(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
    }
    let status = client
        .get_entry(GetEntryRequest { index: 5 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    server.stop().await;
}

#!/usr/bin/env python3
"""A client of audit-ledger written with nothing but the proto files and public libraries.

It records the facts of a small reseller relationship, appends a communication, asks
CheckSender, and then checks the ledger's answers by itself:

* the signed checkpoint (a C2SP signed note, Ed25519) against the log's verifier key;
* the inclusion proof of the appended entry (RFC 9162 section 2.1.3.2) against the
  checkpoint's root hash, from the entry's own leaf bytes.

Stubs are generated from ../../proto with grpcio-tools into a temporary directory.

    pip install -r requirements.txt
    python ledger_client.py --server 127.0.0.1:50051 \
        --verifier-key "$(audit-ledger verifier-key --data-dir ./ledger-data)"

Prints one line per step and exits 0 when every check passed, 1 otherwise.
"""

import argparse
import base64
import hashlib
import importlib
import os
import sys
import tempfile
import time
import uuid

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")
PROTOS = [
    "audit/ledger/v1/ledger.proto",
    "audit/ledger/v1/compliance.proto",
]


def generate_stubs(out_dir):
    """Compiles the protos with grpcio-tools and makes the modules importable."""
    from grpc_tools import protoc

    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for proto in PROTOS:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                proto,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {proto}")
    sys.path.insert(0, out_dir)


# --- Verification, written from the specifications -----------------------------------


def leaf_hash(leaf):
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion_proof(index, tree_size, leaf_digest, proof):
    """RFC 9162 section 2.1.3.2: the root implied by an inclusion proof."""
    if index >= tree_size:
        raise ValueError("index beyond tree size")
    fn, sn, r = index, tree_size - 1, leaf_digest
    for p in proof:
        if sn == 0:
            raise ValueError("proof too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("proof too short")
    return r


def parse_verifier_key(text):
    """C2SP signed-note verifier key: <name>+<hex key hash>+<base64(0x01 || pubkey)>."""
    name, key_hash, encoded = text.strip().split("+", 2)
    raw = base64.b64decode(encoded)
    if raw[0] != 0x01 or len(raw) != 33:
        raise ValueError("not an Ed25519 note verifier key")
    expected = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    if expected.hex() != key_hash:
        raise ValueError("verifier key hash does not match its key")
    return name, expected, Ed25519PublicKey.from_public_bytes(raw[1:])


def verify_checkpoint(note, verifier_key):
    """Checks a C2SP signed note and returns (origin, size, root hash) of its checkpoint."""
    name, key_id, public_key = parse_verifier_key(verifier_key)
    text, _, signatures = note.partition("\n\n")
    text += "\n"
    signed = False
    for line in signatures.splitlines():
        if not line.startswith("\u2014 "):
            continue
        signer, encoded = line[2:].rsplit(" ", 1)
        blob = base64.b64decode(encoded)
        if signer != name or blob[:4] != key_id:
            continue
        try:
            public_key.verify(blob[4:], text.encode())
            signed = True
        except InvalidSignature:
            raise ValueError("checkpoint signature does not verify")
    if not signed:
        raise ValueError(f"checkpoint is not signed by {name}")
    origin, size, root = text.splitlines()[:3]
    if origin != name:
        raise ValueError("checkpoint origin is not the key's name")
    return origin, int(size), base64.b64decode(root)


# --- The walk-through ------------------------------------------------------------------


def timestamp(seconds):
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=int(seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    parser.add_argument("--verifier-key", required=True, help="the log's note verifier key")
    parser.add_argument(
        "--token",
        default=os.environ.get("AUDIT_LEDGER_TOKEN"),
        help="bearer token; with authentication an admin's (facts, appends and reads)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as stubs:
        generate_stubs(stubs)
        ledger_pb2 = importlib.import_module("audit.ledger.v1.ledger_pb2")
        ledger_grpc = importlib.import_module("audit.ledger.v1.ledger_pb2_grpc")
        compliance_pb2 = importlib.import_module("audit.ledger.v1.compliance_pb2")
        compliance_grpc = importlib.import_module("audit.ledger.v1.compliance_pb2_grpc")

        metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
        channel = grpc.insecure_channel(args.server)
        ledger = ledger_grpc.LedgerServiceStub(channel)
        compliance = compliance_grpc.ComplianceServiceStub(channel)

        run = uuid.uuid4().hex[:8]
        partner, customer, subscription = f"partner-{run}", f"customer-{run}", f"sub-{run}"
        start = time.time() - 86400

        facts = [
            ledger_pb2.Fact(
                fact_id=f"{run}-party",
                effective_at=timestamp(start),
                party=ledger_pb2.Party(
                    party_id=partner,
                    kind=ledger_pb2.PARTY_KIND_DIRECT_BILL_PARTNER,
                    display_name="Example Partner",
                ),
            ),
            ledger_pb2.Fact(
                fact_id=f"{run}-relationship",
                effective_at=timestamp(start),
                reseller_relationship=ledger_pb2.ResellerRelationship(
                    customer_id=customer, partner_id=partner, active=True
                ),
            ),
            ledger_pb2.Fact(
                fact_id=f"{run}-subscription",
                effective_at=timestamp(start),
                subscription=ledger_pb2.Subscription(
                    subscription_id=subscription,
                    customer_id=customer,
                    biller_id=partner,
                    active=True,
                ),
            ),
        ]
        for fact in facts:
            recorded = compliance.RecordFact(
                compliance_pb2.RecordFactRequest(fact=fact), metadata=metadata
            )
            print(f"fact {fact.fact_id}: entry {recorded.index}")

        appended = ledger.Append(
            ledger_pb2.AppendRequest(
                communication=ledger_pb2.Communication(
                    message_id=f"{run}-msg-1",
                    sender_id=partner,
                    customer_id=customer,
                    topic=ledger_pb2.TOPIC_COMMERCIAL,
                    channel="email",
                    sent_at=timestamp(time.time()),
                    subject="Your subscription renews next month",
                    body=b"Dear customer, your subscription renews on the 1st.",
                    subscription_id=subscription,
                )
            ),
            metadata=metadata,
        )
        verdict_name = ledger_pb2.Verdict.Name(appended.assessment.verdict)
        print(f"append: entry {appended.index}, {verdict_name} by {appended.assessment.rule}")
        if appended.assessment.verdict != ledger_pb2.VERDICT_ALLOWED:
            print("FAILED: the billing partner should be allowed to write")
            return 1

        answer = compliance.CheckSender(
            compliance_pb2.CheckSenderRequest(
                sender_id="someone-else",
                customer_id=customer,
                topic=ledger_pb2.TOPIC_COMMERCIAL,
                subscription_id=subscription,
            ),
            metadata=metadata,
        ).assessment
        print(f"check someone-else: {ledger_pb2.Verdict.Name(answer.verdict)} by {answer.rule}")
        if answer.verdict != ledger_pb2.VERDICT_VIOLATION:
            print("FAILED: an unknown sender should be a violation")
            return 1

        # Trust nothing the server says without checking it.
        checkpoint = ledger.GetCheckpoint(
            ledger_pb2.GetCheckpointRequest(), metadata=metadata
        ).checkpoint
        origin, size, root = verify_checkpoint(checkpoint.note, args.verifier_key)
        print(f"checkpoint: {origin} size {size}, signature verified")
        if size <= appended.index:
            print("FAILED: the checkpoint does not cover the acknowledged entry")
            return 1

        entry = ledger.GetEntry(
            ledger_pb2.GetEntryRequest(index=appended.index), metadata=metadata
        ).entry
        digest = leaf_hash(entry.leaf)
        if digest != appended.leaf_hash:
            print("FAILED: the entry's leaf does not hash to the acknowledged leaf hash")
            return 1
        if hashlib.sha256(entry.body).digest() != entry.record.communication.body_sha256:
            print("FAILED: the body does not match the digest in the leaf")
            return 1
        proof = ledger.GetInclusionProof(
            ledger_pb2.GetInclusionProofRequest(index=appended.index, tree_size=size),
            metadata=metadata,
        )
        computed = root_from_inclusion_proof(appended.index, size, digest, list(proof.hashes))
        if computed != root:
            print("FAILED: the inclusion proof does not lead to the signed root")
            return 1
        print(f"inclusion of entry {appended.index} in tree {size}: verified")
        print("ok")
        return 0


if __name__ == "__main__":
    sys.exit(main())

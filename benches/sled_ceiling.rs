//! What sled alone can do on this machine, with none of the ledger around it: groups of
//! 1,000 entries written as one `apply_batch` and (when durable) one `flush`, in the key
//! shapes the ledger could use. The ceiling any sled-backed layout can reach, to compare
//! `audit-ledger bench --scenario batch` with.
//!
//! `cargo bench --bench sled_ceiling` (env `GROUPS`, default 100 groups of 1,000).

use std::time::Instant;

use sha2::{Digest, Sha256};

const GROUP: u64 = 1_000;

struct Shape {
    name: &'static str,
    /// Leaf, nodes and body under three keys (today's layout) or one.
    keys_per_entry: usize,
    idempotency_key: bool,
    flush: bool,
}

fn run(shape: &Shape, groups: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(256 << 20)
        .flush_every_ms(None)
        .mode(sled::Mode::HighThroughput)
        .open()
        .expect("open sled");
    // Sizes as in the ledger: ~450-byte leaf, two node hashes, ~300-byte body.
    let leaf = vec![7u8; 450];
    let nodes = vec![1u8; 64];
    let body = vec![9u8; 300];
    let whole = [leaf.clone(), nodes.clone(), body.clone()].concat();
    let key = |prefix: u8, index: u64| {
        let mut key = vec![prefix];
        key.extend_from_slice(&index.to_be_bytes());
        key
    };
    let started = Instant::now();
    for group in 0..groups {
        let mut batch = sled::Batch::default();
        for index in group * GROUP..(group + 1) * GROUP {
            if shape.keys_per_entry == 3 {
                batch.insert(key(b'l', index), leaf.as_slice());
                batch.insert(key(b'n', index), nodes.as_slice());
                batch.insert(key(b'b', index), body.as_slice());
            } else {
                batch.insert(key(b'e', index), whole.as_slice());
            }
            if shape.idempotency_key {
                // Random-looking keys, like (sender_id, message_id) pairs.
                let digest = Sha256::digest(index.to_le_bytes());
                let mut key = b"isender-0042\0msg-".to_vec();
                key.extend_from_slice(hex::encode(digest).as_bytes());
                batch.insert(key, &[0u8; 40][..]);
            }
        }
        db.apply_batch(batch).expect("apply");
        if shape.flush {
            db.flush().expect("flush");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let entries = groups * GROUP;
    println!(
        "{:<34} {:>9.0} entries/s   {:>5} MB on disk for {} MB of entries",
        shape.name,
        entries as f64 / seconds,
        db.size_on_disk().expect("size") / 1_000_000,
        entries * whole.len() as u64 / 1_000_000,
    );
}

fn main() {
    let groups = std::env::var("GROUPS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(100);
    for shape in [
        Shape {
            name: "3 keys + idempotency, flushed",
            keys_per_entry: 3,
            idempotency_key: true,
            flush: true,
        },
        Shape {
            name: "1 key + idempotency, flushed",
            keys_per_entry: 1,
            idempotency_key: true,
            flush: true,
        },
        Shape {
            name: "1 key, flushed",
            keys_per_entry: 1,
            idempotency_key: false,
            flush: true,
        },
        Shape {
            name: "1 key + idempotency, not flushed",
            keys_per_entry: 1,
            idempotency_key: true,
            flush: false,
        },
        Shape {
            name: "1 key, not flushed",
            keys_per_entry: 1,
            idempotency_key: false,
            flush: false,
        },
    ] {
        run(&shape, groups);
    }
}

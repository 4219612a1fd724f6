//! The leaf's chain header: the fields the ledger itself fills in when it sequences an entry.
//!
//! A leaf is a serialized `audit.ledger.v1.LeafRecord`. The ledger writes its fields 1-3
//! (`index`, `prev_leaf_hash`, `recorded_at`) and appends the record's encoded fields, which
//! the caller prepared without knowing where the entry would land. Protobuf encodes fields
//! in field-number order and a message is the concatenation of its fields, so
//! `header ‖ record` is exactly the canonical encoding of the whole `LeafRecord`.
//! The leaf is stored once as these bytes and never re-encoded.

use prost::Message;

use super::merkle::{HASH_SIZE, Hash};
use super::time::Timestamp;

/// `prev_leaf_hash` of entry 0.
pub const GENESIS_PREV_LEAF_HASH: Hash = Hash([0u8; HASH_SIZE]);

/// The sequencing fields of a leaf.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeafHeader {
    pub index: u64,
    pub prev_leaf_hash: Hash,
    pub recorded_at: Timestamp,
}

/// Fields 1-3 of `LeafRecord`, as prost encodes them (unknown fields are skipped on decode).
#[derive(Clone, PartialEq, Message)]
struct HeaderFields {
    #[prost(uint64, tag = "1")]
    index: u64,
    #[prost(bytes = "vec", tag = "2")]
    prev_leaf_hash: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    recorded_at: Option<TimestampFields>,
}

/// `google.protobuf.Timestamp`'s wire shape.
#[derive(Clone, PartialEq, Message)]
struct TimestampFields {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// Why a leaf's header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    #[error("leaf is not a valid LeafRecord encoding")]
    Undecodable,
    #[error("leaf has no recorded_at")]
    MissingRecordedAt,
    #[error("leaf's prev_leaf_hash is {0} bytes, not 32")]
    BadPrevHashLength(usize),
}

/// `header ‖ record`: the leaf bytes of a new entry.
pub fn encode_leaf(header: &LeafHeader, record: &[u8]) -> Vec<u8> {
    let fields = HeaderFields {
        index: header.index,
        prev_leaf_hash: header.prev_leaf_hash.0.to_vec(),
        recorded_at: Some(TimestampFields {
            seconds: header.recorded_at.seconds,
            nanos: header.recorded_at.nanos,
        }),
    };
    let mut leaf = Vec::with_capacity(fields.encoded_len() + record.len());
    fields
        .encode(&mut leaf)
        .expect("a Vec grows to fit the encoding");
    leaf.extend_from_slice(record);
    leaf
}

/// Reads the header back from stored leaf bytes.
pub fn decode_header(leaf: &[u8]) -> Result<LeafHeader, LeafError> {
    let fields = HeaderFields::decode(leaf).map_err(|_| LeafError::Undecodable)?;
    let recorded_at = fields.recorded_at.ok_or(LeafError::MissingRecordedAt)?;
    let prev_leaf_hash: [u8; HASH_SIZE] = fields
        .prev_leaf_hash
        .as_slice()
        .try_into()
        .map_err(|_| LeafError::BadPrevHashLength(fields.prev_leaf_hash.len()))?;
    Ok(LeafHeader {
        index: fields.index,
        prev_leaf_hash: Hash(prev_leaf_hash),
        recorded_at: Timestamp {
            seconds: recorded_at.seconds,
            nanos: recorded_at.nanos,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_ignores_the_record() {
        let header = LeafHeader {
            index: 0,
            prev_leaf_hash: GENESIS_PREV_LEAF_HASH,
            recorded_at: Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            },
        };
        // Field 10, length-delimited, 2 bytes: stands in for the record oneof.
        let record = [0x52, 0x02, 0x08, 0x01];
        let leaf = encode_leaf(&header, &record);
        assert!(leaf.ends_with(&record));
        assert_eq!(decode_header(&leaf).unwrap(), header);
    }

    #[test]
    fn rejects_leaves_without_a_chain_header() {
        assert!(matches!(
            decode_header(&[]),
            Err(LeafError::MissingRecordedAt)
        ));
        assert!(decode_header(&[0xff, 0xff]).is_err());
    }
}

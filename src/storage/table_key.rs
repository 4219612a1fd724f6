//! Keys of a run index's in-memory table, held inline in the tree's nodes when short.
//!
//! A lookup or insert in a `BTreeMap<Vec<u8>, _>` compares its key with up to eleven keys
//! per node, each behind a pointer of its own: under batch load most of those comparisons'
//! time was the first load of a key that was not in cache (profiled under batch load),
//! and every key was an allocation that the flusher, on another thread, later freed. Keys
//! of up to [`INLINE`] bytes — idempotency keys, list keys, checkpoints: nearly all of
//! them — are therefore stored in the node itself, next to the keys they are compared with.
//! The order is the byte strings' order, whichever way a key is held.

use std::borrow::Borrow;
use std::cmp::Ordering;

/// The longest key held inline. With its length byte and the enum's tag a key takes 48
/// bytes, a `Vec` header and its allocation took 24 plus at least the key's own length.
pub(super) const INLINE: usize = 46;

#[derive(Clone)]
pub(super) enum TableKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl TableKey {
    pub(super) fn as_bytes(&self) -> &[u8] {
        match self {
            TableKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            TableKey::Heap(bytes) => bytes,
        }
    }
}

impl From<Vec<u8>> for TableKey {
    fn from(key: Vec<u8>) -> Self {
        if key.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..key.len()].copy_from_slice(&key);
            TableKey::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            TableKey::Heap(key.into_boxed_slice())
        }
    }
}

// `Borrow` promises that comparing borrowed forms agrees with comparing keys: both are the
// byte order of `as_bytes`.
impl Borrow<[u8]> for TableKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for TableKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for TableKey {}

impl PartialOrd for TableKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TableKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::fmt::Debug for TableKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_bytes().fmt(formatter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::ops::Bound;

    #[test]
    fn keys_keep_their_bytes_on_both_sides_of_the_inline_limit() {
        for len in [0, 1, INLINE - 1, INLINE, INLINE + 1, 300] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let key = TableKey::from(bytes.clone());
            assert_eq!(key.as_bytes(), bytes.as_slice(), "length {len}");
            assert_eq!(
                matches!(key, TableKey::Inline { .. }),
                len <= INLINE,
                "length {len}"
            );
        }
        assert_eq!(std::mem::size_of::<TableKey>(), 48);
    }

    #[test]
    fn an_inline_key_and_a_heap_key_compare_as_their_bytes() {
        let short = TableKey::from(b"list\0".to_vec());
        let long = TableKey::from([b"list\0".as_slice(), &[0xff; INLINE]].concat());
        assert!(short < long, "a prefix sorts first");
        let zero_padded = TableKey::from(b"list\0\0".to_vec());
        assert!(short < zero_padded, "padding is not part of the key");
        assert_ne!(short, zero_padded);
    }

    proptest! {
        /// A table keyed by `TableKey` holds, finds and orders exactly what one keyed by the
        /// byte strings does: lookups and ranges by `&[u8]` agree with the keys' own order.
        #[test]
        fn a_table_of_table_keys_behaves_as_one_of_byte_strings(
            keys in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(0xffu8), any::<u8>()], 0..(INLINE + 8)),
                0..60,
            ),
            probe in proptest::collection::vec(any::<u8>(), 0..(INLINE + 8)),
        ) {
            let mut ours: BTreeMap<TableKey, usize> = BTreeMap::new();
            let mut plain: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
            for (n, key) in keys.iter().enumerate() {
                ours.insert(TableKey::from(key.clone()), n);
                plain.insert(key.clone(), n);
            }
            let ours_listed: Vec<(Vec<u8>, usize)> =
                ours.iter().map(|(k, v)| (k.as_bytes().to_vec(), *v)).collect();
            let plain_listed: Vec<(Vec<u8>, usize)> =
                plain.iter().map(|(k, v)| (k.clone(), *v)).collect();
            prop_assert_eq!(&ours_listed, &plain_listed);
            for key in keys.iter().chain([&probe]) {
                prop_assert_eq!(ours.get(key.as_slice()), plain.get(key));
                let from: Vec<usize> = ours.range::<[u8], _>((Bound::Included(key.as_slice()), Bound::Unbounded)).map(|(_, v)| *v).collect();
                let plain_from: Vec<usize> = plain.range(key.clone()..).map(|(_, v)| *v).collect();
                prop_assert_eq!(from, plain_from);
            }
        }
    }
}

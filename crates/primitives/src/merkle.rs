//! The ledger's Merkle tree: RFC 9162 §2.1 hashing and proofs over nodes kept in Go
//! sumdb/tlog's stored-hash layout (through `tlog_tiles`).
//!
//! In that layout each leaf adds its own hash plus the root of every perfect subtree it
//! completes (two nodes per leaf on average), addressed by `stored_hash_index(level, n)`.
//! Any tree size's root, any inclusion proof and any consistency proof then reads
//! O(log n) stored nodes and never a leaf. The proofs are the RFC 9162 ones: audit paths
//! leaf-to-root (§2.1.3.1) and consistency proofs in SUBPROOF order (§2.1.4.1); the
//! integration tests check them with an independent RFC 9162 verifier.

pub use tlog_tiles::{EMPTY_HASH, Hash};
use tlog_tiles::{HashReader, stored_hash_index};

/// Size of every hash in the tree (SHA-256).
pub const HASH_SIZE: usize = 32;

/// Largest tree size the stored-hash layout addresses without overflowing a u64
/// (`stored_hash_index(0, n)` is about `2n`). Larger sizes are rejected, never computed.
pub const MAX_TREE_SIZE: u64 = 1 << 62;

fn check_size(size: u64) -> Result<(), ProofError> {
    if size > MAX_TREE_SIZE {
        return Err(ProofError::InvalidInput("tree size is beyond 2^62"));
    }
    Ok(())
}

/// MTH of a one-leaf tree, RFC 9162 §2.1.1: `SHA-256(0x00 ‖ leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    tlog_tiles::record_hash(leaf)
}

/// Interior node hash, RFC 9162 §2.1.1: `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: Hash, right: Hash) -> Hash {
    tlog_tiles::node_hash(left, right)
}

/// Where the hash of leaf `index` lives in the stored-hash layout.
pub fn leaf_node_index(index: u64) -> u64 {
    stored_hash_index(0, index)
}

/// A source of stored tree nodes (the store, or the store plus a batch being written).
pub trait NodeSource {
    /// The nodes at the given stored-hash indices, in the same order.
    fn nodes(&self, indices: &[u64]) -> Result<Vec<Hash>, NodeError>;
}

/// Why nodes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A node that must exist for the tree size asked about is missing: the store is damaged.
    #[error("tree node {0} is missing")]
    Missing(u64),
    /// The source could not read them (its own error, e.g. the store's).
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync>),
}

/// Errors of the proof and root computations.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    /// The sizes or index asked about do not describe a proof (e.g. `index >= tree_size`).
    #[error("{0}")]
    InvalidInput(&'static str),
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// Adapts a [`NodeSource`] to `tlog_tiles`' reader, keeping the typed error aside because
/// `tlog_tiles::Error` cannot carry it.
struct Reader<'a, S: ?Sized> {
    source: &'a S,
    failure: std::cell::RefCell<Option<NodeError>>,
}

impl<'a, S: NodeSource + ?Sized> Reader<'a, S> {
    fn new(source: &'a S) -> Self {
        Reader {
            source,
            failure: std::cell::RefCell::new(None),
        }
    }

    fn error(&self, fallback: &'static str) -> ProofError {
        match self.failure.borrow_mut().take() {
            Some(node_error) => ProofError::Node(node_error),
            None => ProofError::InvalidInput(fallback),
        }
    }
}

impl<S: NodeSource + ?Sized> HashReader for Reader<'_, S> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        self.source.nodes(indexes).map_err(|error| {
            *self.failure.borrow_mut() = Some(error);
            tlog_tiles::Error::IndexesNotInTree
        })
    }
}

/// MTH(D[0:tree_size]), RFC 9162 §2.1.1, from at most 1 + log2(tree_size) stored nodes.
pub fn root_hash<S: NodeSource + ?Sized>(tree_size: u64, source: &S) -> Result<Hash, ProofError> {
    check_size(tree_size)?;
    let reader = Reader::new(source);
    tlog_tiles::tree_hash(tree_size, &reader).map_err(|_| reader.error("tree size"))
}

/// PATH(index, D[0:tree_size]), RFC 9162 §2.1.3.1: sibling hashes from the leaf upwards.
pub fn inclusion_proof<S: NodeSource + ?Sized>(
    index: u64,
    tree_size: u64,
    source: &S,
) -> Result<Vec<Hash>, ProofError> {
    if index >= tree_size {
        return Err(ProofError::InvalidInput(
            "index must be less than tree_size",
        ));
    }
    check_size(tree_size)?;
    let reader = Reader::new(source);
    tlog_tiles::prove_record(tree_size, index, &reader).map_err(|_| reader.error("index"))
}

/// PROOF(from_size, D[0:to_size]), RFC 9162 §2.1.4.1. Empty when `from_size` is 0 (every
/// tree extends the empty tree) or equals `to_size`.
pub fn consistency_proof<S: NodeSource + ?Sized>(
    from_size: u64,
    to_size: u64,
    source: &S,
) -> Result<Vec<Hash>, ProofError> {
    if from_size > to_size {
        return Err(ProofError::InvalidInput(
            "from_size must not exceed to_size",
        ));
    }
    check_size(to_size)?;
    if from_size == 0 || from_size == to_size {
        return Ok(Vec::new());
    }
    let reader = Reader::new(source);
    tlog_tiles::prove_tree(to_size, from_size, &reader).map_err(|_| reader.error("sizes"))
}

/// Why a proof did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofCheckError {
    /// The sizes or index cannot describe a proof (e.g. `index >= tree_size`).
    #[error("{0}")]
    InvalidInput(&'static str),
    /// The proof does not lead to the root it should: the entry is not in that tree, or
    /// the two trees are not one the prefix of the other.
    #[error("the proof does not lead to the checkpoint's root hash")]
    Mismatch,
}

/// Checks an RFC 9162 §2.1.3.2 inclusion proof: that the leaf with hash `leaf_hash` sits
/// at `index` in the tree of `tree_size` leaves whose root is `root`.
pub fn verify_inclusion(
    index: u64,
    tree_size: u64,
    leaf_hash: Hash,
    proof: &[Hash],
    root: Hash,
) -> Result<(), ProofCheckError> {
    if index >= tree_size {
        return Err(ProofCheckError::InvalidInput(
            "index must be less than tree_size",
        ));
    }
    if tree_size > MAX_TREE_SIZE || proof.len() > 64 {
        return Err(ProofCheckError::InvalidInput("tree size is beyond 2^62"));
    }
    tlog_tiles::check_record(&proof.to_vec(), tree_size, root, index, leaf_hash)
        .map_err(|_| ProofCheckError::Mismatch)
}

/// Checks an RFC 9162 §2.1.4.2 consistency proof: that the tree of `to_size` leaves with
/// root `to_root` extends the tree of `from_size` leaves with root `from_root`. A tree
/// always extends the empty one; equal sizes need equal roots and an empty proof.
pub fn verify_consistency(
    from_size: u64,
    from_root: Hash,
    to_size: u64,
    to_root: Hash,
    proof: &[Hash],
) -> Result<(), ProofCheckError> {
    if from_size > to_size {
        return Err(ProofCheckError::InvalidInput(
            "the newer tree is smaller than the older one",
        ));
    }
    if to_size > MAX_TREE_SIZE || proof.len() > 128 {
        return Err(ProofCheckError::InvalidInput("tree size is beyond 2^62"));
    }
    if from_size == 0 {
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofCheckError::Mismatch)
        };
    }
    tlog_tiles::check_tree(&proof.to_vec(), to_size, to_root, from_size, from_root)
        .map_err(|_| ProofCheckError::Mismatch)
}

/// The nodes to store when leaf `index` with hash `leaf_hash` is appended: the leaf hash,
/// then the root of each perfect subtree the leaf completes, to be written from
/// `leaf_node_index(index)` on. Reads at most log2(index) earlier nodes.
pub fn nodes_for_new_leaf<S: NodeSource + ?Sized>(
    index: u64,
    leaf_hash: Hash,
    source: &S,
) -> Result<Vec<Hash>, ProofError> {
    check_size(index)?;
    let reader = Reader::new(source);
    tlog_tiles::stored_hashes_for_record_hash(index, leaf_hash, &reader)
        .map_err(|_| reader.error("index"))
}

/// The right edge of a tree: the roots of the perfect subtrees that make up a tree of `size`
/// leaves, largest first. Enough to extend the tree leaf by leaf with no reads: the writer
/// keeps one to compute each group's nodes and root, and `verify` recomputes every stored
/// node in one sequential pass with one.
#[derive(Debug, Clone)]
pub struct Frontier {
    size: u64,
    /// `(level, root)` of each perfect subtree, levels strictly decreasing.
    roots: Vec<(u8, Hash)>,
}

impl Frontier {
    /// The frontier of the tree of `size` leaves, from at most log2(size) stored nodes.
    pub fn at<S: NodeSource + ?Sized>(size: u64, source: &S) -> Result<Self, ProofError> {
        check_size(size)?;
        let mut levels = Vec::new();
        let mut indices = Vec::new();
        let mut start = 0u64;
        for level in (0..64u8).rev() {
            if size & (1 << level) != 0 {
                levels.push(level);
                indices.push(stored_hash_index(level, start >> level));
                start += 1 << level;
            }
        }
        let hashes = source.nodes(&indices)?;
        Ok(Frontier {
            size,
            roots: levels.into_iter().zip(hashes).collect(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf and returns the nodes it adds in stored-hash order (what
    /// [`nodes_for_new_leaf`] returns): its hash, then each subtree root it completes.
    pub fn push(&mut self, leaf_hash: Hash) -> Vec<Hash> {
        let mut added = vec![leaf_hash];
        let mut level = 0u8;
        let mut node = leaf_hash;
        while let Some(&(top_level, left)) = self.roots.last() {
            if top_level != level {
                break;
            }
            self.roots.pop();
            node = node_hash(left, node);
            level += 1;
            added.push(node);
        }
        self.roots.push((level, node));
        self.size += 1;
        added
    }

    /// MTH of the tree so far, RFC 9162 §2.1.1: the perfect subtrees' roots folded from the
    /// right; the empty tree's hash at size 0.
    pub fn root(&self) -> Hash {
        let mut subtrees = self.roots.iter().rev().map(|(_, hash)| *hash);
        match subtrees.next() {
            None => EMPTY_HASH,
            Some(last) => subtrees.fold(last, |right, left| node_hash(left, right)),
        }
    }
}

/// A complete in-memory node set, for tests and for recomputing a tree from its leaves.
#[derive(Default)]
pub struct MemoryNodes {
    nodes: Vec<Hash>,
    leaves: u64,
}

impl MemoryNodes {
    pub fn push_leaf(&mut self, leaf_hash: Hash) -> Result<(), ProofError> {
        let nodes = nodes_for_new_leaf(self.leaves, leaf_hash, self)?;
        self.nodes.extend(nodes);
        self.leaves += 1;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.leaves
    }

    pub fn is_empty(&self) -> bool {
        self.leaves == 0
    }
}

impl NodeSource for MemoryNodes {
    fn nodes(&self, indices: &[u64]) -> Result<Vec<Hash>, NodeError> {
        indices
            .iter()
            .map(|&index| {
                usize::try_from(index)
                    .ok()
                    .and_then(|i| self.nodes.get(i).copied())
                    .ok_or(NodeError::Missing(index))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2_011::Sha256 as OracleSha256;

    fn hex_hash(text: &str) -> Hash {
        Hash(hex::decode(text).unwrap().try_into().unwrap())
    }

    /// The eight leaves of the RFC 6962 reference vectors (certificate-transparency,
    /// transparency-dev/merkle `testonly`).
    fn reference_leaves() -> Vec<Vec<u8>> {
        [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|leaf| hex::decode(leaf).unwrap())
        .collect()
    }

    #[test]
    fn a_frontier_adds_the_same_nodes_as_the_stored_hash_layout() {
        let mut tree = MemoryNodes::default();
        let mut from_empty = Frontier::at(0, &tree).unwrap();
        assert_eq!(from_empty.root(), EMPTY_HASH);
        for n in 0..300u64 {
            let hash = leaf_hash(&n.to_be_bytes());
            let expected = nodes_for_new_leaf(n, hash, &tree).unwrap();
            // Started from the store at this size, or carried along from the empty tree.
            let mut resumed = Frontier::at(n, &tree).unwrap();
            assert_eq!(resumed.push(hash), expected, "leaf {n}, resumed");
            assert_eq!(from_empty.push(hash), expected, "leaf {n}, carried");
            assert_eq!(from_empty.size(), n + 1);
            tree.push_leaf(hash).unwrap();
            assert_eq!(
                from_empty.root(),
                root_hash(n + 1, &tree).unwrap(),
                "root {n}"
            );
        }
    }

    #[test]
    fn proof_checks_at_the_edges() {
        let tree = reference_tree(8);
        let root = |n: u64| root_hash(n, &tree).unwrap();
        // Every tree extends the empty tree with an empty proof, and itself.
        assert_eq!(verify_consistency(0, EMPTY_HASH, 8, root(8), &[]), Ok(()));
        assert_eq!(verify_consistency(8, root(8), 8, root(8), &[]), Ok(()));
        assert_eq!(
            verify_consistency(0, EMPTY_HASH, 8, root(8), &[root(1)]),
            Err(ProofCheckError::Mismatch)
        );
        // Same size, different roots: a fork.
        assert_eq!(
            verify_consistency(5, root(5), 5, root(4), &[]),
            Err(ProofCheckError::Mismatch)
        );
        assert!(matches!(
            verify_consistency(6, root(6), 5, root(5), &[]),
            Err(ProofCheckError::InvalidInput(_))
        ));
        assert!(matches!(
            verify_inclusion(8, 8, root(1), &[], root(8)),
            Err(ProofCheckError::InvalidInput(_))
        ));
        // A one-leaf tree's root is its leaf hash, with an empty path.
        let first = leaf_hash(&reference_leaves()[0]);
        assert_eq!(verify_inclusion(0, 1, first, &[], root(1)), Ok(()));
        for (from, to) in [(1u64, 8u64), (3, 7), (4, 8), (5, 6)] {
            let proof = consistency_proof(from, to, &tree).unwrap();
            assert_eq!(
                verify_consistency(from, root(from), to, root(to), &proof),
                Ok(()),
                "{from} -> {to}"
            );
        }
        for index in 0..8 {
            let proof = inclusion_proof(index, 8, &tree).unwrap();
            let leaf = leaf_hash(&reference_leaves()[index as usize]);
            assert_eq!(verify_inclusion(index, 8, leaf, &proof, root(8)), Ok(()));
        }
    }

    fn reference_tree(size: usize) -> MemoryNodes {
        let mut tree = MemoryNodes::default();
        for leaf in reference_leaves().iter().take(size) {
            tree.push_leaf(leaf_hash(leaf)).unwrap();
        }
        tree
    }

    #[test]
    fn reference_roots() {
        let roots = [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let tree = reference_tree(8);
        for (size, root) in roots.iter().enumerate() {
            assert_eq!(
                root_hash(size as u64, &tree).unwrap(),
                hex_hash(root),
                "size {size}"
            );
        }
    }

    #[test]
    fn reference_inclusion_proofs() {
        // (leaf index, tree size, audit path) from the RFC 6962 reference vectors.
        let vectors: [(u64, u64, &[&str]); 4] = [
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                3,
                &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
            ),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        let tree = reference_tree(8);
        for (index, size, path) in vectors {
            let expected: Vec<Hash> = path.iter().map(|h| hex_hash(h)).collect();
            assert_eq!(inclusion_proof(index, size, &tree).unwrap(), expected);
        }
        assert!(inclusion_proof(0, 1, &tree).unwrap().is_empty());
    }

    #[test]
    fn reference_consistency_proofs() {
        let vectors: [(u64, u64, &[&str]); 5] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
            (
                6,
                7,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        let tree = reference_tree(8);
        for (from, to, path) in vectors {
            let expected: Vec<Hash> = path.iter().map(|h| hex_hash(h)).collect();
            assert_eq!(
                consistency_proof(from, to, &tree).unwrap(),
                expected,
                "{from}->{to}"
            );
        }
    }

    #[test]
    fn bad_sizes_are_input_errors_not_panics() {
        let tree = reference_tree(8);
        assert!(matches!(
            inclusion_proof(8, 8, &tree),
            Err(ProofError::InvalidInput(_))
        ));
        assert!(matches!(
            inclusion_proof(0, 0, &tree),
            Err(ProofError::InvalidInput(_))
        ));
        assert!(matches!(
            consistency_proof(5, 4, &tree),
            Err(ProofError::InvalidInput(_))
        ));
        // A size past what the source holds is a missing node, not a panic.
        assert!(matches!(
            root_hash(9, &tree),
            Err(ProofError::Node(NodeError::Missing(_)))
        ));
        assert!(matches!(
            inclusion_proof(0, 1 << 40, &tree),
            Err(ProofError::Node(NodeError::Missing(_)))
        ));
        assert!(matches!(
            inclusion_proof(0, u64::MAX, &tree),
            Err(ProofError::InvalidInput(_))
        ));
        assert!(matches!(
            consistency_proof(1, u64::MAX, &tree),
            Err(ProofError::InvalidInput(_))
        ));
        assert!(matches!(
            root_hash(u64::MAX, &tree),
            Err(ProofError::InvalidInput(_))
        ));
        assert_eq!(consistency_proof(0, 8, &tree).unwrap(), Vec::<Hash>::new());
    }

    type Oracle = ct_merkle::mem_backed_tree::MemoryBackedTree<OracleSha256, Vec<u8>>;

    fn build(leaves: &[Vec<u8>]) -> (MemoryNodes, Oracle) {
        let mut ours = MemoryNodes::default();
        let mut oracle = Oracle::new();
        for leaf in leaves {
            ours.push_leaf(leaf_hash(leaf)).unwrap();
            oracle.push(leaf.clone());
        }
        (ours, oracle)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Roots and inclusion proofs agree with ct-merkle, an independent RFC 6962 implementation.
        #[test]
        fn agrees_with_ct_merkle(leaves in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..70), pick in any::<prop::sample::Index>()) {
            let (ours, oracle) = build(&leaves);
            let size = leaves.len() as u64;
            let oracle_root = oracle.root().as_bytes().to_vec();
            prop_assert_eq!(root_hash(size, &ours).unwrap().0.to_vec(), oracle_root);
            let index = pick.index(leaves.len());
            let proof = inclusion_proof(index as u64, size, &ours).unwrap();
            let flat: Vec<u8> = proof.iter().flat_map(|h| h.0).collect();
            prop_assert_eq!(flat, oracle.prove_inclusion(index).as_bytes().to_vec());
        }

        /// Consistency proofs between any two prefixes agree with ct-merkle's.
        #[test]
        fn consistency_agrees_with_ct_merkle(leaves in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 2..70), a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
            let (ours, _) = build(&leaves);
            let n = leaves.len();
            let (mut from, mut to) = (a.index(n) + 1, b.index(n) + 1);
            if from > to { std::mem::swap(&mut from, &mut to); }
            prop_assume!(from < to);
            let (_, oracle) = build(&leaves[..to]);
            let proof = consistency_proof(from as u64, to as u64, &ours).unwrap();
            let flat: Vec<u8> = proof.iter().flat_map(|h| h.0).collect();
            // ct-merkle proves that its tree extends its own prefix by `to - from` leaves.
            prop_assert_eq!(flat, oracle.prove_consistency(to - from).as_bytes().to_vec());
        }

        /// ct-merkle's inclusion proofs verify with ours; any altered hash, index or size fails.
        #[test]
        fn verifies_ct_merkle_inclusion_proofs(leaves in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..16), 1..70), pick in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>()) {
            let (_, oracle) = build(&leaves);
            let size = leaves.len() as u64;
            let root = Hash(oracle.root().as_bytes().as_slice().try_into().unwrap());
            let index = pick.index(leaves.len());
            let proof: Vec<Hash> = oracle.prove_inclusion(index).as_bytes().chunks(32).map(|c| Hash(c.try_into().unwrap())).collect();
            let leaf = leaf_hash(&leaves[index]);
            prop_assert_eq!(verify_inclusion(index as u64, size, leaf, &proof, root), Ok(()));
            prop_assert!(verify_inclusion(index as u64, size, leaf_hash(b"other"), &proof, root).is_err());
            if size > 1 {
                prop_assert!(verify_inclusion((index as u64 + 1) % size, size, leaf, &proof, root).is_err() || leaves[index] == leaves[(index + 1) % leaves.len()]);
                let mut altered = proof.clone();
                altered[flip.index(proof.len())].0[0] ^= 1;
                prop_assert!(verify_inclusion(index as u64, size, leaf, &altered, root).is_err());
                prop_assert!(verify_inclusion(index as u64, size, leaf, &proof[..proof.len() - 1], root).is_err());
            }
        }

        /// ct-merkle's consistency proofs verify with ours; altered ones fail.
        #[test]
        fn verifies_ct_merkle_consistency_proofs(leaves in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 2..70), a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>()) {
            let n = leaves.len();
            let (mut from, mut to) = (a.index(n) + 1, b.index(n) + 1);
            if from > to { std::mem::swap(&mut from, &mut to); }
            prop_assume!(from < to);
            let (_, old) = build(&leaves[..from]);
            let (_, new) = build(&leaves[..to]);
            let old_root = Hash(old.root().as_bytes().as_slice().try_into().unwrap());
            let new_root = Hash(new.root().as_bytes().as_slice().try_into().unwrap());
            let proof: Vec<Hash> = new.prove_consistency(to - from).as_bytes().chunks(32).map(|c| Hash(c.try_into().unwrap())).collect();
            prop_assert_eq!(verify_consistency(from as u64, old_root, to as u64, new_root, &proof), Ok(()));
            let mut altered = proof.clone();
            altered[flip.index(proof.len())].0[5] ^= 0x80;
            prop_assert!(verify_consistency(from as u64, old_root, to as u64, new_root, &altered).is_err());
            prop_assert!(verify_consistency(from as u64, leaf_hash(b"forged"), to as u64, new_root, &proof).is_err());
            prop_assert!(verify_consistency(from as u64, old_root, to as u64, leaf_hash(b"forged"), &proof).is_err());
            prop_assert!(verify_consistency(to as u64, new_root, from as u64, old_root, &proof).is_err());
        }

        /// A batch appended through a frontier read from a stored tree (what the writer
        /// does) stores exactly what leaf-by-leaf appends do, and has their root.
        #[test]
        fn a_frontier_over_a_stored_tree_matches_one_by_one(split in 0usize..40, total in 1usize..80) {
            let split = split.min(total);
            let hashes: Vec<Hash> = (0..total).map(|i| leaf_hash(&(i as u64).to_be_bytes())).collect();
            let mut base = MemoryNodes::default();
            for h in &hashes[..split] { base.push_leaf(*h).unwrap(); }
            let mut full = MemoryNodes::default();
            for h in &hashes { full.push_leaf(*h).unwrap(); }
            let mut frontier = Frontier::at(split as u64, &base).unwrap();
            prop_assert_eq!(frontier.root(), root_hash(split as u64, &base).unwrap());
            for (i, h) in hashes.iter().enumerate().skip(split) {
                let nodes = frontier.push(*h);
                let first = leaf_node_index(i as u64);
                let expected: Vec<u64> = (first..first + nodes.len() as u64).collect();
                prop_assert_eq!(nodes, full.nodes(&expected).unwrap());
            }
            prop_assert_eq!(frontier.root(), root_hash(total as u64, &full).unwrap());
        }
    }
}

//! An independent verifier for the server's proofs, written from RFC 9162 §2.1.3.2
//! (inclusion) and §2.1.4.2 (consistency), with nothing shared with the server's code.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0x00]);
    hasher.update(leaf);
    hasher.finalize().into()
}

fn node(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0x01]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

fn to_hashes(proof: &[Vec<u8>]) -> Option<Vec<Hash>> {
    proof.iter().map(|h| h.as_slice().try_into().ok()).collect()
}

/// RFC 9162 §2.1.3.2.
pub fn verify_inclusion(
    leaf_index: u64,
    tree_size: u64,
    leaf_hash: &Hash,
    proof: &[Vec<u8>],
    root: &Hash,
) -> bool {
    let Some(path) = to_hashes(proof) else {
        return false;
    };
    if leaf_index >= tree_size {
        return false;
    }
    let (mut fn_, mut sn) = (leaf_index, tree_size - 1);
    let mut r = *leaf_hash;
    for p in &path {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == *root
}

/// RFC 9162 §2.1.4.2, plus the trivial cases (first = 0 or first = second: empty proof).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_hash: &Hash,
    second_hash: &Hash,
    proof: &[Vec<u8>],
) -> bool {
    let Some(mut path) = to_hashes(proof) else {
        return false;
    };
    if first > second {
        return false;
    }
    if first == 0 {
        return path.is_empty();
    }
    if first == second {
        return path.is_empty() && first_hash == second_hash;
    }
    if path.is_empty() {
        return false;
    }
    if first.is_power_of_two() {
        path.insert(0, *first_hash);
    }
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node(c, &fr);
            sr = node(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    fr == *first_hash && sr == *second_hash && sn == 0
}

/// MTH(D[n]) from the leaves, RFC 9162 §2.1.1, recursively: the slow, obvious definition.
pub fn root_from_leaves(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = (n - 1).next_power_of_two().max(1);
            let k = if k >= n { k / 2 } else { k };
            node(
                &root_from_leaves(&leaves[..k]),
                &root_from_leaves(&leaves[k..]),
            )
        }
    }
}

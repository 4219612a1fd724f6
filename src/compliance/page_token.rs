//! Page tokens (AIP-158): opaque to clients, MACed so that only tokens this server issued
//! are accepted, bound to the filters of the request that got them, and pinned to the size
//! of the first page (the ledger's, or the access trail's) so that paging sees one
//! consistent list, and ends.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::index::INSTANT_LEN;

const VERSION: u8 = 1;
const FINGERPRINT_LEN: usize = 16;
const MAC_LEN: usize = 16;
const PAYLOAD_LEN: usize = 1 + FINGERPRINT_LEN + 8 + INSTANT_LEN + 8;

/// Where the next page resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagePosition {
    /// The size every page of this listing is judged at and bounded by: the ledger's tree
    /// size, or for the access log the trail's size, when the first page was asked for.
    pub tree_size: u64,
    /// Resume at this sent_at (zero for a listing in index order) ...
    pub instant: [u8; INSTANT_LEN],
    /// ... and this index (inclusive).
    pub index: u64,
}

impl PagePosition {
    /// A position in a listing in index order alone, below `size`.
    pub fn in_order(size: u64, index: u64) -> Self {
        PagePosition {
            tree_size: size,
            instant: [0; INSTANT_LEN],
            index,
        }
    }
}

/// Issues and checks page tokens.
#[derive(Clone)]
pub struct PageTokens {
    key: [u8; 32],
}

/// Why a page token was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct BadToken;

/// Fingerprint of a request's filters: a token only continues the listing it came from.
pub fn fingerprint(parts: &[&[u8]]) -> [u8; FINGERPRINT_LEN] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize()[..FINGERPRINT_LEN]
        .try_into()
        .expect("16 bytes")
}

impl PageTokens {
    /// Tokens keyed by a secret derived from `secret` (the log's signing key), so they stay
    /// valid across restarts and cannot be forged by clients.
    pub fn new(secret: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"audit-ledger page token key v1\0");
        hasher.update(secret);
        PageTokens {
            key: hasher.finalize().into(),
        }
    }

    fn mac(&self, payload: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(payload);
        mac.finalize().into_bytes()[..MAC_LEN]
            .try_into()
            .expect("16 bytes")
    }

    pub fn issue(&self, filters: [u8; FINGERPRINT_LEN], position: PagePosition) -> String {
        let mut payload = Vec::with_capacity(PAYLOAD_LEN + MAC_LEN);
        payload.push(VERSION);
        payload.extend_from_slice(&filters);
        payload.extend_from_slice(&position.tree_size.to_be_bytes());
        payload.extend_from_slice(&position.instant);
        payload.extend_from_slice(&position.index.to_be_bytes());
        let mac = self.mac(&payload);
        payload.extend_from_slice(&mac);
        BASE64.encode(payload)
    }

    pub fn check(
        &self,
        token: &str,
        filters: [u8; FINGERPRINT_LEN],
    ) -> Result<PagePosition, BadToken> {
        let bytes = BASE64.decode(token).map_err(|_| BadToken)?;
        if bytes.len() != PAYLOAD_LEN + MAC_LEN {
            return Err(BadToken);
        }
        let (payload, mac) = bytes.split_at(PAYLOAD_LEN);
        let mut verifier = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        verifier.update(payload);
        verifier.verify_truncated_left(mac).map_err(|_| BadToken)?;
        if payload[0] != VERSION || payload[1..1 + FINGERPRINT_LEN] != filters {
            return Err(BadToken);
        }
        let rest = &payload[1 + FINGERPRINT_LEN..];
        Ok(PagePosition {
            tree_size: u64::from_be_bytes(rest[..8].try_into().map_err(|_| BadToken)?),
            instant: rest[8..8 + INSTANT_LEN].try_into().map_err(|_| BadToken)?,
            index: u64::from_be_bytes(rest[8 + INSTANT_LEN..].try_into().map_err(|_| BadToken)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_forgeries() {
        let tokens = PageTokens::new(b"secret");
        let filters = fingerprint(&[b"customer", b"c1"]);
        let position = PagePosition {
            tree_size: 42,
            instant: [7; INSTANT_LEN],
            index: 9,
        };
        let token = tokens.issue(filters, position);
        assert_eq!(tokens.check(&token, filters), Ok(position));
        // Another server, other filters, a flipped character, garbage: refused.
        assert_eq!(
            PageTokens::new(b"other").check(&token, filters),
            Err(BadToken)
        );
        assert_eq!(
            tokens.check(&token, fingerprint(&[b"customer", b"c2"])),
            Err(BadToken)
        );
        let mut altered = token.clone().into_bytes();
        altered[10] = if altered[10] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            tokens.check(std::str::from_utf8(&altered).unwrap(), filters),
            Err(BadToken)
        );
        assert_eq!(tokens.check("not a token", filters), Err(BadToken));
        assert_eq!(tokens.check("", filters), Err(BadToken));
    }
}

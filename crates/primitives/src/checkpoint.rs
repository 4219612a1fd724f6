//! Signed checkpoints: a C2SP `tlog-checkpoint` (origin, tree size, base64 root hash)
//! signed as a C2SP `signed-note` with Ed25519, so that any note verifier (Go's
//! `golang.org/x/mod/sumdb/note`, `signed_note`, Sigsum/Tessera witnesses) can check it.
//!
//! A checkpoint may also anchor the access trail ([`TrailAnchor`]) in one extension line
//! after the root hash, which C2SP tlog-checkpoint allows ("zero or more non-empty
//! extension lines", opaque to verifiers that do not know them; Go's `tlog.ParseTree`
//! ignores lines after the hash):
//!
//! ```text
//! access-log <records> <base64 SHA-256 of the last record>
//! ```

use ed25519_dalek::{SigningKey, VerifyingKey};
use signed_note::{Note, Signer, StandardVerifier, Verifier, VerifierList};
use tlog_tiles::Checkpoint;

use super::merkle::Hash;

/// A checkpoint as signed: its fields and the full signed note.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedCheckpoint {
    pub origin: String,
    pub size: u64,
    pub root_hash: Hash,
    /// The access trail as it was when this checkpoint was signed; `None` in checkpoints
    /// signed without one (the empty tree's, those from before anchors).
    pub access_anchor: Option<TrailAnchor>,
    /// The signed note: checkpoint body, blank line, signature lines.
    pub note: String,
}

/// The head of the access trail (the hash-chained log of reads kept beside the ledger) a
/// checkpoint commits to, so that losing or cutting the trail is detected: a trail must
/// hold at least `records`, and its record `records − 1` must hash to `head`. Through
/// the chain, `head` vouches for every record before it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrailAnchor {
    /// Records in the trail.
    pub records: u64,
    /// The hash of its last record; zeros when it is empty.
    pub head: Hash,
}

/// The first word of the extension line that carries a [`TrailAnchor`].
const ANCHOR_LINE: &str = "access-log";

impl TrailAnchor {
    /// The extension line, newline included.
    fn line(&self) -> String {
        use base64::Engine as _;
        let head = base64::engine::general_purpose::STANDARD.encode(self.head.0);
        format!("{ANCHOR_LINE} {} {head}\n", self.records)
    }

    /// The anchor among a checkpoint's extension lines, if one is there. Other extension
    /// lines are left alone; a malformed anchor line is a malformed checkpoint.
    fn from_extension(extension: &str) -> Result<Option<TrailAnchor>, CheckpointError> {
        use base64::Engine as _;
        let Some(line) = extension
            .lines()
            .find(|line| line.split(' ').next() == Some(ANCHOR_LINE))
        else {
            return Ok(None);
        };
        let mut fields = line.split(' ').skip(1);
        let (Some(records), Some(head), None) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(CheckpointError::Malformed);
        };
        let records: u64 = records.parse().map_err(|_| CheckpointError::Malformed)?;
        let head: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(head)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(CheckpointError::Malformed)?;
        Ok(Some(TrailAnchor {
            records,
            head: Hash(head),
        }))
    }
}

/// Why a checkpoint could not be made or accepted.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("origin {0:?} is not a valid note key name (non-empty, no spaces, no '+')")]
    InvalidOrigin(String),
    #[error("the checkpoint note is malformed")]
    Malformed,
    #[error("the checkpoint signature does not verify with key {0}")]
    BadSignature(String),
    #[error("the checkpoint is not signed by key {0}")]
    NotSigned(String),
    #[error("signing failed")]
    Signing,
}

/// The log's signing identity: its Ed25519 key and its name, which is also the origin line
/// of its checkpoints (C2SP tlog-checkpoint recommends they match).
#[derive(Clone)]
pub struct CheckpointSigner {
    origin: String,
    key: SigningKey,
    key_id: u32,
}

/// `0x01` is the C2SP signed-note algorithm byte for Ed25519.
const ALG_ED25519: u8 = 0x01;

impl CheckpointSigner {
    pub fn new(origin: &str, key: SigningKey) -> Result<Self, CheckpointError> {
        if !signed_note::is_key_name_valid(origin) {
            return Err(CheckpointError::InvalidOrigin(origin.to_owned()));
        }
        let mut public = vec![ALG_ED25519];
        public.extend_from_slice(key.verifying_key().as_bytes());
        Ok(CheckpointSigner {
            origin: origin.to_owned(),
            key_id: signed_note::key_id(origin, &public),
            key,
        })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The private key's 32-byte seed, for writing the key file.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The C2SP note verifier key: `<name>+<8 hex key id>+<base64(0x01 ‖ public key)>`.
    pub fn verifier_key(&self) -> String {
        signed_note::new_ed25519_verifier_key(&self.origin, &self.key.verifying_key())
    }

    /// A verifier for this signer's checkpoints.
    pub fn verifier(&self) -> CheckpointVerifier {
        CheckpointVerifier::new(&self.verifier_key()).expect("own verifier key is well-formed")
    }

    /// Signs the checkpoint for a tree of `size` entries with root `root_hash`.
    pub fn sign(&self, size: u64, root_hash: Hash) -> Result<SignedCheckpoint, CheckpointError> {
        self.sign_anchoring(size, root_hash, None)
    }

    /// Signs the checkpoint for a tree of `size` entries with root `root_hash`, anchoring the
    /// access trail at `access_anchor` when one is given.
    pub fn sign_anchoring(
        &self,
        size: u64,
        root_hash: Hash,
        access_anchor: Option<TrailAnchor>,
    ) -> Result<SignedCheckpoint, CheckpointError> {
        let extension = access_anchor.map_or_else(String::new, |anchor| anchor.line());
        let body = Checkpoint::new(&self.origin, size, root_hash, &extension)
            .map_err(|_| CheckpointError::InvalidOrigin(self.origin.clone()))?
            .to_bytes();
        let mut note = Note::new(&body, &[]).map_err(|_| CheckpointError::Malformed)?;
        note.add_sigs(&[self])
            .map_err(|_| CheckpointError::Signing)?;
        let note = String::from_utf8(note.to_bytes()).map_err(|_| CheckpointError::Malformed)?;
        Ok(SignedCheckpoint {
            origin: self.origin.clone(),
            size,
            root_hash,
            access_anchor,
            note,
        })
    }
}

impl Signer for CheckpointSigner {
    fn name(&self) -> &str {
        &self.origin
    }

    fn key_id(&self) -> u32 {
        self.key_id
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        use ed25519_dalek::Signer as _;
        Ok(self.key.sign(msg).to_bytes().to_vec())
    }
}

/// Checks checkpoints against one note verifier key.
pub struct CheckpointVerifier {
    verifier_key: String,
    verifier: StandardVerifier,
}

impl CheckpointVerifier {
    pub fn new(verifier_key: &str) -> Result<Self, CheckpointError> {
        let verifier = StandardVerifier::new(verifier_key.trim())
            .map_err(|_| CheckpointError::BadSignature(verifier_key.to_owned()))?;
        Ok(CheckpointVerifier {
            verifier_key: verifier_key.trim().to_owned(),
            verifier,
        })
    }

    /// The origin (key name) this verifier expects.
    pub fn origin(&self) -> &str {
        self.verifier.name()
    }

    /// Verifies a signed note and returns the checkpoint it carries.
    pub fn verify(&self, note: &[u8]) -> Result<SignedCheckpoint, CheckpointError> {
        let parsed = Note::from_bytes(note).map_err(|_| CheckpointError::Malformed)?;
        let known = VerifierList::new(vec![Box::new(self.verifier.clone())]);
        parsed.verify(&known).map_err(|error| match error {
            signed_note::NoteError::UnverifiedNote => {
                CheckpointError::NotSigned(self.verifier_key.clone())
            }
            _ => CheckpointError::BadSignature(self.verifier_key.clone()),
        })?;
        let checkpoint =
            Checkpoint::from_bytes(parsed.text()).map_err(|_| CheckpointError::Malformed)?;
        if checkpoint.origin() != self.verifier.name() {
            return Err(CheckpointError::NotSigned(self.verifier_key.clone()));
        }
        Ok(SignedCheckpoint {
            origin: checkpoint.origin().to_owned(),
            size: checkpoint.size(),
            root_hash: *checkpoint.hash(),
            access_anchor: TrailAnchor::from_extension(checkpoint.extension())?,
            note: String::from_utf8_lossy(note).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::EMPTY_HASH;

    fn signer() -> CheckpointSigner {
        CheckpointSigner::new("example.com/log", SigningKey::from_bytes(&[7u8; 32])).unwrap()
    }

    #[test]
    fn checkpoint_note_has_the_c2sp_shape() {
        let checkpoint = signer().sign(0, EMPTY_HASH).unwrap();
        let mut lines = checkpoint.note.lines();
        assert_eq!(lines.next(), Some("example.com/log"));
        assert_eq!(lines.next(), Some("0"));
        assert_eq!(
            lines.next(),
            Some("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")
        );
        assert_eq!(lines.next(), Some(""));
        let signature = lines.next().unwrap();
        assert!(signature.starts_with("— example.com/log "), "{signature}");
        assert_eq!(lines.next(), None);
    }

    #[test]
    fn verifies_own_checkpoints_and_rejects_altered_ones() {
        let signer = signer();
        let verifier = CheckpointVerifier::new(&signer.verifier_key()).unwrap();
        let checkpoint = signer.sign(42, crate::merkle::leaf_hash(b"x")).unwrap();
        assert_eq!(
            verifier.verify(checkpoint.note.as_bytes()).unwrap(),
            checkpoint
        );

        let altered = checkpoint.note.replacen("\n42\n", "\n43\n", 1);
        assert!(matches!(
            verifier.verify(altered.as_bytes()),
            Err(CheckpointError::BadSignature(_))
        ));

        let other =
            CheckpointSigner::new("example.com/log", SigningKey::from_bytes(&[8u8; 32])).unwrap();
        let foreign = other.sign(42, EMPTY_HASH).unwrap();
        assert!(verifier.verify(foreign.note.as_bytes()).is_err());
    }

    #[test]
    fn an_anchored_checkpoint_carries_the_trail_in_an_extension_line_and_verifies() {
        let signer = signer();
        let anchor = TrailAnchor {
            records: 12,
            head: crate::merkle::leaf_hash(b"record 11"),
        };
        let checkpoint = signer
            .sign_anchoring(42, crate::merkle::leaf_hash(b"x"), Some(anchor))
            .unwrap();
        let lines: Vec<&str> = checkpoint.note.lines().collect();
        assert_eq!(lines[1], "42");
        assert!(
            lines[3].starts_with("access-log 12 ") && lines[3].ends_with('='),
            "{}",
            lines[3]
        );
        assert_eq!(lines[4], "", "the body ends after the extension line");
        assert!(lines[5].starts_with("— example.com/log "));
        // Any note verifier: the signature covers the extension line.
        let note = signed_note::Note::from_bytes(checkpoint.note.as_bytes()).unwrap();
        let known = VerifierList::new(vec![Box::new(
            StandardVerifier::new(&signer.verifier_key()).unwrap(),
        )]);
        note.verify(&known).unwrap();
        let parsed = Checkpoint::from_bytes(note.text()).unwrap();
        assert_eq!(parsed.size(), 42);
        let verified = signer
            .verifier()
            .verify(checkpoint.note.as_bytes())
            .unwrap();
        assert_eq!(verified.access_anchor, Some(anchor));
        assert_eq!(verified, checkpoint);
        // Altering the anchor breaks the signature.
        let altered = checkpoint
            .note
            .replacen("access-log 12 ", "access-log 11 ", 1);
        assert!(matches!(
            signer.verifier().verify(altered.as_bytes()),
            Err(CheckpointError::BadSignature(_))
        ));
        // Without an anchor, none is read.
        let plain = signer.sign(42, EMPTY_HASH).unwrap();
        assert_eq!(
            signer
                .verifier()
                .verify(plain.note.as_bytes())
                .unwrap()
                .access_anchor,
            None
        );
    }

    #[test]
    fn verifier_key_has_the_c2sp_shape() {
        let key = signer().verifier_key();
        let parts: Vec<&str> = key.split('+').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], "example.com/log");
        assert_eq!(parts[1].len(), 8);
        use base64::Engine as _;
        let public = base64::engine::general_purpose::STANDARD
            .decode(parts[2])
            .unwrap();
        assert_eq!(public.len(), 33);
        assert_eq!(public[0], 0x01);
    }

    #[test]
    fn rejects_origins_that_cannot_name_a_key() {
        for origin in ["", "has space", "a+b"] {
            assert!(CheckpointSigner::new(origin, SigningKey::from_bytes(&[1u8; 32])).is_err());
        }
    }
}

//! Signed checkpoints: a C2SP `tlog-checkpoint` (origin, tree size, base64 root hash)
//! signed as a C2SP `signed-note` with Ed25519, so that any note verifier (Go's
//! `golang.org/x/mod/sumdb/note`, `signed_note`, Sigsum/Tessera witnesses) can check it.

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
    /// The signed note: checkpoint body, blank line, signature lines.
    pub note: String,
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
        let body = Checkpoint::new(&self.origin, size, root_hash, "")
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
            note: String::from_utf8_lossy(note).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::merkle::EMPTY_HASH;

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
        let checkpoint = signer
            .sign(42, crate::ledger::merkle::leaf_hash(b"x"))
            .unwrap();
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

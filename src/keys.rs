//! The log's Ed25519 signing key, kept as a C2SP signed-note signer key
//! (`PRIVATE+KEY+<name>+<key id>+<base64(0x01 ‖ seed)>`, the format of Go's
//! `note.GenerateKey`) in a file only its owner can read.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::SigningKey;

use crate::ledger::CheckpointSigner;
use crate::ledger::checkpoint::CheckpointError;

/// Name of the key file inside the data dir.
pub const KEY_FILE_NAME: &str = "signing.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        /// Said in the message, so not a `source()` (the chain would say it twice).
        error: std::io::Error,
    },
    #[error("{0}: not a signer key of the form PRIVATE+KEY+<name>+<id>+<base64>")]
    Malformed(PathBuf),
    #[error("{0}: the key id does not match the key")]
    WrongKeyId(PathBuf),
    #[error("{path} can be read by others (mode {mode:o}); run: chmod 600 {path}")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "{path} names the log {found:?}, but --origin is {wanted:?}; a log keeps its origin for life"
    )]
    OriginMismatch {
        path: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("signing key file {0} does not exist")]
    Missing(PathBuf),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |error| KeyError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Creates `dir` (and parents) readable by its owner only, if it does not exist.
pub fn create_private_dir(dir: &Path) -> Result<(), KeyError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))
}

/// The key path `serve`, `verify` and `verifier-key` use.
pub fn key_path(data_dir: &Path, explicit: Option<&Path>) -> PathBuf {
    explicit.map_or_else(|| data_dir.join(KEY_FILE_NAME), Path::to_path_buf)
}

/// Reads a signer key file.
pub fn load(path: &Path) -> Result<CheckpointSigner, KeyError> {
    let metadata = fs::metadata(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            KeyError::Missing(path.to_owned())
        } else {
            KeyError::Io {
                path: path.to_owned(),
                error,
            }
        }
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io_error(path))?;
    parse(text.trim(), path)
}

/// Loads the key at `path`, or on first start (no file, `may_create`) generates one named
/// `origin` and writes it with mode 0600. An `origin` that disagrees with an existing key's
/// name is an error: the origin is part of every signed checkpoint.
pub fn load_or_create(
    path: &Path,
    origin: Option<&str>,
    default_origin: &str,
    may_create: bool,
) -> Result<CheckpointSigner, KeyError> {
    match load(path) {
        Ok(signer) => {
            if let Some(wanted) = origin {
                if wanted != signer.origin() {
                    return Err(KeyError::OriginMismatch {
                        path: path.to_owned(),
                        found: signer.origin().to_owned(),
                        wanted: wanted.to_owned(),
                    });
                }
            }
            Ok(signer)
        }
        Err(KeyError::Missing(_)) if may_create => {
            let name = origin.unwrap_or(default_origin);
            let signer = CheckpointSigner::new(name, SigningKey::generate(&mut rand_core::OsRng))?;
            write_new(path, &encode(&signer, name))?;
            Ok(signer)
        }
        Err(error) => Err(error),
    }
}

fn encode(signer: &CheckpointSigner, name: &str) -> String {
    // Go's note.GenerateKey writes the same text; the key id is the verifier key's.
    let key_id = signer
        .verifier_key()
        .split('+')
        .nth(1)
        .expect("verifier key has a key id")
        .to_owned();
    let mut private = vec![0x01u8];
    private.extend_from_slice(&signer.secret_bytes());
    format!("PRIVATE+KEY+{name}+{key_id}+{}\n", BASE64.encode(private))
}

fn parse(text: &str, path: &Path) -> Result<CheckpointSigner, KeyError> {
    let malformed = || KeyError::Malformed(path.to_owned());
    let mut parts = text.splitn(5, '+');
    let (Some("PRIVATE"), Some("KEY"), Some(name), Some(key_id), Some(encoded)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(malformed());
    };
    let private = BASE64.decode(encoded).map_err(|_| malformed())?;
    let [0x01, seed @ ..] = private.as_slice() else {
        return Err(malformed());
    };
    let seed: [u8; 32] = seed.try_into().map_err(|_| malformed())?;
    let signer = CheckpointSigner::new(name, SigningKey::from_bytes(&seed))?;
    if signer.verifier_key().split('+').nth(1) != Some(key_id) {
        return Err(KeyError::WrongKeyId(path.to_owned()));
    }
    Ok(signer)
}

/// Writes a new file readable by its owner only, durably (file and directory synced).
fn write_new(path: &Path, contents: &str) -> Result<(), KeyError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent)?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(contents.as_bytes())
        .map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(parent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reloads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join(KEY_FILE_NAME);
        let first = load_or_create(&path, None, "example.com/log", true).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create(&path, None, "other", true).unwrap();
        assert_eq!(first.verifier_key(), again.verifier_key());
        assert_eq!(again.origin(), "example.com/log");
        assert!(matches!(
            load_or_create(&path, Some("renamed"), "x", true),
            Err(KeyError::OriginMismatch { .. })
        ));
        // The text is a signer key the signed_note crate accepts.
        let text = fs::read_to_string(&path).unwrap();
        assert!(signed_note::StandardSigner::new(text.trim()).is_ok());
    }

    #[test]
    fn refuses_keys_others_can_read_and_missing_explicit_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        load_or_create(&path, None, "example.com/log", true).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load(&path), Err(KeyError::TooOpen { .. })));
        let missing = dir.path().join("none");
        assert!(matches!(
            load_or_create(&missing, None, "x", false),
            Err(KeyError::Missing(_))
        ));
    }
}

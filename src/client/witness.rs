//! `audit-ledger verify --server URL`: online verification, as a witness does it. The
//! server's latest checkpoint must carry a valid signature of the pinned key and must
//! extend the checkpoint saved by the previous run (an RFC 9162 consistency proof from the
//! server, checked here); only then is it saved for the next run. With `full`, every entry
//! is also fetched and the whole tree recomputed: leaf hashes, the hash chain, body digests,
//! and the root against the checkpoint, trusting nothing the server says about itself.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use futures_util::StreamExt;

use super::{Connection, call_error};
use crate::ledger::merkle::{self, Frontier, Hash, MemoryNodes};
use crate::ledger::{CheckpointVerifier, SignedCheckpoint};
use crate::proto::{GetCheckpointRequest, GetConsistencyProofRequest, ListEntriesRequest};
use crate::verify::{ChainLink, GENESIS_LINK, check_entry};

/// How a witness run ended, when it could run at all.
// One per run, returned once: boxing the checkpoints would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outcome {
    /// Everything checked; the new checkpoint was saved (when a file was given).
    Consistent {
        /// The saved checkpoint this run started from, if any.
        previous: Option<SignedCheckpoint>,
        latest: SignedCheckpoint,
        /// Entries fetched and recomputed (`full`).
        entries_checked: Option<u64>,
    },
    /// The server's answers do not hold up: the reason; nothing was saved.
    Failed(String),
}

/// Reads and verifies a saved checkpoint; `None` when the file does not exist yet.
pub fn load_checkpoint(
    path: &Path,
    verifier: &CheckpointVerifier,
) -> anyhow::Result<Option<SignedCheckpoint>> {
    match std::fs::read(path) {
        Ok(note) => verifier.verify(&note).map(Some).map_err(|error| {
            anyhow::anyhow!(
                "the saved checkpoint {} does not verify with this key: {error}",
                path.display()
            )
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(anyhow::anyhow!("cannot read {}: {error}", path.display())),
    }
}

/// Replaces the saved checkpoint atomically: a crash leaves the old one or the new one.
pub fn save_checkpoint(path: &Path, checkpoint: &SignedCheckpoint) -> anyhow::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".partial");
    let temporary = std::path::PathBuf::from(temporary);
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&temporary)?;
        file.write_all(checkpoint.note.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|error| anyhow::anyhow!("cannot save {}: {error}", path.display()))
}

/// Fetches every entry below `size` and recomputes the tree; the problem, if any.
async fn check_every_entry(
    connection: &Connection,
    latest: &SignedCheckpoint,
    progress: &mut impl FnMut(u64, u64),
) -> anyhow::Result<Result<u64, String>> {
    let mut clients = connection.clients().await?;
    let mut frontier =
        Frontier::at(0, &MemoryNodes::default()).expect("the empty tree needs no nodes");
    let mut previous = GENESIS_LINK;
    // Pages no larger than a server with the default settings streams whole.
    let page = crate::config::ServerConfig::default().max_list_entries;
    while frontier.size() < latest.size {
        let start = frontier.size();
        let mut stream = clients
            .ledger
            .list_entries(ListEntriesRequest {
                start_index: start,
                limit: (latest.size - start).min(page),
            })
            .await
            .map_err(|status| call_error("ListEntries", status))?
            .into_inner();
        while let Some(item) = stream.next().await {
            let entry = match item {
                Ok(response) => response.entry.unwrap_or_default(),
                // The server found the entry damaged itself (it checks what it serves): a
                // verdict on the ledger, not a failure to ask.
                Err(status) if status.code() == tonic::Code::DataLoss => {
                    return Ok(Err(format!(
                        "the server reports damage: {}",
                        status.message()
                    )));
                }
                Err(status) => return Err(call_error("ListEntries", status)),
            };
            let index = frontier.size();
            if entry.index != index {
                return Ok(Err(format!(
                    "the server sent entry {} where {index} was due",
                    entry.index
                )));
            }
            let header = match check_entry(index, &entry.leaf, Some(&entry.body), Some(previous)) {
                Ok((header, _)) => header,
                Err(problem) => return Ok(Err(format!("entry {index}: {problem}"))),
            };
            let leaf_hash = merkle::leaf_hash(&entry.leaf);
            frontier.push(leaf_hash);
            previous = ChainLink {
                leaf_hash,
                recorded_at: header.recorded_at,
            };
            progress(frontier.size(), latest.size);
            if frontier.size() == latest.size {
                break;
            }
        }
        if frontier.size() == start {
            return Ok(Err(format!("the server sent no entries from {start}")));
        }
    }
    if frontier.root() != latest.root_hash {
        return Ok(Err(format!(
            "the {} entries the server serves do not hash to its checkpoint's root",
            latest.size
        )));
    }
    Ok(Ok(latest.size))
}

/// One witness run. Errors are for runs that could not be made (unreachable server, bad
/// files); a server whose answers do not verify is [`Outcome::Failed`].
pub async fn witness(
    connection: &Connection,
    verifier: &CheckpointVerifier,
    checkpoint_file: Option<&Path>,
    full: bool,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<Outcome> {
    let previous = match checkpoint_file {
        Some(path) => load_checkpoint(path, verifier)?,
        None => None,
    };
    let mut clients = connection.clients().await?;
    let served = clients
        .ledger
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .map_err(|status| call_error("GetCheckpoint", status))?
        .into_inner()
        .checkpoint
        .unwrap_or_default();
    let latest = match verifier.verify(served.note.as_bytes()) {
        Ok(latest) => latest,
        Err(error) => return Ok(Outcome::Failed(format!("the server's checkpoint: {error}"))),
    };
    if latest.size != served.size || latest.root_hash.0.as_slice() != served.root_hash.as_slice() {
        return Ok(Outcome::Failed(
            "the server's checkpoint fields differ from its signed note".to_owned(),
        ));
    }
    if let Some(previous) = &previous {
        if latest.size < previous.size {
            return Ok(Outcome::Failed(format!(
                "the server's checkpoint (size {}) is older than the saved one (size {}): the log was rolled back or is showing another view",
                latest.size, previous.size
            )));
        }
        let proof = clients
            .ledger
            .get_consistency_proof(GetConsistencyProofRequest {
                from_size: previous.size,
                to_size: latest.size,
            })
            .await
            .map_err(|status| call_error("GetConsistencyProof", status))?
            .into_inner();
        let hashes: Option<Vec<Hash>> = proof
            .hashes
            .iter()
            .map(|hash| <[u8; 32]>::try_from(hash.as_slice()).ok().map(Hash))
            .collect();
        let consistent = (proof.from_size, proof.to_size) == (previous.size, latest.size)
            && hashes.is_some_and(|hashes| {
                merkle::verify_consistency(
                    previous.size,
                    previous.root_hash,
                    latest.size,
                    latest.root_hash,
                    &hashes,
                )
                .is_ok()
            });
        if !consistent {
            return Ok(Outcome::Failed(format!(
                "the server's tree of size {} does not extend the saved tree of size {}: the log was rewritten (fork)",
                latest.size, previous.size
            )));
        }
    }
    let entries_checked = if full {
        match check_every_entry(connection, &latest, &mut progress).await? {
            Ok(count) => Some(count),
            Err(problem) => return Ok(Outcome::Failed(problem)),
        }
    } else {
        None
    };
    if let Some(path) = checkpoint_file {
        save_checkpoint(path, &latest)?;
    }
    Ok(Outcome::Consistent {
        previous,
        latest,
        entries_checked,
    })
}

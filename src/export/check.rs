//! Offline verification of an export against its manifest, trusting only the verifier key:
//! the checkpoint's signature, then for every line the leaf hash, the leaf's own index, the
//! inclusion proof to the checkpoint's root, the body digest, the descriptive columns (each
//! re-derived from the leaf), and the hash chain wherever one line holds the entry right
//! after the line before (a full export is one chain); finally that no entry appears twice,
//! none is missing or added, and the file is byte for byte the one the manifest names.
//! Lines may come in any order: a filtered export lists communications by `sent_at`.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use super::manifest::{MANIFEST_SUFFIX, ManifestReader, manifest_path};
use super::{Format, read_rows};
use crate::ledger::CheckpointVerifier;
use crate::ledger::merkle::{self, Hash};
use crate::records::describe::{COLUMNS, describe};
use crate::verify::{ChainLink, GENESIS_LINK, check_entry};

/// What a successful check covered.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    pub export_file: PathBuf,
    pub entries: u64,
    pub origin: String,
    pub tree_size: u64,
    pub root_hash: Hash,
}

/// The first problem found.
#[derive(Debug, thiserror::Error)]
pub enum ExportCheckError {
    /// The manifest or the checkpoint in it is unusable.
    #[error("{}: {problem}", path.display())]
    Manifest { path: PathBuf, problem: String },
    /// A line of the export is bad; `index` when the line got far enough to name one.
    #[error("{}: line {line}{}: {problem}", path.display(), index.map(|i| format!(" (entry {i})")).unwrap_or_default())]
    Line {
        path: PathBuf,
        line: u64,
        index: Option<u64>,
        problem: String,
    },
    /// The export as a whole does not match the manifest.
    #[error("{}: {problem}", path.display())]
    Export { path: PathBuf, problem: String },
}

impl ExportCheckError {
    /// The first bad entry index, when the failure is about one entry.
    pub fn first_bad_index(&self) -> Option<u64> {
        match self {
            ExportCheckError::Line { index, .. } => *index,
            _ => None,
        }
    }
}

/// The manifests `path` stands for: every `*.manifest.jsonl` in a directory, the manifest
/// itself, or the manifest beside an export file.
pub fn manifests_at(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.is_dir() {
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|error| format!("cannot list {}: {error}", path.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.ends_with(MANIFEST_SUFFIX))
            })
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(format!(
                "{} holds no export manifest (*{MANIFEST_SUFFIX})",
                path.display()
            ));
        }
        return Ok(found);
    }
    let name = path.to_string_lossy();
    let manifest = if name.ends_with(MANIFEST_SUFFIX) {
        path.to_owned()
    } else {
        manifest_path(path)
    };
    if !manifest.is_file() {
        return Err(format!("{} does not exist", manifest.display()));
    }
    Ok(vec![manifest])
}

/// SHA-256 of a file's contents, hex: the manifest's `export_sha256`.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

/// Checks the export a manifest describes. `progress(done, total)` is called as lines pass.
pub fn verify_export(
    manifest: &Path,
    verifier: &CheckpointVerifier,
    mut progress: impl FnMut(u64, u64),
) -> Result<ExportReport, ExportCheckError> {
    let manifest_error = |problem: String| ExportCheckError::Manifest {
        path: manifest.to_owned(),
        problem,
    };
    let file = File::open(manifest)
        .map_err(|error| manifest_error(format!("cannot be opened ({error})")))?;
    let (header, mut proofs) =
        ManifestReader::open(BufReader::new(file)).map_err(manifest_error)?;
    let checkpoint = verifier
        .verify(header.checkpoint.as_bytes())
        .map_err(|error| manifest_error(format!("checkpoint: {error}")))?;
    if checkpoint.size != header.tree_size
        || STANDARD.encode(checkpoint.root_hash.0) != header.root_hash
        || checkpoint.origin != header.origin
    {
        return Err(manifest_error(
            "origin, tree_size or root_hash differ from the signed checkpoint".to_owned(),
        ));
    }
    let format: Format = header.export_format.parse().map_err(manifest_error)?;
    // The export must sit beside the manifest: a name, not a path elsewhere.
    if header.export_file.is_empty()
        || Path::new(&header.export_file).file_name() != Some(header.export_file.as_ref())
    {
        return Err(manifest_error(format!(
            "export_file {:?} is not a plain file name",
            header.export_file
        )));
    }
    let export = manifest
        .parent()
        .unwrap_or(Path::new("."))
        .join(&header.export_file);
    let export_error = |problem: String| ExportCheckError::Export {
        path: export.clone(),
        problem,
    };
    let digest =
        file_sha256(&export).map_err(|error| export_error(format!("cannot be read ({error})")))?;
    if digest != header.export_sha256 {
        return Err(export_error(
            "its SHA-256 differs from the manifest's export_sha256: the file was changed"
                .to_owned(),
        ));
    }

    let input = BufReader::new(
        File::open(&export).map_err(|error| export_error(format!("cannot be read ({error})")))?,
    );
    let mut checked = 0u64;
    let mut previous: Option<(u64, ChainLink)> = None;
    let mut seen = std::collections::HashSet::new();
    for row in read_rows(format, input) {
        let row = row.map_err(|error| ExportCheckError::Line {
            path: export.clone(),
            line: error.line,
            index: None,
            problem: error.problem,
        })?;
        let line_error = |problem: String| ExportCheckError::Line {
            path: export.clone(),
            line: row.line,
            index: Some(row.index),
            problem,
        };
        let proof = proofs
            .next_proof()
            .map_err(manifest_error)?
            .ok_or_else(|| line_error("the manifest has no proof for this line".to_owned()))?;
        if proof.index != row.index {
            return Err(line_error(format!(
                "the manifest's proof at this position is for entry {}",
                proof.index
            )));
        }
        if !seen.insert(row.index) {
            return Err(line_error("the entry appears twice".to_owned()));
        }
        let leaf_hash = merkle::leaf_hash(&row.leaf);
        if row.leaf_hash != leaf_hash.0 {
            return Err(line_error("leaf_hash is not the hash of leaf".to_owned()));
        }
        // The chain is checked wherever this line holds the entry right after the last one.
        let link = match previous {
            _ if row.index == 0 => Some(GENESIS_LINK),
            Some((before, link)) if before + 1 == row.index => Some(link),
            _ => None,
        };
        let (leaf_header, _) =
            check_entry(row.index, &row.leaf, Some(&row.body), link).map_err(line_error)?;
        let hashes = proof.hashes().map_err(line_error)?;
        merkle::verify_inclusion(
            row.index,
            checkpoint.size,
            leaf_hash,
            &hashes,
            checkpoint.root_hash,
        )
        .map_err(|error| line_error(format!("inclusion proof: {error}")))?;
        let derived = describe(&row.leaf).map_err(|error| line_error(error.to_string()))?;
        if let Some(at) = (0..COLUMNS.len()).find(|&at| derived[at] != row.columns[at]) {
            return Err(line_error(format!(
                "column {} is {:?} but the leaf says {:?}",
                COLUMNS[at], row.columns[at], derived[at]
            )));
        }
        previous = Some((
            row.index,
            ChainLink {
                leaf_hash,
                recorded_at: leaf_header.recorded_at,
            },
        ));
        checked += 1;
        progress(checked, header.entries);
    }
    if let Some(extra) = proofs.next_proof().map_err(manifest_error)? {
        return Err(export_error(format!(
            "the manifest proves entry {} but the export has no line for it",
            extra.index
        )));
    }
    if checked != header.entries {
        return Err(export_error(format!(
            "{checked} entries, but the manifest says {}",
            header.entries
        )));
    }
    Ok(ExportReport {
        export_file: export,
        entries: checked,
        origin: checkpoint.origin,
        tree_size: checkpoint.size,
        root_hash: checkpoint.root_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::manifest::{MANIFEST_FORMAT, ManifestHeader, ManifestWriter, ProofLine};
    use crate::export::{Row, RowWriter};
    use crate::ledger::CheckpointSigner;
    use crate::ledger::leaf::{GENESIS_PREV_LEAF_HASH, LeafHeader, encode_leaf};
    use crate::ledger::merkle::{MemoryNodes, inclusion_proof, root_hash};
    use crate::ledger::time::Timestamp;
    use crate::proto::{self, LeafRecord, leaf_record};
    use ed25519_dalek::SigningKey;
    use prost::Message;

    fn signer() -> CheckpointSigner {
        CheckpointSigner::new("example.com/log", SigningKey::from_bytes(&[3u8; 32])).unwrap()
    }

    /// A chained ledger of `size` communications, in memory.
    fn ledger(size: u64) -> (Vec<Row>, MemoryNodes) {
        let mut rows = Vec::new();
        let mut tree = MemoryNodes::default();
        let mut prev = GENESIS_PREV_LEAF_HASH;
        for index in 0..size {
            let body = format!("body of message {index}, \"quoted\"").into_bytes();
            let record = LeafRecord {
                record: Some(leaf_record::Record::Communication(
                    proto::CommunicationRecord {
                        message_id: format!("m-{index}"),
                        sender_id: "partner-a".into(),
                        customer_id: format!("cust-{}", index % 3),
                        topic: proto::Topic::Support as i32,
                        subject: format!("Subject {index}, with a comma"),
                        body_sha256: Sha256::digest(&body).to_vec(),
                        body_size: body.len() as u64,
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }
            .encode_to_vec();
            let header = LeafHeader {
                index,
                prev_leaf_hash: prev,
                recorded_at: Timestamp {
                    seconds: 1_767_225_600 + index as i64,
                    nanos: 0,
                },
            };
            let leaf = encode_leaf(&header, &record);
            let hash = merkle::leaf_hash(&leaf);
            tree.push_leaf(hash).unwrap();
            prev = hash;
            rows.push(Row {
                index,
                leaf,
                leaf_hash: hash,
                body,
            });
        }
        (rows, tree)
    }

    /// Writes an export of the rows at `pick` and its manifest into `dir`.
    fn export(dir: &Path, format: Format, pick: &[u64]) -> PathBuf {
        let (rows, tree) = ledger(10);
        let size = 10;
        let checkpoint = signer()
            .sign(size, root_hash(size, &tree).unwrap())
            .unwrap();
        let path = dir.join(format!("out.{}", format.name()));
        let mut writer = RowWriter::new(format, File::create(&path).unwrap()).unwrap();
        for &index in pick {
            writer.write(&rows[index as usize]).unwrap();
        }
        writer.finish().unwrap();
        let header = ManifestHeader {
            format: MANIFEST_FORMAT.into(),
            export_file: path.file_name().unwrap().to_string_lossy().into_owned(),
            export_format: format.name().into(),
            export_sha256: file_sha256(&path).unwrap(),
            entries: pick.len() as u64,
            origin: checkpoint.origin.clone(),
            tree_size: size,
            root_hash: STANDARD.encode(checkpoint.root_hash.0),
            checkpoint: checkpoint.note.clone(),
            created_at: "2026-11-25T00:00:00Z".into(),
            server: "test".into(),
            selection: Default::default(),
        };
        let manifest = manifest_path(&path);
        let mut writer = ManifestWriter::new(File::create(&manifest).unwrap(), &header).unwrap();
        for &index in pick {
            let proof = inclusion_proof(index, size, &tree).unwrap();
            writer.proof(&ProofLine::new(index, &proof)).unwrap();
        }
        writer.finish().unwrap();
        manifest
    }

    /// After an edit of the export, records its new digest in the manifest, as a forger
    /// would, so that the per-line checks are what must catch the edit.
    fn reseal(manifest: &Path) {
        let text = std::fs::read_to_string(manifest).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let mut header: ManifestHeader = serde_json::from_str(&lines[0]).unwrap();
        header.export_sha256 =
            file_sha256(&manifest.parent().unwrap().join(&header.export_file)).unwrap();
        lines[0] = serde_json::to_string(&header).unwrap();
        std::fs::write(manifest, lines.join("\n") + "\n").unwrap();
    }

    fn edit(path: &Path, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(path).unwrap();
        let edited = edit(text.clone());
        assert_ne!(edited, text, "the edit changed nothing");
        std::fs::write(path, edited).unwrap();
    }

    fn check(manifest: &Path) -> Result<ExportReport, ExportCheckError> {
        verify_export(manifest, &signer().verifier(), |_, _| {})
    }

    fn export_of(manifest: &Path) -> PathBuf {
        PathBuf::from(manifest.to_string_lossy().trim_end_matches(MANIFEST_SUFFIX))
    }

    #[test]
    fn a_faithful_export_verifies_in_both_formats() {
        for format in [Format::Jsonl, Format::Csv] {
            let dir = tempfile::tempdir().unwrap();
            let manifest = export(dir.path(), format, &[0, 1, 2, 5, 9]);
            let report = check(&manifest).unwrap();
            assert_eq!(report.entries, 5);
            assert_eq!(report.tree_size, 10);
            assert_eq!(manifests_at(dir.path()).unwrap(), vec![manifest.clone()]);
            assert_eq!(manifests_at(&export_of(&manifest)).unwrap(), vec![manifest]);
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            check(&export(dir.path(), Format::Jsonl, &[]))
                .unwrap()
                .entries,
            0
        );
    }

    #[test]
    fn an_entry_twice_is_caught_and_any_order_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let error = check(&export(dir.path(), Format::Jsonl, &[1, 2, 1])).unwrap_err();
        assert_eq!(error.first_bad_index(), Some(1), "{error}");
        assert!(error.to_string().contains("twice"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            check(&export(dir.path(), Format::Csv, &[7, 2, 5]))
                .unwrap()
                .entries,
            3
        );
    }

    #[test]
    fn an_edited_cell_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = export(dir.path(), Format::Csv, &[0, 1, 2]);
        edit(&export_of(&manifest), |text| {
            text.replacen("Subject 1,", "Subject 7,", 1)
        });
        reseal(&manifest);
        let error = check(&manifest).unwrap_err();
        assert_eq!(error.first_bad_index(), Some(1), "{error}");
        assert!(error.to_string().contains("column subject"), "{error}");
    }

    #[test]
    fn an_edited_body_or_leaf_is_caught_at_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = export(dir.path(), Format::Jsonl, &[3, 4]);
        let (rows, _) = ledger(10);
        let body = STANDARD.encode(&rows[4].body);
        let forged = STANDARD.encode(b"a different body");
        edit(&export_of(&manifest), |text| text.replace(&body, &forged));
        reseal(&manifest);
        let error = check(&manifest).unwrap_err();
        assert_eq!(error.first_bad_index(), Some(4), "{error}");
        assert!(error.to_string().contains("body"), "{error}");

        // A leaf re-made with a consistent leaf_hash still fails its inclusion proof.
        let manifest = export(dir.path(), Format::Jsonl, &[3, 4]);
        let (mut forged_rows, _) = ledger(10);
        let mut leaf = forged_rows[3].leaf.clone();
        let at = leaf.len() - 3;
        leaf[at] ^= 1;
        forged_rows[3].leaf_hash = merkle::leaf_hash(&leaf);
        edit(&export_of(&manifest), |text| {
            text.replace(&STANDARD.encode(&rows[3].leaf), &STANDARD.encode(&leaf))
                .replace(
                    &STANDARD.encode(rows[3].leaf_hash.0),
                    &STANDARD.encode(forged_rows[3].leaf_hash.0),
                )
        });
        reseal(&manifest);
        let error = check(&manifest).unwrap_err();
        assert_eq!(error.first_bad_index(), Some(3), "{error}");
    }

    #[test]
    fn a_dropped_or_unsealed_line_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = export(dir.path(), Format::Jsonl, &[0, 1, 2]);
        edit(&export_of(&manifest), |text| {
            let lines: Vec<&str> = text.lines().collect();
            format!("{}\n{}\n", lines[0], lines[1])
        });
        // First the digest, then (resealed) the count.
        assert!(
            check(&manifest)
                .unwrap_err()
                .to_string()
                .contains("SHA-256")
        );
        reseal(&manifest);
        let error = check(&manifest).unwrap_err();
        assert!(error.to_string().contains("no line for it"), "{error}");
    }

    #[test]
    fn another_key_or_an_altered_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = export(dir.path(), Format::Jsonl, &[0]);
        let other =
            CheckpointSigner::new("example.com/log", SigningKey::from_bytes(&[4u8; 32])).unwrap();
        let error = verify_export(&manifest, &other.verifier(), |_, _| {}).unwrap_err();
        assert!(error.to_string().contains("checkpoint"), "{error}");
        edit(&manifest, |text| {
            text.replacen("\"tree_size\":10", "\"tree_size\":11", 1)
        });
        assert!(
            check(&manifest)
                .unwrap_err()
                .to_string()
                .contains("differ from the signed checkpoint")
        );
    }

    #[test]
    fn a_manifest_cannot_point_outside_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = export(dir.path(), Format::Jsonl, &[0]);
        edit(&manifest, |text| {
            text.replacen(
                "\"export_file\":\"out.jsonl\"",
                "\"export_file\":\"../out.jsonl\"",
                1,
            )
        });
        assert!(
            check(&manifest)
                .unwrap_err()
                .to_string()
                .contains("plain file name")
        );
    }
}

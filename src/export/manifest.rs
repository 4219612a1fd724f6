//! The manifest beside an export: JSON lines, the first a [`ManifestHeader`] (the signed
//! checkpoint, which file it describes and what was selected), then one [`ProofLine`] per
//! exported entry, in the export's order. Written and read one line at a time, so an
//! export of millions of entries never has to fit in memory.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::ledger::merkle::{HASH_SIZE, Hash};

/// The `format` of manifests this version writes and reads.
pub const MANIFEST_FORMAT: &str = "audit-ledger-export/1";

/// What ends the name of a manifest: `FILE` is described by `FILE.manifest.jsonl`.
pub const MANIFEST_SUFFIX: &str = ".manifest.jsonl";

/// The manifest of the export at `export`.
pub fn manifest_path(export: &Path) -> PathBuf {
    let mut name = export.as_os_str().to_owned();
    name.push(MANIFEST_SUFFIX);
    PathBuf::from(name)
}

/// The first line of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestHeader {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// File name of the export, in the manifest's directory.
    pub export_file: String,
    /// `jsonl` or `csv`.
    pub export_format: String,
    /// SHA-256 of the export file, hex.
    pub export_sha256: String,
    /// Number of entries in the export (and of proof lines below).
    pub entries: u64,
    /// The log's origin, and the checkpoint's size and root (base64), as in the note.
    pub origin: String,
    pub tree_size: u64,
    pub root_hash: String,
    /// The signed checkpoint (C2SP signed note) every proof leads to.
    pub checkpoint: String,
    /// When the export was made (RFC 3339) and from which server.
    pub created_at: String,
    pub server: String,
    /// The filters the entries were selected by (empty: every entry).
    pub selection: std::collections::BTreeMap<String, String>,
}

/// The inclusion proof of one exported entry in the checkpoint's tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofLine {
    pub index: u64,
    /// RFC 9162 audit path, leaf to root, base64.
    pub proof: Vec<String>,
}

impl ProofLine {
    pub fn new(index: u64, proof: &[Hash]) -> Self {
        ProofLine {
            index,
            proof: proof.iter().map(|hash| STANDARD.encode(hash.0)).collect(),
        }
    }

    /// The audit path as hashes, or why it is not one.
    pub fn hashes(&self) -> Result<Vec<Hash>, String> {
        self.proof
            .iter()
            .map(|text| {
                decode_hash(text)
                    .ok_or_else(|| format!("proof hash {text:?} is not 32 base64 bytes"))
            })
            .collect()
    }
}

/// A base64 SHA-256 hash.
pub fn decode_hash(text: &str) -> Option<Hash> {
    let bytes = STANDARD.decode(text).ok()?;
    let array: [u8; HASH_SIZE] = bytes.try_into().ok()?;
    Some(Hash(array))
}

/// Writes a manifest: the header, then the proofs.
pub struct ManifestWriter<W: Write> {
    out: W,
}

impl<W: Write> ManifestWriter<W> {
    pub fn new(mut out: W, header: &ManifestHeader) -> std::io::Result<Self> {
        serde_json::to_writer(&mut out, header)?;
        out.write_all(b"\n")?;
        Ok(ManifestWriter { out })
    }

    pub fn proof(&mut self, line: &ProofLine) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, line)?;
        self.out.write_all(b"\n")
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a manifest: [`ManifestReader::header`], then the proof lines in order.
pub struct ManifestReader<R: BufRead> {
    lines: std::io::Lines<R>,
    line: u64,
}

impl<R: BufRead> ManifestReader<R> {
    /// Reads the header line.
    pub fn open(input: R) -> Result<(ManifestHeader, Self), String> {
        let mut reader = ManifestReader {
            lines: input.lines(),
            line: 0,
        };
        let first = reader
            .next_line()?
            .ok_or_else(|| "the manifest is empty".to_owned())?;
        let header: ManifestHeader = serde_json::from_str(&first)
            .map_err(|error| format!("line 1 is not a manifest header ({error})"))?;
        if header.format != MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {:?} is not {MANIFEST_FORMAT:?}",
                header.format
            ));
        }
        Ok((header, reader))
    }

    fn next_line(&mut self) -> Result<Option<String>, String> {
        match self.lines.next() {
            None => Ok(None),
            Some(line) => {
                self.line += 1;
                line.map(Some)
                    .map_err(|error| format!("line {} cannot be read ({error})", self.line))
            }
        }
    }

    /// The next proof line; `None` at the end.
    pub fn next_proof(&mut self) -> Result<Option<ProofLine>, String> {
        let Some(text) = self.next_line()? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| format!("line {} is not a proof line ({error})", self.line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ManifestHeader {
        ManifestHeader {
            format: MANIFEST_FORMAT.into(),
            export_file: "out.jsonl".into(),
            export_format: "jsonl".into(),
            export_sha256: "00".into(),
            entries: 1,
            origin: "example.com/log".into(),
            tree_size: 4,
            root_hash: STANDARD.encode([0u8; 32]),
            checkpoint: "note".into(),
            created_at: "2026-11-25T00:00:00Z".into(),
            server: "http://127.0.0.1:1".into(),
            selection: Default::default(),
        }
    }

    #[test]
    fn a_manifest_reads_back_as_written() {
        let proof = ProofLine::new(2, &[Hash([1; 32]), Hash([2; 32])]);
        let mut writer = ManifestWriter::new(Vec::new(), &header()).unwrap();
        writer.proof(&proof).unwrap();
        let bytes = writer.finish().unwrap();
        let (read, mut reader) = ManifestReader::open(std::io::Cursor::new(bytes)).unwrap();
        assert_eq!(read, header());
        let back = reader.next_proof().unwrap().unwrap();
        assert_eq!(back, proof);
        assert_eq!(back.hashes().unwrap(), vec![Hash([1; 32]), Hash([2; 32])]);
        assert_eq!(reader.next_proof().unwrap(), None);
    }

    #[test]
    fn another_format_is_refused() {
        let mut other = header();
        other.format = "audit-ledger-export/9".into();
        let bytes = serde_json::to_vec(&other).unwrap();
        let error = ManifestReader::open(std::io::Cursor::new(bytes))
            .err()
            .unwrap();
        assert!(error.contains("format"), "{error}");
    }

    #[test]
    fn manifest_sits_beside_its_export() {
        assert_eq!(
            manifest_path(Path::new("/tmp/x/out.csv")),
            PathBuf::from("/tmp/x/out.csv.manifest.jsonl")
        );
    }
}

//! `audit-ledger export`: the entries of a running server, selected by filters, written as
//! an export and its manifest (see [`crate::export`]).
//!
//! The checkpoint is fetched first and fixes the export's tree: only entries below its
//! size are written, and every inclusion proof is for that size, so the export is one
//! consistent snapshot even while messaging systems keep appending. What the server sends
//! is checked as it arrives (leaf hashes, and every proof against the checkpoint's root, and
//! the checkpoint's signature when a verifier key is given), so a bad server fails the
//! export rather than producing one that would fail verification later. Both files are
//! written under `.partial` names and renamed only when complete.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::StreamExt;

use super::commands::Filters;
use super::{Connection, call_error};
use crate::export::check::file_sha256;
use crate::export::manifest::{
    MANIFEST_FORMAT, ManifestHeader, ManifestWriter, ProofLine, manifest_path,
};
use crate::export::{Format, Row, RowWriter};
use crate::ledger::CheckpointVerifier;
use crate::ledger::merkle::{self, Hash};
use crate::proto::ledger_service_client::LedgerServiceClient;
use crate::proto::{Entry, GetCheckpointRequest, GetInclusionProofRequest, ListEntriesRequest};

/// Inclusion proofs fetched at once.
const PROOFS_IN_FLIGHT: usize = 32;
/// Entries asked for per page.
const PAGE: u64 = 1000;

/// What to export, and where.
pub struct ExportRequest {
    pub filters: Filters,
    pub format: Format,
    pub out: PathBuf,
    /// Check the checkpoint's signature with this key while exporting.
    pub verifier: Option<CheckpointVerifier>,
}

/// What an export wrote.
#[derive(Debug)]
pub struct ExportSummary {
    pub entries: u64,
    pub tree_size: u64,
    pub out: PathBuf,
    pub manifest: PathBuf,
}

fn partial(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn selection(filters: &Filters) -> BTreeMap<String, String> {
    [
        ("customer", &filters.customer),
        ("sender", &filters.sender),
        ("topic", &filters.topic),
        ("subscription", &filters.subscription),
        ("product", &filters.product),
        ("from", &filters.from),
        ("to", &filters.to),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.clone().map(|value| (name.to_owned(), value)))
    .collect()
}

fn hash_of(bytes: &[u8], what: &str) -> anyhow::Result<Hash> {
    let array: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("the server sent a {what} that is not 32 bytes"))?;
    Ok(Hash(array))
}

/// Streams the selected entries below `tree_size` to `sink`, a page at a time.
async fn for_each_page(
    clients: &mut super::Clients,
    filters: &Filters,
    tree_size: u64,
    mut sink: impl AsyncFnMut(Vec<Entry>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if selection(filters).is_empty() {
        let mut start = 0u64;
        while start < tree_size {
            let limit = PAGE.min(tree_size - start);
            let mut stream = clients
                .ledger
                .list_entries(ListEntriesRequest {
                    start_index: start,
                    limit,
                })
                .await
                .map_err(|status| call_error("ListEntries", status))?
                .into_inner();
            let mut page = Vec::with_capacity(limit as usize);
            while let Some(item) = stream.next().await {
                let entry = item
                    .map_err(|status| call_error("ListEntries", status))?
                    .entry
                    .ok_or_else(|| anyhow::anyhow!("the server sent an empty ListEntries item"))?;
                if entry.index != start + page.len() as u64 {
                    anyhow::bail!(
                        "the server sent entry {} where {} was due",
                        entry.index,
                        start + page.len() as u64
                    );
                }
                page.push(entry);
            }
            if page.is_empty() {
                anyhow::bail!(
                    "the server sent no entries from {start}, below its checkpoint's size {tree_size}"
                );
            }
            start += page.len() as u64;
            sink(page).await?;
        }
        return Ok(());
    }
    let mut request = filters.communications_request()?;
    request.page_size = PAGE as i32;
    loop {
        let page = clients
            .compliance
            .list_communications(request.clone())
            .await
            .map_err(|status| call_error("ListCommunications", status))?
            .into_inner();
        // Entries appended after the checkpoint are not in its tree; the next export has them.
        let entries: Vec<Entry> = page
            .entries
            .into_iter()
            .filter(|entry| entry.index < tree_size)
            .collect();
        sink(entries).await?;
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        request.page_token = page.next_page_token;
    }
}

/// Writes the export and its manifest; `progress(entries_written, total_if_known)`.
pub async fn export(
    connection: &Connection,
    request: ExportRequest,
    mut progress: impl FnMut(u64, Option<u64>),
) -> anyhow::Result<ExportSummary> {
    let out = request.out.clone();
    let manifest = manifest_path(&out);
    for path in [&out, &manifest] {
        if path.exists() {
            anyhow::bail!(
                "{} already exists; remove it or choose another --out",
                path.display()
            );
        }
    }
    let export_file = out
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| anyhow::anyhow!("--out {} names no file", out.display()))?
        .to_owned();
    let mut clients = connection.clients().await?;
    let checkpoint = clients
        .ledger
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .map_err(|status| call_error("GetCheckpoint", status))?
        .into_inner()
        .checkpoint
        .ok_or_else(|| anyhow::anyhow!("the server sent no checkpoint"))?;
    let root = hash_of(&checkpoint.root_hash, "root hash")?;
    if let Some(verifier) = &request.verifier {
        let signed = verifier
            .verify(checkpoint.note.as_bytes())
            .map_err(|error| anyhow::anyhow!("the server's checkpoint: {error}"))?;
        if signed.size != checkpoint.size || signed.root_hash != root {
            anyhow::bail!("the server's checkpoint fields differ from its signed note");
        }
    }
    let tree_size = checkpoint.size;
    let whole_ledger = selection(&request.filters).is_empty();

    let rows_path = partial(&out);
    let proofs_path = partial(&manifest);
    let mut rows =
        RowWriter::new(
            request.format,
            BufWriter::new(File::create(&rows_path).map_err(|error| {
                anyhow::anyhow!("cannot create {}: {error}", rows_path.display())
            })?),
        )?;
    let mut proofs =
        BufWriter::new(File::create(&proofs_path).map_err(|error| {
            anyhow::anyhow!("cannot create {}: {error}", proofs_path.display())
        })?);
    let mut written = 0u64;
    let ledger = clients.ledger.clone();
    let result = for_each_page(&mut clients, &request.filters, tree_size, async |page| {
        let fetched: Vec<anyhow::Result<(Entry, Vec<Hash>)>> =
            futures_util::stream::iter(page.into_iter().map(|entry| {
                let mut ledger: LedgerServiceClient<_> = ledger.clone();
                async move {
                    let response = ledger
                        .get_inclusion_proof(GetInclusionProofRequest {
                            index: entry.index,
                            tree_size,
                        })
                        .await
                        .map_err(|status| call_error("GetInclusionProof", status))?
                        .into_inner();
                    let hashes = response
                        .hashes
                        .iter()
                        .map(|hash| hash_of(hash, "proof hash"))
                        .collect::<anyhow::Result<Vec<Hash>>>()?;
                    Ok((entry, hashes))
                }
            }))
            .buffered(PROOFS_IN_FLIGHT)
            .collect()
            .await;
        for item in fetched {
            let (entry, hashes) = item?;
            let leaf_hash = merkle::leaf_hash(&entry.leaf);
            if entry.leaf_hash != leaf_hash.0 {
                anyhow::bail!(
                    "the server sent entry {} with a leaf_hash that is not its leaf's",
                    entry.index
                );
            }
            merkle::verify_inclusion(entry.index, tree_size, leaf_hash, &hashes, root).map_err(
                |error| {
                    anyhow::anyhow!(
                        "the server's inclusion proof for entry {}: {error}",
                        entry.index
                    )
                },
            )?;
            rows.write(&Row {
                index: entry.index,
                leaf_hash,
                leaf: entry.leaf,
                body: entry.body,
            })?;
            serde_json::to_writer(&mut proofs, &ProofLine::new(entry.index, &hashes))?;
            proofs.write_all(b"\n")?;
            written += 1;
            progress(written, whole_ledger.then_some(tree_size));
        }
        Ok(())
    })
    .await;
    let finished = result.and_then(|()| {
        let mut rows = rows.finish()?;
        rows.flush()?;
        rows.get_ref().sync_all()?;
        proofs.flush()?;
        Ok(())
    });
    if let Err(error) = finished {
        let _ = std::fs::remove_file(&rows_path);
        let _ = std::fs::remove_file(&proofs_path);
        return Err(error);
    }
    drop(proofs);

    let header = ManifestHeader {
        format: MANIFEST_FORMAT.to_owned(),
        export_file,
        export_format: request.format.name().to_owned(),
        export_sha256: file_sha256(&rows_path)?,
        entries: written,
        origin: checkpoint.origin.clone(),
        tree_size,
        root_hash: STANDARD.encode(root.0),
        checkpoint: checkpoint.note.clone(),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        server: connection.server.clone(),
        selection: selection(&request.filters),
    };
    let manifest_partial = partial(&partial(&manifest));
    let mut writer =
        ManifestWriter::new(BufWriter::new(File::create(&manifest_partial)?), &header)?;
    for line in BufReader::new(File::open(&proofs_path)?).lines() {
        writer.proof(&serde_json::from_str::<ProofLine>(&line?)?)?;
    }
    let file = writer
        .finish()?
        .into_inner()
        .map_err(|error| error.into_error())?;
    file.sync_all()?;
    std::fs::remove_file(&proofs_path)?;
    std::fs::rename(&rows_path, &out)?;
    std::fs::rename(&manifest_partial, &manifest)?;
    if let Some(dir) = out.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(ExportSummary {
        entries: written,
        tree_size,
        out,
        manifest,
    })
}

//! Exports: ledger entries written out one per line (JSON lines or CSV), and beside them a
//! manifest with the signed checkpoint and one RFC 9162 inclusion proof per entry, so that
//! anyone holding the log's verifier key can check the export offline, without the server
//! and without trusting whoever handed the files over.
//!
//! A line carries the entry's `index`, the descriptive columns derived from its leaf
//! ([`crate::records::describe::COLUMNS`], for people and spreadsheets), and the evidence:
//! `leaf_hash`, `leaf` and `body`, base64 (standard alphabet, padded). The descriptive
//! columns are re-derived from the leaf when the export is verified, so an edited cell is
//! caught as surely as an edited leaf.

pub mod check;
pub mod manifest;

use std::io::{BufRead, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::ledger::merkle::Hash;
use crate::records::describe::{self, COLUMNS, DescribeError};

/// How the entries of an export are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// RFC 4180 CSV with a header row.
    Csv,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "jsonl" | "json" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            _ => Err(format!("export format {text:?} is not jsonl or csv")),
        }
    }
}

/// Every column of an export line, in order.
pub fn header() -> Vec<&'static str> {
    let mut columns = vec!["index"];
    columns.extend(COLUMNS);
    columns.extend(["leaf_hash", "leaf", "body"]);
    columns
}

/// One entry as exported.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub index: u64,
    /// The exact leaf bytes (a serialized `LeafRecord`).
    pub leaf: Vec<u8>,
    pub leaf_hash: Hash,
    /// The communication body; empty for a fact.
    pub body: Vec<u8>,
}

impl Row {
    fn cells(&self) -> Result<Vec<String>, DescribeError> {
        let mut cells = vec![self.index.to_string()];
        cells.extend(describe::describe(&self.leaf)?);
        cells.push(STANDARD.encode(self.leaf_hash.0));
        cells.push(STANDARD.encode(&self.leaf));
        cells.push(STANDARD.encode(&self.body));
        Ok(cells)
    }
}

/// Writes rows in one format.
pub struct RowWriter<W: Write> {
    format: Format,
    csv: Option<csv::Writer<W>>,
    json: Option<W>,
}

/// Why a row could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The message says `error`, so it is not a `source()` (the chain would say it twice).
    #[error("entry {index}: {error}")]
    Leaf { index: u64, error: DescribeError },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<csv::Error> for WriteError {
    fn from(error: csv::Error) -> Self {
        WriteError::Io(error.into())
    }
}

impl<W: Write> RowWriter<W> {
    /// A writer; CSV starts with the header row.
    pub fn new(format: Format, out: W) -> Result<Self, WriteError> {
        Ok(match format {
            Format::Csv => {
                let mut csv = csv::Writer::from_writer(out);
                csv.write_record(header())?;
                RowWriter {
                    format,
                    csv: Some(csv),
                    json: None,
                }
            }
            Format::Jsonl => RowWriter {
                format,
                csv: None,
                json: Some(out),
            },
        })
    }

    pub fn write(&mut self, row: &Row) -> Result<(), WriteError> {
        let cells = row.cells().map_err(|error| WriteError::Leaf {
            index: row.index,
            error,
        })?;
        match self.format {
            Format::Csv => self
                .csv
                .as_mut()
                .expect("csv writer")
                .write_record(&cells)?,
            Format::Jsonl => {
                let mut object = serde_json::Map::new();
                for (name, cell) in header().into_iter().zip(cells) {
                    let value = if name == "index" {
                        serde_json::Value::from(row.index)
                    } else {
                        serde_json::Value::from(cell)
                    };
                    object.insert(name.to_owned(), value);
                }
                let out = self.json.as_mut().expect("json writer");
                serde_json::to_writer(&mut *out, &object).map_err(std::io::Error::from)?;
                out.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    /// Flushes and hands back the underlying writer.
    pub fn finish(self) -> Result<W, WriteError> {
        match self.format {
            Format::Csv => self
                .csv
                .expect("csv writer")
                .into_inner()
                .map_err(|error| WriteError::Io(error.into_error())),
            Format::Jsonl => {
                let mut out = self.json.expect("json writer");
                out.flush()?;
                Ok(out)
            }
        }
    }
}

/// A line read back from an export, not yet checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadRow {
    /// Line number in the file, from 1 (CSV: the record's line).
    pub line: u64,
    pub index: u64,
    /// The descriptive columns as found, in [`COLUMNS`] order.
    pub columns: Vec<String>,
    pub leaf_hash: Vec<u8>,
    pub leaf: Vec<u8>,
    pub body: Vec<u8>,
}

/// Why a line could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct ReadError {
    pub line: u64,
    pub problem: String,
}

fn from_cells(line: u64, cells: Vec<String>) -> Result<ReadRow, ReadError> {
    let fail = |problem: String| ReadError { line, problem };
    let expected = header().len();
    if cells.len() != expected {
        return Err(fail(format!("has {} columns, not {expected}", cells.len())));
    }
    let index = cells[0]
        .parse::<u64>()
        .map_err(|_| fail(format!("index {:?} is not a number", cells[0])))?;
    let decode = |name: &str, text: &str| {
        STANDARD
            .decode(text)
            .map_err(|_| fail(format!("{name} is not base64")))
    };
    let n = cells.len();
    Ok(ReadRow {
        line,
        index,
        columns: cells[1..n - 3].to_vec(),
        leaf_hash: decode("leaf_hash", &cells[n - 3])?,
        leaf: decode("leaf", &cells[n - 2])?,
        body: decode("body", &cells[n - 1])?,
    })
}

fn json_cells(line: u64, text: &str) -> Result<Vec<String>, ReadError> {
    let fail = |problem: String| ReadError { line, problem };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|error| fail(format!("is not JSON ({error})")))?;
    let object = value
        .as_object()
        .ok_or_else(|| fail("is not a JSON object".to_owned()))?;
    let columns = header();
    if let Some(unknown) = object.keys().find(|key| !columns.contains(&key.as_str())) {
        return Err(fail(format!("has an unknown field {unknown:?}")));
    }
    columns
        .iter()
        .map(|name| match object.get(*name) {
            Some(serde_json::Value::String(text)) if *name != "index" => Ok(text.clone()),
            Some(serde_json::Value::Number(number)) if *name == "index" => Ok(number.to_string()),
            Some(_) => Err(fail(format!("field {name:?} has the wrong type"))),
            None => Err(fail(format!("field {name:?} is missing"))),
        })
        .collect()
}

/// The rows of an export, in file order.
pub fn read_rows<R: BufRead + 'static>(
    format: Format,
    input: R,
) -> Box<dyn Iterator<Item = Result<ReadRow, ReadError>>> {
    match format {
        Format::Jsonl => Box::new(input.lines().enumerate().map(|(at, line)| {
            let line_no = at as u64 + 1;
            let text = line.map_err(|error| ReadError {
                line: line_no,
                problem: format!("cannot be read ({error})"),
            })?;
            from_cells(line_no, json_cells(line_no, &text)?)
        })),
        Format::Csv => {
            let reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(input);
            let mut records = reader.into_records();
            let mut checked_header = false;
            Box::new(std::iter::from_fn(move || {
                loop {
                    let record = records.next()?;
                    let line = record
                        .as_ref()
                        .ok()
                        .and_then(|r| r.position())
                        .map_or(0, |p| p.line());
                    let record = match record {
                        Ok(record) => record,
                        Err(error) => {
                            return Some(Err(ReadError {
                                line: error.position().map_or(0, |p| p.line()),
                                problem: format!("is not CSV ({error})"),
                            }));
                        }
                    };
                    let cells: Vec<String> = record.iter().map(str::to_owned).collect();
                    if !checked_header {
                        checked_header = true;
                        if cells != header() {
                            return Some(Err(ReadError {
                                line,
                                problem: format!(
                                    "is not the export header ({})",
                                    header().join(",")
                                ),
                            }));
                        }
                        continue;
                    }
                    return Some(from_cells(line, cells));
                }
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::leaf::{GENESIS_PREV_LEAF_HASH, LeafHeader, encode_leaf};
    use crate::ledger::merkle::leaf_hash;
    use crate::ledger::time::Timestamp;
    use crate::proto::{self, LeafRecord, leaf_record};
    use prost::Message;

    pub(crate) fn sample_row(index: u64, subject: &str) -> Row {
        let record = LeafRecord {
            record: Some(leaf_record::Record::Communication(
                proto::CommunicationRecord {
                    message_id: format!("m-{index}"),
                    sender_id: "partner-a".into(),
                    customer_id: "cust-1".into(),
                    topic: proto::Topic::Support as i32,
                    subject: subject.into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
        .encode_to_vec();
        let header = LeafHeader {
            index,
            prev_leaf_hash: GENESIS_PREV_LEAF_HASH,
            recorded_at: Timestamp {
                seconds: 1_767_225_600,
                nanos: 0,
            },
        };
        let leaf = encode_leaf(&header, &record);
        Row {
            index,
            leaf_hash: leaf_hash(&leaf),
            leaf,
            body: b"body, with \"quotes\"\nand a line break".to_vec(),
        }
    }

    #[test]
    fn rows_read_back_as_written_in_both_formats() {
        let rows = [
            sample_row(3, "plain"),
            sample_row(9, "a, \"quoted\"\nsubject"),
        ];
        for format in [Format::Jsonl, Format::Csv] {
            let mut writer = RowWriter::new(format, Vec::new()).unwrap();
            for row in &rows {
                writer.write(row).unwrap();
            }
            let bytes = writer.finish().unwrap();
            let read: Vec<ReadRow> = read_rows(format, std::io::Cursor::new(bytes))
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(read.len(), 2, "{format:?}");
            for (row, back) in rows.iter().zip(&read) {
                assert_eq!(back.index, row.index);
                assert_eq!(back.leaf, row.leaf);
                assert_eq!(back.leaf_hash, row.leaf_hash.0.to_vec());
                assert_eq!(back.body, row.body);
                assert_eq!(
                    back.columns,
                    describe::describe(&row.leaf).unwrap().to_vec()
                );
            }
        }
    }

    #[test]
    fn a_json_line_names_what_is_wrong() {
        let row = |text: &str| {
            read_rows(Format::Jsonl, std::io::Cursor::new(text.to_owned()))
                .next()
                .unwrap()
        };
        assert!(row("not json").unwrap_err().problem.contains("not JSON"));
        assert!(
            row("{\"index\":1}")
                .unwrap_err()
                .problem
                .contains("missing")
        );
        assert!(
            row("{\"bogus\":1}")
                .unwrap_err()
                .problem
                .contains("unknown")
        );
    }

    #[test]
    fn a_csv_export_must_start_with_its_header() {
        let error = read_rows(Format::Csv, std::io::Cursor::new("a,b\n1,2\n"))
            .next()
            .unwrap()
            .unwrap_err();
        assert!(error.problem.contains("header"), "{error}");
    }
}

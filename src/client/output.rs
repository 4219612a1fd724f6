//! Printing results for people (`table`) and programs (`json`: one object per line;
//! `csv`: a header, then one row per result), and the progress of long commands.

use std::io::Write;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Csv,
}

/// Collects rows of named columns and prints them in the chosen format. Tables are
/// printed at the end (to size the columns); JSON and CSV stream row by row.
pub struct Printer<W: Write> {
    format: Format,
    columns: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    out: W,
    header_written: bool,
}

/// One value of a row: text, or a JSON value when it is not a string (numbers, lists).
pub enum Cell {
    Text(String),
    Json(serde_json::Value),
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Cell::Text(text)
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Cell::Text(text.to_owned())
    }
}

impl From<u64> for Cell {
    fn from(number: u64) -> Self {
        Cell::Json(number.into())
    }
}

impl From<Vec<u64>> for Cell {
    fn from(numbers: Vec<u64>) -> Self {
        Cell::Json(numbers.into())
    }
}

impl Cell {
    fn text(&self) -> String {
        match self {
            Cell::Text(text) => text.clone(),
            Cell::Json(serde_json::Value::Array(items)) => items
                .iter()
                .map(|item| item.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            Cell::Json(value) => value.to_string(),
        }
    }
}

impl<W: Write> Printer<W> {
    pub fn new(format: Format, columns: Vec<&'static str>, out: W) -> Self {
        Printer {
            format,
            columns,
            rows: Vec::new(),
            out,
            header_written: false,
        }
    }

    pub fn row(&mut self, cells: Vec<Cell>) -> std::io::Result<()> {
        match self.format {
            Format::Table => {
                self.rows.push(cells.iter().map(Cell::text).collect());
                Ok(())
            }
            Format::Json => {
                let object: serde_json::Map<String, serde_json::Value> = self
                    .columns
                    .iter()
                    .zip(cells)
                    .map(|(column, cell)| {
                        let value = match cell {
                            Cell::Text(text) => serde_json::Value::String(text),
                            Cell::Json(value) => value,
                        };
                        ((*column).to_owned(), value)
                    })
                    .collect();
                writeln!(self.out, "{}", serde_json::Value::Object(object))
            }
            Format::Csv => {
                let mut csv = csv::Writer::from_writer(&mut self.out);
                if !self.header_written {
                    csv.write_record(&self.columns)?;
                    self.header_written = true;
                }
                csv.write_record(cells.iter().map(Cell::text))?;
                csv.flush()
            }
        }
    }

    /// Prints what is buffered (tables) and flushes.
    pub fn finish(mut self) -> std::io::Result<()> {
        if self.format == Format::Table {
            let mut widths: Vec<usize> = self.columns.iter().map(|c| c.len()).collect();
            for row in &self.rows {
                for (width, cell) in widths.iter_mut().zip(row) {
                    *width = (*width).max(cell.chars().count());
                }
            }
            let line = |cells: Vec<String>| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(cell, width)| format!("{cell:<width$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_owned()
            };
            let header = line(self.columns.iter().map(|c| c.to_uppercase()).collect());
            writeln!(self.out, "{header}")?;
            for row in std::mem::take(&mut self.rows) {
                writeln!(self.out, "{}", line(row))?;
            }
        } else if self.format == Format::Csv && !self.header_written {
            writeln!(self.out, "{}", self.columns.join(","))?;
        }
        self.out.flush()
    }
}

/// The progress of a long command on stderr, drawn only when stderr is a terminal (so what
/// programs read on stdout and stderr is unchanged): a bar of `done/total unit` with rate
/// and time left, or a spinner while the total is not known yet.
pub struct Progress {
    bar: indicatif::ProgressBar,
    unit: &'static str,
}

impl Progress {
    /// `unit` names what is counted ("entries", "facts").
    pub fn new(total: Option<u64>, unit: &'static str) -> Self {
        let progress = Progress {
            bar: indicatif::ProgressBar::new_spinner(),
            unit,
        };
        progress
            .bar
            .set_style(progress.style("{spinner} {pos}", "({per_sec})"));
        if let Some(total) = total {
            progress.set_total(total);
        }
        progress
    }

    /// `done` of `total`; a spinner becomes a bar when the total is first known.
    pub fn set(&self, done: u64, total: Option<u64>) {
        if let Some(total) = total
            && self.bar.length() != Some(total)
        {
            self.set_total(total);
        }
        self.bar.set_position(done);
    }

    /// `count` more done.
    pub fn inc(&self, count: u64) {
        self.bar.inc(count);
    }

    /// Clears the bar, before the command prints its report.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn set_total(&self, total: u64) {
        if self.bar.length().is_none() {
            self.bar
                .set_style(self.style("{bar:40} {pos}/{len}", "({per_sec}, eta {eta})"));
        }
        self.bar.set_length(total);
    }

    fn style(&self, count: &str, rate: &str) -> indicatif::ProgressStyle {
        indicatif::ProgressStyle::with_template(&format!("{count} {} {rate}", self.unit))
            .expect("a valid template")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(format: Format) -> String {
        let mut out = Vec::new();
        let mut printer = Printer::new(format, vec!["rule", "evidence"], &mut out);
        printer
            .row(vec!["BILLER, row 1".into(), vec![1u64, 7].into()])
            .unwrap();
        printer.finish().unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_format_prints_the_same_row() {
        assert_eq!(
            print(Format::Table),
            "RULE           EVIDENCE\nBILLER, row 1  1 7\n"
        );
        assert_eq!(
            print(Format::Json),
            "{\"rule\":\"BILLER, row 1\",\"evidence\":[1,7]}\n"
        );
        assert_eq!(print(Format::Csv), "rule,evidence\n\"BILLER, row 1\",1 7\n");
    }
}

//! The client subcommands. Each returns the process exit code: 0 done, 1 done but something
//! deserves attention (a violation found, a line refused), 2 could not run (see `main`).

use std::io::BufRead;
use std::path::Path;

use super::output::{Cell, Format, Printer, Progress};
use super::{Connection, call_error, input};
use crate::proto::{
    self, AppendBatchRequest, CheckSenderRequest, Entry, ListCommunicationsRequest,
    ListViolationsRequest, RecordFactRequest, leaf_record,
};
use crate::records::describe::{time_text, topic_name, verdict_name};

/// The question `check` asks (its flags).
#[derive(clap::Args)]
pub struct CheckQuestion {
    #[arg(long)]
    pub sender: String,
    #[arg(long)]
    pub customer: String,
    /// commercial, support, operational, transition or general.
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub subscription: Option<String>,
    #[arg(long)]
    pub product: Option<String>,
    /// The instant asked about (RFC 3339) [default: now].
    #[arg(long)]
    pub at: Option<String>,
    /// Judge on what the ledger held at this size (0: everything).
    #[arg(long, default_value_t = 0)]
    pub as_of_tree_size: u64,
}

pub async fn check(
    connection: &Connection,
    question: CheckQuestion,
    format: Format,
) -> anyhow::Result<u8> {
    let request = CheckSenderRequest {
        sender_id: question.sender,
        customer_id: question.customer,
        topic: input::topic(&question.topic)?,
        subscription_id: question.subscription.unwrap_or_default(),
        product_id: question.product.unwrap_or_default(),
        at: question
            .at
            .map(|at| input::instant("--at", &at))
            .transpose()?,
        as_of_tree_size: question.as_of_tree_size,
    };
    let mut clients = connection.clients().await?;
    let assessment = clients
        .compliance
        .check_sender(request)
        .await
        .map_err(|status| call_error("CheckSender", status))?
        .into_inner()
        .assessment
        .unwrap_or_default();
    let mut printer = Printer::new(
        format,
        vec![
            "verdict",
            "rule",
            "explanation",
            "evidence",
            "tree_size",
            "policy_version",
            "at",
        ],
        std::io::stdout().lock(),
    );
    let verdict = verdict_name(assessment.verdict);
    printer.row(vec![
        verdict.as_str().into(),
        assessment.rule.into(),
        assessment.explanation.into(),
        assessment.evidence.into(),
        assessment.tree_size.into(),
        assessment.policy_version.into(),
        assessment
            .at
            .as_ref()
            .map(|at| time_text(&Some(*at)))
            .unwrap_or_default()
            .into(),
    ])?;
    printer.finish()?;
    Ok(u8::from(verdict != "allowed"))
}

/// Filters shared by `violations` and `communications`.
#[derive(Debug, Default)]
pub struct Filters {
    pub customer: Option<String>,
    pub sender: Option<String>,
    pub topic: Option<String>,
    pub subscription: Option<String>,
    pub product: Option<String>,
    pub rule: Option<String>,
    /// `violations` only: violations, reviews or both (`--verdicts`).
    pub verdicts: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub include_review: bool,
    pub as_of_tree_size: u64,
}

impl Filters {
    /// `--from` and `--to` as timestamps.
    #[allow(clippy::type_complexity)]
    pub fn time_range(
        &self,
    ) -> anyhow::Result<(
        Option<prost_types::Timestamp>,
        Option<prost_types::Timestamp>,
    )> {
        Ok((
            self.from
                .as_deref()
                .map(|at| input::instant("--from", at))
                .transpose()?,
            self.to
                .as_deref()
                .map(|at| input::instant("--to", at))
                .transpose()?,
        ))
    }

    /// The first `ListCommunications` page these filters ask for.
    pub fn communications_request(&self) -> anyhow::Result<ListCommunicationsRequest> {
        let (from, to) = self.time_range()?;
        Ok(ListCommunicationsRequest {
            customer_id: self.customer.clone().unwrap_or_default(),
            sender_id: self.sender.clone().unwrap_or_default(),
            topic: self
                .topic
                .as_deref()
                .map(input::topic)
                .transpose()?
                .unwrap_or(0),
            subscription_id: self.subscription.clone().unwrap_or_default(),
            product_id: self.product.clone().unwrap_or_default(),
            from,
            to,
            page_size: 1000,
            page_token: String::new(),
        })
    }
}

fn communication_cells(entry: &Entry) -> Vec<Cell> {
    let record = entry
        .record
        .as_ref()
        .and_then(|record| match &record.record {
            Some(leaf_record::Record::Communication(c)) => Some(c.clone()),
            _ => None,
        });
    let c = record.unwrap_or_default();
    vec![
        entry.index.into(),
        time_text(&c.sent_at).into(),
        c.sender_id.into(),
        c.customer_id.into(),
        topic_name(c.topic).into(),
        c.subscription_id.into(),
        c.message_id.into(),
    ]
}

const COMMUNICATION_COLUMNS: [&str; 7] = [
    "index",
    "sent_at",
    "sender",
    "customer",
    "topic",
    "subscription",
    "message_id",
];

/// Every violation matching the filters, all pages.
pub async fn violations(
    connection: &Connection,
    filters: Filters,
    format: Format,
) -> anyhow::Result<u8> {
    let mut clients = connection.clients().await?;
    let mut columns = COMMUNICATION_COLUMNS.to_vec();
    columns.extend(["verdict", "rule", "explanation", "evidence"]);
    let mut printer = Printer::new(format, columns, std::io::stdout().lock());
    let (from, to) = filters.time_range()?;
    let communications = filters.communications_request()?;
    let mut request = ListViolationsRequest {
        customer_id: communications.customer_id,
        sender_id: communications.sender_id,
        topic: communications.topic,
        subscription_id: communications.subscription_id,
        product_id: filters.product.unwrap_or_default(),
        verdicts: filters
            .verdicts
            .as_deref()
            .map(input::verdict_filter)
            .transpose()?
            .unwrap_or(0),
        rule: filters.rule.unwrap_or_default(),
        from,
        to,
        include_review: filters.include_review,
        as_of_tree_size: filters.as_of_tree_size,
        page_size: 1000,
        page_token: String::new(),
    };
    let mut found = 0u64;
    loop {
        let page = clients
            .compliance
            .list_violations(request.clone())
            .await
            .map_err(|status| call_error("ListViolations", status))?
            .into_inner();
        for violation in page.violations {
            let entry = violation.entry.unwrap_or_default();
            let assessment = violation.assessment.unwrap_or_default();
            let mut cells = communication_cells(&entry);
            cells.extend([
                verdict_name(assessment.verdict).into(),
                assessment.rule.into(),
                assessment.explanation.into(),
                assessment.evidence.into(),
            ]);
            printer.row(cells)?;
            found += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    printer.finish()?;
    Ok(u8::from(found > 0))
}

/// Every communication matching the filters, all pages.
pub async fn communications(
    connection: &Connection,
    filters: Filters,
    format: Format,
) -> anyhow::Result<u8> {
    let mut clients = connection.clients().await?;
    let mut printer = Printer::new(
        format,
        COMMUNICATION_COLUMNS.to_vec(),
        std::io::stdout().lock(),
    );
    let mut request = filters.communications_request()?;
    loop {
        let page = clients
            .compliance
            .list_communications(request.clone())
            .await
            .map_err(|status| call_error("ListCommunications", status))?
            .into_inner();
        for entry in &page.entries {
            printer.row(communication_cells(entry))?;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    printer.finish()?;
    Ok(0)
}

/// Counts of what a load did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadSummary {
    pub appended: u64,
    pub duplicates: u64,
    pub violations: u64,
    pub reviews: u64,
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<(usize, String)>> {
    let file = std::fs::File::open(path)
        .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?;
    let mut lines = Vec::new();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if !line.trim().is_empty() {
            lines.push((number + 1, line));
        }
    }
    Ok(lines)
}

/// Appends every communication of a JSON-lines file, in batches. Every line is parsed
/// before anything is sent, so a bad line appends nothing. Retrying the same file is safe:
/// what is already in the ledger comes back as a duplicate.
pub async fn append_file(
    connection: &Connection,
    path: &Path,
    batch: usize,
) -> anyhow::Result<LoadSummary> {
    let communications = read_lines(path)?
        .into_iter()
        .map(|(number, line)| {
            input::communication(&line)
                .map_err(|error| anyhow::anyhow!("{}:{number}: {error}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut clients = connection.clients().await?;
    let progress = Progress::new(Some(communications.len() as u64), "communications");
    let mut summary = LoadSummary::default();
    for chunk in communications.chunks(batch.max(1)) {
        let results = clients
            .ledger
            .append_batch(AppendBatchRequest {
                communications: chunk.to_vec(),
            })
            .await
            .map_err(|status| {
                call_error(
                    &format!(
                        "AppendBatch after {} lines",
                        summary.appended + summary.duplicates
                    ),
                    status,
                )
            })?
            .into_inner()
            .results;
        for result in results {
            if result.duplicate {
                summary.duplicates += 1;
            } else {
                summary.appended += 1;
            }
            match result.assessment.map(|a| a.verdict) {
                Some(v) if v == proto::Verdict::Violation as i32 => summary.violations += 1,
                Some(v) if v == proto::Verdict::Review as i32 => summary.reviews += 1,
                _ => {}
            }
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    Ok(summary)
}

/// Records every fact of a JSON-lines file, in order (a transfer needs its subscription).
pub async fn fact_file(connection: &Connection, path: &Path) -> anyhow::Result<LoadSummary> {
    let facts = read_lines(path)?
        .into_iter()
        .map(|(number, line)| {
            input::fact(&line)
                .map(|fact| (number, fact))
                .map_err(|error| anyhow::anyhow!("{}:{number}: {error}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut clients = connection.clients().await?;
    let progress = Progress::new(Some(facts.len() as u64), "facts");
    let mut summary = LoadSummary::default();
    for (number, fact) in facts {
        let recorded = clients
            .compliance
            .record_fact(RecordFactRequest { fact: Some(fact) })
            .await
            .map_err(|status| {
                call_error(&format!("{}:{number}: RecordFact", path.display()), status)
            })?
            .into_inner();
        if recorded.duplicate {
            summary.duplicates += 1;
        } else {
            summary.appended += 1;
        }
        progress.inc(1);
    }
    progress.finish();
    Ok(summary)
}

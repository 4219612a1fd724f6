//! `audit.ledger.v1.LedgerService`: a thin translation onto [`Ledger`].

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::access::Recorder;
use super::convert::{assessment_message, entry_message};
use super::status::{ApiError, to_status};
use crate::access_log::AccessLog;
use crate::auth::Principal;
use crate::compliance::Compliance;
use crate::config::ServerConfig;
use crate::ledger::{Appended, Ledger, LedgerError, SignedCheckpoint};
use crate::proto::ledger_service_server::LedgerService;
use crate::proto::{
    AppendBatchRequest, AppendBatchResponse, AppendRequest, AppendResponse, AppendResult,
    Checkpoint, GetCheckpointRequest, GetCheckpointResponse, GetConsistencyProofRequest,
    GetConsistencyProofResponse, GetEntryRequest, GetEntryResponse, GetInclusionProofRequest,
    GetInclusionProofResponse, ListEntriesRequest, ListEntriesResponse,
};
use crate::records::communication::question_of;
use crate::records::communication::{check_batch_size, prepare_batch};
use crate::records::{Invalid, prepare_communication};
use crate::telemetry::{self, names};

#[derive(Clone)]
pub struct LedgerApi {
    ledger: Ledger,
    compliance: Compliance,
    access: Recorder,
    config: ServerConfig,
}

const SERVICE: &str = "/audit.ledger.v1.LedgerService/";

impl LedgerApi {
    pub fn new(
        ledger: Ledger,
        compliance: Compliance,
        access: AccessLog,
        config: ServerConfig,
    ) -> Self {
        LedgerApi {
            ledger,
            compliance,
            access: Recorder::new(access, SERVICE),
            config,
        }
    }

    /// The verdict at ingestion: the communication judged at its sent_at on the facts the
    /// ledger holds once it is recorded.
    fn assess(
        &self,
        question: Option<crate::policy::Question>,
    ) -> Result<Option<crate::proto::Assessment>, Status> {
        let Some(question) = question else {
            return Ok(None);
        };
        let answer = self.compliance.check(&question, 0).map_err(to_status)?;
        telemetry::count_verdict(&answer.assessment);
        Ok(Some(assessment_message(answer)))
    }

    /// [`LedgerApi::assess`] for a batch, reading each fact list once.
    fn assess_all(
        &self,
        questions: Vec<Option<crate::policy::Question>>,
    ) -> Result<Vec<Option<crate::proto::Assessment>>, Status> {
        let asked: Vec<crate::policy::Question> = questions.iter().flatten().cloned().collect();
        let mut answers = self
            .compliance
            .check_many(&asked)
            .map_err(to_status)?
            .into_iter();
        Ok(questions
            .iter()
            .map(|question| {
                question.as_ref()?;
                let answer = answers.next().expect("one answer per question");
                telemetry::count_verdict(&answer.assessment);
                Some(assessment_message(answer))
            })
            .collect())
    }
}

/// Counts what an append did (`count` records submitted), and maps its error.
pub(super) fn counted<T: AppendedCount>(
    kind: &'static str,
    count: u64,
    result: Result<T, LedgerError>,
) -> Result<T, Status> {
    match &result {
        Ok(appended) => {
            let duplicates = appended.duplicates();
            telemetry::count_records(kind, "appended", count - duplicates);
            telemetry::count_records(kind, "duplicate", duplicates);
        }
        Err(_) => telemetry::count_records(kind, "rejected", count),
    }
    result.map_err(to_status)
}

/// How many of an append's records were already in the ledger.
pub(super) trait AppendedCount {
    fn duplicates(&self) -> u64;
}

impl AppendedCount for Appended {
    fn duplicates(&self) -> u64 {
        u64::from(self.duplicate)
    }
}

impl AppendedCount for Vec<Appended> {
    fn duplicates(&self) -> u64 {
        self.iter().filter(|appended| appended.duplicate).count() as u64
    }
}

/// A writer bound to sender ids may only submit communications for them.
fn check_sender_binding(
    principal: Option<&Principal>,
    communication: &crate::proto::Communication,
    field: impl std::fmt::Display,
) -> Result<(), Status> {
    match principal {
        Some(principal) if !principal.may_send_as(&communication.sender_id) => {
            Err(to_status(ApiError::PermissionDenied(format!(
                "{field}.sender_id: principal {} may not submit for sender {:?}",
                principal.name, communication.sender_id
            ))))
        }
        _ => Ok(()),
    }
}

fn checkpoint_message(checkpoint: &SignedCheckpoint) -> Checkpoint {
    Checkpoint {
        origin: checkpoint.origin.clone(),
        size: checkpoint.size,
        root_hash: checkpoint.root_hash.0.to_vec(),
        note: checkpoint.note.clone(),
    }
}

fn hashes(proof: Vec<crate::ledger::merkle::Hash>) -> Vec<Vec<u8>> {
    proof.into_iter().map(|hash| hash.0.to_vec()).collect()
}

fn append_result(appended: Appended, assessment: Option<crate::proto::Assessment>) -> AppendResult {
    AppendResult {
        index: appended.index,
        leaf_hash: appended.leaf_hash.0.to_vec(),
        duplicate: appended.duplicate,
        assessment,
    }
}

/// The items `read` makes of `indices`, each read only when the consumer asks for the next
/// one; the stream ends after the first error. Under a response, tonic asks for the next
/// message when hyper asks for the next bytes, which it does only while the client's
/// HTTP/2 window has room: a client that stops reading stops the reads, and its stream
/// holds about one message (being encoded and sent), not a read-ahead buffer.
fn on_demand<T, E>(
    indices: std::ops::Range<u64>,
    read: impl FnMut(u64) -> Result<T, E> + Send + 'static,
) -> impl Stream<Item = Result<T, E>> + Send + 'static
where
    T: Send + 'static,
    E: Send + 'static,
{
    tokio_stream::iter(indices.map(read).scan(false, |failed, item| {
        if *failed {
            return None;
        }
        *failed = item.is_err();
        Some(item)
    }))
}

#[tonic::async_trait]
impl LedgerService for LedgerApi {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let communication = request
            .into_inner()
            .communication
            .ok_or_else(|| to_status(Invalid::new("communication", "must be set")))?;
        check_sender_binding(principal.as_ref(), &communication, "communication")?;
        let question = question_of(&communication);
        let record = prepare_communication(
            communication,
            "communication",
            &self.config.record_limits,
            Principal::name_of(principal.as_ref()),
        )
        .map_err(to_status)?;
        let appended = counted(names::APPENDS, 1, self.ledger.append_one(record).await)?;
        Ok(Response::new(AppendResponse {
            index: appended.index,
            leaf_hash: appended.leaf_hash.0.to_vec(),
            duplicate: appended.duplicate,
            assessment: self.assess(question)?,
        }))
    }

    async fn append_batch(
        &self,
        request: Request<AppendBatchRequest>,
    ) -> Result<Response<AppendBatchResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let communications = request.into_inner().communications;
        check_batch_size(communications.len(), self.config.max_batch_records).map_err(to_status)?;
        for (position, communication) in communications.iter().enumerate() {
            check_sender_binding(
                principal.as_ref(),
                communication,
                format_args!("communications[{position}]"),
            )?;
        }
        let questions: Vec<_> = communications.iter().map(question_of).collect();
        let records = prepare_batch(
            communications,
            &self.config.record_limits,
            Principal::name_of(principal.as_ref()),
        )
        .map_err(to_status)?;
        let count = records.len() as u64;
        let appended = counted(names::APPENDS, count, self.ledger.append(records).await)?;
        let assessments = self.assess_all(questions)?;
        let results = appended
            .into_iter()
            .zip(assessments)
            .map(|(appended, assessment)| append_result(appended, assessment))
            .collect();
        Ok(Response::new(AppendBatchResponse { results }))
    }

    async fn get_entry(
        &self,
        request: Request<GetEntryRequest>,
    ) -> Result<Response<GetEntryResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let index = request.into_inner().index;
        let entry = self.ledger.entry(index).map_err(to_status);
        self.access.record(
            principal.as_ref(),
            "GetEntry",
            format!("index={index}"),
            u64::from(entry.is_ok()),
        )?;
        let entry = entry?;
        Ok(Response::new(GetEntryResponse {
            entry: Some(entry_message(entry)),
        }))
    }

    type ListEntriesStream =
        Pin<Box<dyn Stream<Item = Result<ListEntriesResponse, Status>> + Send + 'static>>;

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<Self::ListEntriesStream>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let request = request.into_inner();
        let tree_size = self.ledger.tree_size();
        // From the tree size itself: an empty stream (nothing recorded there yet); past it,
        // the one rule for sizes and indices past the tree.
        if request.start_index > tree_size {
            return Err(to_status(LedgerError::size_past_the_tree(
                "start_index",
                request.start_index,
                tree_size,
            )));
        }
        let cap = self.config.max_list_entries;
        let limit = if request.limit == 0 {
            cap
        } else {
            request.limit.min(cap)
        };
        // The stream covers the tree as published when the call started.
        let end = request.start_index.saturating_add(limit).min(tree_size);
        self.access.record(
            principal.as_ref(),
            "ListEntries",
            format!(
                "start_index={} limit={}",
                request.start_index, request.limit
            ),
            end - request.start_index,
        )?;
        let ledger = self.ledger.clone();
        Ok(Response::new(Box::pin(on_demand(
            request.start_index..end,
            move |index| {
                ledger
                    .entry(index)
                    .map(|entry| ListEntriesResponse {
                        entry: Some(entry_message(entry)),
                    })
                    .map_err(to_status)
            },
        ))))
    }

    async fn get_checkpoint(
        &self,
        request: Request<GetCheckpointRequest>,
    ) -> Result<Response<GetCheckpointResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let tree_size = request.into_inner().tree_size;
        let checkpoint = self.ledger.checkpoint_at(tree_size).map_err(to_status);
        self.access.record(
            principal.as_ref(),
            "GetCheckpoint",
            format!("tree_size={tree_size}"),
            u64::from(checkpoint.is_ok()),
        )?;
        Ok(Response::new(GetCheckpointResponse {
            checkpoint: Some(checkpoint_message(&*checkpoint?)),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let request = request.into_inner();
        self.access.record(
            principal.as_ref(),
            "GetInclusionProof",
            format!("index={} tree_size={}", request.index, request.tree_size),
            1,
        )?;
        let tree_size = match request.tree_size {
            0 => self.ledger.tree_size(),
            size => size,
        };
        let proof = self
            .ledger
            .inclusion_proof(request.index, tree_size)
            .map_err(to_status)?;
        Ok(Response::new(GetInclusionProofResponse {
            index: request.index,
            tree_size,
            hashes: hashes(proof),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<GetConsistencyProofRequest>,
    ) -> Result<Response<GetConsistencyProofResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let request = request.into_inner();
        self.access.record(
            principal.as_ref(),
            "GetConsistencyProof",
            format!(
                "from_size={} to_size={}",
                request.from_size, request.to_size
            ),
            1,
        )?;
        let to_size = match request.to_size {
            0 => self.ledger.tree_size(),
            size => size,
        };
        let proof = self
            .ledger
            .consistency_proof(request.from_size, to_size)
            .map_err(to_status)?;
        Ok(Response::new(GetConsistencyProofResponse {
            from_size: request.from_size,
            to_size,
            hashes: hashes(proof),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio_stream::StreamExt;

    use super::on_demand;

    /// Gives anything that runs beside the consumer (a task filling a channel) every chance
    /// to run ahead.
    async fn let_others_run() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_unread_stream_reads_nothing_ahead_of_its_consumer() {
        let produced = Arc::new(AtomicU64::new(0));
        let mut stream = Box::pin(on_demand(0..100_000, {
            let produced = produced.clone();
            move |index| {
                produced.fetch_add(1, Ordering::SeqCst);
                Ok::<u64, ()>(index)
            }
        }));
        let_others_run().await;
        assert!(
            produced.load(Ordering::SeqCst) <= 1,
            "{} messages made for a consumer that took none",
            produced.load(Ordering::SeqCst)
        );
        for expected in 0..3 {
            assert_eq!(stream.next().await, Some(Ok(expected)));
        }
        let_others_run().await;
        assert!(
            produced.load(Ordering::SeqCst) <= 3 + 1,
            "{} messages made for a consumer that took 3",
            produced.load(Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn a_stream_ends_after_its_first_error() {
        let stream = on_demand(
            0..10,
            |index| if index == 2 { Err(index) } else { Ok(index) },
        );
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items, vec![Ok(0), Ok(1), Err(2)]);
    }
}

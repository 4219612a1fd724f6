//! `audit.ledger.v1.ComplianceService`: a thin translation onto [`Compliance`].

use tonic::{Request, Response, Status};

use super::access::Recorder;
use crate::access_log::AccessLog;
use crate::auth::Principal;

use super::convert::{assessment_message, entry_message};
use super::ledger_service::counted;
use super::status::{ApiError, to_status};
use crate::compliance::{CommunicationFilter, Compliance, ViolationFilter};
use crate::config::ServerConfig;
use crate::ledger::Ledger;
use crate::ledger::time::Timestamp;
use crate::proto::compliance_service_server::ComplianceService;
use crate::proto::{
    CheckSenderRequest, CheckSenderResponse, ListCommunicationsRequest, ListCommunicationsResponse,
    ListViolationsRequest, ListViolationsResponse, RecordFactRequest, RecordFactResponse,
    Violation,
};
use crate::records::{Invalid, prepare_fact, prepare_question};
use crate::telemetry::names;

const SERVICE: &str = "/audit.ledger.v1.ComplianceService/";

#[derive(Clone)]
pub struct ComplianceApi {
    ledger: Ledger,
    compliance: Compliance,
    access: Recorder,
    config: ServerConfig,
}

impl ComplianceApi {
    pub fn new(
        ledger: Ledger,
        compliance: Compliance,
        access: AccessLog,
        config: ServerConfig,
    ) -> Self {
        ComplianceApi {
            ledger,
            compliance,
            access: Recorder::new(access, SERVICE),
            config,
        }
    }
}

#[tonic::async_trait]
impl ComplianceService for ComplianceApi {
    async fn record_fact(
        &self,
        request: Request<RecordFactRequest>,
    ) -> Result<Response<RecordFactResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let fact = request
            .into_inner()
            .fact
            .ok_or_else(|| to_status(Invalid::new("fact", "must be set")))?;
        let record = prepare_fact(
            fact,
            "fact",
            &self.config.record_limits,
            Principal::name_of(principal.as_ref()),
        )
        .map_err(to_status)?;
        let appended = counted(names::FACTS, 1, self.ledger.append_one(record).await)?;
        Ok(Response::new(RecordFactResponse {
            index: appended.index,
            leaf_hash: appended.leaf_hash.0.to_vec(),
            duplicate: appended.duplicate,
        }))
    }

    async fn check_sender(
        &self,
        request: Request<CheckSenderRequest>,
    ) -> Result<Response<CheckSenderResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let request = request.into_inner();
        let check = || -> Result<_, ApiError> {
            let question =
                prepare_question(&request, &self.config.record_limits, Timestamp::now())?;
            Ok(self.compliance.check(&question, request.as_of_tree_size)?)
        };
        let answer = check().map_err(to_status)?;
        crate::telemetry::count_verdict(&answer.assessment);
        self.access.record(
            principal.as_ref(),
            "CheckSender",
            format!(
                "sender_id={:?} customer_id={:?} topic={} subscription_id={:?} product_id={:?} at={:?} as_of_tree_size={}",
                request.sender_id,
                request.customer_id,
                request.topic,
                request.subscription_id,
                request.product_id,
                request.at.map(|t| t.seconds),
                request.as_of_tree_size
            ),
            1,
        )?;
        Ok(Response::new(CheckSenderResponse {
            assessment: Some(assessment_message(answer)),
        }))
    }

    async fn list_violations(
        &self,
        request: Request<ListViolationsRequest>,
    ) -> Result<Response<ListViolationsResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let request = request.into_inner();
        let run = || -> Result<_, ApiError> {
            let filter = ViolationFilter::of_request(&request, &self.config.record_limits)?;
            Ok(self
                .compliance
                .list_violations(&filter, request.page_size, &request.page_token)?)
        };
        self.compliance
            .communications_ready()
            .await
            .map_err(to_status)?;
        let page = run().map_err(to_status)?;
        self.access.record(
            principal.as_ref(),
            "ListViolations",
            format!(
                "customer_id={:?} sender_id={:?} rule={:?} topic={} subscription_id={:?} product_id={:?} verdicts={} from={:?} to={:?} include_review={} as_of_tree_size={} page_size={} page_token={}",
                request.customer_id,
                request.sender_id,
                request.rule,
                request.topic,
                request.subscription_id,
                request.product_id,
                request.verdicts,
                request.from.map(|t| t.seconds),
                request.to.map(|t| t.seconds),
                request.include_review,
                request.as_of_tree_size,
                request.page_size,
                !request.page_token.is_empty()
            ),
            page.items.len() as u64,
        )?;
        Ok(Response::new(ListViolationsResponse {
            violations: page
                .items
                .into_iter()
                .map(|(entry, answer)| Violation {
                    entry: Some(entry_message(entry)),
                    assessment: Some(assessment_message(answer)),
                })
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn list_communications(
        &self,
        request: Request<ListCommunicationsRequest>,
    ) -> Result<Response<ListCommunicationsResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let request = request.into_inner();
        let run = || -> Result<_, ApiError> {
            let filter = CommunicationFilter::of_request(&request, &self.config.record_limits)?;
            Ok(self.compliance.list_communications(
                &filter,
                request.page_size,
                &request.page_token,
            )?)
        };
        self.compliance
            .communications_ready()
            .await
            .map_err(to_status)?;
        let page = run().map_err(to_status)?;
        self.access.record(
            principal.as_ref(),
            "ListCommunications",
            format!(
                "customer_id={:?} sender_id={:?} topic={} subscription_id={:?} product_id={:?} from={:?} to={:?} page_size={} page_token={}",
                request.customer_id,
                request.sender_id,
                request.topic,
                request.subscription_id,
                request.product_id,
                request.from.map(|t| t.seconds),
                request.to.map(|t| t.seconds),
                request.page_size,
                !request.page_token.is_empty()
            ),
            page.items.len() as u64,
        )?;
        Ok(Response::new(ListCommunicationsResponse {
            entries: page.items.into_iter().map(entry_message).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

//! `audit.ledger.v1.ComplianceService`: a thin translation onto [`Compliance`].

use tonic::{Request, Response, Status};

use super::access::Recorder;
use crate::access_log::AccessLog;
use crate::auth::Principal;

use super::convert::{assessment_message, entry_message, timestamp};
use super::ledger_service::counted;
use super::status::to_status;
use crate::compliance::{CommunicationFilter, Compliance, VerdictsWanted, ViolationFilter};
use crate::config::ServerConfig;
use crate::ledger::time::Timestamp;
use crate::ledger::{Ledger, LedgerError};
use crate::policy::{Question, Rule};
use crate::proto::compliance_service_server::ComplianceService;
use crate::proto::{
    CheckSenderRequest, CheckSenderResponse, ListCommunicationsRequest, ListCommunicationsResponse,
    ListViolationsRequest, ListViolationsResponse, RecordFactRequest, RecordFactResponse, Topic,
    VerdictFilter, Violation,
};
use crate::records::communication::policy_topic;
use crate::records::prepare_fact;
use crate::records::validate;
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

fn optional_time(
    field: &str,
    at: &Option<prost_types::Timestamp>,
) -> Result<Option<Timestamp>, LedgerError> {
    match at {
        Some(at) => {
            validate::timestamp(field, at)?;
            Ok(Some(timestamp(at)))
        }
        None => Ok(None),
    }
}

/// The filter fields ListCommunications and ListViolations share, as the request has them.
struct FilterFields<'r> {
    customer_id: &'r str,
    sender_id: &'r str,
    topic: i32,
    subscription_id: &'r str,
    product_id: &'r str,
    from: &'r Option<prost_types::Timestamp>,
    to: &'r Option<prost_types::Timestamp>,
}

/// Filters shared by ListCommunications and ListViolations: ids are optional but, when
/// given, must be well-formed.
fn communication_filter(
    fields: FilterFields<'_>,
    max_id: usize,
) -> Result<CommunicationFilter, LedgerError> {
    let FilterFields {
        customer_id,
        sender_id,
        topic,
        subscription_id,
        product_id,
        from,
        to,
    } = fields;
    validate::optional_id("customer_id", customer_id, max_id)?;
    validate::optional_id("sender_id", sender_id, max_id)?;
    validate::optional_id("subscription_id", subscription_id, max_id)?;
    validate::optional_id("product_id", product_id, max_id)?;
    if !subscription_id.is_empty() && !product_id.is_empty() {
        return Err(LedgerError::invalid(
            "product_id",
            "a communication is about a CSP subscription or a non-CSP product, not both",
        ));
    }
    if Topic::try_from(topic).is_err() {
        return Err(LedgerError::invalid(
            "topic",
            format!("{topic} is not a known topic"),
        ));
    }
    let from = optional_time("from", from)?;
    let to = optional_time("to", to)?;
    if let (Some(from), Some(to)) = (from, to) {
        if from > to {
            return Err(LedgerError::invalid("to", "is before from"));
        }
    }
    Ok(CommunicationFilter {
        customer_id: customer_id.to_owned(),
        sender_id: sender_id.to_owned(),
        topic,
        subscription_id: subscription_id.to_owned(),
        product_id: product_id.to_owned(),
        from,
        to,
    })
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
            .ok_or_else(|| Status::invalid_argument("fact: must be set"))?;
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
        let max = self.config.record_limits.max_id_bytes;
        let check = || -> Result<_, LedgerError> {
            validate::required_id("sender_id", &request.sender_id, max)?;
            validate::required_id("customer_id", &request.customer_id, max)?;
            let topic = policy_topic(request.topic).ok_or_else(|| {
                LedgerError::invalid(
                    "topic",
                    "must be a known topic other than TOPIC_UNSPECIFIED",
                )
            })?;
            validate::optional_id("subscription_id", &request.subscription_id, max)?;
            validate::optional_id("product_id", &request.product_id, max)?;
            if !request.subscription_id.is_empty() && !request.product_id.is_empty() {
                return Err(LedgerError::invalid(
                    "product_id",
                    "a communication is about a CSP subscription or a non-CSP product, not both",
                ));
            }
            let at = optional_time("at", &request.at)?.unwrap_or_else(Timestamp::now);
            let question = Question {
                sender_id: request.sender_id.clone(),
                customer_id: request.customer_id.clone(),
                topic,
                subscription_id: request.subscription_id.clone(),
                product_id: request.product_id.clone(),
                at,
            };
            self.compliance.check(&question, request.as_of_tree_size)
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
        let run = || -> Result<_, LedgerError> {
            let rule = match request.rule.as_str() {
                "" => None,
                name => Some(Rule::from_name(name).ok_or_else(|| {
                    LedgerError::invalid(
                        "rule",
                        format!("{name:?} is not a rule name of docs/COMPLIANCE.md"),
                    )
                })?),
            };
            let verdicts = match VerdictFilter::try_from(request.verdicts) {
                Ok(VerdictFilter::Unspecified) if request.include_review => {
                    VerdictsWanted::ViolationsAndReviews
                }
                Ok(VerdictFilter::Unspecified | VerdictFilter::Violations) => {
                    VerdictsWanted::Violations
                }
                Ok(VerdictFilter::Reviews) => VerdictsWanted::Reviews,
                Ok(VerdictFilter::ViolationsAndReviews) => VerdictsWanted::ViolationsAndReviews,
                Err(_) => {
                    return Err(LedgerError::invalid(
                        "verdicts",
                        format!("{} is not a known verdict filter", request.verdicts),
                    ));
                }
            };
            let filter = ViolationFilter {
                communications: communication_filter(
                    FilterFields {
                        customer_id: &request.customer_id,
                        sender_id: &request.sender_id,
                        topic: request.topic,
                        subscription_id: &request.subscription_id,
                        product_id: &request.product_id,
                        from: &request.from,
                        to: &request.to,
                    },
                    self.config.record_limits.max_id_bytes,
                )?,
                rule,
                verdicts,
                as_of_tree_size: request.as_of_tree_size,
            };
            self.compliance
                .list_violations(&filter, request.page_size, &request.page_token)
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
        let run = || -> Result<_, LedgerError> {
            let filter = communication_filter(
                FilterFields {
                    customer_id: &request.customer_id,
                    sender_id: &request.sender_id,
                    topic: request.topic,
                    subscription_id: &request.subscription_id,
                    product_id: &request.product_id,
                    from: &request.from,
                    to: &request.to,
                },
                self.config.record_limits.max_id_bytes,
            )?;
            self.compliance
                .list_communications(&filter, request.page_size, &request.page_token)
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

//! Recording reads in the access log, and `AccessLogService`.

use tonic::{Request, Response, Status};

use super::status::{to_status, unrecorded_read};
use crate::access_log::{Access, AccessLog, Listing};
use crate::auth::Principal;
use crate::compliance::page_token::PageTokens;
use crate::proto::access_log_service_server::AccessLogService;
use crate::proto::{ListAccessLogRequest, ListAccessLogResponse};

/// Records one read or query by an auditor or admin. Without authentication (loopback
/// mode) there are no principals and nothing to attribute, so nothing is recorded.
/// A read that cannot be recorded fails: nothing is read unrecorded.
pub fn record(
    log: &AccessLog,
    principal: Option<&Principal>,
    method: &str,
    request: String,
    result_count: u64,
) -> Result<(), Status> {
    let Some(principal) = principal.filter(|principal| principal.role.is_audited()) else {
        return Ok(());
    };
    log.record(Access {
        principal: &principal.name,
        role: &principal.role.to_string(),
        method,
        request,
        result_count,
    })
    .map_err(|error| unrecorded_read(&error))
}

/// Records the reads of one service: `record(principal, "GetEntry", …)`.
#[derive(Clone)]
pub struct Recorder {
    log: AccessLog,
    service: &'static str,
}

impl Recorder {
    /// `service` is the path prefix, e.g. `/audit.ledger.v1.LedgerService/`.
    pub fn new(log: AccessLog, service: &'static str) -> Self {
        Recorder { log, service }
    }

    pub fn record(
        &self,
        principal: Option<&Principal>,
        method: &str,
        request: String,
        result_count: u64,
    ) -> Result<(), Status> {
        record(
            &self.log,
            principal,
            &format!("{}{method}", self.service),
            request,
            result_count,
        )
    }
}

#[derive(Clone)]
pub struct AccessLogApi {
    log: AccessLog,
    /// Keys the listing's page tokens (the same secret as the compliance listings'; a
    /// token names the listing it continues, so one is never taken for another).
    tokens: PageTokens,
}

impl AccessLogApi {
    pub fn new(log: AccessLog, tokens: PageTokens) -> Self {
        AccessLogApi { log, tokens }
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLogApi {
    async fn list_access_log(
        &self,
        request: Request<ListAccessLogRequest>,
    ) -> Result<Response<ListAccessLogResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let request = request.into_inner();
        // The page is read (and the listing pinned) before this call is recorded.
        let page = self
            .log
            .page(
                &self.tokens,
                Listing {
                    start_index: request.start_index,
                    as_of_trail_size: request.as_of_trail_size,
                },
                request.page_size,
                &request.page_token,
            )
            .map_err(to_status)?;
        record(
            &self.log,
            principal.as_ref(),
            "/audit.ledger.v1.AccessLogService/ListAccessLog",
            format!(
                "start_index={} as_of_trail_size={} page_size={} page_token={}",
                request.start_index,
                request.as_of_trail_size,
                request.page_size,
                !request.page_token.is_empty()
            ),
            page.records.len() as u64,
        )?;
        Ok(Response::new(ListAccessLogResponse {
            records: page.records,
            next_index: page.next_index,
            next_page_token: page.next_page_token,
            trail_size: page.trail_size,
        }))
    }
}

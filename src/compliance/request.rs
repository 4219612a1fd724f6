//! What a listing request asks for, checked: the filters of `ListCommunications` and
//! `ListViolations` as the compliance queries take them. Ids are optional but, when given,
//! must be well-formed; every refusal names its field.

use super::{CommunicationFilter, VerdictsWanted, ViolationFilter};
use crate::policy::Rule;
use crate::proto::{ListCommunicationsRequest, ListViolationsRequest, Topic, VerdictFilter};
use crate::records::RecordLimits;
use crate::records::validate::{self, Invalid};

/// The filter fields both listings share, as the request has them.
struct FilterFields<'r> {
    customer_id: &'r str,
    sender_id: &'r str,
    topic: i32,
    subscription_id: &'r str,
    product_id: &'r str,
    from: &'r Option<prost_types::Timestamp>,
    to: &'r Option<prost_types::Timestamp>,
}

impl FilterFields<'_> {
    fn checked(self, limits: &RecordLimits) -> Result<CommunicationFilter, Invalid> {
        let max_id = limits.max_id_bytes;
        validate::optional_id("customer_id", self.customer_id, max_id)?;
        validate::optional_id("sender_id", self.sender_id, max_id)?;
        validate::optional_id("subscription_id", self.subscription_id, max_id)?;
        validate::optional_id("product_id", self.product_id, max_id)?;
        validate::subscription_or_product("product_id", self.subscription_id, self.product_id)?;
        if Topic::try_from(self.topic).is_err() {
            return Err(Invalid::new(
                "topic",
                format!("{} is not a known topic", self.topic),
            ));
        }
        let from = validate::optional_time("from", self.from)?;
        let to = validate::optional_time("to", self.to)?;
        if let (Some(from), Some(to)) = (from, to) {
            if from > to {
                return Err(Invalid::new("to", "is before from"));
            }
        }
        Ok(CommunicationFilter {
            customer_id: self.customer_id.to_owned(),
            sender_id: self.sender_id.to_owned(),
            topic: self.topic,
            subscription_id: self.subscription_id.to_owned(),
            product_id: self.product_id.to_owned(),
            from,
            to,
        })
    }
}

impl CommunicationFilter {
    /// The filters a `ListCommunications` request asks for.
    pub fn of_request(
        request: &ListCommunicationsRequest,
        limits: &RecordLimits,
    ) -> Result<Self, Invalid> {
        FilterFields {
            customer_id: &request.customer_id,
            sender_id: &request.sender_id,
            topic: request.topic,
            subscription_id: &request.subscription_id,
            product_id: &request.product_id,
            from: &request.from,
            to: &request.to,
        }
        .checked(limits)
    }
}

impl ViolationFilter {
    /// The filters a `ListViolations` request asks for. Left unset, `verdicts` keeps what
    /// `include_review` says, so that clients written before it get the same answers.
    pub fn of_request(
        request: &ListViolationsRequest,
        limits: &RecordLimits,
    ) -> Result<Self, Invalid> {
        let rule = match request.rule.as_str() {
            "" => None,
            name => Some(Rule::from_name(name).ok_or_else(|| {
                Invalid::new(
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
                return Err(Invalid::new(
                    "verdicts",
                    format!("{} is not a known verdict filter", request.verdicts),
                ));
            }
        };
        let communications = FilterFields {
            customer_id: &request.customer_id,
            sender_id: &request.sender_id,
            topic: request.topic,
            subscription_id: &request.subscription_id,
            product_id: &request.product_id,
            from: &request.from,
            to: &request.to,
        }
        .checked(limits)?;
        Ok(ViolationFilter {
            communications,
            rule,
            verdicts,
            as_of_tree_size: request.as_of_tree_size,
        })
    }
}

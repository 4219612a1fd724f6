//! A CheckSender question, checked: the fields a compliance question must have, and what a
//! communication names (a subscription or a product, never both), as for a recorded
//! communication.

use super::RecordLimits;
use super::communication::policy_topic;
use super::validate::{self, Invalid};
use crate::ledger::time::Timestamp;
use crate::policy::Question;
use crate::proto::CheckSenderRequest;

/// The question `request` asks, judged at its `at` or, when unset, at `now`.
pub fn prepare_question(
    request: &CheckSenderRequest,
    limits: &RecordLimits,
    now: Timestamp,
) -> Result<Question, Invalid> {
    let max = limits.max_id_bytes;
    validate::required_id("sender_id", &request.sender_id, max)?;
    validate::required_id("customer_id", &request.customer_id, max)?;
    let topic = policy_topic(request.topic).ok_or_else(|| {
        Invalid::new(
            "topic",
            "must be a known topic other than TOPIC_UNSPECIFIED",
        )
    })?;
    validate::optional_id("subscription_id", &request.subscription_id, max)?;
    validate::optional_id("product_id", &request.product_id, max)?;
    validate::subscription_or_product("product_id", &request.subscription_id, &request.product_id)?;
    Ok(Question {
        sender_id: request.sender_id.clone(),
        customer_id: request.customer_id.clone(),
        topic,
        subscription_id: request.subscription_id.clone(),
        product_id: request.product_id.clone(),
        at: validate::optional_time("at", &request.at)?.unwrap_or(now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CheckSenderRequest {
        CheckSenderRequest {
            sender_id: "contoso".into(),
            customer_id: "c1".into(),
            topic: crate::proto::Topic::Commercial as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_question_names_its_first_bad_field() {
        let now = Timestamp {
            seconds: 7,
            nanos: 0,
        };
        let limits = RecordLimits::default();
        assert_eq!(prepare_question(&request(), &limits, now).unwrap().at, now);
        for (field, bad) in [
            (
                "sender_id",
                CheckSenderRequest {
                    sender_id: String::new(),
                    ..request()
                },
            ),
            (
                "topic",
                CheckSenderRequest {
                    topic: 0,
                    ..request()
                },
            ),
            (
                "product_id",
                CheckSenderRequest {
                    subscription_id: "s".into(),
                    product_id: "p".into(),
                    ..request()
                },
            ),
            (
                "at",
                CheckSenderRequest {
                    at: Some(prost_types::Timestamp {
                        seconds: 0,
                        nanos: -1,
                    }),
                    ..request()
                },
            ),
        ] {
            assert_eq!(
                prepare_question(&bad, &limits, now).unwrap_err().field,
                field
            );
        }
    }
}

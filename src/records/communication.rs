//! Communications: the checks a submission must pass and its leaf record.

use prost::Message;
use sha2::{Digest, Sha256};

use super::RecordLimits;
use super::validate::{self, Invalid};
use crate::ledger::NewRecord;
use crate::ledger::time::Timestamp;
use crate::policy;
use crate::proto::{Communication, CommunicationRecord, LeafRecord, Topic, leaf_record};

/// Namespace byte of communication idempotency keys (other record kinds use others).
const KEY_NAMESPACE: u8 = b'c';

/// The policy's topic for a proto topic; `None` for unspecified or unknown values.
pub fn policy_topic(topic: i32) -> Option<policy::Topic> {
    match Topic::try_from(topic).ok()? {
        Topic::Commercial => Some(policy::Topic::Commercial),
        Topic::Support => Some(policy::Topic::Support),
        Topic::Operational => Some(policy::Topic::Operational),
        Topic::Transition => Some(policy::Topic::Transition),
        Topic::General => Some(policy::Topic::General),
        Topic::Unspecified => None,
    }
}

/// The compliance question a recorded communication raises: was its sender allowed at its
/// `sent_at`?
pub fn question(record: &CommunicationRecord) -> Option<policy::Question> {
    let sent_at = record.sent_at.as_ref()?;
    Some(policy::Question {
        sender_id: record.sender_id.clone(),
        customer_id: record.customer_id.clone(),
        topic: policy_topic(record.topic)?,
        subscription_id: record.subscription_id.clone(),
        product_id: record.product_id.clone(),
        at: Timestamp {
            seconds: sent_at.seconds,
            nanos: sent_at.nanos,
        },
    })
}

/// The question a communication about to be appended raises.
pub fn question_of(communication: &Communication) -> Option<policy::Question> {
    let sent_at = communication.sent_at.as_ref()?;
    Some(policy::Question {
        sender_id: communication.sender_id.clone(),
        customer_id: communication.customer_id.clone(),
        topic: policy_topic(communication.topic)?,
        subscription_id: communication.subscription_id.clone(),
        product_id: communication.product_id.clone(),
        at: Timestamp {
            seconds: sent_at.seconds,
            nanos: sent_at.nanos,
        },
    })
}

/// The idempotency key of a communication: `(sender_id, message_id)`.
pub fn idempotency_key(sender_id: &str, message_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + sender_id.len() + message_id.len());
    key.push(KEY_NAMESPACE);
    key.extend_from_slice(sender_id.as_bytes());
    // Ids hold no control characters, so NUL separates them unambiguously.
    key.push(0);
    key.extend_from_slice(message_id.as_bytes());
    key
}

/// Validates `communication` (named `field` in errors, e.g. `communication` or
/// `communications[3]`) and prepares its leaf record. The body leaves the leaf: the record
/// carries its SHA-256 and size, so the body can later be erased without breaking a hash.
pub fn prepare_communication(
    communication: Communication,
    field: &str,
    limits: &RecordLimits,
    submitted_by: &str,
) -> Result<NewRecord, Invalid> {
    let name = |sub| validate::Sub(field, sub);
    validate::required_id(
        name("message_id"),
        &communication.message_id,
        limits.max_id_bytes,
    )?;
    validate::required_id(
        name("sender_id"),
        &communication.sender_id,
        limits.max_id_bytes,
    )?;
    validate::required_id(
        name("customer_id"),
        &communication.customer_id,
        limits.max_id_bytes,
    )?;
    match Topic::try_from(communication.topic) {
        Ok(Topic::Unspecified) => {
            return Err(Invalid::new(name("topic"), "must be set"));
        }
        Err(_) => {
            return Err(Invalid::new(
                name("topic"),
                format!("{} is not a known topic", communication.topic),
            ));
        }
        Ok(_) => {}
    }
    validate::optional_id(name("channel"), &communication.channel, limits.max_id_bytes)?;
    let sent_at = communication
        .sent_at
        .ok_or_else(|| Invalid::new(name("sent_at"), "must be set"))?;
    validate::timestamp(name("sent_at"), &sent_at)?;
    validate::max_len(
        name("subject"),
        communication.subject.len(),
        limits.max_subject_bytes,
    )?;
    validate::max_len(
        name("body"),
        communication.body.len(),
        limits.max_body_bytes,
    )?;
    if communication.attributes.len() > limits.max_attributes {
        return Err(Invalid::new(
            name("attributes"),
            format!(
                "has {} entries, more than the limit of {}",
                communication.attributes.len(),
                limits.max_attributes
            ),
        ));
    }
    for (key, value) in &communication.attributes {
        validate::required_id(name("attributes"), key, limits.max_id_bytes)?;
        validate::max_len(
            format_args!("{field}.attributes[{key}]"),
            value.len(),
            limits.max_attribute_value_bytes,
        )?;
    }
    validate::optional_id(
        name("subscription_id"),
        &communication.subscription_id,
        limits.max_id_bytes,
    )?;
    validate::optional_id(
        name("product_id"),
        &communication.product_id,
        limits.max_id_bytes,
    )?;
    validate::subscription_or_product(
        name("product_id"),
        &communication.subscription_id,
        &communication.product_id,
    )?;

    let idempotency_key = idempotency_key(&communication.sender_id, &communication.message_id);

    let record = CommunicationRecord {
        message_id: communication.message_id,
        sender_id: communication.sender_id,
        customer_id: communication.customer_id,
        topic: communication.topic,
        channel: communication.channel,
        sent_at: Some(sent_at),
        subject: communication.subject,
        body_sha256: Sha256::digest(&communication.body).to_vec(),
        attributes: communication.attributes,
        subscription_id: communication.subscription_id,
        product_id: communication.product_id,
        body_size: communication.body.len() as u64,
    };
    // Only the record field is set: the ledger prepends index, prev_leaf_hash, recorded_at.
    let content = LeafRecord {
        submitted_by: submitted_by.to_owned(),
        record: Some(leaf_record::Record::Communication(record)),
        ..LeafRecord::default()
    }
    .encode_to_vec();
    Ok(NewRecord {
        idempotency_key,
        content,
        body: communication.body,
        field: field.to_owned(),
    })
}

/// An `AppendBatch` holds at least one communication and at most `max_records`.
pub fn check_batch_size(count: usize, max_records: usize) -> Result<(), Invalid> {
    if count == 0 {
        return Err(Invalid::new("communications", "must not be empty"));
    }
    if count > max_records {
        return Err(Invalid::new(
            "communications",
            format!("{count} communications, more than the limit of {max_records}"),
        ));
    }
    Ok(())
}

/// An `AppendBatch`'s communications, each prepared as [`prepare_communication`] does,
/// named `communications[i]`.
pub fn prepare_batch(
    communications: Vec<Communication>,
    limits: &RecordLimits,
    submitted_by: &str,
) -> Result<Vec<NewRecord>, Invalid> {
    communications
        .into_iter()
        .enumerate()
        .map(|(position, communication)| {
            prepare_communication(
                communication,
                &format!("communications[{position}]"),
                limits,
                submitted_by,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::leaf::{LeafHeader, encode_leaf};
    use crate::ledger::merkle::Hash;

    fn sample() -> Communication {
        Communication {
            message_id: "m-1".into(),
            sender_id: "contoso".into(),
            customer_id: "c-1".into(),
            topic: Topic::Support as i32,
            channel: "email".into(),
            sent_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            subject: "Your ticket".into(),
            body: b"hello".to_vec(),
            attributes: [
                ("b".to_string(), "2".to_string()),
                ("a".to_string(), "1".to_string()),
            ]
            .into_iter()
            .collect(),
            subscription_id: "sub-1".into(),
            product_id: String::new(),
        }
    }

    /// header ‖ content is the canonical prost encoding of the whole LeafRecord.
    #[test]
    fn leaf_is_the_canonical_leaf_record_encoding() {
        let prepared = prepare_communication(
            sample(),
            "communication",
            &RecordLimits::default(),
            "gateway-1",
        )
        .unwrap();
        let header = LeafHeader {
            index: 7,
            prev_leaf_hash: Hash([9u8; 32]),
            recorded_at: Timestamp {
                seconds: 1_700_000_001,
                nanos: 42,
            },
        };
        let leaf = encode_leaf(&header, &prepared.content);
        let decoded = LeafRecord::decode(leaf.as_slice()).unwrap();
        assert_eq!(decoded.index, 7);
        assert_eq!(decoded.prev_leaf_hash, vec![9u8; 32]);
        assert_eq!(decoded.recorded_at.unwrap().nanos, 42);
        assert_eq!(decoded.submitted_by, "gateway-1");
        let Some(leaf_record::Record::Communication(record)) = &decoded.record else {
            panic!("no communication in the leaf");
        };
        assert_eq!(record.body_sha256, Sha256::digest(b"hello").to_vec());
        assert_eq!(record.body_size, 5);
        assert_eq!(
            decoded.encode_to_vec(),
            leaf,
            "re-encoding changes the leaf"
        );
    }

    #[test]
    fn same_content_same_bytes() {
        let limits = RecordLimits::default();
        let a = prepare_communication(sample(), "c", &limits, "").unwrap();
        let b = prepare_communication(sample(), "c", &limits, "").unwrap();
        assert_eq!(a.content, b.content);
        assert_eq!(a.idempotency_key, b.idempotency_key);
        let mut changed = sample();
        changed.body = b"other".to_vec();
        let c = prepare_communication(changed, "c", &limits, "").unwrap();
        assert_eq!(a.idempotency_key, c.idempotency_key);
        assert_ne!(
            a.content, c.content,
            "the body digest is part of the content"
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let limits = RecordLimits::default();
        type Breakage = Box<dyn Fn(&mut Communication)>;
        let cases: Vec<(&str, Breakage)> = vec![
            (
                "communication.message_id",
                Box::new(|c| c.message_id.clear()),
            ),
            ("communication.sender_id", Box::new(|c| c.sender_id.clear())),
            (
                "communication.customer_id",
                Box::new(|c| c.customer_id.clear()),
            ),
            ("communication.topic", Box::new(|c| c.topic = 0)),
            ("communication.topic", Box::new(|c| c.topic = 99)),
            ("communication.sent_at", Box::new(|c| c.sent_at = None)),
            (
                "communication.message_id",
                Box::new(|c| c.message_id = "x".repeat(257)),
            ),
            (
                "communication.customer_id",
                Box::new(|c| c.customer_id = "a\u{0}b".into()),
            ),
            (
                "communication.body",
                Box::new(|c| c.body = vec![0; 1024 * 1024 + 1]),
            ),
            (
                "communication.product_id",
                Box::new(|c| c.product_id = "office".into()),
            ),
        ];
        for (field, break_it) in cases {
            let mut communication = sample();
            break_it(&mut communication);
            let error =
                prepare_communication(communication, "communication", &limits, "").unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
    }
}

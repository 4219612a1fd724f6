//! Field checks shared by every record kind. Each failure names the field as the client
//! spelled it, e.g. `communications[2].sender_id`.

use std::fmt::{self, Display};

/// A submitted value that is not acceptable, naming the field as the client spelled it
/// (e.g. `communications[2].sender_id`): the records layer's one error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A field named under its parent, e.g. `communications[3]` and `sender_id`: formatted only
/// when an error names it, so checking a valid record builds no strings (a batch checks
/// tens of thousands of fields).
#[derive(Clone, Copy)]
pub struct Sub<'a, P>(pub P, pub &'a str);

impl<P: Display> Display for Sub<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

impl<P: Display> From<Sub<'_, P>> for String {
    fn from(field: Sub<'_, P>) -> String {
        field.to_string()
    }
}

/// A required id: non-empty, at most `max_bytes`, no control characters.
pub fn required_id(field: impl Display, value: &str, max_bytes: usize) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field.to_string(), "must not be empty"));
    }
    optional_id(field, value, max_bytes)
}

/// An optional id: empty, or at most `max_bytes` with no control characters.
pub fn optional_id(field: impl Display, value: &str, max_bytes: usize) -> Result<(), Invalid> {
    if value.len() > max_bytes {
        return Err(Invalid::new(
            field.to_string(),
            format!(
                "is {} bytes, more than the limit of {max_bytes}",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Invalid::new(
            field.to_string(),
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// A free-text field: at most `max_bytes`.
pub fn max_len(field: impl Display, len: usize, max_bytes: usize) -> Result<(), Invalid> {
    if len > max_bytes {
        return Err(Invalid::new(
            field.to_string(),
            format!("is {len} bytes, more than the limit of {max_bytes}"),
        ));
    }
    Ok(())
}

/// A `google.protobuf.Timestamp` must lie in 0001-01-01..=9999-12-31 with
/// `0 <= nanos < 1e9`, as the well-known type defines.
pub fn timestamp(field: impl Display, value: &prost_types::Timestamp) -> Result<(), Invalid> {
    const MIN_SECONDS: i64 = -62_135_596_800;
    const MAX_SECONDS: i64 = 253_402_300_799;
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&value.seconds) {
        return Err(Invalid::new(
            field.to_string(),
            "is outside 0001-01-01..9999-12-31",
        ));
    }
    if !(0..1_000_000_000).contains(&value.nanos) {
        return Err(Invalid::new(field.to_string(), "nanos must be in 0..1e9"));
    }
    Ok(())
}

/// An optional `google.protobuf.Timestamp`, checked, as the ledger's business time.
pub fn optional_time(
    field: impl Display,
    at: &Option<prost_types::Timestamp>,
) -> Result<Option<crate::ledger::time::Timestamp>, Invalid> {
    match at {
        Some(at) => {
            timestamp(field, at)?;
            Ok(Some(crate::ledger::time::Timestamp {
                seconds: at.seconds,
                nanos: at.nanos,
            }))
        }
        None => Ok(None),
    }
}

/// A communication (or a question, or a filter) is about a CSP subscription or a non-CSP
/// product, not both; `product_field` names the product field the error points at.
pub fn subscription_or_product(
    product_field: impl Display,
    subscription_id: &str,
    product_id: &str,
) -> Result<(), Invalid> {
    if !subscription_id.is_empty() && !product_id.is_empty() {
        return Err(Invalid::new(
            product_field.to_string(),
            "a communication is about a CSP subscription or a non-CSP product, not both",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(required_id("f", "", 8).is_err());
        assert!(required_id("f", "abc", 8).is_ok());
        assert!(required_id("f", "123456789", 8).is_err());
        assert!(required_id("f", "a\nb", 8).is_err());
        assert!(required_id("f", "a\u{7f}b", 8).is_err());
        assert!(optional_id("f", "", 8).is_ok());
        let error = required_id("communication.sender_id", "", 8).unwrap_err();
        assert_eq!(
            error.to_string(),
            "communication.sender_id: must not be empty"
        );
    }

    #[test]
    fn nested_names_are_spelled_out_in_errors() {
        let field = Sub(
            Sub(format_args!("facts[{}]", 2), "transfer"),
            "to_partner_id",
        );
        let error = required_id(field, "", 8).unwrap_err();
        assert_eq!(
            error.to_string(),
            "facts[2].transfer.to_partner_id: must not be empty"
        );
        assert_eq!(
            String::from(Sub("communication", "body")),
            "communication.body"
        );
    }

    #[test]
    fn timestamps() {
        let at = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert!(timestamp("t", &at(0, 0)).is_ok());
        assert!(timestamp("t", &at(1_700_000_000, 999_999_999)).is_ok());
        assert!(timestamp("t", &at(0, -1)).is_err());
        assert!(timestamp("t", &at(0, 1_000_000_000)).is_err());
        assert!(timestamp("t", &at(i64::MAX, 0)).is_err());
        assert!(timestamp("t", &at(i64::MIN, 0)).is_err());
    }
}

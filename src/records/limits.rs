//! Limits on what one record may carry, enforced by validation. The server's configuration
//! holds one set (`ServerConfig::record_limits`); the defaults are here.

/// Limits on what one communication may carry.
#[derive(Debug, Clone)]
pub struct RecordLimits {
    /// Longest id (message, sender, customer, subscription, product, channel), in bytes.
    pub max_id_bytes: usize,
    /// Largest body, in bytes.
    pub max_body_bytes: usize,
    /// Longest subject, in bytes.
    pub max_subject_bytes: usize,
    /// Most attributes on one communication.
    pub max_attributes: usize,
    /// Longest attribute value, in bytes (keys follow `max_id_bytes`).
    pub max_attribute_value_bytes: usize,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            max_id_bytes: 256,
            max_body_bytes: 1024 * 1024,
            max_subject_bytes: 4096,
            max_attributes: 64,
            max_attribute_value_bytes: 4096,
        }
    }
}

//! Errors of the MQTT publisher.

/// An error building or connecting an [`MqttPublisher`](crate::MqttPublisher).
///
/// Messages never contain the password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// A setting is missing or wrong; `field` names it.
    #[error("invalid MQTT configuration: {field} {reason}")]
    InvalidConfig {
        /// The setting, e.g. `url` or `topic_template`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// [`MqttPublisher::connect`](crate::MqttPublisher::connect) saw no
    /// CONNACK in time.
    #[error("cannot connect to the MQTT broker at {addr}: {reason}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// The last connection error.
        reason: String,
    },
}

impl MqttError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        MqttError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

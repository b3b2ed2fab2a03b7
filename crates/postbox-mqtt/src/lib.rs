//! MQTT publisher for **postbox**: MQTT 5, QoS 1, a message is `Ok` only
//! when the broker's PUBACK for its own packet id arrives.
//!
//! ```no_run
//! # async fn demo() -> Result<(), postbox_mqtt::MqttError> {
//! use postbox_mqtt::{MqttConfig, MqttPublisher};
//! // starts even while the broker is down; publishes are Transient until it is up
//! let publisher = MqttPublisher::new(MqttConfig::from_url("mqtt://127.0.0.1:1883")?)?;
//! # Ok(()) }
//! ```

mod config;
mod error;
mod publisher;
mod tls;

pub use config::MqttConfig;
pub use error::MqttError;
pub use publisher::{ID_PROPERTY, KEY_PROPERTY, MqttPublisher};

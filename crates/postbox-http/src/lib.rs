//! Webhook publisher for **postbox**: each message is POSTed to a fixed
//! URL, signed per the [Standard Webhooks](https://www.standardwebhooks.com/)
//! spec, with bounded concurrency, same-key order, and an SSRF guard.
//!
//! ```no_run
//! # async fn demo() -> Result<(), postbox_http::HttpError> {
//! use postbox_http::{HttpConfig, HttpPublisher};
//! let publisher = HttpPublisher::new(
//!     HttpConfig::from_url("https://hooks.example.com/orders")?
//!         .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
//! )?;
//! # Ok(()) }
//! ```

mod config;
mod error;
mod guard;
mod publisher;
mod sign;

pub use config::HttpConfig;
pub use error::HttpError;
pub use guard::refusal as refused_address;
pub use publisher::HttpPublisher;
pub use sign::WebhookSecret;

//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>).
//!
//! The signed content is `"{webhook-id}.{webhook-timestamp}.{body}"`; the
//! signature is `v1,` followed by the standard base64 of its HMAC-SHA256
//! under the secret key. The secret is written `whsec_` followed by the
//! base64 of the key bytes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::HttpError;

/// A webhook signing secret (the decoded key bytes).
///
/// Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

impl WebhookSecret {
    /// Parses `whsec_<base64>` (the prefix is optional, as in the reference
    /// libraries). The error never contains the secret.
    ///
    /// ```
    /// let s = postbox_http::WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
    /// # Ok::<(), postbox_http::HttpError>(())
    /// ```
    pub fn parse(secret: &str) -> Result<Self, HttpError> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = STANDARD
            .decode(encoded.trim())
            .map_err(|_| HttpError::invalid("secret", "is not `whsec_` followed by base64"))?;
        if key.is_empty() {
            return Err(HttpError::invalid("secret", "is empty"));
        }
        Ok(Self { key })
    }

    /// A secret from raw key bytes.
    pub fn from_bytes(key: impl Into<Vec<u8>>) -> Self {
        Self { key: key.into() }
    }

    /// The `webhook-signature` header value for one delivery: `v1,<base64>`.
    ///
    /// ```
    /// use postbox_http::WebhookSecret;
    /// // the test vector of the Standard Webhooks reference libraries
    /// let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
    /// let sig = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
    /// assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    /// # Ok::<(), postbox_http::HttpError>(())
    /// ```
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        // new_from_slice only fails for fixed-size-key MACs; HMAC takes any length
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => return String::new(),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// Checks a `webhook-signature` header value (a space-separated list of
    /// `version,signature` pairs) the way a receiver does, in constant time.
    /// It does not judge `timestamp`: a receiver must also refuse one too
    /// far from its own clock (Standard Webhooks suggests five minutes), or
    /// a captured request can be replayed.
    pub fn verify(&self, id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => return false,
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        header.split(' ').any(|part| {
            let Some(sig) = part.strip_prefix("v1,") else {
                return false;
            };
            let Ok(bytes) = STANDARD.decode(sig) else {
                return false;
            };
            mac.clone().verify_slice(&bytes).is_ok()
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reference_vector() {
        let s = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = s.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(s.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, &sig));
        assert!(s.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
            &format!("v1,bm9wZQ== {sig}")
        ));
        assert!(!s.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body, &sig));
        assert!(!s.verify("other", 1614265330, body, &sig));
    }

    #[test]
    fn bad_secret_is_named_and_not_printed() {
        let err = WebhookSecret::parse("whsec_not base64!!").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("secret"), "{text}");
        assert!(!text.contains("not base64!!"), "{text}");
        assert!(WebhookSecret::parse("whsec_").is_err());
        assert_eq!(
            format!("{:?}", WebhookSecret::from_bytes(b"k".to_vec())),
            "WebhookSecret(<redacted>)"
        );
    }
}

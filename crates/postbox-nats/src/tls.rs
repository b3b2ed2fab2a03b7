//! The TLS client configuration the publisher hands to async-nats.
//!
//! Built here rather than by async-nats for two reasons: async-nats calls
//! rustls's `ClientConfig::builder()`, which panics in a program that
//! compiles both of rustls's crypto providers (the `postbox` binary does:
//! reqwest brings aws-lc-rs, the other clients ring), so postbox names its
//! provider; and async-nats reports a refused certificate only as "IO
//! error", so the verifier here remembers why it refused one, for the
//! `Transient` reasons and the log.
//!
//! Verification is the standard WebPKI one (rustls's own verifier, with
//! the platform's root certificates plus `ca_file`); it is never skipped.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use postbox_core::tls::load_roots;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// Where the verifier leaves the reason of its last refusal.
pub(crate) type Refusal = Arc<Mutex<Option<String>>>;

/// The client configuration: the platform's roots and those in `ca_file`,
/// the ring provider, and a verifier that records refusals in `refused`.
/// `need_roots`: fail when no root certificate at all could be loaded
/// (for `tls://` URLs).
pub(crate) fn client_config(
    ca_file: Option<&Path>,
    need_roots: bool,
    refused: Refusal,
) -> Result<ClientConfig, (&'static str, String)> {
    let roots = load_roots(ca_file).map_err(|e| ("ca_file", e.to_string()))?;
    if need_roots && roots.store.is_empty() {
        return Err((
            "url",
            format!(
                "is tls:// but no root certificate could be loaded from the platform ({}); set ca_file",
                roots.platform_errors
            ),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots.store), Arc::clone(&provider))
            .build()
            .map_err(|e| {
                (
                    "ca_file",
                    format!("cannot build the certificate verifier: {e}"),
                )
            })?;
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("url", format!("TLS set-up failed: {e}")))?
        // not a weaker verifier: every check is WebPKI's, this only keeps its verdict
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recording { webpki, refused }))
        .with_no_client_auth())
}

/// rustls's WebPKI verifier, remembering why it refused a certificate.
#[derive(Debug)]
struct Recording {
    webpki: Arc<WebPkiServerVerifier>,
    refused: Refusal,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                *self.refused.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(format!("TLS: server certificate refused: {e}"));
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

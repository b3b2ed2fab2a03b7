//! The TLS client configuration the publisher hands to rumqttc.
//!
//! Built here rather than by rumqttc's `tls_with_default_config`, which
//! calls rustls's `ClientConfig::builder()`: that panics in a program that
//! compiles both of rustls's crypto providers (the `postbox` binary does:
//! reqwest brings aws-lc-rs, the other clients ring), so postbox names its
//! provider. Verification is rustls's standard WebPKI one, with the
//! platform's root certificates plus `ca_file`; it is never skipped.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use rustls::{ClientConfig, RootCertStore};

/// The client configuration: the platform's roots and those in `ca_file`,
/// with the ring provider. Errors name the setting at fault.
pub(crate) fn client_config(
    ca_file: Option<&Path>,
) -> Result<ClientConfig, (&'static str, String)> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| ("ca_file", format!("cannot read {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err((
                "ca_file",
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                (
                    "ca_file",
                    format!("{} holds a certificate rustls refuses: {e}", path.display()),
                )
            })?;
        }
    }
    if roots.is_empty() {
        let why = native
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err((
            "tls",
            format!("no root certificate could be loaded from the platform ({why}); set ca_file"),
        ));
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ("tls", format!("TLS set-up failed: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

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

use postbox_core::tls::load_roots;
use rustls::ClientConfig;

/// The client configuration: the platform's roots and those in `ca_file`,
/// with the ring provider. Errors name the setting at fault.
pub(crate) fn client_config(
    ca_file: Option<&Path>,
) -> Result<ClientConfig, (&'static str, String)> {
    let roots = load_roots(ca_file).map_err(|e| ("ca_file", e.to_string()))?;
    if roots.store.is_empty() {
        return Err((
            "tls",
            format!(
                "no root certificate could be loaded from the platform ({}); set ca_file",
                roots.platform_errors
            ),
        ));
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ("tls", format!("TLS set-up failed: {e}")))?
            .with_root_certificates(roots.store)
            .with_no_client_auth(),
    )
}

//! Root certificates for the publishers' TLS clients (feature `tls`).
//!
//! The NATS and MQTT publishers build their own rustls `ClientConfig` (their
//! clients' defaults call `ClientConfig::builder()`, which panics in a
//! program that compiles both of rustls's crypto providers, as the `postbox`
//! binary does). Both trust the same roots: the platform's, plus those in
//! an optional `ca_file`. Verification itself is rustls's standard WebPKI
//! one; nothing here weakens it.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// The roots a TLS client trusts, and why the platform gave none if it did
/// not.
#[derive(Debug)]
pub struct Roots {
    /// The platform's root certificates and those of `ca_file`.
    pub store: RootCertStore,
    /// What went wrong loading the platform's roots (`; `-separated, empty
    /// when nothing did), for the error a caller raises when `store` is
    /// empty and it needs roots.
    pub platform_errors: String,
}

/// `ca_file` could not be used: the message names the file and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CaFileError(String);

/// Loads the platform's root certificates and adds those in `ca_file` (PEM).
///
/// A `ca_file` that cannot be read, holds no certificate or holds one rustls
/// refuses is an error; a platform without roots is not (see
/// [`Roots::platform_errors`]).
pub fn load_roots(ca_file: Option<&Path>) -> Result<Roots, CaFileError> {
    let mut store = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    store.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| CaFileError(format!("cannot read {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(CaFileError(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
        for cert in certs {
            store.add(cert).map_err(|e| {
                CaFileError(format!(
                    "{} holds a certificate rustls refuses: {e}",
                    path.display()
                ))
            })?;
        }
    }
    let platform_errors = native
        .errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    Ok(Roots {
        store,
        platform_errors,
    })
}

#[cfg(test)]
mod tests {
    use super::load_roots;

    #[test]
    fn a_missing_or_empty_ca_file_is_refused_with_its_name() {
        let missing = std::env::temp_dir().join("postbox-no-such-ca.pem");
        let err = load_roots(Some(&missing)).expect_err("missing file");
        assert!(err.to_string().contains("postbox-no-such-ca.pem"), "{err}");
        let empty =
            std::env::temp_dir().join(format!("postbox-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = load_roots(Some(&empty)).expect_err("no certificate");
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
        std::fs::remove_file(&empty).expect("remove");
    }
}

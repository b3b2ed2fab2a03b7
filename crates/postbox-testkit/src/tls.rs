//! TLS servers with a certificate authority generated in the test, to check
//! that a client verifies certificates: it must refuse a server whose
//! certificate no trusted root signed, and (where it can be given a CA)
//! accept it once told to trust that CA.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use postbox_testkit::tls::{TestCa, TlsListener};
//!
//! let ca = TestCa::generate(); // a fresh CA and a server certificate for 127.0.0.1 / localhost
//! let listener = TlsListener::start(&ca).await?;
//! // point a client at `amqps://{listener.addr()}`, `mqtts://…`, `https://…`: it must fail
//! // to connect; the listener saw the client abort the handshake
//! assert_eq!(listener.handshakes_completed(), 0);
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;

/// The acceptor [`TestCa::acceptor`] returns, for tests that serve a real
/// protocol over TLS.
pub use tokio_rustls::TlsAcceptor;

/// A certificate authority made up for one test, and a server certificate
/// it signed for `localhost` and `127.0.0.1`. No system trusts it.
#[derive(Clone)]
pub struct TestCa {
    ca_pem: String,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// Generates the CA and the server certificate (ECDSA P-256). The
    /// server offers ALPN `http/1.1` only.
    ///
    /// # Panics
    ///
    /// If certificate generation fails (it does not with valid constants).
    pub fn generate() -> Self {
        #[allow(clippy::expect_used)] // constant inputs; a failure is a bug in this helper
        Self::try_generate().expect("generating a test certificate authority")
    }

    fn try_generate() -> Result<Self, Box<dyn std::error::Error>> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "postbox test CA (untrusted)");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf_key = KeyPair::generate()?;
        let leaf = leaf_params.signed_by(&leaf_key, &ca)?;

        // ring explicitly: several crypto providers are compiled into the
        // workspace, so there is no process default to rely on
        let mut server = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), ca.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            ca_pem: ca.pem(),
            server: Arc::new(server),
        })
    }

    /// The CA certificate, PEM: what a client must be told to trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// An acceptor presenting the server certificate (and the CA).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.server))
    }
}

/// A TCP listener on `127.0.0.1:<random port>` that runs a TLS handshake
/// on every connection and then closes it, counting completed handshakes
/// and recording failed ones (from the server's side: a client that refused
/// the certificate shows as an alert it sent, e.g. `UnknownCA`).
///
/// Dropping it closes the listener.
#[derive(Debug)]
pub struct TlsListener {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    completed: AtomicUsize,
    failures: Mutex<Vec<String>>,
    shutdown: CancellationToken,
}

impl TlsListener {
    /// Starts the listener with `ca`'s server certificate.
    pub async fn start(ca: &TestCa) -> io::Result<Self> {
        Self::start_with_preamble(ca, Vec::new()).await
    }

    /// Like [`TlsListener::start`], but first writes `preamble` in clear
    /// text on every connection: for protocols whose server speaks before
    /// the TLS upgrade (NATS sends its `INFO` line, with `tls_required`).
    pub async fn start_with_preamble(ca: &TestCa, preamble: Vec<u8>) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let acceptor = ca.acceptor();
        let preamble: Arc<[u8]> = Arc::from(preamble);
        let s = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = s.shutdown.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut tcp, _)) = accepted else {
                    continue;
                };
                let (acceptor, preamble, s) =
                    (acceptor.clone(), Arc::clone(&preamble), Arc::clone(&s));
                tokio::spawn(async move {
                    if !preamble.is_empty() && tcp.write_all(&preamble).await.is_err() {
                        return;
                    }
                    let handshake = tokio::select! {
                        () = s.shutdown.cancelled() => return,
                        h = acceptor.accept(tcp) => h,
                    };
                    match handshake {
                        Ok(mut tls) => {
                            s.completed.fetch_add(1, Ordering::SeqCst);
                            let _ = tls.shutdown().await;
                        }
                        Err(e) => s
                            .failures
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(e.to_string()),
                    }
                });
            }
        });
        Ok(Self { addr, shared })
    }

    /// The address to point a client at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Handshakes that completed: a client that verifies certificates
    /// against the system roots never completes one here.
    pub fn handshakes_completed(&self) -> usize {
        self.shared.completed.load(Ordering::SeqCst)
    }

    /// Why handshakes failed, as the server saw it (e.g. `received fatal
    /// alert: UnknownCA`).
    pub fn handshake_failures(&self) -> Vec<String> {
        self.shared
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    fn client(roots: RootCertStore) -> TlsConnector {
        let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    #[tokio::test]
    async fn trusted_with_its_ca_refused_without() {
        let ca = TestCa::generate();
        let listener = TlsListener::start(&ca).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();

        // no roots: the client refuses the certificate
        let tcp = tokio::net::TcpStream::connect(listener.addr())
            .await
            .unwrap();
        let err = client(RootCertStore::empty())
            .connect(name.clone(), tcp)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");

        // the test CA as root: the handshake completes
        let mut roots = RootCertStore::empty();
        let der =
            tokio_rustls::rustls::pki_types::CertificateDer::from_pem_slice(ca.ca_pem().as_bytes())
                .unwrap();
        roots.add(der).unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.addr())
            .await
            .unwrap();
        client(roots).connect(name, tcp).await.unwrap();

        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while listener.handshakes_completed() == 0 || listener.handshake_failures().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "listener saw nothing"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(listener.handshakes_completed(), 1);
        let failures = listener.handshake_failures();
        assert!(failures[0].contains("alert"), "{failures:?}");
    }
}

//! TLS for the forwarder's listener (`[listen] tls_cert`/`tls_key`):
//! rustls with the ring provider, ALPN h2 and http/1.1. The pair is loaded
//! and checked against each other when the policy is compiled ([`load`]), so
//! `check` reports an unreadable file or a key of another certificate; the
//! listener serves whatever [`Certs`] holds, which a reload replaces without
//! touching the socket or the connections already open (a certbot deploy
//! hook runs `systemctl reload keyward`).

use std::{
    path::Path,
    sync::{Arc, PoisonError, RwLock},
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// Which half of the pair is wrong, so the error can point at its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Cert,
    Key,
}

/// A certificate and key that cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    pub half: Half,
    pub message: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Read the chain at `cert` and the key at `key`, and check they belong together.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let bad = |half, m: String| TlsError { half, message: m };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| bad(Half::Cert, format!("tls_cert {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(bad(Half::Cert, format!("tls_cert {}: no PEM certificate in it", cert.display())));
    }
    let der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| bad(Half::Key, format!("tls_key {}: {e}", key.display())))?;
    let signer = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| bad(Half::Key, format!("tls_key {}: {e}", key.display())))?;
    let ck = CertifiedKey::new(chain, signer);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(ck)),
        Err(e) => Err(bad(
            Half::Key,
            format!("tls_key {} does not belong to tls_cert {}: {e}", key.display(), cert.display()),
        )),
    }
}

/// The certificate the listener presents; replaced whole on reload.
#[derive(Debug)]
pub struct Certs {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certs {
    pub fn new(ck: Arc<CertifiedKey>) -> Arc<Certs> {
        Arc::new(Certs { current: RwLock::new(ck) })
    }

    /// Present `ck` from the next handshake on.
    pub fn set(&self, ck: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = ck;
    }

    /// An acceptor that asks `self` for the certificate at each handshake.
    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, rustls::Error> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pair {
        dir: std::path::PathBuf,
        der: Vec<u8>,
    }

    /// A self-signed pair for `name`, written as PEM files under a unique dir.
    fn pair(tag: &str, name: &str) -> Pair {
        let dir = std::env::temp_dir().join(format!("keyward-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        std::fs::write(dir.join("cert.pem"), c.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), c.signing_key.serialize_pem()).unwrap();
        Pair { dir, der: c.cert.der().to_vec() }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The end-entity certificate a client is shown by `acceptor`.
    async fn presented(acceptor: &tokio_rustls::TlsAcceptor) -> Vec<u8> {
        #[derive(Debug)]
        struct Any;
        impl rustls::client::danger::ServerCertVerifier for Any {
            fn verify_server_cert(
                &self,
                _: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                provider().signature_verification_algorithms.supported_schemes()
            }
        }
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Any))
            .with_no_client_auth();
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = acceptor.clone();
        let server = tokio::spawn(async move { acceptor.accept(s).await.map(|_| ()) });
        let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
        let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, c).await.unwrap();
        server.await.unwrap().unwrap();
        conn.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    #[tokio::test]
    async fn a_replaced_certificate_is_presented_from_the_next_handshake() {
        let (a, b) = (pair("a", "a.test"), pair("b", "a.test"));
        let certs = Certs::new(load(&a.dir.join("cert.pem"), &a.dir.join("key.pem")).unwrap());
        let acceptor = certs.acceptor().unwrap();
        assert_eq!(presented(&acceptor).await, a.der);
        certs.set(load(&b.dir.join("cert.pem"), &b.dir.join("key.pem")).unwrap());
        assert_eq!(presented(&acceptor).await, b.der, "the same acceptor presents the new certificate");
    }

    #[test]
    fn a_mismatched_or_unreadable_pair_says_which_half() {
        let (a, b) = (pair("m1", "a.test"), pair("m2", "b.test"));
        let e = load(&a.dir.join("cert.pem"), &b.dir.join("key.pem")).unwrap_err();
        assert_eq!(e.half, Half::Key);
        assert!(e.message.contains("does not belong to tls_cert"), "{e}");
        let e = load(&a.dir.join("missing.pem"), &a.dir.join("key.pem")).unwrap_err();
        assert_eq!(e.half, Half::Cert);
        assert!(e.message.contains("missing.pem"), "{e}");
        let e = load(&a.dir.join("key.pem"), &a.dir.join("key.pem")).unwrap_err();
        assert!(e.message.contains("no PEM certificate"), "{e}");
        let e = load(&a.dir.join("cert.pem"), &a.dir.join("cert.pem")).unwrap_err();
        assert_eq!(e.half, Half::Key);
    }
}

//! A test certificate authority (rcgen) and a relay certificate it signed
//! for `localhost` and 127.0.0.1, written as PEM files.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::TempDir;

/// A CA and a server certificate, as PEM files in a temp dir.
pub struct TestPki {
    /// The CA certificate (PEM).
    pub ca_pem: PathBuf,
    /// The CA certificate (DER).
    pub ca_der: Vec<u8>,
    /// The relay's certificate chain (PEM).
    pub cert_pem: PathBuf,
    /// The relay's private key (PEM).
    pub key_pem: PathBuf,
    pub dir: TempDir,
}

impl TestPki {
    /// A fresh CA and a certificate for `localhost` / 127.0.0.1 signed by it.
    pub fn new() -> TestPki {
        let dir = TempDir::new("pki");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "keepwire test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let key = KeyPair::generate().expect("server key");
        let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params")
            .signed_by(&key, &ca)
            .expect("server certificate");
        let pki = TestPki {
            ca_pem: dir.join("ca.pem"),
            ca_der: ca.der().to_vec(),
            cert_pem: dir.join("relay.pem"),
            key_pem: dir.join("relay.key"),
            dir,
        };
        std::fs::write(&pki.ca_pem, ca.pem()).expect("write CA");
        std::fs::write(&pki.cert_pem, cert.pem()).expect("write cert");
        std::fs::write(&pki.key_pem, key.serialize_pem()).expect("write key");
        pki
    }

    /// The relay's TLS files, for `Config::tls`.
    pub fn relay_files(&self) -> keepwire_server::TlsFiles {
        keepwire_server::TlsFiles {
            cert: self.cert_pem.clone(),
            key: self.key_pem.clone(),
        }
    }

    /// A rustls client config trusting only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))
            .expect("CA root");
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

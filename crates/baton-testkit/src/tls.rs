//! Certificates for TLS tests, generated at test time with `rcgen`: [`TestPki`].

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// A throw-away certificate authority with a server and a client certificate, as PEM files in
/// a temporary directory (removed on drop).
///
/// The server certificate is valid for `localhost`, `127.0.0.1` and `::1`; the client
/// certificate's common name is `baton-client`. Two `TestPki`s never trust each other, so
/// a second one stands for "the wrong CA" and "a client certificate nobody trusts".
///
/// # Examples
///
/// ```
/// let pki = baton_testkit::TestPki::generate();
/// assert!(std::fs::read_to_string(pki.ca_file()).unwrap().contains("BEGIN CERTIFICATE"));
/// ```
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// Generate a CA, a server certificate and a client certificate (ECDSA P-256).
    ///
    /// # Panics
    ///
    /// If the files cannot be written, or rcgen fails.
    pub fn generate() -> TestPki {
        let dir = match tempfile::Builder::new().prefix("baton-pki-").tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("cannot create a temporary directory for certificates: {e}"),
        };
        let pki = TestPki { dir };
        if let Err(e) = pki.write_all() {
            panic!("cannot generate test certificates: {e}");
        }
        pki
    }

    fn write_all(&self) -> Result<(), Box<dyn std::error::Error>> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "baton test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "baton test server");
        // etcd uses its server certificate as a client too (for its own gRPC gateway).
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_cert = server.signed_by(&server_key, &issuer)?;

        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, "baton-client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &issuer)?;

        std::fs::write(self.ca_file(), ca_cert.pem())?;
        std::fs::write(self.server_cert_file(), server_cert.pem())?;
        std::fs::write(self.server_key_file(), server_key.serialize_pem())?;
        std::fs::write(self.client_cert_file(), client_cert.pem())?;
        std::fs::write(self.client_key_file(), client_key.serialize_pem())?;
        Ok(())
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate (PEM), for `localhost`, `127.0.0.1` and `::1`.
    pub fn server_cert_file(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server's private key (PEM).
    pub fn server_key_file(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }

    /// The client certificate (PEM), common name `baton-client`.
    pub fn client_cert_file(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    /// The client's private key (PEM).
    pub fn client_key_file(&self) -> PathBuf {
        self.dir.path().join("client-key.pem")
    }
}

//! TLS settings and credentials, kept out of every `Debug` and `Display`.
//!
//! See `docs/security.md` for how to connect to etcd and Redis with TLS and authentication.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// TLS settings for `https://` (etcd) and `rediss://` (Redis) endpoints.
///
/// The server's certificate is always verified, and its name must match the host of the URL.
/// A connection that cannot be verified fails with [`Error::Tls`]; Baton never falls back
/// to plaintext.
///
/// # Default
///
/// - CA: the system's trusted roots (none added);
/// - client certificate: none (no mutual TLS).
///
/// # Examples
///
/// ```
/// let tls = baton::TlsConfig::new()
///     .with_ca_file("/etc/etcd/ca.pem")
///     .with_client_cert("/etc/etcd/client.pem", "/etc/etcd/client-key.pem");
/// assert!(tls.ca_file().is_some());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsConfig {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// The defaults: the system's roots, no client certificate.
    pub const fn new() -> Self {
        TlsConfig {
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    /// Trust the CA certificates in this PEM file (etcdctl's `--cacert`) instead of the
    /// system's roots.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Trust the system's roots again (the default).
    pub fn without_ca_file(mut self) -> Self {
        self.ca_file = None;
        self
    }

    /// Present this client certificate and its private key, both PEM files (etcdctl's
    /// `--cert` and `--key`), for servers that ask for one (mutual TLS).
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert_file = Some(cert.into());
        self.key_file = Some(key.into());
        self
    }

    /// Present no client certificate (the default).
    pub fn without_client_cert(mut self) -> Self {
        self.cert_file = None;
        self.key_file = None;
        self
    }

    /// The CA file, if set.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The client certificate file, if set.
    pub fn cert_file(&self) -> Option<&Path> {
        self.cert_file.as_deref()
    }

    /// The client key file, if set.
    pub fn key_file(&self) -> Option<&Path> {
        self.key_file.as_deref()
    }

    /// The CA file's contents, if one is set.
    #[cfg_attr(not(any(feature = "etcd", feature = "redis")), allow(dead_code))]
    pub(crate) fn read_ca(&self) -> Result<Option<Vec<u8>>> {
        self.ca_file
            .as_deref()
            .map(|p| {
                let pem = read_pem(p, "CA certificate")?;
                holds_certificate(&pem, p, "CA certificate")?;
                Ok(pem)
            })
            .transpose()
    }

    /// The client certificate and key files' contents, if set.
    ///
    /// A key that is not the certificate's gives [`Error::Tls`] about `endpoints` here,
    /// before any dial: the handshake could never succeed, and retrying cannot help.
    #[cfg_attr(not(any(feature = "etcd", feature = "redis")), allow(dead_code))]
    pub(crate) fn read_identity(&self, endpoints: &str) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let (Some(cert_file), Some(key_file)) = (&self.cert_file, &self.key_file) else {
            return Ok(None);
        };
        let cert = read_pem(cert_file, "client certificate")?;
        holds_certificate(&cert, cert_file, "client certificate")?;
        let key = read_pem(key_file, "client key")?;
        holds_private_key(&key, key_file)?;
        #[cfg(any(feature = "etcd", feature = "redis"))]
        if keys_mismatch(&cert, &key) {
            return Err(Error::Tls {
                endpoints: endpoints.to_string(),
                reason: format!(
                    "the client key {} does not match the client certificate {}: it is \
                     another certificate's key (give the certificate's own key: --key)",
                    key_file.display(),
                    cert_file.display()
                ),
            });
        }
        let _ = endpoints;
        Ok(Some((cert, key)))
    }
}

/// True if the private key in `key` is certainly not the one of the first certificate in
/// `cert` (PEM both). Anything that cannot be parsed here is left to the TLS library, which
/// reports it when it loads the files.
#[cfg(any(feature = "etcd", feature = "redis"))]
fn keys_mismatch(cert: &[u8], key: &[u8]) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Ok(chain) = CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>() else {
        return false;
    };
    let Ok(key) = PrivateKeyDer::from_pem_slice(key) else {
        return false;
    };
    if chain.is_empty() {
        return false;
    }
    let provider = rustls::crypto::ring::default_provider();
    let Ok(signing_key) = provider.key_provider.load_private_key(key) else {
        return false;
    };
    matches!(
        rustls::sign::CertifiedKey::new(chain, signing_key).keys_match(),
        Err(rustls::Error::InconsistentKeys(
            rustls::InconsistentKeys::KeyMismatch
        ))
    )
}

/// What [`speaks_tls`] found, as the start of a failed dial's reason; [`tls_problem`]
/// turns it into advice.
#[cfg(any(feature = "etcd", feature = "redis"))]
pub(crate) const TLS_REPLY: &str = "the server answered a TLS ClientHello";

/// How long [`speaks_tls`] waits for an answer, at most: a TLS server answers a ClientHello
/// within a round trip, a plaintext Redis never (it waits for the end of a line).
#[cfg(any(feature = "etcd", feature = "redis"))]
pub(crate) const TLS_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// True if a plaintext connection's failure looks like a server that hung up on what we
/// sent (a broken pipe, a reset, a stream closed), as a TLS server does when it receives
/// plaintext; not a refused connection or a server's answer.
#[cfg(any(feature = "etcd", feature = "redis"))]
pub(crate) fn looks_hung_up(text: &str) -> bool {
    let t = text.to_lowercase();
    [
        "broken pipe",
        "connection reset",
        "reset by peer",
        "stream closed",
        "connection closed",
        "unexpected eof",
        "unexpectedeof",
    ]
    .iter()
    .any(|s| t.contains(s))
}

/// True if the server at `host:port` answers a TLS ClientHello with a TLS record (a
/// handshake or an alert: first bytes 0x16 or 0x15, then 0x03), within `within`. False on
/// any failure: a plaintext server answers with something else (an HTTP/2 frame, a Redis
/// error line) or hangs up. Nothing but the hello is sent; the certificate is not looked at.
/// To tell, when a plaintext dial fails as if the server hung up, whether it speaks TLS.
#[cfg(any(feature = "etcd", feature = "redis"))]
pub(crate) async fn speaks_tls(host: &str, port: u16, within: std::time::Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An IPv6 address as a URL gives it: `[::1]`.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let probe = async {
        let hello = client_hello(host)?;
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        stream.write_all(&hello).await.ok()?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.ok()?;
        Some(matches!(head, [0x15 | 0x16, 0x03]))
    };
    matches!(tokio::time::timeout(within, probe).await, Ok(Some(true)))
}

/// The bytes of a TLS ClientHello for `host` (any name or address).
#[cfg(any(feature = "etcd", feature = "redis"))]
fn client_hello(host: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::ServerName;
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .or_else(|_| ServerName::try_from("localhost"))
        .ok()?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).ok()?;
    Some(hello)
}

/// Read a PEM file; an error names the file and what it was for, never its contents.
fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::invalid(format!(
            "cannot read the {what} file {}: {e}",
            path.display()
        ))
    })?;
    if !bytes
        .windows(b"-----BEGIN".len())
        .any(|w| w == b"-----BEGIN")
    {
        return Err(Error::invalid(format!(
            "the {what} file {} is not PEM (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// An error unless the PEM `bytes` of `path` hold a certificate: a file of another kind (a
/// key given for the CA, say) would otherwise be an empty set of trusted CAs, and every
/// handshake would fail as if the server's certificate were the problem.
fn holds_certificate(bytes: &[u8], path: &Path, what: &str) -> Result<()> {
    #[cfg(any(feature = "etcd", feature = "redis"))]
    {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut certs = CertificateDer::pem_slice_iter(bytes);
        if !matches!(certs.next(), Some(Ok(_))) {
            return Err(Error::invalid(format!(
                "the {what} file {} holds no certificate (no -----BEGIN CERTIFICATE----- \
                 block that can be read)",
                path.display()
            )));
        }
    }
    let _ = (bytes, path, what);
    Ok(())
}

/// An error unless the PEM `bytes` of `path` hold a private key (a certificate given for the
/// key, say).
fn holds_private_key(bytes: &[u8], path: &Path) -> Result<()> {
    #[cfg(any(feature = "etcd", feature = "redis"))]
    {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        if PrivateKeyDer::from_pem_slice(bytes).is_err() {
            // An encrypted key has the block, in a form the TLS library cannot read.
            let encrypted = [
                &b"-----BEGIN ENCRYPTED PRIVATE KEY-----"[..],
                b"Proc-Type: 4,ENCRYPTED",
            ]
            .iter()
            .any(|m| bytes.windows(m.len()).any(|w| w == *m));
            if encrypted {
                return Err(Error::invalid(format!(
                    "the client key file {} holds an encrypted private key, which cannot be \
                     used: give an unencrypted one (openssl pkey -in KEY -out PLAIN)",
                    path.display()
                )));
            }
            return Err(Error::invalid(format!(
                "the client key file {} holds no private key (no -----BEGIN ... PRIVATE \
                 KEY----- block that can be read)",
                path.display()
            )));
        }
    }
    let _ = (bytes, path);
    Ok(())
}

/// A user name and password for etcd or Redis. Its `Debug` shows the user only; the
/// password can be handed to the backend and to nothing else.
///
/// ```
/// let creds = baton::Credentials::new("app", "s3cret");
/// assert_eq!(creds.user(), "app");
/// assert!(!format!("{creds:?}").contains("s3cret"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub(crate) user: String,
    pub(crate) password: Secret,
}

impl Credentials {
    /// A user and its password.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            user: user.into(),
            password: Secret::new(password),
        }
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &self.password)
            .finish()
    }
}

/// A password or token: never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Default)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, to hand to the backend and nowhere else.
    #[cfg_attr(not(any(feature = "etcd", feature = "redis")), allow(dead_code))]
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg_attr(not(any(feature = "etcd", feature = "redis")), allow(dead_code))]
/// If a connection error is about TLS, what went wrong in words (with the transport's own
/// text after it). `https` tells whether we spoke TLS.
pub(crate) fn tls_problem(text: &str, https: bool) -> Option<String> {
    let (hint, _) = classify_tls(text, https)?;
    Some(format!("{hint} ({})", text.trim()))
}

#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
/// Like [`tls_problem`], but only for problems that retrying cannot fix: a certificate that
/// does not verify (untrusted CA, wrong host name, expired), a client certificate refused
/// or missing, a key or certificate that cannot be used. For a connection made again after
/// connect (a member replaced, the address now leading elsewhere), where a handshake cut
/// short or another transport failure may well pass, but these will not.
pub(crate) fn tls_rejection(text: &str) -> Option<String> {
    match classify_tls(text, true)? {
        (hint, true) => Some(format!("{hint} ({})", text.trim())),
        (_, false) => None,
    }
}

/// What a TLS problem is in words, and whether it is for good (a certificate or key that
/// will not be accepted on a retry either).
fn classify_tls(text: &str, https: bool) -> Option<(&'static str, bool)> {
    let t = text.to_lowercase().replace([' ', '_'], "");
    Some(if t.contains("answeredatlsclienthello") {
        (
            "the server uses TLS: use https:// (etcd) or rediss:// (Redis), with --cacert \
                 if its CA is not one the system trusts",
            false,
        )
    } else if t.contains("unknownissuer") || t.contains("badsignature") {
        (
            "the server's certificate is not signed by a trusted CA (give the right CA file: --cacert)",
            true,
        )
    } else if t.contains("notvalidforname") || t.contains("notvalidforcontext") {
        (
            "the server's certificate does not match the host name in the URL",
            true,
        )
    } else if t.contains("alert") && t.contains("certificateexpired") {
        // An alert is the server's word about *our* certificate.
        (
            "the server rejected the client certificate: it has expired or is not valid yet (--cert)",
            true,
        )
    } else if t.contains("expired") && t.contains("certificate") {
        (
            "the server's certificate has expired or is not valid yet",
            true,
        )
    } else if t.contains("keymismatch") || t.contains("keysmaynotbeconsistent") {
        (
            "the client key does not match the client certificate (give the certificate's own key: --key)",
            true,
        )
    } else if t.contains("certificaterequired") {
        (
            "the server requires a client certificate (--cert and --key)",
            true,
        )
    } else if t.contains("alert") && (t.contains("certificate") || t.contains("unknownca")) {
        (
            "the server rejected the client certificate, or requires one it trusts (--cert, --key)",
            true,
        )
    } else if t.contains("invalidcontenttype")
        || t.contains("corruptmessage")
        || t.contains("invalidmessage")
    {
        (
            "the server may not use TLS: then use http:// or redis:// (or check the port)",
            false,
        )
    } else if t.contains("invalidpeercertificate") || t.contains("badencoding") {
        ("the server's certificate is invalid", true)
    } else if t.contains("nocertificatesfound")
        || t.contains("errorparsingtls")
        || t.contains("privatekey")
        || t.contains("invalidcertificate")
        || (t.contains("tls") && t.contains("config"))
    {
        (
            "the CA or client certificate or key could not be loaded (check the PEM files)",
            true,
        )
    } else if t.contains("answeredaplaintextping") {
        (
            "the server speaks plaintext Redis, not TLS: use redis:// (or check the port)",
            false,
        )
    } else if t.contains("handshakeeof") {
        (
            "the server closed the connection during the TLS handshake: it may not use TLS \
             (then use http:// or redis://), or it refused us",
            false,
        )
    } else if t.contains("handshake") || t.contains("tls") {
        ("the TLS handshake failed", false)
    } else if !https && (t.contains("framewithinvalidsize") || t.contains("invalidhttpversion")) {
        (
            "the server answered something other than plaintext gRPC: if it uses TLS, use https:// or rediss://",
            false,
        )
    } else {
        return None;
    })
}

/// Check a key prefix given as a namespace: at most [`MAX_NAME_LEN`](crate::MAX_NAME_LEN)
/// bytes, no NUL.
pub(crate) fn validate_namespace(prefix: &str) -> Result<()> {
    if prefix.len() > crate::MAX_NAME_LEN || prefix.contains('\0') {
        return Err(Error::invalid(format!(
            "the namespace must be at most {} bytes with no NUL byte",
            crate::MAX_NAME_LEN
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let creds = Credentials {
            user: "alice".into(),
            password: Secret::new("hunter2"),
        };
        let shown = format!("{creds:?} {} {:?}", creds.password, creds.password);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
        assert_eq!(creds.password.expose(), "hunter2");
    }

    #[test]
    fn tls_files_are_checked() {
        let tls = TlsConfig::new().with_ca_file("/nonexistent/ca.pem");
        let err = tls.read_ca().unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        assert_eq!(TlsConfig::new().read_ca().unwrap(), None);
        assert_eq!(TlsConfig::default(), TlsConfig::new());
        let dir = tempfile_dir();
        let not_pem = dir.join("x.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let err = TlsConfig::new()
            .with_client_cert(&not_pem, &not_pem)
            .read_identity("h:1")
            .unwrap_err();
        assert!(err.to_string().contains("not PEM"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The transport's words for a client key that is not the certificate's, as etcd-client
    /// and redis report them, are a TLS problem naming the mismatch.
    #[test]
    fn a_key_mismatch_is_a_tls_problem() {
        for text in [
            "transport error: keys may not be consistent: keymismatch",
            "Unable to build client with TLS parameters provided. - InvalidClientConfig: keys \
             may not be consistent: KeyMismatch",
        ] {
            let hint = tls_problem(text, true).unwrap_or_default();
            assert!(
                hint.contains("does not match the client certificate"),
                "{text} -> {hint}"
            );
        }
    }

    /// Only problems a retry cannot fix count as rejections: a certificate that does not
    /// verify, not a handshake cut short.
    #[test]
    fn rejections_are_the_lasting_tls_problems() {
        let untrusted = "invalid peer certificate: BadSignature: transport error";
        assert!(tls_rejection(untrusted)
            .unwrap()
            .contains("not signed by a trusted CA"));
        assert!(tls_rejection("received fatal alert: CertificateRequired").is_some());
        for passing in [
            "tls handshake eof",
            "connection reset by peer",
            "transport error: broken pipe",
        ] {
            assert_eq!(tls_rejection(passing), None, "{passing}");
        }
    }

    /// A server that answered our ClientHello is named as a TLS server; the failures that
    /// make us ask are those of a server hanging up, not a refused connection.
    #[test]
    #[cfg(any(feature = "etcd", feature = "redis"))]
    fn a_tls_reply_is_named() {
        let hint = tls_problem(&format!("{TLS_REPLY} (broken pipe)"), false).unwrap();
        assert!(hint.contains("use https://"), "{hint}");
        assert!(hint.contains("rediss://"), "{hint}");
        assert_eq!(tls_rejection(&format!("{TLS_REPLY} (x)")), None);
        assert!(looks_hung_up(
            "transport error: connection error: stream closed because of a broken pipe"
        ));
        assert!(looks_hung_up("Connection reset by peer (os error 104)"));
        assert!(!looks_hung_up("Connection refused (os error 111)"));
    }

    /// An alert from the server about *our* certificate (Redis/OpenSSL
    /// sends `certificate_expired` for an expired client certificate) is not the server's
    /// certificate having expired: the hint must point at --cert, not at the server.
    #[test]
    fn an_expired_client_certificate_alert_names_the_client_certificate() {
        for text in [
            "received fatal alert: CertificateExpired",
            "transport error: connection error: received fatal alert: certificateexpired",
            "received fatal alert: CertificateRevoked",
        ] {
            let hint = tls_problem(text, true).unwrap_or_default();
            assert!(
                !hint.contains("the server's certificate") && hint.contains("client certificate"),
                "{text} -> {hint}"
            );
        }
    }

    /// A CA file that is PEM but not a certificate tonic can parse (corrupt,
    /// truncated) fails before any handshake: it is a file to fix, not "the TLS handshake
    /// failed".
    #[test]
    fn an_unparsable_ca_file_is_not_a_handshake_failure() {
        let text = "transport error: error parsing tls certificate.";
        let hint = tls_problem(text, true).unwrap_or_default();
        assert!(hint.contains("could not be loaded"), "{text} -> {hint}");
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("baton-security-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

#[cfg(test)]
#[cfg(any(feature = "etcd", feature = "redis"))]
mod pem_files {
    use super::*;

    fn pem(name: &str) -> (std::path::PathBuf, Vec<u8>) {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join("pem")
            .join(name);
        let b = std::fs::read(&p).unwrap();
        (p, b)
    }

    /// The shapes of PEM files users have are accepted: CA bundles with text before the
    /// first certificate, CRLF line endings, a key before the certificate, EC (SEC1, with
    /// parameters), PKCS#8 and PKCS#1 keys.
    #[test]
    fn real_world_pems_are_accepted() {
        for name in [
            "ca.pem",
            "bundle-text.pem",
            "bundle-crlf.pem",
            "key-then-cert.pem",
            "trusted-then-cert.pem",
        ] {
            let (p, b) = pem(name);
            let r = holds_certificate(&b, &p, "CA certificate").map_err(|e| e.to_string());
            assert!(r.is_ok(), "{name}: {r:?}");
        }
        for name in [
            "ec-sec1.pem",
            "ec-pkcs8.pem",
            "rsa-pkcs1.pem",
            "ec-with-params.pem",
            "key-then-cert.pem",
        ] {
            let (p, b) = pem(name);
            let r = holds_private_key(&b, &p).map_err(|e| e.to_string());
            assert!(r.is_ok(), "{name}: {r:?}");
        }
    }

    /// An encrypted key (PKCS#8 `ENCRYPTED PRIVATE KEY`, or OpenSSL's legacy
    /// `Proc-Type: 4,ENCRYPTED` inside `EC/RSA PRIVATE KEY`) was refused as "holds no
    /// private key (no -----BEGIN ... PRIVATE KEY----- block ...)", though the file has
    /// such a block: the message says the key is encrypted, and how to decrypt it.
    #[test]
    fn an_encrypted_key_is_named_as_encrypted() {
        for name in ["ec-encrypted.pem", "ec-legacy-encrypted.pem"] {
            let (p, b) = pem(name);
            let err = holds_private_key(&b, &p).unwrap_err().to_string();
            let said = err.replace(&p.display().to_string(), "FILE");
            assert!(said.contains("encrypted"), "{name}: {said}");
        }
    }
}

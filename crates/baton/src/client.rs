//! Connecting to a backend by URL.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::security::{validate_namespace, Credentials, Secret, TlsConfig};
use crate::store::mem::MemStore;
use crate::store::namespace::NamespaceStore;
use crate::store::Store;

/// The default dial timeout: how long [`ClientBuilder::connect`] waits for a first answer.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// The default request timeout: how long one store request may take.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle to a coordination backend. Cheap to clone; clones share the connection.
///
/// Pick the backend with a URL, so the same program runs on any of them:
///
/// | URL | backend |
/// |---|---|
/// | `mem://` or `mem://NAME` | the embedded store of this process (one per name); it keeps every change until [`compact`](crate::store::Store::compact)ed |
/// | `http://h:p[,http://h:p…]`, `etcd://h:p,h:p` | etcd (feature `etcd`) |
/// | `https://h:p[,https://h:p…]` | etcd over TLS ([`ClientBuilder::with_tls`]) |
///
/// etcd URLs may carry a user and password (`http://user:pass@h:p`); see
/// [`ClientBuilder::with_user`] and `docs/security.md`. They never appear in `Debug`
/// output, logs or errors.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// assert_eq!(client.backend(), "mem");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    store: Arc<dyn Store>,
    endpoints: String,
    namespace: String,
    hub: Arc<Hub>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("backend", &self.store.backend())
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Client {
    /// Connect with the default options. See [`ClientBuilder`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future drops the half-made connection.
    pub async fn connect(endpoints: &str) -> Result<Client> {
        ClientBuilder::new(endpoints).connect().await
    }

    /// Start configuring a connection.
    pub fn builder(endpoints: &str) -> ClientBuilder {
        ClientBuilder::new(endpoints)
    }

    /// A client on a new, private embedded store (not shared with `mem://` URLs).
    pub fn memory() -> Client {
        Client::from_store(MemStore::new())
    }

    /// A client on a store the caller keeps a handle to (tests that act on the store).
    #[cfg(test)]
    pub(crate) fn from_arc(store: Arc<dyn Store>) -> Client {
        Client {
            endpoints: store.backend().to_string(),
            store,
            namespace: String::new(),
            hub: Arc::default(),
        }
    }

    /// A client on any [`Store`].
    pub fn from_store(store: impl Store) -> Client {
        let endpoints = store.backend().to_string();
        Client {
            store: Arc::new(store),
            endpoints,
            namespace: String::new(),
            hub: Arc::default(),
        }
    }

    /// A client on the same connection that sees only the keys under `prefix`, without
    /// the prefix: every key Baton creates or reads through it is `prefix + key` in the
    /// store. Namespaces nest: the new prefix goes after this client's own.
    ///
    /// Two clients whose namespaces are not prefixes of one another never see each other's
    /// locks, elections or other keys, so teams can share one etcd; with etcd's
    /// authentication, a role granted only the prefix is enough. End a namespace with a
    /// separator (`team-a/`): `team-a` is a prefix of `team-ab`, and a client in it sees
    /// (and can delete) `team-ab`'s keys, as one sees a namespace nested in its own. Fails with [`Error::InvalidArgument`] if `prefix` is
    /// longer than [`MAX_NAME_LEN`](crate::MAX_NAME_LEN) bytes or holds a NUL byte.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> baton::Result<()> {
    /// let client = baton::Client::connect("mem://").await?;
    /// let team_a = client.with_namespace("team-a/")?;
    /// assert_eq!(team_a.namespace(), "team-a/");
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_namespace(&self, prefix: &str) -> Result<Client> {
        validate_namespace(prefix)?;
        if prefix.is_empty() {
            return Ok(self.clone());
        }
        let namespace = format!("{}{prefix}", self.namespace);
        validate_namespace(&namespace)?;
        Ok(Client {
            store: Arc::new(NamespaceStore::new(self.store.clone(), prefix.as_bytes())),
            endpoints: self.endpoints.clone(),
            namespace,
            // The shared watches are per key space.
            hub: Arc::default(),
        })
    }

    /// The key prefix this client is confined to (empty: none).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The store behind this client.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The shared prefix watches of this client.
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// What this client has done so far: keep-alives sent, waiter wake-ups, watches opened.
    pub fn stats(&self) -> crate::ClientStats {
        self.hub.counters.snapshot()
    }

    /// The backend's short name: `"mem"` or `"etcd"`.
    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    /// The endpoints this client was made for, with credentials redacted.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }
}

/// Options for [`Client`].
///
/// # Default
///
/// - dial timeout: 5 s ([`DEFAULT_DIAL_TIMEOUT`])
/// - request timeout: 10 s ([`DEFAULT_REQUEST_TIMEOUT`])
/// - TLS: only for `https://` endpoints, verified against the system's roots
///   ([`TlsConfig::new`])
/// - user: the one in the URL, if any; else none
/// - namespace: none (the whole key space)
///
/// Its `Debug` output redacts credentials.
#[derive(Clone)]
pub struct ClientBuilder {
    endpoints: String,
    dial_timeout: Duration,
    request_timeout: Duration,
    tls: Option<TlsConfig>,
    credentials: Option<Credentials>,
    password: Option<Secret>,
    namespace: String,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("endpoints", &redact(&self.endpoints))
            .field("dial_timeout", &self.dial_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("tls", &self.tls)
            .field("credentials", &self.credentials)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl ClientBuilder {
    /// Options for these endpoints, with the defaults.
    pub fn new(endpoints: &str) -> Self {
        ClientBuilder {
            endpoints: endpoints.to_string(),
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            tls: None,
            credentials: None,
            password: None,
            namespace: String::new(),
        }
    }

    /// TLS settings for `https://` endpoints: the CA to trust and an optional client
    /// certificate. `https://` endpoints without this trust the system's roots; `http://`
    /// endpoints with it are refused (never plaintext when TLS was asked for).
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Authenticate as `user` with `password` (etcd's `--user`). This replaces any
    /// credentials in the URL. The password never appears in `Debug` output, logs or
    /// errors.
    ///
    /// etcd's auth tokens expire (`--auth-token-ttl`); the client gets a new one when a
    /// request is refused for an expired token, so sessions, held locks and waiters live
    /// on across token expiry.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials {
            user: user.into(),
            password: Secret::new(password),
        });
        self
    }

    /// The password of the user named in the URL (`http://user@h:p`), when it is kept out
    /// of the URL; it replaces a password in the URL. Without a user in the URL,
    /// [`connect`](Self::connect) fails: use [`with_user`](Self::with_user) instead. Given
    /// together with `with_user` (which carries its own password), `connect` fails too. The
    /// embedded store (`mem://`) takes no password: `connect` refuses one.
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(Secret::new(password));
        self
    }

    /// Set TLS settings and credentials together (either may be `None`: keep the
    /// defaults), as [`CoordinatorBuilder`](crate::CoordinatorBuilder) hands them on.
    pub(crate) fn with_security(
        mut self,
        tls: Option<TlsConfig>,
        credentials: Option<Credentials>,
        password: Option<Secret>,
    ) -> Self {
        self.tls = tls.or(self.tls);
        self.credentials = credentials.or(self.credentials);
        self.password = password.or(self.password);
        self
    }

    /// Confine the client to the keys under `prefix` (see [`Client::with_namespace`]).
    /// The empty prefix (the default) is the whole key space.
    pub fn with_namespace(mut self, prefix: impl Into<String>) -> Self {
        self.namespace = prefix.into();
        self
    }

    /// How long to wait for the backend to answer when connecting.
    pub fn with_dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// How long one request may take before it fails with [`Error::Timeout`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Validate the endpoints and connect.
    ///
    /// Malformed URLs are rejected before any network call. An unreachable etcd gives
    /// [`Error::Connect`] within the dial timeout.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn connect(self) -> Result<Client> {
        if self.dial_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::invalid("timeouts must be greater than zero"));
        }
        // As etcd and Redis refuse them (deadlines are `now + timeout`), on every backend,
        // the embedded one too (found by a review: mem:// took `Duration::MAX`).
        if self.dial_timeout > crate::MAX_TTL || self.request_timeout > crate::MAX_TTL {
            return Err(Error::invalid(format!(
                "timeouts must be at most {:?}",
                crate::MAX_TTL
            )));
        }
        validate_namespace(&self.namespace)?;
        let parsed = Endpoints::parse(&self.endpoints)?;
        let redacted = parsed.to_string();
        let store: Arc<dyn Store> = match parsed {
            Endpoints::Mem(name) => {
                if self.tls.is_some() || self.credentials.is_some() || self.password.is_some() {
                    return Err(Error::InvalidEndpoint {
                        endpoint: redacted,
                        reason: "the embedded store (mem://) takes no TLS settings, user or \
                                 password"
                            .into(),
                    });
                }
                Arc::new(MemStore::shared(&name))
            }
            #[cfg(feature = "etcd")]
            Endpoints::Etcd {
                urls,
                user,
                password,
            } => {
                if self.tls.is_some() && urls.iter().any(|u| !u.starts_with("https://")) {
                    return Err(Error::InvalidEndpoint {
                        endpoint: redacted,
                        reason: "TLS settings (CA, client certificate) need https:// endpoints; \
                                 http:// is plaintext"
                            .into(),
                    });
                }
                let credentials = match (self.credentials, user) {
                    (Some(_), _) if self.password.is_some() => {
                        return Err(Error::invalid(
                            "both with_user and with_password are given: with_user carries \
                             the password; with_password is for a user named in the URL",
                        ))
                    }
                    (Some(explicit), _) => Some(explicit),
                    (None, Some(user)) => match self.password.or(password) {
                        Some(password) => Some(Credentials { user, password }),
                        None => {
                            return Err(Error::invalid(format!(
                                "user {user:?} is given without a password: put it in the URL \
                                 or use ClientBuilder::with_password"
                            )))
                        }
                    },
                    (None, None) if self.password.is_some() => {
                        return Err(Error::invalid(
                            "a password is given without a user name: name the user too",
                        ))
                    }
                    (None, None) => None,
                };
                Arc::new(
                    crate::store::etcd::EtcdStore::connect(
                        &urls,
                        crate::store::etcd::EtcdOptions {
                            dial_timeout: self.dial_timeout,
                            request_timeout: self.request_timeout,
                            tls: self.tls,
                            credentials,
                        },
                    )
                    .await?,
                )
            }
            #[cfg(not(feature = "etcd"))]
            Endpoints::Etcd { .. } => {
                return Err(Error::InvalidEndpoint {
                    endpoint: redacted,
                    reason: "this build of baton has no etcd support (feature \"etcd\")".into(),
                })
            }
            Endpoints::Redis(_) | Endpoints::Redlock(_) => {
                return Err(Error::InvalidEndpoint {
                    endpoint: redacted,
                    reason: "redis is not a revisioned store: baton::Client, and all that is \
                             built on it (sessions, Stm, SharedValue and the other recipes), \
                             needs etcd (http://, etcd://) or the embedded store (mem://); \
                             for locks and elections on Redis, use baton::Coordinator or \
                             baton::redis::RedisClient"
                        .into(),
                })
            }
        };
        let client = Client {
            store,
            endpoints: redacted,
            namespace: String::new(),
            hub: Arc::default(),
        };
        client.with_namespace(&self.namespace)
    }
}

/// Parsed endpoint URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoints {
    /// `mem://NAME`
    Mem(String),
    /// etcd members as `http://host:port` or `https://host:port` (one scheme for all), and
    /// the user and password from the URL, if any.
    Etcd {
        urls: Vec<String>,
        user: Option<String>,
        password: Option<Secret>,
    },
    /// `redis://[user:pass@]host:port[/db]`: one Redis server.
    Redis(RedisNode),
    /// `redlock://h1:p1,h2:p2,…`: three or more independent Redis masters.
    Redlock(Vec<RedisNode>),
}

/// One Redis server from a `redis://` or `redlock://` URL. Its `Debug` and `Display` never
/// show the credentials.
#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct RedisNode {
    /// The host name or address, without brackets for IPv6.
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) db: i64,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    /// `rediss://`: TLS.
    pub(crate) tls: bool,
}

impl fmt::Display for RedisNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.username.is_some() || self.password.is_some() {
            f.write_str("***@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{}:{}", self.host, self.port)?;
        }
        if self.db != 0 {
            write!(f, "/{}", self.db)?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisNode({self})")
    }
}

#[cfg(test)]
impl From<&str> for RedisNode {
    /// `host:port`, database 0, no credentials (tests only).
    fn from(hp: &str) -> RedisNode {
        let (host, port) = hp.rsplit_once(':').unwrap_or((hp, "0"));
        RedisNode {
            host: host.to_string(),
            port: port.parse().unwrap_or(0),
            db: 0,
            username: None,
            password: None,
            tls: false,
        }
    }
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoints::Mem(name) => write!(f, "mem://{name}"),
            Endpoints::Etcd { urls, user, .. } => {
                for (i, url) in urls.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    match url.split_once("://") {
                        Some((scheme, rest)) if i == 0 && user.is_some() => {
                            write!(f, "{scheme}://***@{rest}")?
                        }
                        _ => f.write_str(url)?,
                    }
                }
                Ok(())
            }
            Endpoints::Redis(node) if node.tls => write!(f, "rediss://{node}"),
            Endpoints::Redis(node) => write!(f, "redis://{node}"),
            Endpoints::Redlock(nodes) => {
                f.write_str("redlock://")?;
                for (i, node) in nodes.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    if node.tls {
                        f.write_str("rediss://")?;
                    }
                    write!(f, "{node}")?;
                }
                Ok(())
            }
        }
    }
}

fn bad(endpoint: &str, reason: impl Into<String>) -> Error {
    Error::InvalidEndpoint {
        endpoint: redact(endpoint),
        reason: reason.into(),
    }
}

/// Replace every `user:password@` in a URL or a comma-separated list of URLs with `***@`.
///
/// The user information of an entry runs from the entry's *first* `://` (or its start) to
/// its `@`, so a password holding `://`, `,`, `/` or `@` never shows. After an `@`, the
/// next entry starts after the first comma only if what precedes that comma looks like a
/// `host:port`; otherwise the text is taken as more of the password and hidden too. An odd
/// list may lose a host name to the redaction, never a secret.
pub(crate) fn redact(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    let mut first = true;
    while let Some(at) = rest.find('@') {
        let head = &rest[..at];
        let start = if first {
            after_scheme(head, 0)
        } else {
            match head.split_once(',') {
                Some((host, _)) if looks_like_host_port(host) => after_scheme(head, host.len() + 1),
                _ => 0,
            }
        };
        out.push_str(&head[..start]);
        out.push_str("***@");
        rest = &rest[at + 1..];
        first = false;
    }
    out.push_str(rest);
    out
}

/// Where the user information of an entry starting at `from` begins: after its first `://`,
/// or at `from` if it has none.
fn after_scheme(head: &str, from: usize) -> usize {
    head[from..].find("://").map_or(from, |i| from + i + 3)
}

/// True if `s` reads as `host:port` (a name or address, or `[IPv6]`, then a port number),
/// with an optional `/db` path: the end of one entry of a list.
fn looks_like_host_port(s: &str) -> bool {
    let s = s.split_once('/').map_or(s, |(hp, db)| {
        if db.bytes().all(|b| b.is_ascii_digit()) {
            hp
        } else {
            ""
        }
    });
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        }
    };
    host_ok && (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit())
}

/// Split `[user[:password]@]rest` into its decoded user and password (each `None` when
/// absent or empty) and the rest.
type UserInfo<'a> = (Option<String>, Option<String>, &'a str);

fn split_userinfo<'a>(endpoint: &str, entry: &'a str) -> Result<UserInfo<'a>> {
    let Some((info, rest)) = entry.rsplit_once('@') else {
        return Ok((None, None, entry));
    };
    let (user, pass) = match info.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (info, None),
    };
    let decode = |s: &str| {
        percent_decode(s).ok_or_else(|| bad(endpoint, "bad percent-encoding in the credentials"))
    };
    let user = if user.is_empty() {
        None
    } else {
        Some(decode(user)?)
    };
    let pass = match pass {
        Some(p) if !p.is_empty() => Some(decode(p)?),
        _ => None,
    };
    Ok((user, pass, rest))
}

/// The etcd members of a list, each `[user[:password]@]host:port` after `scheme://` (which
/// `etcd://` lists give only once), and the credentials, which must agree where given.
fn etcd_endpoints(input: &str, entries: &[(&str, &str)]) -> Result<Endpoints> {
    let mut urls = Vec::new();
    let mut creds: Option<(Option<String>, Option<String>)> = None;
    for (scheme, entry) in entries {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(bad(input, "empty entry in the endpoint list"));
        }
        let (user, pass, hp) = split_userinfo(input, entry)?;
        if user.is_some() || pass.is_some() {
            if user.is_none() {
                return Err(bad(
                    input,
                    "etcd needs a user name with the password (user:password@)",
                ));
            }
            match &creds {
                Some(seen) if *seen != (user.clone(), pass.clone()) => {
                    return Err(bad(
                        input,
                        "the members of one cluster are given different credentials",
                    ))
                }
                _ => creds = Some((user, pass)),
            }
        }
        let (h, p) = host_port(input, hp)?;
        urls.push(format!("{scheme}://{h}:{p}"));
    }
    let (user, password) = creds.unwrap_or_default();
    Ok(Endpoints::Etcd {
        urls,
        user,
        password: password.map(Secret::new),
    })
}

/// Check `host:port` (host may be a name, IPv4, or `[IPv6]`).
fn host_port(endpoint: &str, hp: &str) -> Result<(String, u16)> {
    if hp.contains('@') {
        return Err(bad(endpoint, "unexpected '@' in host:port"));
    }
    let hp = hp.trim_end_matches('/');
    // A backslash is a path separator to the URL parser, which would drop what follows.
    if hp.contains(['/', '?', '#', '\\']) {
        return Err(bad(endpoint, "expected host:port with no path"));
    }
    let parsed = url::Url::parse(&format!("http://{hp}"))
        .map_err(|e| bad(endpoint, format!("not a host:port ({e})")))?;
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad(endpoint, "missing host"))?
        .to_string();
    // The URL standard reads `010.0.0.1` as octal (8.0.0.1), `0x7f.1` as hex and `127.1` as
    // 127.0.0.1; etcd's Go client and most tools read them otherwise, or not at all. Only
    // the four decimal numbers, as written, are taken.
    if let Some(url::Host::Ipv4(ip)) = parsed.host() {
        let written = hp.rsplit_once(':').map_or(hp, |(h, _)| h);
        if written != ip.to_string() {
            return Err(bad(
                endpoint,
                format!(
                    "write an IPv4 address as four decimal numbers without leading zeros \
                     ({written:?} would be read as {ip})"
                ),
            ));
        }
    }
    // The parser drops http's default port: port 80, written, is a port like any other.
    let written = hp.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
    let port = parsed
        .port()
        .or(written.filter(|&p| p == 80))
        .ok_or_else(|| {
            if hp.rsplit_once(':').is_some() {
                bad(endpoint, "port must be a number from 1 to 65535")
            } else {
                bad(endpoint, "missing port (write host:port)")
            }
        })?;
    if port == 0 {
        return Err(bad(endpoint, "port must be a number from 1 to 65535"));
    }
    Ok((host, port))
}

/// Check one etcd member URL as [`EtcdStore::connect`](crate::store::etcd::EtcdStore::connect)
/// takes it: `http://` or `https://`, then `host:port` with a port from 1 to 65535, and
/// nothing else (credentials go in the options, not the URL).
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(crate) fn validate_etcd_url(url: &str) -> Result<()> {
    let Some((scheme, hp)) = url.trim().split_once("://") else {
        return Err(bad(url, "missing scheme: use http:// or https://"));
    };
    if scheme != "http" && scheme != "https" {
        return Err(bad(
            url,
            format!("unsupported scheme {scheme:?} for etcd: use http:// or https://"),
        ));
    }
    if hp.contains('@') {
        return Err(bad(
            url,
            "credentials go in EtcdOptions::credentials, not in the URL",
        ));
    }
    host_port(url, hp).map(|_| ())
}

impl Endpoints {
    /// Parse a comma-separated endpoint list. All entries must use one scheme family.
    pub(crate) fn parse(input: &str) -> Result<Endpoints> {
        let input = input.trim();
        if input.is_empty() {
            return Err(bad(input, "no endpoint given"));
        }
        let Some((scheme, rest)) = input.split_once("://") else {
            return Err(bad(
                input,
                "missing scheme: use http://, https://, etcd://, redis://, rediss://, redlock:// or mem://",
            ));
        };
        match scheme {
            "mem" => {
                let name = rest.trim_end_matches('/');
                if name.contains(['/', ',', ':', '@', '?', '#']) {
                    return Err(bad(input, "mem:// takes an optional plain name"));
                }
                Ok(Endpoints::Mem(name.to_string()))
            }
            "etcd" => {
                let entries: Vec<(&str, &str)> = rest
                    .split(',')
                    .map(|e| ("http", e.trim().strip_prefix("etcd://").unwrap_or(e.trim())))
                    .collect();
                etcd_endpoints(input, &entries)
            }
            "http" | "https" => {
                let mut entries = Vec::new();
                for u in input.split(',') {
                    let u = u.trim();
                    let Some(hp) = u.strip_prefix(scheme).and_then(|r| r.strip_prefix("://"))
                    else {
                        return Err(bad(
                            input,
                            format!("every etcd endpoint of the list must start with {scheme}://"),
                        ));
                    };
                    entries.push((scheme, hp));
                }
                etcd_endpoints(input, &entries)
            }
            "redis" | "rediss" => {
                if rest.contains(',') {
                    return Err(bad(
                        input,
                        "redis:// takes one server; use redlock://h1:p1,h2:p2,h3:p3 for several",
                    ));
                }
                let mut node = redis_node(input, rest)?;
                node.tls = scheme == "rediss";
                Ok(Endpoints::Redis(node))
            }
            "redlock" => {
                let mut nodes: Vec<RedisNode> = Vec::new();
                for entry in rest.split(',') {
                    let entry = entry.trim();
                    // Each master may use TLS (`rediss://h:p`) or not. A scheme is matched
                    // whatever its case: `REDISS://u:pw@h` read as user `REDISS` would send
                    // the password in clear to a server meant to use TLS.
                    let (tls, entry) = match entry.split_once("://") {
                        Some((s, rest)) if s.eq_ignore_ascii_case("rediss") => (true, rest),
                        Some((s, rest)) if s.eq_ignore_ascii_case("redis") => (false, rest),
                        Some((s, _))
                            if !s.is_empty()
                                && s.chars()
                                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
                        {
                            return Err(bad(
                                input,
                                format!(
                                    "unsupported scheme {s:?} for a redlock master: use redis:// \
                                     or rediss://"
                                ),
                            ));
                        }
                        _ => (false, entry),
                    };
                    if entry.is_empty() {
                        return Err(bad(input, "empty entry in the endpoint list"));
                    }
                    let mut node = redis_node(input, entry)?;
                    node.tls = tls;
                    // The same host and port; one server under two names (`localhost` and
                    // `127.0.0.1`) is found by its `run_id` when connecting (see
                    // `redis::node::Masters`).
                    if nodes
                        .iter()
                        .any(|n| n.host == node.host && n.port == node.port)
                    {
                        return Err(bad(
                            input,
                            "the same server is listed twice; redlock needs independent masters",
                        ));
                    }
                    nodes.push(node);
                }
                if nodes.len() < 3 {
                    return Err(bad(
                        input,
                        "redlock needs at least 3 independent masters (3 or 5 recommended); use redis:// for one server",
                    ));
                }
                Ok(Endpoints::Redlock(nodes))
            }
            other
                if other != other.to_ascii_lowercase()
                    && matches!(
                        other.to_ascii_lowercase().as_str(),
                        "http" | "https" | "etcd" | "redis" | "rediss" | "redlock" | "mem"
                    ) =>
            {
                Err(bad(
                input,
                format!(
                    "unsupported scheme {other:?}: schemes are lowercase ({}://)",
                    other.to_ascii_lowercase()
                ),
            ))
            }
            other => Err(bad(
                input,
                format!(
                    "unsupported scheme {other:?}: use http://, https://, etcd://, redis://, rediss://, redlock:// or mem://"
                ),
            )),
        }
    }
}

/// One `[user[:password]@]host:port[/db]` entry of a Redis URL (without the scheme).
fn redis_node(endpoint: &str, entry: &str) -> Result<RedisNode> {
    let (username, password, rest) = split_userinfo(endpoint, entry)?;
    if rest.contains(['?', '#']) {
        return Err(bad(endpoint, "redis URLs take no query or fragment"));
    }
    let (hp, db) = match rest.split_once('/') {
        Some((hp, db)) => (hp, db),
        None => (rest, ""),
    };
    let db = if db.is_empty() {
        0
    } else {
        match db.parse::<u32>() {
            Ok(n) => i64::from(n),
            Err(_) => return Err(bad(endpoint, "the path must be a database number")),
        }
    };
    let (host, port) = host_port(endpoint, hp)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&host)
        .to_string();
    Ok(RedisNode {
        host,
        port,
        db,
        username,
        password,
        tls: false,
    })
}

/// Decode `%XX` escapes; `None` if an escape is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Two hex digits exactly: `from_str_radix` alone would take `%+1` as 0x01.
            let hex = s.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd(urls: &[&str]) -> Endpoints {
        Endpoints::Etcd {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            user: None,
            password: None,
        }
    }

    /// Port 80 is accepted as written (the URL parser drops http's default port, and every
    /// `host:80` was refused as "port must be a number"), and a backslash, which the parser
    /// takes for a path separator (dropping what follows it), is refused (found by a review).
    #[test]
    fn port_80_is_a_port_and_a_backslash_is_no_separator() {
        for url in [
            "http://h:80",
            "https://etcd.example:80",
            "etcd://u:p@a:80",
            "redis://h:80",
        ] {
            assert!(
                Endpoints::parse(url).is_ok(),
                "{url}: {:?}",
                Endpoints::parse(url)
            );
        }
        assert!(validate_etcd_url("http://h:80").is_ok());
        for url in ["http://h:1\\x", "redis://h:1\\5", "http://h:1\\"] {
            assert!(
                Endpoints::parse(url).is_err(),
                "{url}: {:?}",
                Endpoints::parse(url)
            );
        }
        assert!(Endpoints::parse("http://h").is_err());
        assert!(Endpoints::parse("http://h:0").is_err());
    }

    /// IPv4 addresses the URL standard reads otherwise than they look (`010.0.0.1` is
    /// 8.0.0.1 to it), a query after a `mem://` name, and a `%` not followed by two hex
    /// digits are refused (found by the review of URL parsing).
    #[test]
    fn ambiguous_addresses_names_and_escapes_are_refused() {
        for url in [
            "http://010.0.0.1:2379",
            "http://127.1:2379",
            "http://0x7f.0.0.1:2379",
            "etcd://127.0.0.01:2379",
            "redis://0177.0.0.1:6379",
            "redlock://a:1,b:2,127.000.0.1:3",
            "http://127.0.0.1.:2379",
            "mem://x?y",
            "mem://x#y",
            "redis://u:%+1@h:1",
            "http://u:%-f@h:1",
        ] {
            let err = Endpoints::parse(url).unwrap_err();
            assert!(err.is_invalid_input(), "{url}: {err}");
        }
        let err = Endpoints::parse("http://010.0.0.1:2379").unwrap_err();
        assert!(err.to_string().contains("8.0.0.1"), "{err}");
        assert!(!err.to_string().contains("  "), "{err:?}");
        assert!(validate_etcd_url("http://010.0.0.1:2379").is_err());
        for url in [
            "http://10.0.0.1:2379",
            "http://0.0.0.0:1",
            "redis://255.255.255.255:6379",
            "http://[::1]:2379",
            "http://etcd-0.example:2379",
            "redis://u:%2B1@h:1",
        ] {
            assert!(
                Endpoints::parse(url).is_ok(),
                "{url}: {:?}",
                Endpoints::parse(url)
            );
        }
    }

    #[tokio::test]
    async fn with_user_and_with_password_together_are_refused() {
        for endpoints in ["http://127.0.0.1:1", "http://bob@127.0.0.1:1"] {
            let err = ClientBuilder::new(endpoints)
                .with_user("alice", "pw")
                .with_password("other")
                .connect()
                .await
                .unwrap_err();
            assert!(err.is_invalid_input(), "{err}");
            assert!(err.to_string().contains("with_password"), "{err}");
            assert!(!err.to_string().contains("  "), "{err:?}");
        }
    }

    #[test]
    fn parses_good_endpoints() {
        assert_eq!(
            Endpoints::parse("mem://").unwrap(),
            Endpoints::Mem(String::new())
        );
        assert_eq!(
            Endpoints::parse("mem://demo").unwrap(),
            Endpoints::Mem("demo".into())
        );
        assert_eq!(
            Endpoints::parse("http://127.0.0.1:2379").unwrap(),
            etcd(&["http://127.0.0.1:2379"])
        );
        assert_eq!(
            Endpoints::parse("http://a:1,http://b:2").unwrap(),
            etcd(&["http://a:1", "http://b:2"])
        );
        assert_eq!(
            Endpoints::parse("etcd://a:1,b:2").unwrap(),
            etcd(&["http://a:1", "http://b:2"])
        );
        assert_eq!(
            Endpoints::parse("http://[::1]:2379").unwrap(),
            etcd(&["http://[::1]:2379"])
        );
        assert_eq!(
            Endpoints::parse("redlock://a:1,b:2,c:3").unwrap(),
            Endpoints::Redlock(vec!["a:1".into(), "b:2".into(), "c:3".into()])
        );
    }

    #[test]
    fn rejects_bad_endpoints() {
        for bad in [
            "",
            "localhost:2379",
            "ftp://x:1",
            "http://",
            "http://host",
            "http://host:notaport",
            "http://host:99999",
            "http://host:0",
            "http://a:1,",
            "http://a:1,b:2",
            "etcd://a:1,,b:2",
            "http://a:1/path",
            "mem://a/b",
        ] {
            let err = Endpoints::parse(bad).unwrap_err();
            assert!(err.is_invalid_input(), "{bad:?} gave {err}");
        }
    }

    #[test]
    fn parses_redis_endpoints() {
        let Endpoints::Redis(node) = Endpoints::parse("redis://127.0.0.1:6379").unwrap() else {
            panic!("not redis")
        };
        assert_eq!(
            (node.host.as_str(), node.port, node.db),
            ("127.0.0.1", 6379, 0)
        );
        let Endpoints::Redis(node) = Endpoints::parse("redis://user:p%40ss@[::1]:7000/3").unwrap()
        else {
            panic!("not redis")
        };
        assert_eq!((node.host.as_str(), node.port, node.db), ("::1", 7000, 3));
        assert_eq!(node.username.as_deref(), Some("user"));
        assert_eq!(node.password.as_deref(), Some("p@ss"));
        let Endpoints::Redis(node) = Endpoints::parse("redis://:secret@h:1").unwrap() else {
            panic!("not redis")
        };
        assert_eq!(
            (node.username, node.password.as_deref()),
            (None, Some("secret"))
        );
        // A master's own scheme, whatever its case and the spaces before it: never read as
        // a user (which would send the password in clear to a TLS master).
        let Endpoints::Redlock(nodes) =
            Endpoints::parse("redlock:// REDISS://u:pw@a:1, Rediss://u:pw@b:2,redis://c:3")
                .unwrap()
        else {
            panic!("not redlock")
        };
        let seen: Vec<_> = nodes
            .iter()
            .map(|n| (n.tls, n.username.as_deref(), n.password.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                (true, Some("u"), Some("pw")),
                (true, Some("u"), Some("pw")),
                (false, None, None)
            ]
        );
        for bad in [
            "redlock://http://a:1,b:2,c:3",
            "redlock://x+tls://u:pw@a:1,b:2,c:3",
        ] {
            let err = Endpoints::parse(bad).unwrap_err();
            assert!(err.to_string().contains("unsupported scheme"), "{err}");
        }
        // An unknown scheme's error lists the TLS ones too; one in capitals says how to
        // write it.
        let err = Endpoints::parse("ftp://a:1").unwrap_err().to_string();
        assert!(
            err.contains("https://") && err.contains("rediss://"),
            "{err}"
        );
        let err = Endpoints::parse("HTTPS://a:1").unwrap_err().to_string();
        assert!(err.contains("schemes are lowercase (https://)"), "{err}");
        assert_eq!(
            Endpoints::parse("redlock://a:1,redis://b:2,c:3/1")
                .unwrap()
                .to_string(),
            "redlock://a:1,b:2,c:3/1"
        );
        for bad in [
            "redis://",
            "redis://h",
            "redis://h:0",
            "redis://h:1/x",
            "redis://h:1/-1",
            "redis://h:1?db=2",
            "redis://a:1,b:2",
            "redis://u:%zz@h:1",
            "redlock://a:1",
            "redlock://a:1,b:2",
            "redlock://a:1,b:2,a:1",
            // Host names are compared as the URL parser writes them: in lower case.
            "redlock://host:1,b:2,HOST:1",
            "redlock://a:1,,b:2,c:3",
        ] {
            let err = Endpoints::parse(bad).unwrap_err();
            assert!(err.is_invalid_input(), "{bad:?} gave {err}");
        }
    }

    #[test]
    fn parses_rediss_endpoints() {
        let parsed = Endpoints::parse("rediss://u:secret@h:1/2").unwrap();
        let Endpoints::Redis(node) = &parsed else {
            panic!("not redis")
        };
        assert!(node.tls);
        assert_eq!(parsed.to_string(), "rediss://***@h:1/2");
        let parsed = Endpoints::parse("redlock://rediss://:a@h:1,redis://:b@h:2,h:3").unwrap();
        let Endpoints::Redlock(nodes) = &parsed else {
            panic!("not redlock")
        };
        let tls: Vec<bool> = nodes.iter().map(|n| n.tls).collect();
        assert_eq!(tls, [true, false, false]);
        let passwords: Vec<_> = nodes.iter().map(|n| n.password.as_deref()).collect();
        assert_eq!(passwords, [Some("a"), Some("b"), None]);
        assert_eq!(parsed.to_string(), "redlock://rediss://***@h:1,***@h:2,h:3");
    }

    #[test]
    fn redacts_redis_credentials() {
        for url in [
            "redis://u:secret@h:1/2",
            "redis://:secret@h:1",
            "redlock://:secret@a:1,:secret@b:2,:secret@c:3",
        ] {
            let parsed = Endpoints::parse(url).unwrap();
            for shown in [parsed.to_string(), format!("{parsed:?}")] {
                assert!(!shown.contains("secret"), "{shown}");
                assert!(shown.contains("***@"), "{shown}");
            }
        }
        let err = Endpoints::parse("redis://u:secret@h:1/x").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        let err = Endpoints::parse("redlock://:secret@a:1,:secret@b:2").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact("http://u:secret@h:1"), "http://***@h:1");
        assert_eq!(
            redact("http://u:secret@a:1,http://u:secret@b:2"),
            "http://***@a:1,http://***@b:2"
        );
        assert_eq!(redact("http://a:1,http://b:2"), "http://a:1,http://b:2");
        // Passwords holding separators never leak, at worst a host name is hidden too.
        for url in [
            "http://u:se,cret@h:1",
            "http://u:se/cret@h:1",
            "http://u:se@cret@h:1",
            "etcd://u:secret@a:1,u:secret@b:2",
            "u:secret@h:1",
        ] {
            let shown = redact(url);
            assert!(
                !shown.contains("secret") && !shown.contains("cret"),
                "{url} -> {shown}"
            );
        }
        let err = Endpoints::parse("http://u:secret@h:1/x").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    /// A password holding `://` is hidden whole: the user information runs from the
    /// entry's first `://`, not its last.
    #[tokio::test]
    async fn redacts_passwords_holding_a_scheme_separator() {
        for url in [
            "http://alice:hunter2://xyz@h:1",
            "http://alice:hunter2://xyz@h:1,http://alice:hunter2://xyz@g:2",
            "http://a:1,http://alice:hunter2://xyz@h:1",
            "etcd://alice:hunter2://xyz@h:1,g:2",
            "redis://alice:hunter2://xyz@h:1",
            "rediss://:hunter2://xyz@h:1/2",
            "redlock://:hunter2://x@a:1,redis://:hunter2://x@b:2,rediss://:hunter2://x@c:3",
        ] {
            let shown = [
                redact(url),
                format!("{:?}", ClientBuilder::new(url)),
                format!("{:?}", crate::Coordinator::builder(url)),
                #[cfg(feature = "redis")]
                format!("{:?}", crate::redis::RedisClient::builder(url)),
                Endpoints::parse(url).map_or_else(|e| e.to_string(), |e| e.to_string()),
            ];
            for shown in shown {
                assert!(
                    !shown.contains("hunter2") && !shown.contains("xyz"),
                    "{url} -> {shown}"
                );
            }
        }
        assert_eq!(redact("http://alice:hunter2://xyz@h:1"), "http://***@h:1");
        assert_eq!(
            redact("http://u:p@a:1,http://u:p://q@b:2"),
            "http://***@a:1,http://***@b:2"
        );
        // Before the first `@`, a `host:port,` cannot be told from a password holding a
        // comma: the host is hidden too.
        assert_eq!(redact("http://a:1,http://u:p://q@b:2"), "http://***@b:2");
        for url in [
            "http://alice:hunter2://xyz@h:0",
            "http://alice:hunter2://xyz@h:1/path",
            "http://alice:hunter2://xyz@h:1,ftp://g:2",
            "redis://alice:hunter2://xyz@h:1/x",
        ] {
            let err = Client::connect(url).await.unwrap_err();
            assert!(err.is_invalid_input(), "{url}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{url}: {err}");
            let err = crate::Coordinator::connect(url).await.unwrap_err();
            assert!(!err.to_string().contains("hunter2"), "{url}: {err}");
        }
    }

    #[test]
    fn parses_etcd_tls_and_credentials() {
        assert_eq!(
            Endpoints::parse("https://a:1,https://b:2").unwrap(),
            etcd(&["https://a:1", "https://b:2"])
        );
        let Endpoints::Etcd {
            urls,
            user,
            password,
        } = Endpoints::parse("http://alice:p%40ss@a:1,http://b:2").unwrap()
        else {
            panic!("not etcd")
        };
        assert_eq!(urls, ["http://a:1", "http://b:2"]);
        assert_eq!(user.as_deref(), Some("alice"));
        assert_eq!(password.as_ref().map(Secret::expose), Some("p@ss"));
        let parsed = Endpoints::parse("etcd://alice:secret@a:1,b:2").unwrap();
        for shown in [parsed.to_string(), format!("{parsed:?}")] {
            assert!(!shown.contains("secret"), "{shown}");
        }
        assert_eq!(parsed.to_string(), "http://***@a:1,http://b:2");
        let Endpoints::Etcd { user, password, .. } = Endpoints::parse("http://alice@a:1").unwrap()
        else {
            panic!("not etcd")
        };
        assert_eq!((user.as_deref(), password), (Some("alice"), None));
        for bad in [
            "http://a:1,https://b:2",
            "https://a:1,http://b:2",
            "https://",
            "http://:secret@a:1",
            "http://u:secret@a:1,http://u:other@b:2",
        ] {
            let err = Endpoints::parse(bad).unwrap_err();
            assert!(err.is_invalid_input(), "{bad:?} gave {err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[tokio::test]
    async fn builder_debug_hides_credentials() {
        let builder = ClientBuilder::new("http://u:secret@h:1").with_user("bob", "hunter2");
        let shown = format!("{builder:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(shown.contains("bob"), "{shown}");
        let err = ClientBuilder::new("mem://")
            .with_user("bob", "hunter2")
            .connect()
            .await
            .unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        let shown = format!(
            "{:?}",
            ClientBuilder::new("mem://").with_password("hunter2")
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    /// The embedded store takes no password, as it takes no user or TLS settings: one given
    /// is refused, never silently ignored.
    #[tokio::test]
    async fn mem_refuses_a_password() {
        let err = ClientBuilder::new("mem://")
            .with_password("hunter2")
            .connect()
            .await
            .unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        assert!(err.to_string().contains("password"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = crate::Coordinator::builder("mem://")
            .with_password("hunter2")
            .connect()
            .await
            .unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
    }

    /// What an etcd endpoint's credentials and TLS settings are checked for.
    #[cfg(feature = "etcd")]
    #[tokio::test]
    async fn etcd_credentials_and_tls_get_clear_errors() {
        let err = ClientBuilder::new("http://127.0.0.1:1")
            .with_tls(TlsConfig::new())
            .connect()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
        let err = ClientBuilder::new("http://alice@127.0.0.1:1")
            .connect()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("without a password"), "{err}");
        let err = ClientBuilder::new("http://127.0.0.1:1")
            .with_password("hunter2")
            .connect()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("without a user"), "{err}");
    }

    #[tokio::test]
    async fn namespaces_confine_keys() {
        use crate::store::Range;
        let client = ClientBuilder::new("mem://ns-test")
            .with_namespace("a/")
            .connect()
            .await
            .unwrap();
        assert_eq!(client.namespace(), "a/");
        let nested = client.with_namespace("b/").unwrap();
        assert_eq!(nested.namespace(), "a/b/");
        nested.store().put(b"k", b"", 0).await.unwrap();
        let raw = Client::connect("mem://ns-test").await.unwrap();
        let all = raw.store().range(Range::prefix("")).await.unwrap();
        assert_eq!(all.kvs[0].key, b"a/b/k");
        assert!(client.with_namespace("x\0").is_err());
    }

    /// A scheme in capitals that is not a supported one in lowercase either (`Ftp://`) is
    /// not told "schemes are lowercase (ftp://)", which points at `ftp://`, refused too: it
    /// gets the list of supported schemes.
    #[test]
    fn an_unknown_scheme_in_capitals_is_not_told_to_lowercase() {
        for input in ["Ftp://a:1", "HTTPX://a:1", "Unix://a:1"] {
            let err = Endpoints::parse(input).unwrap_err().to_string();
            assert!(
                !err.contains("schemes are lowercase") && err.contains("https://"),
                "{input} -> {err}"
            );
        }
        // Still right for a supported scheme in capitals.
        let err = Endpoints::parse("Redis://a:1").unwrap_err().to_string();
        assert!(err.contains("(redis://)"), "{err}");
    }
}

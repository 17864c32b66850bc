//! One Redis server: its connection, and the Lua scripts run on it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex as StdMutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, RedisConnectionInfo, Script};
use tokio::time::Instant;

use crate::client::RedisNode;
use crate::error::{Error, Result};
use crate::security::{
    looks_hung_up, speaks_tls, tls_problem, TlsConfig, TLS_PROBE_TIMEOUT, TLS_REPLY,
};

static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/acquire.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/release.lua")));
static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/extend.lua")));
static PROCLAIM: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/proclaim.lua")));
static LEADER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/leader.lua")));
static ENQUEUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/enqueue.lua")));
static HANDOFF: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/handoff.lua")));
static INSPECT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/inspect.lua")));

/// After a failed dial, calls fail at once for this long instead of dialling again, so an
/// unreachable Redlock minority does not slow every acquisition down.
const REDIAL_BACKOFF: Duration = Duration::from_millis(500);

/// How long a `rediss://` dial waits for the TLS handshake before it also asks, over a
/// second, plaintext connection, whether the server speaks plaintext Redis (see
/// [`speaks_plaintext_redis`]): a plaintext Redis answers a ClientHello with nothing, so
/// without the question the dial would wait for its whole timeout.
const PLAINTEXT_PROBE_AFTER: Duration = Duration::from_millis(200);

/// What [`speaks_plaintext_redis`] found, as a failed dial's reason; [`tls_problem`] turns it
/// into advice.
const PLAINTEXT_REPLY: &str = "the server answered a plaintext PING";

/// True if the server at `host:port` answers a plaintext `PING` as Redis does: a status or
/// error line (`+PONG`, `-NOAUTH …`, `-DENIED …`). A TLS server answers with an alert record
/// (whose first byte is never `+` or `-`) or closes the connection. False on any failure.
///
/// The probe starts with a TLS record's first byte (0x16, a handshake): a plaintext Redis
/// answers it with an error line (`-ERR unknown command`), while a server that serves TLS
/// and plaintext on one port (ElastiCache's "preferred" encryption, protocol-sniffing
/// proxies) takes it for TLS and never answers `+` or `-`, so a slow but working TLS
/// server is not taken for a plaintext one.
async fn speaks_plaintext_redis(host: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect((host, port)).await else {
        return false;
    };
    if stream.write_all(b"\x16\r\nPING\r\n").await.is_err() {
        return false;
    }
    let mut first = [0u8; 1];
    matches!(stream.read(&mut first).await, Ok(1) if matches!(first[0], b'+' | b'-'))
}

/// True for a failure that reconnecting (or waiting a moment) can cure: the connection was
/// lost, refused or timed out, or the server is loading its data, has no master, or is busy
/// running another client's slow script (`-BUSY`: the command was not run).
fn is_transient_redis(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.code() == Some("BUSY")
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
            )
        )
}

/// True if a node's call failed in a way that trying again later can cure: no connection
/// ([`Error::Connect`]), no answer in time ([`Error::Timeout`]), or a lost connection, a
/// server still loading its data or busy with another client's slow script
/// ([`Error::Unavailable`]). Never for refused credentials or permissions, nor for a
/// script's error (a key of the wrong type, say).
pub(crate) fn is_transient(e: &Error) -> bool {
    matches!(
        e,
        Error::Connect { .. } | Error::Timeout { .. } | Error::Unavailable(_)
    )
}

/// What the error of a Redlock master refused as another under a second name says first
/// (see [`Node::duplicate_error`], [`is_refused_duplicate`]).
const NOT_USED: &str = "not used, as the same server as another master: ";

/// True for the error of a call to a Redlock master refused as another under a second name:
/// transient (see [`is_transient`]), but a poor reason to give for a failure when another
/// master's error says more (which masters are down).
pub(crate) fn is_refused_duplicate(e: &Error) -> bool {
    matches!(e, Error::Unavailable(m) if m.contains(NOT_USED))
}

/// The prefixes of the keys Baton keeps beside each lock key (see [`Keys`]): no lock key
/// may start with one.
const RESERVED: [&str; 5] = [
    "baton:fence:",
    "baton:leader:",
    "baton:queue:",
    "baton:waiter:",
    "baton:released:",
];

/// The keys and channel one lock (or election) uses.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    /// The lock key: the user's prefix plus the name, as redsync and redis-py use it.
    pub(crate) lock: String,
    /// The fencing counter: `baton:fence:<lock key>`.
    pub(crate) fence: String,
    /// The election record: `baton:leader:<lock key>`.
    pub(crate) record: String,
    /// The wake-up channel: `baton:wake:<lock key>`.
    pub(crate) channel: String,
    /// The FIFO queue of waiters' tokens, when waiters queue (see `enqueue.lua`):
    /// `baton:queue:<lock key>`.
    pub(crate) queue: String,
    /// The prefix of each waiter's key (the prefix plus its token): `baton:waiter:<lock key>:`.
    pub(crate) waiter: String,
    /// The prefix of each release's marker (the prefix plus the released token, see
    /// `release.lua`): `baton:released:<lock key>:`.
    pub(crate) released: String,
    /// True when waiters queue and releases hand the lock to the oldest live one (plain
    /// locks on one server); else every release frees the key and wakes every waiter.
    pub(crate) fifo: bool,
}

impl Keys {
    /// The keys of `name` under `prefix`, refusing a lock key that is one of Baton's own
    /// for another lock (`baton:fence:…`, `baton:leader:…`, `baton:queue:…`,
    /// `baton:waiter:…`, `baton:released:…`): the lock `baton:fence:X` would never be free
    /// while `X` has a fencing counter.
    pub(crate) fn checked(prefix: &str, name: &str) -> Result<Keys> {
        let keys = Keys::new(prefix, name);
        if let Some(space) = RESERVED.iter().find(|r| keys.lock.starts_with(*r)) {
            return Err(Error::invalid(format!(
                "the Redis key {:?} (prefix and name) starts with {space:?}, where Baton keeps \
                 its own keys for other locks: choose another name or prefix",
                keys.lock
            )));
        }
        Ok(keys)
    }

    pub(crate) fn new(prefix: &str, name: &str) -> Keys {
        let lock = format!("{prefix}{name}");
        Keys {
            fence: format!("baton:fence:{lock}"),
            record: format!("baton:leader:{lock}"),
            channel: format!("baton:wake:{lock}"),
            queue: format!("baton:queue:{lock}"),
            waiter: format!("baton:waiter:{lock}:"),
            released: format!("baton:released:{lock}:"),
            lock,
            fifo: false,
        }
    }

    /// The same keys, with FIFO waiters and hand-off releases.
    pub(crate) fn fifo(mut self) -> Keys {
        self.fifo = true;
        self
    }

    /// The same keys, without.
    pub(crate) fn without_fifo(mut self) -> Keys {
        self.fifo = false;
        self
    }
}

/// What one node answered to a FIFO acquire (`enqueue.lua`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NodeEnqueue {
    /// Taken now; the fencing token.
    Taken(i64),
    /// A release handed the lock to us; the fencing token, and the ms between our last
    /// refresh and the hand-off (see `handoff.lua`).
    Granted { fence: i64, since_ms: u64 },
    /// Held, or others are ahead: queued (unless `try_only`). `pttl`: the holder's key
    /// expires in this many ms (negative: no holder, or no expiry). `fence`: the fencing
    /// counter when the script ran; a hand-off to us with a token no higher is stale.
    Waiting { pttl: i64, fence: i64 },
}

/// What one node answered to a release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NodeRelease {
    /// Not ours (expired, or another owner's): nothing deleted.
    NotOurs,
    /// Ours, and now free.
    Freed,
    /// Ours, and now the next waiter's: the wake-up message sent to it.
    HandedOff(Vec<u8>),
}

/// What one node answered to an acquire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NodeAcquire {
    /// Taken; the fencing counter's new value (0 if not bumped).
    Taken(i64),
    /// Held by someone else; the holder's key expires in this many ms (negative: no expiry).
    Held(i64),
}

/// What one node answered to an extend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NodeExtend {
    Extended,
    Foreign,
    Gone,
    /// A leader's election record is gone or another's.
    RecordGone,
}

/// A script's reply part as a number (0 if absent or not a number).
fn num(part: Option<&Vec<u8>>) -> i64 {
    part.and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// One key as one node has it, for `status`.
#[derive(Clone, Debug)]
pub(crate) struct Inspected {
    /// The holder's token.
    pub(crate) value: Vec<u8>,
    /// The time left, in ms.
    pub(crate) pttl_ms: i64,
    /// The fencing counter (0 if none).
    pub(crate) fence: i64,
    /// True if the holder wrote an election record.
    pub(crate) election: bool,
    /// How many live FIFO waiters queue for the key.
    pub(crate) waiters: usize,
}

/// A leader record as one node has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeRecord {
    pub(crate) token: Vec<u8>,
    pub(crate) fence: i64,
    pub(crate) ver: i64,
    pub(crate) value: Vec<u8>,
}

/// One live connection to a node, numbered so that a copy taken before it was replaced is
/// told from the current one.
#[derive(Clone)]
pub(crate) struct Conn {
    id: u64,
    pub(crate) conn: MultiplexedConnection,
}

impl Conn {
    fn new(conn: MultiplexedConnection) -> Conn {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Conn {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            conn,
        }
    }
}

/// A master's claim on a `run_id`: the connection on which its server reported it.
#[derive(Clone)]
struct Claim {
    run_id: String,
    /// The connection's number (see [`Conn`]).
    conn_id: u64,
    /// The connection, to ask whether it is still up; `None` in unit tests (counts as up).
    conn: Option<MultiplexedConnection>,
}

/// The `run_id` each Redlock master's live connection reported, to tell one server listed
/// under two names (`127.0.0.1:6379` and `localhost:6379`, which the URL's check of hosts
/// and ports cannot) from two masters: counted twice, one server would stand for two of
/// the quorum.
///
/// Every connection a master makes (the first, and each after a lost one: a [`Node`]
/// reconnects only through its own dial) claims the `run_id` its server reports on it. A
/// claim is the connection's: it is forgotten when the connection is found lost, so a
/// master whose server restarted (a new `run_id`) claims the new one when it reconnects,
/// and is refused if another name claimed that server meanwhile.
pub(crate) struct Masters {
    /// Each master's name (`host:port[/db]`, credentials redacted), in the URL's order.
    names: Vec<String>,
    /// Each master's claim, while its connection is up (as far as we know).
    claims: StdMutex<Vec<Option<Claim>>>,
    /// One claim at a time: a claim may ask another master's connection whether it is up.
    gate: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Masters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masters")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Masters {
    pub(crate) fn new(names: Vec<String>) -> Masters {
        let claims = StdMutex::new(vec![None; names.len()]);
        Masters {
            names,
            claims,
            gate: tokio::sync::Mutex::new(()),
        }
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, Vec<Option<Claim>>> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claim `run_id` for master `i`'s connection `conn_id`, unless another master's
    /// connection has it and is still up: then why master `i` must not be used (naming
    /// both, in the URL's order), and nothing is recorded. Another master's claim whose
    /// connection turns out lost is forgotten (that master claims again when it
    /// reconnects); one that does not answer within `probe` still counts (its server is
    /// this one, which answered us: a connection to it that hangs may come back).
    async fn claim(
        &self,
        i: usize,
        run_id: &str,
        conn_id: u64,
        conn: Option<MultiplexedConnection>,
        probe: Duration,
    ) -> Option<String> {
        let _gate = self.gate.lock().await;
        loop {
            let held = self
                .claims()
                .iter()
                .enumerate()
                .find(|(j, c)| *j != i && c.as_ref().is_some_and(|c| c.run_id == run_id))
                .and_then(|(j, c)| c.clone().map(|c| (j, c)));
            let Some((j, held)) = held else {
                break;
            };
            if still_up(held.conn, probe).await {
                let (first, second) = (&self.names[i.min(j)], &self.names[i.max(j)]);
                return Some(format!(
                    "{first} and {second} are one server (the same run_id {run_id}): the same \
                     server is listed twice; redlock needs independent masters"
                ));
            }
            tracing::debug!(master = %self.names[j], "the connection on which this master's run_id was read is lost: it claims its server again when it reconnects");
            self.forget(j, held.conn_id);
        }
        self.claims()[i] = Some(Claim {
            run_id: run_id.to_string(),
            conn_id,
            conn,
        });
        None
    }

    /// Forget master `i`'s claim made on connection `conn_id` (lost), if it is still that
    /// connection's.
    fn forget(&self, i: usize, conn_id: u64) {
        let mut claims = self.claims();
        if claims[i].as_ref().is_some_and(|c| c.conn_id == conn_id) {
            claims[i] = None;
        }
    }
}

/// True unless `conn` is known lost: a `PING` on it fails with a lost connection. One that
/// does not answer within `probe` counts as up (`None`, in unit tests, too).
async fn still_up(conn: Option<MultiplexedConnection>, probe: Duration) -> bool {
    let Some(mut conn) = conn else {
        return true;
    };
    let ping = redis::cmd("PING");
    !matches!(
        tokio::time::timeout(probe, ping.query_async::<()>(&mut conn)).await,
        // A slow answer (a response timeout is an I/O error too) is no lost connection:
        // forgetting the claim would let another name of the same server claim it.
        Ok(Err(e)) if !e.is_timeout() && (e.is_unrecoverable_error() || e.is_io_error())
    )
}

/// The `run_id` in an `INFO server` reply, if there is one.
fn run_id(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("run_id:"))
        .map(str::trim)
        .filter(|id| !id.is_empty())
}

/// One Redis server, connected lazily and re-connected by the connection manager.
pub(crate) struct Node {
    /// For messages: `host:port[/db]`, credentials redacted.
    pub(crate) display: String,
    pub(crate) client: redis::Client,
    /// The connection, if there is one (up as far as we know). A lost one is dropped, and
    /// the next call dials again: never behind our back (a Redlock master's new connection
    /// must read its server's `run_id`, see [`Masters`]).
    conn: StdMutex<Option<Conn>>,
    dial_gate: tokio::sync::Mutex<()>,
    last_failure: StdMutex<Option<(Instant, String)>>,
    pub(crate) dial_timeout: Duration,
    pub(crate) request_timeout: Duration,
    /// `rediss://`.
    tls: bool,
    /// The host and port, for the plaintext probe of a slow TLS handshake.
    host: String,
    port: u16,
    /// A Redlock master: every master's `run_id`, and this one's index among them.
    masters: Option<(std::sync::Arc<Masters>, usize)>,
    /// Set once this master turned out to be another master under a second name: why.
    /// Every call then fails with it, without dialling.
    duplicate: StdMutex<Option<String>>,
}

impl fmt::Debug for Node {
    // Never show `client`: its connection info holds the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("addr", &self.display)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node for `node`; `tls` holds the CA and client certificate for `rediss://` nodes
    /// (without it, `rediss://` trusts the system's roots).
    pub(crate) fn new(
        node: &RedisNode,
        dial_timeout: Duration,
        request_timeout: Duration,
        tls: Option<&TlsConfig>,
    ) -> Result<Node> {
        let scheme = if node.tls { "rediss" } else { "redis" };
        let invalid = |reason: String| Error::InvalidEndpoint {
            endpoint: format!("{scheme}://{node}"),
            reason,
        };
        let addr = if node.tls {
            ConnectionAddr::TcpTls {
                host: node.host.clone(),
                port: node.port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(node.host.clone(), node.port)
        };
        let mut settings = RedisConnectionInfo::default().set_db(node.db);
        if let Some(user) = &node.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &node.password {
            settings = settings.set_password(password);
        }
        let info = redis::IntoConnectionInfo::into_connection_info(addr)
            .map_err(|e| invalid(e.to_string()))?
            .set_redis_settings(settings);
        let client = match tls {
            Some(tls) if node.tls => {
                let root_cert = tls.read_ca()?;
                let client_tls =
                    tls.read_identity(&node.to_string())?
                        .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                            client_cert,
                            client_key,
                        });
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls,
                        root_cert,
                    },
                )
            }
            _ => redis::Client::open(info),
        }
        .map_err(|e| match tls.filter(|_| node.tls) {
            // The files read, but the TLS library could not use them: say which.
            Some(tls) => invalid(format!(
                "{e} (check the PEM files: CA {}, client certificate {}, key {})",
                tls.ca_file()
                    .map_or("none".into(), |p| p.display().to_string()),
                tls.cert_file()
                    .map_or("none".into(), |p| p.display().to_string()),
                tls.key_file()
                    .map_or("none".into(), |p| p.display().to_string()),
            )),
            None => invalid(e.to_string()),
        })?;
        Ok(Node {
            display: node.to_string(),
            client,
            conn: StdMutex::new(None),
            dial_gate: tokio::sync::Mutex::new(()),
            last_failure: StdMutex::new(None),
            dial_timeout,
            request_timeout,
            tls: node.tls,
            host: node.host.clone(),
            port: node.port,
            masters: None,
            duplicate: StdMutex::new(None),
        })
    }

    /// The same node as master `index` of `masters`: each dial (the first, and each after a
    /// lost connection) reads the server's `run_id` (`INFO server`) and refuses a server
    /// another master already is.
    pub(crate) fn in_redlock(mut self, masters: std::sync::Arc<Masters>, index: usize) -> Node {
        self.masters = Some((masters, index));
        self
    }

    /// If this master is another under a second name: why, naming both.
    pub(crate) fn duplicate_reason(&self) -> Option<String> {
        self.duplicate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// If this master is another under a second name: the error of each call, naming both.
    ///
    /// [`Error::Unavailable`], transient as a master that is down: the refused name counts
    /// as a failed master (the server behind it counts once, under its other name), so a
    /// waiter waits for the masters that are down to come back rather than failing at once
    /// as for a configuration error. The refusal is logged once, as an error, when found
    /// (and fails `connect()` with [`Error::InvalidEndpoint`] if found then).
    fn duplicate_error(&self) -> Option<Error> {
        Some(self.refused_as(&self.duplicate_reason()?))
    }

    /// The error of a call to this master, refused as another under a second name
    /// (`reason`).
    pub(crate) fn refused_as(&self, reason: &str) -> Error {
        Error::Unavailable(format!("redis {}: {NOT_USED}{reason}", self.display))
    }

    /// The server's `run_id` (`INFO server`), if this is a Redlock master and the server
    /// tells it: `None` if the server answers with an error (a user whose ACL refuses
    /// `INFO`, a missing password: the `PING` after it says which) or with no `run_id`. A
    /// lost connection is the error, as a `PING`'s would be.
    async fn read_run_id(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> redis::RedisResult<Option<String>> {
        if self.masters.is_none() {
            return Ok(None);
        }
        let mut info = redis::cmd("INFO");
        info.arg("server");
        match info.query_async::<String>(conn).await {
            Ok(info) => {
                let id = run_id(&info).map(str::to_string);
                if id.is_none() {
                    tracing::debug!(node = %self.display, "INFO server has no run_id: whether two masters are one server is checked by their host and port only");
                }
                Ok(id)
            }
            Err(e)
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout() =>
            {
                Err(e)
            }
            Err(e) => {
                tracing::debug!(node = %self.display, error = %e, "cannot read the server's run_id (INFO refused): whether two masters are one server is checked by their host and port only");
                Ok(None)
            }
        }
    }

    fn cached(&self) -> Option<Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Drop connection `id`, found lost (if it is still the current one): the next call
    /// dials again. A Redlock master's claim on its server's `run_id` goes with it.
    fn lost(&self, id: u64) {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if conn.as_ref().is_some_and(|c| c.id == id) {
            *conn = None;
            tracing::debug!(node = %self.display, "connection lost; the next call dials again");
        }
        drop(conn);
        if let Some((masters, i)) = &self.masters {
            masters.forget(*i, id);
        }
    }

    /// The connection, dialling (within the dial timeout) if there is none.
    pub(crate) async fn conn(&self) -> Result<Conn> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        if let Some(e) = self.duplicate_error() {
            return Err(e);
        }
        let _gate = self.dial_gate.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        if let Some((when, reason)) = self
            .last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            if when.elapsed() < REDIAL_BACKOFF {
                return Err(self
                    .access_error_text(&reason)
                    .unwrap_or_else(|| self.connect_error(reason)));
            }
        }
        self.dial().await
    }

    /// Dial now (the caller holds the gate, or is `connect`).
    async fn dial(&self) -> Result<Conn> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.dial_timeout))
            .set_response_timeout(Some(self.request_timeout));
        let dialled = tokio::time::timeout(
            self.dial_timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        );
        let dialled = if self.tls {
            // A plaintext Redis never answers the ClientHello (unless its random bytes
            // hold a newline): if the handshake is slow, ask in plaintext whether that is
            // what listens, and if so fail now with a TLS error rather than at the timeout.
            let probe = async {
                tokio::time::sleep(PLAINTEXT_PROBE_AFTER).await;
                if !speaks_plaintext_redis(&self.host, self.port).await {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                biased;
                dialled = dialled => dialled,
                () = probe => {
                    tracing::debug!(node = %self.display, "the server speaks plaintext Redis");
                    *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), PLAINTEXT_REPLY.to_string()));
                    return Err(self
                        .access_error_text(PLAINTEXT_REPLY)
                        .unwrap_or_else(|| self.connect_error(PLAINTEXT_REPLY.to_string())));
                }
            }
        } else {
            dialled.await
        };
        // A server that wants a password accepts the connection and refuses only the first
        // command: ask one so that refused credentials show now, as what they are. A
        // Redlock master is asked its `run_id` (`INFO server`); if it does not tell it (the
        // user's ACL refuses INFO, or the password), PING.
        let mut run_id = None;
        let dialled = match dialled {
            Ok(Ok(mut conn)) => {
                let greet = async {
                    run_id = self.read_run_id(&mut conn).await?;
                    if run_id.is_some() {
                        return Ok(());
                    }
                    redis::cmd("PING").query_async::<()>(&mut conn).await
                };
                match tokio::time::timeout(self.dial_timeout, greet).await {
                    Ok(Ok(())) => Ok(Ok(conn)),
                    Ok(Err(e)) => Ok(Err(e)),
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        let dialled = dialled.map(|r| r.map(Conn::new));
        if let (Ok(Ok(conn)), Some(id), Some((masters, i))) = (&dialled, &run_id, &self.masters) {
            let claimed =
                masters.claim(*i, id, conn.id, Some(conn.conn.clone()), self.dial_timeout);
            if let Some(reason) = claimed.await {
                tracing::error!(node = %self.display, %reason, "a Redlock master is another one listed under a second name: it is not used, and counts as a failed master");
                *self.duplicate.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                return Err(self
                    .duplicate_error()
                    .unwrap_or_else(|| self.connect_error("listed twice".into())));
            }
        }
        let reason = match dialled {
            Ok(Ok(conn)) => {
                *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
                *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
                tracing::debug!(node = %self.display, "connected");
                return Ok(conn);
            }
            Ok(Err(e)) => {
                // Refused credentials or certificates: say so, and do not dial again and
                // again for nothing.
                if let Some(denied) = self.access_error(&e) {
                    tracing::debug!(node = %self.display, error = %denied, "cannot connect");
                    *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), e.to_string()));
                    return Err(denied);
                }
                // `redis://` to a TLS port: the server hangs up on our first command. If
                // it answers a ClientHello, say so now, as a TLS error.
                if !self.tls
                    && looks_hung_up(&e.to_string())
                    && speaks_tls(
                        &self.host,
                        self.port,
                        TLS_PROBE_TIMEOUT.min(self.dial_timeout),
                    )
                    .await
                {
                    let reason = format!("{TLS_REPLY} ({e})");
                    tracing::debug!(node = %self.display, "the server speaks TLS");
                    *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), reason.clone()));
                    return Err(self
                        .access_error_text(&reason)
                        .unwrap_or_else(|| self.connect_error(reason)));
                }
                e.to_string()
            }
            Err(_) => "no answer".to_string(),
        };
        tracing::debug!(node = %self.display, %reason, "cannot connect");
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), reason.clone()));
        Err(self.connect_error(reason))
    }

    /// Dial at start-up, ignoring the re-dial backoff.
    pub(crate) async fn connect(&self) -> Result<()> {
        let _gate = self.dial_gate.lock().await;
        if self.cached().is_some() {
            return Ok(());
        }
        self.dial().await.map(|_| ())
    }

    fn connect_error(&self, reason: String) -> Error {
        Error::Connect {
            endpoints: self.display.clone(),
            timeout: self.dial_timeout,
            reason,
        }
    }

    fn store_error(&self, e: &redis::RedisError) -> Error {
        self.access_error(e).unwrap_or_else(|| {
            if is_transient_redis(e) {
                Error::Unavailable(format!("redis {}: {e}", self.display))
            } else {
                Error::Store(format!("redis {}: {e}", self.display))
            }
        })
    }

    /// The error for refused credentials, permissions or certificates, or for a database
    /// index the server does not have, if `e` is one. Redis's messages name neither
    /// passwords nor keys' values.
    fn access_error(&self, e: &redis::RedisError) -> Option<Error> {
        if e.kind() == redis::ErrorKind::AuthenticationFailed {
            return Some(Error::Unauthenticated(format!(
                "redis {}: the server refused the user name or password",
                self.display
            )));
        }
        self.access_error_text(&format!("{} {e}", e.code().unwrap_or_default()))
    }

    fn access_error_text(&self, text: &str) -> Option<Error> {
        let node = &self.display;
        if text.contains("WRONGPASS") || text.contains("invalid password") {
            Some(Error::Unauthenticated(format!(
                "redis {node}: the server refused the user name or password"
            )))
        } else if text.contains("NOAUTH") {
            Some(Error::Unauthenticated(format!(
                "redis {node}: the server requires a password (redis://user:password@host:port)"
            )))
        } else if text.contains("NOPERM") {
            Some(Error::PermissionDenied(format!(
                "redis {node}: the user's ACL does not allow this ({})",
                text.trim()
            )))
        } else if text.contains("AuthenticationFailed") || text.contains("authentication failed") {
            Some(Error::Unauthenticated(format!(
                "redis {node}: the server refused the user name or password"
            )))
        } else if text.contains("DB index is out of range") || text.contains("invalid DB index") {
            // SELECT refused: the URL's /DB is more than the server's `databases`.
            Some(Error::InvalidEndpoint {
                endpoint: format!("{}://{node}", if self.tls { "rediss" } else { "redis" }),
                reason: format!(
                    "the server has no such database (the number after the port): {}",
                    text.trim()
                ),
            })
        } else {
            tls_problem(text, self.tls).map(|reason| Error::Tls {
                endpoints: node.clone(),
                reason,
            })
        }
    }

    /// Run `f` on the connection within the request timeout.
    ///
    /// If the connection turns out lost (the server closed it while it was idle: an idle
    /// `timeout`, a proxy's or NAT's reset, `CLIENT KILL`, a restart), `f` runs once more on
    /// a new one, within the same timeout: else a release, an extend or a read would fail
    /// on every node whose connection died quietly, and only the next call would find out.
    /// Every request Baton sends may run twice: the scripts compare our token (`acquire.lua`
    /// and `enqueue.lua` take a key that already holds it; releases and extends are
    /// compare-and-delete and compare-and-`PEXPIRE`), proclaims write one version once,
    /// and reads read. The one answer a second run could change is a release's whose first
    /// run did delete the key and lost only its reply (redis-rs reports that, and a send on
    /// a connection already dead, with the same error): the second would find the key gone.
    /// So a release that deletes or hands off our key leaves a short-lived marker, and one
    /// that finds the key not ours answers as the run that left it did (see
    /// [`Node::release`]).
    async fn run<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let call = async {
            let mut again = true;
            loop {
                let Conn { id, conn } = self.conn().await?;
                let e = match f(conn).await {
                    Ok(v) => return Ok(v),
                    Err(e) => e,
                };
                if e.is_unrecoverable_error() {
                    self.lost(id);
                }
                if std::mem::take(&mut again) && e.is_connection_dropped() {
                    tracing::debug!(node = %self.display, error = %e, operation, "the connection was lost; trying once more on a new one");
                    continue;
                }
                return Err(self.store_error(&e));
            }
        };
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                operation,
                after: self.request_timeout,
            }),
        }
    }

    /// `SET NX PX` (with the fencing counter and election record, see `acquire.lua`).
    pub(crate) async fn acquire(
        &self,
        keys: &Keys,
        token: &str,
        ttl_ms: u64,
        fence: bool,
        record: Option<&[u8]>,
    ) -> Result<NodeAcquire> {
        let (taken, n): (i64, i64) = self
            .run("redis acquire", |mut conn| async move {
                ACQUIRE
                    .key(&keys.lock)
                    .key(&keys.fence)
                    .key(&keys.record)
                    .arg(token)
                    .arg(ttl_ms)
                    .arg(if fence { "1" } else { "0" })
                    .arg(if record.is_some() { "1" } else { "0" })
                    .arg(record.unwrap_or_default())
                    .arg(&keys.channel)
                    .arg(&keys.released)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(if taken == 1 {
            NodeAcquire::Taken(n)
        } else {
            NodeAcquire::Held(n)
        })
    }

    /// How long the marker a release leaves when it deletes or hands off our key lives
    /// (`release.lua`, `handoff.lua`), in ms: twice the request timeout. A release sent
    /// again on a new connection (see [`Node::run`]) runs within one request timeout of
    /// the first.
    fn released_marker_ms(&self) -> u64 {
        u64::try_from(self.request_timeout.saturating_mul(2).as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Compare-and-delete (or, for FIFO keys, hand the lock to the oldest live waiter; for a
    /// token that does not hold the lock, leave the queue).
    ///
    /// A release that deletes or hands off our key leaves a marker beside it
    /// (`baton:released:KEY:TOKEN`, for [`Node::released_marker_ms`]), and one that finds
    /// the key not ours answers as that marker says. So a release whose first run did the
    /// work and lost only its reply, sent again on a new connection, still says `Freed` (or
    /// `HandedOff`), while one that finds the key gone or another's without a marker (it
    /// expired, or the server restarted empty, and another client may hold it) says
    /// `NotOurs`: a loss. A server that refuses the marker (an ACL written without
    /// `~baton:released:…`) still releases, and a marker evicted is as none: only a lost
    /// reply is then reported as `NotOurs`, as it was before markers.
    pub(crate) async fn release(&self, keys: &Keys, token: &str) -> Result<NodeRelease> {
        let marker_ms = self.released_marker_ms();
        if keys.fifo {
            let parts: Vec<redis::Value> = self
                .run("redis release", |mut conn| async move {
                    HANDOFF
                        .key(&keys.lock)
                        .key(&keys.fence)
                        .key(&keys.queue)
                        .arg(token)
                        .arg(&keys.channel)
                        .arg(&keys.waiter)
                        .arg(&keys.released)
                        .arg(marker_ms)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            let int = |v: Option<&redis::Value>| match v {
                Some(redis::Value::Int(n)) => *n,
                _ => 0,
            };
            return Ok(match int(parts.first()) {
                1 => NodeRelease::Freed,
                2 => {
                    let next = match parts.get(1) {
                        Some(redis::Value::BulkString(b)) => {
                            String::from_utf8_lossy(b).into_owned()
                        }
                        _ => String::new(),
                    };
                    let payload = format!("g:{next}:{}:{}", int(parts.get(2)), int(parts.get(3)));
                    NodeRelease::HandedOff(payload.into_bytes())
                }
                _ => NodeRelease::NotOurs,
            });
        }
        let n: i64 = self
            .run("redis release", |mut conn| async move {
                RELEASE
                    .key(&keys.lock)
                    .key(&keys.record)
                    .arg(token)
                    .arg(&keys.channel)
                    .arg(&keys.released)
                    .arg(marker_ms)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(if n == 1 {
            NodeRelease::Freed
        } else {
            NodeRelease::NotOurs
        })
    }

    /// Take the lock in turn, or queue for it (`enqueue.lua`). `window_ms` is how long our
    /// place in the queue lives without a refresh; 0 never queues (`try_lock`).
    pub(crate) async fn enqueue(
        &self,
        keys: &Keys,
        token: &str,
        ttl_ms: u64,
        window_ms: u64,
    ) -> Result<NodeEnqueue> {
        let parts: Vec<i64> = self
            .run("redis acquire", |mut conn| async move {
                ENQUEUE
                    .key(&keys.lock)
                    .key(&keys.fence)
                    .key(&keys.queue)
                    .key(format!("{}{token}", keys.waiter))
                    .arg(token)
                    .arg(ttl_ms)
                    .arg(window_ms)
                    .arg(&keys.waiter)
                    .arg(&keys.released)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let at = |i: usize| parts.get(i).copied().unwrap_or(0);
        Ok(match at(0) {
            1 => NodeEnqueue::Taken(at(1)),
            2 => NodeEnqueue::Granted {
                fence: at(1),
                since_ms: u64::try_from(at(2)).unwrap_or(0),
            },
            _ => NodeEnqueue::Waiting {
                pttl: at(1),
                fence: at(2),
            },
        })
    }

    /// Compare-and-PEXPIRE.
    /// Compare-and-PEXPIRE. For a leader's hold (`election`), its record must carry
    /// `token` too.
    pub(crate) async fn extend(
        &self,
        keys: &Keys,
        token: &str,
        ttl_ms: u64,
        election: bool,
    ) -> Result<NodeExtend> {
        let n: i64 = self
            .run("redis extend", |mut conn| async move {
                EXTEND
                    .key(&keys.lock)
                    .key(&keys.record)
                    .arg(token)
                    .arg(ttl_ms)
                    .arg(if election { "1" } else { "0" })
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(match n {
            1 => NodeExtend::Extended,
            0 => NodeExtend::Foreign,
            -2 => NodeExtend::RecordGone,
            _ => NodeExtend::Gone,
        })
    }

    /// Publish a new value; the record's new version, or `None` if we no longer lead.
    pub(crate) async fn proclaim(
        &self,
        keys: &Keys,
        token: &str,
        value: &[u8],
        ver: i64,
    ) -> Result<Option<i64>> {
        let ver: i64 = self
            .run("redis proclaim", |mut conn| async move {
                PROCLAIM
                    .key(&keys.lock)
                    .key(&keys.record)
                    .arg(token)
                    .arg(value)
                    .arg(&keys.channel)
                    .arg(ver)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok((ver > 0).then_some(ver))
    }

    /// Every key matching the glob `pattern`, by `SCAN` (which never blocks the server).
    pub(crate) async fn scan(&self, pattern: &str) -> Result<Vec<Vec<u8>>> {
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = self
                .run("redis scan", |mut conn| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            keys.extend(batch);
            if next == 0 {
                keys.sort_unstable();
                keys.dedup();
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// A key as `inspect.lua` reads it: `None` unless it looks like a lock key.
    pub(crate) async fn inspect(&self, keys: &Keys) -> Result<Option<Inspected>> {
        let parts: Vec<Vec<u8>> = self
            .run("redis read", |mut conn| async move {
                INSPECT
                    .key(&keys.lock)
                    .key(&keys.fence)
                    .key(&keys.record)
                    .key(&keys.queue)
                    .arg(&keys.waiter)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let Some(value) = parts.first().cloned() else {
            return Ok(None);
        };
        Ok(Some(Inspected {
            value,
            pttl_ms: num(parts.get(1)),
            fence: num(parts.get(2)),
            election: num(parts.get(3)) == 1,
            waiters: usize::try_from(num(parts.get(4))).unwrap_or(0),
        }))
    }

    /// Who holds the lock: `None` if free.
    pub(crate) async fn leader(&self, keys: &Keys) -> Result<Option<NodeRecord>> {
        let parts: Vec<Vec<u8>> = self
            .run("redis read", |mut conn| async move {
                LEADER
                    .key(&keys.lock)
                    .key(&keys.record)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let mut parts = parts.into_iter();
        let Some(token) = parts.next() else {
            return Ok(None);
        };
        let rest: Vec<Vec<u8>> = parts.collect();
        Ok(Some(NodeRecord {
            token,
            fence: num(rest.first()),
            ver: num(rest.get(1)),
            value: rest.get(2).cloned().unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::RedisNode;

    /// A master's `run_id` is read from `INFO server`; a second master with the same one is
    /// refused while the first's connection is up, naming both in the URL's order, and the
    /// first keeps it. A claim lost with its connection no longer refuses anyone.
    #[tokio::test]
    async fn one_run_id_claimed_by_two_masters_is_refused() {
        let info = "# Server\r\nredis_version:7.2.4\r\nrun_id:0123abcd\r\ntcp_port:6379\r\n";
        assert_eq!(run_id(info), Some("0123abcd"));
        assert_eq!(run_id("# Server\r\nrun_id:\r\n"), None);
        assert_eq!(run_id(""), None);
        let masters = Masters::new(vec!["a:1".into(), "b:1".into(), "c:2".into()]);
        let probe = Duration::from_secs(1);
        assert_eq!(masters.claim(1, "x", 1, None, probe).await, None);
        assert_eq!(masters.claim(2, "y", 2, None, probe).await, None);
        // The same master dialled again keeps its own.
        assert_eq!(masters.claim(1, "x", 3, None, probe).await, None);
        let refused = masters.claim(0, "x", 4, None, probe).await.unwrap();
        assert!(
            refused.starts_with("a:1 and b:1 are one server"),
            "{refused}"
        );
        assert!(refused.contains("independent masters"), "{refused}");
        assert_eq!(masters.claim(0, "z", 5, None, probe).await, None);
        // Master 1's connection 3 is lost (forgetting connection 1, an older one, does
        // nothing): its server's run_id is free for the next to claim it.
        masters.forget(1, 1);
        assert!(masters.claim(0, "x", 6, None, probe).await.is_some());
        masters.forget(1, 3);
        assert_eq!(masters.claim(0, "x", 6, None, probe).await, None);
        assert!(masters.claim(1, "x", 7, None, probe).await.is_some());
    }

    /// A lost or refused connection is [`Error::Unavailable`] (which waiters retry); a
    /// script's error is a plain [`Error::Store`] (which they do not).
    #[test]
    fn connection_failures_are_unavailable_and_script_errors_are_not() {
        let node = Node::new(
            &RedisNode::from("127.0.0.1:1"),
            Duration::from_secs(1),
            Duration::from_secs(1),
            None,
        )
        .unwrap();
        let refused = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        let e = node.store_error(&refused);
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(is_transient(&e) && e.is_retryable());
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");

        let wrong_type = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ));
        let e = node.store_error(&wrong_type);
        assert!(matches!(e, Error::Store(_)), "{e}");
        assert!(!is_transient(&e));
    }
}

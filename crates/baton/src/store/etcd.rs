//! [`EtcdStore`]: the [`Store`] trait on a real etcd cluster, through the `etcd-client` crate.
//!
//! # Connections
//!
//! One [`EtcdStore`] holds one gRPC channel that balances requests over every endpoint it
//! was given. A member that dies (refused connections, a reset, or HTTP/2 keep-alive pings
//! that go unanswered) is skipped while the others keep serving, so a cluster that keeps
//! its quorum keeps working when one member is killed.
//!
//! Watches share gRPC `Watch` streams, up to 64 on one, as Go's client shares one stream
//! between all of its watches: a watch costs a create request on an open stream, not a
//! stream of its own. A creation that goes unanswered for a quarter of the request timeout
//! moves on to a new stream, and the silent one takes no new watch. A stream that breaks
//! ends every watch on it with the error, as a stream of its own would have.
//!
//! # Timeouts and retries
//!
//! - [`EtcdStore::connect`] fails with [`Error::Connect`] if no member answers a
//!   linearizable read within [`EtcdOptions::dial_timeout`].
//! - Every request, including its retries, is bounded by [`EtcdOptions::request_timeout`]
//!   and fails with [`Error::Timeout`] when it runs out.
//! - A request is retried inside that budget only when this is safe: writes when the
//!   connection to the chosen member could not be made (so the request was never sent),
//!   reads, keep-alives and watch creation also when a member reports itself unavailable.
//!
//! # TLS and authentication
//!
//! `https://` endpoints use TLS ([`EtcdOptions::tls`]: the CA to trust, an optional client
//! certificate). A handshake that fails gives [`Error::Tls`] at once, naming the problem;
//! nothing is ever sent in plaintext instead. So does a certificate that fails verification
//! (or a client certificate refused) when a member is dialled again after connect: it is
//! not retried, and watches end with it.
//!
//! With [`EtcdOptions::credentials`], the store authenticates when it connects and sends
//! etcd's token with every request. etcd's tokens expire (`--auth-token-ttl`, 300 s by
//! default, counted from the last request that used the token); lease keep-alives do not
//! renew them, so a session that only holds a lock for long outlives its token. When etcd
//! refuses a request for an invalid token (or an outdated auth revision), the store
//! authenticates again and repeats the request once, which is safe because etcd refused it
//! before applying it; a watch that etcd cancels for that reason is created again the same
//! way. Leases are unaffected: keep-alives never need the token.
//!
//! # Errors
//!
//! etcd's errors map to [`Error::Store`] with a lowercase message that never contains keys'
//! values, except: an unknown lease gives [`Error::LeaseNotFound`], a request that is too
//! large (or a lease TTL or revision out of range) gives [`Error::InvalidArgument`], a
//! compacted revision gives [`Error::Compacted`], a request the user's roles do not allow
//! gives [`Error::PermissionDenied`], credentials etcd refuses give
//! [`Error::Unauthenticated`], and a member that is unreachable, lost its connection or
//! reports itself unavailable (no leader, say) gives [`Error::Unavailable`]. Only that last
//! kind is retried, and only as the list above says. No message contains a password or a
//! token.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client as ec;
use tokio::time::{sleep, timeout_at, Instant};

use super::{
    Compare, CompareOp, CompareTarget, Event, EventKind, KeyRange, KeyValue, LeaseGrant, LeaseId,
    Range, RangeResponse, Revision, SortOrder, SortTarget, Store, Txn, TxnOp, TxnOpResponse,
    TxnResponse, Watch, WatchResponse, WatchStream,
};
use crate::error::{Error, Result};
mod members;
mod watches;

use crate::security::{
    looks_hung_up, speaks_tls, tls_problem, tls_rejection, Credentials, TlsConfig,
    TLS_PROBE_TIMEOUT, TLS_REPLY,
};

/// After how long without any frame from a member, on a connection with open requests or
/// streams, it is pinged (HTTP/2 keep-alive); it counts as dead when the ping is not
/// answered within the dial timeout. etcd closes connections that ping more often than
/// every 5 s (`--grpc-keepalive-min-time`), hence the margin. Measured on loopback: a
/// SIGSTOPped member breaks an open watch after interval + dial timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(6);

/// The key read by [`EtcdStore::connect`] to check that the cluster answers. Only its
/// count is asked for.
const PROBE_KEY: &[u8] = b"baton/connect-probe";

/// The key watched to learn the compact revision after a compaction error.
const COMPACT_PROBE_KEY: &[u8] = b"baton/compact-probe";

/// The first and the largest pause between two attempts of a retried request.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// How many refused TLS handshakes per member a request retries before it fails with
/// `Error::Tls` (a member whose handshake failed is passed over for a while, see
/// `members.rs`, so a retry goes to another member while one is connected).
const TLS_REFUSALS_PER_MEMBER: usize = 10;

/// How many refused TLS handshakes a request retries with `members`
/// endpoints: [`TLS_REFUSALS_PER_MEMBER`] each, or one retry with a single member (another
/// attempt cannot reach another member).
fn tls_refusal_budget(members: usize) -> usize {
    if members > 1 {
        TLS_REFUSALS_PER_MEMBER * members
    } else {
        1
    }
}

/// [`tls_refusal_budget`] at connect: two refusals in a row per member (another error,
/// a member merely down, starts the count again: the connect then waits for it, until the
/// dial timeout). A refusing member is passed over, so a good one answers the next attempt;
/// when every member refuses (the wrong CA for the cluster, the usual mistake) the error
/// comes at once, not after the dial timeout's worth of retries (found by review: 9.3 s
/// with a 20 s dial timeout).
fn tls_refusal_budget_at_connect(members: usize) -> usize {
    if members > 1 {
        2 * members
    } else {
        1
    }
}

/// How many copies of an idempotent request may be in flight at once: a copy is sent after
/// each 1/HEDGES of the request timeout without an answer (see `EtcdStore::hedged`).
const HEDGES: usize = 4;

/// The most copies of one request [`hedge`] sends when its share is a small part of its
/// deadline (the connect probe, keep-alive streams). With etcd-client's own channel each
/// copy landed on a member picked at random, so with one member of three silent all of `n`
/// copies landed there with probability 3^-n: 1 in 81 for [`HEDGES`] copies, which lost a
/// connect or a resumed session now and then. Since the store's own channel
/// (`members.rs`) a copy sent while another waits goes to another member; the copies stay
/// as a backstop.
const MAX_COPIES: usize = 16;

/// Cached keep-alive streams unused for this long are closed.
const KEEPER_IDLE: Duration = Duration::from_secs(600);

/// gRPC status code `CANCELLED`.
const CODE_CANCELLED: i32 = 1;
/// gRPC status code `UNAVAILABLE`.
const CODE_UNAVAILABLE: i32 = 14;
/// gRPC status code `INVALID_ARGUMENT`.
const CODE_INVALID_ARGUMENT: i32 = 3;
/// gRPC status code `NOT_FOUND`.
const CODE_NOT_FOUND: i32 = 5;
/// gRPC status code `PERMISSION_DENIED`.
const CODE_PERMISSION_DENIED: i32 = 7;
/// gRPC status code `UNAUTHENTICATED`.
const CODE_UNAUTHENTICATED: i32 = 16;

/// A connect's failure when no member answered in time: a member that is up without a
/// quorum (or a leader) does not answer either (its reads wait for one), which the operator
/// of a cluster that lost its majority would not guess from "no member answered" alone.
const NO_ANSWER: &str =
    "no member answered (a member that is up but has no quorum or leader does not answer)";

/// Options for [`EtcdStore::connect`]. Build them with `..EtcdOptions::default()`, so that
/// new options keep their defaults.
///
/// # Default
///
/// - dial timeout: 5 s
/// - request timeout: 10 s
/// - TLS: none for `http://`; for `https://`, the system's roots and no client certificate
/// - credentials: none
///
/// Its `Debug` output never shows the password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// How long [`EtcdStore::connect`] waits for the cluster to answer, and how long one
    /// TCP connection attempt to a member may take.
    pub dial_timeout: Duration,
    /// How long one request may take, retries included, before it fails with
    /// [`Error::Timeout`].
    pub request_timeout: Duration,
    /// TLS settings for `https://` endpoints; must be `None` for `http://` ones.
    pub tls: Option<TlsConfig>,
    /// The user to authenticate as, if etcd has authentication enabled.
    pub credentials: Option<Credentials>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            tls: None,
            credentials: None,
        }
    }
}

/// A [`Store`] backed by an etcd v3 cluster.
///
/// Cheap to clone: clones share the connection. Its `Debug` output shows the endpoints
/// (credentials redacted) and the timeouts, never keys' values.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> baton::Result<()> {
/// use baton::store::etcd::{EtcdOptions, EtcdStore};
/// use baton::store::{Range, Store};
///
/// let store = EtcdStore::connect(
///     &["http://127.0.0.1:2379".to_string()],
///     EtcdOptions::default(),
/// )
/// .await?;
/// store.put(b"greeting", b"hello", 0).await?;
/// let found = store.range(Range::key("greeting")).await?;
/// assert_eq!(found.kvs.len(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: ec::Client,
    /// How many times the store authenticated again after etcd refused its token.
    auth_generation: AtomicU64,
    /// Held while authenticating again, so that concurrent requests refused for the same
    /// token authenticate once.
    auth_gate: tokio::sync::Mutex<()>,
    /// The endpoints, comma-joined, with credentials redacted.
    endpoints: String,
    options: EtcdOptions,
    /// One cached keep-alive stream per lease.
    keepers: StdMutex<HashMap<LeaseId, KeeperEntry>>,
    /// The `Watch` streams new watches may join (see [`watches`]).
    watch_streams: StdMutex<Vec<Arc<watches::Stream>>>,
    /// Held while a shared `Watch` stream is opened, so that watches created at the same
    /// time join it instead of each opening a stream of its own.
    watch_opening: tokio::sync::Mutex<()>,
    /// The runtime the store was connected on, which runs the shared watch streams' tasks
    /// (as it runs the gRPC channel's): a watch created on another runtime may join a
    /// stream, and must not depend on that runtime being driven, or alive.
    runtime: tokio::runtime::Handle,
}

/// Where the keep-alive stream of one lease is cached, while it works.
type KeeperSlot = Arc<tokio::sync::Mutex<Option<Arc<Keeper>>>>;

struct KeeperEntry {
    slot: KeeperSlot,
    last_used: Instant,
    /// The lease's TTL, if known: granted by this store, or learnt from a keep-alive's
    /// reply. The reply that opens a keep-alive stream then counts as a keep-alive, and
    /// keep-alives are hedged within a fifth of it.
    granted: Option<Duration>,
}

/// An open `LeaseKeepAlive` stream for one lease, with keep-alives *pipelined* on it: a
/// request is sent without waiting for the reply to the previous one, so that slow replies
/// do not delay the next renewal. etcd answers every request on the stream once, in order
/// (or ends the stream), so replies are matched to requests by their order.
struct Keeper {
    state: Arc<StdMutex<KeeperState>>,
    reader: tokio::task::AbortHandle,
    /// A keep-alive on this stream went unanswered for its hedging share, and no reply has
    /// come since: its member may be silent. Later keep-alives open a new stream at once
    /// instead of waiting the share on it again.
    silent: Arc<AtomicBool>,
}

struct KeeperState {
    sender: ec::LeaseKeeper,
    /// One reply slot per request sent and not answered yet, oldest first.
    waiting: std::collections::VecDeque<tokio::sync::oneshot::Sender<KeeperReply>>,
    /// The stream ended or failed, and why: requests must go to a new stream.
    closed: Option<String>,
}

/// A reply on a keep-alive stream: `Some(ttl)`, or `None` if the lease is gone; `Err` if
/// the stream broke first.
type KeeperReply = std::result::Result<Option<Duration>, String>;

impl Keeper {
    fn new(sender: ec::LeaseKeeper, mut stream: ec::LeaseKeepAliveStream) -> Keeper {
        let state = Arc::new(StdMutex::new(KeeperState {
            sender,
            waiting: std::collections::VecDeque::new(),
            closed: None,
        }));
        let shared = state.clone();
        let silent = Arc::new(AtomicBool::new(false));
        let heard = silent.clone();
        let reader = tokio::spawn(async move {
            loop {
                let message = stream.message().await;
                let mut state = lock_unpoisoned(&shared);
                let why = match message {
                    Ok(Some(reply)) => {
                        heard.store(false, Ordering::Relaxed);
                        let ttl = (reply.ttl() > 0).then(|| secs(reply.ttl()));
                        if let Some(waiter) = state.waiting.pop_front() {
                            // The caller may have given up: its reply is then dropped.
                            let _ = waiter.send(Ok(ttl));
                        }
                        continue;
                    }
                    Ok(None) => "the keep-alive stream ended".to_string(),
                    Err(e) => describe(&e),
                };
                state.close(why);
                return;
            }
        });
        Keeper {
            state,
            reader: reader.abort_handle(),
            silent,
        }
    }

    fn is_closed(&self) -> bool {
        lock_unpoisoned(&self.state).closed.is_some()
    }

    /// Send one keep-alive request; the receiver gets its reply.
    fn send(&self) -> std::result::Result<tokio::sync::oneshot::Receiver<KeeperReply>, String> {
        use futures::FutureExt as _;
        let mut state = lock_unpoisoned(&self.state);
        if let Some(why) = &state.closed {
            return Err(why.clone());
        }
        // The request channel has room for 100 requests and is drained as they are written,
        // so the send completes at once. If it ever could not, the request is not sent (a
        // dropped send sends nothing), and the stream is given up rather than wait with
        // the lock held: a reply slot without its request would shift every later reply
        // onto the wrong request.
        match state.sender.keep_alive().now_or_never() {
            Some(Ok(())) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                state.waiting.push_back(tx);
                Ok(rx)
            }
            Some(Err(e)) => {
                let why = describe(&e);
                state.close(why.clone());
                Err(why)
            }
            None => {
                let why = "the keep-alive request queue is full".to_string();
                state.close(why.clone());
                Err(why)
            }
        }
    }

    /// One keep-alive: `Some(ttl)`, or `None` if the lease is gone; `Err` if the stream broke.
    async fn keep_alive(&self) -> KeeperReply {
        let reply = self.send()?;
        reply
            .await
            .unwrap_or_else(|_| Err("the keep-alive stream ended".to_string()))
    }
}

impl KeeperState {
    /// Mark the stream unusable and fail every request waiting on it.
    fn close(&mut self, why: String) {
        for waiter in self.waiting.drain(..) {
            let _ = waiter.send(Err(why.clone()));
        }
        self.closed = Some(why);
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // Dropping the sender ends the request stream, which makes etcd end the reply stream;
        // abort the reader anyway, in case etcd is unreachable and never does.
        self.reader.abort();
    }
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("dial_timeout", &self.inner.options.dial_timeout)
            .field("request_timeout", &self.inner.options.request_timeout)
            .field("tls", &self.inner.options.tls)
            .field("credentials", &self.inner.options.credentials)
            .finish()
    }
}

/// Which failed attempts may be repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Only attempts that provably never reached a member (the connection failed).
    /// For writes: repeating a write that was applied could apply it twice.
    Unsent,
    /// Also attempts that a member answered with "unavailable" or that broke in flight.
    /// For reads and other requests that may safely run twice.
    Idempotent,
}

impl Retry {
    fn allows(self, e: &ec::Error) -> bool {
        match self {
            Retry::Unsent => is_unsent(e),
            Retry::Idempotent => is_unsent(e) || is_transient(e),
        }
    }
}

impl EtcdStore {
    /// Connect to an etcd cluster.
    ///
    /// `endpoints` are the client URLs of its members, such as `"http://127.0.0.1:2379"`.
    /// Requests are balanced over all of them; pass every member so that losing one does
    /// not cut the client off.
    ///
    /// Returns once a linearizable read has been answered. Fails with [`Error::Connect`]
    /// if that does not happen within the dial timeout (nothing listens, no member has a
    /// leader, ...); with [`Error::Tls`] at once if a handshake fails, and also for
    /// `http://` endpoints that all turn out to be TLS servers (when they hang up on the
    /// plaintext request, each is sent a TLS ClientHello, waiting at most 500 ms for its
    /// answer); and at once with [`Error::InvalidEndpoint`] or [`Error::InvalidArgument`]
    /// for malformed input: every endpoint must be `http://host:port` or `https://host:port`
    /// (a port from 1 to 65535), without credentials (give them in [`EtcdOptions`]).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future drops the half-made connection.
    pub async fn connect(endpoints: &[String], options: EtcdOptions) -> Result<EtcdStore> {
        let joined = endpoints
            .iter()
            .map(|e| crate::client::redact(e))
            .collect::<Vec<_>>()
            .join(",");
        if endpoints.is_empty() {
            return Err(Error::invalid("no etcd endpoint given"));
        }
        // Refuse what no dial could reach (a port out of range, another scheme) now, not as
        // a retryable failure to connect after the dial timeout.
        for endpoint in endpoints {
            crate::client::validate_etcd_url(endpoint)?;
        }
        if options.dial_timeout.is_zero() || options.request_timeout.is_zero() {
            return Err(Error::invalid("timeouts must be greater than zero"));
        }
        // Deadlines are `now + timeout` on the monotonic clock, which cannot add
        // `Duration::MAX`: refuse what it cannot add, as for a TTL.
        if options.dial_timeout > crate::MAX_TTL || options.request_timeout > crate::MAX_TTL {
            return Err(Error::invalid(format!(
                "timeouts must be at most {:?}",
                crate::MAX_TTL
            )));
        }
        let dial = options.dial_timeout;
        let connect_error = |reason: String| Error::Connect {
            endpoints: joined.clone(),
            timeout: dial,
            reason,
        };
        let https = endpoints.iter().all(|e| e.starts_with("https://"));
        if !https && (options.tls.is_some() || endpoints.iter().any(|e| e.starts_with("https://")))
        {
            return Err(Error::InvalidEndpoint {
                endpoint: joined.clone(),
                reason: "TLS needs every endpoint to be https://; http:// is plaintext".into(),
            });
        }
        let mut connect_options = ec::ConnectOptions::new()
            .with_connect_timeout(dial)
            // A backstop only: `call` enforces the request timeout itself and reports
            // Error::Timeout; this one must not fire first.
            .with_timeout(
                options
                    .request_timeout
                    .saturating_add(Duration::from_secs(1)),
            )
            .with_keep_alive(KEEPALIVE_INTERVAL, dial)
            .with_keep_alive_while_idle(false)
            .with_tcp_keepalive(KEEPALIVE_INTERVAL)
            // etcd's `hasleader` (Go's `clientv3.WithRequireLeader`): a member cut off from
            // its peers (partitioned, or the rest of the cluster down) refuses requests with
            // "no leader" instead of answering from a stale view, and ends the watches and
            // keep-alive streams it carries a few election timeouts after it lost its
            // leader. Without it such a member, still answering the client's pings, keeps a
            // watch open and silent for good: a waiter never hears of a release, a holder
            // never of its key's delete. A refusal is retried on another member.
            .with_require_leader(true);
        if https {
            connect_options = connect_options.with_tls(tls_options(
                options.tls.as_ref().unwrap_or(&TlsConfig::new()),
                &joined,
            )?);
        }
        let deadline = Instant::now() + dial;

        let mut client = match timeout_at(
            deadline,
            ec::Client::connect_with_balanced_channel(
                endpoints,
                Some(connect_options),
                members::Members {
                    runtime: tokio::runtime::Handle::current(),
                },
            ),
        )
        .await
        {
            Err(_) => return Err(connect_error("setting up the client timed out".into())),
            Ok(Err(e @ (ec::Error::InvalidUri(_) | ec::Error::InvalidArgs(_)))) => {
                return Err(Error::InvalidEndpoint {
                    endpoint: joined.clone(),
                    reason: describe(&e),
                })
            }
            Ok(Err(e)) => {
                let reason = describe(&e);
                if !https && looks_hung_up(&reason) {
                    if let Some(error) =
                        plaintext_to_tls(endpoints, &joined, &reason, deadline).await
                    {
                        return Err(error);
                    }
                }
                return Err(match tls_problem(&reason, https) {
                    Some(reason) => Error::Tls {
                        endpoints: joined.clone(),
                        reason,
                    },
                    None => connect_error(reason),
                });
            }
            Ok(Ok(client)) => client,
        };

        // The client connects lazily: authenticate if asked to, and check that the cluster
        // answers, retrying while members are unreachable, until the dial timeout.
        let mut authenticated = options.credentials.is_none();
        let mut last_error: Option<String> = None;
        // Whether the endpoints were asked if they speak TLS (see `plaintext_to_tls`).
        let mut probed = false;
        let mut backoff = BACKOFF_MIN;
        // A member whose certificate is refused may be one of several (its certificate
        // expired): try again (another member: the refusing one is passed over for a
        // while), until the refusals are too many for that.
        let mut tls_refusals = 0;
        // The last refusal: at the dial timeout, what to report (a member refusing our
        // certificate settings says more than another one's "connection refused").
        let mut last_refusal: Option<String> = None;
        // Over `https://`, how many probes failed with the server hanging up on a connection
        // it had accepted, and whether every failure so far was that (or a refusal). An etcd
        // with `--client-cert-auth` refuses a missing or untrusted client certificate after
        // TLS 1.3's handshake: its alert is sometimes lost to its closing the connection,
        // which then looks only hung up (about 1 connect in 4 saw nothing else for seconds).
        let mut hang_ups = 0usize;
        let mut only_hang_ups = true;
        let has_client_cert = options
            .tls
            .as_ref()
            .is_some_and(|t| t.cert_file().is_some());
        // `hang_ups`: how many, if every failure was one (see above).
        let gave_up = |refusal: Option<String>, error: Option<String>, hang_ups: Option<usize>| {
            let error = error.unwrap_or_else(|| NO_ANSWER.into());
            match (refusal, hang_ups) {
                (Some(reason), _) => Error::Tls {
                    endpoints: joined.clone(),
                    reason,
                },
                (None, Some(times)) => {
                    let (with, advice) = if has_client_cert {
                        (
                            "a client certificate it does not trust",
                            "give one signed by a CA it trusts (--cert, --key)",
                        )
                    } else {
                        ("no client certificate", "give one (--cert and --key)")
                    };
                    connect_error(format!(
                        "the server closed every TLS connection right after accepting it \
                         ({times} times); an etcd started with --client-cert-auth does so \
                         with {with}: {advice} ({error})"
                    ))
                }
                (None, None) => connect_error(error),
            }
        };
        loop {
            let attempt = async {
                if !authenticated {
                    authenticate(&mut client, options.credentials.as_ref()).await?;
                    authenticated = true;
                }
                // Hedged, as reads are: a silent member (paused, its packets lost) must not
                // use up the whole dial timeout while the others could answer.
                let answer = hedge(
                    &client,
                    deadline,
                    dial / MAX_COPIES as u32,
                    &mut |c: &ec::Client| {
                        let mut kv = kv_client(c);
                        async move {
                            kv.get(PROBE_KEY, Some(ec::GetOptions::new().with_count_only()))
                                .await
                        }
                    },
                )
                .await;
                match answer {
                    // Past the dial deadline: the timeout below reports it.
                    None => std::future::pending().await,
                    // A user whose roles do not cover the probe key: etcd answered, and
                    // accepted the token.
                    Some(Err(e)) if status_code(&e) == Some(CODE_PERMISSION_DENIED) => Ok(()),
                    Some(other) => other.map(|_| ()),
                }
            };
            match timeout_at(deadline, attempt).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    let reason = describe(&e);
                    tracing::debug!(endpoints = %joined, error = %reason, "etcd probe failed");
                    let refused = tls_rejection(&reason).is_some();
                    match tls_problem(&reason, https) {
                        Some(problem)
                            if refused
                                && tls_refusals
                                    < tls_refusal_budget_at_connect(endpoints.len())
                                && Instant::now() + backoff < deadline =>
                        {
                            tls_refusals += 1;
                            last_refusal = Some(problem);
                        }
                        Some(reason) => {
                            return Err(Error::Tls {
                                endpoints: joined,
                                reason,
                            });
                        }
                        // A hang-up over TLS: maybe the refusal with its alert lost (see
                        // `hang_ups`), so it does not start the count again.
                        None if https && looks_hung_up(&reason) => hang_ups += 1,
                        // Another member merely down (not refusing): the refusals so far
                        // are not every member's answer, wait for it (until the dial
                        // timeout) rather than fail with the refusing member's error.
                        None => {
                            tls_refusals = 0;
                            only_hang_ups = false;
                        }
                    }
                    // `http://` to TLS servers: they hang up on the HTTP/2 preface, which
                    // looks like a member going away. Ask once whether they speak TLS.
                    if !https && !probed && looks_hung_up(&reason) {
                        probed = true;
                        if let Some(error) =
                            plaintext_to_tls(endpoints, &joined, &reason, deadline).await
                        {
                            return Err(error);
                        }
                    }
                    if is_auth_error(&e) {
                        return Err(map_err("connect", e, 0, &joined));
                    }
                    // The probe is a read: after the channel's backstop timeout too, it is
                    // sent again until the dial timeout (which may be the longer).
                    if !(is_unsent(&e) || is_transient(&e) || is_backstop_timeout(&e)) {
                        return Err(connect_error(reason));
                    }
                    last_error = Some(if is_backstop_timeout(&e) {
                        NO_ANSWER.into()
                    } else {
                        reason
                    });
                }
                Err(_) => {
                    return Err(gave_up(
                        last_refusal,
                        last_error,
                        (https && only_hang_ups && hang_ups >= 2).then_some(hang_ups),
                    ))
                }
            }
            if Instant::now() + backoff >= deadline {
                return Err(gave_up(
                    last_refusal,
                    last_error,
                    (https && only_hang_ups && hang_ups >= 2).then_some(hang_ups),
                ));
            }
            sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        tracing::debug!(
            endpoints = %joined,
            tls = https,
            user = options.credentials.as_ref().map(Credentials::user),
            "connected to etcd"
        );
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                client,
                auth_generation: AtomicU64::new(0),
                auth_gate: tokio::sync::Mutex::new(()),
                endpoints: joined,
                options,
                keepers: StdMutex::new(HashMap::new()),
                watch_streams: StdMutex::new(Vec::new()),
                watch_opening: tokio::sync::Mutex::new(()),
                runtime: tokio::runtime::Handle::current(),
            }),
        })
    }

    /// The endpoints this store was connected to, comma-joined, credentials redacted.
    pub fn endpoints(&self) -> &str {
        &self.inner.endpoints
    }

    /// The options this store was connected with.
    pub fn options(&self) -> &EtcdOptions {
        &self.inner.options
    }

    /// How many times the store has authenticated again because etcd refused its token
    /// (expired, or issued before the roles changed). Always 0 without credentials.
    pub fn reauthentications(&self) -> u64 {
        self.inner.auth_generation.load(Ordering::Relaxed)
    }

    /// Run one request with the request timeout, retrying as `retry` allows.
    ///
    /// The outer error is [`Error::Timeout`]; the inner one is etcd's last answer, for the
    /// caller to map.
    async fn call<T, F, Fut>(
        &self,
        operation: &'static str,
        retry: Retry,
        attempt: F,
    ) -> Result<std::result::Result<T, ec::Error>>
    where
        F: FnMut(&ec::Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, ec::Error>>,
    {
        let deadline = Instant::now() + self.inner.options.request_timeout;
        self.call_until(operation, retry, deadline, attempt).await
    }

    /// [`EtcdStore::call`], with the request's `deadline` given (a request timeout after
    /// the operation began).
    async fn call_until<T, F, Fut>(
        &self,
        operation: &'static str,
        retry: Retry,
        deadline: Instant,
        mut attempt: F,
    ) -> Result<std::result::Result<T, ec::Error>>
    where
        F: FnMut(&ec::Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, ec::Error>>,
    {
        let after = self.inner.options.request_timeout;
        let mut backoff = BACKOFF_MIN;
        let mut reauthenticated = false;
        // A member whose certificate is refused costs a retry (it is then passed over for
        // a while), until so many refusals came that every member must refuse it.
        let mut tls_refusals = 0;
        loop {
            let generation = self.inner.auth_generation.load(Ordering::Acquire);
            let result = if retry == Retry::Idempotent {
                self.hedged(deadline, &mut attempt).await
            } else {
                timeout_at(deadline, attempt(&self.inner.client)).await.ok()
            };
            let result = result.ok_or(Error::Timeout { operation, after })?;
            match result {
                // The token expired, or was issued before the roles changed: get a new one
                // and send the request once more. etcd refused it before applying it, so
                // this is safe for writes too.
                Err(e)
                    if is_stale_token(&e)
                        && !reauthenticated
                        && self.inner.options.credentials.is_some() =>
                {
                    reauthenticated = true;
                    self.reauthenticate(generation, deadline, operation, after)
                        .await?;
                }
                Err(e) => {
                    let retry = if is_tls_rejection(&e) {
                        tls_refusals += 1;
                        let members = self.inner.endpoints.split(',').count();
                        tls_refusals <= tls_refusal_budget(members)
                    } else {
                        retry.allows(&e)
                    };
                    if !retry || Instant::now() + backoff >= deadline {
                        return Ok(Err(e));
                    }
                    tracing::debug!(operation, error = %describe(&e), "retrying etcd request");
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                ok => return Ok(ok),
            }
        }
    }

    /// One attempt of an idempotent request, *hedged*: if it has no answer after a share of
    /// the request timeout, the same request is sent again (up to [`HEDGES`] copies in all),
    /// and the first answer wins; the others are cancelled. The channel (`members.rs`)
    /// sends a copy to a member with fewer requests waiting than the one the first waits
    /// on, so to another member: a member that is alive but silent (its packets lost) then
    /// costs a share of the timeout, not the whole of it, and is passed over for a while. A copy that fails with a retryable error leaves the others running.
    /// `None` if no answer came before `deadline`.
    async fn hedged<T, F, Fut>(
        &self,
        deadline: Instant,
        attempt: &mut F,
    ) -> Option<std::result::Result<T, ec::Error>>
    where
        F: FnMut(&ec::Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, ec::Error>>,
    {
        let share = self.inner.options.request_timeout / HEDGES as u32;
        hedge(&self.inner.client, deadline, share, attempt).await
    }

    /// Get a new auth token, within `deadline`, unless another request did since
    /// `generation` (the count of renewals when the refused request was sent).
    async fn reauthenticate(
        &self,
        generation: u64,
        deadline: Instant,
        operation: &'static str,
        after: Duration,
    ) -> Result<()> {
        let _gate = timeout_at(deadline, self.inner.auth_gate.lock())
            .await
            .map_err(|_| Error::Timeout { operation, after })?;
        if self.inner.auth_generation.load(Ordering::Acquire) != generation {
            return Ok(());
        }
        tracing::debug!(
            operation,
            "etcd refused the auth token; authenticating again"
        );
        timeout_at(deadline, self.inner.client.refresh_token())
            .await
            .map_err(|_| Error::Timeout { operation, after })?
            .map_err(|e| map_err(operation, e, 0, &self.inner.endpoints))?;
        self.inner.auth_generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The cached keep-alive slot of a lease, created if missing, and the TTL this store
    /// granted it, if it did. Closes streams of leases nobody refreshed for a long time.
    fn keeper_slot(&self, id: LeaseId) -> (KeeperSlot, Option<Duration>) {
        let now = Instant::now();
        let mut keepers = lock_unpoisoned(&self.inner.keepers);
        if !keepers.contains_key(&id) {
            keepers.retain(|_, entry| {
                now.duration_since(entry.last_used) < KEEPER_IDLE
                    || Arc::strong_count(&entry.slot) > 1
            });
        }
        let entry = keepers.entry(id).or_insert_with(|| KeeperEntry {
            slot: Arc::new(tokio::sync::Mutex::new(None)),
            last_used: now,
            granted: None,
        });
        entry.last_used = now;
        (entry.slot.clone(), entry.granted)
    }

    /// Remember the TTL granted to a new lease, for its first keep-alive. Closes streams of
    /// leases nobody refreshed for a long time.
    fn granted(&self, id: LeaseId, ttl: Duration) {
        let now = Instant::now();
        let mut keepers = lock_unpoisoned(&self.inner.keepers);
        // Sessions forget their lease's stream when they end; this is the backstop, run at
        // each power of two so that it costs O(1) per grant.
        if keepers.len() >= 64 && keepers.len().is_power_of_two() {
            keepers.retain(|_, entry| {
                now.duration_since(entry.last_used) < KEEPER_IDLE
                    || Arc::strong_count(&entry.slot) > 1
            });
        }
        keepers.insert(
            id,
            KeeperEntry {
                slot: Arc::new(tokio::sync::Mutex::new(None)),
                last_used: now,
                granted: Some(ttl),
            },
        );
    }

    /// How long a keep-alive waits for an answer before it sends a copy: a share of the
    /// request timeout, and at most a fifth of the lease's TTL (`granted`), or of the
    /// smallest TTL if it is not known yet: the keep-alive matters within the TTL.
    fn keeper_share(&self, granted: Option<Duration>) -> Duration {
        let share = self.inner.options.request_timeout / HEDGES as u32;
        share.min(granted.unwrap_or(crate::MIN_TTL) / 5)
    }

    /// Open a keep-alive stream for lease `id`, hedged like reads (a stream opened on a
    /// silent member would cost the whole request timeout). `None` if no member answered
    /// before `deadline`.
    async fn open_keeper(
        &self,
        id: LeaseId,
        granted: Option<Duration>,
        deadline: Instant,
    ) -> Option<std::result::Result<Arc<Keeper>, ec::Error>> {
        self.open_keeper_within(id, deadline, self.keeper_share(granted))
            .await
    }

    /// [`open_keeper`](Self::open_keeper), sending a copy after each `share` without answer.
    async fn open_keeper_within(
        &self,
        id: LeaseId,
        deadline: Instant,
        share: Duration,
    ) -> Option<std::result::Result<Arc<Keeper>, ec::Error>> {
        let opened = hedge(
            &self.inner.client,
            deadline,
            share,
            &mut |client: &ec::Client| {
                let mut leases = client.lease_client();
                async move { leases.keep_alive(id).await }
            },
        )
        .await?;
        Some(opened.map(|(sender, stream)| Arc::new(Keeper::new(sender, stream))))
    }

    /// Open the keep-alive stream of a new lease in the background, so that its first
    /// keep-alive goes out on an open stream: opening one takes a round trip of its own
    /// (etcd-client waits for the first reply), which would add to the first keep-alive's
    /// latency exactly when replies are slow.
    fn open_keeper_soon(&self, id: LeaseId) {
        let (slot, granted) = self.keeper_slot(id);
        let store = self.clone();
        let deadline = Instant::now() + self.inner.options.request_timeout;
        tokio::spawn(async move {
            let mut cached = slot.lock().await;
            if cached.as_ref().is_some_and(|k| !k.is_closed()) {
                return;
            }
            match store.open_keeper(id, granted, deadline).await {
                Some(Ok(keeper)) => *cached = Some(keeper),
                Some(Err(e)) => {
                    tracing::debug!(lease = %format_args!("{id:x}"), error = %describe(&e), "opening the keep-alive stream failed; the first keep-alive tries again");
                }
                None => {
                    tracing::debug!(lease = %format_args!("{id:x}"), "opening the keep-alive stream timed out; the first keep-alive tries again");
                }
            }
        });
    }

    /// Stop using the cached keep-alive stream of a lease after a failure: the next
    /// keep-alive opens a new one, maybe on another member. Requests still waiting on the
    /// old stream keep it until they end.
    fn reset_keeper(&self, id: LeaseId) {
        if let Some(entry) = lock_unpoisoned(&self.inner.keepers).get_mut(&id) {
            entry.slot = Arc::new(tokio::sync::Mutex::new(None));
        }
    }

    /// Close the cached keep-alive stream of a lease, and forget the lease.
    fn forget_keeper(&self, id: LeaseId) {
        lock_unpoisoned(&self.inner.keepers).remove(&id);
    }

    /// One keep-alive of lease `id`, on its cached stream, opening a new stream if there is
    /// none or it broke. Several may run at once: they are pipelined on the one stream.
    async fn keep_alive_once(
        &self,
        id: LeaseId,
        slot: &tokio::sync::Mutex<Option<Arc<Keeper>>>,
        granted: Option<Duration>,
        deadline: Instant,
    ) -> Result<Option<Duration>> {
        let mut backoff = BACKOFF_MIN;
        loop {
            let keeper = {
                let mut cached = slot.lock().await;
                match cached.as_ref() {
                    Some(keeper) if !keeper.is_closed() => keeper.clone(),
                    _ => {
                        *cached = None;
                        let Some(opened) = self.open_keeper(id, granted, deadline).await else {
                            return Err(Error::Timeout {
                                operation: "lease keep-alive",
                                after: self.inner.options.request_timeout,
                            });
                        };
                        match opened {
                            Ok(keeper) => {
                                *cached = Some(keeper.clone());
                                // etcd-client read the first reply to check that the lease
                                // exists, but does not return its TTL. That request renewed
                                // the lease after this call started: if the TTL is known
                                // (this store granted the lease), it is this keep-alive's
                                // answer, and the stream costs no second round trip.
                                if let Some(ttl) = granted {
                                    return Ok(Some(ttl));
                                }
                                keeper
                            }
                            Err(e) if is_lease_not_found(&e) => return Ok(None),
                            Err(error) => {
                                if !Retry::Idempotent.allows(&error)
                                    || Instant::now() + backoff >= deadline
                                {
                                    return Err(map_err(
                                        "lease keep-alive",
                                        error,
                                        id,
                                        &self.inner.endpoints,
                                    ));
                                }
                                tracing::debug!(lease = %format_args!("{id:x}"), error = %describe(&error), "retrying lease keep-alive");
                                drop(cached);
                                sleep(backoff).await;
                                backoff = (backoff * 2).min(BACKOFF_MAX);
                                continue;
                            }
                        }
                    }
                }
            };
            match self
                .hedged_keep_alive(id, slot, granted, deadline, &keeper)
                .await
            {
                Ok(ttl) => return Ok(ttl),
                Err(why) => {
                    // The stream broke (a member went away, say): open another, at once
                    // the first time.
                    tracing::debug!(lease = %format_args!("{id:x}"), error = %why, "keep-alive stream failed; reopening");
                    if Instant::now() + backoff >= deadline {
                        return Err(Error::Unavailable(format!("lease keep-alive: {why}")));
                    }
                }
            }
        }
    }

    /// One keep-alive on `keeper`, hedged like reads: if no reply came after a share of the
    /// request timeout (at most a fifth of the lease's TTL: the stream's member may be
    /// silent, paused or its packets lost, and the keep-alive matters within the TTL), a new
    /// stream is opened (on any member, itself hedged) and the first answer wins; the new
    /// stream replaces the cached one.
    ///
    /// The new stream's member is picked by the store's channel (`members.rs`), which
    /// passes over a member that left a request unanswered, but a silent member that
    /// answered nothing yet may still get it: copies of the open go out half a share apart; a stream once found silent is not waited on
    /// again (the next keep-alive opens a new one at once, until a reply comes on it); and
    /// an open refused at once (a member that lost its leader says "no leader" until a new
    /// one is elected) is tried again after a backoff, until the reply or the deadline.
    /// The price: when replies are slower than the share on every member, each keep-alive
    /// also opens streams (see docs/reliability.md).
    async fn hedged_keep_alive(
        &self,
        id: LeaseId,
        slot: &tokio::sync::Mutex<Option<Arc<Keeper>>>,
        granted: Option<Duration>,
        deadline: Instant,
        keeper: &Arc<Keeper>,
    ) -> KeeperReply {
        let share = self.keeper_share(granted);
        let reply = keeper.keep_alive();
        tokio::pin!(reply);
        if !keeper.silent.load(Ordering::Relaxed) {
            tokio::select! {
                r = &mut reply => return r,
                _ = sleep(share) => {}
            }
            keeper.silent.store(true, Ordering::Relaxed);
        }
        tracing::debug!(lease = %format_args!("{id:x}"), "no keep-alive reply yet; opening another stream");
        // Not BACKOFF_MIN: every session's keep-alive may be doing this at once while the
        // cluster elects a leader.
        let mut backoff = Duration::from_millis(100);
        loop {
            let fresh = self.open_keeper_within(id, deadline, share / 2);
            tokio::pin!(fresh);
            let opened = tokio::select! {
                r = &mut reply => return r,
                opened = &mut fresh => opened,
            };
            match opened {
                Some(Ok(fresh)) => {
                    {
                        let mut cached = slot.lock().await;
                        if cached
                            .as_ref()
                            .is_none_or(|c| Arc::ptr_eq(c, keeper) || c.is_closed())
                        {
                            *cached = Some(fresh.clone());
                        }
                    }
                    // Opening the stream renewed the lease (see `keep_alive_once`).
                    if granted.is_some() {
                        return Ok(granted);
                    }
                    return tokio::select! {
                        r = &mut reply => r,
                        r = fresh.keep_alive() => r,
                    };
                }
                Some(Err(e)) if is_lease_not_found(&e) => return Ok(None),
                Some(Err(e))
                    if Retry::Idempotent.allows(&e) && Instant::now() + backoff < deadline =>
                {
                    tracing::debug!(lease = %format_args!("{id:x}"), error = %describe(&e), "opening another keep-alive stream failed; retrying");
                    tokio::select! {
                        r = &mut reply => return r,
                        _ = sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                _ => return reply.await,
            }
        }
    }

    /// etcd's error for a read at a compacted revision names neither revision: fill in the
    /// one asked for and the compact revision (0 if that cannot be learnt within 2 s).
    /// `reads` are the revisions the request read at, in its order: the first below the
    /// compact revision is the one etcd refused (the latest if none is known to be).
    async fn fill_compacted(&self, error: Error, reads: &[Revision]) -> Error {
        match error {
            Error::Compacted { .. } => {
                let compact_revision = self
                    .compact_revision(Duration::from_secs(2))
                    .await
                    .unwrap_or(0);
                let requested = reads
                    .iter()
                    .copied()
                    .find(|r| *r > 0 && *r < compact_revision)
                    .or_else(|| reads.iter().copied().max())
                    .unwrap_or(0);
                Error::Compacted {
                    requested,
                    compact_revision,
                }
            }
            other => other,
        }
    }

    /// The compact revision, learnt from a watch from revision 1, or `None` if that does
    /// not tell within `wait`.
    async fn compact_revision(&self, wait: Duration) -> Option<Revision> {
        let mut watches = watch_client(&self.inner.client);
        let probe = async move {
            let mut stream = watches
                .watch(
                    COMPACT_PROBE_KEY,
                    Some(ec::WatchOptions::new().with_start_revision(1)),
                )
                .await
                .ok()?;
            while let Some(resp) = stream.message().await.ok()? {
                if resp.compact_revision() > 0 {
                    return Some(resp.compact_revision());
                }
                if resp.canceled() {
                    return None;
                }
            }
            None
        };
        tokio::time::timeout(wait, probe).await.ok().flatten()
    }
}

/// Run `attempt` on `client`, sending a copy after each `share` without an answer, as many
/// as fit before `deadline` (at least [`HEDGES`], at most [`MAX_COPIES`]); the first answer
/// wins. `None` if none came before `deadline`.
async fn hedge<T, F, Fut>(
    client: &ec::Client,
    deadline: Instant,
    share: Duration,
    attempt: &mut F,
) -> Option<std::result::Result<T, ec::Error>>
where
    F: FnMut(&ec::Client) -> Fut,
    Fut: Future<Output = std::result::Result<T, ec::Error>>,
{
    let mut running = crate::race::Race::new();
    running.push(attempt(client));
    let mut sent = 1;
    let now = Instant::now();
    let copies = copies_within(deadline.saturating_duration_since(now), share);
    let mut next = now + share;
    loop {
        tokio::select! {
            biased;
            Some(result) = running.next() => match result {
                Err(e) if Retry::Idempotent.allows(&e) && !running.is_empty() => {
                    tracing::debug!(error = %describe(&e), "a copy of a hedged etcd request failed; waiting for the others");
                }
                other => return Some(other),
            },
            _ = tokio::time::sleep_until(deadline) => return None,
            _ = tokio::time::sleep_until(next), if sent < copies => {
                tracing::debug!(after = ?share * sent as u32, "no answer yet; sending the request again");
                running.push(attempt(client));
                sent += 1;
                next += share;
            }
        }
    }
}

/// How many copies [`hedge`] sends, one each `share`, within `window`.
fn copies_within(window: Duration, share: Duration) -> usize {
    if share.is_zero() {
        return HEDGES;
    }
    let fit = usize::try_from(window.as_nanos() / share.as_nanos()).unwrap_or(MAX_COPIES);
    fit.clamp(HEDGES, MAX_COPIES)
}

/// The largest reply taken from etcd: as large as etcd sends (Go's client allows
/// `math.MaxInt32` too). tonic's default of 4 MiB would make any range, transaction read or
/// watch batch beyond it fail every time (a queue of 16 items of 300 KiB, a watch catching
/// up over large values), and such failures look retryable.
const MAX_REPLY: usize = i32::MAX as usize;

/// The KV service, taking replies up to [`MAX_REPLY`].
fn kv_client(client: &ec::Client) -> ec::KvClient {
    client.kv_client().max_decoding_message_size(MAX_REPLY)
}

/// The watch service, taking replies up to [`MAX_REPLY`].
fn watch_client(client: &ec::Client) -> ec::WatchClient {
    client.watch_client().max_decoding_message_size(MAX_REPLY)
}

#[async_trait]
impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn request_timeout(&self) -> Option<Duration> {
        Some(self.inner.options.request_timeout)
    }

    async fn range(&self, range: Range) -> Result<RangeResponse> {
        let options = get_options(&range);
        let key = range.keys.bytes().to_vec();
        let resp = self
            .call("range", Retry::Idempotent, |client| {
                let mut kv = kv_client(client);
                let (key, options) = (key.clone(), options.clone());
                async move { kv.get(key, Some(options)).await }
            })
            .await?;
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) => {
                return Err(self
                    .fill_compacted(
                        naming(map_err("range", e, 0, &self.inner.endpoints), &key),
                        &[range.revision],
                    )
                    .await)
            }
        };
        Ok(range_response(resp, 0))
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision> {
        let options = put_options(lease);
        let resp = self
            .call("put", Retry::Unsent, |client| {
                let mut kv = kv_client(client);
                let (key, value, options) = (key.to_vec(), value.to_vec(), options.clone());
                async move { kv.put(key, value, options).await }
            })
            .await?
            .map_err(|e| naming(map_err("put", e, lease, &self.inner.endpoints), key))?;
        Ok(revision(resp.header()))
    }

    async fn delete(&self, keys: KeyRange) -> Result<(i64, Revision)> {
        let options = delete_options(&keys);
        let key = keys.bytes().to_vec();
        let resp = self
            .call("delete", Retry::Unsent, |client| {
                let mut kv = kv_client(client);
                let (key, options) = (key.clone(), options.clone());
                async move { kv.delete(key, Some(options)).await }
            })
            .await?
            .map_err(|e| naming(map_err("delete", e, 0, &self.inner.endpoints), &key))?;
        Ok((resp.deleted(), revision(resp.header())))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        // The lease to name if etcd reports an unknown one.
        let lease = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|op| match op {
                TxnOp::Put { lease, .. } if *lease != 0 => Some(*lease),
                _ => None,
            })
            .unwrap_or(0);
        // etcd 3.4 serves a transaction with no operation as a serializable read, from the
        // member's own state, which may lag (`isTxnSerializable` is true for no
        // operations): 75 of 300 compares-only transactions sent to a follower right after
        // a write missed it. A linearizable count of the first compared key (readable by
        // whoever may compare it) makes etcd wait for its read index; its answer is dropped.
        let barrier = match txn.compares.first() {
            Some(c) if txn.success.is_empty() && txn.failure.is_empty() => Some(ec::TxnOp::get(
                c.key.clone(),
                Some(ec::GetOptions::new().with_count_only()),
            )),
            _ => None,
        };
        let request = ec::Txn::new()
            .when(txn.compares.iter().map(compare).collect::<Vec<_>>())
            .and_then(match &barrier {
                Some(get) => vec![get.clone()],
                None => txn.success.iter().map(txn_op).collect::<Vec<_>>(),
            })
            .or_else(txn.failure.iter().map(txn_op).collect::<Vec<_>>());
        // A transaction that only reads (gets in both branches) can be sent again, and
        // hedged, as a range is: one sent to a silent member must not cost the whole
        // request timeout.
        let read_only = txn
            .success
            .iter()
            .chain(&txn.failure)
            .all(|op| matches!(op, TxnOp::Get(_)));
        let retry = if read_only {
            Retry::Idempotent
        } else {
            Retry::Unsent
        };
        let resp = self
            .call("txn", retry, |client| {
                let mut kv = kv_client(client);
                let request = request.clone();
                async move { kv.txn(request).await }
            })
            .await?;
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) => {
                // The past reads, one of which may have failed (etcd checks them in order;
                // which branch was taken is not known here).
                let reads: Vec<Revision> = txn
                    .success
                    .iter()
                    .chain(&txn.failure)
                    .filter_map(|op| match op {
                        TxnOp::Get(range) => Some(range.revision),
                        _ => None,
                    })
                    .collect();
                let error = naming(
                    map_err("txn", e, lease, &self.inner.endpoints),
                    txn_key(&txn),
                );
                return Err(self.fill_compacted(error, &reads).await);
            }
        };
        let header_revision = revision(resp.header());
        let mut answers = resp.op_responses();
        if barrier.is_some() {
            answers.clear();
        }
        let responses = answers
            .into_iter()
            .map(|op| match op {
                ec::TxnOpResponse::Put(_) => Ok(TxnOpResponse::Put),
                ec::TxnOpResponse::Get(get) => {
                    Ok(TxnOpResponse::Get(range_response(get, header_revision)))
                }
                ec::TxnOpResponse::Delete(del) => Ok(TxnOpResponse::Delete {
                    deleted: del.deleted(),
                }),
                ec::TxnOpResponse::Txn(_) => {
                    Err(Error::Store("txn: unexpected nested txn response".into()))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TxnResponse {
            succeeded: resp.succeeded(),
            header_revision,
            responses,
        })
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseGrant> {
        let whole = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0));
        let whole = i64::try_from(whole).map_err(|_| Error::invalid("lease ttl is too large"))?;
        let resp = self
            .call("lease grant", Retry::Unsent, |client| {
                let mut leases = client.lease_client();
                async move { leases.grant(whole, None).await }
            })
            .await?
            .map_err(|e| map_err("lease grant", e, 0, &self.inner.endpoints))?;
        if !resp.error().is_empty() {
            return Err(Error::Store(format!(
                "lease grant: {}",
                resp.error().to_lowercase()
            )));
        }
        tracing::debug!(lease = %format_args!("{:x}", resp.id()), ttl = resp.ttl(), "granted lease");
        self.granted(resp.id(), secs(resp.ttl()));
        self.open_keeper_soon(resp.id());
        Ok(LeaseGrant {
            id: resp.id(),
            ttl: secs(resp.ttl()),
        })
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Option<Duration>> {
        let after = self.inner.options.request_timeout;
        let deadline = Instant::now() + after;
        let (slot, granted) = self.keeper_slot(id);
        let result = timeout_at(deadline, self.keep_alive_once(id, &slot, granted, deadline)).await;
        drop(slot);
        match result {
            Ok(Ok(Some(ttl))) => {
                if granted.is_none() {
                    // A lease granted elsewhere (a resumed session): its TTL is known now.
                    if let Some(entry) = lock_unpoisoned(&self.inner.keepers).get_mut(&id) {
                        entry.granted = Some(ttl);
                    }
                }
                Ok(Some(ttl))
            }
            Ok(Ok(None)) => {
                tracing::debug!(lease = %format_args!("{id:x}"), "lease is gone");
                self.forget_keeper(id);
                Ok(None)
            }
            Ok(Err(e)) => {
                self.reset_keeper(id);
                Err(e)
            }
            Err(_) => {
                self.reset_keeper(id);
                Err(Error::Timeout {
                    operation: "lease keep-alive",
                    after,
                })
            }
        }
    }

    fn lease_keep_alive_done(&self, id: LeaseId) {
        self.forget_keeper(id);
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<()> {
        self.forget_keeper(id);
        // Revoking twice is harmless, so a revoke whose answer was lost (a connection reset
        // after etcd applied it) is sent again. Then "lease not found" may be our own
        // earlier attempt's doing: once more than one was sent, it counts as revoked.
        let attempts = AtomicU64::new(0);
        let answer = self
            .call("lease revoke", Retry::Idempotent, |client| {
                attempts.fetch_add(1, Ordering::Relaxed);
                let mut leases = client.lease_client();
                async move { leases.revoke(id).await }
            })
            .await?;
        match answer {
            Ok(_) => {}
            Err(e) if is_lease_not_found(&e) && attempts.load(Ordering::Relaxed) > 1 => {}
            Err(e) => return Err(map_err("lease revoke", e, id, &self.inner.endpoints)),
        }
        tracing::debug!(lease = %format_args!("{id:x}"), "revoked lease");
        Ok(())
    }

    async fn lease_time_to_live(&self, id: LeaseId) -> Result<Option<Duration>> {
        let resp = self
            .call("lease time-to-live", Retry::Idempotent, |client| {
                let mut leases = client.lease_client();
                async move { leases.time_to_live(id, None).await }
            })
            .await?;
        match resp {
            Ok(resp) if resp.ttl() < 0 => Ok(None),
            Ok(resp) => Ok(Some(secs(resp.ttl()))),
            Err(e) if is_lease_not_found(&e) => Ok(None),
            Err(e) => Err(map_err("lease time-to-live", e, id, &self.inner.endpoints)),
        }
    }

    async fn watch(&self, watch: Watch) -> Result<WatchStream> {
        Ok(self.watch_created(watch).await?.1)
    }

    async fn watch_from_now(&self, mut watch: Watch) -> Result<(Revision, WatchStream)> {
        watch.start_revision = 0;
        self.watch_created(watch).await
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        if revision <= 0 {
            return Err(Error::invalid("compact revision must be positive"));
        }
        let started = Instant::now();
        let resp = self
            .call("compact", Retry::Unsent, |client| {
                let mut kv = kv_client(client);
                async move { kv.compact(revision, None).await }
            })
            .await?;
        match resp {
            Ok(_) => {
                tracing::debug!(revision, "compacted");
                Ok(())
            }
            Err(e) if status_message(&e).is_some_and(|m| m.contains("has been compacted")) => {
                let left = self
                    .inner
                    .options
                    .request_timeout
                    .saturating_sub(started.elapsed())
                    .min(Duration::from_secs(2));
                let compact_revision = self.compact_revision(left).await.unwrap_or(revision);
                Err(Error::Compacted {
                    requested: revision,
                    compact_revision,
                })
            }
            Err(e) => Err(map_err("compact", e, 0, &self.inner.endpoints)),
        }
    }
}

impl EtcdStore {
    /// Create a watch; returns etcd's revision when it registered the watch (a watch from the
    /// next write delivers every event above it) with the stream.
    async fn watch_created(&self, watch: Watch) -> Result<(Revision, WatchStream)> {
        let mut options = ec::WatchOptions::new();
        if let KeyRange::Prefix(_) = watch.keys {
            options = options.with_prefix();
        }
        if watch.start_revision > 0 {
            options = options.with_start_revision(watch.start_revision);
        }
        if watch.prev_kv {
            options = options.with_prev_key();
        }
        if watch.deletes_only {
            options = options.with_filters([ec::WatchFilterType::NoPut]);
        }
        let key = watch.keys.bytes().to_vec();
        // Join a shared stream if one takes the watch within a hedging share of the request
        // timeout; else open a stream, as hedged and retried as any watch creation.
        // The whole creation, shared stream or not, within one request timeout.
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let share = self.inner.options.request_timeout / HEDGES as u32;
        let join = |within| {
            let generation = self.inner.auth_generation.load(Ordering::Acquire);
            watches::Stream::join(
                &self.inner.watch_streams,
                generation,
                &key,
                &options,
                within,
            )
        };
        // A request etcd may find too large ends the stream it is sent on: not a shared one.
        let keys = key.len() * if options_prefix(&watch) { 2 } else { 1 };
        if keys > watches::MAX_SHARED_KEYS {
            let (created, member) = self
                .open_watch_stream(&key, &options, deadline, false)
                .await?;
            return self.watching(created, member, &watch, &key);
        }
        let mut joined = join(share).await;
        if let watches::Joined::Open | watches::Joined::Silent = joined {
            // No stream to join, or the one asked was silent (and is retired): one stream
            // is opened at a time, so that watches created together share it (those that
            // found the same stream silent too); a watch that waits a hedging share for
            // that opens one of its own.
            let opening = tokio::time::timeout(share, self.inner.watch_opening.lock())
                .await
                .ok();
            // A stream the watch finds now was just opened, on a member that answered:
            // half a share for its reply, to leave time to open one if it does not come.
            if opening.is_some() {
                joined = join(share / 2).await;
            }
            if let watches::Joined::Open = joined {
                joined = watches::Joined::Silent;
            }
            // `opening` is held while the stream opens, below.
            let (created, member) = self.joined(joined, &key, &options, deadline).await?;
            drop(opening);
            return self.watching(created, member, &watch, &key);
        }
        let (created, member) = self.joined(joined, &key, &options, deadline).await?;
        self.watching(created, member, &watch, &key)
    }

    /// The watch `joined` gave, or one on a stream of its own.
    async fn joined(
        &self,
        joined: watches::Joined,
        key: &[u8],
        options: &ec::WatchOptions,
        deadline: Instant,
    ) -> Result<(ec::WatchResponse, Option<watches::Member>)> {
        match joined {
            watches::Joined::Created(created, member) => Ok((created, member)),
            watches::Joined::Open | watches::Joined::Silent => {
                self.open_watch_stream(key, options, deadline, true).await
            }
            // Refused on a shared stream: if the store authenticates, the stream's token
            // may be the reason (etcd 3.4 then says "permission denied" too). A stream of
            // its own, opened with the current token, tells; if that one is let in, the
            // shared one is retired.
            watches::Joined::Refused(created, stream) => {
                if self.inner.options.credentials.is_none() {
                    return Ok((created, None));
                }
                let (created, member) =
                    self.open_watch_stream(key, options, deadline, true).await?;
                if member.is_some() {
                    stream.retire();
                }
                Ok((created, member))
            }
        }
    }

    /// The stream of events of a created watch (or of its error).
    fn watching(
        &self,
        created: ec::WatchResponse,
        member: Option<watches::Member>,
        watch: &Watch,
        key: &[u8],
    ) -> Result<(Revision, WatchStream)> {
        let requested = watch.start_revision;
        // etcd registers a watch from the next write at its revision then plus one.
        let at = revision(created.header());
        let Some(member) = member else {
            let error = naming(cancel_error(&created, requested), key);
            if !matches!(error, Error::Compacted { .. }) {
                return Err(error);
            }
            return Ok((
                at,
                Box::pin(futures::stream::once(async move { Err(error) })),
            ));
        };
        tracing::debug!(
            watch_id = created.watch_id(),
            start_revision = requested,
            "watch created"
        );
        let state = WatchState {
            member: Some(member),
            requested,
        };
        Ok((at, Box::pin(futures::stream::unfold(state, next_batch))))
    }

    /// Open a `Watch` stream with the watch `key`, `options` as its first, and, if `share`,
    /// share it with later watches unless etcd canceled this one at once. Returns etcd's
    /// "created" reply and, unless canceled, the watch.
    async fn open_watch_stream(
        &self,
        key: &[u8],
        options: &ec::WatchOptions,
        mut deadline: Instant,
        share: bool,
    ) -> Result<(ec::WatchResponse, Option<watches::Member>)> {
        let mut reauthenticated = false;
        let (stream, created, generation) = loop {
            let generation = self.inner.auth_generation.load(Ordering::Acquire);
            let (stream, created) = self
                .call_until("watch", Retry::Idempotent, deadline, |client| {
                    let mut watches = watch_client(client);
                    let (key, options) = (key.to_vec(), options.clone());
                    async move {
                        let mut stream = watches.watch(key, Some(options)).await?;
                        // etcd answers a create request with a "created" response; wait for it
                        // so that the watch is registered when this returns.
                        let created = stream.message().await?;
                        Ok((stream, created))
                    }
                })
                .await?
                .map_err(|e| naming(map_err("watch", e, 0, &self.inner.endpoints), key))?;
            // etcd cancels a watch created with an expired token: get a new one, try again.
            let stale = created
                .as_ref()
                .is_some_and(|c| c.canceled() && is_stale_token_message(c.cancel_reason()));
            if stale && !reauthenticated && self.inner.options.credentials.is_some() {
                reauthenticated = true;
                let after = self.inner.options.request_timeout;
                self.reauthenticate(generation, Instant::now() + after, "watch", after)
                    .await?;
                // The watch is created again, with a request timeout of its own.
                deadline = Instant::now() + after;
                continue;
            }
            break (stream, created, generation);
        };
        let Some(created) = created else {
            return Err(Error::Unavailable(
                "watch: the stream ended before the watch was created".into(),
            ));
        };
        if !created.created() {
            return Err(Error::Store(
                "watch: etcd did not confirm the watch creation".into(),
            ));
        }
        if created.canceled() {
            return Ok((created, None));
        }
        let (shared, member) = watches::Stream::start(
            stream,
            &created,
            generation,
            self.inner.endpoints.clone(),
            &self.inner.runtime,
            self.inner.options.request_timeout / HEDGES as u32,
        );
        if share {
            lock_unpoisoned(&self.inner.watch_streams).push(shared);
        }
        Ok((created, Some(member)))
    }
}

/// Whether `watch` is of a prefix (its request carries a range end as long as its key).
fn options_prefix(watch: &Watch) -> bool {
    matches!(watch.keys, KeyRange::Prefix(_))
}

/// The state of a watch stream: the watch on its shared gRPC stream (dropping it cancels
/// the watch on the server).
struct WatchState {
    member: Option<watches::Member>,
    requested: Revision,
}

async fn next_batch(mut state: WatchState) -> Option<(Result<WatchResponse>, WatchState)> {
    let member = state.member.as_mut()?;
    loop {
        match member.next().await {
            Some(Ok(resp)) => {
                if resp.canceled() || resp.compact_revision() > 0 {
                    let error = cancel_error(&resp, state.requested);
                    tracing::debug!(watch_id = resp.watch_id(), error = %error, "watch canceled by etcd");
                    state.member = None;
                    return Some((Err(error), state));
                }
                if resp.events().is_empty() {
                    // A progress notification: nothing to deliver.
                    continue;
                }
                let batch = WatchResponse {
                    header_revision: revision(resp.header()),
                    events: resp.events().iter().map(event).collect(),
                };
                return Some((Ok(batch), state));
            }
            None => {
                tracing::debug!("watch stream ended");
                return None;
            }
            Some(Err(error)) => {
                tracing::debug!(error = %error, "watch stream failed");
                state.member = None;
                return Some((Err(error), state));
            }
        }
    }
}

/// The error for a watch that etcd canceled.
fn cancel_error(resp: &ec::WatchResponse, requested: Revision) -> Error {
    if resp.compact_revision() > 0 {
        Error::Compacted {
            requested,
            compact_revision: resp.compact_revision(),
        }
    } else if let Some(error) = auth_error("watch", None, resp.cancel_reason()) {
        error
    } else if resp.cancel_reason().is_empty() {
        Error::Store("watch: canceled by etcd".into())
    } else {
        Error::Store(format!(
            "watch: canceled by etcd: {}",
            resp.cancel_reason().to_lowercase()
        ))
    }
}

fn event(e: &ec::Event) -> Event {
    Event {
        kind: match e.event_type() {
            ec::EventType::Put => EventKind::Put,
            ec::EventType::Delete => EventKind::Delete,
        },
        kv: e.kv().map(key_value).unwrap_or_default(),
        prev_kv: e.prev_kv().map(key_value),
    }
}

fn key_value(kv: &ec::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn owned_key_value(kv: ec::KeyValue) -> KeyValue {
    let (create_revision, mod_revision, version, lease) = (
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease(),
    );
    let (key, value) = kv.into_key_value();
    KeyValue {
        key,
        value,
        create_revision,
        mod_revision,
        version,
        lease,
    }
}

fn revision(header: Option<&ec::ResponseHeader>) -> Revision {
    header.map_or(0, ec::ResponseHeader::revision)
}

/// Convert a range answer; `fallback_revision` stands in for a missing header revision
/// (inside a txn).
fn range_response(mut resp: ec::GetResponse, fallback_revision: Revision) -> RangeResponse {
    let header_revision = match revision(resp.header()) {
        0 => fallback_revision,
        r => r,
    };
    let more = resp.more();
    RangeResponse {
        header_revision,
        kvs: resp.take_kvs().into_iter().map(owned_key_value).collect(),
        more,
    }
}

/// A duration of `n` whole seconds (negative counts as zero).
fn secs(n: i64) -> Duration {
    Duration::from_secs(u64::try_from(n).unwrap_or(0))
}

fn get_options(range: &Range) -> ec::GetOptions {
    let mut options = ec::GetOptions::new();
    if let KeyRange::Prefix(_) = range.keys {
        options = options.with_prefix();
    }
    if let Some((target, order)) = range.sort {
        let target = match target {
            SortTarget::Key => ec::SortTarget::Key,
            SortTarget::CreateRevision => ec::SortTarget::Create,
            SortTarget::ModRevision => ec::SortTarget::Mod,
        };
        let order = match order {
            SortOrder::Ascending => ec::SortOrder::Ascend,
            SortOrder::Descending => ec::SortOrder::Descend,
        };
        options = options.with_sort(target, order);
    }
    if range.limit > 0 {
        options = options.with_limit(range.limit);
    }
    if range.max_create_revision > 0 {
        options = options.with_max_create_revision(range.max_create_revision);
    }
    if range.max_mod_revision > 0 {
        options = options.with_max_mod_revision(range.max_mod_revision);
    }
    if range.revision > 0 {
        options = options.with_revision(range.revision);
    }
    if range.keys_only {
        options = options.with_keys_only();
    }
    options
}

fn put_options(lease: LeaseId) -> Option<ec::PutOptions> {
    (lease != 0).then(|| ec::PutOptions::new().with_lease(lease))
}

fn delete_options(keys: &KeyRange) -> ec::DeleteOptions {
    match keys {
        KeyRange::Key(_) => ec::DeleteOptions::new(),
        KeyRange::Prefix(_) => ec::DeleteOptions::new().with_prefix(),
    }
}

fn compare(c: &Compare) -> ec::Compare {
    let op = match c.op {
        CompareOp::Equal => ec::CompareOp::Equal,
        CompareOp::NotEqual => ec::CompareOp::NotEqual,
        CompareOp::Greater => ec::CompareOp::Greater,
        CompareOp::Less => ec::CompareOp::Less,
    };
    let key = c.key.clone();
    match &c.target {
        CompareTarget::CreateRevision(r) => ec::Compare::create_revision(key, op, *r),
        CompareTarget::ModRevision(r) => ec::Compare::mod_revision(key, op, *r),
        CompareTarget::Version(v) => ec::Compare::version(key, op, *v),
        CompareTarget::Value(v) => ec::Compare::value(key, op, v.clone()),
        CompareTarget::Lease(l) => ec::Compare::lease(key, op, *l),
    }
}

fn txn_op(op: &TxnOp) -> ec::TxnOp {
    match op {
        TxnOp::Put { key, value, lease } => {
            ec::TxnOp::put(key.clone(), value.clone(), put_options(*lease))
        }
        TxnOp::Get(range) => ec::TxnOp::get(range.keys.bytes().to_vec(), Some(get_options(range))),
        TxnOp::Delete(keys) => ec::TxnOp::delete(keys.bytes().to_vec(), Some(delete_options(keys))),
    }
}

fn lock_unpoisoned<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The gRPC status message, if etcd (or the transport) answered with a status.
fn status_message(e: &ec::Error) -> Option<&str> {
    match e {
        ec::Error::GRpcStatus(s) => Some(s.message()),
        _ => None,
    }
}

/// The gRPC status code as a number, if any.
fn status_code(e: &ec::Error) -> Option<i32> {
    match e {
        ec::Error::GRpcStatus(s) => Some(s.code() as i32),
        _ => None,
    }
}

/// A lowercase, one-line description of an etcd-client error with its causes. gRPC and
/// transport errors never carry keys' values.
fn describe(e: &ec::Error) -> String {
    let (mut text, mut source): (String, Option<&(dyn std::error::Error + 'static)>) = match e {
        ec::Error::GRpcStatus(s) => {
            let text = if s.message().is_empty() {
                format!("grpc status {:?}", s.code())
            } else {
                s.message().to_string()
            };
            (text, std::error::Error::source(s))
        }
        ec::Error::TransportError(t) => (t.to_string(), std::error::Error::source(t)),
        other => (other.to_string(), None),
    };
    while let Some(cause) = source {
        let part = cause.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text.to_lowercase()
}

/// etcd's refusal of a request that requires a leader, by a member that has none.
const NO_LEADER: &str = "etcdserver: no leader";

/// True if the request provably never reached a member (the connection could not be made),
/// or was refused before anything was proposed (no leader).
fn is_unsent(e: &ec::Error) -> bool {
    // A refused handshake sent nothing. The next attempt may reach another member (one
    // member's certificate expired, say); `call` stops retrying once the refusals are too
    // many for that to be luck, and the error becomes `Error::Tls`.
    if is_tls_rejection(e) {
        return true;
    }
    let connect_failed = |text: &str| {
        text.contains("connect error")
            || text.contains("error trying to connect")
            || text.contains("connection refused")
    };
    match e {
        // Refused by a member without a leader before anything was proposed (the
        // `hasleader` check, which every request carries).
        ec::Error::GRpcStatus(s)
            if s.code() as i32 == CODE_UNAVAILABLE && s.message() == NO_LEADER =>
        {
            true
        }
        ec::Error::GRpcStatus(s) if s.code() as i32 == CODE_UNAVAILABLE => {
            connect_failed(&describe(e))
        }
        ec::Error::TransportError(_) => connect_failed(&describe(e)),
        _ => false,
    }
}

/// True if a (re)connection failed because a TLS handshake was refused for good by that
/// member: a certificate that does not verify, a client certificate the server refuses.
/// Retrying that member cannot fix it; another member may be fine, so `call` retries it
/// (as unsent) a bounded number of times before it becomes `Error::Tls`.
fn is_tls_rejection(e: &ec::Error) -> bool {
    matches!(
        e,
        ec::Error::TransportError(_) | ec::Error::GRpcStatus(_) | ec::Error::IoError(_)
    ) && tls_rejection(&describe(e)).is_some()
}

/// True for failures that may pass on their own: a member unavailable, a broken
/// connection, a dropped stream. Safe to retry only for requests that may run twice.
/// The channel's backstop timeout (`with_timeout`: the request timeout plus 1 s) ended the
/// request: tonic's `Cancelled` "Timeout expired". Whether it was applied is not known.
fn is_backstop_timeout(e: &ec::Error) -> bool {
    matches!(e, ec::Error::GRpcStatus(s)
        if s.code() as i32 == CODE_CANCELLED && s.message() == "Timeout expired")
}

fn is_transient(e: &ec::Error) -> bool {
    match e {
        ec::Error::GRpcStatus(s) => {
            let code = s.code() as i32;
            code == CODE_UNAVAILABLE
                || (code != CODE_INVALID_ARGUMENT
                    && code != CODE_NOT_FOUND
                    && !s.message().starts_with("etcdserver:")
                    && describe(e).contains("connection"))
        }
        ec::Error::TransportError(_)
        | ec::Error::IoError(_)
        | ec::Error::WatchError(_)
        | ec::Error::LeaseKeepAliveError(_) => !is_lease_not_found(e),
        _ => false,
    }
}

/// The error for a status (or a watch's cancel reason) that is about credentials or
/// permissions, if it is. The message names the problem in words, never the token.
fn auth_error(operation: &'static str, code: Option<i32>, message: &str) -> Option<Error> {
    let m = message.to_lowercase();
    if code == Some(CODE_PERMISSION_DENIED) || m.contains("permission denied") {
        return Some(Error::PermissionDenied(format!(
            "{operation}: the etcd user's roles do not cover the key"
        )));
    }
    let reason = if m.contains("authentication failed") || m.contains("invalid user id or password")
    {
        "etcd refused the user name or password"
    } else if m.contains("user name is empty") || m.contains("user name not found") {
        "etcd has authentication enabled: give a user and password"
    } else if m.contains("invalid auth token") || m.contains("revision of auth store is old") {
        "etcd refused the auth token and a new one could not be had"
    } else if code == Some(CODE_UNAUTHENTICATED) {
        "etcd refused the credentials"
    } else {
        return None;
    };
    Some(Error::Unauthenticated(format!("{operation}: {reason}")))
}

/// A permission error with the key it was about (keys are names, not secrets; values are
/// never shown). Other errors as they are.
fn naming(error: Error, key: &[u8]) -> Error {
    match error {
        Error::PermissionDenied(m) => {
            Error::PermissionDenied(format!("{m} {:?}", String::from_utf8_lossy(key)))
        }
        other => other,
    }
}

/// The first key a transaction names: of its compares, else of its operations.
fn txn_key(txn: &Txn) -> &[u8] {
    txn.compares
        .first()
        .map(|c| c.key.as_slice())
        .or_else(|| {
            txn.success
                .iter()
                .chain(&txn.failure)
                .next()
                .map(|op| match op {
                    TxnOp::Put { key, .. } => key.as_slice(),
                    TxnOp::Get(range) => range.keys.bytes(),
                    TxnOp::Delete(keys) => keys.bytes(),
                })
        })
        .unwrap_or_default()
}

/// True for errors about credentials or permissions (never retried).
fn is_auth_error(e: &ec::Error) -> bool {
    match e {
        ec::Error::GRpcStatus(s) => auth_error("", Some(s.code() as i32), s.message()).is_some(),
        _ => false,
    }
}

/// True if etcd refused the token as expired or issued before the roles changed.
fn is_stale_token(e: &ec::Error) -> bool {
    match e {
        ec::Error::GRpcStatus(s) => is_stale_token_message(s.message()),
        _ => false,
    }
}

fn is_stale_token_message(message: &str) -> bool {
    message.contains("invalid auth token") || message.contains("revision of auth store is old")
}

/// Authenticate with `credentials` (nothing without). A cluster without authentication
/// enabled is used without a token, as etcdctl and Go's client do.
async fn authenticate(
    client: &mut ec::Client,
    credentials: Option<&Credentials>,
) -> std::result::Result<(), ec::Error> {
    let Some(creds) = credentials else {
        return Ok(());
    };
    let pair = (creds.user.clone(), creds.password.expose().to_string());
    match client.update_user(Some(pair)).await {
        Err(e)
            if status_message(&e).is_some_and(|m| m.contains("authentication is not enabled")) =>
        {
            tracing::debug!(user = %creds.user, "etcd has authentication disabled; going on without a token");
            Ok(())
        }
        other => other,
    }
}

/// etcd-client's TLS options from ours: the CA (else the system's roots) and the client
/// certificate, if any. `endpoints` (redacted) name the cluster in errors.
fn tls_options(tls: &TlsConfig, endpoints: &str) -> Result<ec::TlsOptions> {
    let mut options = ec::TlsOptions::new();
    options = match tls.read_ca()? {
        Some(pem) => options.ca_certificate(ec::Certificate::from_pem(pem)),
        None => options.with_native_roots(),
    };
    if let Some((cert, key)) = tls.read_identity(endpoints)? {
        options = options.identity(ec::Identity::from_pem(cert, key));
    }
    Ok(options)
}

/// The [`Error::Tls`] for `http://` endpoints that are TLS servers, if every one of them
/// answers a TLS ClientHello (see [`speaks_tls`]): `reason`, the failure seen, follows the
/// advice. `None` if any does not (a plaintext member that hangs up is an outage, retried).
/// Waits at most [`TLS_PROBE_TIMEOUT`], and not past `deadline`.
async fn plaintext_to_tls(
    endpoints: &[String],
    joined: &str,
    reason: &str,
    deadline: Instant,
) -> Option<Error> {
    let within = TLS_PROBE_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
    let probes = endpoints.iter().map(|endpoint| async move {
        let Ok(url) = url::Url::parse(endpoint.trim()) else {
            return false;
        };
        match (url.host_str(), url.port_or_known_default()) {
            (Some(host), Some(port)) => speaks_tls(host, port, within).await,
            _ => false,
        }
    });
    if !futures::future::join_all(probes)
        .await
        .into_iter()
        .all(|tls| tls)
    {
        return None;
    }
    tracing::debug!(endpoints = %joined, "the http:// endpoints speak TLS");
    tls_problem(&format!("{TLS_REPLY} ({reason})"), false).map(|reason| Error::Tls {
        endpoints: joined.to_string(),
        reason,
    })
}

fn is_lease_not_found(e: &ec::Error) -> bool {
    match e {
        ec::Error::GRpcStatus(s) => s.message().contains("requested lease not found"),
        ec::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// Map an etcd-client error to Baton's. `lease` names the lease of the request, if any,
/// for [`Error::LeaseNotFound`]; `endpoints` (redacted) name the cluster, for [`Error::Tls`].
fn map_err(operation: &'static str, e: ec::Error, lease: LeaseId, endpoints: &str) -> Error {
    if is_lease_not_found(&e) {
        return Error::LeaseNotFound(lease);
    }
    let text = describe(&e);
    // A reconnection whose handshake fails for good (the server's certificate is no longer
    // trusted, ours is refused): a configuration problem, as at connect, not an outage.
    if let Some(reason) = tls_rejection(&text) {
        return Error::Tls {
            endpoints: endpoints.to_string(),
            reason: format!("{operation}: {reason}"),
        };
    }
    if let ec::Error::GRpcStatus(status) = &e {
        if let Some(error) = auth_error(operation, Some(status.code() as i32), status.message()) {
            return error;
        }
    }
    if let Some(message) = status_message(&e).map(str::to_lowercase) {
        if message.contains("request is too large") || message.contains("larger than max") {
            return Error::InvalidArgument(format!("{operation}: request is too large"));
        }
        if message.contains("too large lease ttl") {
            return Error::InvalidArgument(format!("{operation}: lease ttl is too large"));
        }
        if message.contains("future revision") {
            return Error::InvalidArgument(format!("{operation}: revision is in the future"));
        }
        if message.contains("has been compacted") {
            return Error::Compacted {
                requested: 0,
                compact_revision: 0,
            };
        }
        if status_code(&e) == Some(CODE_INVALID_ARGUMENT) {
            return Error::InvalidArgument(format!("{operation}: {text}"));
        }
    }
    match e {
        ec::Error::InvalidArgs(_) | ec::Error::InvalidUri(_) => {
            Error::InvalidArgument(format!("{operation}: {text}"))
        }
        _ if is_transient(&e) => Error::Unavailable(format!("{operation}: {text}")),
        _ => Error::Store(format!("{operation}: {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_ttls() {
        assert_eq!(secs(-1), Duration::ZERO);
        assert_eq!(secs(3), Duration::from_secs(3));
    }

    /// Malformed endpoints are refused at once, before any dial, not reported as a
    /// retryable failure to connect after the dial timeout.
    #[tokio::test]
    async fn malformed_endpoints_are_refused_before_dialling() {
        for endpoints in [
            vec!["http://h:99999"],
            vec!["ftp://127.0.0.1:1"],
            vec!["http://127.0.0.1:0"],
            vec!["127.0.0.1:1"],
            vec!["http://:1"],
            vec!["http://127.0.0.1"],
            vec!["http://127.0.0.1:1/path"],
            vec!["http://127.0.0.1:1", "http://h:99999"],
            vec![""],
        ] {
            let endpoints: Vec<String> = endpoints.into_iter().map(String::from).collect();
            let options = EtcdOptions {
                dial_timeout: Duration::from_secs(2),
                ..EtcdOptions::default()
            };
            let started = std::time::Instant::now();
            let err = EtcdStore::connect(&endpoints, options).await.unwrap_err();
            assert!(
                matches!(err, Error::InvalidEndpoint { .. }),
                "{endpoints:?}: {err}"
            );
            assert!(!err.is_retryable(), "{endpoints:?}: {err}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{endpoints:?}: refused only after {:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn maps_client_errors() {
        let gone = ec::Error::LeaseKeepAliveError("lease not found".into());
        assert!(is_lease_not_found(&gone));
        assert!(matches!(
            map_err("lease keep-alive", gone, 7, ""),
            Error::LeaseNotFound(7)
        ));
        let invalid = ec::Error::InvalidArgs("empty endpoints".into());
        assert!(map_err("put", invalid, 0, "").is_invalid_input());
        let broken = ec::Error::WatchError("channel closed".into());
        assert!(is_transient(&broken));
        assert!(!is_unsent(&broken));
        assert!(matches!(
            map_err("watch", broken, 0, ""),
            Error::Unavailable(ref m) if m.starts_with("watch: ")
        ));
        let no_leader = ec::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: no leader"));
        // Refused before it was proposed: a write may go to another member.
        assert!(is_unsent(&no_leader));
        let timed_out =
            ec::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: request timed out"));
        assert!(!is_unsent(&timed_out));
        let e = map_err("put", no_leader, 0, "");
        assert!(
            matches!(e, Error::Unavailable(_)) && e.is_retryable(),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "backend unavailable: put: etcdserver: no leader"
        );
        let refused = ec::Error::GRpcStatus(tonic::Status::failed_precondition(
            "etcdserver: requested lease not found",
        ));
        assert!(matches!(
            map_err("put", refused, 0, ""),
            Error::LeaseNotFound(_)
        ));
    }

    #[test]
    fn maps_auth_errors() {
        let denied = ec::Error::GRpcStatus(tonic::Status::permission_denied(
            "etcdserver: permission denied",
        ));
        let e = map_err("txn", denied, 0, "");
        assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
        assert!(!e.is_retryable() && e.is_access_denied());
        let failed = ec::Error::GRpcStatus(tonic::Status::invalid_argument(
            "etcdserver: authentication failed, invalid user ID or password",
        ));
        assert!(is_auth_error(&failed));
        let e = map_err("connect", failed, 0, "");
        assert!(matches!(e, Error::Unauthenticated(_)), "{e}");
        assert!(!e.is_retryable());
        let expired = ec::Error::GRpcStatus(tonic::Status::unauthenticated(
            "etcdserver: invalid auth token",
        ));
        assert!(is_stale_token(&expired));
        assert!(matches!(
            map_err("range", expired, 0, ""),
            Error::Unauthenticated(_)
        ));
        assert!(auth_error("watch", None, "etcdserver: permission denied").is_some());
        assert!(auth_error("watch", None, "").is_none());
    }

    #[test]
    fn names_tls_problems() {
        let unknown = "transport error: invalid peer certificate: UnknownIssuer";
        let hint = tls_problem(unknown, true).unwrap();
        assert!(
            hint.contains("trusted CA") && hint.contains("--cacert"),
            "{hint}"
        );
        let name = tls_problem("invalid peer certificate: NotValidForName", true).unwrap();
        assert!(name.contains("host name"), "{name}");
        let required = tls_problem("received fatal alert: CertificateRequired", true).unwrap();
        assert!(required.contains("client certificate"), "{required}");
        assert!(tls_problem("connection refused", true).is_none());
    }

    #[test]
    fn default_options() {
        let options = EtcdOptions::default();
        assert_eq!(options.dial_timeout, Duration::from_secs(5));
        assert_eq!(options.request_timeout, Duration::from_secs(10));
    }
}

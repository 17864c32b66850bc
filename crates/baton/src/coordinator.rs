//! Backend-neutral locks and elections: code written against these traits runs on etcd, the
//! embedded store, Redis or Redlock by changing only the URL.
//!
//! The concrete types ([`Mutex`], [`Election`], …) offer everything their backend can do.
//! These traits offer what every backend can do, behind one [`Coordinator`]:
//!
//! ```
//! use std::time::Duration;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> baton::Result<()> {
//! let coord = baton::Coordinator::builder("mem://")      // or http://…, redis://…, redlock://…
//!     .with_ttl(Duration::from_secs(10))
//!     .connect()
//!     .await?;
//! let lock = coord.lock("jobs/report")?;
//! let guard = lock.lock().await?;
//! println!("token {:?}", guard.fencing_token());
//! guard.release().await?;
//! coord.close().await?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use tokio_util::sync::CancellationToken;

use crate::client::{
    redact, Client, ClientBuilder, Endpoints, DEFAULT_DIAL_TIMEOUT, DEFAULT_REQUEST_TIMEOUT,
};
use crate::election::{poll_leader, Election, Leader, LeaderEvents, Leadership};
use crate::error::{Error, Result};
use crate::mutex::{Mutex, MutexGuard};
use crate::queue::with_timeout;
use crate::security::{Credentials, Secret, TlsConfig};
use crate::session::{Session, DEFAULT_TTL};
use crate::store::LeaseId;

/// Something held: a lock, or a leadership.
///
/// # Drop behaviour
///
/// Dropping a guard releases it in a task spawned on the current tokio runtime (best
/// effort; without a runtime, if that fails, or if the runtime shuts down first, as when a
/// guard is dropped as `#[tokio::main]` returns, the hold ends with its TTL). The release
/// is not done when the drop returns: a `try_lock` right after may still find the lock
/// taken (on Redis most of the time: 44 of 50 here; tasks of one etcd or embedded-store
/// coordinator wait for it). Call [`release()`](Guard::release) to know it is done.
#[async_trait]
pub trait Guard: Send + Sync + fmt::Debug {
    /// What is held, relative to the coordinator's namespace (never with the namespace in
    /// front), so that code and scripts see the same thing whichever the backend:
    /// - etcd and the embedded store: the key `NAME/<lease id in hex>`;
    /// - Redis and Redlock: the name `NAME` (the Redis key is the namespace plus the name;
    ///   `RedisLockGuard::key` gives it).
    fn key(&self) -> &str;

    /// The fencing token of this grant, strictly greater than every earlier grant's, or
    /// `None` where the backend has no safe token (Redlock).
    fn fencing_token(&self) -> Option<i64>;

    /// The store revision at which the hold was granted, on etcd and the embedded store
    /// (`MutexGuard::granted_revision`: what `etcdctl lock` exports as `ETCD_LOCK_REV`);
    /// `None` on Redis (the default).
    fn granted_revision(&self) -> Option<i64> {
        None
    }

    /// True once the hold is lost: true at once when its local deadline has passed, even if
    /// the background task that watches it has not run since (a paused process). Check it
    /// right before acting on the hold.
    fn is_lost(&self) -> bool;

    /// Why the hold was lost, if it was (checking the local deadline first).
    fn lost_reason(&self) -> Option<String>;

    /// A token cancelled when the hold is lost (`token.cancelled().await` waits for it).
    /// Already cancelled if the local deadline has passed when this is called; later,
    /// cancelled by the background task or by the first `is_lost()` that finds it passed.
    fn lost_token(&self) -> CancellationToken;

    /// The local deadline, on tokio's (monotonic) clock: the hold is certainly ours until
    /// then, unless it is lost sooner (its key deleted, its lease revoked); after it, the
    /// backend may give it to another at any time. It moves later with each acknowledged
    /// keep-alive (etcd, the embedded store) or extend (Redis). `None` where the backend
    /// does not tell (the default).
    ///
    /// `baton lock -- CMD` hands it to the process that ends CMD if `baton` dies or stops,
    /// so that CMD never outlives the hold for long.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        None
    }

    /// Release: unlock, or resign. [`Error::NotHeld`] / [`Error::NotLeader`] if it had
    /// already been lost.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release may or may not have happened; the hold then
    /// ends with its TTL.
    async fn release(self: Box<Self>) -> Result<()>;
}

/// A named lock on some backend.
#[async_trait]
pub trait Lock: Send + Sync + fmt::Debug {
    /// The lock's name.
    fn name(&self) -> &str;

    /// Wait until the lock is ours.
    ///
    /// With the backend unreachable, the backends differ: on etcd and the embedded store,
    /// it fails once the coordinator's session is lost (no keep-alive answered for a TTL, or
    /// its lease revoked) with [`Error::SessionLost`], or with the store's error (a retryable
    /// [`Error::Unavailable`], say), and the next call starts a new session: `SessionLost`
    /// says [`is_lost()`](Error::is_lost), not [`is_retryable()`](Error::is_retryable), yet
    /// here calling again is what to do (nothing was held). On Redis and Redlock it retries
    /// until the lock is ours.
    /// Use [`lock_timeout`](Lock::lock_timeout) to bound the wait on every backend.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future leaves nothing queued.
    async fn lock(&self) -> Result<Box<dyn Guard>>;

    /// [`lock`](Lock::lock), failing with [`Error::Timeout`] after `timeout`.
    ///
    /// On timeout, our place in the queue is removed before the error is returned: this
    /// can add up to 500 ms to `timeout` when the backend is slow or unreachable (on etcd
    /// with the server down, `lock_timeout(2 s)` returns after 2.5 s; Redis refusing
    /// connections answers at once), then the removal goes on in the background.
    ///
    /// The timeout covers the requests too: one shorter than a round trip to the backend
    /// (`Duration::ZERO`, a millisecond) can fail even on a free lock, on etcd and Redis;
    /// the embedded store answers at once. To try once, use
    /// [`try_lock`](Lock::try_lock).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    async fn lock_timeout(&self, timeout: Duration) -> Result<Box<dyn Guard>>;

    /// Take the lock only if it is free, else [`Error::Locked`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    async fn try_lock(&self) -> Result<Box<dyn Guard>>;
}

/// A leadership held on some backend.
#[async_trait]
pub trait Leading: Guard {
    /// The value we last proclaimed.
    fn value(&self) -> &[u8];

    /// Publish a new value while we lead; [`Error::NotLeader`] if we no longer do.
    ///
    /// # Cancel safety
    ///
    /// The value may or may not have been published if the future is dropped.
    async fn proclaim(&mut self, value: Vec<u8>) -> Result<()>;
}

/// A named election on some backend.
#[async_trait]
pub trait Elector: Send + Sync + fmt::Debug {
    /// The election's name.
    fn name(&self) -> &str;

    /// Stand with `value` and wait until we lead.
    ///
    /// With the backend unreachable, the backends differ as for [`Lock::lock`]: use
    /// [`campaign_timeout`](Elector::campaign_timeout) to bound the wait.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future withdraws the candidacy.
    async fn campaign(&self, value: Vec<u8>) -> Result<Box<dyn Leading>>;

    /// [`campaign`](Elector::campaign), failing with [`Error::Timeout`] after `timeout`.
    ///
    /// As with [`lock_timeout`](Lock::lock_timeout), a timeout shorter than a round trip
    /// can fail even when nobody leads, and the removal of our candidacy on timeout can add
    /// up to 500 ms when the backend is slow or unreachable.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    async fn campaign_timeout(&self, value: Vec<u8>, timeout: Duration)
        -> Result<Box<dyn Leading>>;

    /// The current leader, or [`Error::NoLeader`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    async fn leader(&self) -> Result<Leader>;

    /// Every leader change and proclaimed value, starting with the current leader. (On
    /// Redis, values proclaimed in quick succession may be skipped: observers see the
    /// latest; see `RedisElection::observe`.) It waits quietly while there is no leader;
    /// [`LeaderStream::with_vacancies`] reports that too.
    ///
    /// When it starts differs: on Redis, when `observe()` is called (changes made before
    /// the stream is first polled are delivered then); on etcd and the embedded store, when
    /// the stream is first polled (it starts with the leader at that moment). Poll it right
    /// away to see the same on both.
    ///
    /// Failures are retried, except when the backend refuses access (the user's etcd roles
    /// or Redis ACL do not cover the election): then the stream ends, on every backend, and
    /// [`LeaderStream::take_error`] says why.
    fn observe(&self) -> LeaderStream;
}

/// The stream of [`Leader`]s from [`Elector::observe`], on any backend. Dropping it stops
/// observing.
///
/// It ends when the coordinator is closed, or when the backend refuses access (the user's
/// etcd roles or Redis ACL do not cover the election, or its credentials are refused):
/// then [`take_error`](LeaderStream::take_error) says why. Other failures are retried.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// use futures::StreamExt;
///
/// let coordinator = baton::Coordinator::connect("mem://").await?;
/// let election = coordinator.election("scheduler")?;
/// let mut leaders = election.observe();
/// let leadership = election.campaign(b"10.0.0.7:8080".to_vec()).await?;
/// let leader = leaders.next().await.expect("a leader");
/// assert_eq!(leader.value, b"10.0.0.7:8080");
/// // While the stream goes on, there is no error to take.
/// assert!(leaders.take_error().is_none());
///
/// leadership.release().await?;
/// coordinator.close().await?;
/// while leaders.next().await.is_some() {}
/// // It ended because the coordinator was closed, not because access was refused.
/// assert!(leaders.take_error().is_none());
/// # Ok(())
/// # }
/// ```
pub struct LeaderStream {
    events: LeaderEvents,
}

impl LeaderStream {
    /// The leaders of `events`.
    pub(crate) fn new(events: LeaderEvents) -> Self {
        LeaderStream { events }
    }

    /// This stream, reporting also when the election has no leader: when observing starts
    /// with none, and each time a leader leaves with no candidate to follow it at once.
    /// See [`LeaderEvent::Vacant`](crate::LeaderEvent::Vacant) for how backends differ.
    pub fn with_vacancies(self) -> LeaderEvents {
        self.events
    }

    /// Why the stream ended, if the backend refused access
    /// ([`Error::is_access_denied`]); `None` otherwise (the coordinator was closed).
    ///
    /// Call it once the stream has ended (`next()` gave `None`). Before, it returns `None`
    /// while the stream is still observing; it may already return the error if observing
    /// has stopped but leaders read before the refusal are still to be yielded. The error
    /// is taken: a second call returns `None`.
    pub fn take_error(&mut self) -> Option<Error> {
        self.events.take_error()
    }

    /// While observing fails and is being retried (the backend unreachable, say), the
    /// message of the last failure; `None` while it works. For telling users that changes
    /// may be late: the stream recovers by itself.
    pub fn retrying(&self) -> Option<String> {
        self.events.retrying()
    }
}

impl fmt::Debug for LeaderStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderStream").finish_non_exhaustive()
    }
}

impl Stream for LeaderStream {
    type Item = Leader;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Leader>> {
        poll_leader(cx, |cx| self.events.poll_observed(cx))
    }
}

/// A connected backend, as [`Coordinator`] sees it. Implemented by the store family (etcd,
/// embedded) here, and by the Redis family in its own module.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// A short name: `"mem"`, `"etcd"`, `"redis"`, `"redlock"`.
    fn name(&self) -> &'static str;

    /// A lock named `name`.
    fn lock(&self, name: &str) -> Result<Box<dyn Lock>>;

    /// An election named `name`.
    fn election(&self, name: &str) -> Result<Box<dyn Elector>>;

    /// A token cancelled when everything this backend holds is lost at once (an etcd
    /// session's lease); `None` where holds are independent (Redis).
    fn lost_token(&self) -> Option<CancellationToken>;

    /// The store, for the etcd family.
    fn client(&self) -> Option<&Client>;

    /// The session's lease, for the etcd family.
    fn lease_id(&self) -> Option<LeaseId> {
        None
    }

    /// The Redis client, for the Redis family.
    #[cfg(feature = "redis")]
    fn redis(&self) -> Option<&crate::redis::RedisClient> {
        None
    }

    /// Release everything; on Redis, also disconnect (see [`Coordinator::close`]).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, holds not yet released end with their TTL.
    async fn close(&self) -> Result<()>;
}

/// Options for [`Coordinator`].
///
/// # Default
///
/// - TTL: 60 s ([`DEFAULT_TTL`]): the etcd session's lease, or each Redis lock's expiry;
/// - dial timeout: 5 s; request timeout: 10 s;
/// - TLS: only for `https://` and `rediss://` endpoints, with the system's roots;
/// - credentials: those in the URL, if any;
/// - namespace: none;
/// - on one Redis, lock waiters queue in FIFO order ([`without_fifo`](Self::without_fifo)).
///
/// Its `Debug` output redacts credentials.
#[derive(Clone)]
pub struct CoordinatorBuilder {
    endpoints: String,
    ttl: Duration,
    dial_timeout: Duration,
    request_timeout: Duration,
    tls: Option<TlsConfig>,
    credentials: Option<Credentials>,
    password: Option<Secret>,
    namespace: String,
    fifo: bool,
}

impl fmt::Debug for CoordinatorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoordinatorBuilder")
            .field("endpoints", &redact(&self.endpoints))
            .field("ttl", &self.ttl)
            .field("dial_timeout", &self.dial_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("tls", &self.tls)
            .field("credentials", &self.credentials)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("namespace", &self.namespace)
            .field("fifo", &self.fifo)
            .finish()
    }
}

impl CoordinatorBuilder {
    /// On one Redis (`redis://`), lock waiters do not queue: they take the key when it is
    /// free, as redsync and redis-py clients do
    /// ([`RedisClientBuilder::without_fifo`](crate::redis::RedisClientBuilder::without_fifo)).
    /// Use it on names shared with such clients: while Baton waiters queue, each release
    /// hands the key straight to the next of them, and a client that does not queue can
    /// wait for ever. No effect on other backends (etcd waiters always queue, and its
    /// clients, Go's included, all queue alike).
    pub fn without_fifo(mut self) -> Self {
        self.fifo = false;
        self
    }

    /// The TTL of holds: the etcd session's lease, or each Redis lock's expiry. At least
    /// [`MIN_TTL`](crate::MIN_TTL) (2 s) on etcd and the embedded store, at least
    /// 10 ms on Redis, at most [`MAX_TTL`](crate::MAX_TTL); [`connect`](Self::connect)
    /// refuses others before any network call.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait for the backend when connecting.
    pub fn with_dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// How long one request may take.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// TLS settings for `https://` (etcd) and `rediss://` (Redis) endpoints: the CA to
    /// trust and an optional client certificate. Plaintext endpoints with TLS settings are
    /// refused.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Authenticate as `user` with `password`: etcd's user, or a Redis ACL user (`AUTH user
    /// password`). On Redis it applies to every server whose URL carries no credentials of
    /// its own, so Redlock masters may each have theirs. Never shown in `Debug` output,
    /// logs or errors. A server without authentication differs: etcd accepts the
    /// credentials and ignores them (as Go's clientv3 does); Redis refuses them
    /// ([`Error::Unauthenticated`] at connect).
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials::new(user, password));
        self
    }

    /// A password without a user name: for etcd, the password of the user named in the URL
    /// (given with [`with_user`](Self::with_user) too, `connect` fails on etcd); for Redis, `AUTH password` (Redis's `requirepass`, or the URL's user), on every server
    /// whose URL carries no password. The embedded store (`mem://`) takes none: `connect`
    /// refuses it with [`Error::InvalidEndpoint`].
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(Secret::new(password));
        self
    }

    /// Confine every key to `prefix`: a [`Client::with_namespace`] on etcd and the embedded
    /// store, a key prefix on Redis (see
    /// [`RedisClientBuilder::with_prefix`](crate::redis::RedisClientBuilder::with_prefix)).
    /// Two coordinators whose namespaces are not prefixes of one another never see each
    /// other's locks or elections. End a namespace with a separator (`team-a/`): `team-a`
    /// is a prefix of `team-ab`, and `team-a`'s lock `bx` is `team-ab`'s lock `x`.
    pub fn with_namespace(mut self, prefix: impl Into<String>) -> Self {
        self.namespace = prefix.into();
        self
    }

    /// The TTL set.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The dial timeout set.
    pub fn dial_timeout(&self) -> Duration {
        self.dial_timeout
    }

    /// The request timeout set.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Validate everything, connect, and (on etcd) start the session.
    ///
    /// Options out of range (the TTL, a zero timeout, a bad namespace) and malformed URLs
    /// fail with [`Error::InvalidArgument`] or [`Error::InvalidEndpoint`] before any network
    /// call, on every backend.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe on etcd: a lease granted before the drop expires after its TTL.
    pub async fn connect(self) -> Result<Coordinator> {
        let backend: Arc<dyn Backend> = match Endpoints::parse(&self.endpoints)? {
            #[cfg(feature = "redis")]
            Endpoints::Redis(_) | Endpoints::Redlock(_) => Arc::new(
                {
                    let b = crate::redis::RedisClient::builder(&self.endpoints);
                    if self.fifo {
                        b
                    } else {
                        b.without_fifo()
                    }
                }
                .with_ttl(self.ttl)
                .with_dial_timeout(self.dial_timeout)
                .with_request_timeout(self.request_timeout)
                .with_prefix(self.namespace)
                .with_security(self.tls, self.credentials, self.password)
                .connect()
                .await?,
            ),
            #[cfg(not(feature = "redis"))]
            Endpoints::Redis(_) | Endpoints::Redlock(_) => {
                return Err(Error::InvalidEndpoint {
                    endpoint: crate::client::redact(&self.endpoints),
                    reason: "this build of baton has no redis support (feature \"redis\")".into(),
                })
            }
            _ => {
                // Refuse a TTL the session would refuse before dialling, not after (an
                // unreachable server must not hide it behind a retryable Error::Connect).
                crate::session::validate_ttl(self.ttl)?;
                let client = ClientBuilder::new(&self.endpoints)
                    .with_dial_timeout(self.dial_timeout)
                    .with_request_timeout(self.request_timeout)
                    .with_security(self.tls, self.credentials, self.password)
                    .with_namespace(self.namespace)
                    .connect()
                    .await?;
                let session = Session::builder(&client).with_ttl(self.ttl).build().await?;
                Arc::new(StoreBackend {
                    sessions: Arc::new(Sessions {
                        client,
                        ttl: self.ttl,
                        current: StdMutex::new(session),
                        renewing: tokio::sync::Mutex::new(()),
                        closed: CancellationToken::new(),
                    }),
                    local: Arc::default(),
                })
            }
        };
        Ok(Coordinator { backend })
    }
}

/// One connection to any backend, handing out [`Lock`]s and [`Elector`]s.
///
/// On etcd and the embedded store it holds one [`Session`]: every lock and leadership taken
/// through it shares that lease. When that session is lost (its lease expired or was
/// revoked: the backend was unreachable for a TTL, say), every hold is lost with it, and
/// the next `lock`, `try_lock` or `campaign` starts a new session, as a Redis coordinator,
/// which has none, just goes on. Cheap to clone.
///
/// Tasks sharing one coordinator may lock the same name: on etcd and the embedded store they
/// first queue for it in this process (first come, first served), then in the store, so a
/// second task's [`Lock::lock`] waits and its [`Lock::try_lock`] fails with
/// [`Error::Locked`] while the first holds the lock, as on Redis.
#[derive(Clone, Debug)]
pub struct Coordinator {
    backend: Arc<dyn Backend>,
}

impl Coordinator {
    /// Connect with the default options.
    ///
    /// # Cancel safety
    ///
    /// See [`CoordinatorBuilder::connect`].
    pub async fn connect(endpoints: &str) -> Result<Coordinator> {
        Self::builder(endpoints).connect().await
    }

    /// Configure a connection.
    pub fn builder(endpoints: &str) -> CoordinatorBuilder {
        CoordinatorBuilder {
            endpoints: endpoints.to_string(),
            ttl: DEFAULT_TTL,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            tls: None,
            credentials: None,
            password: None,
            namespace: String::new(),
            fifo: true,
        }
    }

    /// A coordinator over any [`Backend`].
    pub fn from_backend(backend: Arc<dyn Backend>) -> Coordinator {
        Coordinator { backend }
    }

    /// The backend's short name.
    pub fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// A lock named `name`. Fails with [`Error::InvalidArgument`] on a bad name (empty,
    /// over [`MAX_NAME_LEN`](crate::MAX_NAME_LEN) bytes, a NUL byte) and, on Redis, on a key
    /// in Baton's own key space (`baton:fence:…`, `baton:leader:…`, …; see the `redis`
    /// module).
    pub fn lock(&self, name: &str) -> Result<Box<dyn Lock>> {
        self.backend.lock(name)
    }

    /// An election named `name`. Fails as [`lock`](Coordinator::lock) does on a bad name.
    pub fn election(&self, name: &str) -> Result<Box<dyn Elector>> {
        self.backend.election(name)
    }

    /// A token cancelled when every hold is lost at once (the current etcd session), if the
    /// backend has such a thing. After a loss, the next hold starts a new session, with a
    /// token of its own: ask again.
    pub fn lost_token(&self) -> Option<CancellationToken> {
        self.backend.lost_token()
    }

    /// The store client, on etcd and the embedded store.
    pub fn client(&self) -> Option<&Client> {
        self.backend.client()
    }

    /// The current session's lease, on etcd and the embedded store: every hold of this
    /// coordinator since that session started is bound to it.
    pub fn lease_id(&self) -> Option<LeaseId> {
        self.backend.lease_id()
    }

    /// The Redis client, on `redis://` and `redlock://`.
    #[cfg(feature = "redis")]
    pub fn redis(&self) -> Option<&crate::redis::RedisClient> {
        self.backend.redis()
    }

    /// Release everything (on etcd: revoke the session's lease) and, on Redis, disconnect.
    /// On etcd and the embedded store the client stays connected (what
    /// [`client()`](Coordinator::client) returns still works) until the last clone of the
    /// coordinator, and of that client, is dropped.
    ///
    /// Guards and leaderships still held are lost (their `release()` fails with
    /// [`Error::NotHeld`] / [`Error::NotLeader`]). Tasks waiting in `lock()` or `campaign()`
    /// (at once, even while a request is in flight) and every later call (`lock`,
    /// `try_lock`, `lock_timeout`, `campaign`, `leader`) fail with [`Error::Closed`], and
    /// `observe()` streams end, on every backend. `Closed` is not retryable: connect a new
    /// coordinator. Closing twice is fine.
    ///
    /// With the backend unreachable, etcd's `close()` returns the revoke's error after the
    /// request timeout (the lease, and every key bound to it, then expires with its TTL);
    /// Redis's returns `Ok`, its keys expiring with their TTL: at once if the servers refuse
    /// connections (they are down), but after up to the request timeout if they hang
    /// (paused, or the host unreachable without a refusal) while something is held (see
    /// `RedisClient::close`).
    ///
    /// # Cancel safety
    ///
    /// If dropped, holds end with their TTL.
    pub async fn close(&self) -> Result<()> {
        self.backend.close().await
    }
}

/// The store family (etcd, embedded) behind a [`Coordinator`]: one client, one session at a
/// time.
#[derive(Debug)]
struct StoreBackend {
    sessions: Arc<Sessions>,
    /// The tasks of this process holding or waiting for each lock name.
    local: Arc<LocalLocks>,
}

/// The coordinator's session, started again when lost.
#[derive(Debug)]
struct Sessions {
    client: Client,
    ttl: Duration,
    current: StdMutex<Session>,
    /// Held while a new session is started (one at a time).
    renewing: tokio::sync::Mutex<()>,
    /// Cancelled when [`Coordinator::close`] starts: calls fail with [`Error::Closed`]
    /// from then on, as on Redis, instead of with the closed session's
    /// [`Error::SessionLost`].
    closed: CancellationToken,
}

impl Sessions {
    fn current(&self) -> Session {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The session to take a new hold with: the current one, or a new one if it is lost
    /// (holds of the lost one stay lost). [`Error::Closed`] once closed.
    async fn live(&self) -> Result<Session> {
        let session = self.current();
        if !session.is_lost() {
            return Ok(session);
        }
        if self.closed.is_cancelled() {
            return Err(Error::Closed);
        }
        let _renewing = self.renewing.lock().await;
        let session = self.current();
        if !session.is_lost() {
            return Ok(session);
        }
        if self.closed.is_cancelled() {
            return Err(Error::Closed);
        }
        tracing::info!(
            lost = %session.lost_reason().unwrap_or_default(),
            "the coordinator's session was lost; starting a new one"
        );
        let new = Session::builder(&self.client)
            .with_ttl(self.ttl)
            .build()
            .await?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = new.clone();
        // Closed meanwhile: `close()` closed the session current then, which may be the
        // lost one (it does not wait for us: a lock future nobody polls would hold it up).
        // Closing twice is fine.
        if self.closed.is_cancelled() {
            let _ = new.close().await;
            return Err(Error::Closed);
        }
        Ok(new)
    }
}

#[async_trait]
impl Backend for StoreBackend {
    fn name(&self) -> &'static str {
        self.sessions.client.backend()
    }

    fn lock(&self, name: &str) -> Result<Box<dyn Lock>> {
        let session = self.sessions.current();
        Ok(Box::new(StoreLock {
            mutex: Mutex::new(&session, name)?,
            made_on: session.lease_id(),
            local: self.local.clone(),
            sessions: self.sessions.clone(),
        }))
    }

    fn election(&self, name: &str) -> Result<Box<dyn Elector>> {
        let session = self.sessions.current();
        Ok(Box::new(StoreElector {
            election: Election::new(&session, name)?,
            made_on: session.lease_id(),
            local: self.local.clone(),
            sessions: self.sessions.clone(),
        }))
    }

    fn lost_token(&self) -> Option<CancellationToken> {
        Some(self.sessions.current().lost_token())
    }

    fn client(&self) -> Option<&Client> {
        Some(&self.sessions.client)
    }

    fn lease_id(&self) -> Option<LeaseId> {
        Some(self.sessions.current().lease_id())
    }

    async fn close(&self) -> Result<()> {
        // First, so that the waiters the session's end wakes see it and say Closed. A new
        // session being started meanwhile is closed by whoever starts it (see
        // `Sessions::live`): this does not wait for it, as a lock future nobody polls would
        // hold it up (found by a second look: close() hung).
        self.sessions.closed.cancel();
        self.sessions.current().close().await
    }
}

/// Run `call` unless the coordinator is closed: [`Error::Closed`] at once when it is, even
/// with a request in flight (`call` is dropped: the lock and campaign futures are cancel
/// safe), and an error once it is closed (a waiter woken by the session's end, say) is
/// `Closed` too, as on Redis, not the session's [`Error::SessionLost`]. A session lost
/// otherwise (its lease expired or was revoked) keeps its own error.
async fn unless_closed<T>(
    closed: &CancellationToken,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    if closed.is_cancelled() {
        return Err(Error::Closed);
    }
    tokio::select! {
        biased;
        () = closed.cancelled() => Err(Error::Closed),
        r = call => match r {
            Err(_) if closed.is_cancelled() => Err(Error::Closed),
            r => r,
        },
    }
}

/// One local mutex per lock name in use by a coordinator's tasks: the store family's locks
/// share one session, which has one key per name, so tasks of one coordinator take turns
/// here before they queue in the store. An entry lives while some task holds or waits for
/// its name, so the map holds only names in use.
#[derive(Debug, Default)]
struct LocalLocks {
    /// `<lease>/<name>` -> (its local mutex, how many [`LocalSlot`]s use it)
    map: StdMutex<HashMap<String, (LocalMutex, usize)>>,
}

type LocalMutex = Arc<tokio::sync::Mutex<()>>;

impl LocalLocks {
    /// A use of `name`'s local mutex on the session of `lease`, until the slot is dropped.
    /// (Per session: holds of a lost session, whose keys are gone, keep no task of the next
    /// session waiting.)
    fn slot(self: &Arc<Self>, lease: LeaseId, name: &str) -> LocalSlot {
        let key = format!("{lease:x}/{name}");
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (mutex, users) = map.entry(key.clone()).or_default();
        *users += 1;
        LocalSlot {
            locks: self.clone(),
            name: key,
            mutex: mutex.clone(),
        }
    }
}

/// A task's use of a name's local mutex (waiting for it or holding it). The entry is removed
/// when its last slot is dropped.
#[derive(Debug)]
struct LocalSlot {
    locks: Arc<LocalLocks>,
    name: String,
    mutex: LocalMutex,
}

impl Drop for LocalSlot {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, users)) = map.get_mut(&self.name) {
            *users -= 1;
            if *users == 0 {
                map.remove(&self.name);
            }
        }
    }
}

/// A [`Mutex`] on the coordinator's session, behind the name's local mutex.
#[derive(Debug)]
struct StoreLock {
    /// On the session current when it was made (which checked the name).
    mutex: Mutex,
    /// That session's lease.
    made_on: LeaseId,
    local: Arc<LocalLocks>,
    sessions: Arc<Sessions>,
}

impl StoreLock {
    /// [`Lock::lock`], noting in `used` (if given) the session's mutex it waits on (for a
    /// timeout's settling; a plain `lock()` clones nothing).
    async fn lock_noting(&self, used: Option<&StdMutex<Option<Mutex>>>) -> Result<Box<dyn Guard>> {
        unless_closed(&self.sessions.closed, async {
            let (session, mutex, slot) = self.live().await?;
            if let Some(used) = used {
                *used.lock().unwrap_or_else(|e| e.into_inner()) = Some(mutex.clone());
            }
            let local = local_turn(&slot, &session).await?;
            let guard = mutex.lock().await?;
            Ok(Box::new(Local::new(guard, local, slot)) as Box<dyn Guard>)
        })
        .await
    }

    async fn live(&self) -> Result<(Session, Mutex, LocalSlot)> {
        let name = self.mutex.name();
        live_for(
            &self.sessions,
            &self.local,
            self.made_on,
            &self.mutex,
            name,
            Mutex::new,
        )
        .await
    }
}

/// A live session (a new one if the last was lost), `made` (a primitive made on the
/// session of lease `made_on`) if that is still the live one, else one made again on it
/// with `remake`, and the name's local slot on that session: a hold of a lost session, not
/// yet dropped, does not keep the next one waiting here.
async fn live_for<T: Clone>(
    sessions: &Sessions,
    local: &Arc<LocalLocks>,
    made_on: LeaseId,
    made: &T,
    name: &str,
    remake: impl FnOnce(&Session, &str) -> Result<T>,
) -> Result<(Session, T, LocalSlot)> {
    let session = sessions.live().await?;
    let primitive = if session.lease_id() == made_on {
        made.clone()
    } else {
        remake(&session, name)?
    };
    let slot = local.slot(session.lease_id(), name);
    Ok((session, primitive, slot))
}

/// Wait for the name's local mutex, unless the session is lost (or closed) first: a task
/// queued here fails then, as a waiter in the store does.
async fn local_turn(
    slot: &LocalSlot,
    session: &Session,
) -> Result<tokio::sync::OwnedMutexGuard<()>> {
    tokio::select! {
        local = slot.mutex.clone().lock_owned() => Ok(local),
        () = session.lost() => Err(session.lost_error()),
    }
}

/// A guard (a [`MutexGuard`] or a [`Leadership`]) with the local mutex of its name, held
/// until it is released or dropped.
#[derive(Debug)]
struct Local<G> {
    inner: G,
    // Dropped after `inner` (whose drop starts the release: a claim being released makes
    // the next task's lock wait for it, not fail).
    _local: tokio::sync::OwnedMutexGuard<()>,
    _slot: LocalSlot,
}

impl<G> Local<G> {
    fn new(inner: G, local: tokio::sync::OwnedMutexGuard<()>, slot: LocalSlot) -> Self {
        Local {
            inner,
            _local: local,
            _slot: slot,
        }
    }
}

#[async_trait]
impl Lock for StoreLock {
    fn name(&self) -> &str {
        self.mutex.name()
    }
    async fn lock(&self) -> Result<Box<dyn Guard>> {
        self.lock_noting(None).await
    }
    async fn lock_timeout(&self, timeout: Duration) -> Result<Box<dyn Guard>> {
        // On timeout, our key's removal is waited for (at most 500 ms), as
        // `Mutex::lock_timeout` does.
        let used = StdMutex::new(None);
        let r = with_timeout("lock", timeout, self.lock_noting(Some(&used))).await;
        if matches!(r, Err(Error::Timeout { .. })) {
            let used = used.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(mutex) = used {
                mutex.settle().await;
            }
        }
        r
    }
    async fn try_lock(&self) -> Result<Box<dyn Guard>> {
        unless_closed(&self.sessions.closed, async {
            let (_, mutex, slot) = self.live().await?;
            let Ok(local) = slot.mutex.clone().try_lock_owned() else {
                return Err(Error::Locked {
                    name: self.mutex.name().to_string(),
                });
            };
            let guard = mutex.try_lock().await?;
            Ok(Box::new(Local::new(guard, local, slot)) as Box<dyn Guard>)
        })
        .await
    }
}

#[async_trait]
impl<G: Guard + 'static> Guard for Local<G> {
    fn key(&self) -> &str {
        self.inner.key()
    }
    fn fencing_token(&self) -> Option<i64> {
        self.inner.fencing_token()
    }
    fn granted_revision(&self) -> Option<i64> {
        self.inner.granted_revision()
    }
    fn is_lost(&self) -> bool {
        self.inner.is_lost()
    }
    fn lost_reason(&self) -> Option<String> {
        self.inner.lost_reason()
    }
    fn lost_token(&self) -> CancellationToken {
        self.inner.lost_token()
    }
    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.inner.deadline()
    }
    async fn release(self: Box<Self>) -> Result<()> {
        let Local {
            inner,
            _local,
            _slot,
        } = *self;
        Box::new(inner).release().await
    }
}

/// An [`Election`] on the coordinator's session, behind the name's local mutex: tasks of
/// one coordinator campaigning in one election take turns here (as they do on Redis), since
/// the session has one key per name. An election and a lock of one name share that key
/// (see the crate's key layouts), and the local mutex too.
#[derive(Debug)]
struct StoreElector {
    /// On the session current when it was made (which checked the name).
    election: Election,
    /// That session's lease.
    made_on: LeaseId,
    local: Arc<LocalLocks>,
    sessions: Arc<Sessions>,
}

impl StoreElector {
    /// [`Elector::campaign`], noting in `used` (if given) the session's election it
    /// campaigns in (for a timeout's settling; a plain `campaign()` clones nothing).
    async fn campaign_noting(
        &self,
        value: Vec<u8>,
        used: Option<&StdMutex<Option<Election>>>,
    ) -> Result<Box<dyn Leading>> {
        unless_closed(&self.sessions.closed, async {
            let name = self.election.name();
            let (session, election, slot) = live_for(
                &self.sessions,
                &self.local,
                self.made_on,
                &self.election,
                name,
                Election::new,
            )
            .await?;
            if let Some(used) = used {
                *used.lock().unwrap_or_else(|e| e.into_inner()) = Some(election.clone());
            }
            let local = local_turn(&slot, &session).await?;
            let leading = election.campaign(value).await?;
            Ok(Box::new(Local::new(leading, local, slot)) as Box<dyn Leading>)
        })
        .await
    }
}

#[async_trait]
impl Elector for StoreElector {
    fn name(&self) -> &str {
        self.election.name()
    }
    async fn campaign(&self, value: Vec<u8>) -> Result<Box<dyn Leading>> {
        self.campaign_noting(value, None).await
    }
    async fn campaign_timeout(
        &self,
        value: Vec<u8>,
        timeout: Duration,
    ) -> Result<Box<dyn Leading>> {
        // On timeout, our key's removal is waited for (at most 500 ms), as
        // `Election::campaign_timeout` does.
        let used = StdMutex::new(None);
        let r = with_timeout(
            "campaign",
            timeout,
            self.campaign_noting(value, Some(&used)),
        )
        .await;
        if matches!(r, Err(Error::Timeout { .. })) {
            let used = used.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(election) = used {
                election.settle().await;
            }
        }
        r
    }
    async fn leader(&self) -> Result<Leader> {
        unless_closed(&self.sessions.closed, self.election.leader()).await
    }
    fn observe(&self) -> LeaderStream {
        // Ends when the coordinator is closed, as on Redis.
        let events = self
            .election
            .observe()
            .stop_on(self.sessions.closed.clone())
            .with_vacancies();
        LeaderStream::new(events.until(self.sessions.closed.clone()))
    }
}

#[async_trait]
impl Leading for Local<Leadership> {
    fn value(&self) -> &[u8] {
        self.inner.value()
    }
    async fn proclaim(&mut self, value: Vec<u8>) -> Result<()> {
        self.inner.proclaim(value).await
    }
}

#[async_trait]
impl Guard for MutexGuard {
    fn key(&self) -> &str {
        MutexGuard::key(self)
    }
    fn fencing_token(&self) -> Option<i64> {
        Some(MutexGuard::fencing_token(self))
    }
    fn granted_revision(&self) -> Option<i64> {
        Some(MutexGuard::granted_revision(self))
    }
    fn is_lost(&self) -> bool {
        MutexGuard::is_lost(self)
    }
    fn lost_reason(&self) -> Option<String> {
        MutexGuard::lost_reason(self)
    }
    fn lost_token(&self) -> CancellationToken {
        MutexGuard::lost_token(self)
    }
    fn deadline(&self) -> Option<tokio::time::Instant> {
        Some(self.session().deadline())
    }
    async fn release(self: Box<Self>) -> Result<()> {
        self.unlock().await
    }
}

#[async_trait]
impl Lock for Mutex {
    fn name(&self) -> &str {
        Mutex::name(self)
    }
    async fn lock(&self) -> Result<Box<dyn Guard>> {
        Ok(Box::new(Mutex::lock(self).await?))
    }
    async fn lock_timeout(&self, timeout: Duration) -> Result<Box<dyn Guard>> {
        Ok(Box::new(Mutex::lock_timeout(self, timeout).await?))
    }
    async fn try_lock(&self) -> Result<Box<dyn Guard>> {
        Ok(Box::new(Mutex::try_lock(self).await?))
    }
}

#[async_trait]
impl Guard for Leadership {
    fn key(&self) -> &str {
        Leadership::key(self)
    }
    fn fencing_token(&self) -> Option<i64> {
        Some(Leadership::fencing_token(self))
    }
    fn granted_revision(&self) -> Option<i64> {
        Some(Leadership::granted_revision(self))
    }
    fn is_lost(&self) -> bool {
        Leadership::is_lost(self)
    }
    fn lost_reason(&self) -> Option<String> {
        Leadership::lost_reason(self)
    }
    fn lost_token(&self) -> CancellationToken {
        Leadership::lost_token(self)
    }
    fn deadline(&self) -> Option<tokio::time::Instant> {
        Some(self.session().deadline())
    }
    async fn release(self: Box<Self>) -> Result<()> {
        self.resign().await
    }
}

#[async_trait]
impl Leading for Leadership {
    fn value(&self) -> &[u8] {
        Leadership::value(self)
    }
    async fn proclaim(&mut self, value: Vec<u8>) -> Result<()> {
        Leadership::proclaim(self, value).await
    }
}

#[async_trait]
impl Elector for Election {
    fn name(&self) -> &str {
        Election::name(self)
    }
    async fn campaign(&self, value: Vec<u8>) -> Result<Box<dyn Leading>> {
        Ok(Box::new(Election::campaign(self, value).await?))
    }
    async fn campaign_timeout(
        &self,
        value: Vec<u8>,
        timeout: Duration,
    ) -> Result<Box<dyn Leading>> {
        Ok(Box::new(
            Election::campaign_timeout(self, value, timeout).await?,
        ))
    }
    async fn leader(&self) -> Result<Leader> {
        Election::leader(self).await
    }
    fn observe(&self) -> LeaderStream {
        LeaderStream::new(Election::observe(self).with_vacancies())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Options that are out of range are refused at once, before any dial: an unreachable
    /// server must not turn a bad TTL into a retryable failure to connect.
    #[tokio::test]
    async fn bad_options_are_refused_before_connecting() {
        let dial = Duration::from_secs(2);
        for url in [
            "http://127.0.0.1:1",
            "mem://",
            #[cfg(feature = "redis")]
            "redis://127.0.0.1:1",
        ] {
            let base = Coordinator::builder(url).with_dial_timeout(dial);
            let bad = [
                base.clone().with_ttl(Duration::ZERO),
                base.clone().with_ttl(Duration::from_millis(1)),
                base.clone()
                    .with_ttl(crate::MAX_TTL + Duration::from_secs(1)),
                base.clone().with_request_timeout(Duration::ZERO),
                base.clone().with_request_timeout(Duration::MAX),
                base.clone().with_dial_timeout(Duration::MAX),
                base.clone().with_namespace("a\0b"),
            ];
            for builder in bad {
                let shown = format!("{builder:?}");
                let started = std::time::Instant::now();
                let err = builder.connect().await.unwrap_err();
                assert!(matches!(err, Error::InvalidArgument(_)), "{shown}: {err}");
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "{shown}: refused only after {:?}",
                    started.elapsed()
                );
            }
        }
    }

    /// The hazard `with_namespace` warns of: namespaces `a` and `ab` (one a prefix of the
    /// other) share keys, and `a`'s lock `bx` is `ab`'s lock `x` (its docs said different
    /// namespaces never see each other's locks; found by review).
    #[tokio::test]
    async fn namespaces_that_are_prefixes_of_one_another_share_locks() {
        let a = Coordinator::builder("mem://ns-prefix")
            .with_namespace("a")
            .connect()
            .await
            .unwrap();
        let ab = Coordinator::builder("mem://ns-prefix")
            .with_namespace("ab")
            .connect()
            .await
            .unwrap();
        let held = a.lock("bx").unwrap().lock().await.unwrap();
        let other = ab.lock("x").unwrap().try_lock().await;
        assert!(
            matches!(other, Err(Error::Locked { .. })),
            "a's bx is ab's x: {:?}",
            other.err()
        );
        held.release().await.unwrap();
        let slash = Coordinator::builder("mem://ns-prefix")
            .with_namespace("a/")
            .connect()
            .await
            .unwrap();
        let held = slash.lock("bx").unwrap().lock().await.unwrap();
        assert!(ab.lock("x").unwrap().try_lock().await.is_ok());
        held.release().await.unwrap();
    }

    /// Two tasks of one coordinator lock one name: the second waits for the first (as on
    /// Redis), rather than failing with AlreadyHeld on the shared session's key.
    #[tokio::test]
    async fn tasks_of_one_coordinator_take_turns() {
        let client = Client::connect("mem://").await.unwrap();
        let session = Session::new(&client).await.unwrap();
        let local = Arc::<LocalLocks>::default();
        let coord = Coordinator::from_backend(Arc::new(StoreBackend {
            sessions: Arc::new(Sessions {
                client,
                ttl: DEFAULT_TTL,
                current: StdMutex::new(session),
                renewing: tokio::sync::Mutex::new(()),
                closed: CancellationToken::new(),
            }),
            local: local.clone(),
        }));
        let held = coord.lock("jobs/report").unwrap().lock().await.unwrap();
        let err = coord
            .lock("jobs/report")
            .unwrap()
            .try_lock()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        let other = coord.clone();
        let waiting = tokio::spawn(async move {
            other
                .lock("jobs/report")
                .unwrap()
                .lock_timeout(Duration::from_secs(2))
                .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "the second task did not wait");
        held.release().await.unwrap();
        let second = waiting.await.unwrap().unwrap();
        assert!(!second.is_lost());
        second.release().await.unwrap();
        // Nobody uses the name any more: nothing is kept for it.
        assert!(local.map.lock().unwrap().is_empty());
        coord.close().await.unwrap();
    }

    /// The coordinator's session lost (its lease revoked): every hold is lost, and the next
    /// lock and campaign start a new session, as on Redis, where nothing is shared (found by
    /// a review: every later call failed with SessionLost, not retryable, for good). A hold
    /// of the lost session, not yet dropped, keeps nobody waiting.
    #[tokio::test]
    async fn a_lost_session_is_started_again_by_the_next_hold() {
        let coord = Coordinator::connect("mem://").await.unwrap();
        let lock = coord.lock("x").unwrap();
        let held = lock.lock().await.unwrap();
        let lost = coord.lost_token().unwrap();
        let first = coord.lease_id().unwrap();
        let store = coord.client().unwrap().store().clone();
        store.lease_revoke(first).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
            .await
            .expect("the session was not lost");
        assert!(held.is_lost());
        // The same handle, with the lost hold not dropped yet.
        let again = tokio::time::timeout(Duration::from_secs(5), lock.lock())
            .await
            .expect("the next lock waited for the lost hold")
            .unwrap();
        let second = coord.lease_id().unwrap();
        assert_ne!(first, second);
        assert!(!again.is_lost());
        assert!(!coord.lost_token().unwrap().is_cancelled());
        assert!(matches!(held.release().await, Err(Error::NotHeld { .. })));
        let leading = coord
            .election("e")
            .unwrap()
            .campaign(b"v".to_vec())
            .await
            .unwrap();
        assert_eq!(coord.lease_id().unwrap(), second);
        leading.release().await.unwrap();
        again.release().await.unwrap();
        coord.close().await.unwrap();
        assert!(matches!(lock.lock().await, Err(Error::Closed)));
    }

    /// close() while a lock future nobody polls is starting a new session (a `select!` over
    /// `&mut fut` whose other branch closes): it returns, and the new session is closed too
    /// (found by a second look: close() waited for the future to be polled again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_does_not_wait_for_a_session_being_started() {
        let store = Arc::new(crate::store::slow::SlowWatches::new(
            "mem",
            Duration::ZERO,
            Duration::ZERO,
        ));
        let client = Client::from_arc(store.clone());
        let session = Session::new(&client).await.unwrap();
        let coord = Coordinator::from_backend(Arc::new(StoreBackend {
            sessions: Arc::new(Sessions {
                client: client.clone(),
                ttl: DEFAULT_TTL,
                current: StdMutex::new(session),
                renewing: tokio::sync::Mutex::new(()),
                closed: CancellationToken::new(),
            }),
            local: Arc::default(),
        }));
        let lock = coord.lock("x").unwrap();
        let held = lock.lock().await.unwrap();
        let lost = coord.lost_token().unwrap();
        let first = coord.lease_id().unwrap();
        client.store().lease_revoke(first).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
            .await
            .unwrap();
        *store.grant_delay.lock().unwrap() = Some(Duration::from_millis(500));
        let mut locking = lock.lock();
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut locking)
                .await
                .is_err()
        );
        tokio::time::timeout(Duration::from_secs(2), coord.close())
            .await
            .expect("close() waited for a lock future nobody polls")
            .unwrap();
        // Polled again, the future ends with Closed (dropping the session start); no
        // session is left alive.
        let got = tokio::time::timeout(Duration::from_secs(2), locking)
            .await
            .unwrap();
        assert!(matches!(got, Err(Error::Closed)), "{got:?}");
        let current = coord.lease_id().unwrap();
        assert_eq!(
            client.store().lease_time_to_live(current).await.unwrap(),
            None
        );
        drop(held);
    }

    /// A task queued behind another task of its coordinator fails when the coordinator is
    /// closed (its session ends), as a waiter in the store does, instead of waiting for the
    /// other task's guard, which may never be dropped.
    #[tokio::test]
    async fn close_ends_a_task_queued_locally() {
        let coord = Coordinator::connect("mem://").await.unwrap();
        let held = coord.lock("x").unwrap().lock().await.unwrap();
        let (c2, c3) = (coord.clone(), coord.clone());
        let locking = tokio::spawn(async move { c2.lock("x").unwrap().lock().await.map(drop) });
        let campaigning = tokio::spawn(async move {
            c3.election("x")
                .unwrap()
                .campaign(b"v".to_vec())
                .await
                .map(drop)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        coord.close().await.unwrap();
        for task in [locking, campaigning] {
            let got = tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .expect("a task queued locally still waits after close()")
                .unwrap();
            assert!(matches!(got, Err(Error::Closed)), "{got:?}");
        }
        assert!(held.is_lost());
        drop(held);
    }

    /// Two tasks of one coordinator campaign in one election: the second waits until the
    /// first resigns, then leads (as on Redis), rather than failing with AlreadyHeld.
    #[tokio::test]
    async fn tasks_of_one_coordinator_campaign_in_turn() {
        let coord = Coordinator::connect("mem://").await.unwrap();
        let first = coord
            .election("sched")
            .unwrap()
            .campaign(b"a".to_vec())
            .await
            .unwrap();
        let other = coord.clone();
        let waiting = tokio::spawn(async move {
            other
                .election("sched")
                .unwrap()
                .campaign_timeout(b"b".to_vec(), Duration::from_secs(2))
                .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "the second candidate did not wait");
        let leader = coord.election("sched").unwrap().leader().await.unwrap();
        assert_eq!(leader.value, b"a");
        first.release().await.unwrap();
        let second = waiting.await.unwrap().unwrap();
        assert_eq!(second.value(), b"b");
        let leader = coord.election("sched").unwrap().leader().await.unwrap();
        assert_eq!(leader.value, b"b");
        second.release().await.unwrap();
        coord.close().await.unwrap();
    }

    #[tokio::test]
    async fn lock_timeout_zero_on_mem() {
        let coord = Coordinator::connect("mem://").await.unwrap();
        let got = coord
            .lock("sv-zero")
            .unwrap()
            .lock_timeout(Duration::ZERO)
            .await;
        assert!(got.is_ok(), "{got:?}");
        let got = coord
            .election("sv-zero-e")
            .unwrap()
            .campaign_timeout(b"v".to_vec(), Duration::ZERO)
            .await;
        assert!(got.is_ok(), "{:?}", got.map(drop));
        coord.close().await.unwrap();
    }

    #[tokio::test]
    async fn close_after_loss_and_twice() {
        let coord = Coordinator::connect("mem://").await.unwrap();
        let lost = coord.lost_token().unwrap();
        let store = coord.client().unwrap().store().clone();
        store.lease_revoke(coord.lease_id().unwrap()).await.unwrap();
        let _ = lost;
        coord.close().await.unwrap();
        coord.close().await.unwrap();
    }

    /// close() said "and disconnect" on every backend; on etcd and the embedded store the
    /// client goes on working (the docs now say so). Failed with the old docs' promise
    /// asserted: `Ok(12)`, a write after close().
    #[tokio::test]
    async fn close_leaves_the_store_client_connected() {
        let coord = Coordinator::connect("mem://").await.unwrap();
        coord.close().await.unwrap();
        let r = coord
            .client()
            .unwrap()
            .store()
            .put(b"after-close", b"x", 0)
            .await;
        assert!(r.is_ok(), "{r:?}");
    }

    /// A task cancelled while queued in the store behind another coordinator: the next
    /// task of its coordinator gets Locked from try_lock, then the lock once it is free.
    #[tokio::test]
    async fn cancel_then_local_next() {
        let a = Coordinator::connect("mem://").await.unwrap();
        let b = Coordinator::builder("mem://").connect().await.unwrap();
        let held = a.lock("sv-cancel").unwrap().lock().await.unwrap();
        let err = b
            .lock("sv-cancel")
            .unwrap()
            .lock_timeout(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        let err = b.lock("sv-cancel").unwrap().try_lock().await.unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        let b2 = b.clone();
        let waiting = tokio::spawn(async move {
            b2.lock("sv-cancel")
                .unwrap()
                .lock_timeout(Duration::from_secs(3))
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        held.release().await.unwrap();
        let g = waiting.await.unwrap().unwrap();
        assert!(!g.is_lost());
        g.release().await.unwrap();
        a.close().await.unwrap();
        b.close().await.unwrap();
    }

    /// A lock and an election of one name, in one coordinator, take turns.
    #[tokio::test]
    async fn lock_and_election_same_name() {
        let coord = Coordinator::connect("mem://").await.unwrap();
        let held = coord.lock("sv-same").unwrap().lock().await.unwrap();
        let c = coord.clone();
        let camp = tokio::spawn(async move {
            c.election("sv-same")
                .unwrap()
                .campaign_timeout(b"v".to_vec(), Duration::from_secs(3))
                .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!camp.is_finished());
        let t1 = held.fencing_token();
        drop(held);
        let lead = camp.await.unwrap().unwrap();
        assert!(lead.fencing_token() > t1);
        lead.release().await.unwrap();
        coord.close().await.unwrap();
    }

    /// Stress: tasks of two coordinators lock one name with random timeouts, drops and
    /// releases; never two holders at once, and no hang.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stress_local_slots() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let coords = [
            Coordinator::connect("mem://").await.unwrap(),
            Coordinator::connect("mem://").await.unwrap(),
        ];
        let inside = Arc::new(AtomicUsize::new(0));
        let grants = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for t in 0..8_u64 {
            let coord = coords[(t % 2) as usize].clone();
            let inside = inside.clone();
            let grants = grants.clone();
            tasks.push(tokio::spawn(async move {
                let mut seed = t * 7919 + 13;
                let mut rnd = move || {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    seed >> 33
                };
                let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
                while tokio::time::Instant::now() < deadline {
                    let lock_or_elect = rnd() % 3;
                    let wait = Duration::from_micros(rnd() % 3000);
                    let got: Result<Box<dyn Guard>> = match lock_or_elect {
                        0 => coord.lock("sv-stress").unwrap().lock_timeout(wait).await,
                        1 => coord.lock("sv-stress").unwrap().try_lock().await,
                        _ => coord
                            .election("sv-stress")
                            .unwrap()
                            .campaign_timeout(b"v".to_vec(), wait)
                            .await
                            .map(|l| l as Box<dyn Guard>),
                    };
                    let Ok(g) = got else { continue };
                    assert!(!g.is_lost());
                    let n = inside.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(n, 0, "two holders at once");
                    grants.fetch_add(1, Ordering::SeqCst);
                    if rnd() % 2 == 0 {
                        tokio::task::yield_now().await;
                    }
                    inside.fetch_sub(1, Ordering::SeqCst);
                    match rnd() % 3 {
                        0 => drop(g),
                        1 => g.release().await.unwrap(),
                        _ => {
                            // a release cancelled mid-way
                            let _ = tokio::time::timeout(
                                Duration::from_micros(rnd() % 200),
                                g.release(),
                            )
                            .await;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("hung")
                .unwrap();
        }
        assert!(grants.load(Ordering::SeqCst) > 10);
        // Everything free again: a lock in each coordinator is granted at once.
        for c in &coords {
            let g =
                tokio::time::timeout(Duration::from_secs(5), c.lock("sv-stress").unwrap().lock())
                    .await
                    .expect("the lock stayed taken")
                    .unwrap();
            g.release().await.unwrap();
            c.close().await.unwrap();
        }
    }

    /// After close(), observe() streams end, and their observing tasks too: an ended stream
    /// still kept by its owner kept its task (and its watch on the store) running until it
    /// was dropped (on etcd and the embedded store; on Redis it stopped).
    #[tokio::test]
    async fn close_stops_observing_tasks() {
        use futures::StreamExt;
        let coord = Coordinator::connect("mem://").await.unwrap();
        let election = coord.election("sv-obs").unwrap();
        let mut leaders = election.observe();
        let lead = election.campaign(b"a".to_vec()).await.unwrap();
        assert_eq!(leaders.next().await.unwrap().value, b"a");
        lead.release().await.unwrap();
        coord.close().await.unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(2), leaders.next())
            .await
            .unwrap()
            .is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let metrics = tokio::runtime::Handle::current().metrics();
        let alive = metrics.num_alive_tasks();
        drop(leaders);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = metrics.num_alive_tasks();
        assert_eq!(
            alive, after,
            "after close(), the ended stream still had a live observing task until dropped ({alive} tasks, {after} after the drop)"
        );
    }

    /// observe() started while close() runs (before, during, after):
    /// the stream ends, and its observing task does not outlive it while it is kept.
    #[tokio::test]
    async fn observe_racing_close_ends_and_leaves_no_task() {
        use futures::StreamExt;
        let metrics = tokio::runtime::Handle::current().metrics();
        for i in 0..60 {
            let coord = Coordinator::connect("mem://").await.unwrap();
            let election = coord.election("race").unwrap();
            let lead = election.campaign(b"v".to_vec()).await.unwrap();
            let c2 = coord.clone();
            let mut early = election.observe();
            if i % 3 == 0 {
                // Polled once before close: its task has started.
                let _ = futures::poll!(early.next());
            }
            let closing = tokio::spawn(async move { c2.close().await });
            for _ in 0..(i % 4) {
                tokio::task::yield_now().await;
            }
            let mut late = election.observe().with_vacancies();
            for s in [&mut early as &mut (dyn futures::Stream<Item = _> + Unpin)] {
                let ended = tokio::time::timeout(Duration::from_secs(2), async {
                    while s.next().await.is_some() {}
                })
                .await;
                assert!(ended.is_ok(), "iteration {i}: an early stream never ended");
            }
            let ended = tokio::time::timeout(Duration::from_secs(2), async {
                while late.next().await.is_some() {}
            })
            .await;
            assert!(ended.is_ok(), "iteration {i}: a late stream never ended");
            closing.await.unwrap().unwrap();
            drop(lead);
            tokio::time::sleep(Duration::from_millis(30)).await;
            let kept = metrics.num_alive_tasks();
            drop(early);
            drop(late);
            tokio::time::sleep(Duration::from_millis(30)).await;
            let after = metrics.num_alive_tasks();
            assert_eq!(
                kept, after,
                "iteration {i}: a task lived as long as its ended stream"
            );
        }
    }
}

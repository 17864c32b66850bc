//! The Redis family: a lock on one Redis server (`redis://`), Redlock over independent
//! masters (`redlock://`), a watchdog that keeps locks alive, and leader election — behind the
//! same [`Lock`], [`Guard`](crate::coordinator::Guard) and [`Elector`] traits as etcd (feature `redis`, on by default).
//!
//! Redis is not a revisioned store, so this module does not implement the store layer: it
//! uses Redis's own algorithms. Connect with [`Coordinator`](crate::Coordinator) to write code
//! that runs on any backend, or with [`RedisClient`] for everything Redis can do.
//!
//! ```no_run
//! use std::time::Duration;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> baton::Result<()> {
//! let redis = baton::redis::RedisClient::builder("redis://127.0.0.1:6379")
//!     .with_ttl(Duration::from_secs(10))
//!     .connect()
//!     .await?;
//! let lock = redis.lock("reports/nightly")?;
//! let guard = lock.lock_timeout(Duration::from_secs(30)).await?;
//! tokio::select! {
//!     _ = guard.lost() => eprintln!("lock lost: {:?}", guard.lost_reason()),
//!     _ = async { /* the work, writing with guard.fencing_token() */ } => {}
//! }
//! guard.unlock().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Wire format: shared with redsync and redis-py
//!
//! A lock named `NAME` is the string key `PREFIX + NAME` (the prefix is empty unless set with
//! [`with_prefix`](RedisClientBuilder::with_prefix)) whose value is a random token of 128 bits
//! (32 hex digits):
//!
//! - acquire is `SET key token NX PX ttl`;
//! - release is a Lua compare-and-delete (`GET` = token, then `DEL`), never a plain `DEL`;
//! - extend is a Lua compare-and-`PEXPIRE`, which never re-creates an expired key.
//!
//! That is the layout of Go's redsync and of redis-py's `Lock`, so a Baton service, a Go
//! service and a Python service exclude each other on the same name. Baton adds keys that
//! other clients ignore: the fencing counter `baton:fence:KEY`, the election record
//! `baton:leader:KEY` (a hash), the waiters' queue `baton:queue:KEY` and places
//! `baton:waiter:KEY:TOKEN` (see below), each release's short-lived marker
//! `baton:released:KEY:TOKEN` (see [Lost connections](#lost-connections)), and the pub/sub
//! channel `baton:wake:KEY`. Lock and election keys (prefix and name) starting with
//! `baton:fence:`, `baton:leader:`, `baton:queue:`, `baton:waiter:` or `baton:released:`
//! are therefore refused. Redis Cluster is not supported.
//!
//! # Lost connections
//!
//! Each server has one multiplexed connection, dialled again only when a call finds it
//! lost. A request that finds it closed by the server (an idle `timeout`, a proxy's or NAT's
//! reset, `CLIENT KILL`, a restart) is sent once more on a new connection, within the same
//! request timeout, so a release, an extend or a take does not fail on every server whose
//! connection died quietly. Every request is safe to run twice: an acquire takes a key that
//! already holds our token (a take whose reply was lost), releases and extends compare the
//! token. The one answer a second run could change is a release's whose first run deleted
//! the key and lost only its reply: the second would find the key gone, as it does when
//! the lock was lost (the key expired, or the server restarted empty, and another client
//! may hold it), and redis-rs reports a request never sent on a dead connection and a reply
//! lost with the same error. So a release that deletes or hands off our key also writes
//! the marker `baton:released:KEY:TOKEN` (`SET … PX`, twice the request timeout, in the
//! same script), and a release that finds the key not ours answers as the marker says:
//! freed (or handed off) if it is there, a loss ([`Error::NotHeld`] from `unlock()`,
//! `baton lock`'s exit 122) if not. The markers cost one short-lived key per release (see
//! `BENCHMARKS.md` for the time). A user whose ACL does not grant `~baton:released:*`
//! (written before the markers existed) still releases, without a marker; so does one
//! whose marker is evicted: only a lost release reply is then reported as a loss.
//!
//! # Fencing tokens (single instance only)
//!
//! On `redis://`, the acquire script increments the counter `baton:fence:KEY` in the same
//! script that sets the lock, and the new value is the grant's
//! [fencing token](RedisLockGuard::fencing_token): strictly greater than every earlier grant's
//! **only while Redis keeps its data**. A Redis restarted without persistence (or failing
//! over to a replica that missed the write) starts the counter again from zero. Run Redis with
//! `appendonly yes` and `appendfsync always` if the tokens must never go back, or use etcd,
//! whose tokens are revisions replicated by Raft.
//!
//! **Every lock name ever used leaves its counter behind.** `baton:fence:KEY` is one small
//! string key per lock (and election) name on `redis://` (Redlock keeps no counter), and it
//! **never expires**: it must not, or the next grant's token would start again from 1,
//! below the tokens a fenced resource has seen. Every other key Baton writes expires by
//! itself (the lock key and election record with their TTL, the queue and the waiters'
//! places within a few waiter windows of their last refresh). So locks on per-entity names (`order/<id>`) grow Redis by one key per name, without bound:
//! 500 names locked once leave 500 counters. Remove the counters of names that **no
//! process will ever lock again** (deleting a live name's counter makes its tokens go
//! back), for instance `redis-cli --scan --pattern 'baton:fence:order/*'` to list them and
//! `UNLINK` for the ones retired; never `baton:fence:*` wholesale while locks are in use.
//! For the same reason, run Redis with `maxmemory-policy noeviction`: under `allkeys-*`
//! policies Redis may evict a counter (tokens go back), and under `allkeys-*` or
//! `volatile-*` it may evict a held lock key (the lock is free while its holder believes
//! it holds it, until its next extend).
//!
//! # Losing a lock: the watchdog
//!
//! While a guard lives, its watchdog extends the key every TTL/3. The guard's
//! [`lost()`](RedisLockGuard::lost) fires when an extend finds the key gone or holding another
//! token (deleted by an operator, expired while the process was paused, a Redis restarted
//! without persistence), or when the **local deadline** passes without a successful extend.
//! The local deadline is the start of the last successful acquire or extend plus the TTL,
//! minus the clock drift allowance (1% of the TTL plus 2 ms), on the monotonic clock: it is
//! never later than the moment Redis expires the key. A deleted key is noticed within TTL/3
//! plus one round trip.
//!
//! # Waiting: FIFO hand-off, pub/sub wake-ups and a fallback poll
//!
//! On one server (`redis://`), lock waiters **queue in FIFO order** (the default; turn it off
//! with [`without_fifo`](RedisClientBuilder::without_fifo)):
//!
//! - A waiter that finds the lock held (or other live waiters ahead of it) appends its token
//!   to the list `baton:queue:KEY` and marks itself alive with the key
//!   `baton:waiter:KEY:TOKEN`, which expires after the **waiter window** (three fallback
//!   polls, at least 100 ms) unless refreshed. Every fallback poll refreshes it.
//! - A release by Baton hands the lock **straight to the oldest live waiter**: in the same
//!   script it sets the lock key to that waiter's token (with a new fencing token) and
//!   publishes a message naming it. Only that waiter wakes; there is no herd, and the lock
//!   is never free in between, so other clients cannot barge in.
//! - The new holder's local deadline counts from a moment no later than the hand-off: the
//!   send time of its last refresh plus the time Redis measured since then (the waiter
//!   window minus the waiter key's `PTTL`). The key is handed over for the shorter of the
//!   TTL and the waiter window, so that a waiter that died a moment ago (its place not yet
//!   expired) blocks the lock no longer than that; a live holder's watchdog extends it to
//!   the full TTL at once. FIFO therefore needs the watchdog: a client built
//!   [`without_watchdog`](RedisClientBuilder::without_watchdog) does not queue.
//! - A hand-off message may come after its short grant has ended (the waiter's poll was
//!   held up past it, and answered "waiting"). Every poll that finds the waiter waiting also
//!   returns the fencing counter, and a hand-off whose fencing token is no higher is stale:
//!   the waiter ignores it and keeps waiting. So is a grant (by message, by a poll's
//!   answer, or a take of a free lock) whose local deadline has already passed when the
//!   waiter learns of it (the waiter was paused, its runtime blocked, or the server
//!   stalled): the key may be another's by now, so rather than return a guard already
//!   lost, the waiter polls again at once, which takes the lock afresh if the key is still
//!   its own and otherwise queues it again. A `try_lock` polls again once; answered late
//!   again, it fails with a retryable [`Error::Unavailable`] that names the TTL, and its
//!   key is released.
//! - A waiter whose subscription is not confirmed (a user without channel rights, pub/sub
//!   refused) learns of a hand-off only by polling: it polls at least every third of the
//!   grant (the shorter of its TTL and its waiter window), so that no grant ends unseen
//!   and its turn is not lost to the waiter behind it.
//! - A waiter handed the lock that is gone before it learns of the grant (an operator's
//!   `DEL`, say) is first again: its next poll takes the lock if it is free, or puts it
//!   back at the head of the queue.
//! - The queue expires four waiter windows after the last refresh of its slowest waiter (a
//!   refresh never shortens it), so an abandoned queue goes away by itself; a waiter that
//!   finds its queue gone while its place lives is queued again.
//! - A waiter that gives up leaves the queue: [`lock_timeout`](RedisLock::lock_timeout)
//!   before it returns (or, if the server does not answer within 500 ms of the timeout, in
//!   the background, so that a hung server does not hold the caller up), a dropped `lock()`
//!   future in a task; [`close()`](RedisClient::close) waits for these tasks. A waiter that
//!   dies without leaving is skipped once its place expires.
//! - `try_lock` never queues: it takes the lock only if it is free and nobody alive waits.
//! - A server whose ACL refuses the queue's keys (written for the keys Baton used before)
//!   but allows the lock's own keys makes the client log one warning and stop queueing;
//!   locks still work, unqueued. A lock the ACL refuses altogether fails with
//!   [`Error::PermissionDenied`], and the client's other
//!   locks still queue.
//! - A user whose ACL refuses the wake-up channel `baton:wake:KEY` (Redis 7 grants no
//!   channel by default: `acl-pubsub-default resetchannels`; grant `&baton:wake:*`) costs
//!   only the wake-ups: releases, hand-offs and proclaims still succeed (their `PUBLISH` may
//!   fail without failing them), and waiters and observers of that channel learn of
//!   changes by the fallback poll, with one warning per client. The client's other
//!   channels are not affected.
//!
//! Redsync and redis-py clients ignore the queue: they take the key with `SET NX` whenever
//! it is free (after their own release, an expiry, or between Baton's waiters' polls), and
//! their releases do not hand over; Baton's queued waiters notice at their next poll.
//! The converse: **while Baton waiters queue, the key is never free** (each release hands
//! it straight to the next of them), so a redsync or redis-py client, or a Baton client
//! built [`without_fifo`](RedisClientBuilder::without_fifo), contending on the same name
//! gets the lock only when no Baton waiter queues, and can wait for ever under sustained
//! contention (measured: two Baton clients taking turns for 4 s, a `SET NX` every 10 ms
//! got it 0 times). In a mixed fleet, build every Baton client on those names
//! `without_fifo`, so that all contend alike (a [`Coordinator`](crate::Coordinator):
//! [`CoordinatorBuilder::without_fifo`](crate::CoordinatorBuilder::without_fifo); the
//! `baton` command: `baton lock --no-fifo`).
//! Redlock (`redlock://`) and elections do not queue: there, a waiter subscribes to the
//! lock's channel and retries after each release message, after the holder's key expires
//! (its `PTTL`), or at the fallback poll
//! ([`with_poll_interval`](RedisClientBuilder::with_poll_interval), default 500 ms,
//! jittered), and whoever sets the key first wins.
//!
//! # Redlock, and what it does not guarantee
//!
//! `redlock://h1:p1,h2:p2,h3:p3[,…]` runs Redlock over N independent masters (any N ≥ 3,
//! usually an odd number such as 3 or 5: an even N tolerates no more failures than N − 1;
//! no replication between them). One server listed twice would stand for two masters of the
//! quorum, and is refused: by the URL when the host and port repeat, and by the server's
//! `run_id` (`INFO server`, read on each connection a master makes, the first and every
//! reconnection) when they differ (`127.0.0.1:6379` and `localhost:6379`): connecting
//! fails with [`Error::InvalidEndpoint`] naming both. A master that could not be reached
//! while connecting is checked when it first connects, and a master whose server restarted
//! (a new `run_id`) when it reconnects: if another master's connection, still up, reached
//! the same server, the client logs an error and never uses it again: it counts as a
//! failed master, its calls failing as a master that is down does (transient, so a
//! waiter waits for the masters that are down to come back; an error names the masters
//! that are down rather than it). A user
//! whose ACL refuses `INFO` leaves only the URL's check (logged at debug level). An acquire sets the key on every master in parallel and
//! succeeds when a quorum of N/2+1 granted it within the validity, which is the TTL minus the
//! time the acquire took minus the drift (1% of the TTL plus 2 ms). Otherwise it deletes what
//! it set, on every master, and (in [`lock`](RedisLock::lock)) retries after a random delay.
//! A grant returns as soon as a quorum granted it: the writes to the other masters still in
//! flight land afterwards (each is sent within the request timeout; the key on more masters
//! than a bare quorum outlives a master's loss). A key deleted behind the client's back on
//! a master soon after a grant may therefore come back there.
//! Extending needs a quorum too. Redlock keeps working while a majority of masters is up:
//! a master that hangs (rather than refusing connections) holds nothing up by a request
//! timeout. Connecting, releasing, resigning, proclaiming, reading the leader and listing
//! holds return once the answers of a quorum settle the outcome (a quorum connected,
//! deleted the key, agrees on its holder...), after waiting a short while for the other
//! masters (1% of the TTL, at least 10 ms, or as long as those answers took if longer);
//! the writes still in flight then finish in the background (tasks that
//! [`close()`](RedisClient::close) waits for only for that short while more: each was sent
//! on the master's connection, which a paused Redis runs when it resumes, or was never
//! sent). Answers that settle nothing (one master no longer has the key, another has it)
//! make an unlock or a resign wait for the last master; the cleanups whose outcome nobody
//! reads (a failed acquire's deletions, a dropped guard's release, those of `close()`) do
//! not: once a master answered, they wait for the others only that short while, and a
//! `try_lock` with a majority of masters hung fails after one request timeout, not two.
//!
//! What Redlock does **not** give you, plainly (see Martin Kleppmann, "How to do distributed
//! locking", 2016):
//!
//! - **No fencing token.** Masters are independent, so there is no counter that increases
//!   across grants; [`fencing_token`](RedisLockGuard::fencing_token) is `None`. A holder
//!   paused past its validity (GC, SIGSTOP, swapping) cannot be stopped from writing by the
//!   resource it protects.
//! - **Timing assumptions.** Safety assumes bounded process pauses, bounded network delays,
//!   and clocks that run at roughly the same rate on every master (no jumps of the wall clock
//!   on a master, which Redis uses for expiry). Break them and two holders can overlap.
//! - **Restarts without persistence** can hand the same lock to two holders unless a
//!   restarted master stays down for at least a TTL.
//! - **A leader's value after a failed proclaim.** A proclaim that reached only a minority
//!   of masters fails, and the leader keeps its old value. With masters down, readers then
//!   say they cannot tell ([`Error::NoQuorum`]); with every master up but no version of the
//!   value on a quorum (a failed proclaim's version on one master, the old one on another,
//!   an older one on the third), [`leader`](RedisElection::leader) and observers report the
//!   newest version there is, as they must while a proclaim is on its way to a quorum
//!   (the masters' versions alone cannot tell the two apart), until the leader's next
//!   proclaim.
//!
//! Redlock is fine for efficiency (avoiding duplicate work). **When correctness depends on
//! the lock** — two holders would corrupt data — use etcd (`http://…`), whose locks carry a
//! fencing token that a resource can check, or at least a single Redis with persistence and
//! its fencing token.
//!
//! # Elections
//!
//! [`RedisElection`] is built on the same lock and watchdog: the leader holds the lock key,
//! and its value lives in the record `baton:leader:KEY`. Observers learn of changes by
//! pub/sub, with the fallback poll.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::client::{Endpoints, DEFAULT_DIAL_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
use crate::coordinator::{Backend, Elector, Lock};
use crate::error::{Error, Result};
use crate::security::{Credentials, Secret, TlsConfig};
use crate::session::DEFAULT_TTL;
use crate::Client;

mod election;
mod lock;
mod node;
mod redlock;
mod status;
mod wakeups;
mod watchdog;

pub use election::{RedisElection, RedisLeadership, RedisObserve};
pub use lock::{RedisLock, RedisLockGuard};
pub use status::RedisHold;

use node::Node;
use wakeups::Hub;
use watchdog::HoldState;

/// The smallest TTL a Redis lock accepts: 10 ms. Below that the drift allowance (1% + 2 ms)
/// and one round trip leave no validity.
pub const MIN_TTL: Duration = Duration::from_millis(10);

/// The largest TTL a Redis lock accepts: 9,000,000,000 s, as for etcd sessions (Redis itself
/// would overflow near 2^63 ms).
pub const MAX_TTL: Duration = crate::session::MAX_TTL;

/// The default fallback poll of a waiter or observer: 500 ms, jittered.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The clock drift allowed for a TTL: 1% of it plus 2 ms.
pub(crate) fn drift(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// A new random token of 128 bits, as 32 lowercase hex digits.
pub(crate) fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Options for [`RedisClient`].
///
/// # Default
///
/// - TTL of each lock: 60 s ([`DEFAULT_TTL`]); at least 10 ms
///   ([`MIN_TTL`]), at most 9e9 s ([`MAX_TTL`]); rounded up to whole milliseconds;
/// - watchdog: on, extending every TTL/3;
/// - key prefix: none;
/// - fallback poll while waiting or observing: 500 ms ([`DEFAULT_POLL_INTERVAL`]), jittered;
///   at least 1 ms, at most 9e9 s ([`MAX_TTL`]);
/// - dial timeout: 5 s; request timeout: 10 s; each greater than zero and at most 9e9 s
///   ([`MAX_TTL`]).
#[derive(Clone)]
pub struct RedisClientBuilder {
    endpoints: String,
    ttl: Duration,
    dial_timeout: Duration,
    request_timeout: Duration,
    prefix: String,
    poll_interval: Duration,
    watchdog: bool,
    fifo: bool,
    tls: Option<TlsConfig>,
    credentials: Option<Credentials>,
    password: Option<Secret>,
}

impl fmt::Debug for RedisClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClientBuilder")
            .field("endpoints", &crate::client::redact(&self.endpoints))
            .field("ttl", &self.ttl)
            .field("dial_timeout", &self.dial_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("prefix", &self.prefix)
            .field("poll_interval", &self.poll_interval)
            .field("watchdog", &self.watchdog)
            .field("fifo", &self.fifo)
            .field("tls", &self.tls)
            .field("credentials", &self.credentials)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl RedisClientBuilder {
    /// Options for `endpoints` (`redis://…` or `redlock://…`), with the defaults.
    pub fn new(endpoints: &str) -> Self {
        RedisClientBuilder {
            endpoints: endpoints.to_string(),
            ttl: DEFAULT_TTL,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            prefix: String::new(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            watchdog: true,
            fifo: true,
            tls: None,
            credentials: None,
            password: None,
        }
    }

    /// TLS settings for `rediss://` servers: the CA to trust (else the system's roots) and
    /// an optional client certificate. With `redis://` (plaintext) servers, connecting fails
    /// rather than sending anything in the clear.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// `AUTH user password` (a Redis 6 ACL user) on every server whose URL carries no
    /// credentials of its own. Never shown in `Debug` output, logs or errors.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials::new(user, password));
        self
    }

    /// `AUTH password` (`requirepass`, or the URL's user) on every server whose URL carries
    /// no password of its own.
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(Secret::new(password));
        self
    }

    /// TLS settings and credentials from [`CoordinatorBuilder`](crate::CoordinatorBuilder)
    /// (`None`: keep these).
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

    /// The TTL of each lock key: how long a lock outlives a holder that stopped extending it.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait for a server when connecting.
    pub fn with_dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// How long one request to one server may take (default 10 s). Each release's marker
    /// (`baton:released:KEY:TOKEN`, see [Lost connections](self#lost-connections)) lives
    /// twice this.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Put `prefix` in front of every lock and election name (`"myapp:"` makes lock `jobs`
    /// the key `myapp:jobs`), as redsync's and redis-py's users often do by hand.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How often a waiter or observer polls when no wake-up message comes.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Keep every guard's key alive in the background, extending it every TTL/3 (the default).
    pub fn with_watchdog(mut self) -> Self {
        self.watchdog = true;
        self
    }

    /// Do not extend keys in the background: each lock then ends after its TTL unless
    /// [`RedisLockGuard::extend`] is called, and its `lost()` fires at the local deadline.
    pub fn without_watchdog(mut self) -> Self {
        self.watchdog = false;
        self
    }

    /// On one server (`redis://`), lock waiters queue in FIFO order and a release hands the
    /// lock to the oldest live waiter, waking only it (the default). See the
    /// [module documentation](self#waiting-fifo-hand-off-pub-sub-wake-ups-and-a-fallback-poll).
    /// Redlock (`redlock://`) and elections never queue.
    pub fn with_fifo(mut self) -> Self {
        self.fifo = true;
        self
    }

    /// Do not queue lock waiters: after a release, every waiter of this client tries again
    /// and whichever sets the key first wins (as on Redlock).
    pub fn without_fifo(mut self) -> Self {
        self.fifo = false;
        self
    }

    /// Validate everything, then connect.
    ///
    /// Fails with [`Error::InvalidEndpoint`] or [`Error::InvalidArgument`] before any network
    /// call for a malformed URL, or a TTL, timeout or poll interval out of range (see
    /// [`RedisClientBuilder`]'s defaults), and with [`Error::InvalidEndpoint`] too if the
    /// server has no database of the URL's number. On `redis://`, fails with
    /// [`Error::Connect`] if the server does not answer within the dial timeout, and with
    /// [`Error::Tls`] if a `rediss://` server speaks plaintext Redis (found within a
    /// fraction of a second: a plaintext `PING` on a second connection), and if a
    /// `redis://` server hangs up on the first command and answers a TLS ClientHello on a
    /// second connection (a TLS port: use `rediss://`). On
    /// `redlock://`, connects to every master in parallel and fails only if fewer than a
    /// quorum answer, or with [`Error::InvalidEndpoint`] if two of the masters that answered
    /// are one server under two names (the same `run_id`; see the
    /// [module documentation](self#redlock-and-what-it-does-not-guarantee)). It returns once a quorum is connected and the others have had a
    /// short while more (1% of the TTL, at least 10 ms, or as long as the quorum took if
    /// longer): those go on dialling in the background, and are dialled again when used if
    /// that fails.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future drops the half-made connections.
    pub async fn connect(self) -> Result<RedisClient> {
        let opts = self.validate()?;
        let parsed = Endpoints::parse(&self.endpoints)?;
        let redacted = parsed.to_string();
        let (list, redlock) = match parsed {
            Endpoints::Redis(node) => (vec![node], false),
            Endpoints::Redlock(nodes) => (nodes, true),
            _ => {
                return Err(Error::InvalidEndpoint {
                    endpoint: redacted,
                    reason: "not a redis:// or redlock:// URL".into(),
                })
            }
        };
        if self.tls.is_some() && list.iter().any(|n| !n.tls) {
            return Err(Error::InvalidEndpoint {
                endpoint: redacted,
                reason: "TLS settings (CA, client certificate) need rediss:// servers; \
                         redis:// is plaintext"
                    .into(),
            });
        }
        let list: Vec<_> = list
            .into_iter()
            .map(|mut n| {
                // The URL's credentials win: Redlock masters may each have their own.
                if n.username.is_none() && n.password.is_none() {
                    if let Some(creds) = &self.credentials {
                        n.username = Some(creds.user.clone());
                        n.password = Some(creds.password.expose().to_string());
                    }
                }
                if n.password.is_none() {
                    n.password = self.password.as_ref().map(|p| p.expose().to_string());
                }
                n
            })
            .collect();
        // Redlock masters read each other's `run_id` when dialled: one server listed under
        // two names is refused (see `node::Masters`).
        let masters = redlock.then(|| {
            Arc::new(node::Masters::new(
                list.iter().map(ToString::to_string).collect(),
            ))
        });
        let nodes = list
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let node = Node::new(
                    n,
                    self.dial_timeout,
                    self.request_timeout,
                    self.tls.as_ref(),
                )?;
                Ok(Arc::new(match &masters {
                    Some(masters) => node.in_redlock(masters.clone(), i),
                    None => node,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        let quorum = nodes.len() / 2 + 1;
        let n = nodes.len();
        // Once a quorum is connected, a master that hangs is not waited for until the dial
        // timeout: it goes on dialling in the background (and is dialled again when used if
        // that fails).
        let dials = nodes
            .iter()
            .map(|node| {
                let node = node.clone();
                async move { node.connect().await }
            })
            .collect();
        let failed = redlock::too_many_failed(n, quorum);
        let connected = redlock::quorum_succeeded(quorum);
        let (dials, mut rest) =
            redlock::gather(dials, connected, redlock::straggle(opts.ttl), failed).await;
        // One server listed under two names: a configuration error, whatever else answered.
        if let Some(reason) = nodes.iter().find_map(|n| n.duplicate_reason()) {
            return Err(Error::InvalidEndpoint {
                endpoint: redacted,
                reason,
            });
        }
        let up = dials.iter().filter(|r| r.is_ok()).count();
        if up >= quorum && !rest.is_empty() {
            tokio::spawn(async move { while rest.next().await.is_some() {} });
        }
        if up < quorum {
            // Refused credentials or certificates, and a database the server does not
            // have, are configuration errors: report them as such, not as a server that
            // did not answer.
            if let Some(denied) = dials.iter().find_map(|r| match r {
                Err(e) if e.is_access_denied() || matches!(e, Error::InvalidEndpoint { .. }) => {
                    Some(e)
                }
                _ => None,
            }) {
                return Err(match denied {
                    Error::Unauthenticated(m) => Error::Unauthenticated(m.clone()),
                    Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
                    Error::Tls { endpoints, reason } => Error::Tls {
                        endpoints: endpoints.clone(),
                        reason: reason.clone(),
                    },
                    Error::InvalidEndpoint { endpoint, reason } => Error::InvalidEndpoint {
                        endpoint: endpoint.clone(),
                        reason: reason.clone(),
                    },
                    other => Error::Store(other.to_string()),
                });
            }
            let dials_failed = dials.iter().filter(|r| r.is_err()).count();
            let not_waited = nodes.len().saturating_sub(dials.len());
            let reason = dials
                .into_iter()
                .find_map(|r| r.err())
                .map(|e| match e {
                    Error::Connect { reason, .. } => reason,
                    other => other.to_string(),
                })
                .unwrap_or_default();
            return Err(Error::Connect {
                endpoints: redacted,
                timeout: self.dial_timeout,
                reason: if redlock {
                    // The dials stop once too many failed for a quorum: the rest were not
                    // waited for, so count the failures, not the answers.
                    let rest = if not_waited > 0 {
                        format!(" (the other {not_waited} not waited for: no quorum was left)")
                    } else {
                        String::new()
                    };
                    format!(
                        "{failed} of {} masters failed{rest}, a quorum of {quorum} needed: {reason}",
                        nodes.len(),
                        failed = dials_failed,
                    )
                } else {
                    reason
                },
            });
        }
        let confirm = self.request_timeout.min(opts.poll_interval);
        let hub = Hub::new(nodes.clone(), confirm);
        tracing::debug!(endpoints = %redacted, nodes = nodes.len(), up, "redis client connected");
        Ok(RedisClient {
            inner: Arc::new(ClientInner {
                endpoints: redacted,
                nodes,
                redlock,
                quorum,
                opts,
                hub,
                closed: CancellationToken::new(),
                holds: StdMutex::new(HashMap::new()),
                launcher: watchdog::Launcher::default(),
                cleanups: tokio_util::task::TaskTracker::new(),
                stragglers: tokio_util::task::TaskTracker::new(),
                stray_acquires: StdMutex::new(HashMap::new()),
                fifo_refused: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    fn validate(&self) -> Result<Options> {
        if self.ttl < MIN_TTL {
            return Err(Error::invalid(format!(
                "ttl {} is below the minimum of {MIN_TTL:?}",
                crate::names::show_duration(self.ttl)
            )));
        }
        if self.ttl > MAX_TTL {
            return Err(Error::invalid(format!(
                "ttl {:?} is above the maximum of {MAX_TTL:?}",
                self.ttl
            )));
        }
        if self.dial_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::invalid("timeouts must be greater than zero"));
        }
        // Deadlines are `now + timeout` on the monotonic clock, which cannot add
        // `Duration::MAX`: refuse what it cannot add, as for a TTL.
        if self.dial_timeout > MAX_TTL || self.request_timeout > MAX_TTL {
            return Err(Error::invalid(format!(
                "timeouts must be at most {MAX_TTL:?}"
            )));
        }
        if self.poll_interval < Duration::from_millis(1) {
            return Err(Error::invalid("the poll interval must be at least 1 ms"));
        }
        if self.poll_interval > MAX_TTL {
            return Err(Error::invalid(format!(
                "the poll interval must be at most {MAX_TTL:?}"
            )));
        }
        if self.prefix.contains('\0') || self.prefix.len() > crate::MAX_NAME_LEN {
            return Err(Error::invalid(
                "the key prefix must be at most 1 KiB with no NUL byte",
            ));
        }
        // Whole milliseconds, rounded up: PX counts milliseconds.
        let ms =
            self.ttl.as_millis() + u128::from(!self.ttl.subsec_nanos().is_multiple_of(1_000_000));
        let ttl_ms = u64::try_from(ms).map_err(|_| Error::invalid("ttl out of range"))?;
        Ok(Options {
            ttl: Duration::from_millis(ttl_ms),
            ttl_ms,
            prefix: self.prefix.clone(),
            poll_interval: self.poll_interval,
            watchdog: self.watchdog,
            fifo: self.fifo,
            request_timeout: self.request_timeout,
        })
    }
}

/// Validated options.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) ttl: Duration,
    pub(crate) ttl_ms: u64,
    pub(crate) prefix: String,
    pub(crate) poll_interval: Duration,
    pub(crate) watchdog: bool,
    pub(crate) fifo: bool,
    pub(crate) request_timeout: Duration,
}

impl Options {
    /// How long a FIFO waiter's place lives without a refresh: three fallback polls (a
    /// waiter refreshes it at every poll), at least 100 ms.
    pub(crate) fn waiter_window(&self) -> Duration {
        self.poll_interval
            .saturating_mul(3)
            .max(Duration::from_millis(100))
    }
}

/// A connection to one Redis server (`redis://`) or to the independent masters of Redlock
/// (`redlock://`), handing out [`RedisLock`]s and [`RedisElection`]s. Cheap to clone.
///
/// See the [module documentation](self) for the wire format, the guarantees, and what
/// Redlock does not guarantee.
///
/// # Drop behaviour
///
/// Connections close when the last clone, lock and guard are gone. Call
/// [`close()`](RedisClient::close) to release every lock still held first.
#[derive(Clone)]
pub struct RedisClient {
    inner: Arc<ClientInner>,
}

pub(crate) struct ClientInner {
    pub(crate) endpoints: String,
    pub(crate) nodes: Vec<Arc<Node>>,
    pub(crate) redlock: bool,
    pub(crate) quorum: usize,
    pub(crate) opts: Options,
    pub(crate) hub: Hub,
    /// Cancelled by `close()`: every hold is lost, every wait ends.
    pub(crate) closed: CancellationToken,
    /// Every hold alive, so `close()` can release them.
    pub(crate) holds: StdMutex<HashMap<u64, Arc<HoldState>>>,
    /// Starts the watchdogs of holds that outlive a few milliseconds.
    pub(crate) launcher: watchdog::Launcher,
    /// Releases and queue exits spawned by dropped guards and cancelled waits, and the
    /// deletions of failed acquires: `close()` waits for them (within the request timeout),
    /// so that a process that closes its client before exiting leaves nothing behind. Each
    /// is a [`clean_up`](ClientInner::clean_up), which does not wait for a Redlock master
    /// silent past the straggler wait once another answered.
    pub(crate) cleanups: tokio_util::task::TaskTracker,
    /// The writes an operation whose outcome a quorum settled left in flight to the masters
    /// that had not answered (see `redlock::gather`): `close()` waits for them only for a
    /// straggler wait. Each was sent on its master's connection (which the master runs when
    /// it answers again, even after we hung up), or was never sent (the master had no
    /// connection), so waiting longer for its answer would only hold the caller up.
    pub(crate) stragglers: tokio_util::task::TaskTracker,
    /// The tokens whose acquires are still in flight after a quorum took the key, and
    /// whether the hold's release has begun (see `finish_acquire_in_background`).
    pub(crate) stray_acquires: StdMutex<HashMap<String, bool>>,
    /// Set when the server refused the FIFO queue's keys (an ACL written for the keys Baton
    /// used before, without `baton:queue:*` and `baton:waiter:*`): this client's waiters
    /// then no longer queue.
    pub(crate) fifo_refused: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for ClientInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClient")
            .field("endpoints", &self.endpoints)
            .field("quorum", &self.quorum)
            .field("ttl", &self.opts.ttl)
            .field("closed", &self.closed.is_cancelled())
            .finish()
    }
}

impl fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl RedisClient {
    /// Connect with the default options. See [`RedisClientBuilder::connect`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn connect(endpoints: &str) -> Result<RedisClient> {
        RedisClientBuilder::new(endpoints).connect().await
    }

    /// Configure a connection.
    pub fn builder(endpoints: &str) -> RedisClientBuilder {
        RedisClientBuilder::new(endpoints)
    }

    /// A lock named `name`. Fails with [`Error::InvalidArgument`] if the name is empty,
    /// longer than 1 KiB, or contains a NUL byte, or if the key (prefix and name) is in
    /// Baton's own key space for other locks (`baton:fence:…`, see the module docs).
    pub fn lock(&self, name: &str) -> Result<RedisLock> {
        RedisLock::new(self, name)
    }

    /// An election named `name`; the same name rules as [`lock`](RedisClient::lock). An
    /// election and a lock of the same name share one key, and exclude each other.
    pub fn election(&self, name: &str) -> Result<RedisElection> {
        RedisElection::new(self, name)
    }

    /// The endpoints, credentials redacted.
    pub fn endpoints(&self) -> &str {
        &self.inner.endpoints
    }

    /// True on `redlock://`.
    pub fn is_redlock(&self) -> bool {
        self.inner.redlock
    }

    /// How many servers there are: 1 on `redis://`.
    pub fn nodes(&self) -> usize {
        self.inner.nodes.len()
    }

    /// How many servers must agree: N/2+1 (1 on `redis://`).
    pub fn quorum(&self) -> usize {
        self.inner.quorum
    }

    /// The TTL of each lock key.
    pub fn ttl(&self) -> Duration {
        self.inner.opts.ttl
    }

    /// The clock drift allowed for the TTL: 1% of it plus 2 ms.
    pub fn drift(&self) -> Duration {
        drift(self.inner.opts.ttl)
    }

    /// True once [`close()`](RedisClient::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Release every lock and leadership still held through this client (compare-and-delete
    /// on every server), mark them lost, and end every wait and observation. Closing twice is
    /// not an error.
    ///
    /// What it waits for, in turn:
    ///
    /// 1. the releases of the holds still alive;
    /// 2. the cleanups still running (releases of dropped guards, deletions of failed or
    ///    cancelled acquires, waiters leaving the queue), within the request timeout
    ///    (default 10 s);
    /// 3. the writes left in flight to Redlock masters that had not answered when a quorum
    ///    settled an operation (an unlock, a resign, a proclaim), within the straggler wait
    ///    (1% of the TTL, at least 10 ms).
    ///
    /// On Redlock, each release and cleanup returns once a master answered it and the
    /// others stayed silent past the straggler wait, or once a quorum settled it: a master
    /// that hangs (paused, or its host unreachable without a refusal) makes `close()` no
    /// slower than that, rather than a request timeout. What is not waited for was sent on
    /// that master's connection (a paused Redis runs it when it resumes) or was never sent
    /// (no connection to it); those keys expire with their TTL otherwise. On one server,
    /// `close()` waits for the server's answers, within the request timeout.
    ///
    /// # Cancel safety
    ///
    /// Everything is marked lost at once; if the future is dropped, keys not yet deleted
    /// expire after their TTL.
    #[tracing::instrument(name = "close", skip_all, fields(endpoints = %self.inner.endpoints))]
    pub async fn close(&self) -> Result<()> {
        self.inner.closed.cancel();
        let holds: Vec<Arc<HoldState>> = self
            .inner
            .holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, h)| h)
            .collect();
        let releases = holds.iter().map(|h| {
            h.set_reason("the client was closed");
            self.inner.clean_up(&h.keys, &h.token)
        });
        for r in futures::future::join_all(releases).await {
            if let Err(e) = r {
                tracing::debug!(error = %e, "release on close failed; the key expires with its ttl");
            }
        }
        self.inner.cleanups.close();
        if tokio::time::timeout(self.inner.opts.request_timeout, self.inner.cleanups.wait())
            .await
            .is_err()
        {
            tracing::debug!("cleanups still running at close; their keys expire with their ttl");
        }
        self.inner.stragglers.close();
        let straggle = redlock::straggle(self.inner.opts.ttl);
        if tokio::time::timeout(straggle, self.inner.stragglers.wait())
            .await
            .is_err()
        {
            tracing::debug!(
                "writes to masters that have not answered are still in flight at close; \
                 they were sent (or never will be), and their keys expire with their ttl"
            );
        }
        Ok(())
    }

    pub(crate) fn inner(&self) -> &Arc<ClientInner> {
        &self.inner
    }
}

impl ClientInner {
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.is_cancelled() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Backend for RedisClient {
    fn name(&self) -> &'static str {
        if self.inner.redlock {
            "redlock"
        } else {
            "redis"
        }
    }

    fn lock(&self, name: &str) -> Result<Box<dyn Lock>> {
        Ok(Box::new(RedisClient::lock(self, name)?))
    }

    fn election(&self, name: &str) -> Result<Box<dyn Elector>> {
        Ok(Box::new(RedisClient::election(self, name)?))
    }

    fn lost_token(&self) -> Option<CancellationToken> {
        None
    }

    fn client(&self) -> Option<&Client> {
        None
    }

    fn redis(&self) -> Option<&RedisClient> {
        Some(self)
    }

    async fn close(&self) -> Result<()> {
        RedisClient::close(self).await
    }
}

#[cfg(test)]
impl ClientInner {
    /// A client that never dialled its server, for tests of what needs none.
    pub(crate) fn unconnected(ttl: Duration) -> Arc<ClientInner> {
        let builder = RedisClientBuilder::new("redis://127.0.0.1:1").with_ttl(ttl);
        let opts = builder.validate().unwrap();
        let Ok(Endpoints::Redis(node)) = Endpoints::parse(&builder.endpoints) else {
            panic!("not a redis:// URL");
        };
        let node = Node::new(&node, builder.dial_timeout, builder.request_timeout, None);
        let nodes = vec![Arc::new(node.unwrap())];
        Arc::new(ClientInner {
            endpoints: builder.endpoints.clone(),
            hub: Hub::new(nodes.clone(), opts.request_timeout),
            nodes,
            redlock: false,
            quorum: 1,
            opts,
            closed: CancellationToken::new(),
            holds: StdMutex::new(HashMap::new()),
            launcher: watchdog::Launcher::default(),
            cleanups: tokio_util::task::TaskTracker::new(),
            stragglers: tokio_util::task::TaskTracker::new(),
            stray_acquires: StdMutex::new(HashMap::new()),
            fifo_refused: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_one_percent_plus_two_ms() {
        assert_eq!(drift(Duration::from_secs(10)), Duration::from_millis(102));
        assert_eq!(
            drift(Duration::from_millis(10)),
            Duration::from_micros(2100)
        );
    }

    #[test]
    fn tokens_are_128_bits_of_hex() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn options_are_validated_before_any_network_call() {
        let b = |ttl| {
            RedisClientBuilder::new("redis://h:1")
                .with_ttl(ttl)
                .validate()
        };
        assert!(b(Duration::ZERO).is_err());
        assert!(b(Duration::from_millis(9)).is_err());
        assert!(b(MAX_TTL + Duration::from_secs(1)).is_err());
        assert_eq!(b(Duration::from_micros(10_500)).unwrap().ttl_ms, 11);
        assert_eq!(b(Duration::from_secs(2)).unwrap().ttl_ms, 2000);
        let zero = RedisClientBuilder::new("redis://h:1").with_request_timeout(Duration::ZERO);
        assert!(zero.validate().is_err());
        let nul = RedisClientBuilder::new("redis://h:1").with_prefix("a\0");
        assert!(nul.validate().is_err());
        // Too large to add to a deadline: refused, not a panic later.
        let b = || RedisClientBuilder::new("redis://h:1");
        for huge in [Duration::MAX, MAX_TTL + Duration::from_secs(1)] {
            for builder in [
                b().with_poll_interval(huge),
                b().with_dial_timeout(huge),
                b().with_request_timeout(huge),
            ] {
                let err = builder.validate().unwrap_err();
                assert!(err.is_invalid_input(), "{err}");
                assert!(err.to_string().contains("at most"), "{err}");
            }
        }
        let most = b()
            .with_poll_interval(MAX_TTL)
            .with_dial_timeout(MAX_TTL)
            .with_request_timeout(MAX_TTL)
            .validate()
            .unwrap();
        assert_eq!(most.waiter_window(), MAX_TTL * 3);
        // Saturates rather than overflows, whatever the options.
        let opts = Options {
            poll_interval: Duration::MAX,
            ..most
        };
        assert_eq!(opts.waiter_window(), Duration::MAX);
    }

    #[tokio::test]
    async fn bad_urls_fail_before_dialling() {
        for url in [
            "redis://",
            "redis://h",
            "redlock://a:1,b:2",
            "redis://a:1,b:2",
            "mem://",
        ] {
            let err = RedisClient::connect(url).await.unwrap_err();
            assert!(err.is_invalid_input(), "{url}: {err}");
        }
    }

    #[test]
    fn types_are_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<RedisClient>();
        check::<RedisLock>();
        check::<RedisLockGuard>();
        check::<RedisElection>();
        check::<RedisLeadership>();
    }
}

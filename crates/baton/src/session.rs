//! Session: one lease, kept alive, and the single source of liveness for everything bound to it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex as StdMutex, MutexGuard as StdMutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

use crate::client::Client;
use crate::deadline::LocalDeadline;
use crate::error::{Error, Result};
use crate::store::{LeaseId, Store};

/// The default session TTL: 60 s, as in Go's `concurrency.NewSession`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// The smallest TTL a session accepts: 2 s. etcd raises smaller TTLs to its own minimum, so a
/// smaller value would be a promise Baton cannot keep.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// The largest TTL a session accepts: 9,000,000,000 s, etcd's own limit.
pub const MAX_TTL: Duration = Duration::from_secs(9_000_000_000);

/// The shortest keep-alive interval a session accepts: 100 ms. Shorter ones would only load
/// the store: even at the smallest TTL ([`MIN_TTL`]) this sends 20 keep-alives per TTL.
pub const MIN_KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(100);

/// How long the session waits after a failed keep-alive before it tries again.
const RETRY_BACKOFF: Duration = Duration::from_millis(250);

/// At most this many keep-alives of one session wait for their replies at once.
const MAX_IN_FLIGHT: usize = 4;

/// How many times `build()` renews a lease whose grant or first renewal was answered only
/// after its TTL, before it gives up.
const LATE_RENEWALS: u32 = 3;

/// Why a session is lost when its local deadline passes.
const DEADLINE_PASSED: &str = "keep-alives were not acknowledged before the local deadline";

/// Why an orphaned session is lost (at its local deadline).
const ORPHANED: &str = "session orphaned: its lease is no longer kept alive";

/// Why a session is lost when the runtime running its keep-alives shuts down under it.
const RUNTIME_GONE: &str =
    "the tokio runtime the session was built on, which ran its keep-alives, was shut down";

/// A lease kept alive in the background: the liveness of every lock, permit or candidacy
/// created through it.
///
/// A session owns one lease. A background task sends a keep-alive every TTL/3. The session
/// counts as **lost** — [`lost()`](Session::lost) completes — as soon as any of these happens:
///
/// - the store reports the lease gone (revoked by an admin, or expired);
/// - keep-alives are not acknowledged before the *local deadline*: the send time of the last
///   acknowledged keep-alive plus the TTL, on the monotonic clock. The server's own expiry
///   can only be later than that, so a session never believes it is alive after its lease
///   has expired. [`is_lost()`](Session::is_lost), [`lost_reason()`](Session::lost_reason),
///   [`lost()`](Session::lost) and [`lost_token()`](Session::lost_token) compare the deadline
///   with the clock themselves, so a process that was paused past it (a stopped process, a
///   blocked runtime) learns it at its first call, without waiting for the keep-alive task
///   to run. A pause *between* that check and a write is what fencing tokens cover;
/// - [`close()`](Session::close) was called, or [`orphan()`](Session::orphan) was called and
///   the local deadline then passed;
/// - the tokio runtime the session was built on, which runs its keep-alive task, shut down
///   while handles to the session live on (in another runtime): nothing keeps the lease
///   alive any more.
///
/// `Session` is a cheap handle: clones share the lease. Locks and guards hold a clone, so the
/// lease lives as long as anything uses it.
///
/// # Drop behaviour
///
/// When the last handle is dropped, the keep-alives stop and the lease is revoked in a task
/// spawned on the current tokio runtime (best effort; if there is no runtime, or the revoke
/// fails, the lease simply expires after its TTL). That task needs the runtime to keep
/// running until the store has answered: a session dropped as `main` returns (the end of
/// `#[tokio::main]`, whose runtime shuts down right after) is usually not revoked, and
/// whatever it held stays held by the exited process until the lease expires. Call
/// [`close()`](Session::close) to revoke and see the result (before returning from `main`,
/// say), or [`orphan()`](Session::orphan) to leave the lease to expire.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let session = baton::Session::builder(&client)
///     .with_ttl(Duration::from_secs(10))
///     .build()
///     .await?;
/// assert_eq!(session.ttl(), Duration::from_secs(10));
/// assert!(!session.is_lost());
/// session.close().await?;
/// assert!(session.is_lost());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

/// See [`Session::downgrade`].
#[derive(Clone)]
pub(crate) struct WeakSession(Weak<Inner>);

impl WeakSession {
    /// The session, unless every `Session` handle is gone.
    pub(crate) fn upgrade(&self) -> Option<Session> {
        self.0.upgrade().map(|inner| Session { inner })
    }
}

struct Inner {
    client: Client,
    shared: Arc<Shared>,
    claims: Claims,
}

/// What the keep-alive task shares with the handles. The task holds this, never `Inner`, so
/// dropping the last handle drops `Inner` and stops the task.
struct Shared {
    lease: LeaseId,
    ttl: Duration,
    /// Cancelled when the session is lost, for any reason.
    lost: CancellationToken,
    /// The local deadline: the send time of the last acknowledged keep-alive plus the TTL.
    deadline: LocalDeadline,
    /// Cancelled to stop sending keep-alives (close, orphan, drop).
    stop: CancellationToken,
    /// Wakes the keep-alive task to check the lease at once.
    poke: Notify,
    state: StdMutex<State>,
}

#[derive(Debug)]
struct State {
    lost_reason: Option<String>,
    orphaned: bool,
    /// The store confirmed the lease is gone (revoked by `close`, or not found).
    revoked: bool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("lease", &format_args!("{:x}", self.inner.shared.lease))
            .field("ttl", &self.inner.shared.ttl)
            .field("lost", &self.is_lost())
            .field("backend", &self.inner.client.backend())
            .finish()
    }
}

/// Options for a [`Session`].
///
/// # Default
///
/// - TTL: 60 s ([`DEFAULT_TTL`]); at least 2 s ([`MIN_TTL`]), at most 9e9 s ([`MAX_TTL`]);
///   rounded up to whole seconds, because etcd leases count seconds;
/// - keep-alive interval: a third of the TTL granted; if set, at least 100 ms
///   ([`MIN_KEEP_ALIVE_INTERVAL`]) and shorter than the TTL.
#[derive(Debug, Clone)]
pub struct SessionBuilder {
    client: Client,
    ttl: Duration,
    keep_alive_interval: Option<Duration>,
    lease: Option<LeaseId>,
}

impl SessionBuilder {
    /// Set the lease TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Send keep-alives this often instead of every TTL/3. Must be shorter than the TTL and
    /// at least [`MIN_KEEP_ALIVE_INTERVAL`] (100 ms); [`build`](SessionBuilder::build) fails
    /// with [`Error::InvalidArgument`] otherwise.
    pub fn with_keep_alive_interval(mut self, interval: Duration) -> Self {
        self.keep_alive_interval = Some(interval);
        self
    }

    /// Adopt an existing lease instead of granting a new one (Go's `WithLease`): keep it
    /// alive, and use it for keys. Its TTL is the one it was granted with; the TTL set with
    /// [`with_ttl`](SessionBuilder::with_ttl) is ignored. Use it to resume locks or a
    /// leadership held by an earlier process that has stopped. An
    /// [`RwLock`](crate::RwLock) adopts the key left in the same mode, and refuses the
    /// other mode with [`Error::AlreadyHeld`] until that key is released; with keys of both
    /// modes left, the older key's mode adopts it, and the other mode (refused until then)
    /// adopts its key once the older one is released.
    ///
    /// Only a key still bound to the lease is adopted (by a [`Mutex`](crate::Mutex), an
    /// [`Election`](crate::Election), an [`RwLock`](crate::RwLock), a
    /// [`Semaphore`](crate::Semaphore) or a [`DoubleBarrier`](crate::DoubleBarrier)). A key
    /// an operator overwrote with no lease (`etcdctl put NAME/<lease> ""`) was released by
    /// that write, and another session may hold the name since: it is removed (unless
    /// written again meanwhile) and the call queues afresh behind whoever holds the name now,
    /// with a new fencing token ([`Election::resume`](crate::Election::resume) fails with
    /// [`Error::NotLeader`] instead, and leaves the key alone). A key under the name that is
    /// bound to another lease is another owner's: the call fails with
    /// [`Error::InvalidData`] and leaves it alone.
    ///
    /// Sessions on one lease are **one owner**: a lock's key is `NAME/<lease>`, so each of
    /// them finds its key already there and is granted a lock the other holds, with the same
    /// fencing token, and neither is told (as in Go, where the key is the same). Never
    /// adopt the lease of a process that is still running and may lock the same names. And
    /// closing or dropping any of them revokes the lease for all: use
    /// [`Session::orphan`] to stop one without ending the others' locks.
    ///
    /// `build()` fails with [`Error::LeaseNotFound`] if the lease does not exist.
    pub fn with_lease(mut self, lease: LeaseId) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Grant the lease (or adopt the one given) and start keeping it alive.
    ///
    /// Fails with [`Error::InvalidArgument`] before any network call if the TTL or interval
    /// is out of range; for an adopted lease ([`with_lease`](SessionBuilder::with_lease)),
    /// an interval not shorter than its TTL is found only once its first renewal has told
    /// the TTL (that renewal has then been sent). A session is never returned already
    /// lost: if the grant (or the first renewal of an adopted lease) is answered only after
    /// the TTL, the lease is renewed again, and `build()` fails with [`Error::Timeout`] if
    /// that happens three times more.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: if the future is dropped after the grant was sent, the lease is left
    /// to expire after its TTL.
    pub async fn build(self) -> Result<Session> {
        let interval = self.keep_alive_interval;
        // The floor applies to an adopted lease too, so check it before any network call.
        if let Some(i) = interval.filter(|i| *i < MIN_KEEP_ALIVE_INTERVAL) {
            return Err(Error::invalid(format!(
                "keep-alive interval {i:?} is below the minimum of {MIN_KEEP_ALIVE_INTERVAL:?}"
            )));
        }
        let check_interval = |ttl: Duration| match interval {
            Some(i) if i >= ttl => Err(Error::invalid(format!(
                "keep-alive interval {i:?} must be shorter than the TTL {ttl:?}"
            ))),
            _ => Ok(()),
        };
        // An adopted lease has the TTL it was granted with: `with_ttl` does not apply, and
        // the interval is checked against that TTL once it is known.
        if self.lease.is_none() {
            check_interval(validate_ttl(self.ttl)?)?;
        }
        let store = self.client.store().clone();
        let mut sent = Instant::now();
        let grant = match self.lease {
            None => store.lease_grant(validate_ttl(self.ttl)?).await?,
            Some(id) => match store.lease_keep_alive(id).await? {
                Some(ttl) => {
                    check_interval(ttl)?;
                    crate::store::LeaseGrant { id, ttl }
                }
                None => return Err(Error::LeaseNotFound(id)),
            },
        };
        // Answered only after the TTL (a slow or silent member): the local deadline would
        // have passed already, and the session would start lost although the lease lives.
        // Renew it again, now that the store knows its TTL and hedges within a fifth of it.
        let mut late = 0;
        while sent + grant.ttl <= Instant::now() {
            late += 1;
            if late > LATE_RENEWALS {
                return Err(Error::Timeout {
                    operation: "lease keep-alive",
                    after: grant.ttl,
                });
            }
            tracing::debug!(lease = %format_args!("{:x}", grant.id), "lease renewed only after its TTL; renewing again");
            sent = Instant::now();
            if store.lease_keep_alive(grant.id).await?.is_none() {
                return Err(Error::LeaseNotFound(grant.id));
            }
        }
        let interval = self.keep_alive_interval.unwrap_or(grant.ttl / 3);
        let shared = Arc::new(Shared {
            lease: grant.id,
            ttl: grant.ttl,
            lost: CancellationToken::new(),
            deadline: LocalDeadline::new(sent, sent + grant.ttl),
            stop: CancellationToken::new(),
            poke: Notify::new(),
            state: StdMutex::new(State {
                lost_reason: None,
                orphaned: false,
                revoked: false,
            }),
        });
        let inner = Arc::new(Inner {
            client: self.client,
            shared: shared.clone(),
            claims: Claims::default(),
        });
        tracing::debug!(lease = %format_args!("{:x}", grant.id), ttl = ?grant.ttl, "session started");
        let span = tracing::debug_span!("keep_alive", lease = %format_args!("{:x}", grant.id));
        let hub = inner.client.hub().clone();
        // Dropped unfinished (even before its first poll): the runtime shut down under the
        // task. Nothing keeps the lease alive any more, so the session is lost now rather
        // than never (its `lost()` and `lost_token()` would wait for a task that is gone).
        // Either way, the store can free what it keeps for the lease's keep-alives.
        struct Ended(Arc<Shared>, Arc<dyn Store>);
        impl Drop for Ended {
            fn drop(&mut self) {
                if !self.0.stop.is_cancelled() && !self.0.lost.is_cancelled() {
                    self.0.mark_lost(RUNTIME_GONE);
                }
                self.1.lease_keep_alive_done(self.0.lease);
            }
        }
        let ended = Ended(shared.clone(), store.clone());
        tokio::spawn(
            async move {
                let _ended = ended;
                keep_alive(shared, store, hub, sent, interval).await;
            }
            .instrument(span),
        );
        Ok(Session { inner })
    }
}

/// Check a session TTL and round it up to whole seconds (etcd leases count seconds).
pub(crate) fn validate_ttl(ttl: Duration) -> Result<Duration> {
    if ttl < MIN_TTL {
        return Err(Error::invalid(format!(
            "ttl {} is below the minimum of {MIN_TTL:?}",
            crate::names::show_duration(ttl)
        )));
    }
    if ttl > MAX_TTL {
        return Err(Error::invalid(format!(
            "ttl {ttl:?} is above the maximum of {MAX_TTL:?}"
        )));
    }
    // Round up to whole seconds: etcd leases count seconds.
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Ok(Duration::from_secs(secs))
}

impl Session {
    /// Start a session with the default options (60 s TTL).
    ///
    /// # Cancel safety
    ///
    /// See [`SessionBuilder::build`].
    pub async fn new(client: &Client) -> Result<Session> {
        Self::builder(client).build().await
    }

    /// Configure a session.
    pub fn builder(client: &Client) -> SessionBuilder {
        SessionBuilder {
            client: client.clone(),
            ttl: DEFAULT_TTL,
            keep_alive_interval: None,
            lease: None,
        }
    }

    /// The client this session uses.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        self.inner.client.store()
    }

    /// The lease id. Lock keys carry it in lowercase hex.
    pub fn lease_id(&self) -> LeaseId {
        self.inner.shared.lease
    }

    /// The TTL the store granted.
    pub fn ttl(&self) -> Duration {
        self.inner.shared.ttl
    }

    /// The local deadline: the lease is certainly alive until then (send time of the last
    /// acknowledged keep-alive plus the TTL, on the monotonic clock).
    pub fn deadline(&self) -> Instant {
        self.inner.shared.deadline.get()
    }

    /// True once the session is lost. See [`lost()`](Session::lost).
    ///
    /// If the local deadline has passed, the session is lost now, even if the keep-alive task
    /// has not run since (the process was paused): this call marks it lost, which also
    /// cancels every token from [`lost_token()`](Session::lost_token) and the tokens of the
    /// locks and leaderships bound to it.
    pub fn is_lost(&self) -> bool {
        self.inner.shared.check_deadline()
    }

    /// Why the session was lost, if it was. Checks the local deadline first, as
    /// [`is_lost()`](Session::is_lost) does.
    pub fn lost_reason(&self) -> Option<String> {
        self.inner.shared.check_deadline();
        self.state().lost_reason.clone()
    }

    /// Completes when the session is lost: its lease was revoked or expired, keep-alives were
    /// not acknowledged before the local deadline, or it was closed.
    ///
    /// The local deadline is checked when this is called (a future made after the deadline
    /// passed is ready at once); while it waits, the keep-alive task (or any call to
    /// [`is_lost()`](Session::is_lost)) completes it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future has no effect on the session.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.inner.shared.check_deadline();
        self.inner.shared.lost.cancelled()
    }

    /// A token cancelled when the session is lost, for use in `select!` or in another task.
    /// It is a child token: cancelling it does not affect the session.
    ///
    /// The local deadline is checked when this is called; afterwards the token is cancelled
    /// by the keep-alive task, or by any call to [`is_lost()`](Session::is_lost) (or to a
    /// guard's `is_lost()`) that finds the deadline passed.
    pub fn lost_token(&self) -> CancellationToken {
        self.inner.shared.check_deadline();
        self.inner.shared.lost.child_token()
    }

    /// The error to return when something needs a live session.
    pub(crate) fn lost_error(&self) -> Error {
        Error::lost(
            self.lost_reason()
                .unwrap_or_else(|| "session lost".to_string()),
        )
    }

    /// The error for a request the store refused with [`Error::LeaseNotFound`] for this
    /// session's lease: the lease is gone (revoked or expired), so the session is lost,
    /// and is marked so now rather than at its next keep-alive (its `is_lost()` agrees
    /// with the error).
    pub(crate) fn lease_gone(&self) -> Error {
        self.inner.shared.mark_lost("lease revoked or expired");
        self.lost_error()
    }

    /// Fail fast if the session is already lost.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.is_lost() {
            Err(self.lost_error())
        } else {
            Ok(())
        }
    }

    /// The error to return for a wait that ended with `e`: if our key is gone
    /// ([`Error::NotHeld`]) while the session still seems alive, ask the store whether the
    /// lease lives. A revoked or expired lease takes its keys with it, and a waiter's watch
    /// often sees them go before the keep-alives learn it (up to a keep-alive interval
    /// later): then the session is marked lost and the wait fails with
    /// [`Error::SessionLost`], as documented, not with `NotHeld`, which says only the key was
    /// deleted. If the store cannot answer, `e` is returned as it is.
    pub(crate) async fn explain_not_held(&self, e: Error) -> Error {
        if !matches!(e, Error::NotHeld { .. }) {
            return e;
        }
        if self.is_lost() {
            return self.lost_error();
        }
        match self.store().lease_time_to_live(self.lease_id()).await {
            Ok(None) => {
                self.inner.shared.mark_lost("lease revoked or expired");
                self.lost_error()
            }
            Ok(Some(_)) => e,
            Err(err) => {
                tracing::debug!(error = %err, "could not check the lease after our key vanished");
                e
            }
        }
    }

    /// Ask the keep-alive task to check the lease now (used when a guard sees its key vanish).
    pub(crate) fn poke(&self) {
        self.inner.shared.poke.notify_one();
    }

    /// A handle that does not keep the session alive (nor, with it, its lease: dropping the
    /// last `Session` revokes it).
    pub(crate) fn downgrade(&self) -> WeakSession {
        WeakSession(Arc::downgrade(&self.inner))
    }

    /// Stop the keep-alives and revoke the lease, deleting every key bound to it.
    ///
    /// [`lost()`](Session::lost) fires. Closing twice is not an error. If the revoke fails
    /// (the store did not answer), the error is returned and the lease is still revoked
    /// later: by the next `close()`, or when the last handle to the session is dropped.
    ///
    /// # Cancel safety
    ///
    /// The keep-alives stop at once. If the future is dropped before the revoke completes,
    /// the lease expires after its TTL instead.
    #[tracing::instrument(name = "close", skip_all, fields(lease = %format_args!("{:x}", self.inner.shared.lease)))]
    pub async fn close(&self) -> Result<()> {
        let revoked = self.state().revoked;
        self.inner.shared.stop.cancel();
        self.inner.shared.mark_lost("session closed");
        if revoked {
            return Ok(());
        }
        // Revoked only once the store says so: a failed revoke is tried again.
        match self.store().lease_revoke(self.inner.shared.lease).await {
            Ok(()) | Err(Error::LeaseNotFound(_)) => {
                self.state().revoked = true;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Stop the keep-alives without revoking: the lease, and every key bound to it, expires
    /// after its TTL. Use it to hand the lease to another process, or when the connection is
    /// in doubt.
    ///
    /// [`lost()`](Session::lost) fires at the local deadline, when the lease may expire.
    /// Dropping an orphaned session does not revoke its lease.
    pub fn orphan(&self) {
        self.state().orphaned = true;
        self.inner.shared.stop.cancel();
        let deadline = self.deadline();
        let shared = self.inner.shared.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait for the deadline on: count the session lost now, which is
            // early but never late.
            shared.mark_lost(ORPHANED);
            return;
        };
        runtime.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    shared.mark_lost(ORPHANED);
                }
                _ = shared.lost.cancelled() => {}
            }
        });
    }

    fn state(&self) -> StdMutexGuard<'_, State> {
        self.inner.shared.state()
    }

    /// Claim a lock key for this session until the returned claim is dropped.
    ///
    /// Waits while an earlier claim of the same key is being released (with `try_only`,
    /// fails with [`Error::Unavailable`] instead once that release has failed and is being
    /// retried); fails with [`Error::AlreadyHeld`] while it is held or awaited.
    pub(crate) async fn claim(&self, key: &[u8], name: &str, try_only: bool) -> Result<OwnedClaim> {
        self.inner.claims.claim(key, name, try_only).await?;
        Ok(OwnedClaim {
            session: self.clone(),
            key: key.to_vec(),
        })
    }

    /// Claim `key` if this session has no claim on it now (held, awaited or being
    /// released); `None` otherwise. Never waits.
    pub(crate) fn claim_if_free(&self, key: &[u8]) -> Option<OwnedClaim> {
        let mut map = self
            .inner
            .claims
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if map.contains_key(key) {
            return None;
        }
        map.insert(key.to_vec(), ClaimState::InUse);
        Some(OwnedClaim {
            session: self.clone(),
            key: key.to_vec(),
        })
    }

    /// Wait until this session has no claim on `key`, without claiming it: fails with
    /// [`Error::AlreadyHeld`] while it is held or awaited, waits while it is being released,
    /// and with `try_only` fails with [`Error::Unavailable`] instead once that release has
    /// failed and is being retried: the same rules as [`claim`](Session::claim).
    pub(crate) async fn unclaimed(&self, key: &[u8], name: &str, try_only: bool) -> Result<()> {
        self.inner.claims.settle(key, name, try_only, false).await
    }
}

impl Shared {
    fn state(&self) -> StdMutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True if the session is lost, marking it lost first if the local deadline has passed:
    /// a token check and a clock read while it is alive, no lock.
    fn check_deadline(&self) -> bool {
        if self.lost.is_cancelled() {
            return true;
        }
        if !self.deadline.passed() {
            return false;
        }
        let reason = if self.state().orphaned {
            ORPHANED
        } else {
            DEADLINE_PASSED
        };
        self.mark_lost(reason);
        true
    }

    fn mark_lost(&self, reason: &str) {
        {
            let mut st = self.state();
            if st.lost_reason.is_none() {
                st.lost_reason = Some(reason.to_string());
                tracing::info!(lease = %format_args!("{:x}", self.lease), reason, "session lost");
            }
        }
        self.lost.cancel();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let shared = &self.shared;
        shared.stop.cancel();
        // Revoke unless orphaned or revoked already: a session lost at its local deadline
        // (keep-alives not acknowledged in time) may still have its lease on the server,
        // and a close whose revoke failed left it there.
        let revoke = {
            let st = shared.state();
            !(st.orphaned || st.revoked)
        };
        if !revoke {
            return;
        }
        shared.mark_lost("session dropped");
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let store = self.client.store().clone();
            let lease = shared.lease;
            handle.spawn(async move {
                if let Err(e) = store.lease_revoke(lease).await {
                    tracing::debug!(lease = %format_args!("{lease:x}"), error = %e, "revoke on drop failed; the lease will expire");
                }
            });
        }
    }
}

/// The keep-alive loop. It holds only the shared state, so dropping the session ends it.
///
/// A keep-alive is sent every `interval`, measured from the previous *send*, without waiting
/// for the previous reply: keep-alives are pipelined, as Go's client does, so a session
/// survives reply latencies up to about TTL − interval, not only up to the interval. Each
/// reply moves the deadline to its request's send time plus the TTL (never earlier).
///
/// The first keep-alive is due an interval after `granted_at` (when the grant was sent),
/// not after this task first runs: on a busy runtime that can be much later, and the
/// deadline counts from the grant.
async fn keep_alive(
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    hub: Arc<crate::hub::Hub>,
    granted_at: Instant,
    interval: Duration,
) {
    let mut next = granted_at + interval;
    type Reply = (
        Instant,
        std::result::Result<Result<Option<Duration>>, tokio::time::error::Elapsed>,
    );
    let mut pending = crate::race::Race::<futures::future::BoxFuture<'static, Reply>>::new();
    loop {
        let deadline = shared.deadline.get();
        let room = pending.len() < MAX_IN_FLIGHT;
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = shared.lost.cancelled() => return,
            _ = tokio::time::sleep_until(next), if room => {}
            _ = shared.poke.notified(), if room => {}
            _ = tokio::time::sleep_until(deadline) => {}
            Some((sent, result)) = pending.next() => {
                match result {
                    Ok(Ok(Some(ttl))) => {
                        shared.deadline.push(sent + ttl);
                        tracing::trace!(deadline_in = ?(sent + ttl).saturating_duration_since(Instant::now()), "keep-alive acknowledged");
                    }
                    Ok(Ok(None)) => {
                        shared.mark_lost("lease revoked or expired");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "keep-alive failed; retrying until the local deadline");
                        next = next.min(Instant::now() + RETRY_BACKOFF.min(interval));
                    }
                    // Unanswered until the deadline it would have set: no use any more.
                    Err(_) => {}
                }
                continue;
            }
        }
        let sent = Instant::now();
        if sent >= shared.deadline.get() {
            shared.mark_lost(DEADLINE_PASSED);
            return;
        }
        if !room {
            continue;
        }
        crate::hub::Counters::add(&hub.counters.keep_alives);
        // A reply is of use until its request's send time plus the TTL (the deadline it
        // would set), even after the current deadline: earlier requests' replies may move
        // the deadline first.
        let (store, lease, until) = (store.clone(), shared.lease, sent + shared.ttl);
        pending.push(Box::pin(async move {
            let result = tokio::time::timeout_at(until, store.lease_keep_alive(lease)).await;
            (sent, result)
        }));
        // The next keep-alive is due an interval after this one was *sent*, not after its
        // reply: slow replies must not stretch the period.
        next = sent + interval;
    }
}

/// The keys this session has in use, so one session never uses one lock key twice at once.
///
/// A key is claimed from the start of an acquire until its release has completed. A claim
/// that is being released makes a new claim of the same key wait rather than fail (a
/// try-only claim waits only while the release has not failed yet).
#[derive(Default)]
pub(crate) struct Claims {
    map: StdMutex<HashMap<Vec<u8>, ClaimState>>,
    released: Notify,
}

/// Where a claimed key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimState {
    /// Held, or being acquired.
    InUse,
    /// Being released; `failed` once an attempt failed and it is being retried (the
    /// store did not answer).
    Releasing { failed: bool },
}

impl Claims {
    /// Claim `key`, waiting for a release in progress. Fails if it is in use.
    ///
    /// With `try_only`, a release that is being retried because the store did not answer
    /// is not waited for: the claim fails at once with [`Error::Unavailable`], as the
    /// one attempt of a `try_lock` does when the store cannot be reached.
    async fn claim(&self, key: &[u8], name: &str, try_only: bool) -> Result<()> {
        self.settle(key, name, try_only, true).await
    }

    /// Wait until `key` is not claimed (see [`claim`](Claims::claim)), then claim it if
    /// `take`.
    async fn settle(&self, key: &[u8], name: &str, try_only: bool, take: bool) -> Result<()> {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(key) {
                    None => {
                        if take {
                            map.insert(key.to_vec(), ClaimState::InUse);
                        }
                        return Ok(());
                    }
                    Some(ClaimState::InUse) => {
                        return Err(Error::AlreadyHeld {
                            name: name.to_string(),
                        })
                    }
                    Some(ClaimState::Releasing { failed: true }) if try_only => {
                        return Err(Error::Unavailable(format!(
                            "lock {name:?}: this session's earlier release of it is not \
                             confirmed yet (the store did not answer; it is being retried)"
                        )))
                    }
                    Some(ClaimState::Releasing { .. }) => {}
                }
            }
            notified.await;
        }
    }

    fn release(&self, key: &[u8]) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.released.notify_waiters();
    }

    fn mark_releasing(&self, key: &[u8], failed: bool) {
        if let Some(v) = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(key)
        {
            // A release once failed stays so until it is answered.
            let failed = failed || *v == ClaimState::Releasing { failed: true };
            *v = ClaimState::Releasing { failed };
        }
        if failed {
            // A try-only claim waiting for this release gives up now.
            self.released.notify_waiters();
        }
    }
}

/// A claim that holds the session alive, released on drop.
pub(crate) struct OwnedClaim {
    session: Session,
    key: Vec<u8>,
}

impl OwnedClaim {
    /// Mark the key as being released: a new claim waits instead of failing.
    pub(crate) fn releasing(&self) {
        self.session.inner.claims.mark_releasing(&self.key, false);
    }

    /// Mark the key's release as failed and being retried: a try-only claim of it fails at
    /// once instead of waiting for the store to answer.
    pub(crate) fn release_failed(&self) {
        self.session.inner.claims.mark_releasing(&self.key, true);
    }

    /// True once the session behind the claim is lost (its keys go with its lease).
    pub(crate) fn session_lost(&self) -> bool {
        self.session.is_lost()
    }
}

impl Drop for OwnedClaim {
    fn drop(&mut self) {
        self.session.inner.claims.release(&self.key);
    }
}

impl fmt::Debug for OwnedClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedClaim")
            .field("key", &String::from_utf8_lossy(&self.key))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_validation() {
        assert!(validate_ttl(Duration::from_millis(1999)).is_err());
        assert!(validate_ttl(Duration::ZERO).is_err());
        assert!(validate_ttl(Duration::from_secs(9_000_000_001)).is_err());
        assert_eq!(
            validate_ttl(Duration::from_millis(2500)).unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(
            validate_ttl(Duration::from_secs(2)).unwrap(),
            Duration::from_secs(2)
        );
    }

    /// A close whose revoke failed returns the error, and the lease is still revoked: by
    /// the next close, or when the session is dropped.
    #[tokio::test]
    async fn a_failed_revoke_is_tried_again() {
        use crate::store::slow::SlowWatches;
        use std::sync::atomic::Ordering;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        for by_drop in [false, true] {
            let session = Session::new(&client).await.unwrap();
            let lease = session.lease_id();
            store.fail_next_revoke.store(true, Ordering::Relaxed);
            assert!(session.close().await.is_err());
            assert!(session.is_lost());
            assert!(store.lease_time_to_live(lease).await.unwrap().is_some());
            if by_drop {
                drop(session);
                for _ in 0..100 {
                    if store.lease_time_to_live(lease).await.unwrap().is_none() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            } else {
                session.close().await.unwrap();
                session.close().await.unwrap();
            }
            assert_eq!(
                store.lease_time_to_live(lease).await.unwrap(),
                None,
                "the lease outlived the session (by drop: {by_drop})"
            );
        }
    }

    /// A keep-alive interval below the floor would flood the store with keep-alives: it is
    /// refused before any lease is granted, for a new lease and an adopted one; the floor
    /// itself is accepted.
    #[tokio::test]
    async fn a_keep_alive_interval_below_the_floor_is_refused() {
        let client = Client::memory();
        let adopted = client
            .store()
            .lease_grant(Duration::from_secs(3))
            .await
            .unwrap()
            .id;
        for interval in [
            Duration::from_nanos(1),
            Duration::from_millis(1),
            MIN_KEEP_ALIVE_INTERVAL - Duration::from_nanos(1),
        ] {
            for lease in [None, Some(adopted)] {
                let mut builder = Session::builder(&client).with_keep_alive_interval(interval);
                if let Some(lease) = lease {
                    builder = builder.with_lease(lease);
                }
                let err = builder.build().await.unwrap_err();
                assert!(err.is_invalid_input(), "{interval:?}: {err}");
            }
        }
        let session = Session::builder(&client)
            .with_keep_alive_interval(MIN_KEEP_ALIVE_INTERVAL)
            .build()
            .await
            .unwrap();
        session.close().await.unwrap();
    }

    /// An adopted lease keeps the TTL it was granted with: the keep-alive interval is
    /// checked against that TTL, and `with_ttl` does not apply.
    #[tokio::test]
    async fn an_adopted_lease_checks_the_interval_against_its_own_ttl() {
        let client = Client::memory();
        let lease = client
            .store()
            .lease_grant(Duration::from_secs(3))
            .await
            .unwrap()
            .id;
        let err = Session::builder(&client)
            .with_lease(lease)
            .with_keep_alive_interval(Duration::from_secs(10))
            .build()
            .await
            .unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        let adopted = Session::builder(&client)
            .with_lease(lease)
            .with_ttl(Duration::from_secs(1))
            .with_keep_alive_interval(Duration::from_secs(1))
            .build()
            .await
            .unwrap();
        assert_eq!(adopted.ttl(), Duration::from_secs(3));
        adopted.orphan();
    }
}

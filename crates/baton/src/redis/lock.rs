//! A lock on Redis: one server, or Redlock over independent masters.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

use super::node::{Keys, NodeEnqueue};
use super::redlock::Attempt;
use super::watchdog::Hold;
use super::{new_token, ClientInner, RedisClient};
use crate::coordinator::{Guard, Lock};
use crate::error::{Error, Result};
use crate::names::validate_name;

/// How long a waiter sleeps after an attempt that found no quorum in time (Redlock split
/// votes, slow nodes): a random delay in this range.
const RETRY_JITTER: (u64, u64) = (5, 50);

/// A distributed lock on Redis, wire-compatible with redsync and redis-py's `Lock`.
///
/// The key is the name (after the client's prefix); the value is a random 128-bit token set
/// with `SET NX PX`. See the [module documentation](super) for what that guarantees, the
/// fencing token (single server only), the watchdog, and what Redlock does not guarantee.
///
/// Locks are not re-entrant: two `lock()` calls on one `RedisLock` are two contenders. On
/// one server, waiters queue in FIFO order and a release hands the lock to the oldest live
/// one; on Redlock (or [`without_fifo`](super::RedisClientBuilder::without_fifo)), whichever
/// waiter sets the key first after a release wins. See the
/// [module documentation](super#waiting-fifo-hand-off-pub-sub-wake-ups-and-a-fallback-poll).
///
/// # Examples
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let redis = baton::redis::RedisClient::connect("redis://127.0.0.1:6379").await?;
/// let lock = redis.lock("jobs/nightly-report")?;
/// match lock.try_lock().await {
///     Ok(guard) => {
///         println!("holding {} with token {:?}", guard.key(), guard.fencing_token());
///         guard.unlock().await?;
///     }
///     Err(baton::Error::Locked { .. }) => println!("someone else runs it"),
///     Err(e) => return Err(e),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisLock {
    client: RedisClient,
    name: String,
    keys: Keys,
}

impl fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock")
            .field("name", &self.name)
            .field("key", &self.keys.lock)
            .finish()
    }
}

/// Deletes what an acquisition attempt may have set if the attempt's future is dropped.
struct Cleanup<'a> {
    client: &'a Arc<ClientInner>,
    keys: &'a Keys,
    token: &'a str,
    armed: bool,
}

impl<'a> Cleanup<'a> {
    /// A cleanup for `token`'s attempts at `keys`, armed only around them.
    fn disarmed(client: &'a Arc<ClientInner>, keys: &'a Keys, token: &'a str) -> Self {
        Cleanup {
            client,
            keys,
            token,
            armed: false,
        }
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (client, keys, token) = (
                self.client.clone(),
                self.keys.clone(),
                self.token.to_string(),
            );
            self.client.cleanups.spawn_on(
                async move {
                    if let Err(e) = client.clean_up(&keys, &token).await {
                        tracing::debug!(error = %e, "cleanup of a cancelled acquire failed; keys expire with their ttl");
                    }
                }
                .instrument(tracing::debug_span!("cancelled_acquire")),
                &handle,
            );
        }
    }
}

/// After an attempt that failed on a lost connection (a server restarting, say), a waiter
/// tries again after this, doubled after each such failure up to [`UNAVAILABLE_MAX`].
const UNAVAILABLE_MIN: Duration = Duration::from_millis(50);
const UNAVAILABLE_MAX: Duration = Duration::from_secs(1);

/// A waiter's failures to reach the server, for its log: a warning when it starts failing,
/// debug lines while it goes on failing (a waiter retries about once a second for as long
/// as the server is down), and one info line when the server answers again.
#[derive(Debug, Default)]
struct Unreachable {
    /// When the current run of failures started, and how many there were.
    since: Option<(Instant, u32)>,
}

impl Unreachable {
    /// An attempt failed with `e` (a transient failure); we retry.
    fn failed(&mut self, e: &Error) {
        match &mut self.since {
            None => {
                tracing::warn!(error = %e, "cannot reach the server; retrying");
                self.since = Some((Instant::now(), 1));
            }
            Some((_, failures)) => {
                *failures += 1;
                tracing::debug!(error = %e, "still cannot reach the server; retrying");
            }
        }
    }

    /// The server answered.
    fn reached(&mut self) {
        if let Some((since, failures)) = self.since.take() {
            tracing::info!(
                after = ?since.elapsed(),
                failures,
                "reached the server again"
            );
        }
    }
}

/// The next wait after a transient failure, jittered, and the backoff after it.
fn unavailable_backoff(backoff: Duration) -> (Duration, Duration) {
    let ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
    (
        jitter_ms(ms / 2, ms),
        backoff.saturating_mul(2).min(UNAVAILABLE_MAX),
    )
}

/// A random duration in `[lo, hi]` ms.
pub(crate) fn jitter_ms(lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rand::Rng::gen_range(&mut rand::thread_rng(), lo..=hi))
}

/// How long a waiter waits before trying again without a wake-up: until the holder's key
/// expires (plus a little), or the jittered fallback poll, whichever is sooner.
pub(crate) fn fallback_wait(poll: Duration, retry_in: Option<Duration>) -> Duration {
    let ms = u64::try_from(poll.as_millis()).unwrap_or(u64::MAX).max(2);
    let polled = jitter_ms(ms / 2, ms);
    match retry_in {
        Some(expiry) if expiry < polled => expiry + jitter_ms(1, 5),
        _ => polled,
    }
}

impl RedisLock {
    /// A lock named `name` on `client`.
    ///
    /// Fails with [`Error::InvalidArgument`] if the name is empty, longer than 1 KiB, or
    /// contains a NUL byte, or if the key (prefix and name) is in Baton's own key space for
    /// other locks (`baton:fence:…`, see the [module documentation](super)).
    pub fn new(client: &RedisClient, name: &str) -> Result<RedisLock> {
        validate_name(name)?;
        let inner = client.inner();
        let mut keys = Keys::checked(&inner.opts.prefix, name)?;
        // A hand-off grants a short TTL that the watchdog extends at once: no watchdog, no
        // queue.
        if inner.opts.fifo && inner.opts.watchdog && !inner.redlock {
            keys = keys.fifo();
        }
        Ok(RedisLock {
            client: client.clone(),
            name: name.to_string(),
            keys,
        })
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Redis key: the client's prefix plus the name.
    pub fn key(&self) -> &str {
        &self.keys.lock
    }

    /// Wait until the lock is ours.
    ///
    /// On one server, queues (FIFO) and waits for a release to hand the lock over, refreshing
    /// its place at every fallback poll. On Redlock, between attempts, waits for a release
    /// message on the lock's channel, for the holder's key to expire, or for the jittered
    /// fallback poll. While the server (or, on Redlock, a majority of masters) cannot be
    /// reached — a restart, a connection reset, a timeout, a server loading its data or
    /// busy with another client's slow script (`-BUSY`) — it keeps retrying, with a
    /// backoff of up to 1 s, until it can (use [`lock_timeout`](RedisLock::lock_timeout) to
    /// bound the wait). Fails with the server's error for anything else (refused
    /// credentials or permissions, a script error), and with [`Error::Closed`] if the client
    /// is closed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. If the future is dropped, what it may have set is undone in a task
    /// spawned on the current runtime (which [`close()`](super::RedisClient::close) waits
    /// for): our place in the queue is removed, and a lock that was set or handed to us
    /// meanwhile is released (compare-and-delete on our token, or handed on).
    pub async fn lock(&self) -> Result<RedisLockGuard> {
        let acquiring = acquire(self.client.inner(), &self.name, &self.keys, None, false);
        self.guarded(
            tracing::debug_span!("acquire", lock = %self.name),
            acquiring,
        )
        .await
    }

    /// [`lock()`](RedisLock::lock), giving up with [`Error::Timeout`] after `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock()`](RedisLock::lock). On timeout nothing is left behind: a
    /// queued waiter leaves the queue, and an unqueued one (Redlock, `without_fifo`)
    /// deletes a take still in flight, before this returns. If the server does not confirm
    /// the leave within 500 ms of the timeout (it hangs, say), this returns anyway and the
    /// leave goes on in a task spawned on the current runtime, which
    /// [`close()`](super::RedisClient::close) waits for; if that fails too, our place in the
    /// queue expires with the waiter window.
    pub async fn lock_timeout(&self, timeout: Duration) -> Result<RedisLockGuard> {
        let client = self.client.inner();
        // A queued waiter that gives up leaves the queue, and an unqueued one deletes a take
        // in flight, before this returns (not in a task spawned on drop, which a process
        // about to exit would never run).
        let until = crate::deadline::after(timeout);
        let limit = Some((until, timeout));
        if !fifo(client, &self.keys) {
            client.check_open()?;
            let plain = acquire_plain(client, &self.name, &self.keys, None, false, None, limit);
            let span = tracing::debug_span!("acquire", lock = %self.name);
            return self.guarded(span, plain).await;
        }
        let acquiring = acquire_fifo(client, &self.name, &self.keys, false, limit);
        let span = tracing::debug_span!("acquire", lock = %self.name);
        match self.guarded(span.clone(), acquiring).await {
            Err(Error::PermissionDenied(reason)) => {
                // Queueing refused: wait without the queue, unless the lock itself is
                // refused too (see `acquire_plain`).
                let plain = acquire_plain(
                    client,
                    &self.name,
                    &self.keys,
                    None,
                    false,
                    Some(reason),
                    limit,
                );
                self.guarded(span, plain).await
            }
            other => other,
        }
    }

    /// Take the lock if it is free, with one attempt.
    ///
    /// Fails with [`Error::Locked`] if another owner holds it, and on Redlock with
    /// [`Error::NoQuorum`] if no quorum was reached for another reason (slow or failing
    /// masters). On one server, an answer that comes after the lock's TTL (less the
    /// drift) has passed fails with [`Error::Unavailable`] (with FIFO, after one more
    /// attempt): the hold would have been lost at once; no answer within the request
    /// timeout (shorter than the TTL) fails with a retryable [`Error::Timeout`] or
    /// [`Error::Unavailable`]. Whatever the attempt set is
    /// deleted before the error is returned (if the server does not confirm the deletion
    /// within 500 ms, it goes on in a task spawned on the current runtime, which
    /// [`close()`](super::RedisClient::close) waits for); on Redlock, a master that has not answered the
    /// deletion a short while (1% of the TTL, at least 10 ms) after another did is not
    /// waited for: its deletion follows the attempt's write on its connection. With a
    /// majority of masters hung (or the one server), the attempt fails after one request
    /// timeout, plus at most 500 ms waiting for its deletion.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock()`](RedisLock::lock).
    pub async fn try_lock(&self) -> Result<RedisLockGuard> {
        let acquiring = acquire(self.client.inner(), &self.name, &self.keys, None, true);
        self.guarded(
            tracing::debug_span!("try_acquire", lock = %self.name),
            acquiring,
        )
        .await
    }

    /// The guard of the hold `acquiring` gets, traced in `span`.
    async fn guarded(
        &self,
        span: tracing::Span,
        acquiring: impl std::future::Future<Output = Result<Hold>>,
    ) -> Result<RedisLockGuard> {
        unless_closed(self.client.inner(), acquiring.instrument(span))
            .await
            .map(|hold| RedisLockGuard {
                name: self.name.clone(),
                hold,
            })
    }
}

/// Run an acquire (cancel safe) unless the client is closed: [`Error::Closed`] at once
/// when it is, even with a request in flight to a server that hangs, rather than once that
/// request times out (as the store family's coordinator does; found by a review).
pub(crate) async fn unless_closed<T>(
    client: &Arc<ClientInner>,
    acquiring: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        biased;
        () = client.closed.cancelled() => Err(Error::Closed),
        r = acquiring => r,
    }
}

/// Take `keys` (writing an election record with `record`, if given): one attempt if
/// `try_only`, else until it succeeds or fails for good.
pub(crate) async fn acquire(
    client: &Arc<ClientInner>,
    name: &str,
    keys: &Keys,
    record: Option<&[u8]>,
    try_only: bool,
) -> Result<Hold> {
    client.check_open()?;
    let mut fifo_denied = None;
    if record.is_none() && fifo(client, keys) {
        match acquire_fifo(client, name, keys, try_only, None).await {
            Err(Error::PermissionDenied(reason)) => fifo_denied = Some(reason),
            other => return other,
        }
    }
    acquire_plain(client, name, keys, record, try_only, fifo_denied, None).await
}

/// Take `keys` without the FIFO queue (releases wake every waiter; whoever sets the key
/// first wins), as [`acquire`] does.
///
/// `fifo_denied`: the server refused the FIFO attempt of this lock with this reason. That
/// refuses the queue's keys only if the plain attempt is allowed: then this client's waiters
/// stop queueing ([`refuse_fifo`]). If the plain attempt is refused too, the user's ACL
/// refuses the lock itself: its error is returned, and the other locks still queue.
pub(crate) async fn acquire_plain(
    client: &Arc<ClientInner>,
    name: &str,
    keys: &Keys,
    record: Option<&[u8]>,
    try_only: bool,
    mut fifo_denied: Option<String>,
    limit: Option<(Instant, Duration)>,
) -> Result<Hold> {
    let timed_out = |after| {
        Err(Error::Timeout {
            operation: "lock",
            after,
        })
    };
    let plain;
    let mut keys = keys;
    if keys.fifo {
        plain = keys.clone().without_fifo();
        keys = &plain;
    }
    let mut sub = None;
    // True when the attempt follows a release's wake-up, or the lock was contended here a
    // moment ago (see `try_acquire`).
    // Never for `try_lock`: its one attempt must ask every node (see `try_acquire`).
    let mut gated = !try_only && client.redlock && client.hub.is_subscribed(&keys.channel);
    let mut backoff = UNAVAILABLE_MIN;
    let mut unreachable = Unreachable::default();
    // Attempts in a row answered after the lock's validity.
    let mut slow_attempts = 0_u32;
    let mut token = new_token();
    let mut same_token = false;
    loop {
        // A token per attempt: a failed attempt's cleanup may still be running (in the
        // background, see `try_acquire`), and must not delete what a later one sets.
        // Except after an attempt that failed for want of servers: its cleanup has ended
        // (`try_acquire` waits for it when too many nodes failed), and what it could not
        // delete (a take whose reply was lost, a server it could not reach) is ours to
        // take again at once (see `acquire.lua`) rather than a stranger's key to wait out.
        if !std::mem::take(&mut same_token) {
            token = new_token();
        }
        let mut cleanup = Cleanup::disarmed(client, keys, &token);
        let chan = sub
            .as_ref()
            .map(|s: &super::wakeups::Subscription| s.channel().clone());
        let mut woken = chan.as_ref().map(|c| Box::pin(c.waiters.notified()));
        if let Some(w) = woken.as_mut() {
            w.as_mut().enable();
        }
        cleanup.armed = true;
        let attempting = client.try_acquire(keys, &token, record, gated, try_only);
        let attempt = match limit {
            Some((at, after)) => match tokio::time::timeout_at(at, attempting).await {
                Ok(a) => a,
                Err(_) => {
                    // Delete what the attempt may have set before returning.
                    cleanup.armed = false;
                    leave(client, keys, &token).await;
                    return timed_out(after);
                }
            },
            None => attempting.await,
        };
        cleanup.armed = false;
        if !matches!(attempt, Attempt::Unavailable(_)) {
            backoff = UNAVAILABLE_MIN;
            unreachable.reached();
            if let Some(reason) = fifo_denied.take() {
                if !matches!(attempt, Attempt::Failed(Error::PermissionDenied(_))) {
                    refuse_fifo(client, &reason);
                }
            }
        }
        let too_slow = matches!(attempt, Attempt::TooSlow { .. });
        let wait = match attempt {
            Attempt::Acquired { fence, start } => {
                let election = record.is_some();
                let hold = Hold::start(client, keys.clone(), token.clone(), fence, start, election);
                if client.closed.is_cancelled() {
                    let _ = hold.release("close").await;
                    return Err(Error::Closed);
                }
                tracing::debug!(fence = ?fence, "acquired");
                return Ok(hold);
            }
            Attempt::Failed(e) => return Err(e),
            Attempt::Unavailable(e) if try_only => return Err(e),
            Attempt::Unavailable(e) => {
                // A server restarting or a connection reset: a waiter reconnects and waits
                // on (until its caller's timeout), rather than failing.
                unreachable.failed(&e);
                let (wait, next) = unavailable_backoff(backoff);
                backoff = next;
                let (until, after) = limit.unwrap_or((Instant::now() + wait, Duration::ZERO));
                // The failed attempt's take may have landed (its reply lost), and its
                // cleanup failed: if this future is dropped in the backoff, delete it then.
                cleanup.armed = true;
                tokio::select! {
                    _ = client.closed.cancelled() => return Err(Error::Closed),
                    _ = tokio::time::sleep(wait) => {}
                    _ = tokio::time::sleep_until(until), if limit.is_some() => {
                        // Try once more to delete it, before returning.
                        cleanup.armed = false;
                        leave(client, keys, &token).await;
                        return timed_out(after);
                    }
                }
                // The next attempt reuses the token, and deletes it if it fails.
                cleanup.armed = false;
                gated = false;
                same_token = true;
                continue;
            }
            Attempt::Busy { .. } if try_only => {
                return Err(Error::Locked {
                    name: name.to_string(),
                })
            }
            Attempt::TooSlow { reached: 0 }
                if try_only
                    && client.nodes.len() == 1
                    && client.opts.request_timeout
                        < client
                            .opts
                            .ttl
                            .saturating_sub(super::drift(client.opts.ttl)) =>
            {
                // No answer within the request timeout, with the TTL still running: a
                // timeout, not a late answer.
                return Err(Error::Timeout {
                    operation: "redis acquire",
                    after: client.opts.request_timeout,
                });
            }
            Attempt::TooSlow { .. } if try_only && client.nodes.len() == 1 => {
                return Err(answered_after_ttl(name, client.opts.ttl));
            }
            Attempt::TooSlow { reached } if try_only => {
                return Err(Error::NoQuorum {
                    reached,
                    needed: client.quorum,
                    nodes: client.nodes.len(),
                    reason: "no quorum within the lock's validity".into(),
                })
            }
            Attempt::Busy { retry_in } => {
                if sub.is_none() {
                    // Listen for the release, then try again at once: a release between
                    // the attempt and the subscription would otherwise be missed.
                    let subscribing = client.hub.subscribe(&keys.channel);
                    sub = Some(match limit {
                        Some((at, after)) => match tokio::time::timeout_at(at, subscribing).await {
                            Ok(s) => s,
                            Err(_) => return timed_out(after),
                        },
                        None => subscribing.await,
                    });
                    continue;
                }
                fallback_wait(client.opts.poll_interval, retry_in)
            }
            Attempt::TooSlow { .. } => jitter_ms(RETRY_JITTER.0, RETRY_JITTER.1),
        };
        if too_slow {
            slow_attempts += 1;
            if slow_attempts == 3 {
                tracing::warn!(
                    lock = name,
                    ttl = ?client.opts.ttl,
                    "three attempts in a row were answered after the lock's validity; \
                     still trying (a longer TTL helps)"
                );
            }
        } else {
            slow_attempts = 0;
        }
        let deadline = Instant::now() + wait;
        let (until, after) = limit.unwrap_or((deadline, Duration::ZERO));
        gated = tokio::select! {
            _ = client.closed.cancelled() => return Err(Error::Closed),
            _ = tokio::time::sleep_until(deadline) => false,
            _ = tokio::time::sleep_until(until), if limit.is_some() => return timed_out(after),
            _ = async {
                match woken {
                    Some(w) => w.await,
                    None => std::future::pending().await,
                }
            } => true,
        };
    }
}

/// True if waiters of `keys` queue: FIFO keys, on a client whose server has not refused the
/// queue's keys.
fn fifo(client: &ClientInner, keys: &Keys) -> bool {
    keys.fifo
        && !client
            .fifo_refused
            .load(std::sync::atomic::Ordering::Relaxed)
}

/// The server refused the queue's keys of a lock whose own key it allows (an ACL written
/// before the queue keys existed): this client's waiters stop queueing, and say so once.
fn refuse_fifo(client: &ClientInner, reason: &str) {
    if !client
        .fifo_refused
        .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!(
            %reason,
            "the server refused Baton's FIFO queue keys (baton:queue:*, baton:waiter:*); \
             this client's lock waiters no longer queue"
        );
    }
}

/// The error of a try whose answer came after the lock's TTL (less the drift) had passed:
/// the hold would have been lost at once. Retryable; a longer TTL helps.
fn answered_after_ttl(name: &str, ttl: Duration) -> Error {
    Error::Unavailable(format!(
        "lock {name:?}: the server answered after the lock's TTL ({ttl:?}) had passed, \
         so the hold would have ended at once (the server or this process stalled; a longer \
         TTL helps)"
    ))
}

/// How long a FIFO waiter that timed out waits for the server to confirm it left the queue
/// (see [`leave_queue`]).
const LEAVE_GRACE: Duration = Duration::from_millis(500);

/// Leave the queue of `keys` (or pass the lock on, if it was handed to `token` meanwhile)
/// after a timeout of `after`, and return that timeout as [`Error::Timeout`].
///
/// The leave runs in a task spawned on the current runtime and tracked by the client's
/// cleanups ([`close()`](RedisClient::close) waits for them); this waits for it for at most
/// [`LEAVE_GRACE`], so that a server that hangs does not hold the caller up by a request
/// timeout past its own. Left unfinished, it goes on in the background; if it never
/// succeeds, our place expires with the waiter window, and a hand-off to it meanwhile ends
/// at the same time (a hand-off grants no longer than the waiter window).
async fn leave_queue(
    client: &Arc<ClientInner>,
    keys: &Keys,
    token: &str,
    after: Duration,
) -> Result<Hold> {
    leave(client, keys, token).await;
    Err(Error::Timeout {
        operation: "lock",
        after,
    })
}

/// Undo what `token`'s attempts at `keys` may have set (leave the queue, or pass the lock
/// on), waiting for the server's confirmation for at most [`LEAVE_GRACE`]; see
/// [`leave_queue`].
async fn leave(client: &Arc<ClientInner>, keys: &Keys, token: &str) {
    let (inner, keys, token) = (client.clone(), keys.clone(), token.to_string());
    let leave = async move {
        if let Err(e) = inner.clean_up(&keys, &token).await {
            tracing::debug!(error = %e, "leaving the queue failed; our place expires with the waiter window");
        }
    }
    .instrument(tracing::debug_span!("leave_queue"));
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        let _ = tokio::time::timeout(LEAVE_GRACE, leave).await;
        return;
    };
    let task = client.cleanups.spawn_on(leave, &handle);
    if tokio::time::timeout(LEAVE_GRACE, task).await.is_err() {
        tracing::debug!(
            "the server has not confirmed that we left the queue; leaving in the background"
        );
    }
}

/// Take `keys` in turn (FIFO waiters, one server; see `enqueue.lua` and `handoff.lua`): one
/// attempt if `try_only`, else until it succeeds or fails for good.
///
/// A waiter's place in the queue lives for the client's waiter window after each attempt,
/// and every fallback poll is an attempt that refreshes it. A release hands the lock to the
/// oldest live waiter and names it in a message. The hand-off happened at least `since_ms`
/// after the waiter's last refresh ran, so the waiter counts its local deadline from the
/// send time of that refresh plus `since_ms`: never later than the moment Redis set the
/// key's TTL for it. The key is handed over for the shorter of the TTL and the waiter
/// window, and the watchdog extends it to the TTL after a third of that. A grant whose
/// local deadline has passed by the time we learn of it (we were paused) is not returned:
/// we poll again at once (taking the lock afresh if the key is still ours, else queueing
/// again).
///
/// With `limit` (a deadline, and the timeout it came from), gives up with
/// [`Error::Timeout`] at the deadline, having left the queue (within [`LEAVE_GRACE`]; see
/// [`leave_queue`]).
async fn acquire_fifo(
    client: &Arc<ClientInner>,
    name: &str,
    keys: &Keys,
    try_only: bool,
    limit: Option<(Instant, Duration)>,
) -> Result<Hold> {
    let token = new_token();
    let mut cleanup = Cleanup::disarmed(client, keys, &token);
    let node = &client.nodes[0];
    let ttl_ms = client.opts.ttl_ms;
    let window = u64::try_from(client.opts.waiter_window().as_millis()).unwrap_or(u64::MAX);
    let window_ms = if try_only { 0 } else { window };
    // What a hand-off grants (see `handoff.lua`): the shorter of the TTL and the window, in
    // the whole milliseconds our waiter key told Redis.
    let granted_ttl = client.opts.ttl.min(Duration::from_millis(window));
    let give_up = |after: Duration| leave_queue(client, keys, &token, after);
    let mut sub: Option<super::wakeups::Subscription> = None;
    let mut grant: Option<super::wakeups::GrantWait> = None;
    // The send time of the latest attempt that found us waiting: it ran before any
    // hand-off to us, and refreshed our place. Until one answers, the first attempt's.
    let mut refreshed: Option<Instant> = None;
    let mut first_sent: Option<Instant> = None;
    // The highest fencing counter an attempt that found us waiting has seen: a hand-off
    // message with a token no higher is of a grant that ended before that attempt ran
    // (else it would have found the grant). Its `since_ms` is not from `refreshed`.
    let mut stale_upto = 0;
    let mut backoff = UNAVAILABLE_MIN;
    let mut unreachable = Unreachable::default();
    // Takes answered after the lock's TTL.
    let mut slow_takes = 0;
    loop {
        let chan = sub.as_ref().map(|s| s.channel().clone());
        let mut woken = chan.as_ref().map(|c| Box::pin(c.waiters.notified()));
        if let Some(w) = woken.as_mut() {
            w.as_mut().enable();
        }
        if grant.is_none() {
            grant = chan.as_ref().map(|c| c.expect_grant(&token));
        }
        // Armed from the first attempt until we hold the lock: a waiter that gives up
        // (dropped, timed out, failed, closed) leaves the queue, or passes the lock on if
        // it was handed to it meanwhile.
        cleanup.armed = true;
        let sent = Instant::now();
        let first = *first_sent.get_or_insert(sent);
        let attempt = node.enqueue(keys, &token, ttl_ms, window_ms);
        let answer = match limit {
            Some((at, after)) => match tokio::time::timeout_at(at, attempt).await {
                Ok(answer) => answer,
                Err(_) => {
                    cleanup.armed = false;
                    return give_up(after).await;
                }
            },
            None => attempt.await,
        };
        let answer = match answer {
            Err(e) if !try_only && super::node::is_transient(&e) => {
                // A server restarting or a connection reset: retry (refreshing our place, or
                // queueing again if the server lost it) until the caller's timeout.
                unreachable.failed(&e);
                let (wait, next) = unavailable_backoff(backoff);
                backoff = next;
                let (until, after) = limit.unwrap_or((Instant::now() + wait, Duration::ZERO));
                tokio::select! {
                    _ = client.closed.cancelled() => return Err(Error::Closed),
                    _ = tokio::time::sleep(wait) => {}
                    _ = tokio::time::sleep_until(until), if limit.is_some() => {
                        cleanup.armed = false;
                        return give_up(after).await;
                    }
                }
                continue;
            }
            Err(e) if try_only => {
                // `try_lock` promises that what the attempt set (a take whose reply was
                // lost or came too late) is deleted before its error returns.
                cleanup.armed = false;
                leave(client, keys, &token).await;
                return Err(e);
            }
            other => {
                backoff = UNAVAILABLE_MIN;
                unreachable.reached();
                other?
            }
        };
        // The grant, and whether a release handed it to us (else we took the lock now).
        let (fence, start, ttl, handed) = match answer {
            NodeEnqueue::Taken(fence) => (fence, sent, client.opts.ttl, false),
            NodeEnqueue::Granted { fence, since_ms } => (
                fence,
                refreshed.unwrap_or(first) + Duration::from_millis(since_ms),
                granted_ttl,
                true,
            ),
            NodeEnqueue::Waiting { .. } if try_only => {
                cleanup.armed = false;
                return Err(Error::Locked {
                    name: name.to_string(),
                });
            }
            NodeEnqueue::Waiting { pttl, fence } => {
                refreshed = Some(sent);
                stale_upto = stale_upto.max(fence);
                if sub.is_none() {
                    // Listen for the hand-off, then refresh at once: a hand-off between the
                    // attempt and the subscription is then found by the refresh.
                    let subscribing = client.hub.subscribe(&keys.channel);
                    sub = Some(match limit {
                        Some((at, after)) => match tokio::time::timeout_at(at, subscribing).await {
                            Ok(s) => s,
                            Err(_) => {
                                cleanup.armed = false;
                                return give_up(after).await;
                            }
                        },
                        None => subscribing.await,
                    });
                    continue;
                }
                let mut retry_in = u64::try_from(pttl).ok().map(Duration::from_millis);
                if !client.hub.is_confirmed(&keys.channel) {
                    // No wake-up message will tell us of a hand-off: only a poll finds it,
                    // and a hand-off grants us `granted_ttl` only (maybe shorter than the
                    // poll, and than the holder's PTTL). Poll within it, or the grant ends
                    // unseen: the lock idles, and the next waiter takes our turn.
                    let within = granted_ttl / 3;
                    retry_in = Some(retry_in.map_or(within, |r| r.min(within)));
                }
                let deadline = Instant::now() + fallback_wait(client.opts.poll_interval, retry_in);
                let (until, after) = limit.unwrap_or((deadline, Duration::ZERO));
                let granted = tokio::select! {
                    _ = client.closed.cancelled() => return Err(Error::Closed),
                    _ = tokio::time::sleep_until(deadline) => None,
                    _ = tokio::time::sleep_until(until), if limit.is_some() => {
                        cleanup.armed = false;
                        return give_up(after).await;
                    }
                    _ = async {
                        match woken {
                            Some(w) => w.await,
                            None => std::future::pending().await,
                        }
                    } => None,
                    g = async {
                        match grant.as_mut() {
                            Some(g) => g.granted().await,
                            None => std::future::pending().await,
                        }
                    } => Some(g),
                };
                match granted {
                    None => continue,
                    Some(g) if g.fence <= stale_upto => {
                        tracing::debug!(
                            fence = g.fence,
                            "a hand-off that ended before our last attempt; waiting on"
                        );
                        // The message is used up: listen for the next hand-off afresh.
                        grant = None;
                        continue;
                    }
                    Some(g) => (
                        g.fence,
                        refreshed.unwrap_or(first) + Duration::from_millis(g.since_ms),
                        granted_ttl,
                        true,
                    ),
                }
            }
        };
        cleanup.armed = false;
        // `since_ms` is measured by Redis's clock: one running fast can put a hand-off after
        // now, when it certainly happened before (we were told of it). Now is no safe start
        // either (the message took its time to come): count from our last refresh then,
        // which certainly preceded the hand-off.
        let start = if start > Instant::now() {
            refreshed.unwrap_or(first)
        } else {
            start
        };
        // A hand-off learnt of with less than a third of its grant left is not returned
        // either: the watchdog's first extend could come too late, and the guard be lost
        // at once (found by review: 4 ms left, lost 4 ms after `lock()` returned).
        let margin = if handed { ttl / 3 } else { Duration::ZERO };
        if start + ttl.saturating_sub(super::drift(ttl)) <= Instant::now() + margin {
            if handed {
                // A hand-off whose grant has ended (or nearly) by our clock before we learnt
                // of it (we were paused, our runtime blocked, or we polled late): the key may
                // be another's by now, and a guard would be lost at once. Not ours: poll
                // again at once, which takes the lock afresh if the key is still ours, else
                // queues us again.
                tracing::debug!(
                    fence,
                    "a hand-off whose grant ended before we learnt of it; waiting on"
                );
                grant = None;
                continue;
            }
            // A take answered after the lock's TTL (the server or our runtime stalled): the
            // key is likely ours still, but a hold counted from the send has ended, and a
            // guard would be lost at once. Poll again, which takes it afresh (our token)
            // with a new TTL from a new send; a try gives up after one such retry, and its
            // key is released.
            slow_takes += 1;
            if try_only && slow_takes > 1 {
                leave(client, keys, &token).await;
                return Err(answered_after_ttl(name, client.opts.ttl));
            }
            if slow_takes % 2 == 0 {
                // Two in a row: the server answers slower than the TTL. Taking the key again
                // and again would keep it ours for good, and everyone else out (found by a
                // second look): let it go (to the next waiter, if any), and wait a poll
                // before trying again.
                if slow_takes == 2 {
                    tracing::warn!(
                        lock = name,
                        ttl = ?client.opts.ttl,
                        "the server answers later than the lock's TTL; letting the lock go \
                         and trying again (a longer TTL helps)"
                    );
                }
                // Bounded by the caller's deadline too: `lock_timeout` returns within
                // LEAVE_GRACE of it (the leave then lets the take go, if it is ours).
                let releasing = client.release(keys, &token);
                let released = match limit {
                    Some((at, after)) => match tokio::time::timeout_at(at, releasing).await {
                        Ok(r) => r,
                        Err(_) => return give_up(after).await,
                    },
                    None => releasing.await,
                };
                if let Err(e) = released {
                    tracing::debug!(error = %e, "letting a late take go failed; it expires with its TTL");
                }
                let wait = fallback_wait(client.opts.poll_interval, None);
                let (until, after) = limit.unwrap_or((Instant::now() + wait, Duration::ZERO));
                tokio::select! {
                    _ = client.closed.cancelled() => return Err(Error::Closed),
                    _ = tokio::time::sleep(wait) => {}
                    _ = tokio::time::sleep_until(until), if limit.is_some() => {
                        return give_up(after).await;
                    }
                }
            } else {
                tracing::debug!(fence, "the take was answered after the lock's TTL; again");
            }
            continue;
        }
        // Only locks queue (FIFO): an election's candidates do not.
        let hold = Hold::start_with_ttl(
            client,
            keys.clone(),
            token.clone(),
            Some(fence),
            start,
            ttl,
            false,
        );
        if client.closed.is_cancelled() {
            let _ = hold.release("close").await;
            return Err(Error::Closed);
        }
        tracing::debug!(fence, handed_over = handed, "acquired");
        return Ok(hold);
    }
}

/// Proof that this process holds a [`RedisLock`]. Release it with
/// [`unlock()`](RedisLockGuard::unlock).
///
/// While the guard lives, the watchdog extends the key every TTL/3 (unless the client was
/// built [`without_watchdog`](super::RedisClientBuilder::without_watchdog)), and
/// [`lost()`](RedisLockGuard::lost) fires if the lock stops being ours. The watchdog is a
/// task on the tokio runtime the lock was acquired on: if that runtime shuts down while the
/// guard lives on (moved to another runtime), nothing extends the key any more, and the
/// guard is lost at once.
///
/// # Drop behaviour
///
/// Dropping the guard stops the watchdog and releases the lock in a task spawned on the
/// current tokio runtime (compare-and-delete, best effort). Without a runtime, or if that
/// fails, or if the runtime shuts down first (a guard dropped as `#[tokio::main]` returns),
/// the key expires after its TTL. Call [`unlock()`](RedisLockGuard::unlock) to release and
/// see the result.
#[must_use = "if unused the lock is released at once"]
pub struct RedisLockGuard {
    name: String,
    hold: Hold,
}

impl fmt::Debug for RedisLockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLockGuard")
            .field("key", &self.key())
            .field("fencing_token", &self.fencing_token())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl RedisLockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Redis key held: the client's prefix plus the name. (Through the backend-neutral
    /// [`Guard::key`], the name alone, as keys are relative to the namespace there.)
    pub fn key(&self) -> &str {
        self.hold.key()
    }

    /// The random 128-bit token stored as the key's value (32 hex digits). Treat it as a
    /// secret: whoever knows it can release the lock.
    pub fn token(&self) -> &str {
        self.hold.token()
    }

    /// The fencing token of this grant on a single Redis server: the lock's counter
    /// (`baton:fence:KEY`), incremented by the acquire script, so strictly greater than
    /// every earlier grant's **while Redis keeps its data** (a restart without persistence
    /// resets it, as does deleting or evicting the counter). `None` on Redlock, which has no
    /// safe fencing token.
    ///
    /// The counter is one key per lock name that never expires (it must not): names used
    /// once each (`order/<id>`) leave one key each. See the [module
    /// documentation](super#fencing-tokens-single-instance-only) for removing the counters
    /// of retired names, and why Redis should run with `maxmemory-policy noeviction`.
    pub fn fencing_token(&self) -> Option<i64> {
        self.hold.fence()
    }

    /// True once the lock is lost. See [`lost()`](RedisLockGuard::lost).
    ///
    /// True at once when the local deadline ([`deadline()`](Self::deadline)) has passed, even
    /// if the watchdog has not run since (a paused process, a blocked runtime): this call then
    /// marks the lock lost, cancelling its `lost()` future and every `lost_token()`.
    pub fn is_lost(&self) -> bool {
        self.hold.is_lost()
    }

    /// Why the lock was lost, if it was.
    pub fn lost_reason(&self) -> Option<String> {
        self.hold.lost_reason()
    }

    /// Completes when the lock is lost: an extend found the key gone or holding another
    /// token, the local deadline passed without a successful extend, or the client was
    /// closed. With the watchdog on, a deleted key is noticed within TTL/3 plus a round trip.
    /// The local deadline is checked when this is called: if it has passed, the future is
    /// ready at once.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.hold.lost()
    }

    /// A token cancelled when the lock is lost (a child token: cancelling it changes nothing).
    ///
    /// Already cancelled if the local deadline has passed when this is called; later,
    /// cancelled by the watchdog or by the first `is_lost()` that finds the deadline passed.
    pub fn lost_token(&self) -> CancellationToken {
        self.hold.lost_token()
    }

    /// The local deadline: the lock is certainly ours until then (the start of the last
    /// successful acquire or extend, plus the TTL, minus the drift; monotonic clock).
    pub fn deadline(&self) -> Instant {
        self.hold.deadline()
    }

    /// Extend the key by a TTL now: compare-and-`PEXPIRE` (on a quorum, for Redlock). The
    /// watchdog does this by itself; call it when the client has no watchdog.
    ///
    /// Fails with [`Error::NotHeld`] if the lock is lost (the key expired, was deleted or
    /// holds another token): it never re-creates the key.
    ///
    /// # Cancel safety
    ///
    /// The key may or may not have been extended if the future is dropped.
    pub async fn extend(&self) -> Result<()> {
        self.hold.extend().await
    }

    /// Release the lock: delete the key if it still holds our token (compare-and-delete,
    /// never a plain `DEL`) and wake the waiters, or, on one server with waiters queued, hand
    /// it to the oldest live one and wake only it.
    ///
    /// Returns [`Error::NotHeld`] if the lock had already been lost (on Redlock: too few
    /// masters answered that they held our token for a quorum to have held it); another
    /// holder's lock is never deleted. On Redlock, if fewer than a quorum deleted the key
    /// while the masters that failed or did not answer could have held it, whether it was
    /// still ours is not known: [`Error::NoQuorum`], and the key expires after its TTL
    /// where it is left. A request whose connection the server had closed (an idle
    /// timeout, a proxy's reset, `CLIENT KILL`) is sent once more on a new connection.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release may or may not have happened; the key expires
    /// after its TTL at the latest.
    pub async fn unlock(self) -> Result<()> {
        self.hold.release("unlock").await
    }
}

#[async_trait]
impl Guard for RedisLockGuard {
    /// The name: the key relative to the client's prefix (the coordinator's namespace).
    fn key(&self) -> &str {
        RedisLockGuard::name(self)
    }
    fn fencing_token(&self) -> Option<i64> {
        RedisLockGuard::fencing_token(self)
    }
    fn is_lost(&self) -> bool {
        RedisLockGuard::is_lost(self)
    }
    fn lost_reason(&self) -> Option<String> {
        RedisLockGuard::lost_reason(self)
    }
    fn lost_token(&self) -> CancellationToken {
        RedisLockGuard::lost_token(self)
    }
    fn deadline(&self) -> Option<Instant> {
        Some(RedisLockGuard::deadline(self))
    }
    /// A loss's [`Error::NotHeld`] names the key as [`key()`](Guard::key) does (relative to
    /// the namespace, as on etcd), not the Redis key.
    async fn release(self: Box<Self>) -> Result<()> {
        let name = RedisLockGuard::name(&self).to_string();
        match self.unlock().await {
            Err(Error::NotHeld { .. }) => Err(Error::NotHeld { key: name }),
            r => r,
        }
    }
}

#[async_trait]
impl Lock for RedisLock {
    fn name(&self) -> &str {
        RedisLock::name(self)
    }
    async fn lock(&self) -> Result<Box<dyn Guard>> {
        Ok(Box::new(RedisLock::lock(self).await?))
    }
    async fn lock_timeout(&self, timeout: Duration) -> Result<Box<dyn Guard>> {
        Ok(Box::new(RedisLock::lock_timeout(self, timeout).await?))
    }
    async fn try_lock(&self) -> Result<Box<dyn Guard>> {
        Ok(Box::new(RedisLock::try_lock(self).await?))
    }
}

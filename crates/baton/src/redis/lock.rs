//! A lock on Redis: one server, or Redlock over independent masters.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

use super::node::Keys;
use super::redlock::Attempt;
use super::watchdog::Hold;
use super::{new_token, ClientInner, RedisClient};
use crate::coordinator::{Guard, Lock};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::with_timeout;

/// How long a waiter sleeps after an attempt that found no quorum in time (Redlock split
/// votes, slow nodes): a random delay in this range.
const RETRY_JITTER: (u64, u64) = (5, 50);

/// A distributed lock on Redis, wire-compatible with redsync and redis-py's `Lock`.
///
/// The key is the name (after the client's prefix); the value is a random 128-bit token set
/// with `SET NX PX`. See the [module documentation](super) for what that guarantees, the
/// fencing token (single server only), the watchdog, and what Redlock does not guarantee.
///
/// Locks are not re-entrant, and not FIFO: after a release, whichever waiter sets the key
/// first wins. Two `lock()` calls on one `RedisLock` are two contenders.
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
            handle.spawn(
                async move {
                    if let Err(e) = client.release(&keys, &token).await {
                        tracing::debug!(error = %e, "cleanup of a cancelled acquire failed; keys expire with their ttl");
                    }
                }
                .instrument(tracing::debug_span!("cancelled_acquire")),
            );
        }
    }
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
    /// contains a NUL byte.
    pub fn new(client: &RedisClient, name: &str) -> Result<RedisLock> {
        validate_name(name)?;
        Ok(RedisLock {
            client: client.clone(),
            name: name.to_string(),
            keys: Keys::new(&client.inner().opts.prefix, name),
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
    /// Between attempts, waits for a release message on the lock's channel, for the holder's
    /// key to expire, or for the jittered fallback poll. Fails with the server's error if the
    /// server (or, on Redlock, a majority of masters) fails, and with [`Error::Closed`] if the
    /// client is closed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. If the future is dropped while an attempt is in flight, what it may have
    /// set is deleted (compare-and-delete on our token, in a task spawned on the current
    /// runtime), so nothing is left behind.
    pub async fn lock(&self) -> Result<RedisLockGuard> {
        acquire(self.client.inner(), &self.name, &self.keys, None, false)
            .instrument(tracing::debug_span!("acquire", lock = %self.name))
            .await
            .map(|hold| RedisLockGuard {
                name: self.name.clone(),
                hold,
            })
    }

    /// [`lock()`](RedisLock::lock), giving up with [`Error::Timeout`] after `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock()`](RedisLock::lock); on timeout nothing is left behind.
    pub async fn lock_timeout(&self, timeout: Duration) -> Result<RedisLockGuard> {
        with_timeout("lock", timeout, self.lock()).await
    }

    /// Take the lock if it is free, with one attempt.
    ///
    /// Fails with [`Error::Locked`] if another owner holds it, and on Redlock with
    /// [`Error::NoQuorum`] if no quorum was reached for another reason (slow or failing
    /// masters). Whatever the attempt set is deleted before the error is returned.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock()`](RedisLock::lock).
    pub async fn try_lock(&self) -> Result<RedisLockGuard> {
        acquire(self.client.inner(), &self.name, &self.keys, None, true)
            .instrument(tracing::debug_span!("try_acquire", lock = %self.name))
            .await
            .map(|hold| RedisLockGuard {
                name: self.name.clone(),
                hold,
            })
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
    let token = new_token();
    let mut cleanup = Cleanup {
        client,
        keys,
        token: &token,
        armed: false,
    };
    let mut sub = None;
    // True when the attempt follows a release's wake-up, or the lock was contended here a
    // moment ago (see `try_acquire`).
    let mut gated = client.redlock && client.hub.is_subscribed(&keys.channel);
    loop {
        let chan = sub
            .as_ref()
            .map(|s: &super::wakeups::Subscription| s.channel().clone());
        let mut woken = chan.as_ref().map(|c| Box::pin(c.waiters.notified()));
        if let Some(w) = woken.as_mut() {
            w.as_mut().enable();
        }
        cleanup.armed = true;
        let attempt = client.try_acquire(keys, &token, record, gated).await;
        cleanup.armed = false;
        let wait = match attempt {
            Attempt::Acquired { fence, start } => {
                let hold = Hold::start(client, keys.clone(), token.clone(), fence, start);
                if client.closed.is_cancelled() {
                    let _ = hold.release("close").await;
                    return Err(Error::Closed);
                }
                tracing::debug!(fence = ?fence, "acquired");
                return Ok(hold);
            }
            Attempt::Failed(e) => return Err(e),
            Attempt::Busy { .. } if try_only => {
                return Err(Error::Locked {
                    name: name.to_string(),
                })
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
                    sub = Some(client.hub.subscribe(&keys.channel).await);
                    continue;
                }
                fallback_wait(client.opts.poll_interval, retry_in)
            }
            Attempt::TooSlow { .. } => jitter_ms(RETRY_JITTER.0, RETRY_JITTER.1),
        };
        let deadline = Instant::now() + wait;
        gated = tokio::select! {
            _ = client.closed.cancelled() => return Err(Error::Closed),
            _ = tokio::time::sleep_until(deadline) => false,
            _ = async {
                match woken {
                    Some(w) => w.await,
                    None => std::future::pending().await,
                }
            } => true,
        };
    }
}

/// Proof that this process holds a [`RedisLock`]. Release it with
/// [`unlock()`](RedisLockGuard::unlock).
///
/// While the guard lives, the watchdog extends the key every TTL/3 (unless the client was
/// built [`without_watchdog`](super::RedisClientBuilder::without_watchdog)), and
/// [`lost()`](RedisLockGuard::lost) fires if the lock stops being ours.
///
/// # Drop behaviour
///
/// Dropping the guard stops the watchdog and releases the lock in a task spawned on the
/// current tokio runtime (compare-and-delete, best effort). Without a runtime, or if that
/// fails, the key expires after its TTL. Call [`unlock()`](RedisLockGuard::unlock) to release
/// and see the result.
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

    /// The Redis key held.
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
    /// resets it). `None` on Redlock, which has no safe fencing token.
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
    /// never a plain `DEL`), and wake the next waiter.
    ///
    /// Returns [`Error::NotHeld`] if the lock had already been lost; another holder's lock is
    /// never deleted.
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
    fn key(&self) -> &str {
        RedisLockGuard::key(self)
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
    async fn release(self: Box<Self>) -> Result<()> {
        self.unlock().await
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

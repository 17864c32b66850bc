//! Leader election on Redis, built on the lock and its watchdog.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

use super::lock::{acquire_plain, fallback_wait, unless_closed};
use super::node::{Keys, NodeRecord};
use super::watchdog::Hold;
use super::RedisClient;
use crate::coordinator::{Elector, Guard, LeaderStream, Leading};
use crate::election::{
    poll_leader, send_news, LastSent, Leader, LeaderEvent, LeaderEvents, ObserveFailure, Observed,
};
use crate::error::{Error, Result};
use crate::names::{validate_name, validate_value};

/// A leader election on Redis: the candidate that holds the election's lock leads.
///
/// Campaigning is taking the lock `NAME` (the same key and algorithm as [`RedisLock`]); the
/// leader's value lives in the record `baton:leader:KEY`, written in the same script that
/// takes the lock, and kept alive by the same watchdog. [`leader()`](RedisElection::leader)
/// reads the holder and its record (from a quorum, on Redlock), and
/// [`observe()`](RedisElection::observe) follows changes by pub/sub with a fallback poll.
///
/// Candidates are not queued in order: when the leader resigns or its key expires, whichever
/// candidate sets the key first leads. Leadership ends at the latest one TTL after the
/// leader's process dies. A leader whose record is deleted (while its key stays) is seen by
/// nobody: it loses its leadership at its next extend (a third of the TTL), and steps down.
///
/// The [`Leader`] reported has `key` = the election's name (relative to the client's
/// prefix, as etcd's keys are to the namespace), `create_revision` = the leader's fencing
/// token (its lock's counter; 0 on Redlock, which has none), `mod_revision` = the value's
/// version in this term (1 after the campaign, raised by every proclaim attempt, failed or
/// cancelled ones too: it grows with each new value, and may skip numbers), and
/// `lease` = 0.
///
/// [`RedisLock`]: super::RedisLock
///
/// # Examples
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let redis = baton::redis::RedisClient::connect("redis://127.0.0.1:6379").await?;
/// let election = redis.election("services/scheduler")?;
/// let mut leadership = election.campaign("10.0.0.7:8080").await?;
/// assert_eq!(election.leader().await?.value, b"10.0.0.7:8080");
/// leadership.proclaim("10.0.0.7:9090").await?;
/// leadership.resign().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisElection {
    client: RedisClient,
    name: String,
    keys: Keys,
}

impl fmt::Debug for RedisElection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisElection")
            .field("name", &self.name)
            .field("key", &self.keys.lock)
            .finish()
    }
}

impl RedisElection {
    /// An election named `name` on `client`.
    ///
    /// Fails with [`Error::InvalidArgument`] if the name is empty, longer than 1 KiB, or
    /// contains a NUL byte, or if the key (prefix and name) is in Baton's own key space
    /// for other locks (`baton:fence:…`, see the module docs).
    pub fn new(client: &RedisClient, name: &str) -> Result<RedisElection> {
        validate_name(name)?;
        Ok(RedisElection {
            client: client.clone(),
            name: name.to_string(),
            keys: Keys::checked(&client.inner().opts.prefix, name)?,
        })
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Redis key the leader holds.
    pub fn key(&self) -> &str {
        &self.keys.lock
    }

    /// Stand with `value` and wait until we lead. The value is published in the same script
    /// that takes the lock, so nobody ever sees us lead without it.
    ///
    /// Fails with [`Error::InvalidArgument`] for a value over 1 MiB.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future withdraws the candidacy; nothing is left behind.
    pub async fn campaign(&self, value: impl Into<Vec<u8>>) -> Result<RedisLeadership> {
        self.stand(value.into(), None).await
    }

    /// [`campaign()`](RedisElection::campaign), giving up with [`Error::Timeout`] after
    /// `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`campaign()`](RedisElection::campaign). On timeout nothing is left
    /// behind: a take still in flight is deleted before this returns. If the server does
    /// not confirm the deletion within 500 ms of the timeout, this returns anyway and the
    /// deletion goes on in a task spawned on the current runtime, which
    /// [`close()`](super::RedisClient::close) waits for.
    pub async fn campaign_timeout(
        &self,
        value: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Result<RedisLeadership> {
        // As `RedisLock::lock_timeout`: a take still in flight at the timeout is deleted
        // before this returns, not in a task spawned on drop, which a process about to exit
        // would never run (a leader nobody runs would be left for the TTL).
        let limit = (crate::deadline::after(timeout), timeout);
        match self.stand(value.into(), Some(limit)).await {
            Err(Error::Timeout { after, .. }) => Err(Error::Timeout {
                operation: "campaign",
                after,
            }),
            other => other,
        }
    }

    /// Take the election's lock with `value` as its record, giving up at `limit` (its
    /// deadline and the timeout it came from) if given.
    async fn stand(
        &self,
        value: Vec<u8>,
        limit: Option<(Instant, Duration)>,
    ) -> Result<RedisLeadership> {
        validate_value(&value)?;
        let client = self.client.inner();
        client.check_open()?;
        // An election's record goes with the plain take: it never queues (see `acquire`).
        let acquiring = acquire_plain(
            client,
            &self.name,
            &self.keys,
            Some(&value),
            false,
            None,
            limit,
        )
        .instrument(tracing::debug_span!("campaign", election = %self.name));
        let hold = unless_closed(client, acquiring).await?;
        Ok(RedisLeadership {
            name: self.name.clone(),
            hold,
            value,
            ver: 1,
        })
    }

    /// The current leader, or [`Error::NoLeader`]. On Redlock, the leader is the token a
    /// quorum of masters agrees on. A holder of the key that wrote no election record (a
    /// [`RedisLock`](super::RedisLock) of the same name, or another library's lock) is no
    /// leader: [`Error::NoLeader`]. [`Error::Closed`] once the client is closed. On
    /// Redlock, [`Error::NoQuorum`] when too few masters answer to tell: fewer than a
    /// quorum, or a record on some masters that the ones silent could make a quorum.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn leader(&self) -> Result<Leader> {
        self.client.inner().check_open()?;
        match self.client.inner().read_leader(&self.keys).await? {
            Some(rec) => Ok(to_leader(&self.name, rec)),
            None => Err(Error::NoLeader {
                name: self.name.clone(),
            }),
        }
    }

    /// A stream of leaders: the current one (if any), its proclaimed values, and each new
    /// leader. It waits quietly while there is no leader (a plain lock holder of the same
    /// name is none; [`RedisObserve::with_vacancies`] reports that too), never yields the same proclamation twice (a proclamation of an
    /// unchanged value is a new one, and is yielded), and ends when the client is closed or
    /// the stream is dropped.
    ///
    /// Failed reads are retried, except when the server refuses access (the user's ACL does
    /// not cover the election's keys: [`Error::PermissionDenied`]; on Redlock, when so many
    /// masters refuse that no quorum can answer): then the stream ends, and
    /// [`RedisObserve::take_error`] says why, as on etcd.
    ///
    /// Changes arrive by pub/sub; each wake-up reads the record, so the stream yields the
    /// **latest** state, not every step: values proclaimed in quick succession (faster than
    /// one read) may be skipped, and an observer sees only the last of them (proclaiming
    /// `v2`…`v5` back to back may yield `v2`, `v3`, `v5`). The latest value is never
    /// skipped. A leader that vanished without a release (its process died, its key
    /// expired) is noticed by the fallback poll.
    pub fn observe(&self) -> RedisObserve {
        let (tx, rx) = mpsc::channel(16);
        let client = self.client.clone();
        let keys = self.keys.clone();
        let name = self.name.clone();
        let failure = ObserveFailure::default();
        let kept = failure.clone();
        let span = tracing::debug_span!("observe", election = %self.name);
        tokio::spawn(
            async move {
                let inner = client.inner().clone();
                tokio::select! {
                    _ = tx.closed() => {}
                    _ = inner.closed.cancelled() => {}
                    denied = observe_loop(&client, &name, &keys, &tx, &kept) => {
                        if let Some(e) = denied {
                            tracing::warn!(error = %e, "observing stopped: access denied");
                            kept.set(e);
                        }
                    }
                }
            }
            .instrument(span),
        );
        RedisObserve { rx, failure }
    }
}

/// The leader `rec` says, its key being the election's name: relative to the client's
/// prefix, as etcd's keys are to the namespace.
fn to_leader(name: &str, rec: NodeRecord) -> Leader {
    Leader {
        key: name.to_string(),
        value: rec.value,
        create_revision: rec.fence,
        mod_revision: rec.ver,
        lease: 0,
    }
}

/// Send every leader change (and each vacancy) until the receiver goes; returns early only
/// with an access-denied error, which retrying cannot cure.
async fn observe_loop(
    client: &RedisClient,
    name: &str,
    keys: &Keys,
    tx: &mpsc::Sender<Observed>,
    failure: &ObserveFailure,
) -> Option<Error> {
    let inner = client.inner();
    let sub = inner.hub.subscribe(&keys.channel).await;
    let chan = sub.channel().clone();
    // The leader last sent: its token and version.
    let mut last = LastSent::<(Vec<u8>, i64)>::new();
    // Whether the last read failed (then `failure` says so until one works).
    let mut failing = false;
    loop {
        let woken = chan.observers.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let read = inner.read_leader(keys).await;
        if read.is_ok() && std::mem::take(&mut failing) {
            failure.working();
        }
        match read {
            Ok(Some(rec)) => {
                let id = (rec.token.clone(), rec.ver);
                let news = last.leader(id, || LeaderEvent::Leader(to_leader(name, rec)));
                if !send_news(tx, news).await {
                    return None;
                }
            }
            Ok(None) => {
                if !send_news(tx, last.vacancy()).await {
                    return None;
                }
            }
            Err(e) if e.is_access_denied() => return Some(e),
            Err(e) => {
                tracing::debug!(error = %e, "reading the leader failed; retrying");
                failure.failing(&e);
                failing = true;
            }
        }
        let wait = fallback_wait(inner.opts.poll_interval, None);
        tokio::select! {
            _ = &mut woken => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// A stream of [`Leader`]s from [`RedisElection::observe`]. Dropping it stops observing.
///
/// Failed reads are retried, except when the server refuses access (the user's ACL does not
/// cover the election's keys; on Redlock, when so many masters refuse that no quorum can
/// answer): then the stream ends, and
/// [`take_error`](RedisObserve::take_error) says why.
pub struct RedisObserve {
    rx: mpsc::Receiver<Observed>,
    failure: ObserveFailure,
}

impl RedisObserve {
    /// Why the stream ended, if the server refused access ([`Error::is_access_denied`]);
    /// `None` otherwise (the client was closed).
    pub fn take_error(&mut self) -> Option<Error> {
        self.failure.take()
    }

    /// While reading the leader fails and is being retried (no quorum answers, say), the
    /// message of the last failure; `None` while it works. For telling users that changes
    /// may be late: the stream recovers by itself.
    pub fn retrying(&self) -> Option<String> {
        self.failure.retrying()
    }

    /// This stream, reporting also when the election has no leader: when observing starts
    /// with none, and each time the leader leaves (resigns, its key is deleted or expires)
    /// before another candidate takes over. See [`LeaderEvents`](crate::LeaderEvents).
    pub fn with_vacancies(self) -> LeaderEvents {
        let mut rx = self.rx;
        let events = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        LeaderEvents::new(events.boxed(), self.failure)
    }
}

impl fmt::Debug for RedisObserve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisObserve").finish_non_exhaustive()
    }
}

impl Stream for RedisObserve {
    type Item = Leader;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Leader>> {
        poll_leader(cx, |cx| self.rx.poll_recv(cx))
    }
}

/// Proof that we lead a [`RedisElection`]. Step down with
/// [`resign()`](RedisLeadership::resign).
///
/// The watchdog keeps the key and the record alive; [`lost()`](RedisLeadership::lost) fires
/// as for a [`RedisLockGuard`](super::RedisLockGuard).
///
/// # Drop behaviour
///
/// Dropping it resigns in a task spawned on the current tokio runtime (compare-and-delete,
/// best effort). Without a runtime, or if that fails, or if the runtime shuts down first (a
/// leadership dropped as `#[tokio::main]` returns), the key expires after its TTL and the
/// next candidate leads then.
#[must_use = "if unused the leadership is resigned at once"]
pub struct RedisLeadership {
    name: String,
    hold: Hold,
    value: Vec<u8>,
    /// The record's version we wrote last (the campaign writes 1).
    ver: i64,
}

impl fmt::Debug for RedisLeadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLeadership")
            .field("election", &self.name)
            .field("key", &self.key())
            .field("fencing_token", &self.fencing_token())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl RedisLeadership {
    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Redis key held: the client's prefix plus the name. (Through the backend-neutral
    /// [`Guard::key`], and in the [`Leader`] that [`RedisElection::leader`] and
    /// [`RedisElection::observe`] report, the name alone, as keys are relative to the
    /// namespace there.)
    pub fn key(&self) -> &str {
        self.hold.key()
    }

    /// The value we last proclaimed.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The fencing token of this term (single server only; `None` on Redlock). See
    /// [`RedisLockGuard::fencing_token`](super::RedisLockGuard::fencing_token).
    pub fn fencing_token(&self) -> Option<i64> {
        self.hold.fence()
    }

    /// True once the leadership is lost.
    ///
    /// True at once when the local deadline ([`deadline()`](Self::deadline)) has passed, even
    /// if the watchdog has not run since (a paused process, a blocked runtime): this call then
    /// marks the leadership lost, cancelling its `lost()` future and every `lost_token()`.
    pub fn is_lost(&self) -> bool {
        self.hold.is_lost()
    }

    /// Why the leadership was lost, if it was.
    pub fn lost_reason(&self) -> Option<String> {
        self.hold.lost_reason()
    }

    /// Completes when the leadership is lost (see
    /// [`RedisLockGuard::lost`](super::RedisLockGuard::lost)).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.hold.lost()
    }

    /// A token cancelled when the leadership is lost (a child token).
    pub fn lost_token(&self) -> CancellationToken {
        self.hold.lost_token()
    }

    /// The local deadline: we certainly lead until then.
    pub fn deadline(&self) -> Instant {
        self.hold.deadline()
    }

    /// Publish a new value, only while we still lead (a script compares our token first).
    ///
    /// Fails with [`Error::NotLeader`] if we no longer lead (and marks the leadership lost),
    /// and with [`Error::InvalidArgument`] for a value over 1 MiB.
    ///
    /// # Cancel safety
    ///
    /// The value may or may not have been published if the future is dropped.
    pub async fn proclaim(&mut self, value: impl Into<Vec<u8>>) -> Result<()> {
        let value = value.into();
        validate_value(&value)?;
        let not_leader = || Error::NotLeader {
            name: self.name.clone(),
        };
        if self.hold.is_lost() {
            return Err(not_leader());
        }
        let client = self.hold.client().clone();
        // A new version for every attempt, failed ones included: one version, one value.
        self.ver += 1;
        let published = client
            .proclaim(self.hold.keys(), self.hold.token(), &value, self.ver)
            .instrument(tracing::debug_span!("proclaim", election = %self.name))
            .await?;
        match published {
            Some(_) => {
                self.value = value;
                Ok(())
            }
            None => {
                self.hold
                    .mark_lost("the leader key holds another owner's token or is gone");
                // The key may still be ours, with the record gone: step down (a
                // compare-and-delete), or every other candidate waits out its TTL.
                if let Err(e) = client.clean_up(self.hold.keys(), self.hold.token()).await {
                    tracing::debug!(error = %e, "stepping down failed; the key expires with its ttl");
                }
                Err(not_leader())
            }
        }
    }

    /// Step down: delete the key (and the record) if still ours, so the next candidate
    /// leads at once.
    ///
    /// Fails with [`Error::NotLeader`] if we had already lost the leadership; on Redlock,
    /// with [`Error::NoQuorum`] if the masters that answered leave it open (as
    /// [`RedisLockGuard::unlock`](super::RedisLockGuard::unlock)).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the resignation may or may not have happened; the key
    /// expires after its TTL at the latest.
    pub async fn resign(self) -> Result<()> {
        let name = self.name;
        match self.hold.release("resign").await {
            Err(Error::NotHeld { .. }) => Err(Error::NotLeader { name }),
            r => r,
        }
    }
}

#[async_trait]
impl Guard for RedisLeadership {
    /// The name: the key relative to the client's prefix (the coordinator's namespace).
    fn key(&self) -> &str {
        RedisLeadership::name(self)
    }
    fn fencing_token(&self) -> Option<i64> {
        RedisLeadership::fencing_token(self)
    }
    fn is_lost(&self) -> bool {
        RedisLeadership::is_lost(self)
    }
    fn lost_reason(&self) -> Option<String> {
        RedisLeadership::lost_reason(self)
    }
    fn lost_token(&self) -> CancellationToken {
        RedisLeadership::lost_token(self)
    }
    fn deadline(&self) -> Option<Instant> {
        Some(RedisLeadership::deadline(self))
    }
    async fn release(self: Box<Self>) -> Result<()> {
        self.resign().await
    }
}

#[async_trait]
impl Leading for RedisLeadership {
    fn value(&self) -> &[u8] {
        RedisLeadership::value(self)
    }
    async fn proclaim(&mut self, value: Vec<u8>) -> Result<()> {
        RedisLeadership::proclaim(self, value).await
    }
}

#[async_trait]
impl Elector for RedisElection {
    fn name(&self) -> &str {
        RedisElection::name(self)
    }
    async fn campaign(&self, value: Vec<u8>) -> Result<Box<dyn Leading>> {
        Ok(Box::new(RedisElection::campaign(self, value).await?))
    }
    async fn campaign_timeout(
        &self,
        value: Vec<u8>,
        timeout: Duration,
    ) -> Result<Box<dyn Leading>> {
        Ok(Box::new(
            RedisElection::campaign_timeout(self, value, timeout).await?,
        ))
    }
    async fn leader(&self) -> Result<Leader> {
        RedisElection::leader(self).await
    }
    fn observe(&self) -> LeaderStream {
        LeaderStream::new(RedisElection::observe(self).with_vacancies())
    }
}

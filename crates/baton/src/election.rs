//! Leader election, wire-compatible with Go's `concurrency.Election` and `etcdctl elect`.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::names::{lease_key, validate_name, validate_value, Queue};
use crate::queue::{held_accessors, with_timeout_settled, Entry, Held};
use crate::session::Session;
use crate::store::{
    Compare, CompareOp, EventKind, KeyValue, LeaseId, Revision, Store, Txn, TxnOp, Watch,
};
use crate::wait::head_member;

const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// A leader election: candidates queue by create revision; the oldest candidate leads.
///
/// The leader publishes a value (its address, say) that [`observe()`](Election::observe) and
/// [`leader()`](Election::leader) report to everyone. Leadership is bound to the session's
/// lease: when the leader's process dies, its lease expires and the next candidate leads.
///
/// # Key layout
///
/// The same as Go's `concurrency.NewElection(session, NAME)` and `etcdctl elect NAME`: the
/// key `NAME/<lease id in lowercase hex>`, holding the candidate's value, bound to the lease.
/// Go services, `etcdctl elect` and Baton take part in one election.
///
/// With Go candidates in the election, free a stuck Go leader by deleting its key
/// (`etcdctl del KEY`), not by overwriting it with no lease (`etcdctl put KEY ""`, which
/// frees it for Baton): Go's `Proclaim` compares only the key's create revision, so it
/// binds the overwritten key to its lease again, and the Go leader leads again beside the
/// Baton leader elected meanwhile, which is not told.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let session = baton::Session::new(&client).await?;
/// let election = baton::Election::new(&session, "services/scheduler")?;
///
/// let leadership = election.campaign("10.0.0.7:8080").await?;
/// let leader = election.leader().await?;
/// assert_eq!(leader.value, b"10.0.0.7:8080");
/// assert_eq!(leader.create_revision, leadership.fencing_token());
/// leadership.resign().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Election {
    session: Session,
    name: String,
    prefix: String,
    key: String,
}

impl fmt::Debug for Election {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Election")
            .field("name", &self.name)
            .field("key", &self.key)
            .finish()
    }
}

/// The current leader of an election, as [`Election::leader`] and
/// [`Election::observe`] report it.
#[derive(Clone, PartialEq, Eq)]
pub struct Leader {
    /// The leader's key, relative to the client's namespace: `NAME/<lease id in hex>`. On
    /// Redis, the election's name `NAME` (without the client's prefix).
    pub key: String,
    /// The value the leader proclaimed.
    pub value: Vec<u8>,
    /// The key's create revision: the leader's term, and its fencing token.
    pub create_revision: Revision,
    /// The revision of the last proclamation.
    pub mod_revision: Revision,
    /// The leader's lease.
    pub lease: LeaseId,
}

impl Leader {
    fn from_kv(kv: KeyValue) -> Leader {
        Leader {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }

    /// The value as UTF-8 text, with invalid bytes replaced.
    pub fn value_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

impl fmt::Debug for Leader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leader")
            .field("key", &self.key)
            .field("value_len", &self.value.len())
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .finish()
    }
}

impl Election {
    /// An election named `name`, campaigned in through `session`.
    ///
    /// Fails with [`Error::InvalidArgument`] if the name is empty, longer than 1 KiB, or
    /// contains a NUL byte.
    pub fn new(session: &Session, name: &str) -> Result<Election> {
        validate_name(name)?;
        let prefix = format!("{name}/");
        let key = lease_key(&prefix, session.lease_id());
        Ok(Election {
            session: session.clone(),
            name: name.to_string(),
            prefix,
            key,
        })
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// After a [`campaign()`](Election::campaign) of this handle was dropped (a timeout around it):
    /// wait, at most 500 ms, until our key's removal is done.
    pub(crate) async fn settle(&self) {
        crate::queue::settle(&self.session, &self.key, "campaign").await;
    }

    /// This session's candidate key: `NAME/<lease id in hex>`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stand as a candidate with `value`, and wait until we lead.
    ///
    /// If this session's key already exists (a candidacy left by an earlier process with the
    /// same lease), it is reused and its value proclaimed, as Go does.
    ///
    /// Fails with [`Error::SessionLost`] if the session is lost while waiting, and with
    /// [`Error::NotHeld`] if our candidate key vanished, or was overwritten with no lease
    /// (an operator's `etcdctl put KEY ""`, which withdraws the candidacy): a candidate is
    /// never told it leads when it does not (Go's `Campaign` is). A reused key that vanishes
    /// or is freed just before its new value is written fails it with
    /// [`Error::NotLeader`], as Go's does. A value over 1 MiB fails at once with
    /// [`Error::InvalidArgument`]; a second campaign on the same session and name, while
    /// the first leads or waits, with [`Error::AlreadyHeld`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future withdraws the candidacy (our key is deleted).
    pub async fn campaign(&self, value: impl Into<Vec<u8>>) -> Result<Leadership> {
        let value = value.into();
        validate_value(&value)?;
        self.run_campaign(value)
            .instrument(tracing::debug_span!("campaign", election = %self.name))
            .await
    }

    /// [`campaign()`](Election::campaign), giving up with [`Error::Timeout`] after `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`campaign()`](Election::campaign). On timeout the candidacy is
    /// withdrawn.
    pub async fn campaign_timeout(
        &self,
        value: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Leadership> {
        with_timeout_settled(
            &self.session,
            &self.key,
            "campaign",
            timeout,
            self.campaign(value),
        )
        .await
    }

    async fn run_campaign(&self, value: Vec<u8>) -> Result<Leadership> {
        let mut entry = Entry::join(
            &self.session,
            &self.name,
            Queue::direct(&self.prefix),
            &self.key,
            &value,
            false,
        )
        .await?;
        if entry
            .existing_value()
            .is_some_and(|v| v != value.as_slice())
        {
            // Still ours: the key adopted, with our lease (an overwrite with no lease since,
            // which frees the election, keeps the create revision; it must not be bound to
            // our lease again, ahead of anyone elected since).
            let key = self.key.as_bytes();
            let lease = self.session.lease_id();
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key, CompareOp::Equal, entry.my_rev()),
                    Compare::lease(key, CompareOp::Equal, lease),
                ])
                .and_then([TxnOp::put(
                    self.key.as_bytes(),
                    value.clone(),
                    self.session.lease_id(),
                )]);
            if !entry.store().txn(txn).await?.succeeded {
                return Err(self.not_leader());
            }
        }
        entry.wait().await?;
        Ok(Leadership {
            name: self.name.clone(),
            held: entry.into_held(),
            value,
        })
    }

    /// Take back a leadership this session's lease already holds, for example after a restart
    /// of a process that kept its lease (Go's `ResumeElection`). `create_revision` is the
    /// leader key's create revision (the fencing token) it had.
    ///
    /// Fails with [`Error::NotLeader`] if our key does not exist with that create revision,
    /// bound to this session's lease (a key overwritten with no lease, which frees the
    /// election, is not resumed, and is left alone).
    /// If we are still queued behind another candidate, waits like
    /// [`campaign()`](Election::campaign).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; dropping the future withdraws the candidacy.
    pub async fn resume(&self, create_revision: Revision) -> Result<Leadership> {
        let store = self.session.store();
        let found = store
            .range(crate::store::Range::key(self.key.as_bytes()))
            .await?
            .kvs
            .into_iter()
            .next();
        let value = match found {
            // A key no longer bound to our lease (overwritten with no lease: freed) is not
            // ours to resume, though it kept its create revision.
            Some(kv)
                if kv.create_revision == create_revision && kv.lease == self.session.lease_id() =>
            {
                kv.value
            }
            _ => return Err(self.not_leader()),
        };
        let mut entry = Entry::join(
            &self.session,
            &self.name,
            Queue::direct(&self.prefix),
            &self.key,
            &value,
            false,
        )
        .await?;
        if entry.my_rev() != create_revision {
            entry.abandon().await;
            return Err(self.not_leader());
        }
        entry.wait().await?;
        Ok(Leadership {
            name: self.name.clone(),
            held: entry.into_held(),
            value,
        })
    }

    /// The current leader, or [`Error::NoLeader`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn leader(&self) -> Result<Leader> {
        leader_of(self.session.store(), &self.name).await
    }

    /// A stream of leaders: the current one (if any), each proclaimed value, and each new
    /// leader. See [`observe`](Election::observe_with).
    pub fn observe(&self) -> Observe {
        observe_in(self.session.store().clone(), &self.name)
    }

    /// The current leader of election `name`, without a session.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn leader_with(client: &Client, name: &str) -> Result<Leader> {
        validate_name(name)?;
        leader_of(client.store(), name).await
    }

    /// Observe election `name` without a session.
    ///
    /// The stream yields the leader when it starts (if there is one), then every change:
    /// each value proclaimed by the leader (a proclamation of an unchanged value too, as
    /// Go's `Observe` does: it is a new write), or a new leader. It waits quietly while there
    /// is no leader ([`Observe::with_vacancies`] reports that too). It survives compaction and broken connections by reading the leader
    /// again, and never yields the same proclamation twice (a read again after a reconnect
    /// yields nothing new). It ends only when the backend refuses access (the user's roles
    /// do not cover the election): then [`Observe::take_error`] says why.
    ///
    /// Fails at once with [`Error::InvalidArgument`] for a bad name.
    pub fn observe_with(client: &Client, name: &str) -> Result<Observe> {
        validate_name(name)?;
        Ok(observe_in(client.store().clone(), name))
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader {
            name: self.name.clone(),
        }
    }
}

async fn leader_of(store: &Arc<dyn Store>, name: &str) -> Result<Leader> {
    let prefix = format!("{name}/");
    match head_member(store, &Queue::direct(&prefix)).await?.1 {
        Some(kv) => Ok(Leader::from_kv(kv)),
        None => Err(Error::NoLeader {
            name: name.to_string(),
        }),
    }
}

/// A stream of [`Leader`]s from [`Election::observe`]. Dropping it stops observing.
///
/// The observing task starts on the first poll, on the runtime that polls it. Failed reads
/// and watches are retried, except when the backend refuses access (the user's roles do
/// not cover the election, or its credentials are refused): then the stream ends, and
/// [`take_error`](Observe::take_error) says why.
pub struct Observe {
    start: Option<(Arc<dyn Store>, String)>,
    rx: Option<mpsc::Receiver<Observed>>,
    failure: ObserveFailure,
    /// Cancelled: the observing task stops (a closed coordinator), even while the stream
    /// is kept.
    stop: tokio_util::sync::CancellationToken,
}

impl Observe {
    /// This stream, whose observing task also stops when `token` is cancelled.
    pub(crate) fn stop_on(mut self, token: tokio_util::sync::CancellationToken) -> Observe {
        self.stop = token;
        self
    }

    /// Why the stream ended, if the backend refused access
    /// ([`Error::is_access_denied`]); `None` otherwise.
    pub fn take_error(&mut self) -> Option<Error> {
        self.failure.take()
    }

    /// While observing fails and is being retried (the backend unreachable, say), the
    /// message of the last failure; `None` while it works, and before the first poll. For
    /// telling users that changes may be late: the stream recovers by itself, and yields
    /// the leader as it is then.
    pub fn retrying(&self) -> Option<String> {
        self.failure.retrying()
    }

    /// This stream, reporting also when the election has no leader: when observing starts
    /// with none, and each time a leader leaves (resigns, its key is deleted, its lease
    /// expires) with no candidate waiting to follow it. See [`LeaderEvents`].
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> baton::Result<()> {
    /// use baton::LeaderEvent;
    /// use futures::StreamExt;
    ///
    /// let client = baton::Client::connect("mem://").await?;
    /// let mut events = baton::Election::observe_with(&client, "scheduler")?.with_vacancies();
    /// assert_eq!(events.next().await, Some(LeaderEvent::Vacant));
    ///
    /// let session = baton::Session::new(&client).await?;
    /// let election = baton::Election::new(&session, "scheduler")?;
    /// let leadership = election.campaign("10.0.0.7:8080").await?;
    /// let Some(LeaderEvent::Leader(leader)) = events.next().await else { panic!() };
    /// assert_eq!(leader.value, b"10.0.0.7:8080");
    ///
    /// leadership.resign().await?;
    /// assert_eq!(events.next().await, Some(LeaderEvent::Vacant));
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_vacancies(mut self) -> LeaderEvents {
        let failure = self.failure.clone();
        let events = futures::stream::poll_fn(move |cx| self.poll_event(cx));
        LeaderEvents::new(events.boxed(), failure)
    }

    /// The next event, starting the observing task on the first poll.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Observed>> {
        if let Some((store, name)) = self.start.take() {
            self.rx = Some(spawn_observer(
                store,
                &name,
                self.failure.clone(),
                self.stop.clone(),
            ));
        }
        match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }
}

/// What an election's observer reports, from a [`LeaderEvents`] stream: a leader, or that
/// there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaderEvent {
    /// The leader when observing starts, a new leader, or a new value proclaimed by the
    /// leader.
    Leader(Leader),
    /// The election has no leader: none when observing starts, or the leader left
    /// (resigned, its key was deleted, its lease expired) and no candidate was waiting to
    /// follow it. The next event is the next leader.
    ///
    /// On Redis, where candidates do not queue, a vacancy may also show between a leader
    /// that resigns and the candidate that takes over after it (for as long as that takes);
    /// on Redlock, also while no quorum of masters agrees on a leader.
    Vacant,
}

/// A stream of [`LeaderEvent`]s: the leaders an observe stream yields, and also each time
/// the election has no leader. From [`Observe::with_vacancies`],
/// [`RedisObserve::with_vacancies`](crate::redis::RedisObserve::with_vacancies) or
/// [`LeaderStream::with_vacancies`](crate::coordinator::LeaderStream::with_vacancies); it
/// starts, retries and ends as the stream it came from does. Dropping it stops observing.
///
/// It never yields the same event twice in a row: a vacancy is reported once, however long
/// it lasts, and a read again after a reconnect yields nothing new.
pub struct LeaderEvents {
    events: BoxStream<'static, Observed>,
    failure: ObserveFailure,
}

impl LeaderEvents {
    /// `events`, whose observing task leaves the error that stops it in `failure`.
    pub(crate) fn new(events: BoxStream<'static, Observed>, failure: ObserveFailure) -> Self {
        LeaderEvents { events, failure }
    }

    /// These events, ending when `token` is cancelled.
    pub(crate) fn until(self, token: tokio_util::sync::CancellationToken) -> LeaderEvents {
        let events = self.events.take_until(token.cancelled_owned()).boxed();
        LeaderEvents::new(events, self.failure)
    }

    /// The next event as the observing task sent it.
    pub(crate) fn poll_observed(&mut self, cx: &mut Context<'_>) -> Poll<Option<Observed>> {
        self.events.poll_next_unpin(cx)
    }

    /// Why the stream ended, if the backend refused access
    /// ([`Error::is_access_denied`]); `None` otherwise.
    pub fn take_error(&mut self) -> Option<Error> {
        self.failure.take()
    }

    /// While observing fails and is being retried (the backend unreachable, say), the
    /// message of the last failure; `None` while it works. For telling users that changes
    /// may be late: the stream recovers by itself.
    pub fn retrying(&self) -> Option<String> {
        self.failure.retrying()
    }
}

impl fmt::Debug for LeaderEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderEvents").finish_non_exhaustive()
    }
}

impl Stream for LeaderEvents {
    type Item = LeaderEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LeaderEvent>> {
        self.poll_observed(cx).map(|o| o.map(|o| o.event))
    }
}

/// An event as an observing task sends it.
pub(crate) struct Observed {
    pub(crate) event: LeaderEvent,
    /// The leader sent last before a vacancy, read again after it (on Redlock, a vacancy
    /// can be a read that found no quorum agreeing): news to a stream of events, a repeat
    /// to a stream of leaders.
    pub(crate) repeat: bool,
}

/// What an observing task sent last, so that it sends each change once.
pub(crate) struct LastSent<Id> {
    leader: Option<Id>,
    vacant: bool,
}

impl<Id: PartialEq> LastSent<Id> {
    pub(crate) fn new() -> Self {
        LastSent {
            leader: None,
            vacant: false,
        }
    }

    /// A read found the leader `id` with this `event`: what to send, if anything.
    pub(crate) fn leader(
        &mut self,
        id: Id,
        event: impl FnOnce() -> LeaderEvent,
    ) -> Option<Observed> {
        let same = self.leader.as_ref() == Some(&id);
        if same && !self.vacant {
            return None;
        }
        self.leader = Some(id);
        self.vacant = false;
        Some(Observed {
            event: event(),
            repeat: same,
        })
    }

    /// A read found no leader: what to send, if anything (a vacancy is sent once).
    pub(crate) fn vacancy(&mut self) -> Option<Observed> {
        if self.vacant {
            return None;
        }
        self.vacant = true;
        Some(Observed {
            event: LeaderEvent::Vacant,
            repeat: false,
        })
    }
}

/// Send `news`, if any, to an observe stream: false once its receiver is gone.
pub(crate) async fn send_news(tx: &mpsc::Sender<Observed>, news: Option<Observed>) -> bool {
    match news {
        Some(news) => tx.send(news).await.is_ok(),
        None => true,
    }
}

/// The leaders of a stream of events, skipping vacancies and the leaders read again after
/// one: the [`Stream`] of the observe streams that yield [`Leader`]s.
pub(crate) fn poll_leader(
    cx: &mut Context<'_>,
    mut next: impl FnMut(&mut Context<'_>) -> Poll<Option<Observed>>,
) -> Poll<Option<Leader>> {
    loop {
        match next(cx) {
            Poll::Ready(Some(Observed {
                event: LeaderEvent::Leader(leader),
                repeat: false,
            })) => return Poll::Ready(Some(leader)),
            Poll::Ready(Some(_)) => continue,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// Where an observing task leaves the error that stopped it (an access denied), for the
/// stream's `take_error`. It is set before the task drops its sender, so a reader that saw
/// the stream end finds it there. It also keeps, while observing fails and is retried, the
/// last failure, for the stream's `retrying`.
#[derive(Clone, Default)]
pub(crate) struct ObserveFailure(Arc<std::sync::Mutex<ObserveState>>);

#[derive(Default)]
struct ObserveState {
    denied: Option<Error>,
    retrying: Option<String>,
}

impl ObserveFailure {
    fn state(&self) -> std::sync::MutexGuard<'_, ObserveState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep `e` (the observing task is stopping because of it).
    pub(crate) fn set(&self, e: Error) {
        self.state().denied = Some(e);
    }

    /// The error kept, if any, leaving none.
    pub(crate) fn take(&self) -> Option<Error> {
        self.state().denied.take()
    }

    /// Observing failed with `e`, and will be tried again.
    pub(crate) fn failing(&self, e: &Error) {
        self.state().retrying = Some(e.to_string());
    }

    /// Observing works (again).
    pub(crate) fn working(&self) {
        self.state().retrying = None;
    }

    /// The last failure, while observing fails.
    pub(crate) fn retrying(&self) -> Option<String> {
        self.state().retrying.clone()
    }
}

impl fmt::Debug for Observe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observe").finish_non_exhaustive()
    }
}

impl Stream for Observe {
    type Item = Leader;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Leader>> {
        poll_leader(cx, |cx| self.poll_event(cx))
    }
}

fn observe_in(store: Arc<dyn Store>, name: &str) -> Observe {
    Observe {
        start: Some((store, name.to_string())),
        rx: None,
        failure: ObserveFailure::default(),
        stop: tokio_util::sync::CancellationToken::new(),
    }
}

fn spawn_observer(
    store: Arc<dyn Store>,
    name: &str,
    failure: ObserveFailure,
    stop: tokio_util::sync::CancellationToken,
) -> mpsc::Receiver<Observed> {
    let (tx, rx) = mpsc::channel(16);
    let prefix = format!("{name}/");
    let span = tracing::debug_span!("observe", election = %name);
    tokio::spawn(
        async move {
            tokio::select! {
                _ = tx.closed() => {}
                _ = stop.cancelled() => {}
                denied = observe_loop(&store, &prefix, &tx, &failure) => {
                    if let Some(e) = denied {
                        tracing::warn!(error = %e, "observing stopped: access denied");
                        failure.set(e);
                    }
                }
            }
        }
        .instrument(span),
    );
    rx
}

/// Send every leader change (and each vacancy) until the receiver goes; returns early only
/// with an access-denied error, which retrying cannot cure.
async fn observe_loop(
    store: &Arc<dyn Store>,
    prefix: &str,
    tx: &mpsc::Sender<Observed>,
    failure: &ObserveFailure,
) -> Option<Error> {
    let queue = Queue::direct(prefix);
    // The leader last sent: its key and revisions.
    let mut last = LastSent::<(Vec<u8>, Revision, Revision)>::new();
    let mut backoff = RETRY_MIN;
    loop {
        let (header, head) = match head_member(store, &queue).await {
            Ok(r) => r,
            Err(e) if e.is_access_denied() => return Some(e),
            Err(e) => {
                tracing::debug!(error = %e, "reading the leader failed; retrying");
                failure.failing(&e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        let watch = match &head {
            Some(kv) => {
                // The key too: one transaction can create two candidates' keys, with the
                // same revisions.
                let id = (kv.key.clone(), kv.create_revision, kv.mod_revision);
                let news = last.leader(id, || LeaderEvent::Leader(Leader::from_kv(kv.clone())));
                if !send_news(tx, news).await {
                    return None;
                }
                Watch::key(kv.key.clone()).from_revision(header + 1)
            }
            None => {
                if !send_news(tx, last.vacancy()).await {
                    return None;
                }
                Watch::prefix(prefix).from_revision(header + 1)
            }
        };
        let mut stream = match store.watch(watch).await {
            Ok(s) => s,
            Err(e) if e.is_access_denied() => return Some(e),
            Err(e) => {
                tracing::debug!(error = %e, "watching the election failed; retrying");
                failure.failing(&e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        failure.working();
        // Whether the watch ended without a change to read again for (closed, compacted or
        // broken): then read again after the backoff, or a watch that keeps ending at once
        // would be a tight loop (found by a review: ~500k reads a second).
        let mut ended = Some(Error::Unavailable("the watch ended".into()));
        'watch: while let Some(item) = stream.next().await {
            let resp = match item {
                Ok(resp) => resp,
                Err(e) => {
                    ended = Some(e);
                    break;
                }
            };
            backoff = RETRY_MIN;
            for ev in resp.events {
                match (&head, ev.kind) {
                    // Waiting for a first candidate: a put of a member makes one; read
                    // again. Other keys under the prefix (a nested name's, keys without a
                    // lease) make none.
                    (None, EventKind::Put) if queue.admits(&ev.kv) => {
                        ended = None;
                        break 'watch;
                    }
                    (None, _) => {}
                    (Some(_), EventKind::Delete) => {
                        ended = None;
                        break 'watch;
                    }
                    (Some(h), EventKind::Put) => {
                        // Re-created, or overwritten with another lease (or none: an
                        // operator's `etcdctl put`), when it may no longer count as a
                        // candidate: read the leader again.
                        if ev.kv.create_revision != h.create_revision || ev.kv.lease != h.lease {
                            ended = None;
                            break 'watch;
                        }
                        let id = (ev.kv.key.clone(), ev.kv.create_revision, ev.kv.mod_revision);
                        let kv = ev.kv;
                        let news = last.leader(id, || LeaderEvent::Leader(Leader::from_kv(kv)));
                        if !send_news(tx, news).await {
                            return None;
                        }
                    }
                }
            }
        }
        if let Some(e) = ended {
            tracing::debug!(error = %e, "the election's watch ended; reading again after a backoff");
            failure.failing(&e);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }
}

/// Proof that this session leads an election. Resign with
/// [`resign()`](Leadership::resign).
///
/// # Drop behaviour
///
/// Dropping it resigns in a task spawned on the current tokio runtime (compare-and-delete,
/// best effort). Without a runtime, or if that fails, or if the runtime shuts down first (a
/// leadership dropped as `#[tokio::main]` returns), the key stays until the session's lease
/// ends, and the next candidate leads then. Call [`resign()`](Leadership::resign) to see it
/// done.
#[must_use = "if unused the leadership is resigned at once"]
pub struct Leadership {
    name: String,
    held: Held,
    value: Vec<u8>,
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("election", &self.name)
            .field("key", &self.key())
            .field("fencing_token", &self.fencing_token())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl Leadership {
    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value we last proclaimed.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    held_accessors!("leadership");

    /// Publish a new value, only while we still lead (guarded by our key's create revision
    /// and its lease: see [`ownership_compares()`](Leadership::ownership_compares)).
    ///
    /// Fails with [`Error::NotLeader`] if we no longer lead (and marks the leadership lost),
    /// and at once with [`Error::InvalidArgument`] for a value over 1 MiB. A leader key that
    /// an operator overwrote with no lease (`etcdctl put KEY ""`: that frees the election)
    /// counts as lost: the value is not published, and the key is not bound to our lease
    /// again (that would make us a leader beside whoever was elected since).
    ///
    /// # Cancel safety
    ///
    /// The value may or may not have been published if the future is dropped.
    pub async fn proclaim(&mut self, value: impl Into<Vec<u8>>) -> Result<()> {
        let value = value.into();
        validate_value(&value)?;
        let put = TxnOp::put(
            self.key().as_bytes(),
            value.clone(),
            self.session().lease_id(),
        );
        match self.held.txn(Txn::new().and_then([put])).await {
            Ok(_) => {
                self.value = value;
                Ok(())
            }
            Err(Error::NotHeld { .. }) => Err(Error::NotLeader {
                name: self.name.clone(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Step down: delete our key if it is still ours, so the next candidate leads at once.
    ///
    /// Fails with [`Error::NotLeader`] if we had already lost the leadership.
    ///
    /// A key an operator freed by overwriting it with no lease (`etcdctl put KEY ""`, which
    /// keeps its create revision; another session may hold the leadership since) counts as lost:
    /// `NotLeader`, and the freed key is removed (it would never expire). A key bound to another
    /// lease is another owner's and left alone.
    ///
    /// A retryable error ([`Error::is_retryable`]: the store could not be reached, or its
    /// answer was lost) leaves the outcome unknown: the resignation is finished in the
    /// background, retried until the store answers (our key is deleted then if it is still
    /// ours), and the key expires with the session's lease at the latest. There is nothing
    /// to call again.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the resignation may or may not have happened; the key
    /// expires with the session's lease at the latest.
    pub async fn resign(self) -> Result<()> {
        let name = self.name;
        match self.held.release("resign").await {
            Err(Error::NotHeld { .. }) => Err(Error::NotLeader { name }),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{KeyRange, Txn, TxnOp};
    use futures::StreamExt;

    /// Candidates with a value leave no handoff mark: their join reads only their
    /// predecessor, so every candidate that waited at all would count as in a long queue, and
    /// each election that ever had a waiter would leave a key for as long as the session
    /// lived (found by review: 20 keys left for 20 names). Nothing is left once every leader
    /// has resigned. (Candidates with an empty value join as a mutex's waiters do, and use
    /// marks in long queues as they do.)
    #[tokio::test]
    async fn contended_elections_leave_no_keys() {
        use crate::store::Range;
        let client = crate::Client::memory();
        let a = Session::new(&client).await.unwrap();
        let b = Session::new(&client).await.unwrap();
        for i in 0..20 {
            let name = format!("jobs/{i}");
            let first = Election::new(&a, &name)
                .unwrap()
                .campaign("a")
                .await
                .unwrap();
            let eb = Election::new(&b, &name).unwrap();
            let second = tokio::spawn(async move { eb.campaign("b").await });
            tokio::time::sleep(Duration::from_millis(20)).await;
            first.resign().await.unwrap();
            second.await.unwrap().unwrap().resign().await.unwrap();
        }
        let left = client.store().range(Range::prefix("jobs")).await.unwrap();
        assert!(left.kvs.is_empty(), "{:?}", left.kvs);
    }

    /// The observer's watch on the leader's key keeps ending at once (closed cleanly, or
    /// compacted): it reads again after a backoff, not in a tight loop (found by a review:
    /// ~500k reads a second, and a current-thread runtime hung).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_observer_whose_watch_keeps_ending_backs_off() {
        use std::sync::atomic::Ordering;
        for compacted in [false, true] {
            let store = Arc::new(crate::store::slow::SlowWatches::new(
                "mem",
                Duration::ZERO,
                Duration::ZERO,
            ));
            let client = crate::Client::from_arc(store.clone());
            let session = Session::new(&client).await.unwrap();
            let leading = Election::new(&session, "spin")
                .unwrap()
                .campaign("A")
                .await
                .unwrap();
            *store.end_watch_on.lock().unwrap() =
                Some((leading.key().as_bytes().to_vec(), compacted));
            let mut observe = Election::observe_with(&client, "spin").unwrap();
            let before = store.ranges.load(Ordering::Relaxed);
            let first = tokio::time::timeout(Duration::from_secs(1), observe.next()).await;
            assert_eq!(first.unwrap().unwrap().value, b"A");
            assert!(
                tokio::time::timeout(Duration::from_secs(1), observe.next())
                    .await
                    .is_err(),
                "no change, and nothing to tell"
            );
            let reads = store.ranges.load(Ordering::Relaxed) - before;
            assert!(reads < 30, "compacted {compacted}: {reads} reads in 1 s");
            leading.resign().await.unwrap();
        }
    }

    /// A resumed lease's leader key, adopted by `campaign()` with another value, then
    /// overwritten with no lease (an operator's `etcdctl put`: that frees the election)
    /// just before the campaign writes its value into it: the write does not bind the key
    /// to our lease again (found by review: it compared only the create revision, which
    /// the overwrite keeps, and the campaign led with that key back in the queue, at its
    /// old place, ahead of anyone elected since). The campaign fails with `NotLeader`; the
    /// key keeps no lease.
    #[tokio::test]
    async fn a_campaigns_value_write_does_not_bind_a_freed_key_to_our_lease_again() {
        use crate::store::{Compare, CompareOp, Range};
        let store = Arc::new(crate::store::slow::SlowWatches::new(
            "mem",
            Duration::ZERO,
            Duration::ZERO,
        ));
        let client = crate::Client::from_arc(store.clone());
        let old = Session::new(&client).await.unwrap();
        let lease = old.lease_id();
        let l = Election::new(&old, "e")
            .unwrap()
            .campaign("A")
            .await
            .unwrap();
        let (key, rev) = (l.key().to_string(), l.fencing_token());
        std::mem::forget(l);
        old.orphan();
        drop(old);
        let s = Session::builder(&client)
            .with_lease(lease)
            .build()
            .await
            .unwrap();
        let write = Compare::create_revision(key.as_bytes(), CompareOp::Equal, rev);
        let free = Txn::new().and_then([TxnOp::put(key.as_bytes(), "A", 0)]);
        *store.before_txn_comparing.lock().unwrap() = Some((write, free));
        let r = Election::new(&s, "e").unwrap().campaign("B").await;
        assert!(
            store.before_txn_comparing.lock().unwrap().is_none(),
            "no value write"
        );
        let r = r.map(|l| (l.is_lost(), l.fencing_token()));
        assert!(matches!(r, Err(Error::NotLeader { .. })), "{r:?}");
        let kvs = client.store().range(Range::key(key.as_bytes())).await;
        for kv in kvs.unwrap().kvs {
            assert_eq!(kv.lease, 0, "bound again: {kv:?}");
        }
    }

    /// The leader's key overwritten without its lease (an operator's `etcdctl put`) no
    /// longer counts as a candidate (`leader()` says so): an observer reads again and says
    /// the same, instead of reporting the overwrite as the leader's new value.
    #[tokio::test]
    async fn an_observer_reads_again_when_the_leaders_key_loses_its_lease() {
        let client = crate::Client::connect("mem://").await.unwrap();
        let session = Session::new(&client).await.unwrap();
        let leading = Election::new(&session, "lease")
            .unwrap()
            .campaign("A")
            .await
            .unwrap();
        let mut observe = Election::observe_with(&client, "lease").unwrap();
        assert_eq!(next_within(&mut observe).await.unwrap().value, b"A");
        client
            .store()
            .put(leading.key().as_bytes(), b"X", 0)
            .await
            .unwrap();
        let leader = Election::leader_with(&client, "lease").await;
        assert!(matches!(leader, Err(Error::NoLeader { .. })), "{leader:?}");
        let seen = next_within(&mut observe).await;
        assert!(
            seen.as_ref().is_none_or(|l| l.value != b"X"),
            "an observer reported a key that is no candidate: {seen:?}"
        );
        std::mem::forget(leading);
    }

    /// An observer of a vacant election `svc` while the election `svc/db` (a nested name,
    /// independent of `svc`) is busy: the nested leader's proclaims are no candidates of
    /// `svc`, and must not send the observer to read the queue (and watch again) each time.
    #[tokio::test]
    async fn a_vacant_observer_does_not_reread_for_a_nested_names_writes() {
        use std::sync::atomic::Ordering;
        let store = Arc::new(crate::store::slow::SlowWatches::new(
            "mem",
            Duration::ZERO,
            Duration::ZERO,
        ));
        let client = crate::Client::from_arc(store.clone());
        let session = Session::new(&client).await.unwrap();
        let mut nested = Election::new(&session, "svc/db")
            .unwrap()
            .campaign("db-0")
            .await
            .unwrap();
        let mut obs = Election::observe_with(&client, "svc")
            .unwrap()
            .with_vacancies();
        let first = tokio::time::timeout(Duration::from_secs(1), obs.next()).await;
        assert_eq!(first.unwrap(), Some(LeaderEvent::Vacant));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = store.queue_reads.load(Ordering::Relaxed);
        for i in 1..=100 {
            nested.proclaim(format!("db-{i}")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reads = store.queue_reads.load(Ordering::Relaxed) - before;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), obs.next())
                .await
                .is_err(),
            "no news for svc"
        );
        assert!(
            reads < 10,
            "{reads} reads of svc's queue for 100 writes under svc/db/"
        );
        nested.resign().await.unwrap();
    }

    /// While vacant, an observer re-reads only for a member's put: it still sees a
    /// candidate whose key existed under the prefix without a lease and is then bound to
    /// one (`etcdctl put --lease`), and a Go candidate's key (`NAME/<lease hex>`).
    #[tokio::test]
    async fn a_vacant_observer_sees_a_key_rebound_to_a_lease_and_a_go_candidate() {
        let client = crate::Client::memory();
        let store = client.store().clone();
        let session = Session::new(&client).await.unwrap();
        let lease = session.lease_id();
        let mut obs = Election::observe_with(&client, "rb")
            .unwrap()
            .with_vacancies();
        let first = tokio::time::timeout(Duration::from_secs(1), obs.next()).await;
        assert_eq!(first.unwrap(), Some(LeaderEvent::Vacant));
        let key = format!("rb/{lease:x}");
        store.put(key.as_bytes(), b"bare", 0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.put(key.as_bytes(), b"leased", lease).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), obs.next()).await;
        match got {
            Ok(Some(LeaderEvent::Leader(l))) => assert_eq!(l.value, b"leased"),
            other => panic!("{other:?}"),
        }
        store.delete(KeyRange::key(key.as_bytes())).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), obs.next()).await;
        assert_eq!(got.unwrap(), Some(LeaderEvent::Vacant));
        store.put(b"rb/abc123", b"go", lease).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), obs.next()).await;
        match got {
            Ok(Some(LeaderEvent::Leader(l))) => assert_eq!(l.value, b"go"),
            other => panic!("{other:?}"),
        }
    }

    async fn next_within(o: &mut Observe) -> Option<Leader> {
        tokio::time::timeout(Duration::from_millis(300), o.next())
            .await
            .ok()
            .flatten()
    }

    /// A proclamation of an unchanged value is a new write, and is observed (as with Go's
    /// `Observe`); a re-read yields nothing new.
    #[tokio::test]
    async fn observe_yields_each_proclamation_even_of_the_same_value() {
        let client = Client::memory();
        let session = Session::new(&client).await.unwrap();
        let election = Election::new(&session, "e").unwrap();
        let mut leading = election.campaign("A").await.unwrap();
        let mut observed = election.observe();
        let first = next_within(&mut observed)
            .await
            .expect("the leader at the start");
        leading.proclaim("A").await.unwrap();
        let again = next_within(&mut observed)
            .await
            .expect("the same value proclaimed again");
        assert_eq!(
            (first.value.as_slice(), again.value.as_slice()),
            (&b"A"[..], &b"A"[..])
        );
        assert!(again.mod_revision > first.mod_revision);
        assert!(
            next_within(&mut observed).await.is_none(),
            "yielded with no new write"
        );
    }

    /// A value over the size limit is refused before any call, by campaign and proclaim
    /// alike (the embedded store would take it; etcd would not).
    #[tokio::test]
    async fn oversized_values_are_refused() {
        let client = Client::memory();
        let session = Session::new(&client).await.unwrap();
        let election = Election::new(&session, "big").unwrap();
        let huge = vec![b'x'; crate::names::MAX_VALUE_LEN + 1];
        let err = election.campaign(huge.clone()).await.unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        let mut leading = election.campaign("small").await.unwrap();
        let err = leading.proclaim(huge).await.unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        assert_eq!(election.leader().await.unwrap().value, b"small");
    }

    /// Two candidates' keys created by one transaction share their revisions: when the first
    /// goes, the second is a new leader, and the observer reports it.
    #[tokio::test]
    async fn observe_tells_apart_keys_with_the_same_revisions() {
        let client = Client::memory();
        let store = client.store().clone();
        // Candidates' keys are bound to a lease (keys without one are no candidates).
        let session = Session::new(&client).await.unwrap();
        let lease = session.lease_id();
        store
            .txn(Txn::new().and_then([
                TxnOp::put("t/1", "one", lease),
                TxnOp::put("t/2", "two", lease),
            ]))
            .await
            .unwrap();
        let mut observe = Election::observe_with(&client, "t").unwrap();
        assert_eq!(next(&mut observe).await.value, b"one");
        store.delete(KeyRange::key("t/1")).await.unwrap();
        assert_eq!(next(&mut observe).await.value, b"two");
    }

    async fn next(observe: &mut Observe) -> crate::Leader {
        tokio::time::timeout(std::time::Duration::from_secs(5), observe.next())
            .await
            .expect("no leader observed")
            .expect("the observation ended")
    }

    /// A leader proclaims more times than the shared watch's buffer holds while a candidate
    /// of the same client waits behind it: the proclaims (overwrites bound to a lease, which
    /// that watch now hears) wake nobody and lose nothing; the candidate leads at once after
    /// the resignation (from the review of entry 42).
    #[tokio::test]
    async fn a_proclaim_flood_wakes_nobody_and_loses_nothing() {
        use std::time::Duration;
        let client = crate::Client::memory();
        let (s1, s2) = (
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
        );
        // Warm: the leader's hold is watched through the client's shared watch too.
        for _ in 0..2 {
            let e = Election::new(&s1, "proclaims").unwrap();
            e.campaign("w").await.unwrap().resign().await.unwrap();
        }
        let mut l = Election::new(&s1, "proclaims")
            .unwrap()
            .campaign("a")
            .await
            .unwrap();
        let e2 = Election::new(&s2, "proclaims").unwrap();
        let w = tokio::spawn(async move { e2.campaign("b").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = client.stats().wakeups;
        for i in 0..5000 {
            l.proclaim(format!("v{i}")).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!l.is_lost(), "{:?}", l.lost_reason());
        let woken = client.stats().wakeups - before;
        assert!(woken <= 1, "{woken} wake-ups from proclaims");
        assert!(!w.is_finished());
        l.resign().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(3), w)
            .await
            .expect("the candidate did not lead after the resignation")
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!got.is_lost());
    }
}

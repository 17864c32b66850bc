//! Fast wake-ups: one pub/sub connection per Redis node, shared by every waiter and observer
//! of the client.
//!
//! Release, campaign and proclaim scripts `PUBLISH` on the lock's channel. Each node's
//! subscriber task subscribes to the channels someone waits on, and turns each message into a
//! wake-up of every local waiter and observer of that lock (each waiter then tries once; one
//! wins). A channel stays subscribed for [`LINGER`] after its last listener leaves, so that
//! the waits of a contended lock do not each pay a `SUBSCRIBE` round trip. New channels go in
//! batches: the subscriber task takes every command queued while it was busy, and sends the
//! new channels as one `SUBSCRIBE` (of at most [`BATCH`] channels each), so a crowd of new
//! listeners costs a few round trips, not one each. Messages can be
//! lost (a reconnect, a foreign client that does not publish, a holder that crashed), so
//! every wait also has a bounded, jittered fallback poll.
//!
//! A channel the server refuses to the user (its ACL lacks the channel: Redis 7's default
//! `acl-pubsub-default resetchannels`, or `&` patterns that miss `baton:wake:*`) is left
//! out, with one warning per client: its waiters wait by the fallback poll alone, and the
//! other channels are not affected (one refused channel refuses a whole `SUBSCRIBE`
//! command, so the subscriber then splits the batch in halves until the refused channels
//! stand alone: a few round trips, not one per channel).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tracing::Instrument;

use super::node::Node;

const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// How long a channel stays subscribed after its last listener leaves. A lock under
/// contention is waited on again and again: without this, every wait would pay a
/// `SUBSCRIBE` round trip before it can sleep, and every acquisition an `UNSUBSCRIBE`.
const LINGER: Duration = Duration::from_secs(5);

/// The most channels one `SUBSCRIBE` or `UNSUBSCRIBE` carries, and the most commands a
/// subscriber task takes in one go on a live connection: a batch is answered well within the
/// request timeout, and the messages that arrive meanwhile do not wait long behind it.
const BATCH: usize = 1000;

/// The wake-ups of one channel.
#[derive(Debug, Default)]
pub(crate) struct Channel {
    /// Every waiter per message (`notify_waiters`, which stores no permit: with
    /// subscriptions that outlive their waits, a stored permit would cut a later wait short
    /// and, measured, halved the contended rate).
    pub(crate) waiters: Notify,
    /// Every observer per message (`notify_waiters`).
    pub(crate) observers: Notify,
    /// The last payload delivered, and the sources (node indices, or [`LOCAL`]) that
    /// delivered it, so that one event published on N Redlock nodes wakes once. The same
    /// payload again from a source that already delivered it is a new event (a `lock()`
    /// that took again with its token after a failed attempt publishes `TOKEN:0` twice:
    /// once for the failed attempt's cleanup, once for its unlock).
    last: StdMutex<Option<(Vec<u8>, Vec<usize>)>>,
    /// FIFO waiters of this process, by token: a hand-off message (`g:TOKEN:FENCE:SINCE`,
    /// see `handoff.lua`) goes to its waiter alone, and wakes nobody else.
    grants: StdMutex<HashMap<String, oneshot::Sender<Grant>>>,
}

/// The lock, handed to a FIFO waiter by a release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    /// The fencing token of the grant.
    pub(crate) fence: i64,
    /// How long (ms, rounded down) after the waiter's last refresh of its place the lock
    /// was handed to it.
    pub(crate) since_ms: u64,
}

/// `g:TOKEN:FENCE:SINCE` as a token and a grant.
fn parse_grant(payload: &[u8]) -> Option<(&str, Grant)> {
    let text = std::str::from_utf8(payload).ok()?.strip_prefix("g:")?;
    let mut parts = text.split(':');
    let (token, fence, since) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some((
        token,
        Grant {
            fence: fence.parse().ok()?,
            since_ms: since.parse().ok()?,
        },
    ))
}

/// The source of a wake-up delivered by this process itself ([`Hub::wake_local`]).
const LOCAL: usize = usize::MAX;

impl Channel {
    fn deliver(&self, source: usize, payload: Option<&[u8]>) {
        if let Some(p) = payload {
            {
                let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                let copy = match last.as_mut() {
                    Some((q, from)) if q.as_slice() == p && !from.contains(&source) => {
                        from.push(source);
                        true
                    }
                    _ => false,
                };
                if copy {
                    // The same event from another Redlock master: waiters woke once, but an
                    // observer woken by the first master may have read before the event was
                    // on a quorum. Let it read again.
                    if parse_grant(p).is_none() {
                        self.observers.notify_waiters();
                    }
                    return;
                }
                *last = Some((p.to_vec(), vec![source]));
            }
            if let Some((token, grant)) = parse_grant(p) {
                let waiter = self
                    .grants
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(token);
                if let Some(tx) = waiter {
                    let _ = tx.send(grant);
                }
                return;
            }
        }
        self.waiters.notify_waiters();
        self.observers.notify_waiters();
    }

    /// Listen for a hand-off of the lock to `token`, until the returned wait is dropped.
    pub(crate) fn expect_grant(self: &Arc<Self>, token: &str) -> GrantWait {
        let (tx, rx) = oneshot::channel();
        self.grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), tx);
        GrantWait {
            chan: self.clone(),
            token: token.to_string(),
            rx,
        }
    }
}

/// Waiting for a hand-off to one token; see [`Channel::expect_grant`].
#[derive(Debug)]
pub(crate) struct GrantWait {
    chan: Arc<Channel>,
    token: String,
    rx: oneshot::Receiver<Grant>,
}

impl GrantWait {
    /// The grant, once it comes.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a grant that came stays until taken.
    pub(crate) async fn granted(&mut self) -> Grant {
        match (&mut self.rx).await {
            Ok(grant) => grant,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for GrantWait {
    fn drop(&mut self) {
        self.chan
            .grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.token);
    }
}

enum Cmd {
    /// Subscribe; the reply is true once subscribed, false if not (not connected, or the
    /// server refused the channel).
    Subscribe(String, oneshot::Sender<bool>),
    Unsubscribe(String),
}

/// The subscriber tasks of a client, and the channels someone listens on.
#[derive(Debug)]
pub(crate) struct Hub {
    inner: Arc<HubInner>,
}

/// A channel someone listens on, or listened on less than [`LINGER`] ago.
#[derive(Debug)]
struct Entry {
    chan: Arc<Channel>,
    /// Live [`Subscription`]s.
    users: usize,
    /// True once a node confirmed the subscription: a new listener need not wait.
    confirmed: bool,
    /// When `users` last dropped to 0.
    idle_since: Option<Instant>,
}

#[derive(Debug)]
struct HubInner {
    nodes: Vec<Arc<Node>>,
    channels: StdMutex<HashMap<String, Entry>>,
    /// The subscriber tasks (one per node) and the reaper, once started.
    tasks: StdMutex<Option<Tasks>>,
    /// How long a new subscriber waits for a node to confirm its subscription.
    confirm_within: Duration,
    /// True once a node refused a channel to the user (its ACL): warned once.
    refused: AtomicBool,
}

/// The tasks of a hub. They run on the runtime of the first subscription, and end if that
/// runtime is shut down (a client shared between runtimes): the next subscription starts
/// new ones on its own runtime.
#[derive(Debug)]
struct Tasks {
    /// One per node; closed once its subscriber task has ended.
    subscribers: Vec<mpsc::UnboundedSender<Cmd>>,
    reaper: tokio::task::JoinHandle<()>,
}

impl Tasks {
    fn alive(&self) -> bool {
        !self.reaper.is_finished() && self.subscribers.iter().all(|s| !s.is_closed())
    }
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Subscribe(c, _) => write!(f, "Subscribe({c})"),
            Cmd::Unsubscribe(c) => write!(f, "Unsubscribe({c})"),
        }
    }
}

impl Hub {
    pub(crate) fn new(nodes: Vec<Arc<Node>>, confirm_within: Duration) -> Hub {
        Hub {
            inner: Arc::new(HubInner {
                nodes,
                channels: StdMutex::new(HashMap::new()),
                tasks: StdMutex::new(None),
                confirm_within,
                refused: AtomicBool::new(false),
            }),
        }
    }

    /// True if someone here listens on `channel`, or did less than [`LINGER`] ago: the lock
    /// is (or was just) contended.
    pub(crate) fn is_subscribed(&self, channel: &str) -> bool {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(channel)
    }

    /// True if a node confirmed the subscription to `channel` (and it has not been
    /// unconfirmed since): its messages reach this process.
    pub(crate) fn is_confirmed(&self, channel: &str) -> bool {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(channel)
            .is_some_and(|e| e.confirmed)
    }

    /// Wake this process's waiters and observers of `channel` now (a local release), without
    /// waiting for the message to come back from Redis.
    pub(crate) fn wake_local(&self, channel: &str, payload: &[u8]) {
        self.inner.deliver(channel, LOCAL, Some(payload));
    }

    /// Listen on `channel` until the returned subscription is dropped.
    ///
    /// Returns once at least one node confirmed the subscription, every node answered, or
    /// the confirmation time passed; a message published after a confirmed subscription is
    /// never missed (and the fallback poll covers the rest).
    pub(crate) async fn subscribe(&self, channel: &str) -> Subscription {
        // First: tasks restarted (their runtime was shut down) unconfirm every channel.
        let tasks = self.inner.tasks();
        let (chan, confirmed) = {
            let mut map = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let entry = map.entry(channel.to_string()).or_insert_with(|| Entry {
                chan: Arc::new(Channel::default()),
                users: 0,
                confirmed: false,
                idle_since: None,
            });
            entry.users += 1;
            entry.idle_since = None;
            (entry.chan.clone(), entry.confirmed)
        };
        let sub = Subscription {
            hub: self.inner.clone(),
            name: channel.to_string(),
            chan,
        };
        if confirmed {
            // Still subscribed (a listener left less than LINGER ago): nothing to wait for.
            return sub;
        }
        let mut replies = crate::race::Race::new();
        for task in tasks {
            let (tx, rx) = oneshot::channel();
            if task.send(Cmd::Subscribe(channel.to_string(), tx)).is_ok() {
                replies.push(rx);
            }
        }
        let confirmed = async {
            while let Some(r) = replies.next().await {
                if r == Ok(true) {
                    return true;
                }
            }
            false
        };
        if let Ok(true) = tokio::time::timeout(self.inner.confirm_within, confirmed).await {
            let mut map = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = map.get_mut(channel) {
                entry.confirmed = true;
            }
        }
        sub
    }
}

impl HubInner {
    /// The subscriber tasks' command senders, starting the tasks on the current runtime if
    /// they are not running (first use, or their runtime was shut down).
    fn tasks(self: &Arc<Self>) -> Vec<mpsc::UnboundedSender<Cmd>> {
        if let Some(t) = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|t| t.alive())
        {
            return t.subscribers.clone();
        }
        // The channels, then the tasks, as `reap_idle` locks them.
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tasks.as_ref().filter(|t| t.alive()) {
            return t.subscribers.clone();
        }
        if let Some(old) = tasks.take() {
            tracing::debug!("subscriber tasks ended (their runtime was shut down); restarting");
            old.reaper.abort();
        }
        // The new subscribers know no channel yet: subscribe them to every channel
        // listened on, and make new listeners wait for a confirmation.
        let names: Vec<String> = map.keys().cloned().collect();
        for entry in map.values_mut() {
            entry.confirmed = false;
        }
        let reaper = tokio::spawn(
            reap(Arc::downgrade(self)).instrument(tracing::debug_span!("subscription-reaper")),
        );
        let subscribers: Vec<_> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let (tx, rx) = mpsc::unbounded_channel();
                for name in &names {
                    let (reply, _) = oneshot::channel();
                    let _ = tx.send(Cmd::Subscribe(name.clone(), reply));
                }
                let span = tracing::debug_span!("subscriber", node = %node.display);
                tokio::spawn(
                    subscriber(node.clone(), i, Arc::downgrade(self), rx).instrument(span),
                );
                tx
            })
            .collect();
        *tasks = Some(Tasks {
            subscribers: subscribers.clone(),
            reaper,
        });
        drop(tasks);
        drop(map);
        subscribers
    }

    fn channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|e| e.chan.clone())
    }

    /// A node's subscription was lost: listeners must wait for a new confirmation.
    fn unconfirm_all(&self) {
        for entry in self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values_mut()
        {
            entry.confirmed = false;
        }
    }

    fn deliver(&self, name: &str, source: usize, payload: Option<&[u8]>) {
        if let Some(chan) = self.channel(name) {
            chan.deliver(source, payload);
        }
    }

    /// A node refused `channel` to the user (`e`): its waiters wait by the fallback poll.
    /// Warns once per client.
    fn refused(&self, channel: &str, e: &redis::RedisError) {
        if self.refused.swap(true, Ordering::Relaxed) {
            tracing::debug!(channel, error = %e, "the server refused the wake-up channel");
        } else {
            tracing::warn!(
                channel,
                error = %e,
                "the server refuses this user Baton's wake-up channels (its ACL needs \
                 &baton:wake:*; Redis 7 grants no channel by default): waiters wait by the \
                 fallback poll, without wake-ups"
            );
        }
    }
}

/// True if the server refused a command because the user's ACL does not allow it (here: a
/// channel).
fn is_refused(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM") || e.to_string().contains("NOPERM")
}

/// Listening on one channel. Dropping it stops listening (when no one else listens).
#[derive(Debug)]
pub(crate) struct Subscription {
    hub: Arc<HubInner>,
    name: String,
    chan: Arc<Channel>,
}

impl Subscription {
    pub(crate) fn channel(&self) -> &Arc<Channel> {
        &self.chan
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.hub.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = map.get_mut(&self.name) {
            entry.users = entry.users.saturating_sub(1);
            if entry.users == 0 {
                // Unsubscribed by `reap` once idle for LINGER.
                entry.idle_since = Some(Instant::now());
            }
        }
    }
}

/// Every LINGER, unsubscribe the channels nobody has listened on for LINGER. Ends with
/// the hub.
async fn reap(hub: Weak<HubInner>) {
    loop {
        tokio::time::sleep(LINGER).await;
        let Some(hub) = hub.upgrade() else {
            return;
        };
        reap_idle(&hub);
    }
}

/// Unsubscribe the channels nobody has listened on for LINGER. The commands are sent while
/// the map is locked: a `subscribe` of the same channel right after then sends its
/// `Subscribe` after our `Unsubscribe`, and the subscriber task subscribes again. Sent after
/// the lock, our `Unsubscribe` could follow that `Subscribe` (which the task would answer
/// "already subscribed"), and the channel would stay marked confirmed but dead.
fn reap_idle(hub: &HubInner) {
    let mut map = hub.channels.lock().unwrap_or_else(|e| e.into_inner());
    let idle: Vec<String> = map
        .iter()
        .filter(|(_, e)| e.users == 0 && e.idle_since.is_some_and(|t| t.elapsed() >= LINGER))
        .map(|(name, _)| name.clone())
        .collect();
    if idle.is_empty() {
        return;
    }
    let tasks: Vec<mpsc::UnboundedSender<Cmd>> = hub
        .tasks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|t| t.subscribers.clone())
        .unwrap_or_default();
    for name in idle {
        map.remove(&name);
        // Unbounded sends: they never wait, so holding the lock costs nothing.
        for task in &tasks {
            let _ = task.send(Cmd::Unsubscribe(name.clone()));
        }
    }
}

/// Count a command while not connected; a new subscriber is told "not confirmed" at once.
fn apply_offline(
    subs: &mut HashMap<String, usize>,
    cmd: Cmd,
    pending: Option<&mut Vec<(String, oneshot::Sender<bool>)>>,
) {
    match cmd {
        Cmd::Subscribe(ch, reply) => {
            subs.insert(ch.clone(), 1);
            match pending {
                Some(p) => p.push((ch, reply)),
                None => {
                    let _ = reply.send(false);
                }
            }
        }
        Cmd::Unsubscribe(ch) => {
            subs.remove(&ch);
        }
    }
}

/// Subscribe `sink` to `channels`, in commands of at most [`BATCH`] channels, each answered
/// within `timeout`. One channel the ACL refuses refuses a whole `SUBSCRIBE`: a refused
/// command is split in halves until the refused channels stand alone, and those are added to
/// `refused`, which keeps them even if the caller gives up on this future. The commands of
/// each round of splitting go together (pipelined): N channels cost about log2(N) round
/// trips even if every one is refused (a user without channel rights). Once this returns
/// `Ok`, every other channel is subscribed. Fails with the first other error, or if a round
/// is not answered in time: the connection is then of no use.
///
/// # Cancel safety
///
/// Not cancel safe: dropped midway, some channels are subscribed and others not (`refused`
/// still holds the refused channels found so far).
async fn subscribe_all<S: AsRef<str>>(
    sink: &redis::aio::PubSubSink,
    channels: &[S],
    timeout: Duration,
    refused: &mut Vec<(String, redis::RedisError)>,
) -> Result<(), redis::RedisError> {
    let mut round: Vec<Vec<&str>> = channels
        .chunks(BATCH)
        .map(|c| c.iter().map(AsRef::as_ref).collect())
        .collect();
    while !round.is_empty() {
        let sent = futures::future::join_all(round.iter().map(|batch| {
            // Clones of one sink share its connection: the commands go in order.
            let mut sink = sink.clone();
            async move { sink.subscribe(batch).await }
        }));
        let answers = tokio::time::timeout(timeout, sent).await.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "SUBSCRIBE not answered in time",
            )
        })?;
        let mut next = Vec::new();
        for (batch, answer) in round.into_iter().zip(answers) {
            match answer {
                Ok(()) => {}
                Err(e) if is_refused(&e) && batch.len() == 1 => {
                    refused.push((batch[0].to_string(), e));
                }
                Err(e) if is_refused(&e) => {
                    let (a, b) = batch.split_at(batch.len() / 2);
                    next.push(a.to_vec());
                    next.push(b.to_vec());
                }
                Err(e) => return Err(e),
            }
        }
        round = next;
    }
    Ok(())
}

/// Apply `cmds` on a live connection, in their order: each run of `Subscribe`s as few
/// `SUBSCRIBE` commands (see [`subscribe_all`]), each run of `Unsubscribe`s as few
/// `UNSUBSCRIBE` commands. Keeping the order keeps an `Unsubscribe` sent before a
/// `Subscribe` of the same channel before it (see [`reap_idle`]).
///
/// Each new listener is told whether its channel is subscribed. A channel the server refuses
/// to the user costs only its own listeners: they poll, the connection serves the others on,
/// and the next listener asks again (the ACL may have changed). Returns false if the
/// connection failed: the listeners not answered yet are told "not confirmed", and the
/// commands not applied yet are counted as while not connected (the reconnect subscribes
/// the channels).
///
/// # Cancel safety
///
/// Not cancel safe: dropped midway, the commands not applied yet are lost.
async fn apply_live(
    node: &Node,
    hub: &Weak<HubInner>,
    sink: &mut redis::aio::PubSubSink,
    subs: &mut HashMap<String, usize>,
    cmds: Vec<Cmd>,
) -> bool {
    let mut cmds = cmds.into_iter().peekable();
    while let Some(cmd) = cmds.next() {
        match cmd {
            Cmd::Subscribe(ch, reply) => {
                let mut run = vec![(ch, reply)];
                while let Some(Cmd::Subscribe(ch, reply)) =
                    cmds.next_if(|c| matches!(c, Cmd::Subscribe(..)))
                {
                    run.push((ch, reply));
                }
                // The channels not subscribed yet, and who waits for each.
                let mut new: Vec<String> = Vec::new();
                let mut waiting: HashMap<String, Vec<oneshot::Sender<bool>>> = HashMap::new();
                for (ch, reply) in run {
                    if let Some(w) = waiting.get_mut(&ch) {
                        w.push(reply);
                    } else if subs.contains_key(&ch) {
                        let _ = reply.send(true);
                    } else {
                        subs.insert(ch.clone(), 1);
                        new.push(ch.clone());
                        waiting.insert(ch, vec![reply]);
                    }
                }
                let mut refused = Vec::new();
                let sent = subscribe_all(sink, &new, node.request_timeout, &mut refused).await;
                for (ch, e) in refused {
                    subs.remove(&ch);
                    if let Some(hub) = hub.upgrade() {
                        hub.refused(&ch, &e);
                    }
                    for reply in waiting.remove(&ch).unwrap_or_default() {
                        let _ = reply.send(false);
                    }
                }
                let ok = match sent {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot subscribe; reconnecting");
                        false
                    }
                };
                for reply in waiting.into_values().flatten() {
                    let _ = reply.send(ok);
                }
                if !ok {
                    for cmd in cmds {
                        apply_offline(subs, cmd, None);
                    }
                    return false;
                }
            }
            Cmd::Unsubscribe(ch) => {
                let mut gone: Vec<String> = Vec::new();
                let mut next = Some(ch);
                while let Some(ch) = next {
                    if subs.remove(&ch).is_some() {
                        gone.push(ch);
                    }
                    next = match cmds.next_if(|c| matches!(c, Cmd::Unsubscribe(_))) {
                        Some(Cmd::Unsubscribe(ch)) => Some(ch),
                        _ => None,
                    };
                }
                for batch in gone.chunks(BATCH) {
                    // A failure leaves a subscription nobody listens to, which only costs
                    // its messages (ignored); a lost connection ends the stream.
                    let _ =
                        tokio::time::timeout(node.request_timeout, sink.unsubscribe(batch)).await;
                }
            }
        }
    }
    true
}

/// The subscriber of one node: connects while anyone listens, re-subscribes after a
/// reconnect (and then wakes everyone, since messages may have been lost), and routes
/// messages to the hub. Ends when the hub is dropped.
async fn subscriber(
    node: Arc<Node>,
    index: usize,
    hub: Weak<HubInner>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut subs: HashMap<String, usize> = HashMap::new();
    let mut pending: Vec<(String, oneshot::Sender<bool>)> = Vec::new();
    let mut backoff = RECONNECT_MIN;
    loop {
        while subs.is_empty() {
            match rx.recv().await {
                None => return,
                Some(cmd) => apply_offline(&mut subs, cmd, Some(&mut pending)),
            }
        }
        // The channels the ACL refused, found so far: left out even if the whole step
        // does not finish in time (else every retry would meet them again).
        let mut refused: Vec<(String, redis::RedisError)> = Vec::new();
        let connected = async {
            let pubsub = node.client.get_async_pubsub().await?;
            let (sink, stream) = pubsub.split();
            let names: Vec<&String> = subs.keys().collect();
            subscribe_all(&sink, &names, node.request_timeout, &mut refused).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        let deadline = node.dial_timeout.saturating_add(node.request_timeout);
        let outcome = tokio::time::timeout(deadline, connected).await;
        for (ch, e) in &refused {
            subs.remove(ch);
            if let Some(hub) = hub.upgrade() {
                hub.refused(ch, e);
            }
        }
        match outcome {
            Ok(Ok((mut sink, mut stream))) => {
                tracing::debug!(channels = subs.len(), "subscribed");
                backoff = RECONNECT_MIN;
                for (ch, reply) in pending.drain(..) {
                    let _ = reply.send(subs.contains_key(&ch));
                }
                // Messages may have been missed while we were not subscribed.
                if let Some(hub) = hub.upgrade() {
                    for ch in subs.keys() {
                        hub.deliver(ch, index, None);
                    }
                }
                loop {
                    tokio::select! {
                        cmd = rx.recv() => match cmd {
                            None => return,
                            Some(first) => {
                                // Every command queued meanwhile (new listeners come in
                                // crowds), in one go: one SUBSCRIBE for many channels.
                                let mut cmds = vec![first];
                                while cmds.len() < BATCH {
                                    match rx.try_recv() {
                                        Ok(cmd) => cmds.push(cmd),
                                        Err(_) => break,
                                    }
                                }
                                if !apply_live(&node, &hub, &mut sink, &mut subs, cmds).await {
                                    break;
                                }
                            }
                        },
                        msg = stream.next() => match msg {
                            None => {
                                tracing::debug!("subscription connection lost");
                                if let Some(hub) = hub.upgrade() {
                                    hub.unconfirm_all();
                                }
                                break;
                            }
                            Some(msg) => match hub.upgrade() {
                                Some(hub) => hub.deliver(msg.get_channel_name(), index, Some(msg.get_payload_bytes())),
                                None => return,
                            },
                        },
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe; retrying"),
            Err(_) => tracing::debug!("cannot subscribe in time; retrying"),
        }
        for (_, reply) in pending.drain(..) {
            let _ = reply.send(false);
        }
        let until = Instant::now() + backoff;
        backoff = (backoff * 2).min(RECONNECT_MAX);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(cmd) => apply_offline(&mut subs, cmd, None),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_and_go_to_their_waiter_alone() {
        let t = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            parse_grant(format!("g:{t}:42:7").as_bytes()),
            Some((
                t,
                Grant {
                    fence: 42,
                    since_ms: 7
                }
            ))
        );
        assert_eq!(parse_grant(format!("{t}:0").as_bytes()), None);
        assert_eq!(parse_grant(b"g:x:1"), None);
        assert_eq!(parse_grant(b"g:x:1:2:3"), None);
        assert_eq!(parse_grant(b"g:x:y:2"), None);

        let chan = Arc::new(Channel::default());
        let mut wait = chan.expect_grant(t);
        let woken = chan.waiters.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        chan.deliver(0, Some(format!("g:{t}:42:7").as_bytes()));
        assert_eq!(
            futures::FutureExt::now_or_never(wait.granted()),
            Some(Grant {
                fence: 42,
                since_ms: 7
            })
        );
        // Nobody else was woken.
        assert!(futures::FutureExt::now_or_never(woken.as_mut()).is_none());
        // A grant for a token nobody here waits for is dropped.
        chan.deliver(0, Some(b"g:ffff:1:0"));
        assert!(futures::FutureExt::now_or_never(woken.as_mut()).is_none());
        drop(wait);
        assert!(chan.grants.lock().unwrap().is_empty());
        // A plain release message wakes every waiter.
        chan.deliver(0, Some(format!("{t}:0").as_bytes()));
        assert!(futures::FutureExt::now_or_never(woken.as_mut()).is_some());
    }

    /// One event from N masters wakes the waiters once; the same payload
    /// again from a master that already delivered it is another event (a `lock()` that
    /// took again with the token of its failed attempt: the attempt's cleanup, then its
    /// unlock, both publish `TOKEN:0`), and wakes them again.
    #[tokio::test]
    async fn the_same_payload_again_from_the_same_master_wakes_again() {
        let chan = Arc::new(Channel::default());
        let p = b"0123456789abcdef0123456789abcdef:0";
        let woken = chan.waiters.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        chan.deliver(0, Some(p));
        assert!(futures::FutureExt::now_or_never(woken.as_mut()).is_some());
        let woken = chan.waiters.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        // The same event from masters 1 and 2, and from this process: no new wake-up.
        chan.deliver(1, Some(p));
        chan.deliver(2, Some(p));
        chan.deliver(LOCAL, Some(p));
        assert!(futures::FutureExt::now_or_never(woken.as_mut()).is_none());
        // Master 0 again: a new event.
        chan.deliver(0, Some(p));
        assert!(futures::FutureExt::now_or_never(woken.as_mut()).is_some());
    }
}

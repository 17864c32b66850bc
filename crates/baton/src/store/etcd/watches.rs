//! Watches *multiplexed* on shared gRPC `Watch` streams.
//!
//! etcd serves any number of watches on one `Watch` stream: a create request on the stream
//! gets a "created" reply carrying the watch's id, and every later reply names the watch it
//! belongs to. Go's clientv3 puts all the watches of a client on one stream. Baton used to
//! open a stream per watch, and a held lock has a watch of its own when its client shares
//! no watch on the lock's prefix: 10,000 locks held on one session cost 9,943 gRPC streams,
//! 26.6 KB of client heap per lock (the peer, etcd's Lock API, 4.1 KB), and two goroutines
//! and their buffers per stream in etcd.
//!
//! Here up to [`PER_STREAM`] (64) watches share a stream. The first watch of a stream opens it
//! (hedged and retried as any watch creation is); later ones send their create request on
//! it and wait for the reply. etcd answers create requests on a stream in the order they
//! were sent (its `recvLoop` handles them one by one and queues each "created" reply before
//! reading the next; events of a watch whose "created" reply is not sent yet are held back
//! until it is), so replies are matched to requests by their order, as Go's client does.
//!
//! - A create that gets no reply within its share of the request timeout *retires* the
//!   stream (no new watch joins it: its member may be silent) and the watch is created on a
//!   new stream instead. A stream opened before the store authenticated again takes no new
//!   watch either. A create refused for credentials or permissions is tried once on a new
//!   stream when the store authenticates (a stream keeps the token it was opened with, and
//!   etcd 3.4 refuses an expired one as "permission denied"); the shared stream is retired
//!   only if the new one is let in.
//! - Dropping a watch cancels it on the server (a cancel request on the stream), also when
//!   its creator gave up after etcd's reply was on its way (the reply owns the watch). A
//!   watch etcd ends for compaction is cancelled too: etcd keeps it registered until then.
//!   A stream with no watch for [`IDLE`] is closed.
//! - A stream that fails or ends ends every watch on it the same way, as a stream of its
//!   own would have: the watchers see the same error (or end) and create their watches
//!   again; an error a new stream may not have (etcd ends a stream for one create request
//!   over its size limit) reaches the other watches as a retryable [`Error::Unavailable`].
//!   A create request with keys over [`MAX_SHARED_KEYS`] gets a stream of its own.
//! - A stream with watches that got no reply for [`PROBE_AFTER`] is sent a progress
//!   request (etcd answers it at once, with its revision); a stream that then gets no reply
//!   at all for a hedging share of the request timeout is taken for silent (its member
//!   paused, its packets lost) and closed: its watches end with a retryable
//!   [`Error::Unavailable`], and their readers watch again, on a new stream, from the last
//!   revision they read. Without it a watch on a silent member heard nothing until the
//!   connection's keep-alive pings gave up (~11 s).
//! - A stream's tasks run on the runtime the store was connected on (as the gRPC channel's
//!   do), whichever runtime opened it: a watch joined from another runtime never depends
//!   on that one being driven. If the tasks are dropped anyway (that runtime shut down),
//!   every watch on the stream fails with [`Error::Unavailable`].
//!
//! Each watch's replies are queued for it, so that one watch read slowly never holds up
//! the others on its stream, up to [`MAX_QUEUED`] bytes: a watch that falls further behind
//! is cancelled and ends with a retryable error after the replies queued, and its reader
//! watches again from the last revision it read.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client as ec;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::Error;

/// At most this many watches share one stream. Enough that the stream's own cost (~20 KB
/// of client heap, two goroutines in etcd) is small per watch. Few enough that one write
/// touching every watch of a stream (a session's lease revoked: a delete event for each of
/// its held keys) fits twice over in the buffer etcd keeps per stream (128 replies, its
/// `chanBufLen`): a watch that finds it full is set aside as a "victim" and its event sent
/// again by a loop that runs every 10 ms, a delay a stream of its own never had. Also, a stream that breaks (its member restarted)
/// sends a bounded number of watchers to create theirs again at once, and watches spread
/// over members once there are many.
pub(super) const PER_STREAM: usize = 64;

/// A stream without a watch for this long is closed.
pub(super) const IDLE: Duration = Duration::from_secs(10);

/// A stream with watches that got no reply for this long is sent a progress request, to
/// learn whether its member still answers.
pub(super) const PROBE_AFTER: Duration = Duration::from_secs(1);

/// How often the sender looks at the stream (idle, due a probe, silent).
const TICK: Duration = Duration::from_millis(250);

/// At most this many bytes of replies wait for one watch's reader (and one reply more: a
/// reply is always taken while none waits). A watch read too slowly
/// (or not at all) that would queue more is cancelled and ends with a retryable
/// [`Error::Unavailable`] after the replies already queued: its reader watches again from
/// the last revision it read, and etcd replays the rest from its history. With a stream
/// per watch, HTTP/2 flow control held etcd back instead; without a bound, an unread watch
/// of a busy prefix grew the client without limit (200 MB written: +203 MB).
pub(super) const MAX_QUEUED: usize = 16 << 20;

/// A create request whose key and range end are longer than this goes on a stream of its
/// own: etcd ends the whole stream for a request over its size limit (`--max-request-bytes`,
/// 1.5 MiB by default), which must not end the other watches of a shared one.
pub(super) const MAX_SHARED_KEYS: usize = 64 << 10;

/// One reply of etcd for one watch, or the error that ended the stream.
pub(super) type Delivery = std::result::Result<ec::WatchResponse, Error>;

/// The reply to a create request: etcd's "created" reply, with the watch unless etcd
/// canceled it at once; or the error that ended the stream first. The watch is sent as a
/// [`Member`], whose drop cancels it: a creator that gives up once the reply is on its way
/// (its future dropped in the same wake-up) drops it unread, and the watch is cancelled.
type Created = std::result::Result<(ec::WatchResponse, Option<Member>), Error>;

/// A watch's queue of replies. Boxed: a channel allocates room for 32 items at once, which
/// unboxed (~130 bytes each) would cost every held lock's watch 4 KB while it waits.
type Replies = mpsc::UnboundedReceiver<Box<Delivery>>;

enum Command {
    Create(Vec<u8>, ec::WatchOptions),
    Cancel(i64),
}

struct State {
    /// One reply slot per create request sent and not answered yet, oldest first.
    pending: VecDeque<oneshot::Sender<Created>>,
    /// The watches open on the stream, by id.
    watches: HashMap<i64, Slot>,
    /// The stream ended, or is being closed: nothing more is sent on it.
    closed: bool,
    /// No new watch joins the stream (see the module docs); those on it stay.
    retired: bool,
    /// Since when the stream has had no watch (and no create in flight).
    idle_since: Option<Instant>,
    /// When etcd last replied on the stream (any reply).
    last_reply: Instant,
    /// The stream was closed for getting no reply to a progress request.
    silent: bool,
}

impl State {
    fn update_idle(&mut self) {
        if self.watches.is_empty() && self.pending.is_empty() {
            self.idle_since.get_or_insert_with(Instant::now);
        } else {
            self.idle_since = None;
        }
    }
}

/// Where a watch's replies go, and how many bytes of them wait to be read.
struct Slot {
    sender: mpsc::UnboundedSender<Box<Delivery>>,
    queued: Arc<AtomicUsize>,
}

/// Roughly how much memory a reply takes while it waits.
fn size_of_reply(resp: &ec::WatchResponse) -> usize {
    let kv = |kv: Option<&ec::KeyValue>| kv.map_or(0, |kv| 64 + kv.key().len() + kv.value().len());
    128 + resp
        .events()
        .iter()
        .map(|e| 32 + kv(e.kv()) + kv(e.prev_kv()))
        .sum::<usize>()
}

/// One shared `Watch` stream.
pub(super) struct Stream {
    state: Arc<StdMutex<State>>,
    commands: mpsc::UnboundedSender<Command>,
    /// The store's count of authentications when the stream was opened: a stream opened
    /// with an older token takes no new watch.
    generation: u64,
}

/// A watch on a shared stream: its replies, in order. Dropping it cancels the watch on the
/// server.
pub(super) struct Member {
    state: Arc<StdMutex<State>>,
    commands: mpsc::UnboundedSender<Command>,
    id: i64,
    replies: Replies,
    queued: Arc<AtomicUsize>,
}

impl Member {
    /// The next reply, or the error that ended the stream; `None` once the watch ended
    /// (canceled by etcd, whose reply came before, or the stream ended without an error).
    pub(super) async fn next(&mut self) -> Option<Delivery> {
        let delivery = *self.replies.recv().await?;
        if let Ok(resp) = &delivery {
            self.queued
                .fetch_sub(size_of_reply(resp), Ordering::Relaxed);
        }
        Some(delivery)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut state = super::lock_unpoisoned(&self.state);
        if state.watches.remove(&self.id).is_some() && !state.closed {
            let _ = self.commands.send(Command::Cancel(self.id));
        }
        state.update_idle();
    }
}

/// What trying a shared stream gave.
pub(super) enum Joined {
    /// The watch is created (or etcd canceled it at once: no `Member`).
    Created(ec::WatchResponse, Option<Member>),
    /// No shared stream could take it, or the one asked ended first: open a new stream.
    Open,
    /// The stream asked did not answer within the time given: it is retired, and a new
    /// stream is needed at once.
    Silent,
    /// etcd refused the watch for credentials or permissions. It may be the stream's token
    /// (a stream keeps the token it was opened with): the caller decides whether a new
    /// stream is worth trying, and retires this one if the new one is let in.
    Refused(ec::WatchResponse, Arc<Stream>),
}

impl Stream {
    /// Start serving `stream`, on which etcd answered the first create request with
    /// `created` (not canceled). Returns the shared stream and the first watch.
    /// `silent_after`: how long the stream may go without a reply once a progress request
    /// is sent, before it is taken for silent and closed.
    pub(super) fn start(
        stream: ec::WatchStream,
        created: &ec::WatchResponse,
        generation: u64,
        endpoints: String,
        runtime: &tokio::runtime::Handle,
        silent_after: Duration,
    ) -> (Arc<Stream>, Member) {
        let (requests, responses) = stream.split();
        let (sender, replies) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let id = created.watch_id();
        let slot = Slot {
            sender,
            queued: queued.clone(),
        };
        let state = Arc::new(StdMutex::new(State {
            pending: VecDeque::new(),
            watches: HashMap::from([(id, slot)]),
            closed: false,
            retired: false,
            idle_since: None,
            last_reply: Instant::now(),
            silent: false,
        }));
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let reader = runtime.spawn(read(
            Ending::new(state.clone()),
            commands.downgrade(),
            responses,
            endpoints,
        ));
        runtime.spawn(send(
            state.clone(),
            commands_rx,
            requests,
            reader.abort_handle(),
            silent_after,
        ));
        let member = Member {
            state: state.clone(),
            commands: commands.clone(),
            id,
            replies,
            queued,
        };
        let stream = Arc::new(Stream {
            state,
            commands,
            generation,
        });
        (stream, member)
    }

    /// Whether new watches may still join the stream.
    pub(super) fn open(&self, generation: u64) -> bool {
        let state = super::lock_unpoisoned(&self.state);
        !state.closed && !state.retired && self.generation == generation
    }

    /// Stop new watches from joining the stream.
    pub(super) fn retire(&self) {
        super::lock_unpoisoned(&self.state).retired = true;
    }

    /// Send a create request on the stream, unless it takes no new watch.
    fn request(
        &self,
        key: &[u8],
        options: &ec::WatchOptions,
    ) -> Option<oneshot::Receiver<Created>> {
        let mut state = super::lock_unpoisoned(&self.state);
        if state.closed || state.retired || state.watches.len() + state.pending.len() >= PER_STREAM
        {
            return None;
        }
        let (reply, replied) = oneshot::channel();
        // Under the lock: requests reach the stream in the order of `pending`.
        self.commands
            .send(Command::Create(key.to_vec(), options.clone()))
            .ok()?;
        state.pending.push_back(reply);
        state.idle_since = None;
        Some(replied)
    }

    /// Create a watch on one of `streams` (those that cannot take it are dropped from the
    /// list), waiting at most `within` for etcd's reply.
    pub(super) async fn join(
        streams: &StdMutex<Vec<Arc<Stream>>>,
        generation: u64,
        key: &[u8],
        options: &ec::WatchOptions,
        within: Duration,
    ) -> Joined {
        let (stream, replied) = {
            let mut streams = super::lock_unpoisoned(streams);
            streams.retain(|s| s.open(generation));
            let Some((stream, replied)) = streams
                .iter()
                .find_map(|s| s.request(key, options).map(|r| (s.clone(), r)))
            else {
                return Joined::Open;
            };
            (stream, replied)
        };
        match tokio::time::timeout(within, replied).await {
            Err(_) => {
                tracing::debug!(
                    after = ?within,
                    "a watch creation on a shared stream went unanswered; retiring the stream"
                );
                stream.retire();
                Joined::Silent
            }
            // The stream ended first: a new one is needed.
            Ok(Err(_)) | Ok(Ok(Err(_))) => Joined::Open,
            Ok(Ok(Ok((created, None)))) => {
                if super::auth_error("watch", None, created.cancel_reason()).is_some() {
                    return Joined::Refused(created, stream);
                }
                Joined::Created(created, None)
            }
            Ok(Ok(Ok((created, Some(member))))) => Joined::Created(created, Some(member)),
        }
    }
}

/// Ends every watch and create request of a stream when dropped: when the stream's reader
/// ends (with `reason`: the stream's error, or `None` for a clean end), and also when its
/// task is dropped without ending, as when the runtime that runs it shuts down. Watches
/// joined from other runtimes then get an error (and watch again) instead of silence.
struct Ending {
    state: Arc<StdMutex<State>>,
    reason: Option<Error>,
}

impl Ending {
    fn new(state: Arc<StdMutex<State>>) -> Ending {
        Ending {
            state,
            reason: Some(Error::Unavailable(
                "watch: the runtime that served its shared stream shut down".into(),
            )),
        }
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        let mut state = super::lock_unpoisoned(&self.state);
        state.closed = true;
        if state.silent {
            self.reason = Some(Error::Unavailable(
                "watch: its stream got no reply to a progress request (its etcd member \
                 silent); watch again from the last revision read"
                    .into(),
            ));
        }
        let gone = || {
            self.reason.clone().unwrap_or_else(|| {
                Error::Unavailable("watch: the stream ended before the watch was created".into())
            })
        };
        // The members in refused replies lock the state when dropped: drop them after.
        let mut unread = Vec::new();
        for reply in state.pending.drain(..) {
            if let Err(reply) = reply.send(Err(gone())) {
                unread.push(reply);
            }
        }
        for (_, watch) in state.watches.drain() {
            if let Some(error) = &self.reason {
                // An error that a new stream may not have (etcd ends a stream for one
                // create request over its size limit): the other watches watch again.
                let error = if error.is_retryable() {
                    error.clone()
                } else {
                    Error::Unavailable(format!("watch: its shared stream ended: {error}"))
                };
                let _ = watch.sender.send(Box::new(Err(error)));
            }
        }
        drop(state);
        drop(unread);
    }
}

/// Read the stream's replies and hand each to its watch.
async fn read(
    mut ending: Ending,
    commands: mpsc::WeakUnboundedSender<Command>,
    mut responses: ec::WatchResponseStream,
    endpoints: String,
) {
    ending.reason = loop {
        match responses.message().await {
            Ok(Some(resp)) => {
                // Dropped here, outside the state's lock (its drop takes it).
                let unread = deliver(&ending.state, &commands, resp);
                drop(unread);
            }
            Ok(None) => break None,
            Err(e) => break Some(super::map_err("watch", e, 0, &endpoints)),
        }
    };
    match &ending.reason {
        Some(error) => tracing::debug!(error = %error, "shared watch stream failed"),
        None => tracing::debug!("shared watch stream ended"),
    }
}

/// Hand `resp` to its watch, or to the creator waiting for it. Returns a reply nobody took
/// (its creator gave up), which the caller drops once the state is unlocked: dropping it
/// cancels the watch.
fn deliver(
    shared: &Arc<StdMutex<State>>,
    commands: &mpsc::WeakUnboundedSender<Command>,
    resp: ec::WatchResponse,
) -> Option<Created> {
    let send_cancel = |id: i64| {
        if let Some(commands) = commands.upgrade() {
            let _ = commands.send(Command::Cancel(id));
        }
    };
    let mut state = super::lock_unpoisoned(shared);
    state.last_reply = Instant::now();
    let id = resp.watch_id();
    if resp.created() {
        let Some(reply) = state.pending.pop_front() else {
            tracing::debug!(watch_id = id, "a watch created that nobody asked for");
            if !resp.canceled() {
                send_cancel(id);
            }
            return None;
        };
        let unread = if resp.canceled() {
            reply.send(Ok((resp, None))).err()
        } else if let Some(commands) = commands.upgrade() {
            let (sender, replies) = mpsc::unbounded_channel();
            let queued = Arc::new(AtomicUsize::new(0));
            let slot = Slot {
                sender,
                queued: queued.clone(),
            };
            state.watches.insert(id, slot);
            let member = Member {
                state: Arc::clone(shared),
                commands,
                id,
                replies,
                queued,
            };
            reply.send(Ok((resp, Some(member)))).err()
        } else {
            // Nothing holds the stream any more (its creator included): nobody to tell.
            None
        };
        state.update_idle();
        return unread;
    }
    let ended = resp.canceled();
    // etcd keeps a watch it ended for compaction registered until it is cancelled.
    let compacted = resp.compact_revision() > 0;
    let Some(watch) = state.watches.get(&id) else {
        // A watch dropped (its cancel request is on its way), or the reply to a progress
        // request (watch id -1).
        return None;
    };
    let size = size_of_reply(&resp);
    // A reply is always taken while nothing waits: one larger than the bound (a catch-up
    // batch, a prefix deleted with its previous values) must not end the watch each time
    // it is created again, or its reader would never get past it.
    let queued = watch.queued.fetch_add(size, Ordering::Relaxed);
    if !ended && queued > 0 && queued + size > MAX_QUEUED {
        tracing::debug!(watch_id = id, queued, "a watch fell behind; ending it");
        let _ = watch.sender.send(Box::new(Err(Error::Unavailable(format!(
            "watch: fell behind: {} MiB of events waited to be read; watch again from the \
             last revision read",
            queued >> 20
        )))));
        state.watches.remove(&id);
        send_cancel(id);
    } else if watch.sender.send(Box::new(Ok(resp))).is_err() {
        state.watches.remove(&id);
        send_cancel(id);
    } else if ended {
        state.watches.remove(&id);
        if compacted {
            send_cancel(id);
        }
    }
    state.update_idle();
    None
}

/// What a look at a stream found.
enum Look {
    /// Idle for [`IDLE`]: closed.
    Idle,
    /// No reply to a progress request for `silent_after`: closed.
    Silent,
    /// Due a progress request.
    Probe,
    Nothing,
}

/// Look at the stream: idle, due a progress request, or silent (see [`send`]); `probed` is
/// when the progress request now unanswered was sent.
fn look(state: &StdMutex<State>, probed: &mut Option<Instant>, silent_after: Duration) -> Look {
    let mut state = super::lock_unpoisoned(state);
    if state
        .idle_since
        .is_some_and(|since| since.elapsed() >= IDLE)
    {
        state.closed = true;
        return Look::Idle;
    }
    if state.watches.is_empty() {
        *probed = None;
        return Look::Nothing;
    }
    match *probed {
        Some(at) if state.last_reply >= at => *probed = None,
        Some(at) if at.elapsed() >= silent_after => {
            tracing::debug!(
                after = ?at.elapsed(),
                "a shared watch stream got no reply to a progress request; closing it"
            );
            state.silent = true;
            state.retired = true;
            return Look::Silent;
        }
        Some(_) => return Look::Nothing,
        None => {}
    }
    if state.last_reply.elapsed() < PROBE_AFTER {
        return Look::Nothing;
    }
    Look::Probe
}

/// Send the create and cancel requests; close the stream once it has been idle for
/// [`IDLE`] (found within a [`TICK`] more), or once nothing can send on it any more; send a
/// progress request when the stream, with watches, got no reply for [`PROBE_AFTER`], and
/// close it (its watches end with a retryable error) when it then gets no reply at all for
/// `silent_after`.
async fn send(
    state: Arc<StdMutex<State>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut requests: ec::WatchRequestSender,
    reader: tokio::task::AbortHandle,
    silent_after: Duration,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the progress request now unanswered was sent.
    let mut probed: Option<Instant> = None;
    loop {
        let command = tokio::select! {
            command = commands.recv() => command,
            _ = tick.tick() => {
                match look(&state, &mut probed, silent_after) {
                    Look::Idle => break,
                    Look::Silent => {
                        reader.abort();
                        return;
                    }
                    Look::Probe => {
                        probed = Some(Instant::now());
                        if requests.request_progress().await.is_err() {
                            // The stream is gone; its reader reports why.
                            return;
                        }
                    }
                    Look::Nothing => {}
                }
                continue;
            }
        };
        let sent = match command {
            None => {
                super::lock_unpoisoned(&state).closed = true;
                break;
            }
            Some(Command::Create(key, options)) => requests.watch(key, Some(options)).await,
            Some(Command::Cancel(id)) => requests.cancel(id).await,
        };
        if sent.is_err() {
            // The stream is gone; its reader reports why.
            return;
        }
    }
    tracing::debug!("closing an idle shared watch stream");
    // Nothing waits on the stream any more: drop both halves, which resets it.
    reader.abort();
}

//! One long-lived watch per queue prefix, shared by every waiter of this client (a client
//! shared between runtimes keeps the watches opened on a current-thread runtime for that
//! runtime alone: see [`current_thread_id`]).
//!
//! etcd serves a watch whose start revision is at or behind its current revision from its
//! "unsynced" group, which it sweeps only every 100 ms. A waiter that reads its predecessor
//! at revision `R` and then watches it from `R + 1` avoids that only when nothing else was
//! written in between, which under contention is never: every handoff would pay the sweep.
//!
//! The hub keeps one watch per prefix open instead (for clients that wait on short queues or
//! lock the same name repeatedly; a client with no shared watch on a prefix watches single
//! keys from the current revision instead, see [`keys_gone`], so that many waiting clients
//! do not each receive every delete of a long queue). It is opened from etcd's next write,
//! so it is synced from the start (a waiter whose read is older than the watch reads once
//! more: one round trip, where a watch from the read's revision would wait for the sweep).
//! It then stays synced, and every waiter on that prefix registers with it:
//! registering is an in-process operation, so a release reaches its successor as fast as
//! etcd can send one event. Each waiter still waits only for its own predecessor's delete,
//! so a release wakes exactly one waiter.
//!
//! Every waiter, and every holder watching its own key, waits for a delete, and a key is
//! replaced only after a delete. But a put over an existing key can take it out of its queue
//! without a delete: an operator's `etcdctl put KEY ""` drops its lease, which frees the
//! name (a member needs a lease). So the watch hears puts too, and keeps the overwrites
//! (a put on a key that existed) in its buffer beside the deletes; a put that creates a key
//! (every join) only moves its progress on. An overwrite with no lease wakes whoever waits
//! on that key: a waiter reads again (its predecessor freed, or its own place), a holder's
//! hook hands over to a task that reads its key (and finds it lost). So does an overwrite
//! that binds a session's key (`NAME/<lease in hex>`) to another lease (`etcdctl put
//! --lease`): the key stays in its queue, but as that lease's, no longer its owner's. A waiter granted by
//! the watch alone checks that its own key had no overwrite either, so the grant needs no
//! read. (etcd's `NOPUT` filter would save each client watching the queue one event per
//! join, and every other put under the prefix, values included: a leader's proclaims, keys
//! of other primitives under the same prefix; the read it would cost each handoff instead
//! took a fifth to a third of the contended rate.)
//!
//! A semaphore's waiters must hear every delete of their queue (and every key freed there),
//! not only their predecessor's (see `semaphore.rs`): they subscribe to the same watch
//! ([`Hub::subscribe_deletes`]), and are told of each by a call in place.
//!
//! Correctness rests on one invariant: the hub has seen every delete under the prefix from
//! `buffer_from` up to `progress`, and keeps those deletes in a bounded buffer. A waiter that
//! read at revision `R` may register only if `buffer_from <= R + 1`; it first looks for its
//! predecessor's delete in the buffer (events in `(R, progress]`), then waits for later
//! events. Otherwise, or when the hub's watch breaks, the waiter falls back to reading again.
//! The watch may lag behind the waiter's read (`progress < R`): events up to `R` it delivers
//! later are then older than what the waiter saw, and a delete among them answers no
//! waiter that read after it. Lock keys' names are reused (a session locks the same name
//! again), so such a stale delete can name the very key the waiter waits on.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{oneshot, Notify};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::store::{EventKind, KeyValue, LeaseId, Revision, Store, Watch};

/// How many recent events each prefix watch remembers.
const BUFFER: usize = 4096;

/// A prefix watch with no waiters for this long is closed.
const IDLE: Duration = Duration::from_secs(10);

/// [`Hub::held_again`] forgets old prefixes once it remembers this many (or twice as many
/// as it kept the last time).
const HELD_PRUNE_AT: usize = 1024;

/// The shared watches of one runtime slot, by prefix.
type ByPrefix = HashMap<Vec<u8>, Arc<PrefixWatch>>;

/// Where a shared watch being opened is kept: the runtime that runs its task if that is a
/// current-thread one (see [`current_thread_id`]), and its prefix.
type Slot = (Option<tokio::runtime::Id>, Vec<u8>);

/// The slot of the caller's runtime for `prefix`.
fn slot(prefix: &[u8]) -> Slot {
    (current_thread_id(), prefix.to_vec())
}

/// The id of the caller's runtime if it is a current-thread one. Such a runtime runs its
/// tasks only inside its `block_on`: a client shared between runtimes keeps the shared
/// watches it opens apart, used by that runtime alone, since a waiter or holder of another
/// runtime would not be told while it idles (alive, its thread busy outside `block_on`).
/// Watches opened on multi-thread runtimes, whose tasks always run, serve every runtime.
fn current_thread_id() -> Option<tokio::runtime::Id> {
    let here = tokio::runtime::Handle::try_current().ok()?;
    (here.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread).then(|| here.id())
}

/// When this client last held a key under each prefix.
#[derive(Default)]
struct Held {
    at: HashMap<Vec<u8>, tokio::time::Instant>,
    prune_at: usize,
}

/// Shared prefix watches of one client, and the client's counters.
#[derive(Default)]
pub(crate) struct Hub {
    /// By runtime for those opened on a current-thread one (see [`current_thread_id`]),
    /// then by prefix (looked up without a copy of the prefix: on every lock's path).
    prefixes: StdMutex<HashMap<Option<tokio::runtime::Id>, ByPrefix>>,
    /// Shared watches being opened from now, by slot: told when the open ends (see
    /// [`Hub::open_from_now`]).
    opening: StdMutex<HashMap<Slot, Arc<Notify>>>,
    /// When this client last held a key under each prefix (see [`Hub::held_again`]).
    held: StdMutex<Held>,
    pub(crate) counters: Counters,
    /// Set once the store refused a handoff mark (the user's roles cover a lock's keys but
    /// not its mark): this client's releases leave none from then on (see
    /// [`ownership::Mark`](crate::ownership::Mark)).
    pub(crate) marks_refused: AtomicBool,
}

/// What a client has done, for benchmarks and monitoring. See [`ClientStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) keep_alives: AtomicU64,
    pub(crate) wakeups: AtomicU64,
    pub(crate) watches_opened: AtomicU64,
}

/// Counters of one [`Client`](crate::Client), from [`Client::stats`](crate::Client::stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Keep-alive requests sent by the sessions of this client.
    pub keep_alives: u64,
    /// How often a waiter was woken to look at the queue again (a predecessor left, an
    /// awaited change came, or a watch broke). With no herd, one release wakes one waiter.
    ///
    /// Counts the waits of every primitive (locks, elections, semaphores, barriers,
    /// latches, queues).
    pub wakeups: u64,
    /// Watch streams opened for waiting and for loss notification: shared per prefix, or
    /// one per key for waiters in long queues and holders whose client shares none, and
    /// those of the waits of semaphores, barriers, latches and queues.
    pub watches_opened: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> ClientStats {
        ClientStats {
            keep_alives: self.keep_alives.load(Ordering::Relaxed),
            wakeups: self.wakeups.load(Ordering::Relaxed),
            watches_opened: self.watches_opened.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self
            .prefixes
            .lock()
            .map(|p| p.values().map(HashMap::len).sum::<usize>())
            .unwrap_or(0);
        f.debug_struct("Hub").field("prefix_watches", &n).finish()
    }
}

/// How a wait registered with the hub ends.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Woken {
    /// The key was deleted, at this revision.
    Deleted(Revision),
    /// The hub's watch broke or was compacted: read again.
    Interrupted,
    /// Read again at once, then wait: the hub's watch (opened just now, from etcd's next
    /// write) started after the caller's read, or one of the awaited keys was overwritten
    /// with no lease (freed: no longer a member of its queue, though not deleted) or bound
    /// to another lease than its name says (another owner's now).
    Reread,
}

struct PrefixWatch {
    state: StdMutex<State>,
    /// The current-thread runtime that runs its task, if it is one (its slot's).
    runtime: Option<tokio::runtime::Id>,
}

/// What a buffered event did to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// Deleted (by a delete, or by its lease ending).
    Deleted,
    /// Written again, bound to a lease: its holder's own write (a proclaim, say), or
    /// another owner's.
    Rewritten,
    /// Written again with no lease (an operator's `etcdctl put KEY ""`): freed, a member of
    /// no queue, though never deleted. Also a key written again bound to a lease other than
    /// the one its name says (`NAME/<lease in hex>`, as a session's keys are named; an
    /// operator's `etcdctl put --lease=OTHER KEY`): still a member, but that lease's, no
    /// longer its owner's, which whoever waits on it must read to learn.
    Freed,
}

impl Change {
    /// True if the key left its queue (deleted, or freed with no lease), or left its owner
    /// (bound to another lease): whoever counts or waits on it reads, and the read decides.
    fn leaves(self) -> bool {
        matches!(self, Change::Deleted | Change::Freed)
    }

    /// What `kind` did to `kv`; `None` for a put that created the key.
    fn of(kind: EventKind, kv: &KeyValue) -> Option<Change> {
        match kind {
            EventKind::Delete => Some(Change::Deleted),
            EventKind::Put if kv.version <= 1 => None,
            EventKind::Put if kv.lease == 0 => Some(Change::Freed),
            EventKind::Put if named_lease(&kv.key).is_some_and(|named| named != kv.lease) => {
                Some(Change::Freed)
            }
            EventKind::Put => Some(Change::Rewritten),
        }
    }
}

/// The lease that `key` is named after, if its last component is one in lowercase hex, as
/// [`lease_key`](crate::names::lease_key) (and Go's `concurrency` package) names a session's
/// keys. Go's read-write lock names its keys with the time in decimal nanoseconds (19
/// digits), which is no lease: longer than any lease id in hex.
fn named_lease(key: &[u8]) -> Option<LeaseId> {
    let last = key.rsplit(|b| *b == b'/').next()?;
    let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    if last.is_empty() || last.len() > 16 || !last.iter().all(hex) {
        return None;
    }
    let id = u64::from_str_radix(std::str::from_utf8(last).ok()?, 16).ok()?;
    LeaseId::try_from(id).ok().filter(|id| *id > 0)
}

struct State {
    alive: bool,
    /// The revision the watch started after.
    opened_after: Revision,
    /// Every delete and overwrite under the prefix with revision in `[buffer_from,
    /// progress]` is in `recent`. `progress` is the revision of the newest event seen (or
    /// the watch's start).
    buffer_from: Revision,
    progress: Revision,
    recent: VecDeque<(Revision, Vec<u8>, Change)>,
    waiters: HashMap<Vec<u8>, Vec<Waiter>>,
    /// Subscribers to every delete under the prefix (see [`Hub::subscribe_deletes`]).
    all: Vec<Subscriber>,
}

/// A subscriber to every delete under a prefix after revision `after`.
struct Subscriber {
    after: Revision,
    hook: Box<dyn OnEveryDelete>,
}

/// Told, in place, of every delete under a prefix, and of every key freed there (overwritten
/// with no lease: it left its queue as a delete would; a later delete of the same key is
/// told too) or bound to another lease than its name says (see [`Change::Freed`]: still a
/// member, so only a reason to read). See [`Hub::subscribe_deletes`]. Called
/// with the hub's lock held: it must be quick and must not call into the hub. Dropped when
/// it has heard enough, when its caller is gone, or when the shared watch breaks (so a
/// hook that holds a sender tells its receiver by dropping it).
pub(crate) trait OnEveryDelete: Send {
    /// `key` was deleted (or freed) at revision `rev`: true when the hook needs to hear no
    /// more.
    fn deleted(&mut self, rev: Revision, key: &[u8]) -> bool;
    /// True once nobody needs to hear any more.
    fn is_closed(&self) -> bool;
}

impl State {
    /// The buffered events after revision `after`, oldest first. The buffer is in revision
    /// order, so this skips the older part without looking at it.
    fn since(&self, after: Revision) -> impl Iterator<Item = &(Revision, Vec<u8>, Change)> {
        let start = self.recent.partition_point(|(rev, _, _)| *rev <= after);
        self.recent.range(start..)
    }
}

/// The answer to a wait: which of its keys (by index), and how.
type Answer = oneshot::Sender<(usize, Woken)>;

/// One registered wait, possibly on several keys: the first delete among them answers it.
struct Waiter {
    index: usize,
    /// The revision the caller read at: only a delete after it answers the wait. The
    /// shared watch may still be delivering older events when the waiter registers, and a
    /// key's name is reused (a session locks the same name again): an older delete of the
    /// same key is not the delete of the key the caller saw.
    after: Revision,
    sink: Sink,
}

/// Who hears of a registered wait's end.
enum Sink {
    /// A caller of [`Hub::wait_delete`], awaiting the answer.
    Answer(Arc<StdMutex<Option<Answer>>>),
    /// A hook called in place (see [`Hub::watch_deletes`]): no task waits.
    Hook(Arc<dyn OnDelete>),
}

/// Told, without a task of its own, of the delete of the key it watches, or that the
/// shared watch could not see it through. See [`Hub::watch_deletes`].
pub(crate) trait OnDelete: Send + Sync {
    /// The key was deleted ([`Woken::Deleted`]), or the shared watch broke
    /// ([`Woken::Interrupted`]): the hook is then unregistered and must watch by other
    /// means. Called with the hub's lock held: it must not call into the hub.
    fn woken(&self, woken: Woken);
    /// True once nobody needs to hear any more: the registration is dropped.
    fn is_closed(&self) -> bool;
}

impl Waiter {
    /// Tell the waiter its key was freed (see [`Change::Freed`]): a caller of
    /// [`Hub::wait_delete`] reads again at once; a hook watches by other means, which read.
    fn freed(&self) {
        match &self.sink {
            Sink::Answer(_) => self.send(Woken::Reread),
            Sink::Hook(_) => self.send(Woken::Interrupted),
        }
    }

    fn send(&self, woken: Woken) {
        match &self.sink {
            Sink::Answer(tx) => {
                if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = tx.send((self.index, woken));
                }
            }
            Sink::Hook(hook) => hook.woken(woken),
        }
    }

    fn is_closed(&self) -> bool {
        match &self.sink {
            Sink::Answer(tx) => tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_none_or(|tx| tx.is_closed()),
            Sink::Hook(hook) => hook.is_closed(),
        }
    }
}

enum Registered {
    Now((usize, Woken)),
    Later(oneshot::Receiver<(usize, Woken)>),
    /// The watch started after the caller's read.
    Reread,
    /// The watch is dead, or has dropped events the caller needs.
    NotCovered,
}

impl PrefixWatch {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register for the first delete of any of `keys` after revision `after`. An overwrite
    /// of one of them that frees it (see [`Change::Freed`]) answers [`Woken::Reread`].
    fn register(&self, keys: &[&[u8]], after: Revision) -> Registered {
        let mut st = self.state();
        if !st.alive {
            return Registered::NotCovered;
        }
        if st.buffer_from > after + 1 {
            // Started after the caller's read, and has dropped nothing since: a newer read
            // will be covered.
            if st.buffer_from == st.opened_after + 1 {
                return Registered::Reread;
            }
            return Registered::NotCovered;
        }
        let deleted = st.since(after).find_map(|(rev, k, change)| {
            let index = keys.iter().position(|key| *key == k.as_slice())?;
            match change {
                Change::Deleted => Some((index, Woken::Deleted(*rev))),
                Change::Freed => Some((index, Woken::Reread)),
                Change::Rewritten => None,
            }
        });
        if let Some(found) = deleted {
            return Registered::Now(found);
        }
        let (tx, rx) = oneshot::channel();
        let tx = Arc::new(StdMutex::new(Some(tx)));
        for (index, key) in keys.iter().enumerate() {
            st.waiters.entry(key.to_vec()).or_default().push(Waiter {
                index,
                after,
                sink: Sink::Answer(tx.clone()),
            });
        }
        Registered::Later(rx)
    }
}

impl Hub {
    /// Have `hook` told of the first delete of `key` (under `prefix`) after revision
    /// `after`, by this client's live shared watch on `prefix`, with no task waiting: a
    /// holder that locks the same name again and again registers its loss watch this way
    /// on every hold. False if there is no such watch, or it cannot vouch for every delete
    /// since `after`: nothing is registered, and the caller must watch by other means.
    /// A delete already seen is told at once. An overwrite that frees the key (see
    /// [`Change::Freed`]: no lease, or another lease than its name says) is told as
    /// [`Woken::Interrupted`]: the hook then watches by other means, which read the key.
    pub(crate) fn watch_deletes(
        &self,
        prefix: &[u8],
        key: &[u8],
        after: Revision,
        hook: Arc<dyn OnDelete>,
    ) -> bool {
        let Some(pw) = self.get(prefix) else {
            return false;
        };
        let mut st = pw.state();
        if !st.alive || st.buffer_from > after + 1 {
            return false;
        }
        let seen = st
            .since(after)
            .find(|(_, k, change)| *change != Change::Rewritten && k.as_slice() == key);
        match seen {
            Some((rev, _, Change::Deleted)) => hook.woken(Woken::Deleted(*rev)),
            Some(_) => hook.woken(Woken::Interrupted),
            None => st.waiters.entry(key.to_vec()).or_default().push(Waiter {
                index: 0,
                after,
                sink: Sink::Hook(hook),
            }),
        }
        true
    }

    /// Wait until one of `keys`, all under `prefix`, is deleted at a revision after
    /// `after`; returns which one (its index) and when. The deletes of one prefix are seen
    /// in revision order, so the answer is the earliest of them.
    ///
    /// Answers [`Woken::Interrupted`] when the caller should read again (the shared watch
    /// broke or was compacted), and [`Woken::Reread`] when it should read again at once:
    /// the shared watch, opened now, starts after its read.
    ///
    /// A watch is opened from etcd's next write, never from the caller's (older) read: etcd
    /// serves a watch that starts behind its current revision only at its next sweep of
    /// such watches, up to 100 ms later, while the read that closes the gap takes one
    /// round trip.
    pub(crate) async fn wait_delete(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        prefix: &[u8],
        keys: &[&[u8]],
        after: Revision,
    ) -> Result<(usize, Woken)> {
        let existing = self.get(prefix);
        let mut pw = match existing {
            Some(pw) => pw,
            None => self.open_from_now(store, prefix).await?,
        };
        let mut registered = pw.register(keys, after);
        if let Registered::NotCovered = registered {
            // The shared watch died, or dropped events since our read from its buffer (a
            // read older than its last BUFFER deletes).
            pw = self.replace(store, prefix, &pw, after).await?;
            registered = pw.register(keys, after);
        }
        match registered {
            Registered::Now(w) => Ok(w),
            Registered::Later(rx) => Ok(rx.await.unwrap_or((0, Woken::Interrupted))),
            Registered::Reread => Ok((0, Woken::Reread)),
            Registered::NotCovered => Ok((0, Woken::Interrupted)),
        }
    }

    /// The first delete of `key` after revision `after` that this client's shared watch on
    /// `prefix` has seen so far: `Some(Some(rev))` if there is one, `Some(None)` if there is
    /// none yet, `None` if no live shared watch covers every delete since `after` (read
    /// instead). Registers nothing.
    pub(crate) fn deleted_since(
        &self,
        prefix: &[u8],
        key: &[u8],
        after: Revision,
        upto: Revision,
    ) -> Option<Option<Revision>> {
        self.first_since(prefix, key, after, upto, |change| change == Change::Deleted)
    }

    /// The first delete or overwrite (a put on a key that existed, by anyone, with a lease
    /// or not) of `key` after revision `after` that this client's shared watch on `prefix`
    /// has seen, answered as [`deleted_since`](Hub::deleted_since) answers for deletes.
    pub(crate) fn changed_since(
        &self,
        prefix: &[u8],
        key: &[u8],
        after: Revision,
        upto: Revision,
    ) -> Option<Option<Revision>> {
        self.first_since(prefix, key, after, upto, |_| true)
    }

    /// The revision of the first change of `key` after `after` that `counts`, as
    /// [`deleted_since`](Hub::deleted_since) answers.
    fn first_since(
        &self,
        prefix: &[u8],
        key: &[u8],
        after: Revision,
        upto: Revision,
        counts: impl Fn(Change) -> bool,
    ) -> Option<Option<Revision>> {
        let pw = self.get(prefix)?;
        let st = pw.state();
        // The answer must cover every revision in (after, upto]: the buffer must start no
        // later than after + 1, and the watch must have delivered everything up to `upto`.
        if !st.alive || st.buffer_from > after + 1 || st.progress < upto {
            return None;
        }
        let found = st
            .since(after)
            .find(|(_, k, change)| counts(*change) && k.as_slice() == key)
            .map(|(rev, _, _)| *rev);
        Some(found)
    }

    /// Have `hook` told of every delete (and every key freed: see [`OnEveryDelete`]) under
    /// `prefix` after revision `after` (the
    /// caller's read), by this client's shared watch on it, opened from etcd's next write
    /// if there is none: the buffered deletes at once, then each as it comes, in revision
    /// order, until the hook has heard enough. So the waiters of this client that must
    /// count every delete of one queue (a semaphore's) cost etcd one watch and one event
    /// per delete, and a delete costs each of them a call in place, not a task's wake-up.
    ///
    /// False if the watch, opened now, started after the read: the hook is dropped, and
    /// the caller reads again at once. When the watch breaks later, the hook is dropped too.
    pub(crate) async fn subscribe_deletes(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        prefix: &[u8],
        after: Revision,
        mut hook: Box<dyn OnEveryDelete>,
    ) -> Result<bool> {
        let mut pw = match self.get(prefix) {
            Some(pw) => pw,
            None => self.open_from_now(store, prefix).await?,
        };
        let mut replaced = false;
        loop {
            {
                let mut st = pw.state();
                let covered = st.alive && st.buffer_from <= after + 1;
                if !covered && st.alive && st.buffer_from == st.opened_after + 1 {
                    return Ok(false);
                }
                if covered {
                    let heard_enough = st
                        .since(after)
                        .any(|(rev, key, change)| change.leaves() && hook.deleted(*rev, key));
                    if !heard_enough {
                        st.all.push(Subscriber { after, hook });
                    }
                    return Ok(true);
                }
            }
            if replaced {
                // A watch opened just now from right after our read that is dead already.
                return Ok(false);
            }
            // Dead, or it dropped deletes since our read from its buffer.
            pw = self.replace(store, prefix, &pw, after).await?;
            replaced = true;
        }
    }

    /// Replace the shared watch `pw` on `prefix`, which died or dropped events since a
    /// read at `after`: from now if it died, else from right after that read (which covers
    /// the reader, at the price of etcd's sweep). The old watch's waiters are told to read
    /// again (hooks hold no receiver that would tell them when it is dropped).
    async fn replace(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        prefix: &[u8],
        pw: &Arc<PrefixWatch>,
        after: Revision,
    ) -> Result<Arc<PrefixWatch>> {
        self.forget(prefix, pw);
        let alive = pw.state().alive;
        pw.die();
        self.open(store, prefix, if alive { Some(after) } else { None })
            .await
    }

    /// The shared watch on `prefix` whose task runs whenever the caller's does: the one of
    /// the caller's current-thread runtime, else one of a multi-thread runtime (never one
    /// of another current-thread runtime, which may idle: see [`current_thread_id`]).
    fn get(&self, prefix: &[u8]) -> Option<Arc<PrefixWatch>> {
        let map = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        let in_slot = |rt| map.get(&rt).and_then(|by_prefix| by_prefix.get(prefix));
        match current_thread_id() {
            Some(here) => in_slot(Some(here)).or_else(|| in_slot(None)),
            None => in_slot(None),
        }
        .cloned()
    }

    /// Start opening the shared watch on `prefix` in the background, unless it is open or
    /// being opened: for a holder that holds the same name again, whose own watch may be
    /// stopped (a short hold) before it has run at all.
    pub(crate) fn open_soon(self: &Arc<Self>, store: &Arc<dyn Store>, prefix: &[u8]) {
        let opening = self
            .opening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&slot(prefix));
        if opening || self.get(prefix).is_some() {
            return;
        }
        let (hub, store, prefix) = (self.clone(), store.clone(), prefix.to_vec());
        tokio::spawn(async move {
            if let Err(e) = hub.open_from_now(&store, &prefix).await {
                tracing::debug!(error = %e, "opening the shared watch failed");
            }
        });
    }

    /// The shared watch on `prefix`, opened from etcd's next write if there is none.
    ///
    /// The open runs in a task of its own, which one caller starts and any others who need
    /// the same prefix meanwhile wait for. It completes even if its callers are dropped: a
    /// holder's loss watch is dropped at unlock, often before etcd has answered the create
    /// request of a first watch. Were the open dropped with it, a client that locks and
    /// unlocks the same name would start and cancel a watch stream on (nearly) every hold,
    /// and never get the shared watch it is meant to keep.
    ///
    /// When an open fails, its starter gets the error, and one of those who waited for it
    /// starts the next: each caller tries at most once itself.
    async fn open_from_now(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        prefix: &[u8],
    ) -> Result<Arc<PrefixWatch>> {
        loop {
            if let Some(pw) = self.get(prefix) {
                return Ok(pw);
            }
            let (notify, started) = {
                let mut opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
                match opening.get(&slot(prefix)) {
                    Some(n) => (n.clone(), false),
                    None => {
                        let n = Arc::new(Notify::new());
                        opening.insert(slot(prefix), n.clone());
                        (n, true)
                    }
                }
            };
            if !started {
                let done = notify.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                let pending = self
                    .opening
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&slot(prefix))
                    .is_some_and(|n| Arc::ptr_eq(n, &notify));
                if pending {
                    done.await;
                }
                // Opened, or the open failed and the first of us to get here opens next.
                continue;
            }
            let (hub, store, key) = (self.clone(), store.clone(), prefix.to_vec());
            // Also when the task is dropped unfinished, even before it first ran (its runtime
            // shut down): an entry left in `opening` would make every later wait on the
            // prefix wait for it. So the guard is made here, not in the task.
            let ended = OpenEnded {
                hub: hub.clone(),
                slot: slot(&key),
                notify,
            };
            let opened = tokio::spawn(async move {
                let _ended = ended;
                hub.open(&store, &key, None).await
            });
            return match opened.await {
                Ok(opened) => opened,
                Err(e) => Err(crate::error::Error::Store(format!(
                    "opening the shared watch failed: {e}"
                ))),
            };
        }
    }

    fn forget(&self, prefix: &[u8], pw: &Arc<PrefixWatch>) {
        let mut map = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(by_prefix) = map.get_mut(&pw.runtime) {
            if by_prefix
                .get(prefix)
                .is_some_and(|cur| Arc::ptr_eq(cur, pw))
            {
                by_prefix.remove(prefix);
            }
            if by_prefix.is_empty() {
                map.remove(&pw.runtime);
            }
        }
    }

    /// Open a shared watch on `prefix`, from `after + 1` or (`None`) from the next write,
    /// and start its task.
    async fn open(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        prefix: &[u8],
        after: Option<Revision>,
    ) -> Result<Arc<PrefixWatch>> {
        // Puts too: see the module docs.
        let watch = Watch::prefix(prefix.to_vec());
        let (after, stream) = match after {
            Some(after) => (after, store.watch(watch.from_revision(after + 1)).await?),
            None => store.watch_from_now(watch).await?,
        };
        Counters::add(&self.counters.watches_opened);
        let runtime = current_thread_id();
        let pw = Arc::new(PrefixWatch {
            // Its task is spawned below, on the caller's runtime.
            runtime,
            state: StdMutex::new(State {
                alive: true,
                opened_after: after,
                buffer_from: after + 1,
                progress: after,
                recent: VecDeque::new(),
                waiters: HashMap::new(),
                all: Vec::new(),
            }),
        });
        // A watch replaced here is dropped after the map's lock is released: its Drop tells
        // its hooks, which must not run under the lock.
        let replaced = self
            .prefixes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(runtime)
            .or_default()
            .insert(prefix.to_vec(), pw.clone());
        drop(replaced);
        let span = tracing::debug_span!("prefix_watch", prefix = %String::from_utf8_lossy(prefix));
        // However the task ends (its loop breaks, it panics, or it is dropped with its
        // runtime, even before it first ran), the watch is marked dead and its waiters told.
        let dead_at_end = DeadAtEnd {
            hub: Arc::downgrade(self),
            prefix: prefix.to_vec(),
            pw: Arc::downgrade(&pw),
        };
        tokio::spawn(run(dead_at_end, Arc::downgrade(&pw), stream).instrument(span));
        Ok(pw)
    }
}

/// Ends an open of a shared watch, however its task ends: removes its `opening` entry and
/// wakes those who wait for it (who then find the watch, or open it themselves).
struct OpenEnded {
    hub: Arc<Hub>,
    slot: Slot,
    notify: Arc<Notify>,
}

impl Drop for OpenEnded {
    fn drop(&mut self) {
        let mut opening = self.hub.opening.lock().unwrap_or_else(|e| e.into_inner());
        if opening
            .get(&self.slot)
            .is_some_and(|n| Arc::ptr_eq(n, &self.notify))
        {
            opening.remove(&self.slot);
        }
        drop(opening);
        self.notify.notify_waiters();
    }
}

/// Forget the waiters whose caller gave up (or was answered through another key).
fn prune(st: &mut State) {
    st.waiters.retain(|_, ws| {
        ws.retain(|w| !w.is_closed());
        !ws.is_empty()
    });
    st.all.retain(|sub| !sub.hook.is_closed());
}

/// Feed one prefix watch's events to its waiters until it breaks or goes idle.
async fn run(dead_at_end: DeadAtEnd, pw: Weak<PrefixWatch>, mut stream: crate::store::WatchStream) {
    let _dead_at_end = dead_at_end;
    let mut idle_check = tokio::time::interval(IDLE);
    idle_check.tick().await;
    let mut idle_ticks = 0u32;
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = idle_check.tick() => {
                let Some(pw) = pw.upgrade() else { break };
                let idle = {
                    let mut st = pw.state();
                    prune(&mut st);
                    st.waiters.is_empty() && st.all.is_empty()
                };
                idle_ticks = if idle { idle_ticks + 1 } else { 0 };
                if idle_ticks >= 2 {
                    break;
                }
                continue;
            }
        };
        let Some(pw) = pw.upgrade() else { break };
        let Some(Ok(resp)) = item else {
            tracing::debug!("prefix watch ended; waiters will read again");
            break;
        };
        let mut st = pw.state();
        for ev in resp.events {
            let rev = ev.kv.mod_revision;
            st.progress = st.progress.max(rev);
            // A put that created its key: nobody waits for that, and it is not kept.
            let Some(change) = Change::of(ev.kind, &ev.kv) else {
                continue;
            };
            if change.leaves() {
                st.all
                    .retain_mut(|sub| rev <= sub.after || !sub.hook.deleted(rev, &ev.kv.key));
                if let Some(ws) = st.waiters.get_mut(&ev.kv.key) {
                    ws.retain(|w| {
                        if rev <= w.after {
                            return true;
                        }
                        match change {
                            // Whoever waits on a freed key reads it again (see
                            // `Waiter::freed`).
                            Change::Freed => w.freed(),
                            _ => w.send(Woken::Deleted(rev)),
                        }
                        false
                    });
                    if ws.is_empty() {
                        st.waiters.remove(&ev.kv.key);
                    }
                }
            }
            st.recent.push_back((rev, ev.kv.key, change));
        }
        // Drop the oldest revisions beyond the buffer, whole revisions at a time.
        while st.recent.len() > BUFFER {
            let Some((oldest, _, _)) = st.recent.front().cloned() else {
                break;
            };
            while st.recent.front().is_some_and(|(r, _, _)| *r == oldest) {
                st.recent.pop_front();
            }
            st.buffer_from = oldest + 1;
        }
        prune(&mut st);
    }
}

/// Marks a prefix watch dead when its task ends: wakes everyone to read again, and lets the
/// next waiter open a fresh watch. A task can also end by being dropped, when the runtime
/// it was spawned on shuts down while the client lives on in another: its waiters would
/// otherwise wait on a watch that nobody feeds.
struct DeadAtEnd {
    hub: Weak<Hub>,
    prefix: Vec<u8>,
    pw: Weak<PrefixWatch>,
}

impl Drop for DeadAtEnd {
    fn drop(&mut self) {
        if let Some(pw) = self.pw.upgrade() {
            pw.die();
            if let Some(hub) = self.hub.upgrade() {
                hub.forget(&self.prefix, &pw);
            }
        }
    }
}

/// A watch dropped with waiters still registered (replaced, or forgotten while a hook was
/// registering with it) tells its hooks to watch by other means. Waiters of
/// [`Hub::wait_delete`] learn it from their answer's sender being dropped.
impl Drop for PrefixWatch {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, ws) in st.waiters.drain() {
            for w in ws {
                if let Sink::Hook(hook) = &w.sink {
                    hook.woken(Woken::Interrupted);
                }
            }
        }
    }
}

impl PrefixWatch {
    /// Mark the watch dead and tell every waiter to read again.
    fn die(&self) {
        let mut st = self.state();
        st.alive = false;
        // Dropped hooks tell their callers, who read again.
        st.all.clear();
        for (_, ws) in st.waiters.drain() {
            for w in ws {
                w.send(Woken::Interrupted);
            }
        }
    }
}

impl Hub {
    /// True if this client has a live shared watch on `prefix`.
    pub(crate) fn is_live(&self, prefix: &[u8]) -> bool {
        self.get(prefix).is_some_and(|pw| pw.state().alive)
    }

    /// Note that this client holds a key under `prefix` now; true if it already did within
    /// [`IDLE`]. A client that locks the same name again and again is better served by the
    /// shared watch (opened once, then an in-process registration per hold) than by a watch
    /// and a read per hold.
    pub(crate) fn held_again(&self, prefix: &[u8]) -> bool {
        let now = tokio::time::Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        // Forget old prefixes now and then: when the map has doubled since the last time,
        // so that a client holding many names at once does not scan them on every hold.
        if held.at.len() >= held.prune_at.max(HELD_PRUNE_AT) {
            held.at.retain(|_, at| now.duration_since(*at) < IDLE);
            held.prune_at = 2 * held.at.len();
        }
        held.at
            .insert(prefix.to_vec(), now)
            .is_some_and(|at| now.duration_since(at) < IDLE)
    }
}

/// Wait, without the shared watch, until one of `keys` (each with the create revision it
/// must have, and what it must stay bound to) is deleted or replaced; returns its index and
/// `"key deleted"` or `"key replaced"`. `Ok(None)` if a watch ended first: the caller reads
/// again.
///
/// A key with [`Binding::Lease`] (a holder's or a waiter's own key), overwritten so that it
/// is no longer bound to that lease (`etcdctl put KEY ""`: no lease; `etcdctl put
/// --lease=OTHER KEY`: another owner's), counts as gone too, with `"key overwritten"`: with
/// no lease it no longer counts as a member of its queue (see
/// [`Queue::admits`](crate::names::Queue::admits)), so another waiter may be granted. A key
/// with [`Binding::SomeLease`] (a waiter's predecessor) counts as gone when overwritten with
/// no lease: freed, it is no member any more, and the waiter reads again (moves up).
///
/// Each key gets a watch of its own, started at the store's next write, so etcd serves it
/// from its synced group at once (a watch started at a past revision waits for etcd's
/// 100 ms sweep), and it receives only that key's events (a prefix watch receives every
/// event of the queue: with N separate clients waiting, each release would cost N
/// messages). The gap between the caller's read and the watches' start is closed by one
/// read of the keys after the watches are registered; events up to that read are older
/// than what it saw and are ignored (a key's name is reused, so an old delete can name it).
///
/// With `doubt`, on etcd, while the watches have delivered nothing, the keys are read again
/// 30 ms and 70 ms after their creation: a watch can start behind etcd's revision even so,
/// and is then served only at etcd's 100 ms sweep (see [`Doubt`](crate::watching::Doubt)).
/// A holder watching its key wants that; a waiter deep in a long queue does not (its
/// predecessor leaves long after the sweep, and a thousand waiters would read twice each).
pub(crate) async fn keys_gone(
    hub: &Hub,
    store: &Arc<dyn Store>,
    keys: &[(&[u8], Revision, Binding)],
    doubt: bool,
) -> Result<Option<(usize, &'static str)>> {
    let mut streams = Vec::with_capacity(keys.len());
    for (index, (key, _, _)) in keys.iter().enumerate() {
        let stream = store.watch(Watch::key(key.to_vec())).await?;
        Counters::add(&hub.counters.watches_opened);
        // One stream ending must not go unnoticed while the others live on: its end is an
        // item too, after which the caller reads again.
        let ended = futures::stream::once(async move { (index, None) });
        streams.push(
            stream
                .map(move |batch| (index, Some(batch)))
                .chain(ended)
                .boxed(),
        );
    }
    let mut doubt = crate::watching::Doubt::new(store.as_ref(), doubt);
    let mut seen = match read_keys(store, keys).await? {
        Ok(seen) => seen,
        Err(gone) => return Ok(Some(gone)),
    };
    let mut events = futures::stream::select_all(streams);
    loop {
        let Some(item) = doubt.next(&mut events).await else {
            match read_keys(store, keys).await? {
                Ok(now) => seen = now,
                Err(gone) => return Ok(Some(gone)),
            }
            continue;
        };
        let Some((index, Some(batch))) = item else {
            break;
        };
        let batch = match batch {
            Ok(batch) => batch,
            // Compacted past our watch's start (etcd cancels a watch left behind, before its
            // sweep, by a compaction): the caller reads again.
            Err(Error::Compacted { .. }) => break,
            Err(e) => return Err(e),
        };
        let (_, create_rev, binding) = keys[index];
        for ev in batch.events.iter().filter(|ev| ev.kv.mod_revision > seen) {
            let now = (ev.kind != EventKind::Delete).then_some(&ev.kv);
            if let Some(why) = gone_why(now, create_rev, binding) {
                return Ok(Some((index, why)));
            }
        }
    }
    Ok(None)
}

/// What a key watched by [`keys_gone`] (or read by [`gone_why`]) must stay bound to, besides
/// keeping its create revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Binding {
    /// Nothing: a put that keeps the create revision is no change (keys with no lease, in
    /// tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Any,
    /// Some lease: a put with none (freed: a member of no queue) counts as gone. A waiter's
    /// predecessor: bound to another lease, it is still a member.
    SomeLease,
    /// This lease: a holder's or a waiter's own key.
    Lease(LeaseId),
}

/// Why a held key read as `kv` (`None`: not found) is no longer the one created at
/// `create_rev`, bound as `binding` says: `"key deleted"`, `"key replaced"` or `"key
/// overwritten"`; `None` if it still is.
pub(crate) fn gone_why(
    kv: Option<&crate::store::KeyValue>,
    create_rev: Revision,
    binding: Binding,
) -> Option<&'static str> {
    let unbound = |lease: LeaseId| match binding {
        Binding::Any => false,
        Binding::SomeLease => lease == 0,
        Binding::Lease(ours) => lease != ours,
    };
    match kv {
        None => Some("key deleted"),
        Some(kv) if kv.create_revision != create_rev => Some("key replaced"),
        Some(kv) if unbound(kv.lease) => Some("key overwritten"),
        Some(_) => None,
    }
}

/// Read `keys`: the revision of the read if each still has its create revision (and is
/// bound as its binding says), else the index of the first that does not, and whether it
/// was deleted, replaced or overwritten.
async fn read_keys(
    store: &Arc<dyn Store>,
    keys: &[(&[u8], Revision, Binding)],
) -> Result<std::result::Result<Revision, (usize, &'static str)>> {
    use crate::store::{Range, Txn, TxnOp, TxnOpResponse};
    let read = store
        .txn(Txn::new().and_then(keys.iter().map(|(key, _, _)| TxnOp::get(Range::key(*key)))))
        .await?;
    for (index, (resp, (_, create_rev, binding))) in read.responses.iter().zip(keys).enumerate() {
        let now = match resp {
            TxnOpResponse::Get(g) => g.kvs.first(),
            _ => None,
        };
        if let Some(why) = gone_why(now, *create_rev, *binding) {
            return Ok(Err((index, why)));
        }
    }
    Ok(Ok(read.header_revision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::slow::SlowWatches;

    /// A runtime of its own, for tests of a client used from more than one.
    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A put that binds a session's key (`NAME/<lease in hex>`) to another lease frees it
    /// as far as its waiters know; keys named otherwise, and a session's own rewrites, do
    /// not.
    #[test]
    fn a_key_bound_to_another_lease_than_its_name_says_is_freed() {
        let put = |key: &[u8], lease: LeaseId, version: i64| {
            let kv = KeyValue {
                key: key.to_vec(),
                lease,
                version,
                ..KeyValue::default()
            };
            Change::of(EventKind::Put, &kv)
        };
        assert_eq!(put(b"lock/694d", 0x694d, 2), Some(Change::Rewritten));
        assert_eq!(put(b"lock/694d", 0x694e, 2), Some(Change::Freed));
        assert_eq!(put(b"lock/694d", 0, 2), Some(Change::Freed));
        assert_eq!(put(b"lock/694d", 0x694e, 1), None, "a create");
        assert_eq!(put(b"lock/read/694d", 7, 2), Some(Change::Freed));
        // Go's read-write lock: decimal nanoseconds, no lease named.
        assert_eq!(
            put(b"rw/read/1733500000000000000", 7, 2),
            Some(Change::Rewritten)
        );
        for unnamed in [&b"v/694D"[..], b"v/x", b"v/", b"v/0", b"v/ffffffffffffffff"] {
            assert_eq!(named_lease(unnamed), None, "{unnamed:?}");
        }
        assert_eq!(named_lease(b"7fffffffffffffff"), Some(LeaseId::MAX));
    }

    /// A shared watch is opened from the store's next write: a waiter that read before the
    /// latest write is told to read again (no sweep to wait for, no gap), and once it has
    /// read at the current revision it is woken by the next delete, by an overwrite with no
    /// lease (freed: it reads again), and by nothing else. (The keys are named after no
    /// lease: see `a_key_bound_to_another_lease_than_its_name_says_is_freed`.)
    #[tokio::test]
    async fn a_new_watch_starts_now_and_older_reads_read_again() {
        use crate::store::mem::MemStore;
        use crate::store::KeyRange;
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let hub = Arc::new(Hub::default());
        let read_at = store.put(b"q/ka", b"", 0).await.unwrap();
        let now = store.put(b"q/kb", b"", 0).await.unwrap();
        let answer = hub.wait_delete(&store, b"q/", &[b"q/ka"], read_at).await;
        assert_eq!(answer.unwrap(), (0, Woken::Reread));
        assert!(hub.is_live(b"q/"));
        assert_eq!(hub.deleted_since(b"q/", b"q/ka", read_at, read_at), None);
        assert_eq!(hub.deleted_since(b"q/", b"q/ka", now, now), Some(None));

        let waiting = {
            let (hub, store) = (hub.clone(), store.clone());
            tokio::spawn(async move {
                hub.wait_delete(&store, b"q/", &[b"q/kb", b"q/ka"], now)
                    .await
            })
        };
        tokio::task::yield_now().await;
        let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap().id;
        // Created, and written again bound to a lease: no wake-up.
        store.put(b"q/kc", b"", lease).await.unwrap();
        let bound = store.put(b"q/ka", b"bound", lease).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "woken by a put");
        assert_eq!(
            hub.changed_since(b"q/", b"q/ka", now, bound),
            Some(Some(bound))
        );
        assert_eq!(hub.deleted_since(b"q/", b"q/ka", now, bound), Some(None));
        let freed = store.put(b"q/ka", b"again", 0).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("not woken by the overwrite with no lease")
            .unwrap()
            .unwrap();
        assert_eq!(answer, (1, Woken::Reread));
        let answer = hub
            .wait_delete(&store, b"q/", &[b"q/kb", b"q/ka"], now)
            .await;
        assert_eq!(answer.unwrap(), (1, Woken::Reread), "the buffer forgot it");
        let waiting = {
            let (hub, store) = (hub.clone(), store.clone());
            tokio::spawn(async move {
                hub.wait_delete(&store, b"q/", &[b"q/kb", b"q/ka"], freed)
                    .await
            })
        };
        tokio::task::yield_now().await;
        let (_, deleted) = store.delete(KeyRange::key("q/ka")).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("not woken by the delete")
            .unwrap()
            .unwrap();
        assert_eq!(answer, (1, Woken::Deleted(deleted)));
        assert_eq!(hub.counters.snapshot().watches_opened, 1);
    }

    /// A wait dropped while the shared watch is being created (a holder that unlocks within
    /// a round trip) does not abort the open, and waits that start meanwhile share it: the
    /// next hold finds the watch open, and one watch was created in all.
    /// The deletes a [`Record`] heard.
    type Heard = Arc<StdMutex<Vec<(Revision, Vec<u8>)>>>;

    /// Records every delete it is told of, until `enough` of them.
    struct Record {
        heard: Heard,
        enough: usize,
        _tx: oneshot::Sender<()>,
    }

    impl OnEveryDelete for Record {
        fn deleted(&mut self, rev: Revision, key: &[u8]) -> bool {
            let mut heard = self.heard.lock().unwrap();
            heard.push((rev, key.to_vec()));
            heard.len() >= self.enough
        }
        fn is_closed(&self) -> bool {
            self._tx.is_closed()
        }
    }

    /// A subscriber to every delete: told again at once if its read is older than a
    /// watch opened now; else told of the buffered deletes after its read, then of each
    /// new one (never of puts), until it has heard enough, when it is dropped; and dropped
    /// when the watch dies, which its caller learns from its receiver.
    #[tokio::test]
    async fn a_subscriber_hears_every_delete_after_its_read() {
        use crate::store::mem::MemStore;
        use crate::store::KeyRange;
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let hub = Arc::new(Hub::default());
        let old_read = store.put(b"q/a", b"", 0).await.unwrap();
        store.put(b"q/b", b"", 0).await.unwrap();
        store.put(b"q/c", b"", 0).await.unwrap();
        let heard: Heard = Arc::default();
        let record = |enough| {
            let (tx, rx) = oneshot::channel();
            let hook = Box::new(Record {
                heard: heard.clone(),
                enough,
                _tx: tx,
            });
            (hook, rx)
        };
        let (hook, rx) = record(3);
        assert!(!hub
            .subscribe_deletes(&store, b"q/", old_read, hook)
            .await
            .unwrap());
        assert!(
            rx.await.is_err(),
            "the hook is dropped when told to read again"
        );
        let read = store.put(b"q/d", b"", 0).await.unwrap();
        let (_, d1) = store.delete(KeyRange::key(&b"q/a"[..])).await.unwrap();
        store.put(b"q/e", b"", 0).await.unwrap();
        let (hook, mut rx) = record(3);
        assert!(hub
            .subscribe_deletes(&store, b"q/", read, hook)
            .await
            .unwrap());
        let (_, d2) = store.delete(KeyRange::key(&b"q/b"[..])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        let (_, d3) = store.delete(KeyRange::key(&b"q/c"[..])).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), &mut rx)
            .await
            .expect("not dropped after hearing enough")
            .unwrap_err();
        assert_eq!(
            *heard.lock().unwrap(),
            vec![
                (d1, b"q/a".to_vec()),
                (d2, b"q/b".to_vec()),
                (d3, b"q/c".to_vec())
            ]
        );
        // The watch dies: a waiting subscriber's receiver ends.
        let (hook, rx) = record(100);
        let now = store.put(b"q/f", b"", 0).await.unwrap();
        assert!(hub
            .subscribe_deletes(&store, b"q/", now, hook)
            .await
            .unwrap());
        hub.get(b"q/").unwrap().die();
        tokio::time::timeout(Duration::from_secs(1), rx)
            .await
            .expect("not told of the dead watch")
            .unwrap_err();
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_outlives_its_dropped_caller_and_is_shared() {
        // Watches take DELAY to create; once created they deliver at once.
        const DELAY: Duration = Duration::from_millis(50);
        let slow = Arc::new(SlowWatches::new("mem", DELAY, Duration::ZERO));
        let store: Arc<dyn Store> = slow.clone();
        let hub = Arc::new(Hub::default());
        let at = store.put(b"q/a", b"", 0).await.unwrap();
        let dropped =
            tokio::time::timeout(DELAY / 5, hub.wait_delete(&store, b"q/", &[b"q/a"], at)).await;
        assert!(dropped.is_err(), "the wait was dropped during the open");
        assert!(!hub.is_live(b"q/"), "not open yet");
        let (h1, h2, s1, s2) = (hub.clone(), hub.clone(), store.clone(), store.clone());
        let first = tokio::spawn(async move { h1.wait_delete(&s1, b"q/", &[b"q/a"], at).await });
        let second = tokio::spawn(async move { h2.wait_delete(&s2, b"q/", &[b"q/a"], at).await });
        tokio::time::sleep(DELAY * 2).await;
        assert!(hub.is_live(b"q/"), "the dropped caller's open completed");
        // Nothing was written since their read: both registered, and the delete wakes both.
        let (_, deleted) = store
            .delete(crate::store::KeyRange::key("q/a"))
            .await
            .unwrap();
        assert_eq!(first.await.unwrap().unwrap(), (0, Woken::Deleted(deleted)));
        assert_eq!(second.await.unwrap().unwrap(), (0, Woken::Deleted(deleted)));
        assert_eq!(
            slow.created_from_now.load(Ordering::Relaxed),
            1,
            "one watch created"
        );
        assert_eq!(hub.counters.snapshot().watches_opened, 1);
        // A later wait registers with the same watch.
        let now = store.put(b"q/b", b"", 0).await.unwrap();
        let waiting = {
            let (hub, store) = (hub.clone(), store.clone());
            tokio::spawn(async move { hub.wait_delete(&store, b"q/", &[b"q/b"], now).await })
        };
        tokio::task::yield_now().await;
        let (_, deleted) = store
            .delete(crate::store::KeyRange::key("q/b"))
            .await
            .unwrap();
        assert_eq!(
            waiting.await.unwrap().unwrap(),
            (0, Woken::Deleted(deleted))
        );
        assert_eq!(
            slow.created_from_now.load(Ordering::Relaxed),
            1,
            "still one watch"
        );
    }

    /// A key watch that etcd would serve only at its sweep does not hold up the answer: the
    /// key is read again 30 ms after the watch's creation, and its delete is found then.
    #[tokio::test(start_paused = true)]
    async fn keys_gone_reads_again_while_its_watch_is_silent() {
        let store: Arc<dyn Store> = Arc::new(SlowWatches::etcd_unsynced());
        let hub = Hub::default();
        let created = store.put(b"q/a", b"", 0).await.unwrap();
        let start = tokio::time::Instant::now();
        let deleting = {
            let store = store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                store.delete(crate::store::KeyRange::key("q/a")).await
            })
        };
        let answer = keys_gone(&hub, &store, &[(b"q/a", created, Binding::Any)], true)
            .await
            .unwrap();
        assert_eq!(answer, Some((0, "key deleted")));
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(30),
            "not at the sweep"
        );
        deleting.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn held_again_only_within_idle_and_prunes() {
        let hub = Hub::default();
        assert!(!hub.held_again(b"a/"), "first hold");
        assert!(hub.held_again(b"a/"), "again at once");
        tokio::time::advance(IDLE + Duration::from_millis(1)).await;
        assert!(!hub.held_again(b"a/"), "again after IDLE");
        for i in 0..3000 {
            hub.held_again(format!("p{i}/").as_bytes());
        }
        assert!(hub.held_again(b"p2999/"));
        assert!(hub.held_again(b"a/"), "kept: held again within IDLE");
        tokio::time::advance(IDLE + Duration::from_millis(1)).await;
        for i in 0..HELD_PRUNE_AT * 8 {
            hub.held_again(format!("q{i}/").as_bytes());
        }
        let held = hub.held.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            !held.at.contains_key(b"p0/".as_slice()),
            "old prefixes are forgotten"
        );
    }

    /// A session on `client` and its mutex `hooked`, locked and unlocked twice.
    async fn held_twice(client: &crate::Client) -> (crate::Session, crate::Mutex) {
        let session = crate::Session::builder(client)
            .with_ttl(Duration::from_secs(10))
            .build()
            .await
            .unwrap();
        let mutex = crate::Mutex::new(&session, "hooked").unwrap();
        for _ in 0..2 {
            mutex.lock().await.unwrap().unlock().await.unwrap();
        }
        (session, mutex)
    }

    /// A session that holds the same name again and again, with the mutex's key as it is
    /// held for the third time: the first hold notes the prefix, the second opens the
    /// client's shared watch, and the third registers with it as a hook (no task).
    async fn third_hold(
        client: &crate::Client,
    ) -> (crate::Session, crate::MutexGuard, Vec<u8>, Arc<PrefixWatch>) {
        let (session, mutex) = held_twice(client).await;
        // The open the second hold started completes in a task of its own.
        eventually("the second hold opened the shared watch", || {
            client.hub().is_live(b"hooked/")
        })
        .await;
        let guard = mutex.lock().await.unwrap();
        let key = guard.key().as_bytes().to_vec();
        let opened = client.hub().counters.snapshot().watches_opened;
        assert!(
            (1..=2).contains(&opened),
            "the shared watch, and a key watch if the first hold's ran: {opened}"
        );
        let pw = client.hub().get(b"hooked/").expect("still open");
        let hooks = pw.state().waiters.get(&key).map(|ws| {
            ws.iter()
                .filter(|w| matches!(w.sink, Sink::Hook(_)))
                .count()
        });
        assert_eq!(hooks, Some(1), "the holder is a hook on the shared watch");
        (session, guard, key, pw)
    }

    /// Wait up to 5 s (real time) for `cond`, polling every millisecond.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "not within 5 s: {what}");
    }

    /// The guard is still held 50 ms on; then delete the held key behind the holder's back:
    /// `lost()` fires, for that reason.
    async fn delete_and_see_it_lost(
        client: &crate::Client,
        key: Vec<u8>,
        guard: &crate::MutexGuard,
    ) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!guard.is_lost(), "{:?}", guard.lost_reason());
        let store = client.store();
        store
            .delete(crate::store::KeyRange::key(key))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), guard.lost())
            .await
            .expect("lost() fired");
        assert_eq!(guard.lost_reason().as_deref(), Some("key deleted"));
    }

    /// A holder registered as a hook hears of its key's delete from the shared watch.
    #[tokio::test]
    async fn a_hooked_holder_hears_of_the_delete() {
        let client = crate::Client::memory();
        let (_session, guard, key, _) = third_hold(&client).await;
        delete_and_see_it_lost(&client, key, &guard).await;
        let err = guard.unlock().await.unwrap_err();
        assert!(matches!(err, crate::Error::NotHeld { .. }), "{err}");
    }

    /// When the shared watch breaks, a hooked holder is not lost: a task of its own takes
    /// over (reading the key), and hears of a later delete.
    #[tokio::test]
    async fn a_hooked_holder_survives_a_broken_shared_watch() {
        let client = crate::Client::memory();
        let (_session, guard, key, pw) = third_hold(&client).await;
        pw.die();
        client.hub().forget(b"hooked/", &pw);
        assert!(
            pw.state().waiters.is_empty(),
            "the hook was told and dropped"
        );
        delete_and_see_it_lost(&client, key, &guard).await;
    }

    /// A shared watch replaced because a waiter's read is older than its buffer tells its
    /// hooks: a hooked holder is not left without a loss watch, and hears of a later delete.
    #[tokio::test]
    async fn a_hooked_holder_survives_its_watch_being_replaced() {
        let client = crate::Client::memory();
        let (_session, guard, key, pw) = third_hold(&client).await;
        drop(pw);
        let store = client.store().clone();
        let old_read = store.put(b"hooked/old", b"", 0).await.unwrap();
        let mut last = old_read;
        for i in 0..BUFFER + 10 {
            let other = format!("hooked/churn{i}");
            store.put(other.as_bytes(), b"", 0).await.unwrap();
            last = store
                .delete(crate::store::KeyRange::key(other))
                .await
                .unwrap()
                .1;
        }
        let seen_all = || {
            client
                .hub()
                .get(b"hooked/")
                .is_some_and(|pw| pw.state().progress >= last)
        };
        eventually("the shared watch saw the churn", seen_all).await;
        // A wait from before the churn replaces the watch (it waits on: give up soon).
        let waiting = client
            .hub()
            .wait_delete(&store, b"hooked/", &[b"hooked/old"], old_read);
        let _ = tokio::time::timeout(Duration::from_millis(50), waiting).await;
        delete_and_see_it_lost(&client, key, &guard).await;
    }

    /// `keys_gone` notices when one of its watches ends (cleanly, or compacted) while the
    /// others live on: it answers "read again" instead of waiting on the rest for good.
    #[tokio::test]
    async fn keys_gone_notices_one_watch_ending() {
        use crate::store::KeyRange;
        for compacted in [false, true] {
            let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
            let store: Arc<dyn Store> = slow.clone();
            let hub = Hub::default();
            let a = store.put(b"q/a", b"", 0).await.unwrap();
            let b = store.put(b"q/b", b"", 0).await.unwrap();
            *slow.end_watch_on.lock().unwrap() = Some((b"q/a".to_vec(), compacted));
            let deleting = {
                let store = store.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    store.delete(KeyRange::key(b"q/a".to_vec())).await.unwrap();
                })
            };
            let answer = tokio::time::timeout(
                Duration::from_secs(3),
                keys_gone(
                    &hub,
                    &store,
                    &[(b"q/a", a, Binding::Any), (b"q/b", b, Binding::Any)],
                    false,
                ),
            )
            .await
            .unwrap_or_else(|_| panic!("keys_gone hung (compacted: {compacted})"));
            let answer = answer.unwrap();
            assert!(
                matches!(answer, None | Some((0, _))),
                "compacted {compacted}: {answer:?}"
            );
            deleting.await.unwrap();
        }
    }

    /// An open of the shared watch whose task died with its runtime (the client is used
    /// from more than one) leaves nothing behind: a later waiter on another runtime is not
    /// held up by it (it is told to read again), and a new shared watch can be opened.
    #[test]
    fn an_open_dropped_with_its_runtime_blocks_nobody() {
        let store: Arc<dyn Store> = Arc::new(SlowWatches::new(
            "mem",
            Duration::from_millis(200),
            Duration::ZERO,
        ));
        let hub = Arc::new(Hub::default());
        let first = current_thread();
        first.block_on(async {
            hub.open_soon(&store, b"q/");
            // The open's task is creating its watch (200 ms) when its runtime goes.
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        drop(first);
        a_later_wait_is_not_held_up(&store, &hub);
    }

    /// On a runtime of its own: a wait on `q/` after a read older than the latest write is
    /// told to read again (not held up by an open left behind), and a shared watch opens.
    fn a_later_wait_is_not_held_up(store: &Arc<dyn Store>, hub: &Arc<Hub>) {
        current_thread().block_on(async {
            let read_at = store.put(b"q/a", b"", 0).await.unwrap();
            store.put(b"q/b", b"", 0).await.unwrap();
            let answer = tokio::time::timeout(
                Duration::from_secs(3),
                hub.wait_delete(store, b"q/", &[b"q/a"], read_at),
            )
            .await
            .expect("wait_delete waited for an open that will never end");
            assert_eq!(answer.unwrap(), (0, Woken::Reread));
            assert!(hub.is_live(b"q/"), "a new shared watch was opened");
        });
    }

    /// The same, when the open's task is dropped before it ever ran: its runtime went right
    /// after the caller started it (the caller gave up at once).
    #[test]
    fn an_open_dropped_before_it_ran_blocks_nobody() {
        let store: Arc<dyn Store> =
            Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let hub = Arc::new(Hub::default());
        let first = current_thread();
        first.block_on(async {
            // One poll: the open is registered and its task spawned, then the caller gives up
            // before the runtime runs that task.
            let gave_up = futures::FutureExt::now_or_never(hub.open_from_now(&store, b"q/"));
            assert!(gave_up.is_none());
        });
        drop(first);
        a_later_wait_is_not_held_up(&store, &hub);
    }

    /// A shared watch whose task is dropped with its runtime (the client lives on in another)
    /// tells its waiters and hooks: a waiter reads again instead of waiting forever, and a
    /// hooked holder still hears of its key's delete.
    #[test]
    fn a_watch_dropped_with_its_runtime_tells_its_waiters() {
        // The watch's runtime is a multi-thread one: a shared watch whose task runs on
        // another, current-thread runtime is not used (see `current_thread_id`).
        let watch_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let holder_rt = current_thread();
        let client = crate::Client::memory();
        // The holder's first two holds, on the holder's runtime, note the prefix; the shared
        // watch is then opened on the other runtime, whose task feeds it.
        let (session, mutex) = holder_rt.block_on(held_twice(&client));
        let store = client.store().clone();
        watch_rt.block_on(async {
            client
                .hub()
                .open_from_now(&store, b"hooked/")
                .await
                .unwrap();
        });
        let (guard, waiter) = holder_rt.block_on(async {
            let guard = mutex.lock().await.unwrap();
            let pw = client.hub().get(b"hooked/").expect("open");
            assert!(
                pw.state().waiters.contains_key(guard.key().as_bytes()),
                "hooked"
            );
            let at = store.put(b"hooked/other", b"", 0).await.unwrap();
            let (hub, s) = (client.hub().clone(), store.clone());
            let waiter = tokio::spawn(async move {
                hub.wait_delete(&s, b"hooked/", &[b"hooked/other"], at)
                    .await
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(pw.state().waiters.contains_key(b"hooked/other".as_slice()));
            (guard, waiter)
        });
        drop(watch_rt);
        holder_rt.block_on(async {
            let answer = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("the waiter was told")
                .unwrap()
                .unwrap();
            assert_eq!(answer, (0, Woken::Interrupted));
            let key = guard.key().as_bytes().to_vec();
            delete_and_see_it_lost(&client, key, &guard).await;
            drop(session);
        });
    }

    /// A stopped hook stays registered until the shared watch's next event or idle check,
    /// but does not keep its session alive: dropping the session still revokes its lease.
    #[tokio::test]
    async fn a_left_over_hook_keeps_no_session_alive() {
        let client = crate::Client::memory();
        let (session, guard, _key, pw) = third_hold(&client).await;
        guard.unlock().await.unwrap();
        let lease = session.lease_id();
        // The unlock's delete reaches the hub, which drops the hook told of it.
        eventually("the unlock's delete was seen", || {
            pw.state().waiters.is_empty()
        })
        .await;
        // A hook on a key that sees no event: stopped (dropped), it lingers.
        let now = client.store().put(b"other", b"", 0).await.unwrap();
        let ownership =
            crate::ownership::Ownership::watch(&session, b"hooked/quiet".to_vec(), 1, now + 1);
        drop(ownership);
        let lingers = || pw.state().waiters.contains_key(b"hooked/quiet".as_slice());
        assert!(lingers(), "registered as a hook");
        drop(session);
        let store = client.store().clone();
        let revoked = tokio::time::timeout(Duration::from_secs(5), async {
            while store.lease_time_to_live(lease).await.unwrap().is_some() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(revoked.is_ok(), "the lease was revoked on drop");
        assert!(lingers(), "revoked while the hook was still registered");
    }

    /// Many lock/unlock cycles of sessions of one client on one name, with waiters that are
    /// granted and waiters that give up: once an event has passed, the shared watch keeps no
    /// registration, and no open is left pending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_cycles_leave_no_registration_behind() {
        let client = crate::Client::memory();
        let a = crate::Session::new(&client).await.unwrap();
        let b = crate::Session::new(&client).await.unwrap();
        let ma = crate::Mutex::new(&a, "cycles").unwrap();
        let mb = crate::Mutex::new(&b, "cycles").unwrap();
        for i in 0..200 {
            let g = ma.lock().await.unwrap();
            if i % 2 == 0 {
                let gave_up = mb.lock_timeout(Duration::from_millis(2)).await;
                assert!(gave_up.is_err());
                g.unlock().await.unwrap();
            } else {
                let mb = mb.clone();
                let w = tokio::spawn(async move { mb.lock().await.unwrap().unlock().await });
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(g);
                w.await.unwrap().unwrap();
            }
        }
        let pw = client.hub().get(b"cycles/").expect("the shared watch");
        let store = client.store().clone();
        store.put(b"cycles/zz", b"", 0).await.unwrap();
        let (_, last) = store
            .delete(crate::store::KeyRange::key(b"cycles/zz".to_vec()))
            .await
            .unwrap();
        eventually("the last delete seen", || pw.state().progress >= last).await;
        let st = pw.state();
        let left: Vec<_> = st
            .waiters
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert!(left.is_empty(), "registrations left: {left:?}");
        assert!(st.all.is_empty());
        drop(st);
        assert!(client.hub().opening.lock().unwrap().is_empty());
    }

    /// An open of the shared watch pending on a current-thread runtime that idles (alive,
    /// outside `block_on`) holds up no waiter of another runtime: it is told to read again,
    /// and a shared watch is opened on its own runtime (before: it waited for that open,
    /// which cannot end while its runtime idles; a holder's loss watch did so for good).
    #[test]
    fn an_open_pending_on_an_idle_runtime_blocks_nobody() {
        let store: Arc<dyn Store> = Arc::new(SlowWatches::new(
            "mem",
            Duration::from_millis(200),
            Duration::ZERO,
        ));
        let hub = Arc::new(Hub::default());
        let idle = current_thread();
        idle.block_on(async {
            hub.open_soon(&store, b"q/");
            // The open's task is creating its watch (200 ms) when `block_on` returns.
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        let other = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        other.block_on(async {
            let read_at = store.put(b"q/a", b"", 0).await.unwrap();
            store.put(b"q/b", b"", 0).await.unwrap();
            let answer = tokio::time::timeout(
                Duration::from_secs(3),
                hub.wait_delete(&store, b"q/", &[b"q/a"], read_at),
            )
            .await
            .expect("wait_delete waited for an open on an idle runtime");
            assert_eq!(answer.unwrap(), (0, Woken::Reread));
        });
        drop(idle);
    }

    /// Two current-thread runtimes, each on a thread of its own, whose sessions of one
    /// client contend for one name: each runtime keeps its own shared watch, and neither
    /// closes the other's (were a runtime's waiters to replace a watch of another runtime
    /// whenever they met one, the two would take turns replacing each other's for as long
    /// as both wait).
    #[test]
    fn current_thread_runtimes_of_one_client_keep_their_own_watches() {
        let client = crate::Client::memory();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let client = client.clone();
                std::thread::spawn(move || {
                    current_thread().block_on(async {
                        let session = crate::Session::new(&client).await.unwrap();
                        let m = crate::Mutex::new(&session, "turns").unwrap();
                        for _ in 0..100 {
                            let g = m.lock().await.unwrap();
                            tokio::task::yield_now().await;
                            g.unlock().await.unwrap();
                        }
                        session.close().await.unwrap();
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let opened = client.stats().watches_opened;
        assert!(opened <= 20, "{opened} watches opened for 200 holds");
    }
}

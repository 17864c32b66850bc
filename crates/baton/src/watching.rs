//! Waiting for changes to keys, for the recipes built on the store (semaphore, barriers,
//! queues, latch): read, decide, watch the keys that can change the decision, then read
//! again.
//!
//! A watch is opened from etcd's next write, never from the read's revision: etcd serves a
//! watch that starts at a revision it has passed from its "unsynced" group, which it sweeps
//! every 100 ms, and under contention some write always comes between a read and its watch,
//! so every wait would cost up to 100 ms. If the watch starts after the read (a write came
//! in between), the caller reads again, and the watch, kept open, serves its next wait on
//! the same keys: that read came after the watch started, so nothing falls between them.
//! Every event older than the read is skipped. A broken stream or a failed read ends the
//! same way: the caller reads again (after a backoff if something failed), so a wait never
//! hangs on a lost event.
//!
//! Even a watch "from now" can land in the unsynced group: etcd reads its current revision,
//! then registers the watch one above it, and a write that commits in between makes the
//! watch start behind. Until a new watch has delivered something, a wait on it on etcd also
//! returns 30 ms and 70 ms after its creation, and the caller reads again (see
//! [`Waiter::wait`]).

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::error::{Error, Result};
use crate::hub::{Counters, Hub};
use crate::session::Session;
use crate::store::{
    Event, EventKind, KeyRange, KeyValue, Range, RangeResponse, Revision, Store, Txn, TxnResponse,
    Watch,
};

/// When a wait on a new watch that has delivered nothing yet returns anyway, counted from the
/// watch's creation, so that the caller reads again (etcd only; see [`Waiter::wait`]).
const DOUBT_AT: [Duration; 2] = [Duration::from_millis(30), Duration::from_millis(70)];

/// Whether to doubt new watches on etcd that have delivered nothing yet, and when.
///
/// etcd registers a watch "from now" one revision above the current revision it read just
/// before; a write that commits in between leaves the watch behind, in the unsynced group
/// that etcd serves only at its sweep, every 100 ms. A watch that has delivered something
/// is synced. Until then, its waiter checks by reading at each of [`DOUBT_AT`].
#[derive(Debug)]
pub(crate) struct Doubt {
    created: tokio::time::Instant,
    applies: bool,
    pub(crate) proven: bool,
    pub(crate) passed: usize,
}

impl Doubt {
    /// For watches on `store` created just now; never doubted unless `wanted`.
    pub(crate) fn new(store: &dyn Store, wanted: bool) -> Doubt {
        Doubt {
            created: tokio::time::Instant::now(),
            applies: wanted && store.backend() == "etcd",
            proven: false,
            passed: 0,
        }
    }

    /// The next item of `events`; `None` (read to check) if the next doubt comes first.
    pub(crate) async fn next<S>(&mut self, events: &mut S) -> Option<Option<S::Item>>
    where
        S: futures::Stream + Unpin,
    {
        let at = DOUBT_AT
            .get(self.passed)
            .filter(|_| self.applies && !self.proven)
            .map(|after| self.created + *after);
        let item = match at {
            Some(at) => tokio::select! {
                item = events.next() => item,
                _ = tokio::time::sleep_until(at) => {
                    self.passed += 1;
                    return None;
                }
            },
            None => events.next().await,
        };
        self.proven = true;
        Some(item)
    }
}

/// The first and the largest pause after a failed read or watch.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Doubling pauses between retries, from 50 ms up to 1 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    /// When the last pause ended.
    last: Option<tokio::time::Instant>,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            next: RETRY_MIN,
            last: None,
        }
    }

    /// Sleep for the current pause, and double the next one. A failure at least
    /// [`RETRY_MAX`] after the last pause ended (what was retried then worked for a while)
    /// starts again from the shortest pause.
    pub(crate) async fn sleep(&mut self) {
        if self.last.is_some_and(|at| at.elapsed() >= RETRY_MAX) {
            self.next = RETRY_MIN;
        }
        tokio::time::sleep(self.next).await;
        self.last = Some(tokio::time::Instant::now());
        self.next = (self.next * 2).min(RETRY_MAX);
    }

    /// Something worked: start again from the shortest pause.
    pub(crate) fn reset(&mut self) {
        self.next = RETRY_MIN;
    }
}

/// Which events end a wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Until {
    /// A delete of a watched key.
    Deleted,
    /// A put of a watched key.
    Put,
    /// Any change of a watched key.
    Changed,
    /// A put of exactly `value` or of a value that does not end with `suffix` (written by
    /// someone else than the waiter's peers: the caller reads it as a mismatch), or a delete.
    ReachedOrUnlike { value: Vec<u8>, suffix: Vec<u8> },
}

impl Until {
    fn matches(&self, event: &Event) -> bool {
        match (self, event.kind) {
            (Until::Deleted, EventKind::Delete) | (Until::Put, EventKind::Put) => true,
            (Until::Deleted, EventKind::Put) | (Until::Put, EventKind::Delete) => false,
            (Until::Changed, _) | (Until::ReachedOrUnlike { .. }, EventKind::Delete) => true,
            (Until::ReachedOrUnlike { value, suffix }, EventKind::Put) => {
                event.kv.value == *value || !event.kv.value.ends_with(suffix)
            }
        }
    }
}

/// What to wait for: an event on some keys after the revision of a read.
#[derive(Clone, Debug)]
pub(crate) struct Wait {
    keys: Vec<KeyRange>,
    from: Revision,
    until: Until,
}

impl Wait {
    /// Wait for `until` on `key`, after the read at revision `read_at`.
    pub(crate) fn key(key: impl Into<Vec<u8>>, read_at: Revision, until: Until) -> Wait {
        Wait::keys([key.into()], read_at, until)
    }

    /// Wait for `until` on any of `keys`, after the read at revision `read_at`.
    pub(crate) fn keys(
        keys: impl IntoIterator<Item = Vec<u8>>,
        read_at: Revision,
        until: Until,
    ) -> Wait {
        Wait {
            keys: keys.into_iter().map(KeyRange::Key).collect(),
            from: read_at + 1,
            until,
        }
    }

    /// Wait for `until` on any key under `prefix`, after the read at revision `read_at`.
    pub(crate) fn prefix(prefix: impl Into<Vec<u8>>, read_at: Revision, until: Until) -> Wait {
        Wait {
            keys: vec![KeyRange::Prefix(prefix.into())],
            from: read_at + 1,
            until,
        }
    }
}

/// Waits between the reads of one waiting loop, with the backoff of its failures.
///
/// The loop reads, decides, and calls [`wait`](Waiter::wait) with what can change the
/// decision; a failed read goes to [`retry`](Waiter::retry). Both return `Ok(())` when it
/// is time to read again, and an error only when retrying cannot help.
pub(crate) struct Waiter {
    store: Arc<dyn Store>,
    /// The client's hub, whose counters ([`ClientStats`](crate::ClientStats)) count this
    /// waiter's watches and wake-ups; `None` for a waiter made with [`Waiter::new`].
    hub: Option<Arc<Hub>>,
    backoff: Backoff,
    /// The watches of the last wait, kept for the next one on the same keys.
    open: Option<Open>,
    /// The last wait opened new watches that started after its read: the next one that
    /// needs new watches starts them from its read instead (paying etcd's sweep), so that
    /// a waiter whose keys change with every read cannot spin on reads.
    gap: bool,
}

/// Watches opened from the store's next write, on `keys`, the last of them registered at
/// revision `after`: together they deliver every event on `keys` above `after`.
struct Open {
    keys: Vec<KeyRange>,
    deletes_only: bool,
    after: Revision,
    events: futures::stream::SelectAll<crate::store::WatchStream>,
    doubt: Doubt,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("backoff", &self.backoff)
            .field("open", &self.open.as_ref().map(|o| (&o.keys, o.after)))
            .finish()
    }
}

impl Waiter {
    /// A waiter on `store` whose watches and wake-ups count nowhere (the caller has no
    /// client at hand); see [`Waiter::counting`].
    pub(crate) fn new(store: &Arc<dyn Store>) -> Waiter {
        Waiter {
            store: store.clone(),
            hub: None,
            backoff: Backoff::new(),
            open: None,
            gap: false,
        }
    }

    /// This waiter, with its watches and wake-ups counted in the
    /// [`ClientStats`](crate::ClientStats) of the client whose hub `hub` is.
    pub(crate) fn counting(mut self, hub: &Arc<Hub>) -> Waiter {
        self.hub = Some(hub.clone());
        self
    }

    fn count(&self, counter: impl Fn(&Counters) -> &AtomicU64) {
        if let Some(hub) = &self.hub {
            Counters::add(counter(&hub.counters));
        }
    }

    /// Wait until an event that `wait` asks for happens (`Some(event)`), or until the watch
    /// cannot tell (`None`: it started after the caller's read, or it broke and the backoff
    /// passed). Either way the caller usually reads again.
    ///
    /// On etcd, a wait on watches that have delivered nothing yet also returns `None` 30 ms
    /// and 70 ms after their creation. etcd registers a watch "from now" at the revision it
    /// read just before; a write that commits in between puts the watch in etcd's unsynced
    /// group, which is served only at its sweep, every 100 ms (measured with 8 contenders on
    /// a 2-permit semaphore: every such miss stalled the whole queue for 60-100 ms). The
    /// read these returns cause finds a change the watch has not delivered; each watch costs
    /// at most two of them, and only if it waits that long without an event.
    pub(crate) async fn wait(&mut self, wait: Wait) -> Result<Option<Event>> {
        // A wake-up is an event, or a broken watch. Not the doubts and gaps (`None`): those
        // reads are the wait's own bookkeeping, as the lock's waits do them unseen, and a
        // release still counts as one wake-up.
        match self.watch_until(&wait).await {
            Ok(Some(event)) => {
                self.woke();
                self.backoff.reset();
                Ok(Some(event))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                if e.is_retryable() {
                    self.woke();
                }
                self.open = None;
                self.retry(e).await.map(|()| None)
            }
        }
    }

    /// Count a wake-up: the waiter looks at the queue again (for a waiter told by other
    /// means than [`wait`](Self::wait)).
    pub(crate) fn woke(&self) {
        self.count(|c| &c.wakeups);
    }

    /// The awaited change came (told by other means than [`wait`](Self::wait), which does
    /// this itself): the next failure backs off from the start again.
    pub(crate) fn succeeded(&mut self) {
        self.backoff.reset();
    }

    /// The first event after the read that `wait` asks for; `None` if the watches started
    /// after that read (read again: the next wait on the same keys is covered).
    async fn watch_until(&mut self, wait: &Wait) -> Result<Option<Event>> {
        if wait.keys.is_empty() {
            return Err(Error::Store("nothing to watch".into()));
        }
        let deletes_only = matches!(wait.until, Until::Deleted);
        let reuse = self
            .open
            .take()
            .filter(|o| o.keys == wait.keys && o.deletes_only == deletes_only);
        let mut open = match reuse {
            Some(open) => open,
            None => {
                // After a gap, from the read: covered, at the price of the sweep.
                let from_read = std::mem::take(&mut self.gap);
                let mut after = if from_read { wait.from - 1 } else { 0 };
                let mut streams = Vec::with_capacity(wait.keys.len());
                for keys in &wait.keys {
                    let watch = Watch {
                        keys: keys.clone(),
                        start_revision: 0,
                        prev_kv: false,
                        deletes_only,
                    };
                    let stream = if from_read {
                        self.store.watch(watch.from_revision(wait.from)).await?
                    } else {
                        let (at, stream) = self.store.watch_from_now(watch).await?;
                        after = after.max(at);
                        stream
                    };
                    self.count(|c| &c.watches_opened);
                    // One stream ending must not go unnoticed while the others live on.
                    let ended = futures::stream::once(async { Err(watch_ended()) });
                    streams.push(stream.chain(ended).boxed());
                }
                Open {
                    keys: wait.keys.clone(),
                    deletes_only,
                    after,
                    events: futures::stream::select_all(streams),
                    doubt: Doubt::new(self.store.as_ref(), true),
                }
            }
        };
        if open.after >= wait.from {
            // A write came after the caller's read and before the watches: read again.
            self.gap = true;
            self.open = Some(open);
            return Ok(None);
        }
        self.gap = false;
        loop {
            let Some(item) = open.doubt.next(&mut open.events).await else {
                // Doubted: the caller reads to check, and the watch serves the next wait.
                self.open = Some(open);
                return Ok(None);
            };
            let Some(item) = item else { break };
            let batch = match item {
                Ok(batch) => batch,
                // Only a watch from the read can start at a compacted revision.
                Err(Error::Compacted { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let found = batch
                .events
                .into_iter()
                .find(|e| e.kv.mod_revision >= wait.from && wait.until.matches(e));
            if let Some(event) = found {
                self.open = Some(open);
                return Ok(Some(event));
            }
        }
        Err(watch_ended())
    }

    /// Read `range`, retrying with backoff while the failures may pass.
    pub(crate) async fn range(&mut self, range: Range) -> Result<RangeResponse> {
        loop {
            match self.store.range(range.clone()).await {
                Ok(resp) => return Ok(resp),
                Err(e) => self.retry(e).await?,
            }
        }
    }

    /// Run a read-only `txn`, retrying with backoff while the failures may pass.
    pub(crate) async fn read_txn(&mut self, txn: Txn) -> Result<TxnResponse> {
        loop {
            match self.store.txn(txn.clone()).await {
                Ok(resp) => return Ok(resp),
                Err(e) => self.retry(e).await?,
            }
        }
    }

    /// A read or watch failed: back off and return `Ok(())` if it may work later, else the
    /// error.
    pub(crate) async fn retry(&mut self, error: Error) -> Result<()> {
        if !error.is_retryable() {
            return Err(error);
        }
        tracing::debug!(error = %error, "retrying after a failed read or watch");
        self.backoff.sleep().await;
        Ok(())
    }
}

/// Wait until `key` is `done`: `done` judges the key as read (`None` if it does not exist),
/// and, after an event of `until`, the key as that event left it; if the event does not
/// settle it, the key is read again.
pub(crate) async fn wait_key<F>(
    store: &Arc<dyn Store>,
    hub: &Arc<Hub>,
    key: &[u8],
    until: Until,
    mut done: F,
) -> Result<()>
where
    F: FnMut(Option<&KeyValue>) -> Result<bool>,
{
    let mut waiter = Waiter::new(store).counting(hub);
    loop {
        let resp = waiter.range(Range::key(key)).await?;
        if done(resp.kvs.first())? {
            return Ok(());
        }
        let wait = Wait::key(key, resp.header_revision, until.clone());
        if let Some(event) = waiter.wait(wait).await? {
            let left = (event.kind == EventKind::Put).then_some(&event.kv);
            if done(left)? {
                return Ok(());
            }
        }
    }
}

fn watch_ended() -> Error {
    Error::Store("watch ended unexpectedly".into())
}

/// Run `fut` while `session` lives: fail with [`Error::SessionLost`] as soon as it is lost,
/// and report a vanished key as the session's loss when that is what happened.
pub(crate) async fn while_alive<T>(
    session: &Session,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    let result = tokio::select! {
        r = fut => r,
        _ = session.lost() => Err(session.lost_error()),
    };
    match result {
        Err(e) => Err(session.explain_not_held(e).await),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemStore;
    use crate::store::slow::SlowWatches;
    use crate::store::KeyValue;

    fn event(kind: EventKind, value: &[u8]) -> Event {
        Event {
            kind,
            kv: KeyValue {
                key: b"k".to_vec(),
                value: value.to_vec(),
                ..KeyValue::default()
            },
            prev_kv: None,
        }
    }

    #[test]
    fn until_matches() {
        let (put, del) = (event(EventKind::Put, b"0"), event(EventKind::Delete, b""));
        assert!(Until::Deleted.matches(&del) && !Until::Deleted.matches(&put));
        assert!(Until::Put.matches(&put) && !Until::Put.matches(&del));
        assert!(Until::Changed.matches(&put) && Until::Changed.matches(&del));
        let open = Until::ReachedOrUnlike {
            value: b"0/3".to_vec(),
            suffix: b"/3".to_vec(),
        };
        assert!(open.matches(&event(EventKind::Put, b"0/3")) && open.matches(&del));
        assert!(!open.matches(&event(EventKind::Put, b"1/3")));
        assert!(open.matches(&event(EventKind::Put, b"1/2")));
        assert!(open.matches(&event(EventKind::Put, b"x")));
    }

    #[tokio::test]
    async fn waits_for_the_right_event_on_any_key() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        store.put(b"a", b"1", 0).await.unwrap();
        let rev = store.put(b"b", b"1", 0).await.unwrap();
        let mut waiter = Waiter::new(&store);
        let wait = Wait::keys([b"a".to_vec(), b"b".to_vec()], rev, Until::Deleted);
        let task = tokio::spawn(async move { waiter.wait(wait).await });
        tokio::task::yield_now().await; // the watch starts
        store.put(b"a", b"2", 0).await.unwrap(); // a put: no wake-up
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        store.delete(KeyRange::key("b")).await.unwrap();
        let event = task.await.unwrap().unwrap().unwrap();
        assert_eq!(
            (event.kind, event.kv.key.as_slice()),
            (EventKind::Delete, &b"b"[..])
        );

        // A change made between the read and the watch is not missed: the watch, opened
        // from the next write, says to read again ...
        let mut waiter = Waiter::new(&store);
        let before = store.put(b"c", b"1", 0).await.unwrap();
        store.delete(KeyRange::key("c")).await.unwrap();
        let woken = waiter.wait(Wait::prefix("c", before, Until::Deleted)).await;
        assert_eq!(woken.unwrap(), None, "read again");
        // ... and serves the next wait on the same keys, after that read, with no gap: the
        // put right after the read is skipped (not a delete), the delete wakes it.
        let read = store.put(b"c", b"2", 0).await.unwrap();
        let task = tokio::spawn(async move {
            let woken = waiter.wait(Wait::prefix("c", read, Until::Deleted)).await;
            (woken, waiter)
        });
        tokio::task::yield_now().await;
        let (_, deleted) = store.delete(KeyRange::key("c")).await.unwrap();
        let (woken, mut waiter) = task.await.unwrap();
        assert_eq!(woken.unwrap().unwrap().kv.mod_revision, deleted);

        // Other keys after a gap: watched from the read, so a change between the read and
        // the watch is found in the history (no third read).
        let read = store.put(b"d", b"1", 0).await.unwrap();
        let (_, d_gone) = store.delete(KeyRange::key("d")).await.unwrap();
        let woken = waiter.wait(Wait::key("e", read, Until::Deleted)).await;
        assert_eq!(woken.unwrap(), None, "a gap: read again");
        let woken = waiter.wait(Wait::key("d", read, Until::Deleted)).await;
        assert_eq!(woken.unwrap().unwrap().kv.mod_revision, d_gone);
        assert!(waiter.open.as_ref().is_some_and(|o| o.after == read));
    }

    /// On etcd, a wait on a new watch that has delivered nothing returns 30 ms and 70 ms
    /// after the watch's creation, so that a change etcd holds back until its sweep is read
    /// instead; once the watch has delivered something, it is trusted however long the wait.
    #[tokio::test(start_paused = true)]
    async fn a_new_silent_watch_on_etcd_is_doubted_twice_then_trusted() {
        let store: Arc<dyn Store> = Arc::new(SlowWatches::etcd_unsynced());
        let read = store.put(b"k", b"1", 0).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut waiter = Waiter::new(&store);
        let task = tokio::spawn(async move {
            let woken = waiter.wait(Wait::key("k", read, Until::Deleted)).await;
            (woken, waiter)
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        store.delete(KeyRange::key("k")).await.unwrap();
        let (woken, mut waiter) = task.await.unwrap();
        assert_eq!(woken.unwrap(), None, "doubted: read again");
        assert_eq!(start.elapsed(), DOUBT_AT[0]);
        assert!(store.range(Range::key("k")).await.unwrap().kvs.is_empty());

        // The caller read again and waits on the same keys: the same watch, doubted once more.
        let read = store.put(b"k", b"2", 0).await.unwrap();
        let woken = waiter.wait(Wait::key("k", read, Until::Deleted)).await;
        assert_eq!(woken.unwrap(), None);
        assert_eq!(start.elapsed(), DOUBT_AT[1]);

        // No third doubt: the sweep delivers the old events (skipped), and a delete long
        // after that is delivered as it happens.
        let task = tokio::spawn(async move {
            let woken = waiter.wait(Wait::key("k", read, Until::Deleted)).await;
            (woken, waiter)
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!task.is_finished(), "waits for the delete, however long");
        let (_, deleted) = store.delete(KeyRange::key("k")).await.unwrap();
        let (woken, waiter) = task.await.unwrap();
        assert_eq!(woken.unwrap().unwrap().kv.mod_revision, deleted);
        assert!(waiter
            .open
            .as_ref()
            .is_some_and(|o| o.doubt.proven && o.doubt.passed == 2));
    }

    /// The embedded store's watches never lag: no doubt, however long the wait.
    #[tokio::test(start_paused = true)]
    async fn the_embedded_store_is_never_doubted() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let read = store.put(b"k", b"1", 0).await.unwrap();
        let mut waiter = Waiter::new(&store);
        let task =
            tokio::spawn(async move { waiter.wait(Wait::key("k", read, Until::Deleted)).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!task.is_finished());
        let (_, deleted) = store.delete(KeyRange::key("k")).await.unwrap();
        assert_eq!(
            task.await.unwrap().unwrap().unwrap().kv.mod_revision,
            deleted
        );
    }

    #[tokio::test]
    async fn compaction_means_read_again() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let rev = store.put(b"a", b"1", 0).await.unwrap();
        store.put(b"a", b"2", 0).await.unwrap();
        store.put(b"a", b"3", 0).await.unwrap();
        store.compact(rev + 2).await.unwrap();
        let mut waiter = Waiter::new(&store);
        let woken = waiter.wait(Wait::key("a", rev, Until::Deleted)).await;
        assert_eq!(woken.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_backs_off_only_for_retryable_errors() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let mut waiter = Waiter::new(&store);
        let start = tokio::time::Instant::now();
        waiter.retry(Error::Store("x".into())).await.unwrap();
        waiter.retry(Error::Store("x".into())).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(150));
        let err = waiter.retry(Error::invalid("bad")).await.unwrap_err();
        assert!(err.is_invalid_input());
    }
}

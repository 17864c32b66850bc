//! Waiting for changes to keys, for the recipes built on the store (semaphore, barriers,
//! queues, latch): read, decide, watch the keys that can change the decision from the
//! revision after the read, then read again.
//!
//! Watching from the read's revision plus one never misses a change made after the read, and
//! keeps the watch ahead of the store (etcd then serves it from its synced watcher group).
//! Compaction of that revision, a broken stream or a failed read all end the same way: the
//! caller reads again (after a backoff if something failed), so a wait never hangs on a lost
//! event.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::error::{Error, Result};
use crate::session::Session;
use crate::store::{
    Event, EventKind, KeyRange, KeyValue, Range, RangeResponse, Revision, Store, Txn, TxnResponse,
    Watch,
};

/// The first and the largest pause after a failed read or watch.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Doubling pauses between retries, from 50 ms up to 1 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { next: RETRY_MIN }
    }

    /// Sleep for the current pause, and double the next one.
    pub(crate) async fn sleep(&mut self) {
        tokio::time::sleep(self.next).await;
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
    /// A put of exactly this value, or a delete.
    Reached(Vec<u8>),
}

impl Until {
    fn matches(&self, event: &Event) -> bool {
        match (self, event.kind) {
            (Until::Deleted, EventKind::Delete) | (Until::Put, EventKind::Put) => true,
            (Until::Deleted, EventKind::Put) | (Until::Put, EventKind::Delete) => false,
            (Until::Changed, _) | (Until::Reached(_), EventKind::Delete) => true,
            (Until::Reached(value), EventKind::Put) => event.kv.value == *value,
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
#[derive(Debug)]
pub(crate) struct Waiter {
    store: Arc<dyn Store>,
    backoff: Backoff,
}

impl Waiter {
    pub(crate) fn new(store: &Arc<dyn Store>) -> Waiter {
        Waiter {
            store: store.clone(),
            backoff: Backoff::new(),
        }
    }

    /// Wait until an event that `wait` asks for happens (`Some(event)`), or until the watch
    /// cannot tell (`None`: its start was compacted, or it broke and the backoff passed).
    /// Either way the caller usually reads again.
    pub(crate) async fn wait(&mut self, wait: Wait) -> Result<Option<Event>> {
        match watch_until(&self.store, &wait).await {
            Ok(Some(event)) => {
                self.backoff.reset();
                Ok(Some(event))
            }
            Ok(None) => Ok(None),
            Err(e) => self.retry(e).await.map(|()| None),
        }
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
    key: &[u8],
    until: Until,
    mut done: F,
) -> Result<()>
where
    F: FnMut(Option<&KeyValue>) -> Result<bool>,
{
    let mut waiter = Waiter::new(store);
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

/// The first event `wait` asks for, or `None` if the watch's start was compacted.
async fn watch_until(store: &Arc<dyn Store>, wait: &Wait) -> Result<Option<Event>> {
    if wait.keys.is_empty() {
        return Err(Error::Store("nothing to watch".into()));
    }
    let mut streams = Vec::with_capacity(wait.keys.len());
    for keys in &wait.keys {
        let stream = store
            .watch(Watch {
                keys: keys.clone(),
                start_revision: wait.from,
                prev_kv: false,
                deletes_only: false,
            })
            .await?;
        // One stream ending must not go unnoticed while the others live on.
        let ended = futures::stream::once(async { Err(watch_ended()) });
        streams.push(stream.chain(ended).boxed());
    }
    let mut all = futures::stream::select_all(streams);
    while let Some(item) = all.next().await {
        match item {
            Ok(batch) => {
                if let Some(event) = batch.events.into_iter().find(|e| wait.until.matches(e)) {
                    return Ok(Some(event));
                }
            }
            Err(Error::Compacted { .. }) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Err(watch_ended())
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
        Err(Error::NotHeld { .. }) if session.is_lost() => Err(session.lost_error()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemStore;
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
        let zero = Until::Reached(b"0".to_vec());
        assert!(zero.matches(&put) && zero.matches(&del));
        assert!(!zero.matches(&event(EventKind::Put, b"1")));
    }

    #[tokio::test]
    async fn waits_for_the_right_event_on_any_key() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let rev = store.put(b"a", b"1", 0).await.unwrap();
        store.put(b"b", b"1", 0).await.unwrap();
        let mut waiter = Waiter::new(&store);
        let wait = Wait::keys([b"a".to_vec(), b"b".to_vec()], rev, Until::Deleted);
        let task = tokio::spawn(async move { waiter.wait(wait).await });
        store.put(b"a", b"2", 0).await.unwrap(); // a put: no wake-up
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        store.delete(KeyRange::key("b")).await.unwrap();
        let event = task.await.unwrap().unwrap().unwrap();
        assert_eq!(
            (event.kind, event.kv.key.as_slice()),
            (EventKind::Delete, &b"b"[..])
        );

        // A change made between the read and the watch is not missed.
        let mut waiter = Waiter::new(&store);
        let before = store.put(b"c", b"1", 0).await.unwrap();
        store.delete(KeyRange::key("c")).await.unwrap();
        waiter
            .wait(Wait::prefix("c", before, Until::Deleted))
            .await
            .unwrap();
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

//! A client whose watches lag behind its reads must not take a stale delete for the delete
//! of the key it waits on. A session locks the same name again and again (its key is the
//! lock's prefix plus its lease), so an old delete of that name can arrive, on a slow watch,
//! after a waiter read the new key: acting on it would put two holders in the lock.
#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::time::Duration;

use async_trait::async_trait;
use baton::store::mem::MemStore;
use baton::store::{
    KeyRange, LeaseGrant, LeaseId, Range, RangeResponse, Revision, Store, Txn, TxnResponse, Watch,
    WatchStream,
};
use baton::{Client, Error, Mutex, RwLock, Session};
use futures::StreamExt;

/// How late every watch batch arrives.
const LAG: Duration = Duration::from_millis(300);

/// A [`MemStore`] whose watch streams deliver each batch [`LAG`] after it happened, as a
/// busy member or a loaded client can: reads are up to date, watches are not.
#[derive(Clone, Debug)]
struct LaggingWatches(MemStore);

#[async_trait]
impl Store for LaggingWatches {
    fn backend(&self) -> &'static str {
        "mem"
    }
    async fn range(&self, range: Range) -> baton::Result<RangeResponse> {
        self.0.range(range).await
    }
    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> baton::Result<Revision> {
        self.0.put(key, value, lease).await
    }
    async fn delete(&self, keys: KeyRange) -> baton::Result<(i64, Revision)> {
        self.0.delete(keys).await
    }
    async fn txn(&self, txn: Txn) -> baton::Result<TxnResponse> {
        self.0.txn(txn).await
    }
    async fn lease_grant(&self, ttl: Duration) -> baton::Result<LeaseGrant> {
        self.0.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, id: LeaseId) -> baton::Result<Option<Duration>> {
        self.0.lease_keep_alive(id).await
    }
    async fn lease_revoke(&self, id: LeaseId) -> baton::Result<()> {
        self.0.lease_revoke(id).await
    }
    async fn lease_time_to_live(&self, id: LeaseId) -> baton::Result<Option<Duration>> {
        self.0.lease_time_to_live(id).await
    }
    async fn watch(&self, watch: Watch) -> baton::Result<WatchStream> {
        let inner = self.0.watch(watch).await?;
        // Each batch is held back LAG from when it was produced, in order.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut inner = inner;
            while let Some(batch) = inner.next().await {
                if tx.send((tokio::time::Instant::now() + LAG, batch)).is_err() {
                    return;
                }
            }
        });
        let delayed = futures::stream::unfold(rx, |mut rx| async move {
            let (due, batch) = rx.recv().await?;
            tokio::time::sleep_until(due).await;
            Some((batch, rx))
        });
        Ok(Box::pin(delayed))
    }
    async fn compact(&self, revision: Revision) -> baton::Result<()> {
        self.0.compact(revision).await
    }
}

/// The trait's own `watch_from_now` (this store does not override it) watches the whole
/// keyspace too: its read of the current revision must not use the empty key.
#[tokio::test]
async fn the_default_watch_from_now_takes_the_empty_prefix() {
    let store = LaggingWatches(MemStore::new());
    let (at, mut stream) = store.watch_from_now(Watch::prefix("")).await.unwrap();
    let written = store.put(b"anywhere", b"1", 0).await.unwrap();
    assert!(written > at);
    let batch = tokio::time::timeout(LAG * 20, stream.next())
        .await
        .expect("no event")
        .expect("the watch ended")
        .unwrap();
    assert_eq!(batch.events[0].kv.key, b"anywhere");
}

async fn session(client: &Client) -> Session {
    Session::builder(client)
        .with_ttl(Duration::from_secs(10))
        .build()
        .await
        .unwrap()
}

/// A holds, unlocks and locks the same name again (same key, new create revision); B's
/// watch, opened by an earlier wait, delivers A's delete only after B has read A's new key.
/// B must keep waiting for the new key's delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutex_waiter_ignores_a_stale_delete_of_a_reused_key() {
    let store = MemStore::new();
    let a = Client::from_store(store.clone());
    let b = Client::from_store(LaggingWatches(store));
    let (sa, sb) = (session(&a).await, session(&b).await);
    let (ma, mb) = (
        Mutex::new(&sa, "stale").unwrap(),
        Mutex::new(&sb, "stale").unwrap(),
    );

    let g = ma.lock().await.unwrap();
    // Another session of B's client waits a little and gives up: this opens the client's
    // shared watch on the lock's prefix, which stays open, lagging. (Its own key's delete
    // then names no key B waits on.)
    let other = session(&b).await;
    let r = Mutex::new(&other, "stale")
        .unwrap()
        .lock_timeout(Duration::from_millis(50))
        .await;
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    tokio::time::sleep(2 * LAG).await;
    // A releases and takes the lock again at once: same key, later create revision.
    g.unlock().await.unwrap();
    let g = ma.lock().await.unwrap();
    // B queues behind A's new key. A's delete reaches B's watch only now.
    let r = mb.lock_timeout(3 * LAG).await;
    assert!(
        matches!(r, Err(Error::Timeout { .. })),
        "B got the lock while A holds it: {r:?}"
    );
    assert!(!g.is_lost());
    // A's real release does reach B.
    let waiter = tokio::spawn(async move { mb.lock_timeout(Duration::from_secs(5)).await });
    tokio::time::sleep(LAG).await;
    g.unlock().await.unwrap();
    let gb = waiter.await.unwrap().unwrap();
    assert!(!gb.is_lost());
}

/// A writer that unlocks and writes again reuses its key; its ownership watch, lagging,
/// must not take the old key's delete for the loss of the new one (a false loss that made
/// the write guard's `txn` fail with NotHeld).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_ignores_a_stale_delete_of_its_own_reused_key() {
    let client = Client::from_store(LaggingWatches(MemStore::new()));
    let s = session(&client).await;
    let rw = RwLock::new(&s, "stale-rw").unwrap();
    let g = rw.write().await.unwrap();
    // Let the guard's ownership watch open the client's shared watch.
    tokio::time::sleep(Duration::from_millis(50)).await;
    g.unlock().await.unwrap();
    let g = rw.write().await.unwrap();
    tokio::time::sleep(3 * LAG).await;
    assert!(!g.is_lost(), "false loss: {:?}", g.lost_reason());
    g.txn(Txn::new()).await.unwrap();
    g.unlock().await.unwrap();
}

/// A queue longer than the join reads (64 keys), each waiter a client of its own, on
/// lagging watches: waiters deep in the queue watch their predecessor's key alone. They
/// are still served in order, one holder at a time, and every release wakes its successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_queue_of_separate_clients_is_served_in_order() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const WAITERS: usize = 70;
    let store = MemStore::new();
    let first = Client::from_store(LaggingWatches(store.clone()));
    let s0 = session(&first).await;
    let g0 = Mutex::new(&s0, "long").unwrap().lock().await.unwrap();
    let holding = Arc::new(AtomicBool::new(false));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        let client = Client::from_store(LaggingWatches(store.clone()));
        let s = session(&client).await;
        let (holding, order) = (holding.clone(), order.clone());
        let before = store
            .range(Range::prefix(b"long/".to_vec()))
            .await
            .unwrap()
            .kvs
            .len();
        tasks.push(tokio::spawn(async move {
            let m = Mutex::new(&s, "long").unwrap();
            let g = m.lock_timeout(Duration::from_secs(60)).await.unwrap();
            assert!(!holding.swap(true, Ordering::SeqCst), "two holders");
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(2)).await;
            holding.store(false, Ordering::SeqCst);
            g.unlock().await.unwrap();
            drop(client);
        }));
        // Queue in spawn order: wait until this waiter's key is there.
        while store
            .range(Range::prefix(b"long/".to_vec()))
            .await
            .unwrap()
            .kvs
            .len()
            == before
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    g0.unlock().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order,
        (0..WAITERS).collect::<Vec<_>>(),
        "not served in order"
    );
}

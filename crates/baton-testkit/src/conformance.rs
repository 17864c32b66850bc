//! The conformance suite: one set of behaviours every store must show, run against the
//! embedded store and against real etcd (one node and a 3-node cluster).
//!
//! Each case is an `async fn(&Backend)`. `tests/conformance.rs` runs every case on every
//! backend.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use baton::store::{Compare, CompareOp, KeyRange, Range, Txn, TxnOp};
use baton::{Client, Error, Mutex, Session};

/// A backend the suite runs against: endpoints, plus whatever keeps the servers alive.
pub struct Backend {
    endpoints: String,
    namespace: String,
    _keep: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Backend {
    /// A fresh, private embedded store (`mem://<unique name>`).
    pub fn mem() -> Backend {
        Backend {
            endpoints: format!("mem://conformance-{}", unique()),
            namespace: String::new(),
            _keep: None,
        }
    }

    /// A backend at `endpoints`, keeping `servers` alive as long as the backend.
    pub fn new(endpoints: String, servers: impl std::any::Any + Send + Sync) -> Backend {
        Backend {
            endpoints,
            namespace: String::new(),
            _keep: Some(Box::new(servers)),
        }
    }

    /// The same backend seen through a namespace: every client and coordinator is confined
    /// to the keys under `prefix` (a key prefix on Redis).
    pub fn with_namespace(mut self, prefix: &str) -> Backend {
        self.namespace = prefix.to_string();
        self
    }

    /// A coordinator builder for this backend (and its namespace).
    pub fn coordinator(&self) -> baton::CoordinatorBuilder {
        baton::Coordinator::builder(&self.endpoints).with_namespace(self.namespace.clone())
    }

    /// The endpoint URL(s).
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// A new client (its own connection).
    pub async fn client(&self) -> Client {
        Client::builder(&self.endpoints)
            .with_dial_timeout(Duration::from_secs(5))
            .with_namespace(self.namespace.clone())
            .connect()
            .await
            .unwrap()
    }

    /// A new client and a session on it with `ttl`.
    pub async fn session(&self, ttl: Duration) -> Session {
        let client = self.client().await;
        Session::builder(&client)
            .with_ttl(ttl)
            .build()
            .await
            .unwrap()
    }
}

fn unique() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    )
}

/// A lock name no other case uses.
fn name(case: &str) -> String {
    format!("conformance/{case}/{}", unique())
}

const TTL: Duration = Duration::from_secs(10);
const SHORT_TTL: Duration = Duration::from_secs(2);

async fn keys_under(client: &Client, prefix: &str) -> Vec<String> {
    client
        .store()
        .range(Range::prefix(prefix.as_bytes()))
        .await
        .unwrap()
        .kvs
        .iter()
        .map(|kv| kv.key_str().into_owned())
        .collect()
}

/// Poll `f` until it is true or `within` passes; returns whether it became true.
async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// N holders in separate sessions increment a shared counter stored in the store, each
/// read-modify-write fenced by the lock: never two holders at once, no lost increment, and
/// fencing tokens strictly increase in grant order.
pub async fn mutual_exclusion_counter(b: &Backend) {
    const WORKERS: usize = 5;
    const ROUNDS: usize = 8;
    let lock = name("counter");
    let counter_key = format!("{lock}-counter");
    let inside = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(StdMutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let session = b.session(TTL).await;
        let (lock, counter_key, inside, tokens) = (
            lock.clone(),
            counter_key.clone(),
            inside.clone(),
            tokens.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let m = Mutex::new(&session, &lock).unwrap();
            for _ in 0..ROUNDS {
                let g = m.lock().await.unwrap();
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                tokens.lock().unwrap().push(g.fencing_token());
                let store = session.client().store();
                let cur = store
                    .range(Range::key(counter_key.as_bytes()))
                    .await
                    .unwrap()
                    .kvs
                    .first()
                    .map(|kv| kv.value_str().parse::<u64>().unwrap())
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(2)).await;
                let resp = g
                    .txn(Txn::new().and_then([TxnOp::put(
                        counter_key.as_bytes(),
                        (cur + 1).to_string(),
                        0,
                    )]))
                    .await
                    .unwrap();
                assert!(resp.succeeded);
                assert!(inside.swap(false, Ordering::SeqCst));
                g.unlock().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let client = b.client().await;
    let v = client
        .store()
        .range(Range::key(counter_key.as_bytes()))
        .await
        .unwrap();
    assert_eq!(
        v.kvs[0].value_str(),
        (WORKERS * ROUNDS).to_string(),
        "lost increments"
    );
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), WORKERS * ROUNDS);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens not strictly increasing: {tokens:?}"
    );
    assert!(keys_under(&client, &format!("{lock}/")).await.is_empty());
}

/// Wait until waiter `i` (0-based, behind one holder) has its key under `lock`: the waiters
/// of a test join in the order it spawned them.
///
/// # Panics
///
/// If the key count under `lock/` is not `i + 2` within 5 s.
pub async fn wait_queued(admin: &Client, lock: &str, i: usize) {
    let want = i + 2;
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(admin, &format!("{lock}/")).await.len() == want
        })
        .await,
        "waiter {i} never queued"
    );
}

/// Waiters are granted the lock in the order they queued.
pub async fn fifo_order(b: &Backend) {
    let lock = name("fifo");
    let admin = b.client().await;
    let holder = b.session(TTL).await;
    let g = Mutex::new(&holder, &lock).unwrap().lock().await.unwrap();
    let order = Arc::new(StdMutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let s = b.session(TTL).await;
        let (lock2, order) = (lock.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let g = Mutex::new(&s, &lock2).unwrap().lock().await.unwrap();
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(20)).await;
            g.unlock().await.unwrap();
        }));
        // Wait until this waiter's key is in the queue before starting the next one.
        wait_queued(&admin, &lock, i).await;
    }
    g.unlock().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
}

/// A queue longer than the join transaction reads back (64 keys): the waiters beyond it
/// learn from that read only that they are not at the head. Each is still granted in queue
/// order, one at a time, with increasing fencing tokens, and the queue drains.
pub async fn long_queue_order(b: &Backend) {
    const WAITERS: usize = 70;
    let lock = name("long-queue");
    let admin = b.client().await;
    let holder = b.session(TTL).await;
    let g = Mutex::new(&holder, &lock).unwrap().lock().await.unwrap();
    let order = Arc::new(StdMutex::new(Vec::new()));
    let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        let s = b.session(TTL).await;
        let (lock2, order, inside) = (lock.clone(), order.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            let g = Mutex::new(&s, &lock2).unwrap().lock().await.unwrap();
            assert_eq!(
                inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                0,
                "two holders at once"
            );
            order.lock().unwrap().push((i, g.fencing_token()));
            tokio::time::sleep(Duration::from_millis(2)).await;
            inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            g.unlock().await.unwrap();
            s.close().await.unwrap();
        }));
        wait_queued(&admin, &lock, i).await;
    }
    g.unlock().await.unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a waiter was never granted")
            .unwrap();
    }
    let order = order.lock().unwrap().clone();
    let granted: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(granted, (0..WAITERS).collect::<Vec<_>>());
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "tokens not increasing: {order:?}"
    );
    assert!(keys_under(&admin, &format!("{lock}/")).await.is_empty());
}

/// `try_lock` on a held lock fails with `Locked` and leaves no key behind.
pub async fn try_lock_while_held(b: &Backend) {
    let lock = name("try");
    let admin = b.client().await;
    let s1 = b.session(TTL).await;
    let s2 = b.session(TTL).await;
    let g = Mutex::new(&s1, &lock).unwrap().try_lock().await.unwrap();
    let m2 = Mutex::new(&s2, &lock).unwrap();
    let err = m2.try_lock().await.unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert_eq!(
        keys_under(&admin, &format!("{lock}/")).await,
        vec![g.key().to_string()]
    );
    g.unlock().await.unwrap();
    let g2 = m2.try_lock().await.unwrap();
    g2.unlock().await.unwrap();
}

/// A waiter that times out, or whose `lock()` future is dropped, leaves no key behind.
pub async fn cancel_while_waiting(b: &Backend) {
    let lock = name("cancel");
    let admin = b.client().await;
    let s1 = b.session(TTL).await;
    let s2 = b.session(TTL).await;
    let g = Mutex::new(&s1, &lock).unwrap().lock().await.unwrap();
    let m2 = Mutex::new(&s2, &lock).unwrap();
    let err = m2
        .lock_timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let only_holder =
        || async { keys_under(&admin, &format!("{lock}/")).await == vec![g.key().to_string()] };
    assert!(
        eventually(Duration::from_secs(3), only_holder).await,
        "timed-out waiter left its key"
    );

    // Drop the future mid-wait via select.
    tokio::select! {
        _ = m2.lock() => panic!("acquired a held lock"),
        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
    }
    assert!(
        eventually(Duration::from_secs(3), only_holder).await,
        "dropped waiter left its key"
    );
    // And the same session can queue again at once.
    let waiter = tokio::spawn({
        let m2 = m2.clone();
        async move { m2.lock().await.map(|g| g.fencing_token()) }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t1 = g.fencing_token();
    g.unlock().await.unwrap();
    let t2 = waiter.await.unwrap().unwrap();
    assert!(t2 > t1);
}

/// The holder's session stops keeping its lease alive: the lease expires, the next waiter
/// acquires, and the old guard's `lost()` fires.
pub async fn holder_session_expires(b: &Backend) {
    let lock = name("expire");
    let holder = b.session(SHORT_TTL).await;
    let waiter = b.session(TTL).await;
    let g = Mutex::new(&holder, &lock).unwrap().lock().await.unwrap();
    let start = Instant::now();
    holder.orphan();
    let g2 = Mutex::new(&waiter, &lock)
        .unwrap()
        .lock_timeout(SHORT_TTL + Duration::from_secs(3))
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(g.is_lost(), "old guard not lost after its lease expired");
    assert!(g2.fencing_token() > g.fencing_token());
    assert!(
        took <= SHORT_TTL + Duration::from_secs(2),
        "next grant took {took:?}"
    );
    g2.unlock().await.unwrap();
}

/// An admin revokes the holder's lease: `lost()` fires within 1 s, the next waiter acquires.
pub async fn lease_revoked_externally(b: &Backend) {
    let lock = name("revoke");
    let admin = b.client().await;
    let holder = b.session(TTL).await;
    let waiter = b.session(TTL).await;
    let g = Mutex::new(&holder, &lock).unwrap().lock().await.unwrap();
    let next = tokio::spawn({
        let m = Mutex::new(&waiter, &lock).unwrap();
        async move { m.lock().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    admin.store().lease_revoke(holder.lease_id()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), g.lost())
        .await
        .expect("lost() did not fire within 1 s of the revoke");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    let g2 = tokio::time::timeout(Duration::from_secs(2), next)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(g2.fencing_token() > g.fencing_token());
    // The session learns of the revoke too.
    tokio::time::timeout(Duration::from_secs(2), holder.lost())
        .await
        .expect("session did not notice its revoked lease");
    g2.unlock().await.unwrap();
}

/// An admin deletes the lock key: `lost()` fires, the guarded txn fails, unlock reports
/// NotHeld, and the key is not silently re-created.
pub async fn key_deleted_externally(b: &Backend) {
    let lock = name("delete");
    let admin = b.client().await;
    let s = b.session(TTL).await;
    let g = Mutex::new(&s, &lock).unwrap().lock().await.unwrap();
    admin
        .store()
        .delete(KeyRange::key(g.key().as_bytes()))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), g.lost())
        .await
        .expect("lost() did not fire within 1 s of the delete");
    assert_eq!(g.lost_reason().as_deref(), Some("key deleted"));
    let marker = format!("{lock}-marker");
    let err = g
        .txn(Txn::new().and_then([TxnOp::put(marker.as_bytes(), "x", 0)]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotHeld { .. }), "{err}");
    assert!(
        keys_under(&admin, &marker).await.is_empty(),
        "fenced txn applied after loss"
    );
    assert!(!s.is_lost(), "a deleted key must not end the session");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        keys_under(&admin, &format!("{lock}/")).await.is_empty(),
        "key re-created"
    );
    let err = g.unlock().await.unwrap_err();
    assert!(matches!(err, Error::NotHeld { .. }), "{err}");
}

/// The guarded txn applies while held, reports a failed user compare as `Ok(false)`, and
/// fails with NotHeld after the lock is lost to a revoke.
pub async fn guarded_txn(b: &Backend) {
    let lock = name("txn");
    let admin = b.client().await;
    let s = b.session(TTL).await;
    let g = Mutex::new(&s, &lock).unwrap().lock().await.unwrap();
    let k = format!("{lock}-data");
    let r = g
        .txn(Txn::new().and_then([TxnOp::put(k.as_bytes(), "1", 0)]))
        .await
        .unwrap();
    assert!(r.succeeded);
    let r = g
        .txn(
            Txn::new()
                .when([Compare::value(k.as_bytes(), CompareOp::Equal, "nope")])
                .and_then([TxnOp::put(k.as_bytes(), "2", 0)])
                .or_else([TxnOp::get(Range::key(k.as_bytes()))]),
        )
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.responses.len(), 1);
    admin.store().lease_revoke(s.lease_id()).await.unwrap();
    let err = g
        .txn(Txn::new().and_then([TxnOp::put(k.as_bytes(), "3", 0)]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotHeld { .. }), "{err}");
    let v = admin.store().range(Range::key(k.as_bytes())).await.unwrap();
    assert_eq!(v.kvs[0].value_str(), "1");
}

/// A waiter whose lease ends while it queues gets an error, never Ok (etcd #11456).
pub async fn waiter_lease_expires_in_queue(b: &Backend) {
    let lock = name("waiter-expire");
    let admin = b.client().await;
    let holder = b.session(TTL).await;
    let g = Mutex::new(&holder, &lock).unwrap().lock().await.unwrap();

    // 1. The waiter's keep-alives stop; its lease expires while it waits.
    let w = b.session(SHORT_TTL).await;
    let waiting = tokio::spawn({
        let m = Mutex::new(&w, &lock).unwrap();
        async move { m.lock().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.orphan();
    let r = tokio::time::timeout(SHORT_TTL + Duration::from_secs(3), waiting)
        .await
        .expect("waiter hung after its lease expired")
        .unwrap();
    assert!(
        r.is_err(),
        "waiter with an expired lease was told it holds the lock"
    );
    // Its key goes when the store expires the lease, after the waiter's local deadline
    // (on the embedded store too): gone before the next waiter's key is counted.
    assert!(
        eventually(Duration::from_secs(3), || async {
            keys_under(&admin, &format!("{lock}/")).await.len() == 1
        })
        .await
    );

    // 2. The waiter's lease is revoked just before the holder releases.
    let w2 = b.session(TTL).await;
    let waiting = tokio::spawn({
        let m = Mutex::new(&w2, &lock).unwrap();
        async move { m.lock().await }
    });
    assert!(
        eventually(Duration::from_secs(3), || async {
            keys_under(&admin, &format!("{lock}/")).await.len() == 2
        })
        .await
    );
    // The waiter's lease is revoked, then the holder releases straight away (before the
    // waiter's session can notice at its next keep-alive): the waiter must see that its key
    // went first. (Had the release come first, the waiter would rightly hold the lock at
    // that revision, and lose it at the revoke.)
    admin.store().lease_revoke(w2.lease_id()).await.unwrap();
    g.unlock().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("waiter hung after its lease was revoked")
        .unwrap();
    let err = r.expect_err("waiter with a revoked lease was told it holds the lock");
    // The session's loss, though the waiter may see its key go before its keep-alives
    // learn of the revoke: not `NotHeld`, which would say only the key was deleted.
    assert!(matches!(err, Error::SessionLost { .. }), "{err}");
    assert!(w2.is_lost());
    assert!(keys_under(&admin, &format!("{lock}/")).await.is_empty());
}

/// Locks `a` and `a/b` are independent, though `a/b`'s keys live under `a/`.
pub async fn prefix_independence(b: &Backend) {
    let base = name("prefix");
    let nested = format!("{base}/b");
    let s1 = b.session(TTL).await;
    let s2 = b.session(TTL).await;
    let ga = Mutex::new(&s1, &base).unwrap().try_lock().await.unwrap();
    let gb = Mutex::new(&s2, &nested).unwrap().try_lock().await.unwrap();
    ga.unlock().await.unwrap();
    // With a/b held, a is free.
    let ga = Mutex::new(&s1, &base)
        .unwrap()
        .lock_timeout(Duration::from_secs(2))
        .await
        .unwrap();
    let err = Mutex::new(&s2, &base)
        .unwrap()
        .try_lock()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    let err = Mutex::new(&s1, &nested)
        .unwrap()
        .try_lock()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    ga.unlock().await.unwrap();
    gb.unlock().await.unwrap();
}

/// One session cannot hold one lock twice; after release it can take it again at once,
/// even when the release happened by dropping the guard.
pub async fn same_session_twice(b: &Backend) {
    let lock = name("twice");
    let s = b.session(TTL).await;
    let m = Mutex::new(&s, &lock).unwrap();
    let g = m.lock().await.unwrap();
    let err = m.try_lock().await.unwrap_err();
    assert!(matches!(err, Error::AlreadyHeld { .. }), "{err}");
    let err = m
        .lock_timeout(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyHeld { .. }), "{err}");
    let t1 = g.fencing_token();
    drop(g);
    let g = m.lock_timeout(Duration::from_secs(2)).await.unwrap();
    assert!(g.fencing_token() > t1);
    g.unlock().await.unwrap();
}

/// Bad input is refused before any network call, with a clear error.
pub async fn bad_input(b: &Backend) {
    let client = b.client().await;
    for ttl in [
        Duration::ZERO,
        Duration::from_secs(1),
        Duration::from_secs(9_000_000_001),
    ] {
        let err = Session::builder(&client)
            .with_ttl(ttl)
            .build()
            .await
            .unwrap_err();
        assert!(err.is_invalid_input(), "{ttl:?}: {err}");
    }
    let s = b.session(TTL).await;
    for bad in [String::new(), "a\0b".into(), "x".repeat(2048)] {
        let err = Mutex::new(&s, &bad).unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
    }
    // Values over etcd's request limit are refused, and nothing held is lost.
    let lock = name("bad");
    let g = Mutex::new(&s, &lock).unwrap().lock().await.unwrap();
    let big = vec![b'x'; 2 * 1024 * 1024];
    let err = g
        .txn(Txn::new().and_then([TxnOp::put(format!("{lock}-big"), big, 0)]))
        .await
        .unwrap_err();
    assert!(!err.is_lost(), "{err}");
    assert!(!g.is_lost());
    g.unlock().await.unwrap();
}

// ----------------------------------------------------------------------------------------
// Election

/// The next leader from an observer, failing the test if it takes over 3 s.
async fn next(obs: &mut baton::Observe) -> baton::Leader {
    tokio::time::timeout(Duration::from_secs(3), obs.next())
        .await
        .expect("observe() hung")
        .expect("observe() ended")
}

use baton::{Election, RwLock};
use futures::StreamExt;

/// Five candidates in separate sessions take turns leading: leaders' terms never overlap,
/// and each term's fencing token is greater than the last.
pub async fn election_one_leader_at_a_time(b: &Backend) {
    const CANDIDATES: usize = 5;
    const TERMS: usize = 3;
    let election = name("election");
    let leading = Arc::new(AtomicBool::new(false));
    let log = Arc::new(StdMutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..CANDIDATES {
        let s = b.session(TTL).await;
        let (election, leading, log) = (election.clone(), leading.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            let e = Election::new(&s, &election).unwrap();
            for t in 0..TERMS {
                let mut l = e.campaign(format!("c{c}-t{t}")).await.unwrap();
                assert!(!leading.swap(true, Ordering::SeqCst), "two leaders at once");
                log.lock().unwrap().push(l.fencing_token());
                let seen = e.leader().await.unwrap();
                assert_eq!(seen.create_revision, l.fencing_token());
                assert_eq!(seen.value_str(), format!("c{c}-t{t}"));
                l.proclaim(format!("c{c}-t{t}-busy")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                assert!(leading.swap(false, Ordering::SeqCst));
                l.resign().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), CANDIDATES * TERMS);
    assert!(
        log.windows(2).all(|w| w[0] < w[1]),
        "terms out of order: {log:?}"
    );
}

/// `leader()` says "no leader" when there is none; `observe()` reports the first leader,
/// each proclaimed value and each new leader, in order, once each.
pub async fn election_leader_and_observe(b: &Backend) {
    let election = name("observe");
    let client = b.client().await;
    let err = Election::leader_with(&client, &election).await.unwrap_err();
    assert!(matches!(err, Error::NoLeader { .. }), "{err}");
    let mut obs = Election::observe_with(&client, &election).unwrap();

    let sa = b.session(TTL).await;
    let sb = b.session(TTL).await;
    let ea = Election::new(&sa, &election).unwrap();
    let eb = Election::new(&sb, &election).unwrap();
    let mut la = ea.campaign("a").await.unwrap();
    let first = next(&mut obs).await;
    assert_eq!(
        (first.value_str().as_ref(), first.key.as_str()),
        ("a", la.key())
    );
    la.proclaim("a2").await.unwrap();
    assert_eq!(next(&mut obs).await.value_str(), "a2");
    let waiting = tokio::spawn(async move { eb.campaign("b").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished());
    la.resign().await.unwrap();
    let lb = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let third = next(&mut obs).await;
    assert_eq!(third.value_str(), "b");
    assert_eq!(third.create_revision, lb.fencing_token());
    let leader = ea.leader().await.unwrap();
    assert_eq!(leader.value_str(), "b");
    // A late observer starts with the current leader.
    let mut late = Election::observe_with(&client, &election).unwrap();
    assert_eq!(next(&mut late).await.value_str(), "b");
    lb.resign().await.unwrap();
    let err = ea.leader().await.unwrap_err();
    assert!(matches!(err, Error::NoLeader { .. }), "{err}");
}

/// The leader's lease is revoked: its `lost()` fires within 1 s, the next candidate leads,
/// and the old leader's proclaim and resign say "not leader".
pub async fn election_leader_revoked(b: &Backend) {
    let election = name("revoke-leader");
    let admin = b.client().await;
    let sa = b.session(TTL).await;
    let sb = b.session(TTL).await;
    let mut la = Election::new(&sa, &election)
        .unwrap()
        .campaign("a")
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let eb = Election::new(&sb, &election).unwrap();
        async move { eb.campaign("b").await }
    });
    let mut obs = Election::observe_with(&admin, &election).unwrap();
    assert_eq!(next(&mut obs).await.value_str(), "a");
    tokio::time::sleep(Duration::from_millis(100)).await;
    admin.store().lease_revoke(sa.lease_id()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), la.lost())
        .await
        .expect("leader not told within 1 s");
    // Observers see the next leader after the old one's lease ended.
    assert_eq!(next(&mut obs).await.value_str(), "b");
    let lb = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("next candidate did not lead")
        .unwrap()
        .unwrap();
    assert!(lb.fencing_token() > la.fencing_token());
    let err = la.proclaim("again").await.unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err}");
    let err = la.resign().await.unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err}");
    assert_eq!(
        Election::new(&sb, &election)
            .unwrap()
            .leader()
            .await
            .unwrap()
            .value_str(),
        "b"
    );
    lb.resign().await.unwrap();
}

/// A candidate whose lease ends while it waits is never told it leads (Go's `Campaign` is).
pub async fn election_no_phantom_leader(b: &Backend) {
    let election = name("phantom");
    let admin = b.client().await;
    let sa = b.session(TTL).await;
    let sb = b.session(TTL).await;
    let la = Election::new(&sa, &election)
        .unwrap()
        .campaign("a")
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let eb = Election::new(&sb, &election).unwrap();
        async move { eb.campaign("b").await }
    });
    assert!(
        eventually(Duration::from_secs(3), || async {
            keys_under(&admin, &format!("{election}/")).await.len() == 2
        })
        .await
    );
    admin.store().lease_revoke(sb.lease_id()).await.unwrap();
    la.resign().await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("candidate hung")
        .unwrap();
    let err = res.expect_err("a candidate with a revoked lease was elected");
    assert!(err.is_lost(), "{err}");
    let err = Election::leader_with(&admin, &election).await.unwrap_err();
    assert!(matches!(err, Error::NoLeader { .. }), "{err}");
}

/// Cancelling a campaign (timeout or drop) withdraws the candidacy.
pub async fn election_cancel_campaign(b: &Backend) {
    let election = name("cancel-campaign");
    let admin = b.client().await;
    let sa = b.session(TTL).await;
    let sb = b.session(TTL).await;
    let la = Election::new(&sa, &election)
        .unwrap()
        .campaign("a")
        .await
        .unwrap();
    let eb = Election::new(&sb, &election).unwrap();
    let err = eb
        .campaign_timeout("b", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let only_leader = || async {
        keys_under(&admin, &format!("{election}/")).await == vec![la.key().to_string()]
    };
    assert!(
        eventually(Duration::from_secs(3), only_leader).await,
        "timed-out candidacy left"
    );
    tokio::select! {
        _ = eb.campaign("b") => panic!("elected while another leads"),
        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
    }
    assert!(
        eventually(Duration::from_secs(3), only_leader).await,
        "dropped candidacy left"
    );
    la.resign().await.unwrap();
}

/// Observing survives compaction of the revisions it started from.
pub async fn election_observe_across_compaction(b: &Backend) {
    let election = name("compact");
    let client = b.client().await;
    let sa = b.session(TTL).await;
    let sb = b.session(TTL).await;
    let mut obs = Election::observe_with(&client, &election).unwrap();
    let mut la = Election::new(&sa, &election)
        .unwrap()
        .campaign("a")
        .await
        .unwrap();
    assert_eq!(next(&mut obs).await.value_str(), "a");
    // Churn, then compact everything up to now.
    for i in 0..5 {
        la.proclaim(format!("a{i}")).await.unwrap();
    }
    let rev = client
        .store()
        .range(Range::key("x"))
        .await
        .unwrap()
        .header_revision;
    client.store().compact(rev).await.unwrap();
    let mut values = Vec::new();
    while values.last().map(String::as_str) != Some("a4") {
        values.push(next(&mut obs).await.value_str().into_owned());
    }
    let eb = Election::new(&sb, &election).unwrap();
    let waiting = tokio::spawn(async move { eb.campaign("b").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    la.resign().await.unwrap();
    let lb = waiting.await.unwrap().unwrap();
    assert_eq!(next(&mut obs).await.value_str(), "b");
    // A new observer after the compaction starts cleanly.
    let mut late = Election::observe_with(&client, &election).unwrap();
    assert_eq!(next(&mut late).await.value_str(), "b");
    lb.resign().await.unwrap();
}

/// A leadership can be resumed from its create revision by a session holding the lease.
pub async fn election_resume(b: &Backend) {
    let election = name("resume");
    let client = b.client().await;
    let s = b.session(TTL).await;
    let l = Election::new(&s, &election)
        .unwrap()
        .campaign("a")
        .await
        .unwrap();
    let token = l.fencing_token();
    // Another process adopts the lease (Go's WithLease + ResumeElection).
    let s2 = Session::builder(&client)
        .with_lease(s.lease_id())
        .build()
        .await
        .unwrap();
    let e2 = Election::new(&s2, &election).unwrap();
    let err = e2.resume(token + 1000).await.unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err}");
    let mut resumed = e2.resume(token).await.unwrap();
    assert_eq!(resumed.fencing_token(), token);
    assert_eq!(resumed.value(), b"a");
    resumed.proclaim("a2").await.unwrap();
    assert_eq!(e2.leader().await.unwrap().value_str(), "a2");
    std::mem::forget(l); // the first process "exited" without resigning
    resumed.resign().await.unwrap();
    s2.orphan();
}

// ----------------------------------------------------------------------------------------
// RwLock

/// Readers share, writers exclude everyone; a writer's read-modify-write never loses an
/// increment, and readers never see a writer inside.
pub async fn rwlock_mutual_exclusion(b: &Backend) {
    const READERS: usize = 3;
    const WRITERS: usize = 2;
    const ROUNDS: usize = 5;
    let lock = name("rw");
    let counter_key = format!("{lock}-counter");
    let readers_in = Arc::new(AtomicUsize::new(0));
    let writer_in = Arc::new(AtomicBool::new(false));
    let max_readers = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..READERS + WRITERS {
        let s = b.session(TTL).await;
        let (lock, counter_key) = (lock.clone(), counter_key.clone());
        let (readers_in, writer_in, max_readers) =
            (readers_in.clone(), writer_in.clone(), max_readers.clone());
        tasks.push(tokio::spawn(async move {
            let rw = RwLock::new(&s, &lock).unwrap();
            for _ in 0..ROUNDS {
                if i < READERS {
                    let g = rw.read().await.unwrap();
                    let n = readers_in.fetch_add(1, Ordering::SeqCst) + 1;
                    max_readers.fetch_max(n, Ordering::SeqCst);
                    assert!(
                        !writer_in.load(Ordering::SeqCst),
                        "reader inside with a writer"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    readers_in.fetch_sub(1, Ordering::SeqCst);
                    g.unlock().await.unwrap();
                } else {
                    let g = rw.write().await.unwrap();
                    assert!(!writer_in.swap(true, Ordering::SeqCst), "two writers");
                    assert_eq!(readers_in.load(Ordering::SeqCst), 0, "writer with readers");
                    let store = s.client().store();
                    let cur = store
                        .range(Range::key(counter_key.as_bytes()))
                        .await
                        .unwrap()
                        .kvs
                        .first()
                        .map(|kv| kv.value_str().parse::<u64>().unwrap())
                        .unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    g.txn(Txn::new().and_then([TxnOp::put(
                        counter_key.as_bytes(),
                        (cur + 1).to_string(),
                        0,
                    )]))
                    .await
                    .unwrap();
                    writer_in.store(false, Ordering::SeqCst);
                    g.unlock().await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let client = b.client().await;
    let v = client
        .store()
        .range(Range::key(counter_key.as_bytes()))
        .await
        .unwrap();
    assert_eq!(v.kvs[0].value_str(), (WRITERS * ROUNDS).to_string());
    assert!(keys_under(&client, &format!("{lock}/")).await.is_empty());
}

/// Readers share at once; a waiting writer blocks later readers (fairness); the writer gets
/// the lock when the earlier readers leave, and the later reader after the writer.
pub async fn rwlock_fair(b: &Backend) {
    let lock = name("rw-fair");
    let (s1, s2, s3) = (
        b.session(TTL).await,
        b.session(TTL).await,
        b.session(TTL).await,
    );
    let (r1, w, r2) = (
        RwLock::new(&s1, &lock).unwrap(),
        RwLock::new(&s2, &lock).unwrap(),
        RwLock::new(&s3, &lock).unwrap(),
    );
    let g1 = r1.read().await.unwrap();
    let g2 = r2.try_read().await.unwrap(); // readers share
    let err = w.try_write().await.unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    g2.unlock().await.unwrap();
    let writer = tokio::spawn(async move { w.write().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The queued writer blocks a later reader.
    let err = r2.try_read().await.unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    let reader = tokio::spawn({
        let r2 = r2.clone();
        async move { r2.read().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!writer.is_finished() && !reader.is_finished());
    let t1 = g1.fencing_token();
    g1.unlock().await.unwrap();
    let gw = tokio::time::timeout(Duration::from_secs(3), writer)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(gw.fencing_token() > t1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !reader.is_finished(),
        "reader entered while the writer holds"
    );
    gw.unlock().await.unwrap();
    let gr = tokio::time::timeout(Duration::from_secs(3), reader)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    gr.unlock().await.unwrap();
}

/// Cancelling a queued writer removes its key; a holder's revoked lease fires `lost()`.
pub async fn rwlock_cancel_and_loss(b: &Backend) {
    let lock = name("rw-cancel");
    let admin = b.client().await;
    let (s1, s2) = (b.session(TTL).await, b.session(TTL).await);
    let g = RwLock::new(&s1, &lock).unwrap().read().await.unwrap();
    let w = RwLock::new(&s2, &lock).unwrap();
    let err = w
        .write_timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(
        eventually(Duration::from_secs(3), || async {
            keys_under(&admin, &format!("{lock}/")).await == vec![g.key().to_string()]
        })
        .await,
        "cancelled writer left its key"
    );
    let waiting = tokio::spawn(async move { w.write().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    admin.store().lease_revoke(s1.lease_id()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), g.lost())
        .await
        .expect("read guard not lost within 1 s of the revoke");
    let gw = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    gw.unlock().await.unwrap();
}

/// A session that drops its guard of one mode and at once tries the other mode gets the lock:
/// the dropped guard's key, whose delete is still in flight, is this session's own, and the
/// try waits for that delete (one round trip) as `try_lock` does after a dropped mutex
/// guard, instead of finding the key ahead of it and answering `Locked` (found by review:
/// refused 6 in 20 times on etcd, more than half on the embedded store).
pub async fn rwlock_try_after_own_drop(b: &Backend) {
    let lock = name("rw-try-drop");
    let s = b.session(TTL).await;
    let rw = RwLock::new(&s, &lock).unwrap();
    let mut refused = Vec::new();
    for _ in 0..10 {
        drop(rw.write().await.unwrap());
        match rw.try_read().await {
            Ok(r) => r.unlock().await.unwrap(),
            Err(e) => refused.push(format!("try_read after dropping our write guard: {e}")),
        }
        drop(rw.read().await.unwrap());
        match rw.try_write().await {
            Ok(w) => w.unlock().await.unwrap(),
            Err(e) => refused.push(format!("try_write after dropping our read guard: {e}")),
        }
        // A refusal leaves the dropped guard's delete to finish before the next round.
        if !refused.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        refused.is_empty(),
        "{} of 20 refused: {refused:?}",
        refused.len()
    );
    // Holding one mode still refuses the other at once.
    let w = rw.write().await.unwrap();
    let err = rw.try_read().await.unwrap_err();
    assert!(matches!(err, Error::AlreadyHeld { .. }), "{err}");
    w.unlock().await.unwrap();
    let admin = b.client().await;
    assert!(keys_under(&admin, &format!("{lock}/")).await.is_empty());
}

/// Take `rw` in `mode` ("write" or "read") and forget the guard, as a process that stops
/// without releasing; returns the grant's fencing token.
async fn abandoned_hold(rw: &RwLock, mode: &str) -> i64 {
    if mode == "write" {
        let g = rw.write().await.unwrap();
        let t = g.fencing_token();
        std::mem::forget(g);
        t
    } else {
        let g = rw.read().await.unwrap();
        let t = g.fencing_token();
        std::mem::forget(g);
        t
    }
}

/// A process that resumes a lease (`Session::builder(..).with_lease`) whose key of one mode
/// is still in the store is refused the other mode at once with `AlreadyHeld`, naming the
/// mode held, as a session that took that key itself is: its own key is ahead of the one it
/// would put, and kept alive by its own lease, so waiting would be forever (found by review:
/// `read()` hung and `try_read()` answered `Locked`, refused by itself). The refusal leaves
/// the resumed key alone; taking the same mode adopts it; released, the other mode is free.
pub async fn rwlock_resume_other_mode(b: &Backend) {
    for held in ["write", "read"] {
        let lock = name("rw-resume");
        let client = b.client().await;
        // An earlier process takes the lock in one mode, then stops without releasing it.
        let old = b.session(TTL).await;
        let old_rw = RwLock::new(&old, &lock).unwrap();
        let token = abandoned_hold(&old_rw, held).await;
        old.orphan();
        drop(old_rw);
        drop(old);
        let s = Session::builder(&client)
            .with_lease(lease_of(&client, &lock, held).await)
            .build()
            .await
            .unwrap();
        let rw = RwLock::new(&s, &lock).unwrap();
        let refused = |what: &str, r: baton::Result<()>| match r {
            Err(e @ Error::AlreadyHeld { .. }) => assert!(
                e.to_string().contains(&format!("{held} lock")),
                "{what} with our {held} key resumed: the error does not name the mode: {e}"
            ),
            other => panic!("{what} with our {held} key resumed: {other:?}"),
        };
        let within = Duration::from_secs(3);
        if held == "write" {
            let waited = tokio::time::timeout(within, rw.read()).await;
            let waited = waited.unwrap_or_else(|_| panic!("read() waited for our own write key"));
            refused("read()", waited.map(drop));
            refused("try_read()", rw.try_read().await.map(drop));
            refused("read_timeout()", rw.read_timeout(within).await.map(drop));
        } else {
            let waited = tokio::time::timeout(within, rw.write()).await;
            let waited = waited.unwrap_or_else(|_| panic!("write() waited for our own read key"));
            refused("write()", waited.map(drop));
            refused("try_write()", rw.try_write().await.map(drop));
            refused("write_timeout()", rw.write_timeout(within).await.map(drop));
        }
        // The refusals left the resumed key in place.
        let mine = format!("{lock}/{held}/{:x}", s.lease_id());
        assert_eq!(keys_under(&client, &format!("{lock}/")).await, vec![mine]);
        // The same mode adopts it (same token); released, the other mode is granted.
        if held == "write" {
            let g = rw.try_write().await.unwrap();
            assert_eq!(g.fencing_token(), token);
            g.unlock().await.unwrap();
            rw.try_read().await.unwrap().unlock().await.unwrap();
        } else {
            let g = rw.try_read().await.unwrap();
            assert_eq!(g.fencing_token(), token);
            g.unlock().await.unwrap();
            rw.try_write().await.unwrap().unlock().await.unwrap();
        }
        assert!(keys_under(&client, &format!("{lock}/")).await.is_empty());
        s.close().await.unwrap();
    }
}

/// A resumed lease with both of its keys of a read-write lock in the store: what a process of
/// a version that queued a session behind its own key of the other mode left behind (it
/// resumed its write key, called `read()`, put its read key and hung), when it is restarted
/// on this version or during a rolling upgrade. The mode of the older key adopts that key
/// (same token); the other mode is refused with `AlreadyHeld` while the older key is there,
/// and adopts its own key once it is released; released in turn, no key is left. Both
/// orders: the write key older, and the read key older (found by a second-look review: each
/// mode was refused by the other's key, for good, and neither key could be released).
pub async fn rwlock_both_keys_resumed(b: &Backend) {
    for older in ["write", "read"] {
        let newer = if older == "write" { "read" } else { "write" };
        let lock = name("rw-both");
        let client = b.client().await;
        let old = b.session(TTL).await;
        let old_rw = RwLock::new(&old, &lock).unwrap();
        let older_token = abandoned_hold(&old_rw, older).await;
        let lease = old.lease_id();
        let newer_key = format!("{lock}/{newer}/{lease:x}");
        let newer_token = client
            .store()
            .put(newer_key.as_bytes(), b"", lease)
            .await
            .unwrap();
        old.orphan();
        drop(old_rw);
        drop(old);
        let s = Session::builder(&client)
            .with_lease(lease)
            .build()
            .await
            .unwrap();
        let rw = RwLock::new(&s, &lock).unwrap();
        let older_key = format!("{lock}/{older}/{lease:x}");
        let mut both = vec![older_key.clone(), newer_key.clone()];
        both.sort();

        // The newer key waits behind the older one: its mode is refused, both keys stay.
        for try_only in [true, false] {
            match take_and_release(&rw, newer, try_only).await {
                Err(e @ Error::AlreadyHeld { .. }) => assert!(
                    e.to_string().contains(&format!("({older} lock)")),
                    "{newer} (try: {try_only}) with our older {older} key resumed: {e}"
                ),
                other => panic!(
                    "{newer} (try: {try_only}) with our older {older} key resumed: {other:?}"
                ),
            }
        }
        assert_eq!(keys_under(&client, &format!("{lock}/")).await, both);

        // The older key's mode adopts it, with its token; released, the newer key's mode
        // adopts that one.
        let token = take_and_release(&rw, older, false).await;
        let token = token.unwrap_or_else(|e| panic!("{older} with both keys resumed: {e:?}"));
        assert_eq!(token, older_token, "{older} did not adopt our {older} key");
        assert_eq!(
            keys_under(&client, &format!("{lock}/")).await,
            vec![newer_key]
        );
        let token = take_and_release(&rw, newer, false).await;
        let token = token.unwrap_or_else(|e| panic!("{newer} after {older}'s release: {e:?}"));
        assert_eq!(token, newer_token, "{newer} did not adopt our {newer} key");
        assert!(keys_under(&client, &format!("{lock}/")).await.is_empty());
        s.close().await.unwrap();
    }
}

/// Take `rw` in `mode` (`read` or `write`), with `try_*` or waiting (at most 3 s, else a
/// panic), and release it: its fencing token.
async fn take_and_release(
    rw: &RwLock,
    mode: &str,
    try_only: bool,
) -> baton::Result<baton::store::Revision> {
    async fn waited<T>(mode: &str, f: impl std::future::Future<Output = T>) -> T {
        let within = Duration::from_secs(3);
        let r = tokio::time::timeout(within, f).await;
        r.unwrap_or_else(|_| panic!("{mode}() waited {within:?}"))
    }
    if mode == "write" {
        let g = match try_only {
            true => rw.try_write().await?,
            false => waited(mode, rw.write()).await?,
        };
        let token = g.fencing_token();
        g.unlock().await?;
        Ok(token)
    } else {
        let g = match try_only {
            true => rw.try_read().await?,
            false => waited(mode, rw.read()).await?,
        };
        let token = g.fencing_token();
        g.unlock().await?;
        Ok(token)
    }
}

/// The lease of the one key under `lock`'s `mode` (`read` or `write`) prefix.
async fn lease_of(client: &Client, lock: &str, mode: &str) -> baton::store::LeaseId {
    let resp = client
        .store()
        .range(Range::prefix(format!("{lock}/{mode}/")))
        .await
        .unwrap();
    assert_eq!(resp.kvs.len(), 1, "{resp:?}");
    resp.kvs[0].lease
}

/// A waiting reader whose key is deleted (an admin, `etcdctl del`) fails with `NotHeld`
/// at once, also when its client wrote to the lock a moment ago and so has a shared watch on
/// the writers' keys: the reader's key is not among them, and it used to be told only when
/// the writer ahead left (found by review: never, while the writer held on).
pub async fn rwlock_waiting_reader_key_deleted(b: &Backend) {
    for writes in [0, 3] {
        let lock = name("rw-reader-deleted");
        let admin = b.client().await;
        let s = b.session(TTL).await;
        let rw = RwLock::new(&s, &lock).unwrap();
        for _ in 0..writes {
            rw.write().await.unwrap().unlock().await.unwrap();
        }
        let other = b.session(TTL).await;
        let w = RwLock::new(&other, &lock).unwrap().write().await.unwrap();
        let reading = tokio::spawn({
            let rw = rw.clone();
            async move { rw.read().await }
        });
        let readers = format!("{lock}/read/");
        assert!(
            eventually(Duration::from_secs(3), || async {
                keys_under(&admin, &readers).await.len() == 1
            })
            .await,
            "the reader never queued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!reading.is_finished(), "the reader did not wait");
        let key = keys_under(&admin, &readers).await.remove(0);
        admin
            .store()
            .delete(KeyRange::key(key.as_bytes()))
            .await
            .unwrap();
        let told = tokio::time::timeout(Duration::from_secs(3), reading).await;
        assert!(!w.is_lost());
        w.unlock().await.unwrap();
        let result = told
            .unwrap_or_else(|_| {
                panic!("after {writes} writes: the waiting reader was not told within 3 s that its key was deleted")
            })
            .unwrap();
        let err = result.unwrap_err();
        assert!(
            matches!(err, Error::NotHeld { .. }),
            "after {writes} writes: {err}"
        );
        assert!(!s.is_lost(), "a deleted key must not end the session");
        // The session can read the lock again.
        rw.read().await.unwrap().unlock().await.unwrap();
    }
}

// ----------------------------------------------------------------------------------------
// The backend-neutral API

/// Code written only against `Coordinator` and its traits: locks exclude, tokens increase,
/// `try_lock` reports Locked, elections lead/observe/resign.
pub async fn coordinator_traits(b: &Backend) {
    let connect = || async { b.coordinator().with_ttl(TTL).connect().await.unwrap() };
    let (c1, c2) = (connect().await, connect().await);
    let lock = name("coord");
    let g1 = c1.lock(&lock).unwrap().lock().await.unwrap();
    let err = c2.lock(&lock).unwrap().try_lock().await.unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    // Every backend has fencing tokens but Redlock.
    let t1 = g1.fencing_token();
    assert_eq!(t1.is_none(), is_redlock(b), "{:?}", t1);
    g1.release().await.unwrap();
    let g2 = c2
        .lock(&lock)
        .unwrap()
        .lock_timeout(Duration::from_secs(2))
        .await
        .unwrap();
    if let Some(t1) = t1 {
        assert!(g2.fencing_token().unwrap() > t1);
    }
    assert!(!g2.is_lost());
    g2.release().await.unwrap();

    let e1 = c1.election(&format!("{lock}-e")).unwrap();
    let mut obs = c2.election(&format!("{lock}-e")).unwrap().observe();
    let mut l = e1.campaign(b"one".to_vec()).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(3), obs.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.value, b"one");
    l.proclaim(b"two".to_vec()).await.unwrap();
    assert_eq!(l.value(), b"two");
    assert_eq!(e1.leader().await.unwrap().value, b"two");
    l.release().await.unwrap();
    c1.close().await.unwrap();
    c2.close().await.unwrap();
    // Only backends whose holds share one lease (etcd, embedded) have such a token.
    if let Some(token) = c1.lost_token() {
        assert!(token.is_cancelled());
    }
}

fn is_redlock(b: &Backend) -> bool {
    b.endpoints().starts_with("redlock://")
}

/// Several coordinators contend for one lock through the traits only: never two holders,
/// nothing lost while held, fencing tokens (where the backend has them) strictly increase.
pub async fn coordinator_mutual_exclusion(b: &Backend) {
    const WORKERS: usize = 4;
    const ROUNDS: usize = 5;
    let lock = name("coord-mutex");
    let holding = Arc::new(AtomicBool::new(false));
    let last = Arc::new(StdMutex::new(0i64));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let c = b.coordinator().with_ttl(TTL).connect().await.unwrap();
        let (lock, holding, last) = (lock.clone(), holding.clone(), last.clone());
        let redlock = is_redlock(b);
        tasks.push(tokio::spawn(async move {
            let l = c.lock(&lock).unwrap();
            for _ in 0..ROUNDS {
                let g = l.lock_timeout(Duration::from_secs(20)).await.unwrap();
                assert!(!holding.swap(true, Ordering::SeqCst), "two holders at once");
                match g.fencing_token() {
                    Some(t) => {
                        let mut last = last.lock().unwrap();
                        assert!(t > *last, "token {t} after {}", *last);
                        *last = t;
                    }
                    None => assert!(redlock, "no fencing token"),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                assert!(!g.is_lost(), "{:?}", g.lost_reason());
                holding.store(false, Ordering::SeqCst);
                g.release().await.unwrap();
            }
            c.close().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Through the traits: `try_lock` on a held lock is `Locked`, `lock_timeout` is `Timeout`, a
/// dropped waiter leaves nothing that blocks the next one, and bad names are refused.
pub async fn coordinator_cancel_and_timeout(b: &Backend) {
    let connect = || async { b.coordinator().with_ttl(TTL).connect().await.unwrap() };
    let (c1, c2) = (connect().await, connect().await);
    let lock = name("coord-cancel");
    let held = c1.lock(&lock).unwrap().lock().await.unwrap();
    let l2 = c2.lock(&lock).unwrap();
    let err = l2.try_lock().await.unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    let err = l2
        .lock_timeout(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let waiting = tokio::spawn(async move { l2.lock().await.map(|g| g.key().to_string()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    held.release().await.unwrap();
    let g = c2
        .lock(&lock)
        .unwrap()
        .lock_timeout(Duration::from_secs(3))
        .await
        .unwrap();
    g.release().await.unwrap();
    for bad in [String::new(), "a\0b".to_string(), "x".repeat(1025)] {
        let err = c1.lock(&bad).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let err = c1.election(&bad).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
    c1.close().await.unwrap();
    c2.close().await.unwrap();
}

/// Two tasks share one coordinator and lock one name: the second task's `try_lock` is
/// `Locked` and its `lock_timeout` waits until the first releases, on every backend (on etcd
/// both tasks' locks share the coordinator's session).
pub async fn coordinator_tasks_share_one_coordinator(b: &Backend) {
    let c = b.coordinator().with_ttl(TTL).connect().await.unwrap();
    let lock = name("coord-tasks");
    let held = c.lock(&lock).unwrap().lock().await.unwrap();
    let err = c.lock(&lock).unwrap().try_lock().await.unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    let (c2, lock2) = (c.clone(), lock.clone());
    let waiting = tokio::spawn(async move {
        c2.lock(&lock2)
            .unwrap()
            .lock_timeout(Duration::from_secs(2))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the second task did not wait");
    let t1 = held.fencing_token();
    held.release().await.unwrap();
    let second = waiting.await.unwrap().unwrap();
    if let Some(t1) = t1 {
        assert!(second.fencing_token().unwrap() > t1);
    }
    assert!(!second.is_lost(), "{:?}", second.lost_reason());
    second.release().await.unwrap();

    // The same for two tasks campaigning in one election.
    let election = name("coord-tasks-elect");
    let first = c
        .election(&election)
        .unwrap()
        .campaign(b"first".to_vec())
        .await
        .unwrap();
    let (c2, e2) = (c.clone(), election.clone());
    let waiting = tokio::spawn(async move {
        c2.election(&e2)
            .unwrap()
            .campaign_timeout(b"second".to_vec(), Duration::from_secs(3))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the second candidate did not wait");
    first.release().await.unwrap();
    let second = waiting.await.unwrap().unwrap();
    assert_eq!(second.value(), b"second");
    let leader = c.election(&election).unwrap().leader().await.unwrap();
    assert_eq!(leader.value, b"second");
    second.release().await.unwrap();
    c.close().await.unwrap();
}

/// The next item of an observe stream (a leader, or an event), failing the test if it
/// takes over 3 s or the stream ends.
async fn next_observed<S: futures::Stream + Unpin>(obs: &mut S) -> S::Item {
    tokio::time::timeout(Duration::from_secs(3), obs.next())
        .await
        .expect("nothing observed within 3 s")
        .expect("the observation ended")
}

async fn next_leader(obs: &mut baton::coordinator::LeaderStream) -> baton::Leader {
    next_observed(obs).await
}

/// Through the traits: a candidate waits while another leads, leads once the leader
/// resigns, and an observer sees both leaders' values.
pub async fn coordinator_election_handover(b: &Backend) {
    let connect = || async { b.coordinator().with_ttl(TTL).connect().await.unwrap() };
    let (c1, c2, c3) = (connect().await, connect().await, connect().await);
    let election = name("coord-elect");
    let mut obs = c3.election(&election).unwrap().observe();
    let first = c1
        .election(&election)
        .unwrap()
        .campaign(b"first".to_vec())
        .await
        .unwrap();
    assert_eq!(next_leader(&mut obs).await.value, b"first");
    let e2 = c2.election(&election).unwrap();
    let second = tokio::spawn(async move { e2.campaign(b"second".to_vec()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished(), "two leaders at once");
    first.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(3), second)
        .await
        .expect("the candidate did not lead after the resignation")
        .unwrap()
        .unwrap();
    assert_eq!(next_leader(&mut obs).await.value, b"second");
    let leader = c3.election(&election).unwrap().leader().await.unwrap();
    assert_eq!(leader.value, b"second");
    second.release().await.unwrap();
    for c in [c1, c2, c3] {
        c.close().await.unwrap();
    }
}

/// Through the traits, `observe().with_vacancies()` reports the vacancy at the start, each
/// leader, a hand-over to a waiting candidate (on Redis, where candidates do not queue, a
/// vacancy may come between), and the vacancy when the last leader resigns, once; the plain
/// stream says nothing of vacancies. Both end when the coordinator is closed.
pub async fn coordinator_observe_vacancies(b: &Backend) {
    use baton::LeaderEvent;
    let connect = || async { b.coordinator().with_ttl(TTL).connect().await.unwrap() };
    let (c1, c2, c3) = (connect().await, connect().await, connect().await);
    let election = name("coord-vacant");
    let mut events = c3.election(&election).unwrap().observe().with_vacancies();
    let mut plain = c3.election(&election).unwrap().observe();
    assert_eq!(next_observed(&mut events).await, LeaderEvent::Vacant);

    let first = c1
        .election(&election)
        .unwrap()
        .campaign(b"first".to_vec())
        .await
        .unwrap();
    let LeaderEvent::Leader(leader) = next_observed(&mut events).await else {
        panic!("a vacancy while `first` leads");
    };
    assert_eq!(leader.value, b"first");
    assert_eq!(next_leader(&mut plain).await.value, b"first");

    let e2 = c2.election(&election).unwrap();
    let second = tokio::spawn(async move { e2.campaign(b"second".to_vec()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(3), second)
        .await
        .expect("the candidate did not lead after the resignation")
        .unwrap()
        .unwrap();
    let redis = b.endpoints.starts_with("redis") || b.endpoints.starts_with("redlock");
    let mut event = next_observed(&mut events).await;
    if redis && event == LeaderEvent::Vacant {
        event = next_observed(&mut events).await;
    }
    let LeaderEvent::Leader(leader) = event else {
        panic!("{event:?} after the hand-over to a waiting candidate");
    };
    assert_eq!(leader.value, b"second");
    assert_eq!(next_leader(&mut plain).await.value, b"second");

    second.release().await.unwrap();
    assert_eq!(next_observed(&mut events).await, LeaderEvent::Vacant);
    // Once: nothing more while the election stays empty (past the Redis fallback poll),
    // and the plain stream says nothing at all.
    let quiet = Duration::from_millis(1500);
    let more = tokio::time::timeout(quiet, events.next()).await;
    assert!(more.is_err(), "after the vacancy: {more:?}");
    let more = tokio::time::timeout(Duration::from_millis(10), plain.next()).await;
    assert!(more.is_err(), "the plain stream yielded {more:?}");

    c3.close().await.unwrap();
    for (what, ended) in [
        (
            "with_vacancies",
            tokio::time::timeout(Duration::from_secs(3), events.next()).await,
        ),
        (
            "plain",
            tokio::time::timeout(Duration::from_secs(3), plain.next())
                .await
                .map(|l| l.map(LeaderEvent::Leader)),
        ),
    ] {
        assert_eq!(
            ended.ok(),
            Some(None),
            "{what}: did not end when the coordinator was closed"
        );
    }
    assert!(events.take_error().is_none());
    for c in [c1, c2] {
        c.close().await.unwrap();
    }
}

/// After `close()`, through the traits, every backend answers alike: held guards are lost,
/// a task waiting for a lock or a leadership fails with [`Error::Closed`], and so does
/// every later call (`lock`, `try_lock`, `lock_timeout`, `campaign`, `leader`); `observe()`
/// ends; a second `close()` is fine; the lock is free for another coordinator.
pub async fn coordinator_after_close(b: &Backend) {
    let connect = || async { b.coordinator().with_ttl(TTL).connect().await.unwrap() };
    let (c, other) = (connect().await, connect().await);
    let lock = name("coord-closed");
    let election = format!("{lock}-e");
    let held = c.lock(&lock).unwrap().lock().await.unwrap();
    let leading = c
        .election(&election)
        .unwrap()
        .campaign(b"v".to_vec())
        .await
        .unwrap();
    // A second coordinator's waiter, and a waiter of this coordinator's own, queued behind
    // it: the first gets the lock, the second fails.
    let l_other = other.lock(&lock).unwrap();
    let others_turn =
        tokio::spawn(async move { l_other.lock_timeout(Duration::from_secs(5)).await });
    let own = c
        .lock(&format!("{lock}-own"))
        .unwrap()
        .lock()
        .await
        .unwrap();
    let c2 = c.clone();
    let own_lock = format!("{lock}-own");
    let own_waiter =
        tokio::spawn(async move { c2.lock(&own_lock).unwrap().lock().await.map(drop) });
    let c3 = c.clone();
    let e3 = election.clone();
    let own_candidate = tokio::spawn(async move {
        c3.election(&e3)
            .unwrap()
            .campaign(b"w".to_vec())
            .await
            .map(drop)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!own_waiter.is_finished() && !own_candidate.is_finished());
    c.close().await.unwrap();
    for (what, task) in [
        ("a queued lock()", own_waiter),
        ("a queued campaign()", own_candidate),
    ] {
        let got = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap_or_else(|_| panic!("{what} still waits after close()"))
            .unwrap();
        assert!(matches!(got, Err(Error::Closed)), "{what}: {got:?}");
    }
    assert!(held.is_lost() && leading.is_lost() && own.is_lost());
    let err = held.release().await.unwrap_err();
    assert!(
        matches!(err, Error::NotHeld { .. }),
        "release of a lock after close(): {err:?}"
    );
    let err = leading.release().await.unwrap_err();
    assert!(
        matches!(err, Error::NotLeader { .. }),
        "resign after close(): {err:?}"
    );
    drop(own);
    // Every later call fails with Closed.
    let expect_closed = |what: &str, got: Result<(), Error>| {
        assert!(
            matches!(got, Err(Error::Closed)),
            "{what} after close(): {got:?}"
        );
    };
    match c.lock(&lock) {
        Ok(l) => {
            expect_closed("lock()", l.lock().await.map(drop));
            expect_closed("try_lock()", l.try_lock().await.map(drop));
            expect_closed(
                "lock_timeout()",
                l.lock_timeout(Duration::from_secs(1)).await.map(drop),
            );
        }
        Err(e) => expect_closed("Coordinator::lock", Err(e)),
    }
    match c.election(&election) {
        Ok(e) => {
            expect_closed("campaign()", e.campaign(b"x".to_vec()).await.map(drop));
            expect_closed(
                "campaign_timeout()",
                e.campaign_timeout(b"x".to_vec(), Duration::from_secs(1))
                    .await
                    .map(drop),
            );
            expect_closed("leader()", e.leader().await.map(drop));
            let mut obs = e.observe();
            let next = tokio::time::timeout(Duration::from_secs(3), obs.next())
                .await
                .expect("observe() after close() neither ended nor yielded");
            assert!(next.is_none(), "observe() after close() yielded {next:?}");
        }
        Err(e) => expect_closed("Coordinator::election", Err(e)),
    }
    c.close().await.unwrap();
    // The other coordinator was not disturbed: it takes the lock that close() freed.
    let g = tokio::time::timeout(Duration::from_secs(6), others_turn)
        .await
        .expect("the other coordinator's waiter hung")
        .unwrap()
        .unwrap();
    assert!(!g.is_lost());
    g.release().await.unwrap();
    other.close().await.unwrap();
}

/// Through the traits, keys are reported relative to the namespace on every backend:
/// [`Guard::key`](baton::coordinator::Guard::key) of a lock and of a leadership, and the `key` of the
/// [`Leader`](baton::Leader) that `leader()` and `observe()` report, start with the name
/// (`NAME/<lease>` on etcd and the embedded store, `NAME` on Redis), never with the
/// namespace; so scripts see the same key whichever backend they run on.
pub async fn coordinator_keys_relative_to_namespace(b: &Backend) {
    let c = b.coordinator().with_ttl(TTL).connect().await.unwrap();
    let lock = name("coord-keys");
    let election = format!("{lock}-e");
    let relative = |what: &str, key: &str, name: &str| {
        assert!(
            key == name || key.starts_with(&format!("{name}/")),
            "{what}: key {key:?} is not {name:?} or {name:?}/… (namespace {:?})",
            b.namespace
        );
    };
    let g = c.lock(&lock).unwrap().lock().await.unwrap();
    relative("lock guard", g.key(), &lock);
    let e = c.election(&election).unwrap();
    let mut obs = e.observe();
    let l = e.campaign(b"v".to_vec()).await.unwrap();
    relative("leadership", l.key(), &election);
    let leader = e.leader().await.unwrap();
    relative("leader()", &leader.key, &election);
    assert_eq!(leader.key, l.key(), "leader() and the leadership disagree");
    relative("observe()", &next_leader(&mut obs).await.key, &election);
    g.release().await.unwrap();
    l.release().await.unwrap();
    c.close().await.unwrap();
}

// ----------------------------------------------------------------------------------------
// Recipes

use baton::{
    Barrier, CountDownLatch, DoubleBarrier, Isolation, PriorityQueue, Queue, Semaphore,
    SharedCount, SharedValue, Stm,
};

/// A small deterministic generator (xorshift), so the suite needs no `rand`.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn is_mem(b: &Backend) -> bool {
    b.endpoints().starts_with("mem://")
}

/// Five sessions share two permits: never more than two holders, both permits used, FIFO
/// grants, nothing left behind.
pub async fn semaphore_limits_holders(b: &Backend) {
    const WORKERS: usize = 5;
    const ROUNDS: usize = 3;
    let sem = name("sem");
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let s = b.session(TTL).await;
        let (sem, inside, most) = (sem.clone(), inside.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            let sem = Semaphore::new(&s, &sem, 2).unwrap();
            for _ in 0..ROUNDS {
                let p = sem.acquire().await.unwrap();
                let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(n <= 2, "{n} holders of 2 permits");
                most.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                p.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "the second permit was never used"
    );
    let client = b.client().await;
    assert!(keys_under(&client, &format!("{sem}/")).await.is_empty());
}

/// A waiter that is not polled (as one paused or killed) does not hold up the waiters
/// behind it: once the keys ahead of it fit, it counts as a holder, and a waiter behind it
/// that fits too is granted at once. Before, a waiter behind another waited for that one to
/// be granted and rewrite its key: until its lease expired (TTL, 10 s here) with permits
/// free (found by review: 4.8 s on etcd, 6 s on mem with a 5 s TTL).
pub async fn semaphore_a_stuck_waiter_does_not_block_those_behind(b: &Backend) {
    let sem = name("sem-stuck");
    let (h, p, w) = (
        b.session(TTL).await,
        b.session(TTL).await,
        b.session(TTL).await,
    );
    let held = Semaphore::new(&h, &sem, 4)
        .unwrap()
        .acquire_many(4)
        .await
        .unwrap();
    let stuck = Semaphore::new(&p, &sem, 4).unwrap();
    let stuck = stuck.acquire();
    tokio::pin!(stuck);
    // Polled until it has queued, then never again.
    let admin = b.client().await;
    let queued = async {
        while keys_under(&admin, &format!("{sem}/")).await.len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        r = &mut stuck => panic!("granted a permit of a full semaphore: {:?}", r.map(drop)),
        () = queued => {}
    }
    let behind = Semaphore::new(&w, &sem, 4).unwrap();
    let waiting = tokio::spawn(async move { behind.acquire().await });
    let three = || async { keys_under(&admin, &format!("{sem}/")).await.len() == 3 };
    assert!(
        eventually(Duration::from_secs(3), three).await,
        "the waiter behind never queued"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    held.release().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("a waiter that fits waited for the stuck one ahead of it")
        .unwrap()
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "granted {:?} after the release",
        start.elapsed()
    );
    // The stuck waiter fits too: polled again, it has its permit at once.
    let mine = tokio::time::timeout(Duration::from_secs(5), &mut stuck)
        .await
        .expect("the stuck waiter, polled again, was not granted")
        .unwrap();
    mine.release().await.unwrap();
    got.release().await.unwrap();
    assert!(keys_under(&admin, &format!("{sem}/")).await.is_empty());
}

/// A holder's session dies: its permit goes to the first waiter within the TTL (+1 s), and
/// its `lost()` fires. `try_acquire` on a full semaphore, a timed-out waiter and a handle
/// with another permit count all fail cleanly, leaving no key.
pub async fn semaphore_holder_dies(b: &Backend) {
    let sem = name("sem-dies");
    let admin = b.client().await;
    let dying = b.session(SHORT_TTL).await;
    let (s2, s3, s4) = (
        b.session(TTL).await,
        b.session(TTL).await,
        b.session(TTL).await,
    );
    let p1 = Semaphore::new(&dying, &sem, 2)
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let p2 = Semaphore::new(&s2, &sem, 2)
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let third = Semaphore::new(&s3, &sem, 2).unwrap();
    let err = third.try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::NoPermits { .. }), "{err}");
    let err = third
        .acquire_timeout(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let err = Semaphore::new(&s4, &sem, 3)
        .unwrap()
        .acquire()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Mismatch { .. }), "{err}");
    let holders = || async { keys_under(&admin, &format!("{sem}/")).await.len() == 2 };
    assert!(
        eventually(Duration::from_secs(3), holders).await,
        "failed acquires left keys"
    );

    let waiting = tokio::spawn(async move { third.acquire().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    dying.orphan();
    let p3 = tokio::time::timeout(SHORT_TTL + Duration::from_secs(3), waiting)
        .await
        .expect("the dead holder's permit was never freed")
        .unwrap()
        .unwrap();
    let took = start.elapsed();
    assert!(
        took <= SHORT_TTL + Duration::from_secs(1),
        "permit freed after {took:?}"
    );
    tokio::time::timeout(Duration::from_secs(1), p1.lost())
        .await
        .expect("the dead holder's permit not lost");
    assert!(p3.create_revision() > p2.create_revision());
    p2.release().await.unwrap();
    p3.release().await.unwrap();
    assert!(keys_under(&admin, &format!("{sem}/")).await.is_empty());
}

/// A barrier holds waiters until released; one held while a session lives is released
/// when the session's lease is revoked. A count-down latch opens at zero, exactly once.
pub async fn barrier_and_latch(b: &Backend) {
    let gate = name("barrier");
    let client = b.client().await;
    let barrier = Barrier::new(&client, &gate).unwrap();
    assert!(barrier.hold().await.unwrap());
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let c = b.client().await;
        let gate = gate.clone();
        waiters.push(tokio::spawn(async move {
            Barrier::new(&c, &gate).unwrap().wait().await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "passed a held barrier"
    );
    assert!(barrier.release().await.unwrap());
    for w in waiters {
        tokio::time::timeout(Duration::from_secs(3), w)
            .await
            .expect("waiter not released")
            .unwrap()
            .unwrap();
    }
    let holder = b.session(TTL).await;
    assert!(barrier.hold_while(&holder).await.unwrap());
    let waiter = tokio::spawn({
        let barrier = barrier.clone();
        async move { barrier.wait().await }
    });
    client
        .store()
        .lease_revoke(holder.lease_id())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("a barrier bound to a revoked lease still held")
        .unwrap()
        .unwrap();

    let latch_name = name("latch");
    let latch = CountDownLatch::new(&client, &latch_name, 5).unwrap();
    let waiting = tokio::spawn({
        let latch = latch.clone();
        async move { latch.wait().await }
    });
    let mut downs = Vec::new();
    for _ in 0..5 {
        let c = b.client().await;
        let latch_name = latch_name.clone();
        downs.push(tokio::spawn(async move {
            CountDownLatch::new(&c, &latch_name, 5)
                .unwrap()
                .count_down()
                .await
                .unwrap()
        }));
    }
    let mut left = Vec::new();
    for d in downs {
        left.push(d.await.unwrap());
    }
    left.sort_unstable();
    assert_eq!(left, [0, 1, 2, 3, 4], "a count-down was lost or doubled");
    tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("latch waiter not released")
        .unwrap()
        .unwrap();
    assert_eq!(latch.count_down().await.unwrap(), 0);
}

/// Five participants in separate sessions, arriving one by one, twice: nobody passes
/// `enter` before all five have arrived, nor `leave` before all five have started leaving.
pub async fn double_barrier_five(b: &Backend) {
    const N: usize = 5;
    let barrier = name("double");
    let arrived = Arc::new(AtomicUsize::new(0));
    let leaving = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..N {
        let s = b.session(TTL).await;
        let (barrier, arrived, leaving) = (barrier.clone(), arrived.clone(), leaving.clone());
        tasks.push(tokio::spawn(async move {
            let db = DoubleBarrier::new(&s, &barrier, N as u32).unwrap();
            let mut rounds = Vec::new();
            for round in 1..=2 {
                // Stagger the arrivals and departures.
                tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
                arrived.fetch_add(1, Ordering::SeqCst);
                let inside = db.enter().await.unwrap();
                assert!(
                    arrived.load(Ordering::SeqCst) >= N * round,
                    "entered before everyone arrived"
                );
                rounds.push(inside.round());
                tokio::time::sleep(Duration::from_millis(10 * (N - i) as u64)).await;
                leaving.fetch_add(1, Ordering::SeqCst);
                inside.leave().await.unwrap();
                assert!(
                    leaving.load(Ordering::SeqCst) >= N * round,
                    "left before everyone left"
                );
            }
            rounds
        }));
    }
    let mut rounds = Vec::new();
    for t in tasks {
        rounds.push(t.await.unwrap());
    }
    assert!(rounds.windows(2).all(|w| w[0] == w[1]), "{rounds:?}");
    let client = b.client().await;
    assert!(keys_under(&client, &format!("{barrier}/")).await.is_empty());
}

/// A participant that dies before the barrier opens no longer counts; one that dies
/// inside counts as gone once its lease expires, so the others' `leave()` returns.
pub async fn double_barrier_participant_dies(b: &Backend) {
    let barrier = name("double-dies");
    let admin = b.client().await;
    let (doomed, s2, s3) = (
        b.session(TTL).await,
        b.session(TTL).await,
        b.session(TTL).await,
    );
    // Before it opens: a waiter whose lease is revoked fails, and does not count.
    let early = tokio::spawn({
        let db = DoubleBarrier::new(&doomed, &barrier, 2).unwrap();
        async move { db.enter().await }
    });
    assert!(
        eventually(Duration::from_secs(3), || async {
            keys_under(&admin, &format!("{barrier}/waiters/"))
                .await
                .len()
                == 1
        })
        .await
    );
    admin.store().lease_revoke(doomed.lease_id()).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(3), early)
        .await
        .expect("a participant with a revoked lease hung in enter")
        .unwrap()
        .unwrap_err();
    assert!(err.is_lost(), "{err}");
    let second = tokio::spawn({
        let db = DoubleBarrier::new(&s2, &barrier, 2).unwrap();
        async move { db.enter().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "entered with a dead participant counted"
    );
    let dying = b.session(SHORT_TTL).await;
    let g_dying = DoubleBarrier::new(&dying, &barrier, 2)
        .unwrap()
        .enter_timeout(Duration::from_secs(3))
        .await
        .unwrap();
    let g2 = second.await.unwrap().unwrap();
    assert_eq!(g2.round(), g_dying.round());
    let err = DoubleBarrier::new(&s3, &barrier, 2)
        .unwrap()
        .enter()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BarrierFull { .. }), "{err}");

    // Inside: the dying participant never leaves; its lease expires.
    std::mem::forget(g_dying);
    dying.orphan();
    let start = Instant::now();
    tokio::time::timeout(SHORT_TTL + Duration::from_secs(3), g2.leave())
        .await
        .expect("leave() blocked by a dead participant")
        .unwrap();
    assert!(start.elapsed() <= SHORT_TTL + Duration::from_secs(1));
    assert!(keys_under(&admin, &format!("{barrier}/")).await.is_empty());
}

/// Two producers and three consumers: every item is received exactly once, and each
/// producer's items in the order it enqueued them. 500 items per producer on the embedded
/// store; on etcd 250 per producer, 500 in all (to keep the suite fast).
pub async fn queue_exactly_once_fifo(b: &Backend) {
    let items = if is_mem(b) { 500 } else { 250 };
    let queue = name("queue");
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let c = b.client().await;
        let queue = queue.clone();
        consumers.push(tokio::spawn(async move {
            let q = Queue::new(&c, &queue).unwrap();
            let mut got = Vec::new();
            while let Ok(v) = q.dequeue_timeout(Duration::from_secs(2)).await {
                got.push(String::from_utf8(v).unwrap());
            }
            got
        }));
    }
    let mut producers = Vec::new();
    for p in 0..2 {
        let c = b.client().await;
        let queue = queue.clone();
        producers.push(tokio::spawn(async move {
            let q = Queue::new(&c, &queue).unwrap();
            for i in 0..items {
                q.enqueue(format!("{p}/{i:04}")).await.unwrap();
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    for c in consumers {
        let got = c.await.unwrap();
        for p in 0..2 {
            let mine: Vec<&String> = got
                .iter()
                .filter(|v| v.starts_with(&format!("{p}/")))
                .collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "producer {p}'s items out of order"
            );
        }
        for v in got {
            assert!(seen.insert(v.clone()), "{v} received twice");
        }
    }
    assert_eq!(seen.len(), 2 * items, "items lost");
    let client = b.client().await;
    assert!(Queue::new(&client, &queue)
        .unwrap()
        .is_empty()
        .await
        .unwrap());
}

/// Dequeues dropped at any moment (a `tokio::time::timeout` of 0.2 to 2 ms around each,
/// much shorter than a claim's round trip on etcd) lose no item and give none twice: a
/// claim whose caller is gone finishes all the same, and its item goes to the handle's
/// next dequeue or back into the queue. First one consumer that stops when `is_empty()`
/// says so, then four racing consumers on a FIFO and a priority queue at once.
pub async fn queue_dropped_dequeues_lose_nothing(b: &Backend) {
    const ITEMS: usize = 200;
    let bound = |i: u64| Duration::from_micros(200 + (i % 7) * 300);
    // One consumer, as a loop that stops when the queue is empty.
    let client = b.client().await;
    let q = Queue::new(&client, &name("dropped")).unwrap();
    for i in 0..ITEMS {
        q.enqueue(format!("{i}")).await.unwrap();
    }
    let mut got = std::collections::HashSet::new();
    for i in 0..100_000u64 {
        if q.is_empty().await.unwrap() {
            break;
        }
        if let Ok(v) = tokio::time::timeout(bound(i), q.dequeue()).await {
            let v = String::from_utf8(v.unwrap()).unwrap();
            assert!(got.insert(v.clone()), "{v} received twice");
        }
    }
    assert_eq!(got.len(), ITEMS, "items lost to dropped dequeue futures");

    // Four consumers of each kind, racing; each ends when its queue is empty.
    let fifo = name("dropped-fifo");
    let pq = name("dropped-pq");
    let per_kind = if is_mem(b) { 300 } else { 150 };
    let q = Queue::new(&client, &fifo).unwrap();
    let p = PriorityQueue::new(&client, &pq).unwrap();
    for i in 0..per_kind {
        q.enqueue(format!("f{i}")).await.unwrap();
        p.enqueue(format!("p{i}"), (i % 3) as u16).await.unwrap();
    }
    let mut consumers = Vec::new();
    for c in 0..8u64 {
        let client = b.client().await;
        let (fifo, pq) = (fifo.clone(), pq.clone());
        consumers.push(tokio::spawn(async move {
            let q = Queue::new(&client, &fifo).unwrap();
            let p = PriorityQueue::new(&client, &pq).unwrap();
            let mut got = Vec::new();
            for i in c.. {
                let (empty, taken) = if c % 2 == 0 {
                    (
                        q.is_empty().await.unwrap(),
                        tokio::time::timeout(bound(i), q.dequeue()).await,
                    )
                } else {
                    (
                        p.is_empty().await.unwrap(),
                        tokio::time::timeout(bound(i), p.dequeue()).await,
                    )
                };
                if let Ok(v) = taken {
                    got.push(String::from_utf8(v.unwrap()).unwrap());
                } else if empty {
                    break;
                }
            }
            got
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for c in consumers {
        for v in c.await.unwrap() {
            assert!(seen.insert(v.clone()), "{v} received twice");
        }
    }
    // A consumer that saw its queue empty may have stopped while another's item was on
    // its way back: the rest is drained here, and must be nothing or what is missing.
    while let Ok(v) = q.dequeue_timeout(Duration::from_millis(500)).await {
        let v = String::from_utf8(v).unwrap();
        assert!(seen.insert(v.clone()), "{v} received twice");
    }
    while let Ok(v) = p.dequeue_timeout(Duration::from_millis(500)).await {
        let v = String::from_utf8(v).unwrap();
        assert!(seen.insert(v.clone()), "{v} received twice");
    }
    assert_eq!(
        seen.len(),
        2 * per_kind,
        "items lost to dropped dequeue futures"
    );
}

/// Producers enqueue concurrently at mixed priorities; consumers drain concurrently. Each
/// consumer gets lower numbers first, one producer's items of one priority in order, and
/// every item exactly once. A waiting consumer gets a new item at once.
pub async fn priority_queue_order(b: &Backend) {
    const PRODUCERS: u16 = 3;
    const ITEMS: u16 = 20;
    let queue = name("pq");
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let c = b.client().await;
        let queue = queue.clone();
        producers.push(tokio::spawn(async move {
            let q = PriorityQueue::new(&c, &queue).unwrap();
            for i in 0..ITEMS {
                let priority = (i * 7 + p) % 4;
                q.enqueue(format!("{priority}/{p}/{i:02}"), priority)
                    .await
                    .unwrap();
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let c = b.client().await;
        let queue = queue.clone();
        consumers.push(tokio::spawn(async move {
            let q = PriorityQueue::new(&c, &queue).unwrap();
            let mut got = Vec::new();
            while let Some(v) = q.try_dequeue().await.unwrap() {
                got.push(String::from_utf8(v).unwrap());
            }
            got
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for c in consumers {
        let got = c.await.unwrap();
        assert!(
            got.windows(2).all(|w| w[0][..1] <= w[1][..1]),
            "priorities out of order: {got:?}"
        );
        // Within one priority, one producer's items in enqueue order.
        assert!(
            got.windows(2)
                .filter(|w| w[0][..4] == w[1][..4])
                .all(|w| w[0] < w[1]),
            "FIFO broken within a priority: {got:?}"
        );
        for v in got {
            assert!(seen.insert(v.clone()), "{v} received twice");
        }
    }
    assert_eq!(seen.len(), usize::from(PRODUCERS * ITEMS));
    let client = b.client().await;
    let q = PriorityQueue::new(&client, &queue).unwrap();
    let waiting = tokio::spawn({
        let q = q.clone();
        async move { q.dequeue().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    q.enqueue("late", 9).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("waiting consumer not woken")
        .unwrap()
        .unwrap();
    assert_eq!(got, b"late");
}

/// A shared value written by one client is seen by another's watch, compare-and-set loses
/// cleanly to a concurrent writer, the watch survives compaction with the latest value,
/// and concurrent additions to a shared count from separate clients are never lost.
pub async fn shared_value_sync(b: &Backend) {
    let key = name("shared");
    let (c1, c2) = (b.client().await, b.client().await);
    let writer = SharedValue::new(&c1, &key).unwrap();
    let reader = SharedValue::new(&c2, &key).unwrap();
    let mut changes = reader.watch();
    async fn next_change(changes: &mut baton::Changes) -> Option<baton::Versioned> {
        tokio::time::timeout(Duration::from_secs(3), changes.next())
            .await
            .expect("watch hung")
            .expect("watch ended")
    }
    assert_eq!(next_change(&mut changes).await, None);
    let v1 = writer.set("one").await.unwrap();
    assert_eq!(next_change(&mut changes).await.unwrap().value, b"one");
    assert!(reader
        .compare_and_set(v1.mod_revision, "two")
        .await
        .unwrap()
        .is_set());
    match writer
        .compare_and_set(v1.mod_revision, "lost")
        .await
        .unwrap()
    {
        baton::CompareAndSet::Conflict(Some(now)) => assert_eq!(now.value, b"two"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(next_change(&mut changes).await.unwrap().value, b"two");
    for i in 0..5 {
        writer.set(format!("v{i}")).await.unwrap();
    }
    let rev = c1
        .store()
        .range(Range::key(key.as_bytes()))
        .await
        .unwrap()
        .header_revision;
    c1.store().compact(rev).await.unwrap();
    let mut last = Vec::new();
    while last != b"v4" {
        last = next_change(&mut changes).await.unwrap().value;
    }

    let count_key = format!("{key}-count");
    let mut adders = Vec::new();
    for _ in 0..4 {
        let c = b.client().await;
        let count_key = count_key.clone();
        adders.push(tokio::spawn(async move {
            let count = SharedCount::new(&c, &count_key).unwrap();
            for _ in 0..10 {
                count.add(1).await.unwrap();
            }
        }));
    }
    for a in adders {
        a.await.unwrap();
    }
    assert_eq!(
        SharedCount::new(&c2, &count_key)
            .unwrap()
            .get()
            .await
            .unwrap()
            .value,
        40
    );
}

/// Bank transfers: 10 accounts, 8 concurrent tasks making random transfers. The total is
/// conserved at every isolation level that checks reads (all but read committed), and an
/// auditor reading every account in a transaction always sees the full total. Read
/// committed runs too, but may lose updates, so its total is not checked.
pub async fn stm_bank_transfer(b: &Backend) {
    const ACCOUNTS: u64 = 10;
    const TASKS: u64 = 8;
    let transfers = if is_mem(b) { 40 } else { 12 };
    for isolation in [
        Isolation::SerializableSnapshot,
        Isolation::Serializable,
        Isolation::RepeatableReads,
        Isolation::ReadCommitted,
    ] {
        let bank = name("bank");
        let account = |i: u64| format!("{bank}/{i}");
        let client = b.client().await;
        for i in 0..ACCOUNTS {
            client
                .store()
                .put(account(i).as_bytes(), b"100", 0)
                .await
                .unwrap();
        }
        let balance = |v: Option<Vec<u8>>| -> i64 {
            v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(0)
        };
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let c = b.client().await;
            let bank = bank.clone();
            tasks.push(tokio::spawn(async move {
                let stm = Stm::new(&c).with_isolation(isolation);
                let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15 ^ (t + 1));
                for _ in 0..transfers {
                    let from = format!("{bank}/{}", rng.below(ACCOUNTS));
                    let to = format!("{bank}/{}", rng.below(ACCOUNTS));
                    let amount = rng.below(30) as i64 + 1;
                    if from == to {
                        continue;
                    }
                    stm.run(|tx| {
                        let (from, to) = (&from, &to);
                        async move {
                            let a = balance(tx.get(from).await?);
                            let b = balance(tx.get(to).await?);
                            if a >= amount {
                                tx.put(from.as_str(), (a - amount).to_string());
                                tx.put(to.as_str(), (b + amount).to_string());
                            }
                            Ok::<_, Error>(())
                        }
                    })
                    .await
                    .unwrap();
                }
            }));
        }
        let accounts: Vec<String> = (0..ACCOUNTS).map(account).collect();
        let audit = || {
            let stm = Stm::new(&client).with_isolation(isolation);
            let accounts = &accounts;
            async move {
                let seen = Arc::new(StdMutex::new(Vec::new()));
                let committed = stm
                    .run(|tx| {
                        let seen = seen.clone();
                        async move {
                            let total: i64 =
                                tx.get_many(accounts).await?.into_iter().map(balance).sum();
                            seen.lock().unwrap().push(total);
                            Ok::<_, Error>(total)
                        }
                    })
                    .await
                    .unwrap();
                let seen = seen.lock().unwrap().clone();
                (committed, seen)
            }
        };
        let expected = (ACCOUNTS * 100) as i64;
        while !tasks.iter().all(|t| t.is_finished()) {
            let (committed, seen) = audit().await;
            if isolation != Isolation::ReadCommitted {
                assert_eq!(committed, expected, "{isolation:?}: audit saw money vanish");
            }
            if matches!(
                isolation,
                Isolation::SerializableSnapshot | Isolation::Serializable
            ) {
                assert!(
                    seen.iter().all(|t| *t == expected),
                    "{isolation:?}: a snapshot was inconsistent: {seen:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (total, _) = audit().await;
        if isolation != Isolation::ReadCommitted {
            assert_eq!(total, expected, "{isolation:?}: total not conserved");
        }
    }
}

async fn value_of(client: &Client, key: &str) -> Option<Vec<u8>> {
    let resp = client.store().range(Range::key(key)).await.unwrap();
    resp.kvs.into_iter().next().map(|kv| kv.value)
}

/// At `ReadCommitted` nothing is compared, so the commit cannot fail: 200 keys read and
/// one written commit; the keys read are neither re-read on failure nor counted against
/// etcd's 128 operations per branch (which refused it before).
pub async fn stm_read_committed_many_reads_one_write(b: &Backend) {
    let base = name("stm-rc");
    let client = b.client().await;
    let keys: Vec<String> = (0..200).map(|i| format!("{base}/{i:03}")).collect();
    let count = format!("{base}/count");
    let stm = Stm::new(&client).with_isolation(Isolation::ReadCommitted);
    let with_write = stm
        .run(|tx| {
            let (keys, count) = (keys.clone(), count.clone());
            async move {
                let n = tx.get_many(keys.iter()).await?.len();
                tx.put(count, n.to_string());
                Ok::<_, Error>(n)
            }
        })
        .await;
    assert!(with_write.is_ok(), "{}", with_write.unwrap_err());
    assert_eq!(
        value_of(&client, &count).await.as_deref(),
        Some(&b"200"[..])
    );
}

/// At `SerializableSnapshot`: read `BASE/a` (the snapshot), let `other` put or delete
/// `BASE/w` during the first attempt, write `BASE/w` without reading it. The number of
/// attempts.
async fn blind_write_attempts(client: &Client, other: &Client, base: &str, delete: bool) -> u32 {
    let (a, w) = (format!("{base}/a"), format!("{base}/w"));
    let store = other.store().clone();
    store.put(a.as_bytes(), b"1", 0).await.unwrap();
    store.put(w.as_bytes(), b"old", 0).await.unwrap();
    let attempts = AtomicUsize::new(0);
    Stm::new(client)
        .run(|tx| {
            let (store, attempts, a, w) = (&store, &attempts, &a, &w);
            async move {
                tx.get(a).await?;
                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                    if delete {
                        store.delete(KeyRange::key(w.as_bytes())).await?;
                    } else {
                        store.put(w.as_bytes(), b"theirs", 0).await?;
                    }
                }
                tx.put(w.clone(), "mine");
                Ok::<_, Error>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(value_of(client, &w).await.as_deref(), Some(&b"mine"[..]));
    u32::try_from(attempts.load(Ordering::SeqCst)).unwrap()
}

/// As documented on `Isolation::SerializableSnapshot`: a blind write conflicts with a
/// concurrent put of its key, not with a concurrent delete (a deleted key has no mod
/// revision to compare with the snapshot; Go has the same blind spot).
pub async fn stm_blind_write_conflicts_with_a_put_not_a_delete(b: &Backend) {
    let (client, other) = (b.client().await, b.client().await);
    let put = blind_write_attempts(&client, &other, &name("stm-blind-put"), false).await;
    assert_eq!(put, 2, "a concurrent put");
    let delete = blind_write_attempts(&client, &other, &name("stm-blind-delete"), true).await;
    assert_eq!(delete, 1, "a concurrent delete");
}

/// All the writes of a transaction go in one request, which etcd limits to 1.5 MiB
/// (`--max-request-bytes`): one value of `MAX_VALUE_LEN` commits, two are refused at the
/// commit with `InvalidArgument`, and nothing is written.
pub async fn stm_writes_share_one_request_size_limit(b: &Backend) {
    let base = name("stm-big");
    let (one, two) = (format!("{base}/1"), format!("{base}/2"));
    let client = b.client().await;
    let err = Stm::new(&client)
        .run(|tx| {
            let (one, two) = (one.clone(), two.clone());
            async move {
                tx.put(one, vec![b'x'; baton::MAX_VALUE_LEN]);
                tx.put(two, vec![b'x'; baton::MAX_VALUE_LEN]);
                Ok::<_, Error>(())
            }
        })
        .await
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert!(err.to_string().contains("request is too large"), "{err}");
    assert_eq!(value_of(&client, &one).await, None);
    Stm::new(&client)
        .run(|tx| {
            let one = one.clone();
            async move {
                tx.put(one, vec![b'x'; baton::MAX_VALUE_LEN]);
                Ok::<_, Error>(())
            }
        })
        .await
        .unwrap();
}

/// Bad input to the recipes is refused before any network call, with clear errors, and
/// writes nothing.
pub async fn recipes_bad_input(b: &Backend) {
    let client = b.client().await;
    let s = b.session(TTL).await;
    let base = name("recipes-bad");
    let invalid = |r: baton::Result<()>, what: &str| match r {
        Err(e) => assert!(e.is_invalid_input(), "{what}: {e}"),
        Ok(()) => panic!("{what}: accepted"),
    };
    invalid(Semaphore::new(&s, &base, 0).map(drop), "permits = 0");
    invalid(DoubleBarrier::new(&s, &base, 0).map(drop), "count = 0");
    invalid(
        CountDownLatch::new(&client, &base, 0).map(drop),
        "latch count = 0",
    );
    for bad in [String::new(), "a\0b".into(), "x".repeat(2048)] {
        invalid(Semaphore::new(&s, &bad, 1).map(drop), "semaphore name");
        invalid(Barrier::new(&client, &bad).map(drop), "barrier name");
        invalid(
            DoubleBarrier::new(&s, &bad, 2).map(drop),
            "double barrier name",
        );
        invalid(Queue::new(&client, &bad).map(drop), "queue name");
        invalid(
            PriorityQueue::new(&client, &bad).map(drop),
            "priority queue name",
        );
        invalid(
            CountDownLatch::new(&client, &bad, 1).map(drop),
            "latch name",
        );
        invalid(
            SharedValue::new(&client, &bad).map(drop),
            "shared value key",
        );
        invalid(
            SharedCount::new(&client, &bad).map(drop),
            "shared count key",
        );
    }
    let sem = Semaphore::new(&s, &base, 2).unwrap();
    invalid(sem.acquire_many(0).await.map(drop), "acquire_many(0)");
    invalid(sem.acquire_many(3).await.map(drop), "acquire_many(3) of 2");
    let big = vec![b'x'; baton::MAX_VALUE_LEN + 1];
    let queue = Queue::new(&client, &base).unwrap();
    invalid(queue.enqueue(big.clone()).await, "oversized queue item");
    let pq = PriorityQueue::new(&client, &base).unwrap();
    invalid(pq.enqueue(big.clone(), 1).await, "oversized priority item");
    let shared = SharedValue::new(&client, &base).unwrap();
    invalid(
        shared.set(big.clone()).await.map(drop),
        "oversized shared value",
    );
    invalid(
        shared.compare_and_set(0, big.clone()).await.map(drop),
        "oversized compare-and-set",
    );
    let big_key = format!("{base}/stm");
    let r = Stm::new(&client)
        .run(|tx| {
            let (big, big_key) = (big.clone(), big_key.clone());
            async move {
                tx.put(big_key, big);
                Ok::<_, Error>(())
            }
        })
        .await;
    invalid(r, "oversized stm write");
    assert!(
        keys_under(&client, &base).await.is_empty(),
        "bad input wrote keys"
    );
    assert!(keys_under(&client, &format!("__{base}")).await.is_empty());
}

/// Keys of other types under a lock's prefix, without a lease (queue items, a barrier, a
/// latch), are not holders: they neither block the lock nor are taken for its holder, and a
/// queue never takes a lock's key for an item.
pub async fn cross_type_names(b: &Backend) {
    let client = b.client().await;
    let (s1, s2) = (b.session(TTL).await, b.session(TTL).await);
    let base = name("cross");
    // A queue next to a held lock of the same name: no item, and the lock stays held.
    let jobs = format!("{base}/jobs");
    let held = Mutex::new(&s1, &jobs).unwrap().lock().await.unwrap();
    let q = Queue::new(&client, &jobs).unwrap();
    assert_eq!(q.try_dequeue().await.unwrap(), None);
    // Queue items, older and newer than a waiter's key, do not hold the lock.
    q.enqueue("older").await.unwrap();
    let m2 = Mutex::new(&s2, &jobs).unwrap();
    let waiting = tokio::spawn(async move { m2.lock_timeout(Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    q.enqueue("newer").await.unwrap();
    assert!(
        !waiting.is_finished(),
        "the waiter did not wait for the holder"
    );
    assert!(!held.is_lost(), "{:?}", held.lost_reason());
    held.unlock().await.unwrap();
    let second = waiting.await.unwrap().unwrap();
    assert_eq!(q.len().await.unwrap(), 2);
    second.unlock().await.unwrap();
    // A lock whose prefix holds only items is free; so is a semaphore's; an election
    // whose prefix holds only items has no leader.
    let fresh = Mutex::new(&s1, &jobs).unwrap();
    fresh
        .lock_timeout(Duration::from_secs(2))
        .await
        .unwrap()
        .unlock()
        .await
        .unwrap();
    fresh.try_lock().await.unwrap().unlock().await.unwrap();
    let sem = Semaphore::new(&s1, &jobs, 1).unwrap();
    sem.try_acquire().await.unwrap().release().await.unwrap();
    let err = baton::Election::new(&s1, &jobs)
        .unwrap()
        .leader()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoLeader { .. }), "{err}");
    // A barrier or a latch named `X/1` does not hold lock `X`.
    let deploy = format!("{base}/deploy");
    assert!(Barrier::new(&client, &format!("{deploy}/1"))
        .unwrap()
        .hold()
        .await
        .unwrap());
    CountDownLatch::new(&client, &format!("{deploy}/2"), 3)
        .unwrap()
        .count_down()
        .await
        .unwrap();
    let m = Mutex::new(&s1, &deploy).unwrap();
    m.try_lock().await.unwrap().unlock().await.unwrap();
    m.lock_timeout(Duration::from_secs(2))
        .await
        .unwrap()
        .unlock()
        .await
        .unwrap();
    assert_eq!(keys_under(&client, &format!("{deploy}/")).await.len(), 2);
    s1.close().await.unwrap();
    s2.close().await.unwrap();
}

// ----------------------------------------------------------------------------------------
// Resuming a lease whose key was freed by an operator

/// How long a resumed acquire is given to (wrongly) return while another session holds
/// the name.
const NOT_GRANTED_WITHIN: Duration = Duration::from_secs(2);

/// Wait for `fut` at most `within`; `Some` if it finished.
async fn finished<T>(within: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(within, fut).await.ok()
}

/// The lease `key` is bound to (panics if it does not exist).
async fn lease_of_key(client: &Client, key: &str) -> baton::store::LeaseId {
    let resp = client.store().range(Range::key(key)).await.unwrap();
    assert_eq!(resp.kvs.len(), 1, "{key}: {resp:?}");
    resp.kvs[0].lease
}

/// A process stops while holding a read-write lock (its key `NAME/<mode>/<lease>` stays,
/// kept by its lease); an operator frees the lock by overwriting that key with no lease
/// (`etcdctl put`: the key no longer counts in the queue) and another session takes the
/// write lock; then the stopped process resumes its lease (`with_lease`) and asks for the
/// same mode again. Its join finds the key under its own name, but the key is no longer
/// bound to its lease: it is not adopted (found by review: it was, on every store, and the
/// resumed process was granted the lock, with the old fencing token 2 against the holder's
/// 4, while the other session held it; it was told it lost only a watch round trip
/// later). The resumed call waits behind the holder instead, and once that one releases is
/// granted under a new key, bound to its lease, with a newer token.
pub async fn rwlock_resumed_key_overwritten_without_a_lease(b: &Backend) {
    for mode in ["write", "read"] {
        let lock = name("rw-unleased");
        let client = b.client().await;
        let old = b.session(TTL).await;
        let old_rw = RwLock::new(&old, &lock).unwrap();
        let old_token = abandoned_hold(&old_rw, mode).await;
        let lease = old.lease_id();
        old.orphan();
        drop(old_rw);
        drop(old);
        let key = format!("{lock}/{mode}/{lease:x}");
        client.store().put(key.as_bytes(), b"", 0).await.unwrap(); // the operator frees it
        let other = b.session(TTL).await;
        let theirs = finished(
            Duration::from_secs(5),
            RwLock::new(&other, &lock).unwrap().write(),
        )
        .await
        .expect("the other session's write() waited for a freed key")
        .unwrap();
        let s = Session::builder(&client)
            .with_lease(lease)
            .build()
            .await
            .unwrap();
        let rw = RwLock::new(&s, &lock).unwrap();
        let granted = if mode == "write" {
            finished(NOT_GRANTED_WITHIN, rw.write())
                .await
                .map(|r| r.map(|g| (g.fencing_token(), g.is_lost())))
        } else {
            finished(NOT_GRANTED_WITHIN, rw.read())
                .await
                .map(|r| r.map(|g| (g.fencing_token(), g.is_lost())))
        };
        if let Some(r) = granted {
            panic!(
                "{mode}: {r:?} while another session holds the write lock (token {}); \
                 the old grant's token was {old_token}",
                theirs.fencing_token()
            );
        }
        let their_token = theirs.fencing_token();
        theirs.unlock().await.unwrap();
        let token = take_and_release(&rw, mode, false).await;
        let token = token.unwrap_or_else(|e| panic!("{mode} after the holder's release: {e:?}"));
        assert!(
            token > their_token,
            "{mode}: token {token}, not after the holder's {their_token}"
        );
        assert!(keys_under(&client, &format!("{lock}/")).await.is_empty());
        s.close().await.unwrap();
        other.close().await.unwrap();
    }
}

/// [`rwlock_resumed_key_overwritten_without_a_lease`] for every other primitive that
/// adopts its own key on a resumed lease: a [`Mutex`], an [`Election`]'s `campaign()` and
/// `resume()`, and a [`Semaphore`] (whose adopted key was even rewritten, bound to the
/// lease again, keeping its old place in the queue). The key the stopped process left is
/// overwritten with no lease, another session takes the name, and the resumed process is
/// not granted it: `lock()`, `campaign()` and `acquire()` wait behind the holder, then get
/// a newer token; `resume()` fails with `NotLeader` and leaves the key alone (found by
/// review: a resumed `lock()` was granted with token 8 while the holder had 10).
pub async fn resumed_key_overwritten_without_a_lease(b: &Backend) {
    for what in ["mutex", "campaign", "resume", "semaphore"] {
        let lock = name(&format!("unleased-{what}"));
        let client = b.client().await;
        let old = b.session(TTL).await;
        let lease = old.lease_id();
        let other = b.session(TTL).await;
        let (key, old_token) = match what {
            "mutex" => {
                let g = Mutex::new(&old, &lock).unwrap().lock().await.unwrap();
                let held = (g.key().to_string(), g.fencing_token());
                std::mem::forget(g);
                held
            }
            "semaphore" => {
                let p = Semaphore::new(&old, &lock, 1).unwrap().acquire().await;
                let p = p.unwrap();
                let held = (p.key().to_string(), 0);
                std::mem::forget(p);
                held
            }
            _ => {
                let l = Election::new(&old, &lock).unwrap().campaign("old").await;
                let l = l.unwrap();
                let held = (l.key().to_string(), l.fencing_token());
                std::mem::forget(l);
                held
            }
        };
        old.orphan();
        drop(old);
        let value = client.store().range(Range::key(key.as_bytes())).await;
        let value = value.unwrap().kvs[0].value.clone();
        client.store().put(key.as_bytes(), &value, 0).await.unwrap(); // the operator frees it
        let within = Duration::from_secs(5);
        let s = || Session::builder(&client).with_lease(lease).build();
        let s = s().await.unwrap();
        match what {
            "mutex" => {
                let theirs = finished(within, Mutex::new(&other, &lock).unwrap().lock()).await;
                let theirs = theirs.expect("lock() waited for a freed key").unwrap();
                let m = Mutex::new(&s, &lock).unwrap();
                if let Some(r) = finished(NOT_GRANTED_WITHIN, m.lock()).await {
                    let r = r.map(|g| (g.fencing_token(), g.is_lost()));
                    panic!(
                        "mutex: {r:?} while another session holds it (token {})",
                        theirs.fencing_token()
                    );
                }
                let their_token = theirs.fencing_token();
                theirs.unlock().await.unwrap();
                let g = finished(within, m.lock()).await.expect("lock() waited");
                let g = g.unwrap();
                assert!(g.fencing_token() > their_token, "{g:?} after {their_token}");
                assert_eq!(lease_of_key(&client, g.key()).await, lease);
                g.unlock().await.unwrap();
            }
            "semaphore" => {
                let sem = Semaphore::new(&other, &lock, 1).unwrap();
                let theirs = finished(within, sem.acquire()).await;
                let theirs = theirs.expect("acquire() waited for a freed key").unwrap();
                let sem = Semaphore::new(&s, &lock, 1).unwrap();
                if let Some(r) = finished(NOT_GRANTED_WITHIN, sem.acquire()).await {
                    let r = r.map(|p| p.is_lost());
                    panic!("semaphore: {r:?} (lost?) while another session holds its permit");
                }
                theirs.release().await.unwrap();
                let p = finished(within, sem.acquire())
                    .await
                    .expect("acquire() waited");
                let p = p.unwrap();
                assert_eq!(lease_of_key(&client, p.key()).await, lease);
                p.release().await.unwrap();
            }
            _ => {
                let e = Election::new(&other, &lock).unwrap();
                let theirs = finished(within, e.campaign("theirs")).await;
                let theirs = theirs.expect("campaign() waited for a freed key").unwrap();
                let e = Election::new(&s, &lock).unwrap();
                if what == "resume" {
                    let r = finished(within, e.resume(old_token)).await;
                    match r.expect("resume() waited") {
                        Err(Error::NotLeader { .. }) => {}
                        r => panic!("resume(): {:?}", r.map(|l| l.fencing_token())),
                    }
                    // The key freed by the operator was left alone.
                    let kvs = client.store().range(Range::key(key.as_bytes())).await;
                    let kvs = kvs.unwrap().kvs;
                    assert_eq!(kvs.len(), 1, "{kvs:?}");
                    assert_eq!((kvs[0].create_revision, kvs[0].lease), (old_token, 0));
                } else {
                    if let Some(r) = finished(NOT_GRANTED_WITHIN, e.campaign("new")).await {
                        let r = r.map(|l| (l.fencing_token(), l.is_lost()));
                        panic!(
                            "campaign(): {r:?} while another session leads (token {})",
                            theirs.fencing_token()
                        );
                    }
                    let their_token = theirs.fencing_token();
                    theirs.resign().await.unwrap();
                    let l = finished(within, e.campaign("new")).await;
                    let l = l.expect("campaign() waited").unwrap();
                    assert!(l.fencing_token() > their_token, "{l:?} after {their_token}");
                    assert_eq!(e.leader().await.unwrap().value_str(), "new");
                    assert_eq!(lease_of_key(&client, l.key()).await, lease);
                    l.resign().await.unwrap();
                }
            }
        }
        if what != "resume" {
            assert!(keys_under(&client, &format!("{lock}/")).await.is_empty());
        }
        s.close().await.unwrap();
        other.close().await.unwrap();
    }
}

// ----------------------------------------------------------------------------------------
// Writes guarded by a hold whose key was freed by an operator

/// A holder's key overwritten by an operator with no lease (`etcdctl put KEY ""`), which
/// frees the lock or the election (the key counts in no queue), and another session takes
/// the name; then the old holder writes under its hold, perhaps before a watch has told it
/// (its client held the name a moment ago, so its client's shared watch watches its key,
/// which until 2026-12-06 heard deletes only; or its own watch): `Leadership::proclaim()`, a guard's
/// `txn()` that writes the key, and one that writes another key. None of them applies, each
/// fails (`NotLeader`, `NotHeld`), the key stays as the operator left it (no lease), and the
/// hold is lost at once; a transaction guarded by the guard's `ownership_compares()` fails
/// too (found by review: the writes compared only the key's create
/// revision, which the overwrite keeps; `proclaim()` succeeded and bound the key to the old
/// leader's lease again, `is_lost()` false: two leaders).
pub async fn held_key_overwritten_without_a_lease_fences_writes(b: &Backend) {
    for warm in [true, false] {
        for what in ["proclaim", "txn-own-key", "txn-other-key"] {
            let lock = name(&format!("overwritten-{what}"));
            let admin = b.client().await;
            let s = b.session(TTL).await;
            let other = b.session(TTL).await;
            let lease = s.lease_id();
            let e = Election::new(&s, &lock).unwrap();
            let m = Mutex::new(&s, &lock).unwrap();
            if warm {
                // Held twice a moment ago: the next hold is watched by the client's shared
                // watch on the name (which heard deletes only, until 2026-12-06).
                for _ in 0..2 {
                    match what {
                        "proclaim" => e.campaign("warm").await.unwrap().resign().await.unwrap(),
                        _ => m.lock().await.unwrap().unlock().await.unwrap(),
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let context = format!("{what} (held before: {warm})");
            let marker = format!("{lock}-marker");
            let (key, result, lost, reason) = if what == "proclaim" {
                let mut l = e.campaign("old").await.unwrap();
                let key = l.key().to_string();
                admin.store().put(key.as_bytes(), b"old", 0).await.unwrap();
                let their_e = Election::new(&other, &lock).unwrap();
                let theirs = finished(Duration::from_secs(5), their_e.campaign("theirs")).await;
                let theirs = theirs.expect("campaign() waited for a freed key").unwrap();
                let r = l.proclaim("new").await;
                let led = Election::leader_with(&admin, &lock).await.unwrap();
                assert_eq!(led.value_str(), "theirs", "{context}: {r:?}");
                assert!(!theirs.is_lost(), "{context}");
                let (lost, reason) = (l.is_lost(), l.lost_reason());
                theirs.resign().await.unwrap();
                drop(l);
                (key, r, lost, reason)
            } else {
                let g = m.lock().await.unwrap();
                let key = g.key().to_string();
                // A transaction of the user's own, guarded by `ownership_compares()`. (With a
                // read in it: etcd serves a transaction with no request at all from the
                // member's own state, which a follower may not have brought up to date.)
                let owned = || {
                    let read = TxnOp::get(Range::key(key.as_bytes()));
                    Txn::new().when(g.ownership_compares()).and_then([read])
                };
                assert!(admin.store().txn(owned()).await.unwrap().succeeded);
                admin.store().put(key.as_bytes(), b"", 0).await.unwrap();
                assert!(!admin.store().txn(owned()).await.unwrap().succeeded);
                let their_m = Mutex::new(&other, &lock).unwrap();
                let theirs = finished(Duration::from_secs(5), their_m.lock()).await;
                let theirs = theirs.expect("lock() waited for a freed key").unwrap();
                let write = match what {
                    "txn-own-key" => TxnOp::put(key.as_bytes(), "mine", lease),
                    _ => TxnOp::put(marker.as_bytes(), "x", 0),
                };
                let r = g.txn(Txn::new().and_then([write])).await.map(|_| ());
                assert!(!theirs.is_lost(), "{context}");
                let (lost, reason) = (g.is_lost(), g.lost_reason());
                theirs.unlock().await.unwrap();
                drop(g);
                (key, r, lost, reason)
            };
            match (what, &result) {
                ("proclaim", Err(Error::NotLeader { .. })) => {}
                (_, Err(Error::NotHeld { .. })) if what != "proclaim" => {}
                _ => panic!("{context}: {result:?} after the key was freed and taken"),
            }
            assert!(
                keys_under(&admin, &marker).await.is_empty(),
                "{context}: the guarded write applied"
            );
            assert!(lost, "{context}: not lost after the write failed");
            assert_eq!(reason.as_deref(), Some("key overwritten"), "{context}");
            // Not bound to the old holder's lease again (the drop of the lost hold may
            // remove the key it created, in the background).
            let kvs = admin.store().range(Range::key(key.as_bytes())).await;
            if let Some(kv) = kvs.unwrap().kvs.first() {
                assert_eq!(kv.lease, 0, "{context}: the freed key was bound again");
                assert_ne!(kv.value_str(), "mine", "{context}");
                assert_ne!(kv.value_str(), "new", "{context}");
            }
            s.close().await.unwrap();
            other.close().await.unwrap();
        }
    }
}

// ----------------------------------------------------------------------------------------
// Releases and grants of a key freed by an operator

/// A holder's key overwritten by an operator with no lease (`etcdctl put KEY ""`, which
/// frees the lock or the election: the key counts in no queue, and keeps its create
/// revision), and another session granted the name; the old holder, watched through its
/// client's shared watch (it held the name a moment ago), releases. `unlock()`
/// fails with `NotHeld`, `resign()` with `NotLeader`, and the freed key is removed; a key
/// bound to another lease instead is left alone (found by review: the release compared
/// only the create revision, and said `Ok(())`, deleting the key, on every backend).
pub async fn release_of_a_key_overwritten_without_a_lease(b: &Backend) {
    for what in ["unlock", "resign", "unlock-bound-to-other"] {
        let lock = name(&format!("released-{what}"));
        let admin = b.client().await;
        let s = b.session(TTL).await;
        let other = b.session(TTL).await;
        let e = Election::new(&s, &lock).unwrap();
        let m = Mutex::new(&s, &lock).unwrap();
        for _ in 0..2 {
            match what {
                "resign" => e.campaign("warm").await.unwrap().resign().await.unwrap(),
                _ => m.lock().await.unwrap().unlock().await.unwrap(),
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let bound = what == "unlock-bound-to-other";
        let lease = if bound { other.lease_id() } else { 0 };
        let (key, result) = if what == "resign" {
            let l = e.campaign("old").await.unwrap();
            let key = l.key().to_string();
            admin.store().put(key.as_bytes(), b"", lease).await.unwrap();
            let their_e = Election::new(&other, &lock).unwrap();
            let theirs = finished(Duration::from_secs(5), their_e.campaign("theirs")).await;
            let theirs = theirs.expect("campaign() waited for a freed key").unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let r = l.resign().await;
            let led = Election::leader_with(&admin, &lock).await.unwrap();
            assert_eq!(led.value_str(), "theirs", "{what}: {r:?}");
            assert!(!theirs.is_lost(), "{what}");
            theirs.resign().await.unwrap();
            (key, r)
        } else {
            let g = m.lock().await.unwrap();
            let key = g.key().to_string();
            admin.store().put(key.as_bytes(), b"", lease).await.unwrap();
            let theirs = if bound {
                // Bound to the other lease, the key is a member: the other session's.
                None
            } else {
                let their_m = Mutex::new(&other, &lock).unwrap();
                let theirs = finished(Duration::from_secs(5), their_m.lock()).await;
                Some(theirs.expect("lock() waited for a freed key").unwrap())
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            let r = g.unlock().await;
            if let Some(theirs) = theirs {
                assert!(!theirs.is_lost(), "{what}");
                theirs.unlock().await.unwrap();
            }
            (key, r)
        };
        match (what, &result) {
            ("resign", Err(Error::NotLeader { .. })) => {}
            (_, Err(Error::NotHeld { .. })) if what != "resign" => {}
            _ => panic!("{what}: {result:?} after the key was freed and taken"),
        }
        // A holder already told of its loss (its watch heard the overwrite) releases in the
        // background: give that a moment.
        let mut left = Vec::new();
        for _ in 0..100 {
            left = admin
                .store()
                .range(Range::key(key.as_bytes()))
                .await
                .unwrap()
                .kvs;
            if bound || left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if bound {
            assert_eq!(
                left.first().map(|kv| kv.lease),
                Some(other.lease_id()),
                "{what}"
            );
        } else {
            assert!(left.is_empty(), "{what}: the freed key stays: {left:?}");
        }
        s.close().await.unwrap();
        other.close().await.unwrap();
    }
}

/// A waiter's key overwritten by an operator with no lease (which frees its place), then
/// its predecessor releases: the waiter is not granted (`NotHeld`, for a lock, a campaign,
/// a write lock and a read lock), and a session that takes the name meanwhile is its only holder, not lost
/// (found by review: the waiter, woken by its client's shared watch, which then heard
/// deletes only, was granted beside it, neither lost: two holders, two leaders).
pub async fn waiter_key_overwritten_without_a_lease_is_not_granted(b: &Backend) {
    for what in ["lock", "campaign", "write", "read"] {
        let lock = name(&format!("waiter-{what}"));
        let admin = b.client().await;
        let (s1, s2, s3) = (
            b.session(TTL).await,
            b.session(TTL).await,
            b.session(TTL).await,
        );
        let first = match what {
            "lock" => {
                let g = Mutex::new(&s1, &lock).unwrap().lock().await.unwrap();
                (g.key().to_string(), Some(g), None, None)
            }
            "campaign" => {
                let l = Election::new(&s1, &lock).unwrap();
                let l = l.campaign("first").await.unwrap();
                (l.key().to_string(), None, Some(l), None)
            }
            _ => {
                let w = RwLock::new(&s1, &lock).unwrap().write().await.unwrap();
                (w.key().to_string(), None, None, Some(w))
            }
        };
        let (m2, e2, rw2) = (
            Mutex::new(&s2, &lock).unwrap(),
            Election::new(&s2, &lock).unwrap(),
            RwLock::new(&s2, &lock).unwrap(),
        );
        let waiting = tokio::spawn(async move {
            match what {
                "lock" => m2.lock().await.map(|g| (g.fencing_token(), g.is_lost())),
                "campaign" => e2
                    .campaign("second")
                    .await
                    .map(|l| (l.fencing_token(), l.is_lost())),
                "write" => rw2.write().await.map(|w| (w.fencing_token(), w.is_lost())),
                _ => rw2.read().await.map(|r| (0, r.is_lost())),
            }
        });
        // The waiter's key, once it has joined.
        let prefix = format!("{lock}/");
        let k2 = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let keys = keys_under(&admin, &prefix).await;
                // A reader's key is under `read/`, a writer's under `write/`.
                if let Some(k) = keys.into_iter().find(|k| *k != first.0) {
                    return k;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the waiter never joined");
        tokio::time::sleep(Duration::from_millis(200)).await;
        admin.store().put(k2.as_bytes(), b"", 0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        match first {
            (_, Some(g), _, _) => g.unlock().await.unwrap(),
            (_, _, Some(l), _) => l.resign().await.unwrap(),
            (_, _, _, Some(w)) => w.unlock().await.unwrap(),
            _ => unreachable!(),
        }
        let granted = finished(Duration::from_secs(5), waiting).await;
        let granted = granted.expect("the waiter hung").unwrap();
        let third = match what {
            "lock" => Mutex::new(&s3, &lock)
                .unwrap()
                .try_lock()
                .await
                .map(|g| (g.fencing_token(), Some(g), None, None)),
            "campaign" => finished(
                Duration::from_secs(5),
                Election::new(&s3, &lock).unwrap().campaign("third"),
            )
            .await
            .expect("campaign() waited for a freed key")
            .map(|l| (l.fencing_token(), None, Some(l), None)),
            _ => RwLock::new(&s3, &lock)
                .unwrap()
                .try_write()
                .await
                .map(|w| (w.fencing_token(), None, None, Some(w))),
        };
        let (token, g3, l3, w3) = third.unwrap_or_else(|e| panic!("{what}: third: {e:?}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            matches!(granted, Err(Error::NotHeld { .. })),
            "{what}: the overwritten waiter: {granted:?} (the third holds token {token})"
        );
        match (g3, l3, w3) {
            (Some(g), _, _) => {
                assert!(!g.is_lost(), "{what}");
                g.unlock().await.unwrap();
            }
            (_, Some(l), _) => {
                assert!(!l.is_lost(), "{what}");
                let led = Election::leader_with(&admin, &lock).await.unwrap();
                assert_eq!(led.value_str(), "third", "{what}");
                l.resign().await.unwrap();
            }
            (_, _, Some(w)) => {
                assert!(!w.is_lost(), "{what}");
                w.unlock().await.unwrap();
            }
            _ => unreachable!(),
        }
        for s in [s1, s2, s3] {
            s.close().await.unwrap();
        }
    }
}

/// A held key, and a waiter's key, overwritten by an operator with no lease (`etcdctl put
/// KEY ""`, which frees the name or the place), are heard at once: the holder's `lost()`
/// fires ("key overwritten"), and the waiter's `lock()`, `campaign()`, `write()` or
/// `read()` fails with `NotHeld` while the holder ahead of it still holds, for a mutex, an
/// election and both modes of a read-write lock; with the name held twice by the client a
/// moment before (`warm`: the holder is watched through its client's shared watch on the
/// name) and not. Before (entry 42), a warm holder was told only at its next write or
/// release, and a waiter only when the holder ahead released.
pub async fn freed_keys_are_heard_at_once(b: &Backend) {
    for what in ["lock", "campaign", "write", "read"] {
        for warm in [false, true] {
            let lock = name(&format!("freed-{what}-{warm}"));
            let context = format!("{what} (held before: {warm})");
            let admin = b.client().await;
            let s = b.session(TTL).await;
            let s2 = b.session(TTL).await;
            let (m, e, rw) = (
                Mutex::new(&s, &lock).unwrap(),
                Election::new(&s, &lock).unwrap(),
                RwLock::new(&s, &lock).unwrap(),
            );
            if warm {
                for _ in 0..2 {
                    match what {
                        "lock" => m.lock().await.unwrap().unlock().await.unwrap(),
                        "campaign" => e.campaign("warm").await.unwrap().resign().await.unwrap(),
                        "write" => rw.write().await.unwrap().unlock().await.unwrap(),
                        _ => rw.read().await.unwrap().unlock().await.unwrap(),
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            // A holder freed: told at once.
            let (key, lost) = match what {
                "lock" => {
                    let g = m.lock().await.unwrap();
                    let key = g.key().to_string();
                    admin.store().put(key.as_bytes(), b"", 0).await.unwrap();
                    let told = finished(Duration::from_secs(2), g.lost()).await;
                    (key, told.map(|_| g.lost_reason()))
                }
                "campaign" => {
                    let l = e.campaign("old").await.unwrap();
                    let key = l.key().to_string();
                    admin.store().put(key.as_bytes(), b"", 0).await.unwrap();
                    let told = finished(Duration::from_secs(2), l.lost()).await;
                    (key, told.map(|_| l.lost_reason()))
                }
                "write" => {
                    let g = rw.write().await.unwrap();
                    let key = g.key().to_string();
                    admin.store().put(key.as_bytes(), b"", 0).await.unwrap();
                    let told = finished(Duration::from_secs(2), g.lost()).await;
                    (key, told.map(|_| g.lost_reason()))
                }
                _ => {
                    let g = rw.read().await.unwrap();
                    let key = g.key().to_string();
                    admin.store().put(key.as_bytes(), b"", 0).await.unwrap();
                    let told = finished(Duration::from_secs(2), g.lost()).await;
                    (key, told.map(|_| g.lost_reason()))
                }
            };
            let reason = lost.unwrap_or_else(|| panic!("{context}: a freed holder not told"));
            assert_eq!(reason.as_deref(), Some("key overwritten"), "{context}");
            let freed = eventually(Duration::from_secs(5), || async {
                keys_under(&admin, &key).await.is_empty()
            })
            .await;
            assert!(
                freed,
                "{context}: the freed key was not removed after the loss"
            );

            // A waiter freed while the holder ahead of it holds: told at once.
            let holder = match what {
                "lock" => (Some(m.lock().await.unwrap()), None, None),
                "campaign" => (None, Some(e.campaign("leader").await.unwrap()), None),
                _ => (None, None, Some(rw.write().await.unwrap())),
            };
            let (m2, e2, rw2) = (
                Mutex::new(&s2, &lock).unwrap(),
                Election::new(&s2, &lock).unwrap(),
                RwLock::new(&s2, &lock).unwrap(),
            );
            let waiting = tokio::spawn(async move {
                match what {
                    "lock" => m2.lock().await.map(|_| ()),
                    "campaign" => e2.campaign("second").await.map(|_| ()),
                    "write" => rw2.write().await.map(|_| ()),
                    _ => rw2.read().await.map(|_| ()),
                }
            });
            let mine = format!("{:x}", s2.lease_id());
            let prefix = format!("{lock}/");
            let k2 = finished(Duration::from_secs(5), async {
                loop {
                    let keys = keys_under(&admin, &prefix).await;
                    if let Some(k) = keys.into_iter().find(|k| k.ends_with(&mine)) {
                        return k;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or_else(|| panic!("{context}: the waiter never joined"));
            tokio::time::sleep(Duration::from_millis(200)).await;
            admin.store().put(k2.as_bytes(), b"", 0).await.unwrap();
            let answer = finished(Duration::from_secs(2), waiting)
                .await
                .unwrap_or_else(|| panic!("{context}: a freed waiter not told while it waits"))
                .unwrap();
            assert!(
                matches!(answer, Err(Error::NotHeld { .. })),
                "{context}: {answer:?}"
            );
            match holder {
                (Some(g), _, _) => {
                    assert!(!g.is_lost(), "{context}");
                    g.unlock().await.unwrap();
                }
                (_, Some(l), _) => {
                    assert!(!l.is_lost(), "{context}");
                    l.resign().await.unwrap();
                }
                (_, _, Some(w)) => {
                    assert!(!w.is_lost(), "{context}");
                    w.unlock().await.unwrap();
                }
                _ => unreachable!(),
            }
            s.close().await.unwrap();
            s2.close().await.unwrap();
        }
    }
}

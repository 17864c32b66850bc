//! The conformance suite: one set of behaviours every store must show, run against the
//! embedded store and against real etcd (one node and a 3-node cluster).
//!
//! Each case is an `async fn(&Backend)`. `tests/conformance.rs` runs every case on every
//! backend.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use baton::store::{Compare, CompareOp, KeyRange, Range, Txn, TxnOp};
use baton::{Client, Error, Mutex, Session};

/// A backend the suite runs against: endpoints, plus whatever keeps the servers alive.
pub struct Backend {
    endpoints: String,
    _keep: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Backend {
    /// A fresh, private embedded store (`mem://<unique name>`).
    pub fn mem() -> Backend {
        Backend {
            endpoints: format!("mem://conformance-{}", unique()),
            _keep: None,
        }
    }

    /// A backend at `endpoints`, keeping `servers` alive as long as the backend.
    pub fn new(endpoints: String, servers: impl std::any::Any + Send + Sync) -> Backend {
        Backend {
            endpoints,
            _keep: Some(Box::new(servers)),
        }
    }

    /// The endpoint URL(s).
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// A new client (its own connection).
    pub async fn client(&self) -> Client {
        Client::builder(&self.endpoints)
            .with_dial_timeout(Duration::from_secs(5))
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
        let want = i + 2;
        assert!(
            eventually(Duration::from_secs(5), || async {
                keys_under(&admin, &format!("{lock}/")).await.len() == want
            })
            .await,
            "waiter {i} never queued"
        );
    }
    g.unlock().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
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

    // 2. The waiter's lease is revoked and the holder releases at the same moment.
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
    let (a, b2) = tokio::join!(admin.store().lease_revoke(w2.lease_id()), g.unlock());
    a.unwrap();
    b2.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("waiter hung after its lease was revoked")
        .unwrap();
    let err = r.expect_err("waiter with a revoked lease was told it holds the lock");
    assert!(err.is_lost(), "{err}");
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

//! Waiting behind several keys on the shared watch, without reads: a waiter that knows every
//! key ahead of it (the join transaction read them all) must still see each of them go,
//! in any order, and its own key survive, before it is told it holds the lock.
#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton::store::KeyRange;
use baton::{Client, Mutex, MutexGuard, Session};
use tokio::task::JoinHandle;

const TTL: Duration = Duration::from_secs(10);

async fn queued(admin: &Client, lock: &str) -> usize {
    admin
        .store()
        .range(baton::store::Range::prefix(format!("{lock}/").into_bytes()))
        .await
        .unwrap()
        .kvs
        .len()
}

/// A session on a client of its own, as a separate process would have.
async fn session(url: &str) -> Session {
    let client = Client::connect(url).await.unwrap();
    Session::builder(&client)
        .with_ttl(TTL)
        .build()
        .await
        .unwrap()
}

/// Queue a waiter and wait until its key is there, so waiters queue in spawn order.
async fn enqueue(
    admin: &Client,
    lock: &str,
    s: &Session,
    expect: usize,
) -> JoinHandle<baton::Result<MutexGuard>> {
    let m = Mutex::new(s, lock).unwrap();
    let task = tokio::spawn(async move { m.lock().await });
    for _ in 0..300 {
        if queued(admin, lock).await >= expect {
            return task;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("waiter did not queue");
}

async fn not_yet(task: &JoinHandle<baton::Result<MutexGuard>>) {
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !task.is_finished(),
        "acquired while keys were still ahead of it"
    );
}

async fn within(task: JoinHandle<baton::Result<MutexGuard>>) -> baton::Result<MutexGuard> {
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("waiter hung")
        .unwrap()
}

#[tokio::test]
async fn a_waiter_in_the_middle_cancels_then_one_is_revoked() {
    let url = "mem://queue-ahead-cancel";
    let lock = "ahead/cancel";
    let admin = Client::connect(url).await.unwrap();
    let (a, b, c, d, e) = (
        session(url).await,
        session(url).await,
        session(url).await,
        session(url).await,
        session(url).await,
    );
    let held = Mutex::new(&a, lock).unwrap().lock().await.unwrap();
    let tb = enqueue(&admin, lock, &b, 2).await;
    let tc = enqueue(&admin, lock, &c, 3).await;
    let td = enqueue(&admin, lock, &d, 4).await;
    let te = enqueue(&admin, lock, &e, 5).await;

    // C gives up (its key is removed), D's lease is revoked: B still waits for A, E for B.
    tc.abort();
    admin.store().lease_revoke(d.lease_id()).await.unwrap();
    assert!(
        within(td).await.is_err(),
        "a revoked waiter was told it holds the lock"
    );
    not_yet(&tb).await;
    not_yet(&te).await;

    held.unlock().await.unwrap();
    let gb = within(tb).await.unwrap();
    not_yet(&te).await;
    let tb_token = gb.fencing_token();
    gb.unlock().await.unwrap();
    let ge = within(te).await.unwrap();
    assert!(ge.fencing_token() > tb_token);
    ge.unlock().await.unwrap();
}

#[tokio::test]
async fn keys_ahead_deleted_out_of_order_and_the_head_last() {
    let url = "mem://queue-ahead-order";
    let lock = "ahead/order";
    let admin = Client::connect(url).await.unwrap();
    let (a, b, c, d) = (
        session(url).await,
        session(url).await,
        session(url).await,
        session(url).await,
    );
    let held = Mutex::new(&a, lock).unwrap().lock().await.unwrap();
    let tb = enqueue(&admin, lock, &b, 2).await;
    let tc = enqueue(&admin, lock, &c, 3).await;
    let td = enqueue(&admin, lock, &d, 4).await;

    // C's key goes first (an admin), then B's: D still waits for the holder.
    let key = |s: &Session| Mutex::new(s, lock).unwrap().key().as_bytes().to_vec();
    admin.store().delete(KeyRange::Key(key(&c))).await.unwrap();
    admin.store().delete(KeyRange::Key(key(&b))).await.unwrap();
    assert!(within(tc).await.is_err());
    assert!(within(tb).await.is_err());
    not_yet(&td).await;

    held.unlock().await.unwrap();
    within(td).await.unwrap().unlock().await.unwrap();
}

#[tokio::test]
async fn our_key_deleted_while_keys_ahead_go() {
    let url = "mem://queue-ahead-mine";
    let lock = "ahead/mine";
    let admin = Client::connect(url).await.unwrap();
    let (a, b, c) = (session(url).await, session(url).await, session(url).await);
    let held = Mutex::new(&a, lock).unwrap().lock().await.unwrap();
    let tb = enqueue(&admin, lock, &b, 2).await;
    let tc = enqueue(&admin, lock, &c, 3).await;

    let mine = Mutex::new(&c, lock).unwrap().key().as_bytes().to_vec();
    admin.store().delete(KeyRange::Key(mine)).await.unwrap();
    held.unlock().await.unwrap();
    within(tb).await.unwrap().unlock().await.unwrap();
    let r = within(tc).await;
    assert!(
        r.is_err(),
        "a waiter whose key was deleted was told it holds the lock"
    );
}

#[tokio::test]
async fn fifo_handoffs_wake_one_waiter_each() {
    let url = "mem://queue-ahead-wakeups";
    let lock = "ahead/wakeups";
    let admin = Client::connect(url).await.unwrap();
    let holder = session(url).await;
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(session(url).await);
    }
    let held = Mutex::new(&holder, lock).unwrap().lock().await.unwrap();
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        let m = Mutex::new(s, lock).unwrap();
        let inside = inside.clone();
        tasks.push(tokio::spawn(async move {
            let g = m.lock().await.unwrap();
            assert_eq!(
                inside.fetch_add(1, Ordering::SeqCst),
                0,
                "two holders at once"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
            inside.fetch_sub(1, Ordering::SeqCst);
            g.unlock().await.unwrap();
        }));
        for _ in 0..300 {
            if queued(&admin, lock).await >= i + 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let wakeups = |ss: &[Session]| ss.iter().map(|s| s.client().stats().wakeups).sum::<u64>();
    let before = wakeups(&sessions);
    held.unlock().await.unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("waiter hung")
            .unwrap();
    }
    assert_eq!(
        wakeups(&sessions) - before,
        6,
        "each release must wake exactly its successor"
    );
}

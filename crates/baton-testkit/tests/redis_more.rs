//! The Redis family against real `redis-server` processes: a client shared between
//! runtimes, waiters across a server restart, overflowing options, and what `holds()` and
//! `leader()` report for keys that are not Baton's.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use baton::redis::{RedisClient, RedisClientBuilder};
use baton::Error;
use baton_testkit::RedisServer;
use redis::AsyncCommands;

fn unique(case: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "test/{case}/{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn builder(url: &str, ttl: Duration) -> RedisClientBuilder {
    RedisClient::builder(url)
        .with_ttl(ttl)
        .with_dial_timeout(Duration::from_secs(2))
}

/// A client connected on one runtime, whose first locks (and first wait) ran on another
/// runtime that is then shut down: the watchdog launcher and the subscriber tasks died with
/// it. Later holds must still get a watchdog, and waiters pub/sub wake-ups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outlives_the_runtime_of_its_first_lock() {
    let server = RedisServer::start_async().await;
    let url = server.url();
    let name = unique("runtimes");
    let shared = builder(&url, Duration::from_millis(600))
        // Far longer than the test's waits: only pub/sub can wake a waiter in time.
        .with_poll_interval(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();

    // Runtime B: a lock, a waiter (which starts the subscriber tasks) and releases.
    let on_b = shared.clone();
    let b_name = name.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let lock = on_b.lock(&b_name).unwrap();
            let guard = lock.lock().await.unwrap();
            let waiter = {
                let lock = lock.clone();
                tokio::spawn(async move { lock.lock().await })
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            guard.unlock().await.unwrap();
            let second = waiter.await.unwrap().unwrap();
            second.unlock().await.unwrap();
        });
        drop(rt);
    })
    .join()
    .unwrap();

    // Back on runtime A: a hold outlives its TTL several times over.
    let lock = shared.lock(&name).unwrap();
    let guard = lock.lock().await.unwrap();
    let mut conn = raw(&url).await;
    tokio::select! {
        _ = guard.lost() => panic!("lost: {:?}", guard.lost_reason()),
        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
    }
    let value: Option<String> = conn.get(guard.key()).await.unwrap();
    assert_eq!(value.as_deref(), Some(guard.token()), "the key expired");
    assert!(!guard.is_lost());

    // A waiter of the shared client is woken by the release of another client's hold.
    let other = builder(&url, Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    guard.unlock().await.unwrap();
    let held = other.lock(&name).unwrap().lock().await.unwrap();
    let waiter = tokio::spawn(async move { lock.lock().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = Instant::now();
    held.unlock().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("the waiter was not woken by pub/sub")
        .unwrap()
        .unwrap();
    assert!(
        released.elapsed() < Duration::from_secs(1),
        "woken after {:?}",
        released.elapsed()
    );
    got.unlock().await.unwrap();
    shared.close().await.unwrap();
    other.close().await.unwrap();
}

/// A waiter blocked in `lock()` while the server restarts (without persistence: the
/// holder's key is gone) gets the lock, instead of failing on the broken connection.
async fn waiter_survives_a_restart(fifo: bool) {
    let mut server = RedisServer::start_async().await;
    let url = server.url();
    let name = unique("restart");
    let b = |ttl| {
        let b = builder(&url, ttl).with_poll_interval(Duration::from_millis(200));
        if fifo {
            b
        } else {
            b.without_fifo()
        }
    };
    let holder = b(Duration::from_secs(30)).connect().await.unwrap();
    let waiting = b(Duration::from_secs(30)).connect().await.unwrap();
    let held = holder.lock(&name).unwrap().lock().await.unwrap();
    let lock = waiting.lock(&name).unwrap();
    let waiter = tokio::spawn(async move { lock.lock().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished());
    tokio::task::block_in_place(|| server.restart());
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter did not get the lock after the restart")
        .unwrap();
    let guard = got.unwrap_or_else(|e| panic!("the waiter failed: {e}"));
    assert!(!guard.is_lost());
    guard.unlock().await.unwrap();
    drop(held);
    holder.close().await.unwrap();
    waiting.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unqueued_waiter_survives_a_restart() {
    waiter_survives_a_restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_waiter_survives_a_restart() {
    waiter_survives_a_restart(true).await;
}

/// `try_lock` keeps its one attempt: a server that is down is an error at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_does_not_wait_for_a_server_that_is_down() {
    let mut server = RedisServer::start_async().await;
    let client = builder(&server.url(), Duration::from_secs(5))
        .with_request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    tokio::task::block_in_place(|| server.kill());
    let lock = client.lock(&unique("down")).unwrap();
    let started = Instant::now();
    let err = lock.try_lock().await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Huge timeouts and poll intervals are refused when connecting, not a panic later (in
/// `try_lock`, or in the subscriber task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_intervals_are_refused() {
    let server = RedisServer::start_async().await;
    let url = server.url();
    for b in [
        RedisClient::builder(&url).with_poll_interval(Duration::MAX),
        RedisClient::builder(&url).with_dial_timeout(Duration::MAX),
        RedisClient::builder(&url).with_request_timeout(Duration::MAX),
    ] {
        let err = b.connect().await.unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
    }
    // The largest accepted values work: a lock, a waiter (which subscribes), a release.
    let client = RedisClient::builder(&url)
        .with_poll_interval(baton::redis::MAX_TTL)
        .with_dial_timeout(baton::redis::MAX_TTL)
        .with_request_timeout(baton::redis::MAX_TTL)
        .connect()
        .await
        .unwrap();
    let lock = client.lock(&unique("huge")).unwrap();
    let guard = lock.try_lock().await.unwrap();
    let waiter = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.lock().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    guard.unlock().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    got.unlock().await.unwrap();
    client.close().await.unwrap();
}

/// `holds()` on keys that are not all Baton's: bookkeeping keys of the wrong type do not
/// fail the listing, and queued waiters are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_survive_odd_keys_and_count_queued_waiters() {
    let server = RedisServer::start_async().await;
    let url = server.url();
    let prefix = unique("odd");
    let client = builder(&url, Duration::from_secs(30))
        .with_poll_interval(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let mut conn = raw(&url).await;
    // A foreign lock whose fence and record keys are of other types.
    let odd = format!("{prefix}/odd");
    let _: () = conn.set_ex(&odd, "foreign", 30).await.unwrap();
    let _: () = conn
        .hset(format!("baton:fence:{odd}"), "f", "1")
        .await
        .unwrap();
    let _: () = conn
        .rpush(format!("baton:leader:{odd}"), "x")
        .await
        .unwrap();
    let _: () = conn.set(format!("baton:queue:{odd}"), "x").await.unwrap();
    // A Baton lock with two queued waiters.
    let name = format!("{prefix}/queued");
    let guard = client.lock(&name).unwrap().lock().await.unwrap();
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let lock = client.lock(&name).unwrap();
            tokio::spawn(async move { lock.lock().await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let holds = client.holds(&prefix).await.unwrap();
    let names: Vec<&str> = holds.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, [odd.as_str(), name.as_str()], "{holds:?}");
    assert_eq!(holds[0].fencing_token, None);
    assert!(!holds[0].election);
    assert_eq!(holds[0].waiters, 0);
    assert_eq!(holds[1].fencing_token, guard.fencing_token());
    assert_eq!(holds[1].waiters, 2, "{holds:?}");

    guard.unlock().await.unwrap();
    for w in waiters {
        w.await.unwrap().unwrap().unlock().await.unwrap();
    }
    client.close().await.unwrap();
}

/// A plain lock holding an election's key is no leader: `leader()` says so, and an
/// observer yields nothing until a candidate leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_lock_is_no_leader() {
    let server = RedisServer::start_async().await;
    let client = builder(&server.url(), Duration::from_secs(30))
        .with_poll_interval(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let name = unique("plain");
    let guard = client.lock(&name).unwrap().lock().await.unwrap();
    let election = client.election(&name).unwrap();
    let err = election.leader().await.unwrap_err();
    assert!(matches!(err, Error::NoLeader { .. }), "{err}");
    let mut observe = election.observe();
    let first = tokio::time::timeout(
        Duration::from_millis(500),
        futures::StreamExt::next(&mut observe),
    )
    .await;
    assert!(first.is_err(), "observed a leader: {first:?}");
    guard.unlock().await.unwrap();
    let leading = election.campaign("me").await.unwrap();
    let seen = tokio::time::timeout(
        Duration::from_secs(2),
        futures::StreamExt::next(&mut observe),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(seen.value, b"me");
    leading.resign().await.unwrap();
    client.close().await.unwrap();
}

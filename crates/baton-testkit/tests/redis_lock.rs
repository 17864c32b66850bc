//! The single-instance Redis lock under ACLs and pauses: a lock name the ACL denies, a user
//! without pub/sub channel rights, and a FIFO waiter paused through its hand-off.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::time::Duration;

use baton::redis::RedisClient;
use baton::Error;
use baton_testkit::redis::RedisServerOptions;
use baton_testkit::RedisServer;
use redis::AsyncCommands;

/// A plain redis-rs connection, to look at keys behind Baton's back.
async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Wait (up to 2 s) until the queue of `key` holds `n` tokens.
async fn queue_reaches(conn: &mut redis::aio::MultiplexedConnection, key: &str, n: i64) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let len: i64 = conn.llen(format!("baton:queue:{key}")).await.unwrap();
        if len == n || std::time::Instant::now() >= deadline {
            return len;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A lock name outside the user's ACL is refused with `PermissionDenied`, and that says
/// nothing about the queue keys (which the ACL covers): the client's waiters of other locks
/// still queue in FIFO order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_lock_name_leaves_fifo_on_for_the_other_locks() {
    let server = RedisServer::start_with(
        RedisServerOptions::new().with_acl_user("u", "on >pw ~jobs:* ~baton:* &* +@all"),
    );
    let url = format!("redis://u:pw@{}", server.addr());
    let a = RedisClient::connect(&url).await.unwrap();
    let b = RedisClient::connect(&url).await.unwrap();
    let mut conn = raw(&server.url()).await;

    let waits_in_queue = |b: RedisClient, a: RedisClient, mut conn| async move {
        let held = a.lock("jobs:a").unwrap().lock().await.unwrap();
        let lb = b.lock("jobs:a").unwrap();
        let w = tokio::spawn(async move { lb.lock_timeout(Duration::from_secs(10)).await });
        let len = queue_reaches(&mut conn, "jobs:a", 1).await;
        held.unlock().await.unwrap();
        w.await.unwrap().unwrap().unlock().await.unwrap();
        len
    };
    // Control: before the denied lock, b's waiter queues.
    assert_eq!(waits_in_queue(b.clone(), a.clone(), conn.clone()).await, 1);

    // b tries names its ACL does not cover, by every way in.
    for r in [
        b.lock("other").unwrap().try_lock().await,
        b.lock("other").unwrap().lock().await,
        b.lock("other")
            .unwrap()
            .lock_timeout(Duration::from_secs(1))
            .await,
    ] {
        assert!(matches!(r, Err(Error::PermissionDenied(_))), "{r:?}");
    }

    // b's waiters for the allowed lock still queue.
    assert_eq!(
        waits_in_queue(b.clone(), a.clone(), conn.clone()).await,
        1,
        "b's waiter no longer queues (FIFO turned off client-wide)"
    );
    let len: i64 = conn.llen("baton:queue:jobs:a").await.unwrap();
    assert_eq!(len, 0);
}

/// A server whose user has no pub/sub channel rights (Redis 7's default
/// `acl-pubsub-default resetchannels`), and the URL to reach it as that user.
fn server_without_channels() -> (RedisServer, String) {
    let server = RedisServer::start_with(
        RedisServerOptions::new().with_acl_user("u", "on >pw ~* resetchannels +@all"),
    );
    let url = format!("redis://u:pw@{}", server.addr());
    (server, url)
}

/// Without channel rights, the release's wake-up message is refused: that costs only the
/// wake-up. `unlock()` reports the release it did (the key is gone, or handed to the next
/// waiter), and a waiter, unable to subscribe, gets the lock by its fallback poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_channel_rights_releases_and_waits_by_polling() {
    let (server, url) = server_without_channels();
    let mut conn = raw(&server.url()).await;
    for fifo in [true, false] {
        let builder = |url: &str| {
            let b = RedisClient::builder(url).with_poll_interval(Duration::from_millis(200));
            if fifo {
                b
            } else {
                b.without_fifo()
            }
        };
        let a = builder(&url).connect().await.unwrap();
        let b = builder(&url).connect().await.unwrap();
        let name = format!("job-{fifo}");

        // Free: unlock deletes the key and says so.
        let g = a.lock(&name).unwrap().lock().await.unwrap();
        let r = g.unlock().await;
        let v: Option<String> = conn.get(&name).await.unwrap();
        assert!(
            r.is_ok(),
            "fifo {fifo}: unlock failed ({r:?}); key after: {v:?}"
        );
        assert_eq!(v, None);

        // With a waiter: the unlock frees (or hands over) the lock and says so; the waiter
        // gets it.
        let held = a.lock(&name).unwrap().lock().await.unwrap();
        let lb = b.lock(&name).unwrap();
        let w = tokio::spawn(async move { lb.lock_timeout(Duration::from_secs(10)).await });
        if fifo {
            assert_eq!(queue_reaches(&mut conn, &name, 1).await, 1);
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let fence = held.fencing_token().unwrap();
        let r = held.unlock().await;
        assert!(r.is_ok(), "fifo {fifo}: unlock with a waiter failed: {r:?}");
        let gb = w.await.unwrap().unwrap();
        assert!(!gb.is_lost());
        assert!(gb.fencing_token().unwrap() > fence);
        let v: Option<String> = conn.get(&name).await.unwrap();
        assert_eq!(v.as_deref(), Some(gb.token()));
        gb.unlock().await.unwrap();
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
}

/// An election on a user without channel rights: campaign, proclaim and resign succeed
/// (their messages are only wake-ups), and an observer sees the proclaimed value by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_election_without_channel_rights_works_by_polling() {
    use futures::StreamExt;
    let (_server, url) = server_without_channels();
    let client = RedisClient::builder(&url)
        .with_poll_interval(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let election = client.election("e").unwrap();
    let mut leader = election.campaign("v1").await.unwrap();
    let mut observe = election.observe();
    let first = tokio::time::timeout(Duration::from_secs(5), observe.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.value, b"v1");
    leader.proclaim("v2").await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), observe.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.value, b"v2");
    leader.resign().await.unwrap();
    assert!(matches!(
        election.leader().await,
        Err(Error::NoLeader { .. })
    ));
}

/// A channel the ACL refuses (one lock's) costs only that lock's wake-ups: the client's
/// other locks are still woken at once by their release, not after the fallback poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_wake_up_channel_leaves_the_others_subscribed() {
    let server = RedisServer::start_with(
        RedisServerOptions::new().with_acl_user("u", "on >pw ~* &baton:wake:jobs:* +@all"),
    );
    let url = format!("redis://u:pw@{}", server.addr());
    let a = RedisClient::connect(&url).await.unwrap();
    // A fallback poll of 2.5-5 s: a waiter woken sooner was woken by the release's message.
    let b = RedisClient::builder(&url)
        .with_poll_interval(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let mut conn = raw(&server.url()).await;

    // b waits for "other" (its channel refused), then for "jobs:a".
    let other = a.lock("other").unwrap().lock().await.unwrap();
    let jobs = a.lock("jobs:a").unwrap().lock().await.unwrap();
    let lo = b.lock("other").unwrap();
    let wo = tokio::spawn(async move { lo.lock_timeout(Duration::from_secs(20)).await });
    assert_eq!(queue_reaches(&mut conn, "other", 1).await, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lj = b.lock("jobs:a").unwrap();
    let wj = tokio::spawn(async move { lj.lock_timeout(Duration::from_secs(20)).await });
    assert_eq!(queue_reaches(&mut conn, "jobs:a", 1).await, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let released = std::time::Instant::now();
    jobs.unlock().await.unwrap();
    let gj = wj.await.unwrap().unwrap();
    let woken_after = released.elapsed();
    assert!(
        woken_after < Duration::from_millis(1500),
        "the waiter of jobs:a took {woken_after:?}: no wake-up, only the fallback poll"
    );
    gj.unlock().await.unwrap();

    // The waiter of the refused channel gets its lock by the fallback poll.
    other.unlock().await.unwrap();
    wo.await.unwrap().unwrap().unlock().await.unwrap();
}

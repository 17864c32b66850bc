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

//! The single-instance Redis lock under ACLs and pauses: a lock name the ACL denies, a user
//! without pub/sub channel rights, and a FIFO waiter paused through its hand-off.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::time::Duration;

use baton::redis::RedisClient;
use baton::Error;
use baton_testkit::proxy::{Direction, Fault, FaultProxy};
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

/// The result of W's `lock_timeout` on its own runtime: its token, fencing token, and
/// whether the guard was already lost when it was returned.
type Outcome = Result<(String, Option<i64>, bool), String>;

/// A FIFO waiter paused (GC, SIGSTOP, a blocked runtime) while a release hands it the lock,
/// for longer than the short grant: when it resumes, the hand-off message is of a grant that
/// has ended (another client holds the lock now). The waiter must wait on, not return a
/// guard that is already lost; it gets the lock at the next release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_handoff_message_is_stale_and_the_waiter_waits_on() {
    let server = RedisServer::start_async().await;
    let url = server.url();
    let name = format!("late-grant-{}", std::process::id());
    let h = RedisClient::builder(&url)
        .with_ttl(Duration::from_secs(60))
        .connect()
        .await
        .unwrap();
    let x = RedisClient::connect(&url).await.unwrap();
    let held = h.lock(&name).unwrap().lock().await.unwrap();
    let mut conn = raw(&url).await;

    // W runs on its own single-threaded runtime, which we can block.
    let (block_tx, block_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Outcome>();
    let (wurl, wname) = (url.clone(), name.clone());
    let w_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            // TTL 1 s, poll 5 s: a hand-off grants W 1 s; W's fallback poll is 2.5-5 s away.
            let w = RedisClient::builder(&wurl)
                .with_ttl(Duration::from_secs(1))
                .with_poll_interval(Duration::from_secs(5))
                .connect()
                .await
                .unwrap();
            tokio::spawn(async move {
                block_rx.await.unwrap();
                std::thread::sleep(Duration::from_secs(2)); // the pause
            });
            let r = w
                .lock(&wname)
                .unwrap()
                .lock_timeout(Duration::from_secs(30))
                .await;
            let out = match &r {
                Ok(g) => Ok((g.token().to_string(), g.fencing_token(), g.is_lost())),
                Err(e) => Err(e.to_string()),
            };
            done_tx.send(out).unwrap();
            if let Ok(g) = r {
                g.unlock().await.unwrap();
            }
            w.close().await.unwrap();
        });
    });
    // W queued and subscribed.
    assert_eq!(queue_reaches(&mut conn, &name, 1).await, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    block_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    held.unlock().await.unwrap(); // handed to W (paused), for 1 s
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // The grant expired: X takes the lock.
    let gx = x.lock(&name).unwrap().try_lock().await.unwrap();
    let x_fence = gx.fencing_token().unwrap();

    // W resumed ~0.6 s ago and must still be waiting, not holding a lost guard.
    let early = tokio::task::spawn_blocking({
        let done_rx = std::sync::Mutex::new(done_rx);
        move || {
            let r = done_rx.lock().unwrap().recv_timeout(Duration::from_secs(2));
            (r, done_rx)
        }
    })
    .await
    .unwrap();
    let (r, done_rx) = early;
    assert!(
        r.is_err(),
        "W's lock_timeout returned {r:?} while X holds the lock (fence {x_fence})"
    );
    let holder: Option<String> = conn.get(&name).await.unwrap();
    assert_eq!(holder.as_deref(), Some(gx.token()));

    // At X's release, the lock goes to W, with a later fencing token.
    gx.unlock().await.unwrap();
    let w = tokio::task::spawn_blocking(move || {
        done_rx
            .into_inner()
            .unwrap()
            .recv_timeout(Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap();
    let (_, fence, lost) = w.expect("W gave up");
    assert!(!lost, "W's guard was lost when returned");
    assert!(
        fence.unwrap() > x_fence,
        "W's fence {fence:?}, X's {x_fence}"
    );
    w_thread.join().unwrap();
}

/// The same, through the poll's answer rather than the message: a hand-off whose message
/// never came (simulated: the lock handed to W by hand, as `handoff.lua` does, without the
/// `PUBLISH`), found by a poll after its grant's local deadline has passed. W must not return
/// a guard already lost: here the key is still W's (its expiry was stretched behind W's
/// back), so W takes it afresh, for its full TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_found_by_a_late_poll_is_not_returned_lost() {
    let server = RedisServer::start_async().await;
    let url = server.url();
    let name = format!("late-poll-{}", std::process::id());
    let h = RedisClient::connect(&url).await.unwrap();
    // TTL 1 s, poll 5 s: a hand-off grants W 1 s; W's next poll is 2.5-5 s after the last.
    let w = RedisClient::builder(&url)
        .with_ttl(Duration::from_secs(1))
        .with_poll_interval(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let held = h.lock(&name).unwrap().lock().await.unwrap();
    let mut conn = raw(&url).await;
    let lw = w.lock(&name).unwrap();
    let waiter = tokio::spawn(async move { lw.lock_timeout(Duration::from_secs(20)).await });
    assert_eq!(queue_reaches(&mut conn, &name, 1).await, 1);
    tokio::time::sleep(Duration::from_millis(300)).await; // W subscribed and refreshed

    // Hand the lock to W as handoff.lua does, without the message: `since` 0 (W's last
    // refresh), granted for 60 s on Redis's side, so the key stays W's.
    let queue = format!("baton:queue:{name}");
    let token: String = redis::cmd("LPOP")
        .arg(&queue)
        .query_async(&mut conn)
        .await
        .unwrap();
    let fence: i64 = conn.incr(format!("baton:fence:{name}"), 1).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(&name)
        .arg(&token)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("baton:waiter:{name}:{token}"))
        .arg(format!("g:{fence}:0"))
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    drop(held); // its release finds the key not its own: nothing happens

    let g = waiter.await.unwrap().unwrap();
    assert_eq!(g.token(), token);
    assert_eq!(g.fencing_token(), Some(fence));
    assert!(
        !g.is_lost(),
        "W's guard was lost when returned: {:?}",
        g.lost_reason()
    );
    let pttl: i64 = conn.pttl(&name).await.unwrap();
    assert!(
        pttl <= 1000,
        "W took the key afresh for its own TTL: PTTL {pttl}"
    );
    g.unlock().await.unwrap();
}

/// What the docs say stays in Redis after locks of distinct names come and go: each name's
/// fencing counter, without expiry (an expiry would let its tokens go back), and nothing
/// else once each release's marker has expired (twice the request timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_lock_name_leaves_only_its_fencing_counter() {
    let server = RedisServer::start_async().await;
    let client = RedisClient::builder(&server.url())
        .with_request_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let mut conn = raw(&server.url()).await;
    for i in 0..50 {
        let g = client
            .lock(&format!("order/{i}"))
            .unwrap()
            .lock()
            .await
            .unwrap();
        g.unlock().await.unwrap();
    }
    client.close().await.unwrap();
    let markers: Vec<String> = conn.keys("baton:released:*").await.unwrap();
    assert_eq!(markers.len(), 50, "one marker per release: {markers:?}");
    for marker in &markers {
        let pttl: i64 = conn.pttl(marker).await.unwrap();
        assert!(pttl > 0 && pttl <= 1000, "{marker}: {pttl}");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut keys: Vec<String> = conn.keys("*").await.unwrap();
    keys.sort();
    let mut expected: Vec<String> = (0..50).map(|i| format!("baton:fence:order/{i}")).collect();
    expected.sort();
    assert_eq!(keys, expected);
    let ttl: i64 = conn.ttl("baton:fence:order/7").await.unwrap();
    assert_eq!(ttl, -1, "the fencing counter must never expire");
}

/// Many waiters' channels and one the ACL refuses, at a reconnect over a 2 ms link: the
/// subscriber isolates the refused channel in a few round trips and subscribes the others
/// again. Subscribing one channel at a time (a round trip each) did not fit the reconnect's
/// deadline, so it retried for ever, and no channel of the client was subscribed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_channel_among_many_at_a_reconnect() {
    const N: usize = 1500;
    let server = RedisServer::start_with(
        RedisServerOptions::new().with_acl_user("u", "on >pw ~* &baton:wake:jobs:* +@all"),
    );
    let proxy = FaultProxy::start_to(server.addr().parse().unwrap()).await;
    let a = RedisClient::builder(&server.url())
        .with_ttl(Duration::from_secs(120))
        .connect()
        .await
        .unwrap();
    let b = RedisClient::builder(&format!("redis://u:pw@{}", proxy.addr()))
        .with_poll_interval(Duration::from_secs(5))
        .with_dial_timeout(Duration::from_secs(1))
        .with_request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let mut conn = raw(&server.url()).await;
    let mut held = Vec::new();
    for i in 0..N {
        held.push(a.lock(&format!("jobs:{i}")).unwrap().lock().await.unwrap());
    }
    let mut waiters = Vec::new();
    for i in 0..N {
        let l = b.lock(&format!("jobs:{i}")).unwrap();
        waiters.push(tokio::spawn(async move {
            l.lock_timeout(Duration::from_secs(60)).await
        }));
    }
    let subscribed = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let chans: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg("baton:wake:jobs:*")
                .query_async(&mut conn)
                .await
                .unwrap();
            chans.len()
        }
    };
    let started = std::time::Instant::now();
    while subscribed(&mut conn).await < N {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The link becomes slow; the pub/sub connection drops, and a waiter of a refused channel
    // arrives meanwhile.
    proxy.set_both(Fault::Delay(Duration::from_millis(1)));
    let _other = a.lock("other").unwrap().lock().await.unwrap();
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    let lo = b.lock("other").unwrap();
    let _refused_waiter =
        tokio::spawn(async move { lo.lock_timeout(Duration::from_secs(60)).await.map(|_| ()) });
    let killed = std::time::Instant::now();
    while subscribed(&mut conn).await < N {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the allowed channels were not subscribed again within 10 s of the reconnect"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // And a release wakes its waiter by message, not by the 5 s poll.
    let released = std::time::Instant::now();
    held.remove(0).unlock().await.unwrap();
    let got = waiters.remove(0).await.unwrap().unwrap();
    assert!(
        released.elapsed() < Duration::from_millis(2500),
        "woken {:?} after the release",
        released.elapsed()
    );
    drop(got);
}

/// Run a Lua busy loop on `url` for `busy`: the server answers nobody meanwhile.
fn stall_server(url: &str, busy: Duration) -> tokio::task::JoinHandle<()> {
    let url = url.to_string();
    tokio::spawn(async move {
        let mut conn = raw(&url).await;
        let script = "local a = redis.call('TIME') local s = a[1] * 1000000 + a[2] \
             while true do local t = redis.call('TIME') \
             if t[1] * 1000000 + t[2] - s > tonumber(ARGV[1]) then return 1 end end";
        let _: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(script)
            .arg(0)
            .arg(busy.as_micros() as u64)
            .query_async(&mut conn)
            .await;
    })
}

/// A take (not a hand-off) answered after the lock's TTL, the server stalled meanwhile: the
/// key is ours with a fresh TTL, but the hold counted from the send had ended already.
/// `lock()` returned a guard lost at once (FIFO; `baton lock` then exited 122 without
/// running CMD), and `try_lock()` without FIFO said "redlock quorum not reached" on one
/// server (found by a review). Now `lock()` takes it afresh and returns a live guard, and
/// `try_lock()` fails with a retryable error that names the TTL, having released the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_answered_after_the_ttl_is_not_returned_lost() {
    let server = RedisServer::start_async().await;
    for fifo in [true, false] {
        let builder = RedisClient::builder(&server.url()).with_ttl(Duration::from_secs(1));
        let builder = if fifo {
            builder
        } else {
            builder.without_fifo()
        };
        let client = builder.connect().await.unwrap();
        let lock = client.lock(&format!("slow-take-{fifo}")).unwrap();
        // Connections and scripts ready before the stall.
        lock.try_lock().await.unwrap().unlock().await.unwrap();

        let busy = stall_server(&server.url(), Duration::from_millis(1300));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let guard = lock.lock().await.unwrap();
        assert!(
            !guard.is_lost(),
            "fifo {fifo}: lock() returned a guard lost at once: {:?}",
            guard.lost_reason()
        );
        busy.await.unwrap();
        guard.unlock().await.unwrap();

        let busy = stall_server(&server.url(), Duration::from_millis(1300));
        tokio::time::sleep(Duration::from_millis(50)).await;
        match lock.try_lock().await {
            Err(e) => {
                assert!(e.is_retryable(), "fifo {fifo}: {e:?}");
                assert!(!matches!(e, Error::NoQuorum { .. }), "fifo {fifo}: {e}");
                assert!(e.to_string().contains("TTL"), "fifo {fifo}: {e}");
            }
            Ok(g) => assert!(
                !g.is_lost(),
                "fifo {fifo}: try_lock() returned a lost guard"
            ),
        }
        busy.await.unwrap();
        // Nothing left behind: the lock is free.
        let mut conn = raw(&server.url()).await;
        let held: Option<String> = conn.get(lock.key()).await.unwrap();
        let again = lock.try_lock().await;
        assert!(again.is_ok(), "fifo {fifo}: key {held:?} left: {again:?}");
        again.unwrap().unlock().await.unwrap();
        client.close().await.unwrap();
    }
}

/// Every answer later than the lock's TTL (a proxy delays them): `try_lock()` fails with
/// the retryable error naming the TTL, on one server with or without FIFO (without FIFO it
/// said "redlock quorum not reached"); nothing is left behind once the TTL has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_on_a_server_slower_than_the_ttl_says_so() {
    let server = RedisServer::start_async().await;
    let proxy = FaultProxy::start_to(server.addr().parse().unwrap()).await;
    for fifo in [true, false] {
        let builder =
            RedisClient::builder(&proxy.url("redis")).with_ttl(Duration::from_millis(100));
        let builder = if fifo {
            builder
        } else {
            builder.without_fifo()
        };
        let client = builder.connect().await.unwrap();
        let lock = client.lock(&format!("slow-try-{fifo}")).unwrap();
        lock.try_lock().await.unwrap().unlock().await.unwrap();
        proxy.set(
            Direction::ServerToClient,
            Fault::Delay(Duration::from_millis(150)),
        );
        let e = lock.try_lock().await.unwrap_err();
        assert!(e.is_retryable(), "fifo {fifo}: {e:?}");
        assert!(e.to_string().contains("TTL"), "fifo {fifo}: {e}");
        proxy.heal();
        // Its key released, or expired (100 ms TTL).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut conn = raw(&server.url()).await;
        let left: Option<String> = conn.get(lock.key()).await.unwrap();
        assert_eq!(left, None, "fifo {fifo}");
        client.close().await.unwrap();
    }
}

/// Every answer a little later than the TTL less the drift (2,984 ms of 3 s: the drift is 32 ms): with FIFO,
/// `lock()` took the key again and again, so it stayed this client's for good and another
/// client, answered at once, never got it (found by a second look). Now the slow client
/// lets the lock go after two late takes, and the other gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_slower_than_the_ttl_does_not_keep_the_lock_from_others() {
    let server = RedisServer::start_async().await;
    let proxy = FaultProxy::start_to(server.addr().parse().unwrap()).await;
    let slow = RedisClient::builder(&proxy.url("redis"))
        .with_ttl(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let fast = RedisClient::builder(&server.url())
        .with_ttl(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let slow_lock = slow.lock("slow-client").unwrap();
    slow_lock.try_lock().await.unwrap().unlock().await.unwrap();
    proxy.set(
        Direction::ServerToClient,
        Fault::Delay(Duration::from_millis(2984)),
    );
    let slow_task =
        tokio::spawn(async move { slow_lock.lock_timeout(Duration::from_secs(12)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = fast
        .lock("slow-client")
        .unwrap()
        .lock_timeout(Duration::from_secs(10))
        .await;
    assert!(got.is_ok(), "the fast client never got the lock: {got:?}");
    let guard = got.unwrap();
    assert!(!guard.is_lost());
    guard.unlock().await.unwrap();
    // The slow one never holds a guard that is lost at once.
    if let Ok(g) = slow_task.await.unwrap() {
        assert!(!g.is_lost());
    }
    proxy.heal();
}

/// What a program does before it exits, in [`exits_after`].
#[derive(Clone, Copy, Debug)]
enum LastCall {
    /// `try_lock()`, with a 300 ms request timeout.
    TryLock,
    /// `lock_timeout(300 ms)`.
    LockTimeout,
}

/// A program that connects through `proxy` (with FIFO or without), makes `call` on `name`
/// while the server's replies are delayed by 2 s, and exits (its runtime dropped right
/// after the call fails, as at the end of `#[tokio::main]`). Returns the call's error.
fn exits_after(proxy: &FaultProxy, fifo: bool, name: &str, call: LastCall) -> Error {
    let url = proxy.url("redis");
    let r = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let r = rt.block_on(async {
                    let mut b = RedisClient::builder(&url).with_ttl(Duration::from_secs(30));
                    if matches!(call, LastCall::TryLock) {
                        b = b.with_request_timeout(Duration::from_millis(300));
                    }
                    let client = if fifo { b } else { b.without_fifo() }
                        .connect()
                        .await
                        .unwrap();
                    // Load the scripts first.
                    let warm = client.lock(&format!("{name}-warm")).unwrap();
                    warm.try_lock().await.unwrap().unlock().await.unwrap();
                    proxy.set(
                        Direction::ServerToClient,
                        Fault::Delay(Duration::from_secs(2)),
                    );
                    let lock = client.lock(name).unwrap();
                    match call {
                        LastCall::TryLock => lock.try_lock().await.map(drop),
                        LastCall::LockTimeout => lock
                            .lock_timeout(Duration::from_millis(300))
                            .await
                            .map(drop),
                    }
                });
                drop(rt);
                r
            })
            .join()
            .unwrap()
        })
    });
    proxy.set(Direction::ServerToClient, Fault::Pass);
    proxy.reset_all();
    r.unwrap_err()
}

/// A failed `try_lock` and a timed-out `lock_timeout` delete what they may have set before
/// they return, as their docs say, with FIFO and without: a program that exits right after
/// leaves no key to block every other client for a TTL. The deletion was left to a task
/// spawned on drop in two cases, which an exiting program never runs: `try_lock` with FIFO
/// (a take whose reply came too late) and `lock_timeout` without FIFO (Redlock's path too:
/// it was `lock()` under a timeout). Found by a review (30 s keys left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_try_or_timed_out_lock_leaves_no_key_when_the_program_exits() {
    let server = RedisServer::start_async().await;
    let proxy = FaultProxy::start(server.port()).await;
    let mut conn = raw(&server.url()).await;
    let mut left = Vec::new();
    for call in [LastCall::TryLock, LastCall::LockTimeout] {
        for fifo in [false, true] {
            let name = format!("exits/{call:?}-{fifo}");
            let err = exits_after(&proxy, fifo, &name, call);
            // Let anything the server still had in its buffers run.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let v: Option<String> = conn.get(&name).await.unwrap();
            if v.is_some() {
                let pttl: i64 = conn.pttl(&name).await.unwrap();
                left.push(format!(
                    "{call:?}, fifo {fifo}: key left for {pttl} ms after {err}"
                ));
            }
        }
    }
    assert!(left.is_empty(), "{left:?}");
}

/// A single server that hangs (SIGSTOP), with a TTL longer than the request timeout:
/// `try_lock` fails after one request timeout (plus at most 500 ms for its deletion), as a
/// timeout. Without FIFO it waited a second request timeout for the deletion, then said
/// that "the server answered after the lock's TTL had passed", which it never did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_on_a_hung_server_fails_as_a_timeout_after_one_request_timeout() {
    let mut server = RedisServer::start_async().await;
    let request_timeout = Duration::from_secs(1);
    let mut report = Vec::new();
    for fifo in [true, false] {
        let b = RedisClient::builder(&server.url())
            .with_ttl(Duration::from_secs(30))
            .with_request_timeout(request_timeout);
        let client = if fifo { b } else { b.without_fifo() }
            .connect()
            .await
            .unwrap();
        let lock = client.lock(&format!("hung-{fifo}")).unwrap();
        lock.try_lock().await.unwrap().unlock().await.unwrap();
        tokio::task::block_in_place(|| server.stop());
        let t = std::time::Instant::now();
        let err = lock.try_lock().await.unwrap_err();
        let took = t.elapsed();
        tokio::task::block_in_place(|| server.cont());
        if took > request_timeout + Duration::from_millis(700) {
            report.push(format!("fifo {fifo}: took {took:?}: {err}"));
        }
        if err.to_string().contains("answered after") || !err.is_retryable() {
            report.push(format!("fifo {fifo}: {err}"));
        }
        client.close().await.unwrap();
    }
    assert!(report.is_empty(), "{report:?}");
}

/// Another client's script runs past `lua-time-limit`: Redis answers every other command
/// with `-BUSY` until it ends, without running it (a transient state, as `-LOADING` is). A
/// waiter waits it out and gets the free lock; it failed at once, for good, with a store
/// error (found by a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_waits_out_another_clients_busy_script() {
    let server = RedisServer::start_async().await;
    server
        .command(
            &["CONFIG", "SET", "lua-time-limit", "100"],
            Duration::from_secs(2),
        )
        .unwrap();
    let mut failed = Vec::new();
    for fifo in [true, false] {
        let b = RedisClient::builder(&server.url()).with_ttl(Duration::from_secs(30));
        let client = if fifo { b } else { b.without_fifo() }
            .connect()
            .await
            .unwrap();
        let lock = client.lock(&format!("busy-{fifo}")).unwrap();
        lock.try_lock().await.unwrap().unlock().await.unwrap();
        let stall = stall_server(&server.url(), Duration::from_millis(1500));
        tokio::time::sleep(Duration::from_millis(300)).await;
        match lock.lock_timeout(Duration::from_secs(10)).await {
            Ok(g) => g.unlock().await.unwrap(),
            Err(e) => failed.push(format!("fifo {fifo}: {e}")),
        }
        stall.await.unwrap();
        client.close().await.unwrap();
    }
    assert!(failed.is_empty(), "{failed:?}");
}

/// `lock_timeout` returns within 500 ms of its timeout. A FIFO waiter whose takes are
/// answered after the TTL lets the late take go after the second one, and that release
/// was not bounded by the deadline: with the server's replies delayed 1.5 s (TTL 1 s,
/// request timeout 5 s), `lock_timeout(3.2 s)` waited for the release (to 4.5 s), then for
/// the leave (500 ms): ~5 s (found by a second look).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeout_with_fifo_is_on_time_when_the_server_answers_after_the_ttl() {
    let server = RedisServer::start_async().await;
    let proxy = FaultProxy::start(server.port()).await;
    let client = RedisClient::builder(&proxy.url("redis"))
        .with_ttl(Duration::from_secs(1))
        .with_request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let warm = client.lock("late-warm").unwrap();
    warm.try_lock().await.unwrap().unlock().await.unwrap();
    proxy.set(
        Direction::ServerToClient,
        Fault::Delay(Duration::from_millis(1500)),
    );
    let lock = client.lock("late").unwrap();
    let timeout = Duration::from_millis(3200);
    let t = std::time::Instant::now();
    let r = lock.lock_timeout(timeout).await.map(drop);
    let took = t.elapsed();
    proxy.set(Direction::ServerToClient, Fault::Pass);
    assert!(
        took <= timeout + Duration::from_millis(700),
        "lock_timeout({timeout:?}) took {took:?}: {r:?}"
    );
}

/// FIFO without pub/sub (a user without channel rights). B queues first, C second; at A's release the
/// lock is handed to B (for the shorter of B's TTL and window) but B, with no wake-up
/// message, learns of it only at its next fallback poll. `rounds` rounds; returns who got
/// the lock first after each release.
async fn fifo_order_without_channels(
    a_builder: impl Fn(&str) -> baton::redis::RedisClientBuilder,
    b_builder: impl Fn(&str) -> baton::redis::RedisClientBuilder,
    c_builder: impl Fn(&str) -> baton::redis::RedisClientBuilder,
    rounds: usize,
) -> Vec<&'static str> {
    let (server, url) = server_without_channels();
    let mut conn = raw(&server.url()).await;
    let a = a_builder(&url).connect().await.unwrap();
    let b = b_builder(&url).connect().await.unwrap();
    let c = c_builder(&url).connect().await.unwrap();
    let name = "fifo-no-pubsub";
    let mut firsts = Vec::new();
    for _ in 0..rounds {
        let held = a.lock(name).unwrap().lock().await.unwrap();
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let spawn = |cl: RedisClient, who: &'static str| {
            let order = order.clone();
            tokio::spawn(async move {
                let g = cl
                    .lock(name)
                    .unwrap()
                    .lock_timeout(Duration::from_secs(20))
                    .await
                    .unwrap();
                assert!(!g.is_lost());
                order.lock().unwrap().push(who);
                tokio::time::sleep(Duration::from_millis(100)).await;
                g.unlock().await.unwrap();
            })
        };
        let wb = spawn(b.clone(), "B");
        assert_eq!(queue_reaches(&mut conn, name, 1).await, 1);
        let wc = spawn(c.clone(), "C");
        assert_eq!(queue_reaches(&mut conn, name, 2).await, 2);
        held.unlock().await.unwrap();
        wb.await.unwrap();
        wc.await.unwrap();
        firsts.push(order.lock().unwrap()[0]);
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
    c.close().await.unwrap();
    firsts
}

/// A waiter whose TTL is shorter than its fallback poll (as in
/// `a_late_handoff_message_is_stale_and_the_waiter_waits_on`: TTL 1 s, poll 5 s), without
/// channel rights, polls at its poll interval while a holder with a longer TTL holds: the
/// hand-off's grant (its TTL) ends before its next poll, the lock goes free, and the waiter
/// queued behind it takes it: FIFO order is lost at (almost) every release, and the lock
/// sits idle for the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_channels_a_waiter_with_a_ttl_below_its_poll_keeps_its_turn() {
    let firsts = fifo_order_without_channels(
        RedisClient::builder,
        |u| {
            RedisClient::builder(u)
                .with_ttl(Duration::from_millis(200))
                .with_poll_interval(Duration::from_secs(2))
        },
        |u| RedisClient::builder(u).with_poll_interval(Duration::from_millis(100)),
        3,
    )
    .await;
    assert_eq!(firsts, ["B", "B", "B"], "the first waiter lost its turn");
}

/// Every client with the same TTL of 100 ms (default poll), no channel rights. B polls at the holder's PTTL, i.e. when the holder's key
/// would expire; a release soon after the holder took or extended its key hands B a grant
/// that ends at about that moment: B misses it (C takes the lock, B requeues behind C) or
/// learns of it with a few ms left, and its guard is lost at once (the `unlock` in the
/// helper then fails with NotHeld). Failed 7-12 of 20 rounds, or NotHeld, in 6 runs before
/// a waiter without a confirmed subscription polled within a third of its grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_channels_a_waiter_keeps_its_turn_at_a_short_ttl() {
    let short = |u: &str| RedisClient::builder(u).with_ttl(Duration::from_millis(100));
    let rounds = 20;
    let firsts = fifo_order_without_channels(short, short, short, rounds).await;
    let lost = firsts.iter().filter(|w| **w != "B").count();
    assert_eq!(
        lost, 0,
        "the first waiter lost its turn {lost} times in {rounds}: {firsts:?}"
    );
}

//! Failures that need a real etcd: a member killed under a held lock, and contention between
//! separate OS processes.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use baton::{Client, Mutex, Session};
use baton_testkit::{EtcdCluster, EtcdServer};

/// `kill -9` of the cluster's leader, then of a follower, while a lock is held and a waiter
/// queues: the lock survives with no false `lost()`, and the waiter gets it on release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_killed_while_held() {
    let mut cluster = EtcdCluster::start_async(3).await;
    let endpoints = cluster.endpoints_url();
    let ttl = Duration::from_secs(5);
    let client = Client::connect(&endpoints).await.unwrap();
    let holder = Session::builder(&client)
        .with_ttl(ttl)
        .build()
        .await
        .unwrap();
    let waiter_client = Client::connect(&endpoints).await.unwrap();
    let waiter = Session::builder(&waiter_client)
        .with_ttl(ttl)
        .build()
        .await
        .unwrap();
    let g = Mutex::new(&holder, "failover/lock")
        .unwrap()
        .lock()
        .await
        .unwrap();
    let queued = tokio::spawn({
        let m = Mutex::new(&waiter, "failover/lock").unwrap();
        async move { m.lock().await }
    });

    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .expect("cluster has no leader");
    cluster.kill(leader);
    // Hold through the failover and more than two TTLs: no false loss.
    let until = Instant::now() + 2 * ttl + Duration::from_secs(1);
    while Instant::now() < until {
        assert!(
            !g.is_lost(),
            "false lost() after leader kill: {:?}",
            g.lost_reason()
        );
        if queued.is_finished() {
            match queued.await.unwrap() {
                Ok(g2) => panic!(
                    "waiter acquired a held lock: holder token {}, waiter token {}",
                    g.fencing_token(),
                    g2.fencing_token()
                ),
                Err(e) => panic!("waiter failed during the failover: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let follower = (0..3)
        .find(|&i| i != leader && Some(i) != cluster.leader_index())
        .unwrap_or((leader + 1) % 3);
    cluster.restart(leader);
    cluster.kill(follower);
    tokio::time::sleep(ttl).await;
    assert!(
        !g.is_lost(),
        "false lost() after follower kill: {:?}",
        g.lost_reason()
    );
    assert!(!holder.is_lost());

    let token = g.fencing_token();
    g.unlock().await.unwrap();
    let g2 = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .expect("waiter not granted after release")
        .unwrap()
        .unwrap();
    assert!(g2.fencing_token() > token);
    g2.unlock().await.unwrap();
}

/// Two separate OS processes contend for one lock, each doing an unprotected
/// read-modify-write of a counter file while holding it: no increment is lost, and fencing
/// tokens increase in the order the writes happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_contend() {
    let etcd = EtcdServer::start_async().await;
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter");
    let log = dir.path().join("log");
    const ROUNDS: usize = 25;
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lock-worker"))
            .args([
                etcd.endpoint(),
                "procs/lock".to_string(),
                ROUNDS.to_string(),
                counter.display().to_string(),
                log.display().to_string(),
            ])
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn(), spawn());
    let (ra, rb) = tokio::join!(a.wait(), b.wait());
    assert!(
        ra.unwrap().success() && rb.unwrap().success(),
        "a worker failed"
    );
    let count: usize = std::fs::read_to_string(&counter)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        count,
        2 * ROUNDS,
        "increments were lost: two holders at once"
    );
    let lines = std::fs::read_to_string(&log).unwrap();
    let entries: Vec<(u32, i64)> = lines
        .lines()
        .map(|l| {
            let (p, t) = l.split_once(' ').unwrap();
            (p.parse().unwrap(), t.parse().unwrap())
        })
        .collect();
    assert_eq!(entries.len(), 2 * ROUNDS);
    assert!(
        entries.windows(2).all(|w| w[0].1 < w[1].1),
        "tokens not increasing: {entries:?}"
    );
    let pids: std::collections::HashSet<u32> = entries.iter().map(|e| e.0).collect();
    assert_eq!(pids.len(), 2, "both processes must have held the lock");
    // No keys left behind.
    let client = Client::connect(&etcd.endpoint()).await.unwrap();
    let left = client
        .store()
        .range(baton::store::Range::prefix("procs/lock/"))
        .await
        .unwrap();
    assert!(left.kvs.is_empty());
}

/// etcd stops answering (SIGSTOP): keep-alives go unacknowledged, and the session and its
/// lock are lost at the local deadline (send time of the last acknowledged keep-alive plus
/// the TTL), not later. Nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_keep_alives_lose_at_the_local_deadline() {
    let mut etcd = EtcdServer::start_async().await;
    let client = Client::builder(&etcd.endpoint())
        .with_request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let ttl = Duration::from_secs(3);
    let s = Session::builder(&client)
        .with_ttl(ttl)
        .build()
        .await
        .unwrap();
    let g = Mutex::new(&s, "paused/lock").unwrap().lock().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    etcd.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let deadline = s.deadline();
    let stopped = tokio::time::Instant::now();
    assert!(deadline > stopped && deadline <= stopped + ttl);
    tokio::time::timeout(ttl + Duration::from_secs(1), g.lost())
        .await
        .expect("lock not lost while etcd is stopped");
    let fired = tokio::time::Instant::now();
    assert!(s.is_lost());
    assert_eq!(
        s.deadline(),
        deadline,
        "deadline moved without an acknowledgement"
    );
    assert!(
        fired + Duration::from_millis(50) >= deadline,
        "lost {:?} before the local deadline",
        deadline - fired
    );
    assert!(
        fired <= deadline + Duration::from_millis(250),
        "lost {:?} after the local deadline",
        fired - deadline
    );
    etcd.cont();
}

/// The leader's process is killed (`kill -9`): a waiting candidate leads within TTL + 1 s,
/// with a greater fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_fails_over_within_ttl() {
    use tokio::io::AsyncBufReadExt;
    let etcd = EtcdServer::start_async().await;
    let ttl = Duration::from_secs(2);
    let mut leader = tokio::process::Command::new(env!("CARGO_BIN_EXE_elect-worker"))
        .args([etcd.endpoint().as_str(), "failover/leader", "proc", "2"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(leader.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("worker did not lead")
        .unwrap()
        .unwrap();
    let old_token: i64 = line.strip_prefix("leading ").unwrap().parse().unwrap();

    let client = Client::connect(&etcd.endpoint()).await.unwrap();
    let s = Session::builder(&client)
        .with_ttl(ttl)
        .build()
        .await
        .unwrap();
    let e = baton::Election::new(&s, "failover/leader").unwrap();
    let campaign = tokio::spawn(async move { e.campaign("successor").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!campaign.is_finished());
    leader.start_kill().unwrap();
    leader.wait().await.unwrap();
    let killed = Instant::now();
    let l = tokio::time::timeout(ttl + Duration::from_secs(1), campaign)
        .await
        .expect("no failover within TTL + 1 s")
        .unwrap()
        .unwrap();
    let took = killed.elapsed();
    assert!(l.fencing_token() > old_token);
    assert!(took <= ttl + Duration::from_secs(1), "{took:?}");
    l.resign().await.unwrap();
}

/// One member of three paused (SIGSTOP: its connection open, nothing answered): connecting
/// with all three endpoints succeeds. The connect probe is hedged, as reads are; sent once,
/// it failed whenever the balancer gave it to the paused member ("no member answered"
/// after the whole dial timeout), although two members could answer: 3-5 of 9 attempts.
/// Hedged with 4 copies, every copy still went to the paused member 1 time in 81 (the
/// balancer picks a member at random for each): 1 of 9 attempts now and then, 0-3 of 100
/// here. Now it sends up to 16 copies (3^-16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_succeeds_with_one_member_of_three_paused() {
    const ATTEMPTS: usize = 100;
    let mut cluster = EtcdCluster::start_async(3).await;
    let url = cluster.endpoints_url();
    // A follower: pausing the leader fails every request until the others elect one.
    let paused = (0..3).find(|&i| Some(i) != cluster.leader_index()).unwrap();
    cluster.stop(paused);
    let mut failures = Vec::new();
    for i in 0..ATTEMPTS {
        let t = Instant::now();
        if let Err(e) = Client::builder(&url)
            .with_dial_timeout(Duration::from_secs(1))
            .connect()
            .await
        {
            failures.push(format!("attempt {i} after {:?}: {e}", t.elapsed()));
        }
    }
    cluster.cont(paused);
    assert!(
        failures.is_empty(),
        "{} of {ATTEMPTS} connects failed: {failures:#?}",
        failures.len()
    );
}

/// A read-only transaction (gets only, as `baton status`, STM reads and queue reads send)
/// with one member of three paused: it is hedged and retried as a range is. Before, it was
/// sent once: a third of them timed out (13 of 30 here; found by review: `baton status`
/// failed 3 runs of 6). Hedged, as reads are, with 4 copies each landing on a member picked
/// at random, 1 in 81 still times out (docs/reliability.md bug 15; 1 of 30 in a CI run), so
/// the bound is statistical: at most 4 of 30 (more than 4 has a probability of ~1e-5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_transactions_get_past_a_paused_member() {
    use baton::store::{Range, Txn, TxnOp};
    const ATTEMPTS: usize = 30;
    let mut cluster = EtcdCluster::start_async(3).await;
    let client = Client::builder(&cluster.endpoints_url())
        .with_request_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    client.store().put(b"ro/a", b"1", 0).await.unwrap();
    let paused = (0..3).find(|&i| Some(i) != cluster.leader_index()).unwrap();
    cluster.stop(paused);
    let mut failed = Vec::new();
    for i in 0..ATTEMPTS {
        let txn = Txn::new().and_then([
            TxnOp::get(Range::key(&b"ro/a"[..])),
            TxnOp::get(Range::prefix(&b"ro/"[..]).keys_only()),
        ]);
        let t = Instant::now();
        if let Err(e) = client.store().txn(txn).await {
            failed.push(format!("attempt {i} after {:?}: {e}", t.elapsed()));
        }
    }
    cluster.cont(paused);
    assert!(
        failed.len() <= 4,
        "{} of {ATTEMPTS} read-only transactions failed: {failed:#?}",
        failed.len()
    );
}

/// A 3-member cluster, the client's default request timeout (10 s), a session with a 5 s
/// TTL. The member that carries the session's keep-alive stream is paused (SIGSTOP) for
/// twice the TTL while the other two keep quorum: the session must survive. A keep-alive
/// on a stream that does not answer within a fifth of the TTL is sent again on a new stream
/// (on any member); before, every keep-alive waited on the silent stream until the session's
/// deadline, and the session was lost about 4 s after the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_survives_a_paused_member_carrying_its_keep_alives() {
    session_survives_pausing_its_keep_alive_carrier(false).await;
}

/// As above, with the paused carrier made the cluster's leader first. Until the other two
/// elect a leader, they refuse the new stream at once ("no leader": every request requires
/// a leader, see `a_watch_on_a_member_without_a_leader_ends`). Before, that one quick
/// refusal ended the hedge, the keep-alive went back to waiting on the silent stream, and
/// the session was lost about 4 s after the pause (once in CI, whenever the carrier
/// happened to be the leader); now the new stream is tried again until one opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_survives_pausing_the_leader_carrying_its_keep_alives() {
    session_survives_pausing_its_keep_alive_carrier(true).await;
}

/// Many sessions, each with its own keep-alive stream on a member the client's balancer
/// picked at random: pausing one member of three for twice the TTL loses none of them.
/// A stream opened again after a keep-alive went unanswered also lands on a random member,
/// maybe the paused one again, so this counts the sessions that were unlucky: before, a
/// keep-alive waited a fifth of the TTL on the silent stream each time and its new streams
/// were sent a fifth of the TTL apart, which lost ~1 session in 50 carried by the paused
/// member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_survive_a_paused_member() {
    const SESSIONS: usize = 60;
    let mut cluster = EtcdCluster::start_async(3).await;
    let client = Client::connect(&cluster.endpoints_url()).await.unwrap();
    let ttl = Duration::from_secs(5);
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        sessions.push(
            Session::builder(&client)
                .with_ttl(ttl)
                .build()
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paused = (0..3).find(|&i| Some(i) != cluster.leader_index()).unwrap();
    let paused_at = Instant::now();
    cluster.stop(paused);
    tokio::time::sleep(2 * ttl + Duration::from_secs(1)).await;
    let lost: Vec<String> = sessions
        .iter()
        .filter_map(|s| s.lost_reason())
        .map(|why| why.to_string())
        .collect();
    cluster.cont(paused);
    assert!(
        lost.is_empty(),
        "{} of {SESSIONS} sessions lost in the {:?} after pausing a follower: {lost:?}",
        lost.len(),
        paused_at.elapsed()
    );
}

/// A session resumed from another process (`with_lease`) while one member of three is
/// paused: `build()` succeeds, and never returns a session that is already lost. Its first
/// keep-alive (the lease's TTL not known yet) used to be hedged a quarter of the request
/// timeout (2.5 s) apart; landing on the paused member, it was answered after the 2 s TTL,
/// and `build()` returned Ok with the local deadline passed: 1-3 of 9 sessions lost at once,
/// while the lease lived on (found by review). Then the stream was opened with 4 copies,
/// each on a member picked at random: all 4 went to the paused member 1 time in 81, and
/// `build()` failed after 10 s (`Timeout`; CI, 2 runs of 4 with 9 attempts); now it sends
/// copies until its deadline (up to 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_with_a_member_paused_is_not_born_lost() {
    const ATTEMPTS: usize = 40;
    let mut cluster = EtcdCluster::start_async(3).await;
    let url = cluster.endpoints_url();
    let owner = Client::connect(&url).await.unwrap();
    let ttl = Duration::from_secs(2);
    let a = Session::builder(&owner)
        .with_ttl(ttl)
        .build()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let paused = (0..3).find(|&i| Some(i) != cluster.leader_index()).unwrap();
    cluster.stop(paused);
    let (mut failed, mut took_all) = (Vec::new(), Vec::new());
    for i in 0..ATTEMPTS {
        // Another process: its own client, which knows nothing of the lease.
        let b_client = Client::connect(&url).await.unwrap();
        let t = Instant::now();
        let built = Session::builder(&b_client)
            .with_lease(a.lease_id())
            .build()
            .await;
        let took = t.elapsed();
        took_all.push(took);
        match built {
            Ok(b) => {
                if let Some(why) = b.lost_reason() {
                    failed.push(format!("attempt {i}: build took {took:?}, lost: {why}"));
                }
                b.orphan();
            }
            Err(e) => failed.push(format!("attempt {i}: build failed after {took:?}: {e}")),
        }
    }
    let a_lost = a.lost_reason();
    cluster.cont(paused);
    assert!(
        failed.is_empty(),
        "{} of {ATTEMPTS} resumed sessions failed or were lost as build() returned (owner lost: {a_lost:?}; build times {took_all:?}): {failed:#?}",
        failed.len()
    );
    assert!(a_lost.is_none(), "{a_lost:?}");
}

async fn session_survives_pausing_its_keep_alive_carrier(leader_too: bool) {
    const KEEP_ALIVES: &str = "grpc_server_msg_received_total{grpc_method=\"LeaseKeepAlive\",grpc_service=\"etcdserverpb.Lease\",grpc_type=\"bidi_stream\"}";
    let mut cluster = EtcdCluster::start_async(3).await;
    let client = Client::connect(&cluster.endpoints_url()).await.unwrap();
    let ttl = Duration::from_secs(5);
    let session = Session::builder(&client)
        .with_ttl(ttl)
        .build()
        .await
        .unwrap();
    // Let a few keep-alives go out, then find the member that receives them.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let counts: Vec<f64> = (0..3)
        .map(|i| cluster.member(i).metric(KEEP_ALIVES).unwrap_or(0.0))
        .collect();
    let carrier = (0..3)
        .max_by(|&a, &b| counts[a].total_cmp(&counts[b]))
        .unwrap();
    assert!(counts[carrier] > 0.0, "no keep-alive seen: {counts:?}");
    if leader_too {
        cluster.move_leader(carrier);
    }
    let paused_at = Instant::now();
    cluster.stop(carrier);
    let until = paused_at + 2 * ttl + Duration::from_secs(1);
    while Instant::now() < until && !session.is_lost() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lost = session.lost_reason();
    let lost_after = paused_at.elapsed();
    cluster.cont(carrier);
    assert!(
        lost.is_none(),
        "session lost {lost_after:?} after pausing member {carrier} (leader: {leader_too}; keep-alives {counts:?}): {lost:?}"
    );
}

/// `try_lock` makes one attempt: with etcd down it fails at once with a retryable error (as
/// on Redis), instead of retrying the join for 15 s. `lock_timeout` keeps retrying until its
/// timeout, and the server back up, a `try_lock` succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_makes_one_attempt_when_etcd_is_down() {
    let mut etcd = EtcdServer::start_async().await;
    let client = Client::builder(&etcd.endpoint())
        .with_request_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let session = Session::builder(&client)
        .with_ttl(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let mutex = Mutex::new(&session, "down/try").unwrap();
    let rw = baton::RwLock::new(&session, "down/rw").unwrap();
    let sem = baton::Semaphore::new(&session, "down/sem", 2).unwrap();
    etcd.kill();
    let t = Instant::now();
    let err = mutex.try_lock().await.unwrap_err();
    let took = t.elapsed();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        took < Duration::from_secs(4),
        "try_lock took {took:?}: {err}"
    );
    let t = Instant::now();
    let err = rw.try_write().await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "try_write took {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let err = sem.try_acquire().await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "try_acquire took {:?}",
        t.elapsed()
    );
    etcd.restart();
    let g = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match mutex.try_lock().await {
                Ok(g) => return g,
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => panic!("try_lock after the restart: {e}"),
            }
        }
    })
    .await
    .expect("try_lock never succeeded after the restart");
    g.unlock().await.unwrap();
}

/// A watch carried by a member that has lost its leader (here: the two other members of
/// three are killed; a member partitioned from its peers is the same to it) ends with a
/// retryable error a few election timeouts later, so its consumer watches again elsewhere,
/// instead of staying open and silent for good while the member still answers pings: every
/// request requires a leader (etcd's `hasleader`, Go's `WithRequireLeader`). New requests to
/// such a member are refused at once with "no leader", which is retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_member_without_a_leader_ends() {
    use baton::store::etcd::{EtcdOptions, EtcdStore};
    use baton::store::{Store, Watch};
    use futures::StreamExt;
    let mut cluster = EtcdCluster::start_async(3).await;
    let lone = cluster.members()[2].endpoint();
    let store = EtcdStore::connect(&[lone], EtcdOptions::default())
        .await
        .unwrap();
    let (_, mut watch) = store.watch_from_now(Watch::key("nl/k")).await.unwrap();
    cluster.kill(0);
    cluster.kill(1);
    let started = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("the watch stayed open and silent on a member without a leader");
    match got {
        Some(Err(e)) => assert!(e.is_retryable(), "{e:?}"),
        None => {}
        Some(Ok(batch)) => panic!("an event from a member without a leader: {batch:?}"),
    }
    eprintln!(
        "the watch ended {:?} after the leader was lost",
        started.elapsed()
    );
    let err = store.put(b"nl/k", b"v", 0).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

/// A `lock_timeout` that gives up while etcd is paused (SIGSTOP) for longer than a join is
/// retried (15 s), the session living on (TTL 60 s): its join requests wait in etcd's socket,
/// and one of them is often applied when etcd resumes, after the caller gave up. The key that
/// join puts is still found and removed once etcd answers, so another session gets the lock
/// and no key is left (found by review: the search for the key gave up after 15 s of errors,
/// or looked just before the late join landed, and the key stayed as long as the session,
/// locking everyone else out: the other session timed out in 4 of 12 runs before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_applied_after_a_long_pause_is_removed() {
    use baton::store::Range;
    let mut etcd = EtcdServer::start_async().await;
    let client = Client::builder(&etcd.endpoint())
        .with_request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let ttl = Duration::from_secs(60);
    let mine = Session::builder(&client)
        .with_ttl(ttl)
        .build()
        .await
        .unwrap();
    let theirs = Session::builder(&client)
        .with_ttl(ttl)
        .build()
        .await
        .unwrap();
    let mutex = Mutex::new(&mine, "paused/orphan").unwrap();
    etcd.stop();
    let gave_up = mutex.lock_timeout(Duration::from_secs(2)).await;
    assert!(gave_up.is_err(), "locked while etcd was paused");
    tokio::time::sleep(Duration::from_secs(21)).await;
    etcd.cont();
    let keys = || async {
        let resp = client
            .store()
            .range(Range::prefix("paused/orphan/"))
            .await
            .unwrap();
        resp.kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect::<Vec<_>>()
    };
    let got = Mutex::new(&theirs, "paused/orphan")
        .unwrap()
        .lock_timeout(Duration::from_secs(10))
        .await;
    let g = match got {
        Ok(g) => g,
        Err(e) => panic!(
            "the other session did not get the lock: {e}; keys {:?}",
            keys().await
        ),
    };
    g.unlock().await.unwrap();
    let left = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let now = keys().await;
            if now.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(left.is_ok(), "a key was left: {:?}", keys().await);
    assert!(!mine.is_lost());
}

/// A holder whose client's watch stream sits on a member that goes silent still hears at
/// once that its key was deleted: the stream gets no reply to a progress request, its
/// watches watch again on another member, and the delete is replayed (~3 s here, with a
/// second of quiet before the probe and a share of the 5 s request timeout after it).
/// Before, the holder heard nothing until the connection's keep-alive pings gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_hears_of_its_keys_delete_past_a_silent_member() {
    let mut cluster = EtcdCluster::start_async(3).await;
    let client = Client::builder(&cluster.endpoints_url())
        .with_request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let session = Session::builder(&client)
        .with_ttl(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let g = Mutex::new(&session, "silent/lock")
        .unwrap()
        .lock()
        .await
        .unwrap();
    // Let the holder's watch be created (in the background after the grant).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let streams = |i: usize| {
        cluster
            .member(i)
            .metric("etcd_debugging_mvcc_watch_stream_total")
            .unwrap_or(0.0)
    };
    let carrier = (0..3)
        .max_by(|&a, &b| streams(a).total_cmp(&streams(b)))
        .unwrap();
    assert!(streams(carrier) >= 1.0);
    let other = (carrier + 1) % 3;
    tokio::task::block_in_place(|| cluster.move_leader(other));
    cluster.member_mut(carrier).stop();
    let started = Instant::now();
    let out = cluster.member(other).etcdctl(["del", g.key()]);
    assert!(out.status.success(), "{out:?}");
    while !g.is_lost() {
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "the holder was not told of its key's delete in 6 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("lost after {:?}: {:?}", started.elapsed(), g.lost_reason());
    cluster.member_mut(carrier).cont();
}

/// Under etcd's NOSPACE alarm (its space quota exceeded), etcd refuses every transaction
/// that puts, while deletes still pass. A long queue (10 waiters, each with a client of its
/// own) keeps draining: the releases of holders that waited in it, which carry a handoff
/// mark (a put), are sent again without it (found by review: the first long holder's
/// `unlock()` failed, "database space exceeded", and the queue stopped until the alarm was
/// disarmed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_queue_drains_under_the_nospace_alarm() {
    let etcd = EtcdServer::start_async().await;
    let session = || async {
        let client = Client::connect(&etcd.endpoint()).await.unwrap();
        Session::builder(&client)
            .with_ttl(Duration::from_secs(30))
            .build()
            .await
            .unwrap()
    };
    let name = "nospace";
    let first = session().await;
    let held = Mutex::new(&first, name).unwrap().lock().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut sessions = vec![first];
    let n = 10;
    for i in 0..n {
        let s = session().await;
        let mutex = Mutex::new(&s, name).unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            let guard = mutex.lock().await.unwrap();
            let unlocked = guard.unlock().await;
            tx.send((i, unlocked.map_err(|e| e.to_string()))).unwrap();
        });
        baton_testkit::conformance::wait_queued(sessions[0].client(), name, i).await;
        sessions.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ec = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let member = ec.member_list().await.unwrap().members()[0].id();
    let mut options = etcd_client::AlarmOptions::new();
    options.with_member(member);
    ec.alarm(
        etcd_client::AlarmAction::Activate,
        etcd_client::AlarmType::Nospace,
        Some(options),
    )
    .await
    .unwrap();
    assert!(ec.put("probe", "x", None).await.is_err(), "puts still pass");
    held.unlock().await.unwrap();
    let mut results = Vec::new();
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(r)) => results.push(r),
            _ => break,
        }
    }
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        results.len() == n && failed.is_empty(),
        "{} of {n} waiters granted and released; failed releases: {failed:?}",
        results.iter().filter(|(_, r)| r.is_ok()).count()
    );
    for s in sessions {
        let _ = s.close().await;
    }
}

//! The fault suite on Redis: one server (`redis://`, fenced by its counter) and Redlock over
//! five masters (`redlock://`, no fencing token), with worker processes paused and killed,
//! servers paused and restarted, and the TCP fault proxy between client and server; checked
//! by the fenced-resource oracle. Figures as in `faults_etcd.rs` (`BATON_FAULT_RUNS`).
//!
//! Rows covered by `tests/redis.rs` and not repeated here: 5 (an external `DEL` fires
//! `lost()`), 13 (extend after expiry), 14 (cancelled acquires), 18 (Redlock quorum
//! subsets), 19 (a Redlock acquisition slower than the validity), 20 (a restart fires
//! `lost()`). Row 20's effect on fencing tokens is here.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use baton::redis::RedisClient;
use baton_testkit::oracle::{report, report_count, runs, Fenced, Oracle};
use baton_testkit::proxy::{Fault, FaultProxy};
use baton_testkit::scenarios::{self, Depose, Kind, Target};
use baton_testkit::{RedisServer, RedisServers};
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_fault-worker");

fn redis_target(server: &RedisServer) -> Target {
    Target::new(WORKER, server.url(), "redis", Kind::Redis)
}

fn redlock_target(servers: &RedisServers) -> Target {
    Target::new(WORKER, servers.redlock_url(), "redlock×5", Kind::Redlock)
}

async fn client(url: &str, ttl: Duration) -> RedisClient {
    RedisClient::builder(url)
        .with_ttl(ttl)
        .with_request_timeout(Duration::from_millis(500))
        .with_dial_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap()
}

/// Row 1: see [`scenarios::baseline`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row01_baseline_redis() {
    let server = RedisServer::start_async().await;
    scenarios::baseline(&redis_target(&server)).await;
}

/// Row 1 on Redlock: tokens are all 0 (none), so the oracle fences nothing; without faults
/// the counter must still equal the increments and holds must not overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row01_baseline_redlock() {
    let servers = RedisServers::start_async(5).await;
    scenarios::baseline(&redlock_target(&servers)).await;
}

/// Row 2: see [`scenarios::paused_holder`]. On one Redis the paused holder's writes are
/// rejected by its counter-based token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row02_paused_holder_redis() {
    let server = RedisServer::start_async().await;
    scenarios::paused_holder(&redis_target(&server)).await;
}

/// Row 2 on Redlock: the holds still never overlap (each ends at its local deadline), but
/// the paused holder's write after SIGCONT cannot be refused: Redlock has no token. The
/// figure "stale write accepted" records it; it is inherent, and documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row02_paused_holder_redlock() {
    let servers = RedisServers::start_async(5).await;
    scenarios::paused_holder(&redlock_target(&servers)).await;
}

/// Row 6: see [`scenarios::crashed_holder`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row06_crashed_holder_redis() {
    let server = RedisServer::start_async().await;
    scenarios::crashed_holder(&redis_target(&server)).await;
}

/// Row 6 on Redlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row06_crashed_holder_redlock() {
    let servers = RedisServers::start_async(5).await;
    scenarios::crashed_holder(&redlock_target(&servers)).await;
}

/// Row 9: redis-server SIGSTOPped for twice the TTL (1 s) under a held lock. The holder's
/// `lost()` fires at its local deadline while Redis is paused; after SIGCONT, its extend
/// reports NotHeld, and another client gets the lock with a greater token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row09_redis_paused() {
    let mut server = RedisServer::start_async().await;
    let ttl = Duration::from_secs(1);
    let mut late = Vec::new();
    for run in 0..runs(2) {
        let c = client(&server.url(), ttl).await;
        let name = format!("redis-paused/{run}");
        let g = c.lock(&name).unwrap().lock().await.unwrap();
        let token = g.fencing_token().unwrap();
        server.stop();
        let stopped = Instant::now();
        let fired = tokio::time::timeout(2 * ttl, async {
            g.lost().await;
            Instant::now()
        })
        .await
        .expect("lost() did not fire while Redis was paused");
        let deadline = g.deadline();
        assert!(
            fired + Duration::from_millis(50) >= deadline,
            "lost before the deadline"
        );
        let lateness = fired.saturating_duration_since(deadline);
        assert!(
            lateness < Duration::from_millis(500),
            "lost {lateness:?} late"
        );
        late.push(lateness);
        tokio::time::sleep((2 * ttl).saturating_sub(stopped.elapsed())).await;
        server.cont();
        let err = g.extend().await.unwrap_err();
        assert!(matches!(err, baton::Error::NotHeld { .. }), "{err}");
        let other = client(&server.url(), ttl).await;
        let g2 = other
            .lock(&name)
            .unwrap()
            .lock_timeout(Duration::from_secs(5))
            .await
            .unwrap();
        assert!(g2.fencing_token().unwrap() > token);
        g2.unlock().await.unwrap();
        drop(g);
        c.close().await.unwrap();
        other.close().await.unwrap();
    }
    report(
        "9",
        "redis",
        "SIGSTOP redis 2×TTL: lost() after the local deadline",
        &late,
    );
}

/// Row 10: the holder is partitioned from Redis (proxy blackholes both ways) for 3×TTL
/// (TTL 1 s): `lost()` by its local deadline, which is never after the key's expiry on the
/// server; a waiter on a direct connection gets the lock only after that deadline.
async fn partitioned(url_of: impl Fn(&FaultProxy) -> String, upstream: &RedisServer, label: &str) {
    let ttl = Duration::from_secs(1);
    let (mut late, mut margin) = (Vec::new(), Vec::new());
    for run in 0..runs(2) {
        let proxy = FaultProxy::start(upstream.port()).await;
        let c = client(&url_of(&proxy), ttl).await;
        let name = format!("partition/{run}");
        let g = c.lock(&name).unwrap().lock().await.unwrap();
        let direct = client(&upstream.url(), ttl).await;
        let waiter = tokio::spawn({
            let l = direct.lock(&name).unwrap();
            async move {
                let g = l.lock_timeout(Duration::from_secs(10)).await;
                (Instant::now(), g)
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.set_both(Fault::Blackhole);
        let fired = tokio::time::timeout(3 * ttl, async {
            g.lost().await;
            Instant::now()
        })
        .await
        .expect("lost() did not fire in the partition");
        let deadline = g.deadline();
        late.push(fired.saturating_duration_since(deadline));
        assert!(fired.saturating_duration_since(deadline) < Duration::from_millis(500));
        let (granted, g2) = waiter.await.unwrap();
        let g2 = g2.unwrap();
        assert!(
            granted >= deadline,
            "waiter granted before the holder's deadline"
        );
        margin.push(granted - deadline);
        g2.unlock().await.unwrap();
        proxy.heal();
        drop(g);
        let _ = c.close().await;
        direct.close().await.unwrap();
    }
    report(
        "10",
        label,
        "partition: lost() after the local deadline",
        &late,
    );
    report(
        "10",
        label,
        "partition: next grant − local deadline",
        &margin,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row10_partitioned_redis() {
    let server = RedisServer::start_async().await;
    partitioned(|p| p.url("redis"), &server, "redis").await;
}

/// Row 16 on one Redis: the leader key is deleted behind the leader's back (`DEL`, the
/// analogue of revoking its lease). One new leader within 2 s; the old leader's watchdog
/// finds the key gone at its next extend, and `lost()` fires by its local deadline at the
/// latest; its writes after the new leader's are rejected by the token. See
/// [`scenarios::election_split_brain`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row16_election_del_redis() {
    let server = RedisServer::start_async().await;
    scenarios::election_split_brain(&redis_target(&server), Depose::Revoke, None).await;
}

/// Row 16 on one Redis: the leader process SIGSTOPped for 2×TTL. The next leader comes
/// after the key expires; on SIGCONT the old leader's `lost()` fires at once and its write
/// is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row16_election_pause_redis() {
    let server = RedisServer::start_async().await;
    scenarios::election_split_brain(&redis_target(&server), Depose::Pause, None).await;
}

/// Row 16 on Redlock: the leader's key deleted on every master that holds its token (a
/// compare-and-delete; see `Target::depose_leader` for why not a blind `DEL`). As on one
/// Redis, but without a token the old leader's writes until its watchdog notices are
/// accepted: the figure counts those after the new grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row16_election_del_redlock() {
    let servers = RedisServers::start_async(5).await;
    scenarios::election_split_brain(&redlock_target(&servers), Depose::Revoke, None).await;
}

/// Row 16 on Redlock: the leader process SIGSTOPped for 2×TTL. Leaderships, each ended at
/// its local deadline, never overlap; the old leader's write after SIGCONT cannot be
/// refused (no token), as in row 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row16_election_pause_redlock() {
    let servers = RedisServers::start_async(5).await;
    scenarios::election_split_brain(&redlock_target(&servers), Depose::Pause, None).await;
}

/// Row 20 and fencing: redis-server restarted without persistence under a held lock. The
/// holder learns it lost the lock; the fencing counter starts again from 1, so a fenced
/// resource that saw the old tokens refuses the new holder's writes: safety holds, but
/// liveness is lost until the counter passes the old tokens (documented: run Redis with
/// persistence when tokens matter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row20_restart_resets_fencing_tokens() {
    let mut server = RedisServer::start_async().await;
    let ttl = Duration::from_secs(2);
    let (mut noticed, mut tokens) = (Vec::new(), Vec::new());
    for run in 0..runs(2) {
        let oracle = Oracle::start().await;
        let mut w = oracle.client("w").await;
        let c = client(&server.url(), ttl).await;
        let name = format!("restart/{run}");
        let l = c.lock(&name).unwrap();
        let mut last = 0;
        for _ in 0..5 {
            let g = l.lock().await.unwrap();
            last = g.fencing_token().unwrap();
            assert!(w.increment(&name, last).await.unwrap());
            g.unlock().await.unwrap();
        }
        let g = l.lock().await.unwrap();
        let restarted = Instant::now();
        tokio::task::block_in_place(|| server.restart());
        tokio::time::timeout(ttl + Duration::from_secs(1), g.lost())
            .await
            .expect("restart not noticed");
        noticed.push(restarted.elapsed());
        let g2 = l.lock_timeout(Duration::from_secs(5)).await.unwrap();
        let token = g2.fencing_token().unwrap();
        assert!(
            token < last,
            "the counter survived a restart without persistence"
        );
        assert_eq!(
            w.read(&name, token).await.unwrap(),
            Fenced::Rejected { highest: last }
        );
        tokens.push(token as u64);
        g2.unlock().await.unwrap();
        c.close().await.unwrap();
    }
    report(
        "20",
        "redis",
        "restart without persistence → lost()",
        &noticed,
    );
    report_count(
        "20",
        "redis",
        "first token after the restart (was 6)",
        &tokens,
    );
}

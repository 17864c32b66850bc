//! The fault suite on etcd (one node, and a 3-node cluster): the rows of RELIABILITY.md
//! that apply to etcd, injected for real — worker processes paused and killed, members
//! killed and paused, a TCP fault proxy between client and member — and checked by the
//! fenced-resource oracle (`baton_testkit::oracle`).
//!
//! Each test makes `BATON_FAULT_RUNS` runs (default: a few, to keep CI fast) and prints its
//! figures as `FIGURE | …` lines (`cargo test --test faults_etcd -- --nocapture`).
//! docs/reliability.md has the figures of `BATON_FAULT_RUNS=10`.
//!
//! Rows covered elsewhere: 3, 4, 5, 14 and 17 by the conformance suite on every store
//! (`tests/conformance.rs`); 22 by `tests/faults_misc.rs`.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use baton::store::{Compare, CompareOp, Range, Txn, TxnOp};
use baton::{Client, Mutex, Session};
use baton_testkit::oracle::{mono_now, report, report_count, runs, Oracle};
use baton_testkit::proxy::{Direction, Fault, FaultProxy};
use baton_testkit::scenarios::{self, acquired, expect, since, Depose, Kind, Target};
use baton_testkit::worker::WorkerProc;
use baton_testkit::{EtcdCluster, EtcdServer};
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_fault-worker");

fn target(endpoints: &str, label: &str) -> Target {
    Target::new(WORKER, endpoints, label, Kind::Store)
}

/// A fault-worker process named `name`.
fn worker(name: &str, endpoints: &str, oracle: &Oracle, args: &[&str]) -> WorkerProc {
    target(endpoints, "etcd").worker(name, oracle, args)
}

async fn client(endpoints: &str, request_timeout: Duration) -> Client {
    baton_testkit::connect_client(endpoints, request_timeout).await
}

/// `RUST_LOG=baton=debug` shows keep-alives, retries and stream reopenings.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn session(client: &Client, ttl: Duration) -> Session {
    Session::builder(client)
        .with_ttl(ttl)
        .build()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Row 1: baseline

/// Row 1: see [`scenarios::baseline`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row01_baseline_single() {
    let etcd = EtcdServer::start_async().await;
    scenarios::baseline(&target(&etcd.endpoint(), "etcd")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row01_baseline_cluster() {
    let cluster = EtcdCluster::start_async(3).await;
    scenarios::baseline(&target(&cluster.endpoints_url(), "etcd×3")).await;
}

// ---------------------------------------------------------------------------------------
// Row 2: holder paused past its TTL

/// Row 2: see [`scenarios::paused_holder`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row02_paused_holder_single() {
    let etcd = EtcdServer::start_async().await;
    scenarios::paused_holder(&target(&etcd.endpoint(), "etcd")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row02_paused_holder_cluster() {
    let cluster = EtcdCluster::start_async(3).await;
    scenarios::paused_holder(&target(&cluster.endpoints_url(), "etcd×3")).await;
}

// ---------------------------------------------------------------------------------------
// Row 3: a waiter's lease expires while it queues

/// The waiter reaches etcd through the fault proxy, which is blackholed while it queues:
/// its keep-alives stop and its lease expires. When the holder then releases, the waiter
/// gets an error — never Ok — and its key is gone (etcd #11456). (The conformance suite
/// checks the same with an orphaned session on every store.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row03_waiter_lease_expires_in_queue() {
    let etcd = EtcdServer::start_async().await;
    let ttl = Duration::from_secs(2);
    let mut told = Vec::new();
    for run in 0..runs(2) {
        let name = format!("waiter-expires/{run}");
        let direct = client(&etcd.endpoint(), Duration::from_secs(5)).await;
        let hs = session(&direct, Duration::from_secs(10)).await;
        let g = Mutex::new(&hs, &name).unwrap().lock().await.unwrap();
        let proxy = FaultProxy::start(etcd.client_port()).await;
        let wc = client(&proxy.url("http"), Duration::from_secs(1)).await;
        let ws = session(&wc, ttl).await;
        let wm = Mutex::new(&ws, &name).unwrap();
        let waiter = tokio::spawn(async move {
            let r = wm.lock().await;
            (Instant::now(), r.map(|g| g.fencing_token()))
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.set_both(Fault::Blackhole);
        let expired = server_expiry(&direct, ws.lease_id(), 3 * ttl).await;
        g.unlock().await.unwrap();
        let (at, r) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter hung")
            .unwrap();
        assert!(
            r.is_err(),
            "a waiter whose lease expired got the lock: {r:?}"
        );
        // The waiter learns it at its own local deadline (its session is lost), before the
        // server's expiry, so before the holder even releases.
        assert!(
            at <= expired + Duration::from_millis(500),
            "told {:?} after the expiry",
            at - expired
        );
        told.push(at.saturating_duration_since(ws.deadline()));
        let left = direct
            .store()
            .range(Range::prefix(format!("{name}/")))
            .await
            .unwrap();
        assert!(left.kvs.is_empty(), "keys left: {:?}", left.kvs);
        proxy.heal();
        hs.close().await.unwrap();
    }
    report(
        "3",
        "etcd",
        "waiter cut off in queue: its error after its local deadline",
        &told,
    );
}

// ---------------------------------------------------------------------------------------
// Rows 4 and 5: an admin revokes the lease, or deletes the key

/// `etcdctl lease revoke` of the holder's lease, and `etcdctl del` of its key: `lost()`
/// within 1 s, the waiter gets the lock, and nothing re-creates the deleted key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row04_05_admin_revokes_or_deletes() {
    let etcd = EtcdServer::start_async().await;
    let (mut revoked, mut deleted) = (Vec::new(), Vec::new());
    for run in 0..runs(2) {
        for how in ["revoke", "del"] {
            let name = format!("admin-{how}/{run}");
            let c = client(&etcd.endpoint(), Duration::from_secs(5)).await;
            let s = session(&c, Duration::from_secs(10)).await;
            let g = Mutex::new(&s, &name).unwrap().lock().await.unwrap();
            let ws = session(&c, Duration::from_secs(10)).await;
            let wm = Mutex::new(&ws, &name).unwrap();
            let waiter = tokio::spawn(async move { wm.lock().await });
            tokio::time::sleep(Duration::from_millis(200)).await;
            let key = g.key().to_string();
            let args: Vec<String> = if how == "revoke" {
                vec![
                    "lease".into(),
                    "revoke".into(),
                    format!("{:x}", s.lease_id()),
                ]
            } else {
                vec!["del".into(), key.clone()]
            };
            let fired = tokio::spawn({
                let lost = g.lost_token();
                async move {
                    lost.cancelled().await;
                    Instant::now()
                }
            });
            let t0 = Instant::now();
            let out = tokio::task::block_in_place(|| etcd.etcdctl(&args));
            assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
            let fired = tokio::time::timeout(Duration::from_secs(1), fired)
                .await
                .unwrap_or_else(|_| panic!("lost() not within 1 s of etcdctl {how}"))
                .unwrap();
            // From the start of etcdctl: its own start-up (tens of ms) is included.
            let took = fired - t0;
            if how == "revoke" {
                revoked.push(took)
            } else {
                deleted.push(took)
            }
            let g2 = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("waiter not granted")
                .unwrap()
                .unwrap();
            assert!(g2.fencing_token() > g.fencing_token());
            tokio::time::sleep(Duration::from_millis(300)).await;
            let kv = c.store().range(Range::key(key.clone())).await.unwrap();
            assert!(kv.kvs.is_empty(), "{key} was re-created");
            assert!(g.unlock().await.is_err());
            g2.unlock().await.unwrap();
            let _ = s.close().await;
            ws.close().await.unwrap();
        }
    }
    report(
        "4",
        "etcd",
        "etcdctl lease revoke → lost() (incl. etcdctl start-up)",
        &revoked,
    );
    report(
        "5",
        "etcd",
        "etcdctl del → lost() (incl. etcdctl start-up)",
        &deleted,
    );
}

// ---------------------------------------------------------------------------------------
// Row 6: holder crashes

/// Row 6: see [`scenarios::crashed_holder`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row06_crashed_holder_single() {
    let etcd = EtcdServer::start_async().await;
    scenarios::crashed_holder(&target(&etcd.endpoint(), "etcd")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row06_crashed_holder_cluster() {
    let cluster = EtcdCluster::start_async(3).await;
    scenarios::crashed_holder(&target(&cluster.endpoints_url(), "etcd×3")).await;
}

// ---------------------------------------------------------------------------------------
// Row 7: the etcd leader crashes

/// `kill -9` of the cluster's leader while an in-process holder holds one lock and a worker
/// process holds another (killed at the same moment, with a waiter queued): the live holder
/// sees no false `lost()` for 2×TTL, and the dead holder's lock is granted to the waiter
/// within failover + TTL + 3 s. TTL 5 s: keep-alives stall for the failover (1.2–1.7 s
/// here, more under load), so a TTL of 3 s can be lost falsely (seen once under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row07_leader_crash() {
    let mut cluster = EtcdCluster::start_async(3).await;
    let endpoints = cluster.endpoints_url();
    let ttl = Duration::from_secs(5);
    let (mut failover, mut grant, mut false_losses) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs(1) {
        let oracle = Oracle::start().await;
        let c = client(&endpoints, Duration::from_secs(2)).await;
        let s = session(&c, ttl).await;
        let g = Mutex::new(&s, &format!("leader-crash/live/{run}"))
            .unwrap()
            .lock()
            .await
            .unwrap();
        let lock = format!("leader-crash/dead/{run}");
        let mut a = worker(
            "a",
            &endpoints,
            &oracle,
            &["--lock", &lock, "--ttl-ms", "5000", "--keep"],
        );
        expect(&mut a, "keeping", Duration::from_secs(15)).await;
        let mut b = worker(
            "b",
            &endpoints,
            &oracle,
            &["--lock", &lock, "--ttl-ms", "5000"],
        );
        expect(&mut b, "ready", Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let leader =
            tokio::task::block_in_place(|| cluster.wait_for_leader(Duration::from_secs(10)))
                .expect("no leader");
        let killed = mono_now();
        tokio::task::block_in_place(|| cluster.kill(leader));
        a.kill();
        oracle.end_holds("a", killed, "killed");
        let new_leader =
            tokio::task::block_in_place(|| cluster.wait_for_leader(Duration::from_secs(15)))
                .expect("no new leader");
        assert_ne!(new_leader, leader);
        let fo = since(killed, mono_now());
        failover.push(fo);
        let (_, t_b) = acquired(&expect(&mut b, "acquired", ttl + Duration::from_secs(15)).await);
        let took = since(killed, t_b);
        // A new etcd leader resets every lease to its TTL plus an election timeout (1 s) when
        // it takes over (lessor.Promote), and checks expiry every 500 ms: measured up to
        // failover + TTL + 1.7 s here; the bound leaves room for a loaded machine.
        assert!(
            took <= fo + ttl + Duration::from_secs(3),
            "dead holder's lock granted {took:?} after the crash (failover {fo:?})"
        );
        grant.push(took);
        // The live holder holds on through 2×TTL after the crash.
        let until = Instant::now() + 2 * ttl;
        let mut lost = 0;
        while Instant::now() < until {
            if g.is_lost() {
                lost += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(lost, 0, "false lost(): {:?}", g.lost_reason());
        false_losses.push(lost);
        g.unlock().await.unwrap();
        expect(&mut b, "done", Duration::from_secs(10)).await;
        oracle.history().check_all(&oracle, &[]).unwrap();
        s.close().await.unwrap();
        tokio::task::block_in_place(|| cluster.restart(leader));
    }
    report(
        "7",
        "etcd×3",
        "kill -9 of etcd leader → new leader",
        &failover,
    );
    report(
        "7",
        "etcd×3",
        "kill -9 of leader + holder → next grant (TTL 5 s)",
        &grant,
    );
    report_count("7", "etcd×3", "false lost() of live holder", &false_losses);
}

// ---------------------------------------------------------------------------------------
// Row 8: quorum lost

/// Two of three members killed: no acquire returns Ok, and the holder's `lost()` fires at
/// its local deadline (not before, and not much after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row08_quorum_lost() {
    let mut cluster = EtcdCluster::start_async(3).await;
    let endpoints = cluster.endpoints_url();
    let ttl = Duration::from_secs(3);
    let mut late = Vec::new();
    for run in 0..runs(1) {
        let c = client(&endpoints, Duration::from_secs(1)).await;
        let s = session(&c, ttl).await;
        let name = format!("quorum/{run}");
        let g = Mutex::new(&s, &name).unwrap().lock().await.unwrap();
        let c2 = client(&endpoints, Duration::from_secs(1)).await;
        let s2 = session(&c2, Duration::from_secs(10)).await;
        let contender = Mutex::new(&s2, &name).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::task::block_in_place(|| {
            cluster.kill(0);
            cluster.kill(1);
        });
        let attempt = contender.lock_timeout(2 * ttl);
        let lost = async {
            g.lost().await;
            Instant::now()
        };
        let (r, fired) = tokio::join!(attempt, lost);
        assert!(r.is_err(), "acquired without a quorum");
        let deadline = s.deadline();
        assert!(
            fired + Duration::from_millis(50) >= deadline,
            "lost {:?} before the deadline",
            deadline - fired
        );
        let lateness = fired.saturating_duration_since(deadline);
        assert!(
            lateness < Duration::from_millis(500),
            "lost {lateness:?} late"
        );
        late.push(lateness);
        drop(contender);
        s2.orphan();
        tokio::task::block_in_place(|| {
            cluster.member_mut(0).restart_no_wait();
            cluster.member_mut(1).restart_no_wait();
            for i in 0..3 {
                assert!(cluster.member(i).wait_healthy(Duration::from_secs(30)));
            }
        });
    }
    report("8", "etcd×3", "lost() after the local deadline", &late);
}

// ---------------------------------------------------------------------------------------
// Row 9: the etcd leader paused

/// SIGSTOP of the leader for 3 s while 5 worker processes contend (TTL 5 s): no double
/// grant (no overlap, no rejected write), nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row09_leader_paused() {
    let mut cluster = EtcdCluster::start_async(3).await;
    let endpoints = cluster.endpoints_url();
    let (mut gaps, mut losses, mut resume_grant) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs(1) {
        let oracle = Oracle::start().await;
        let lock = format!("leader-paused/{run}");
        let mut ws: Vec<WorkerProc> = (0..5)
            .map(|i| {
                worker(
                    &format!("w{i}"),
                    &endpoints,
                    &oracle,
                    &[
                        "--lock",
                        &lock,
                        "--rounds",
                        "0",
                        "--ttl-ms",
                        "5000",
                        "--hold-ms",
                        "20",
                        "--request-timeout-ms",
                        "3000",
                    ],
                )
            })
            .collect();
        for w in &mut ws {
            expect(w, "ready", Duration::from_secs(15)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let leader =
            tokio::task::block_in_place(|| cluster.wait_for_leader(Duration::from_secs(10)))
                .expect("no leader");
        cluster.stop(leader);
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.cont(leader);
        let resumed = mono_now();
        // Requests sent to the paused leader time out (3 s) and may land late; a key whose
        // release timed out lingers until its lease (5 s) ends: give the lock time to move.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let mut lost = 0u64;
        for w in &mut ws {
            let t = w.kill();
            oracle.end_holds(w.name(), t, "killed");
            for l in w.lines_so_far() {
                if l.starts_with("lost") || l.starts_with("error") {
                    eprintln!("{}: {l}", w.name());
                    lost += u64::from(l.starts_with("lost"));
                }
            }
        }
        let h = oracle.history();
        h.check_all(&oracle, &[]).unwrap();
        assert_eq!(h.rejected(None), 0, "a write was rejected: two holders");
        let holds = h.holds();
        let after = h
            .next_grant_after(&lock, resumed)
            .expect("no grant within 8 s after the pause");
        resume_grant.push(after);
        let gap = holds
            .windows(2)
            .map(|w| since(w[0].end.unwrap_or(w[0].start), w[1].start))
            .max()
            .unwrap_or_default();
        gaps.push(gap);
        losses.push(lost);
    }
    report(
        "9",
        "etcd×3",
        "SIGCONT of leader → next grant",
        &resume_grant,
    );
    report(
        "9",
        "etcd×3",
        "SIGSTOP leader 3 s: longest gap between grants",
        &gaps,
    );
    report_count("9", "etcd×3", "holds lost (TTL 5 s)", &losses);
}

// ---------------------------------------------------------------------------------------
// Rows 10 and 11: the network between client and member

/// Wait until the lease is gone on the server (polled every 20 ms through `direct`); when.
async fn server_expiry(direct: &Client, lease: i64, within: Duration) -> Instant {
    let until = Instant::now() + within;
    loop {
        if direct
            .store()
            .lease_time_to_live(lease)
            .await
            .unwrap()
            .is_none()
        {
            return Instant::now();
        }
        assert!(Instant::now() < until, "lease never expired on the server");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The client is partitioned from its only member (blackhole both ways) for 2×TTL: `lost()`
/// by the local deadline, which is never after the server's expiry; a call through the
/// partition fails within its timeout; a waiter elsewhere gets the lock after the expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row10_client_partitioned() {
    let etcd = EtcdServer::start_async().await;
    let ttl = Duration::from_secs(2);
    let (mut late, mut margin, mut call) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs(2) {
        let proxy = FaultProxy::start(etcd.client_port()).await;
        let c = client(&proxy.url("http"), Duration::from_secs(1)).await;
        let s = session(&c, ttl).await;
        let name = format!("partition/{run}");
        let g = Mutex::new(&s, &name).unwrap().lock().await.unwrap();
        let direct = client(&etcd.endpoint(), Duration::from_secs(5)).await;
        let ws = session(&direct, Duration::from_secs(10)).await;
        let wm = Mutex::new(&ws, &name).unwrap();
        let waiter = tokio::spawn(async move {
            let g = wm.lock().await;
            (Instant::now(), g)
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        proxy.set_both(Fault::Blackhole);
        // A call through the partition gives up within its timeout.
        let t = Instant::now();
        let r = c.store().range(Range::key("x")).await;
        assert!(r.is_err());
        call.push(t.elapsed());
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        let lease = s.lease_id();
        let (fired, expired) = tokio::join!(
            async {
                g.lost().await;
                Instant::now()
            },
            server_expiry(&direct, lease, 3 * ttl)
        );
        let deadline = s.deadline();
        assert!(
            deadline <= expired,
            "local deadline after the server's expiry"
        );
        margin.push(expired - deadline);
        let lateness = fired.saturating_duration_since(deadline);
        assert!(
            lateness < Duration::from_millis(500),
            "lost {lateness:?} late"
        );
        late.push(lateness);
        let (granted, g2) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(
            granted >= deadline,
            "waiter granted before the holder's deadline"
        );
        g2.unwrap().unlock().await.unwrap();
        proxy.heal();
        ws.close().await.unwrap();
    }
    report(
        "10",
        "etcd",
        "partition: lost() after the local deadline",
        &late,
    );
    report(
        "10",
        "etcd",
        "partition: server expiry − local deadline",
        &margin,
    );
    report(
        "10",
        "etcd",
        "partition: a call fails after (timeout 1 s)",
        &call,
    );
}

/// The client reaches a 3-node cluster through one proxy per member; the member it is
/// partitioned from (both ways, 2×TTL) is the leader. The other two serve: nothing is lost,
/// and no call hangs past its timeout — but calls the client happens to send to the silent
/// member fail (Timeout) until HTTP/2 keep-alive gives up on it (see docs/reliability.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row10_partitioned_from_one_member_of_three() {
    init_tracing();
    let cluster = EtcdCluster::start_async(3).await;
    let ttl = Duration::from_secs(4);
    let (mut losses, mut failed_reads) = (Vec::new(), Vec::new());
    for run in 0..runs(1) {
        let mut proxies = Vec::new();
        for m in cluster.members() {
            proxies.push(FaultProxy::start(m.client_port()).await);
        }
        let url = proxies
            .iter()
            .map(|p| p.url("http"))
            .collect::<Vec<_>>()
            .join(",");
        let c = client(&url, Duration::from_secs(1)).await;
        let s = session(&c, ttl).await;
        let g = Mutex::new(&s, &format!("one-of-three/{run}"))
            .unwrap()
            .lock()
            .await
            .unwrap();
        let leader =
            tokio::task::block_in_place(|| cluster.wait_for_leader(Duration::from_secs(10)))
                .expect("no leader");
        proxies[leader].set_both(Fault::Blackhole);
        // Reads meanwhile: each ends within its timeout (1 s); some fail, those the client
        // sent to the silent member, until HTTP/2 keep-alive declares it dead.
        let until = Instant::now() + 2 * ttl;
        let (mut reads, mut failed) = (0u64, 0u64);
        while Instant::now() < until && !g.is_lost() {
            let t = Instant::now();
            let r = c.store().range(Range::key("x")).await;
            assert!(
                t.elapsed() < Duration::from_millis(1500),
                "a read hung {:?}",
                t.elapsed()
            );
            reads += 1;
            failed += u64::from(r.is_err());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        failed_reads.push(failed * 100 / reads.max(1));
        let lost = u64::from(g.is_lost());
        losses.push(lost);
        assert!(
            !g.is_lost(),
            "lost with 2 of 3 members reachable: {:?}",
            g.lost_reason()
        );
        proxies[leader].heal();
        // The heal resets the connection to that member; a write in flight on it fails
        // with a transport error and is not retried (it may have been applied). The key
        // then goes with the lease, which the session's drop revokes.
        if let Err(e) = g.unlock().await {
            eprintln!("unlock after the heal: {e}");
        }
        if let Err(e) = s.close().await {
            eprintln!("close after the heal: {e}");
        }
    }
    report_count(
        "10",
        "etcd×3",
        "partitioned from the leader member: holds lost",
        &losses,
    );
    report_count(
        "10",
        "etcd×3",
        "partitioned from the leader member: % of reads failed (timeout 1 s)",
        &failed_reads,
    );
}

/// Keep-alive replies delayed 1.5 s: the local deadline is never later than the server's
/// expiry (measured by cutting the client off at the end and watching the lease expire).
///
/// Keep-alives are pipelined (one sent every TTL/3 without waiting for the previous reply),
/// and the reply that opens a keep-alive stream counts as a keep-alive, so a session
/// survives reply latencies up to about TTL − TTL/3: it holds at TTL 3 s and at 6 s.
async fn slow_keep_alive_replies(ttl: Duration) {
    init_tracing();
    let etcd = EtcdServer::start_async().await;
    let (mut margin, mut losses) = (Vec::new(), Vec::new());
    for run in 0..runs(2) {
        let proxy = FaultProxy::start(etcd.client_port()).await;
        let c = client(&proxy.url("http"), Duration::from_secs(5)).await;
        let s = session(&c, ttl).await;
        let g = Mutex::new(&s, &format!("slow/{run}"))
            .unwrap()
            .lock()
            .await
            .unwrap();
        proxy.set(
            Direction::ServerToClient,
            Fault::Delay(Duration::from_millis(1500)),
        );
        tokio::time::sleep(ttl + Duration::from_secs(3)).await;
        losses.push(u64::from(g.is_lost()));
        assert!(
            !g.is_lost(),
            "lost with slow replies: {:?}",
            g.lost_reason()
        );
        // Now cut it off, and compare the local deadline with the server's expiry.
        proxy.set(Direction::ClientToServer, Fault::Blackhole);
        let direct = client(&etcd.endpoint(), Duration::from_secs(5)).await;
        let expired = server_expiry(&direct, s.lease_id(), 3 * ttl).await;
        let deadline = s.deadline();
        assert!(
            deadline <= expired,
            "local deadline {:?} after the server's expiry",
            deadline - expired
        );
        margin.push(expired - deadline);
        tokio::time::timeout(Duration::from_secs(1), g.lost())
            .await
            .expect("not lost after the server's expiry");
        proxy.heal();
    }
    let what = format!("replies delayed 1.5 s, TTL {} s", ttl.as_secs());
    report(
        "11",
        "etcd",
        &format!("{what}: server expiry − local deadline"),
        &margin,
    );
    report_count("11", "etcd", &format!("{what}: holds lost"), &losses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row11_slow_keep_alive_replies_ttl3() {
    slow_keep_alive_replies(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row11_slow_keep_alive_replies_ttl6() {
    slow_keep_alive_replies(Duration::from_secs(6)).await;
}

// ---------------------------------------------------------------------------------------
// Row 12: a lost unlock reply

/// The unlock's reply is lost (server→client blackholed): the call times out though the key
/// was deleted; the same session takes the lock again (same key, new token); the old unlock,
/// retried, is a compare-and-delete on the old token and leaves the newer lock alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row12_lost_unlock_reply() {
    let etcd = EtcdServer::start_async().await;
    for run in 0..runs(2) {
        let proxy = FaultProxy::start(etcd.client_port()).await;
        let c = client(&proxy.url("http"), Duration::from_secs(1)).await;
        let s = session(&c, Duration::from_secs(10)).await;
        let m = Mutex::new(&s, &format!("unlock-reply/{run}")).unwrap();
        let g = m.lock().await.unwrap();
        let (key, old) = (g.key().to_string(), g.fencing_token());
        proxy.set(Direction::ServerToClient, Fault::Blackhole);
        let r = g.unlock().await;
        assert!(r.is_err(), "unlock answered through a blackhole");
        let direct = client(&etcd.endpoint(), Duration::from_secs(5)).await;
        let gone = direct.store().range(Range::key(key.clone())).await.unwrap();
        assert!(gone.kvs.is_empty(), "the unlock was not applied");
        proxy.heal();
        // The heal resets the connection that lost the reply; the first request on it may
        // fail with a transport error (a write is not retried once it may have been sent).
        let mut attempt = 0;
        let g2 = loop {
            match m.lock_timeout(Duration::from_secs(10)).await {
                Ok(g) => break g,
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    eprintln!("re-acquire after heal: {e}");
                }
                Err(e) => panic!("re-acquire failed: {e}"),
            }
        };
        assert_eq!(g2.key(), key);
        assert!(g2.fencing_token() > old);
        // The retry of the old unlock: compare-and-delete on the old token.
        let retry = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, old)])
            .and_then([TxnOp::delete(key.clone())]);
        assert!(!c.store().txn(retry).await.unwrap().succeeded);
        assert!(!g2.is_lost());
        let kv = direct.store().range(Range::key(key.clone())).await.unwrap();
        assert_eq!(kv.kvs[0].create_revision, g2.fencing_token());
        g2.unlock().await.unwrap();
        s.close().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Row 15: compaction while waiting

/// A waiter queues; the store moves on and is compacted past the waiter's watch revision;
/// the waiter's connection is reset, so it must watch again from a compacted revision. It
/// still gets the lock at once when the holder releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row15_compaction_while_waiting() {
    let etcd = EtcdServer::start_async().await;
    let mut handover = Vec::new();
    for run in 0..runs(2) {
        let direct = client(&etcd.endpoint(), Duration::from_secs(5)).await;
        let hs = session(&direct, Duration::from_secs(10)).await;
        let name = format!("compact/{run}");
        let g = Mutex::new(&hs, &name).unwrap().lock().await.unwrap();
        let proxy = FaultProxy::start(etcd.client_port()).await;
        let wc = client(&proxy.url("http"), Duration::from_secs(2)).await;
        let ws = session(&wc, Duration::from_secs(10)).await;
        let wm = Mutex::new(&ws, &name).unwrap();
        let waiter = tokio::spawn(async move {
            let g = wm.lock().await;
            (Instant::now(), g)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 0..20 {
            direct
                .store()
                .put(format!("compact-noise/{i}").as_bytes(), b"x", 0)
                .await
                .unwrap();
        }
        let rev = direct
            .store()
            .put(b"compact-noise/last", b"x", 0)
            .await
            .unwrap();
        direct.store().compact(rev).await.unwrap();
        proxy.reset_all();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished());
        let released = Instant::now();
        g.unlock().await.unwrap();
        let (granted, g2) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter hung after compaction")
            .unwrap();
        handover.push(granted - released);
        g2.unwrap().unlock().await.unwrap();
        hs.close().await.unwrap();
        ws.close().await.unwrap();
    }
    report(
        "15",
        "etcd",
        "compacted + reset waiter: release → grant",
        &handover,
    );
}

// ---------------------------------------------------------------------------------------
// Row 16: election split brain

/// Row 16 on one etcd node, each candidate through its own proxy: see
/// [`scenarios::election_split_brain`].
async fn election_split_brain(how: Depose) {
    let etcd = EtcdServer::start_async().await;
    scenarios::election_split_brain(
        &target(&etcd.endpoint(), "etcd"),
        how,
        Some(etcd.client_port()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row16_election_revoke() {
    election_split_brain(Depose::Revoke).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row16_election_pause() {
    election_split_brain(Depose::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row16_election_partition() {
    election_split_brain(Depose::Partition).await;
}

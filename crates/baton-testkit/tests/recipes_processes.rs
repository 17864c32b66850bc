//! Recipes across separate OS processes, against a real etcd: six processes sharing two
//! semaphore permits, a holder killed with `kill -9`, and a shared value's watch across a
//! restart of etcd itself.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use baton::{Client, Semaphore, Session, SharedValue};
use baton_testkit::EtcdServer;
use futures::StreamExt;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

fn worker(endpoint: &str, name: &str, permits: u32, ttl_secs: u64, mode: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sem-worker"));
    cmd.args([endpoint, name, &permits.to_string(), &ttl_secs.to_string()])
        .args(mode)
        .kill_on_drop(true);
    cmd
}

/// The largest number of intervals that overlap at any instant. An interval ending at the
/// instant another starts does not overlap it.
fn most_overlapping(intervals: &[(u128, u128)]) -> usize {
    let mut edges: Vec<(u128, i32)> = intervals
        .iter()
        .flat_map(|&(start, end)| [(start, 1), (end, -1)])
        .collect();
    edges.sort_unstable(); // at one instant, ends (-1) sort before starts (+1)
    let (mut now, mut most) = (0_i32, 0_i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    usize::try_from(most).unwrap()
}

/// Six processes, two permits, four rounds each: never more than two holders at once,
/// and both permits in use at some point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_processes_share_two_permits() {
    const PROCESSES: usize = 6;
    const ROUNDS: usize = 4;
    let etcd = EtcdServer::start_async().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("holds");
    let log_arg = log.display().to_string();
    let rounds = ROUNDS.to_string();
    let mut workers: Vec<Child> = (0..PROCESSES)
        .map(|_| {
            worker(
                &etcd.endpoint(),
                "procs/sem",
                2,
                10,
                &["rounds", &rounds, &log_arg],
            )
            .spawn()
            .unwrap()
        })
        .collect();
    for w in &mut workers {
        let status = tokio::time::timeout(Duration::from_secs(60), w.wait())
            .await
            .expect("a worker hung")
            .unwrap();
        assert!(status.success(), "a worker failed: {status}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let mut pids = std::collections::HashSet::new();
    let intervals: Vec<(u128, u128)> = text
        .lines()
        .map(|line| {
            let mut parts = line.split(' ');
            pids.insert(parts.next().unwrap().to_string());
            let start = parts.next().unwrap().parse().unwrap();
            let end = parts.next().unwrap().parse().unwrap();
            (start, end)
        })
        .collect();
    assert_eq!(intervals.len(), PROCESSES * ROUNDS);
    assert_eq!(pids.len(), PROCESSES);
    let most = most_overlapping(&intervals);
    eprintln!("at most {most} holders at once");
    assert!(most <= 2, "{most} processes held 2 permits at once");
    assert_eq!(most, 2, "the second permit was never used");
    let client = Client::connect(&etcd.endpoint()).await.unwrap();
    let left = client
        .store()
        .range(baton::store::Range::prefix("procs/sem/"))
        .await
        .unwrap();
    assert!(left.kvs.is_empty(), "keys left behind: {:?}", left.kvs);
}

/// Two holder processes take both permits; one is killed with `kill -9`. Its permit goes
/// to the waiter within the TTL + 1 s; the other holder keeps its permit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_holder_frees_its_permit_within_ttl() {
    const TTL: u64 = 2;
    let etcd = EtcdServer::start_async().await;
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut child = worker(&etcd.endpoint(), "procs/sem-kill", 2, TTL, &["hold"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("a holder did not get its permit")
            .unwrap()
            .unwrap();
        let rev: i64 = line.strip_prefix("holding ").unwrap().parse().unwrap();
        holders.push((child, rev, lines));
    }

    let client = Client::connect(&etcd.endpoint()).await.unwrap();
    let session = Session::builder(&client)
        .with_ttl(Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    let sem = Semaphore::new(&session, "procs/sem-kill", 2).unwrap();
    let waiting = tokio::spawn(async move { sem.acquire().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a third permit was granted");

    let (mut killed, _, _) = holders.remove(0);
    killed.start_kill().unwrap();
    killed.wait().await.unwrap();
    let since = Instant::now();
    let permit = tokio::time::timeout(Duration::from_secs(TTL + 3), waiting)
        .await
        .expect("the killed holder's permit was never freed")
        .unwrap()
        .unwrap();
    let took = since.elapsed();
    eprintln!("permit freed {took:?} after kill -9");
    assert!(took <= Duration::from_secs(TTL + 1), "freed after {took:?}");

    // The surviving holder still holds: its key is there, and it did not exit.
    let (mut survivor, survivor_rev, _lines) = holders.remove(0);
    assert!(
        survivor.try_wait().unwrap().is_none(),
        "the survivor exited"
    );
    let keys = client
        .store()
        .range(baton::store::Range::prefix("procs/sem-kill/"))
        .await
        .unwrap();
    let revs: Vec<i64> = keys.kvs.iter().map(|kv| kv.create_revision).collect();
    assert!(revs.contains(&survivor_rev), "{revs:?}");
    assert!(revs.contains(&permit.create_revision()), "{revs:?}");
    assert_eq!(revs.len(), 2);
    permit.release().await.unwrap();
    survivor.start_kill().unwrap();
}

/// etcd is killed and restarted under a shared value's watch; values written after the
/// restart reach the watcher, the latest one at least (the stream resyncs by reading).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_value_watch_survives_an_etcd_restart() {
    let mut etcd = EtcdServer::start_async().await;
    let client = Client::builder(&etcd.endpoint())
        .with_request_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let value = SharedValue::new(&client, "restart/config").unwrap();
    let mut changes = value.watch();
    value.set("before").await.unwrap();
    let mut seen = Vec::new();
    while seen.last().map(Vec::as_slice) != Some(&b"before"[..]) {
        let next = tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .expect("watch hung")
            .unwrap();
        seen.push(next.map(|v| v.value).unwrap_or_default());
    }
    let etcd = tokio::task::spawn_blocking(move || {
        etcd.restart();
        etcd
    })
    .await
    .unwrap();
    for v in ["after-1", "after-2"] {
        let started = Instant::now();
        while let Err(e) = value.set(v).await {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no write after restart: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, changes.next())
            .await
            .expect("the watch never caught up after the restart")
            .unwrap();
        if next.is_some_and(|v| v.value == b"after-2") {
            break;
        }
    }
    drop(etcd);
}

//! `baton lock NAME -- CMD` on Redis: the guardian (the process that ends CMD when `baton`
//! dies or stops) works from the lock's real local deadline.
//!
//! Before 863e021 Redis guards gave no `Guard::deadline()`, and `baton` told the guardian
//! "a third of the TTL from now" at each check that found the hold alive: a holder cut off
//! from Redis and then killed (or stopped) kept its CMD running past the key's expiry,
//! beside the next holder's (~1.4 s at TTL 6 s), and a healthy `baton` stopped for less than
//! the TTL had its CMD SIGKILLed while the key was still its own (exit 137, no message).
//! Found by a second-look review of the guardian fixes.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::process::Command;
use std::time::Duration;

use baton_testkit::oracle::mono_now;
use baton_testkit::proxy::{Fault, FaultProxy};
use baton_testkit::scenarios::since;
use baton_testkit::worker::{running, WorkerProc};
use baton_testkit::RedisServer;

fn baton(name: &str, endpoint: &str, args: &[&str]) -> WorkerProc {
    let mut command = Command::new(env!("CARGO_BIN_EXE_baton"));
    command
        .env_remove("RUST_LOG")
        .env_remove("BATON_ENDPOINTS")
        .arg("--endpoints")
        .arg(endpoint)
        .args(args);
    WorkerProc::spawn_command(name, command)
}

/// The key's remaining time to live, in milliseconds.
fn pttl(redis: &RedisServer, key: &str) -> i64 {
    redis
        .command(&["PTTL", key], Duration::from_secs(2))
        .unwrap()
        .trim_start_matches(':')
        .parse()
        .unwrap()
}

/// When the holder next extends `key` (its time to live jumps up).
async fn next_extend(redis: &RedisServer, key: &str) -> u64 {
    let mut last = pttl(redis, key);
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = pttl(redis, key);
        if now > last + 200 {
            return mono_now();
        }
        last = now;
    }
}

/// Holder A (through a proxy, TTL 6 s, a CMD that ignores SIGTERM) is cut off just after an
/// extend; B waits on Redis directly; 0.4 s before A's key expires, A's `baton` is killed
/// (`kill`) or stopped. A's CMD must be gone before B's starts.
async fn cut_off_then(kill: bool) {
    let redis = RedisServer::start_async().await;
    let proxy = FaultProxy::start(redis.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let name = "guardian-cut-off";
    let a_script = format!(
        r#"trap '' TERM; echo "start $$"; while :; do echo A >> '{}'; sleep 0.05; done"#,
        log.display()
    );
    let b_script = format!(
        r#"echo "start $$"; for i in $(seq 20); do echo B >> '{}'; sleep 0.1; done"#,
        log.display()
    );
    let through_proxy = format!("redis://{}", proxy.addr());
    let mut a = baton(
        "a",
        &through_proxy,
        &["lock", name, "--ttl", "6s", "--", "sh", "-c", &a_script],
    );
    let line = a
        .line_starting("start", Duration::from_secs(15))
        .await
        .unwrap();
    let cmd_a: u32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let extended = next_extend(&redis, name).await;
    tokio::time::sleep(Duration::from_millis(1800)).await;
    proxy.set_both(Fault::Blackhole);
    let mut b = baton(
        "b",
        &redis.url(),
        &["lock", name, "--ttl", "6s", "--", "sh", "-c", &b_script],
    );
    tokio::time::sleep(Duration::from_millis(5600).saturating_sub(since(extended, mono_now())))
        .await;
    let acted = if kill { a.kill() } else { a.stop() };
    let mut gone = None;
    for _ in 0..2000 {
        if !running(cmd_a) {
            gone = Some(since(acted, mono_now()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.line_starting("start", Duration::from_secs(15)).await;
    let _ = b.wait(Duration::from_secs(10)).await;
    if !kill {
        a.cont();
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let first_b = text.find('B').expect("B never ran");
    let overlap = text[first_b..].matches('A').count();
    eprintln!("A's CMD gone {gone:?} after; A's lines after B's first: {overlap}");
    assert_eq!(overlap, 0, "A's CMD ran beside B's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_cut_off_holder_never_overlaps_the_next() {
    cut_off_then(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_a_cut_off_holder_never_overlaps_the_next() {
    cut_off_then(false).await;
}

/// `baton` stopped for half its TTL, Redis reachable: the key stays its own, so CMD must
/// not be killed, and `baton` exits with CMD's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_sigstop_does_not_kill_cmd_while_the_lock_is_held() {
    let redis = RedisServer::start_async().await;
    let name = "guardian-short-stop";
    let mut a = baton(
        "a",
        &redis.url(),
        &[
            "lock",
            name,
            "--ttl",
            "9s",
            "--",
            "sh",
            "-c",
            r#"echo "start $$"; sleep 7; echo done"#,
        ],
    );
    let line = a
        .line_starting("start", Duration::from_secs(15))
        .await
        .unwrap();
    let cmd: u32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = a.stop();
    let mut killed = None;
    while since(stopped, mono_now()) < Duration::from_millis(4500) {
        if killed.is_none() && !running(cmd) {
            killed = Some((since(stopped, mono_now()), pttl(&redis, name)));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.cont();
    let status = a.wait(Duration::from_secs(10)).await.unwrap();
    assert!(
        killed.is_none(),
        "CMD SIGKILLed while the key was ours (after, key PTTL ms): {killed:?}"
    );
    assert_eq!(status.code(), Some(0), "stderr: {}", a.stderr());
}

//! Fault scenarios shared by the fault suites of every backend (`tests/faults_*.rs`): the
//! same injection and the same checks on etcd, one Redis, and Redlock.
//!
//! Workers are `fault-worker` processes (the test passes the binary's path, which only the
//! test knows: `env!("CARGO_BIN_EXE_fault-worker")`). Every check goes through the
//! [`Oracle`]. Each scenario makes [`runs`] runs and prints its figures ([`report`]).
//!
//! The tests assert the bounds of the README and RELIABILITY.md; the figures are what
//! docs/reliability.md records.

#![allow(clippy::panic, clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::oracle::{mono_now, report, report_count, runs, Oracle};
use crate::worker::WorkerProc;

/// What kind of backend a [`Target`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// etcd (or the embedded store): revisioned, fenced, guarded transactions.
    Store,
    /// One Redis server: fenced by a counter while it keeps its data.
    Redis,
    /// Redlock: no fencing token.
    Redlock,
}

/// A backend under test, and the worker binary to run against it.
#[derive(Clone, Debug)]
pub struct Target {
    /// The `fault-worker` binary.
    pub worker_bin: PathBuf,
    /// The URL the workers connect to.
    pub endpoints: String,
    /// The name the figures use (`etcd`, `etcd×3`, `redis`, `redlock×5`).
    pub label: String,
    /// The kind of backend.
    pub kind: Kind,
}

impl Target {
    pub fn new(worker_bin: &str, endpoints: impl Into<String>, label: &str, kind: Kind) -> Self {
        Target {
            worker_bin: PathBuf::from(worker_bin),
            endpoints: endpoints.into(),
            label: label.to_string(),
            kind,
        }
    }

    /// True if grants carry fencing tokens.
    pub fn fenced(&self) -> bool {
        self.kind != Kind::Redlock
    }

    /// A fault-worker process named `name` (see `src/bin/fault-worker.rs` for `args`).
    pub fn worker(&self, name: &str, oracle: &Oracle, args: &[&str]) -> WorkerProc {
        self.worker_at(&self.endpoints, name, oracle, args)
    }

    /// A fault-worker connecting to `endpoints` (a proxy, say) instead.
    pub fn worker_at(
        &self,
        endpoints: &str,
        name: &str,
        oracle: &Oracle,
        args: &[&str],
    ) -> WorkerProc {
        let mut all = vec![
            endpoints.to_string(),
            oracle.addr().to_string(),
            name.to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        WorkerProc::spawn(name, &self.worker_bin, all)
    }

    /// True if lock `lock` left nothing behind: no key under its prefix (store), or it can
    /// be taken at once (Redis).
    pub async fn nothing_left(&self, lock: &str) -> bool {
        match self.kind {
            Kind::Store => {
                let c = baton::Client::connect(&self.endpoints).await.unwrap();
                c.store()
                    .range(baton::store::Range::prefix(format!("{lock}/")))
                    .await
                    .unwrap()
                    .kvs
                    .is_empty()
            }
            Kind::Redis | Kind::Redlock => {
                let c = baton::Coordinator::builder(&self.endpoints)
                    .with_ttl(Duration::from_secs(5))
                    .connect()
                    .await
                    .unwrap();
                let ok = match c.lock(lock).unwrap().try_lock().await {
                    Ok(g) => {
                        let _ = g.release().await;
                        true
                    }
                    Err(_) => false,
                };
                let _ = c.close().await;
                ok
            }
        }
    }
}

/// The next line of `w` starting with `prefix`, or a failure that shows its stderr.
pub async fn expect(w: &mut WorkerProc, prefix: &str, within: Duration) -> String {
    match w.line_starting(prefix, within).await {
        Some(line) => line,
        None => panic!(
            "worker {} printed no {prefix:?} line within {within:?}; stderr:\n{}",
            w.name(),
            w.stderr()
        ),
    }
}

/// The token and time of an `acquired TOKEN T` line.
pub fn acquired(line: &str) -> (i64, u64) {
    let mut p = line.split_whitespace().skip(1);
    (
        p.next().unwrap().parse().unwrap(),
        p.next().unwrap().parse().unwrap(),
    )
}

/// The time of a `lost T REASON` line.
pub fn lost_at(line: &str) -> u64 {
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `until - t` for two `CLOCK_MONOTONIC` times (zero if `until` is earlier).
pub fn since(t: u64, until: u64) -> Duration {
    Duration::from_nanos(until.saturating_sub(t))
}

/// Row 1. 20 worker processes × 5 rounds on one fenced counter: no rejected write, the
/// counter equals the acknowledged increments, tokens increase, holds never overlap, and
/// nothing is left behind.
pub async fn baseline(t: &Target) {
    let mut took = Vec::new();
    let mut rejected = Vec::new();
    for run in 0..runs(1) {
        let oracle = Oracle::start().await;
        let lock = format!("baseline/{run}");
        let started = Instant::now();
        let mut ws: Vec<WorkerProc> = (0..20)
            .map(|i| {
                t.worker(
                    &format!("w{i}"),
                    &oracle,
                    &["--lock", &lock, "--rounds", "5", "--ttl-ms", "5000"],
                )
            })
            .collect();
        for w in &mut ws {
            let done = expect(w, "done", Duration::from_secs(120)).await;
            assert_eq!(
                done,
                "done acks=5 rejects=0 lost=0 errors=0",
                "{}",
                w.stderr()
            );
        }
        took.push(started.elapsed());
        let h = oracle.history();
        rejected.push(h.rejected(None) as u64);
        assert_eq!(h.rejected(None), 0);
        assert_eq!(oracle.value(&lock), 100);
        h.check_all(&oracle, &[]).unwrap();
        assert_eq!(h.holds().len(), 100);
        assert!(t.nothing_left(&lock).await, "{lock} left keys behind");
    }
    report(
        "1",
        &t.label,
        "100 grants to 20 processes, wall time",
        &took,
    );
    report_count("1", &t.label, "rejected writes", &rejected);
}

/// Row 2. The holder is SIGSTOPped for 2×TTL (TTL 2 s) while it writes every 100 ms; a
/// waiter gets the lock only after the holder's local deadline (the holds, each ended at
/// min(released, lost, deadline), never overlap), with a greater token. On SIGCONT the
/// holder's `lost()` fires at once; its fenced writes are rejected (where there are tokens)
/// and so is its guarded txn (store backends).
pub async fn paused_holder(t: &Target) {
    let ttl = Duration::from_secs(2);
    let (mut grant, mut lost_after, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
    let mut stale_accepted = Vec::new();
    let txn: &[&str] = if t.kind == Kind::Store {
        &["--txn"]
    } else {
        &[]
    };
    for run in 0..runs(1) {
        let oracle = Oracle::start().await;
        let lock = format!("paused/{run}");
        let mut args = vec![
            "--lock",
            &lock,
            "--ttl-ms",
            "2000",
            "--writes",
            "100000",
            "--write-every-ms",
            "100",
            "--probe-after-loss",
        ];
        args.extend_from_slice(txn);
        let mut a = t.worker("a", &oracle, &args);
        let (token_a, _) = acquired(&expect(&mut a, "acquired", Duration::from_secs(15)).await);
        expect(&mut a, "write ok", Duration::from_secs(5)).await;
        let mut args = vec!["--lock", &lock, "--ttl-ms", "2000", "--writes", "3"];
        args.extend_from_slice(txn);
        let mut b = t.worker("b", &oracle, &args);
        expect(&mut b, "ready", Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stopped = a.stop();
        let line = expect(&mut b, "acquired", 2 * ttl + Duration::from_secs(3)).await;
        let (token_b, t_b) = acquired(&line);
        if t.fenced() {
            assert!(token_b > token_a, "token {token_b} after {token_a}");
        }
        tokio::time::sleep((2 * ttl).saturating_sub(since(stopped, mono_now()))).await;
        let resumed = a.cont();
        let lost = expect(&mut a, "lost", Duration::from_secs(5)).await;
        let after = since(resumed, lost_at(&lost));
        assert!(
            after < Duration::from_secs(1),
            "lost() {after:?} after SIGCONT"
        );
        lost_after.push(after);
        let stale = expect(&mut a, "stale write", Duration::from_secs(5)).await;
        if t.fenced() {
            assert_eq!(stale, "stale write rejected");
        }
        stale_accepted.push(u64::from(stale == "stale write accepted"));
        if t.kind == Kind::Store {
            assert_eq!(
                expect(&mut a, "stale txn", Duration::from_secs(5)).await,
                "stale txn rejected"
            );
        }
        expect(&mut a, "done", Duration::from_secs(10)).await;
        let done_b = expect(&mut b, "done", Duration::from_secs(10)).await;
        assert!(done_b.starts_with("done acks=3 rejects=0"), "{done_b}");
        let h = oracle.history();
        // Deadline-bounded holds never overlap, even the paused holder's.
        h.check_all(&oracle, &[]).unwrap();
        let end_a = h.holds()[0].end.unwrap();
        assert!(t_b >= end_a, "b acquired before a's deadline");
        grant.push(since(stopped, t_b));
        rejected.push(h.rejected_by_worker().get("a").copied().unwrap_or(0) as u64);
        assert_eq!(h.rejected_by_worker().get("b"), None);
    }
    let l = &t.label;
    report("2", l, "SIGSTOP of holder → next grant (TTL 2 s)", &grant);
    report("2", l, "SIGCONT → lost() fired", &lost_after);
    report_count("2", l, "paused holder's writes rejected", &rejected);
    report_count(
        "2",
        l,
        "paused holder's stale write accepted",
        &stale_accepted,
    );
}

/// Row 6. `kill -9` of the holding process: the next waiter is granted within TTL + 1 s
/// (TTL 2 s), and nothing is left behind.
pub async fn crashed_holder(t: &Target) {
    let ttl = Duration::from_secs(2);
    let mut grant = Vec::new();
    for run in 0..runs(2) {
        let oracle = Oracle::start().await;
        let lock = format!("crash/{run}");
        let mut a = t.worker(
            "a",
            &oracle,
            &["--lock", &lock, "--ttl-ms", "2000", "--keep"],
        );
        expect(&mut a, "keeping", Duration::from_secs(15)).await;
        let mut b = t.worker("b", &oracle, &["--lock", &lock, "--ttl-ms", "2000"]);
        expect(&mut b, "ready", Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let killed = a.kill();
        oracle.end_holds("a", killed, "killed");
        let (_, t_b) = acquired(&expect(&mut b, "acquired", ttl + Duration::from_secs(3)).await);
        let took = since(killed, t_b);
        assert!(
            took <= ttl + Duration::from_secs(1),
            "next grant {took:?} after kill -9"
        );
        grant.push(took);
        expect(&mut b, "done", Duration::from_secs(10)).await;
        oracle.history().check_all(&oracle, &[]).unwrap();
        assert!(t.nothing_left(&lock).await, "{lock} left keys behind");
    }
    report(
        "6",
        &t.label,
        "kill -9 of holder → next grant (TTL 2 s)",
        &grant,
    );
}

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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::oracle::{mono_now, report, report_count, runs, Oracle, RecordKind};
use crate::proxy::{Fault, FaultProxy};
use crate::redis::redis_command;
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

impl Target {
    /// The scheme of a URL that points a worker at one proxied server of this backend.
    fn scheme(&self) -> &'static str {
        match self.kind {
            Kind::Store => "http",
            Kind::Redis | Kind::Redlock => "redis",
        }
    }

    /// Take the leadership of election `name` away from outside, as an operator would:
    /// revoke the leader's lease (store), or delete the leader's key on every server where
    /// it still holds the leader's token (Redis, Redlock; the key is the election's name,
    /// the workers use no prefix). The leader learns it later, by its keep-alive or its
    /// watchdog.
    ///
    /// On Redlock the deletion compares the token, as etcd's revoke names one lease: the
    /// servers are visited one after another, and a candidate may take the key on a quorum
    /// (servers already visited, and servers the old leader never held) before the sweep is
    /// over. A blind `DEL` would then delete part of that new leader's keys too, and a second
    /// candidate could take a quorum before the first one's watchdog notices (at its next
    /// extend): two leaders at once, as after any deletion of a holder's keys. That is the
    /// row's fault applied twice, not once.
    ///
    /// # Panics
    ///
    /// If there is no leader, or the key was deleted on fewer servers than a quorum.
    pub async fn depose_leader(&self, name: &str) {
        match self.kind {
            Kind::Store => {
                let c = baton::Client::connect(&self.endpoints).await.unwrap();
                let leader = baton::Election::leader_with(&c, name).await.unwrap();
                c.store().lease_revoke(leader.lease).await.unwrap();
            }
            Kind::Redis | Kind::Redlock => {
                let addrs = self.redis_addrs();
                let n = addrs.len();
                let key = name.to_string();
                let deleted = tokio::task::spawn_blocking(move || {
                    let timeout = Duration::from_secs(1);
                    // The leader's token: the value a quorum of servers holds.
                    let values: Vec<String> = addrs
                        .iter()
                        .filter_map(|a| {
                            redis_command(*a, &["EVAL", GET_AS_STATUS, "1", &key], timeout)
                        })
                        .filter_map(|reply| reply.strip_prefix('+').map(str::to_string))
                        .filter(|v| !v.is_empty())
                        .collect();
                    let token = values
                        .iter()
                        .find(|v| values.iter().filter(|o| o == v).count() > n / 2)
                        .unwrap_or_else(|| panic!("no token of {key} on a quorum: {values:?}"))
                        .clone();
                    addrs
                        .iter()
                        .filter(|a| {
                            redis_command(
                                **a,
                                &["EVAL", DELETE_IF_TOKEN, "1", &key, &token],
                                timeout,
                            )
                            .as_deref()
                                == Some(":1")
                        })
                        .count()
                })
                .await
                .unwrap();
                assert!(
                    deleted > n / 2,
                    "the leader key {name} was deleted on {deleted} of {n} servers"
                );
            }
        }
    }

    /// The servers of a `redis://HOST:PORT` or `redlock://HOST:PORT,…` URL.
    fn redis_addrs(&self) -> Vec<SocketAddr> {
        let rest = self
            .endpoints
            .split_once("://")
            .map_or(self.endpoints.as_str(), |(_, r)| r);
        rest.split(',')
            .map(|a| a.trim_end_matches('/').parse().unwrap())
            .collect()
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
///
/// Each write is a read-modify-write of the oracle's counter. Where there are tokens, the
/// pause lands wherever it lands, in the middle of a write too: the stale half is rejected.
/// Redlock has none, so a write torn by the pause (its read before, its write after another
/// holder's increments) is accepted and loses those increments: the weakness its row
/// documents, shown by the deliberate stale write after the loss. On Redlock the pause is
/// therefore sent right after a write, while the holder sleeps before its next (found on a
/// loaded machine, where a write takes long enough to be torn now and then).
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
        if !t.fenced() {
            between_writes(&mut a).await;
        }
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

/// Return just after `w`, which writes every 100 ms, has printed a `write ok` line that is
/// not one read late: one that came at least 20 ms after the lines printed before were
/// drained (a line already on its way when they were is followed by another).
async fn between_writes(w: &mut WorkerProc) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        w.lines_so_far();
        let drained = tokio::time::Instant::now();
        let left = deadline.saturating_duration_since(drained);
        expect(w, "write ok", left).await;
        if drained.elapsed() >= Duration::from_millis(20) {
            return;
        }
    }
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

/// A Lua script: the value of `KEYS[1]` as a status reply (`+VALUE`; `+` if none).
const GET_AS_STATUS: &str = "return {ok = redis.call('GET', KEYS[1]) or ''}";

/// A Lua script: delete `KEYS[1]` if it holds `ARGV[1]` (`:1`), else `:0`.
const DELETE_IF_TOKEN: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// How row 16 takes the leadership away from the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depose {
    /// From outside, as an operator would ([`Target::depose_leader`]): the lease revoked
    /// (store), the leader's key deleted on every server that holds its token (Redis,
    /// Redlock).
    Revoke,
    /// The leader process SIGSTOPped for 2×TTL.
    Pause,
    /// The leader partitioned from its server (its own proxy blackholes both ways) for
    /// 2×TTL.
    Partition,
}

impl Depose {
    /// The name the figures and the election use.
    pub fn name(self, kind: Kind) -> &'static str {
        match (self, kind) {
            (Depose::Revoke, Kind::Store) => "revoke",
            (Depose::Revoke, _) => "DEL",
            (Depose::Pause, _) => "pause",
            (Depose::Partition, _) => "partition",
        }
    }
}

/// Row 16, election split brain. Three candidate processes (TTL 2 s) campaign, and the
/// leader writes with its token every 100 ms; then the leader is deposed (`how`). Checked:
///
/// - exactly one new leader, never the old one (after a revoke, within 2 s);
/// - the old leader's `lost()` fires, by its local deadline at the latest (within
///   TTL + 0.5 s of a revoke, TTL + 1 s of a partition), or within 1 s of SIGCONT (pause);
///   it never leads again;
/// - the leaderships `[elected, min(resigned, lost, deadline)]` never overlap (a revoked
///   leader's ends at the revoke) and accepted tokens never decrease;
/// - with fencing tokens, a paused leader's write after SIGCONT is rejected and the counter
///   equals the acknowledged increments; on stores, the old leader's guarded txn is
///   rejected. Redlock has no token: the old leader's writes accepted after the new grant
///   are counted (a figure), since nothing can refuse them, and the counter is not checked.
///
/// `proxied`: the port of the one server that each candidate reaches through its own
/// [`FaultProxy`] (required for [`Depose::Partition`]); `None`: candidates connect to
/// [`Target::endpoints`] directly.
pub async fn election_split_brain(t: &Target, how: Depose, proxied: Option<u16>) {
    assert!(
        how != Depose::Partition || proxied.is_some(),
        "a partition needs proxies"
    );
    let ttl = Duration::from_secs(2);
    let label = how.name(t.kind);
    let (mut next, mut lost_after, mut late_writes) = (Vec::new(), Vec::new(), Vec::new());
    let (mut stale_accepted, mut believed_writes) = (Vec::new(), Vec::new());
    for run in 0..runs(1) {
        let oracle = Oracle::start().await;
        let name = format!("elect/{label}/{run}");
        let mut proxies = Vec::new();
        let mut cands = Vec::new();
        for i in 0..3 {
            let id = format!("c{i}");
            let mut args = vec![
                "--lock",
                &name,
                "--elect",
                &id,
                "--ttl-ms",
                "2000",
                "--request-timeout-ms",
                "1000",
                "--writes",
                "100000",
                "--write-every-ms",
                "100",
                "--probe-after-loss",
            ];
            if t.kind == Kind::Store {
                args.push("--txn");
            }
            let w = match proxied {
                Some(port) => {
                    let p = FaultProxy::start(port).await;
                    let w = t.worker_at(&p.url(t.scheme()), &id, &oracle, &args);
                    proxies.push(p);
                    w
                }
                None => t.worker(&id, &oracle, &args),
            };
            cands.push(w);
        }
        // Who leads: the one hold the oracle has heard of.
        let started = Instant::now();
        let holds = loop {
            let holds = oracle.history().holds();
            if !holds.is_empty() {
                break holds;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "no leader; stderr of c0:\n{}",
                cands[0].stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(holds.len(), 1, "{holds:?}");
        let old_name = holds[0].worker.clone();
        let who: usize = old_name[1..].parse().unwrap();
        expect(&mut cands[who], "acquired", Duration::from_secs(10)).await;
        expect(&mut cands[who], "write ok", Duration::from_secs(5)).await;
        let t_fault = mono_now();
        match how {
            Depose::Revoke => {
                t.depose_leader(&name).await;
                // From now on the old leader holds nothing, though it learns so later (a
                // round trip, or its watchdog's next extend): its leadership ends here.
                oracle.end_holds(&old_name, t_fault, "revoked");
            }
            Depose::Pause => {
                cands[who].stop();
            }
            Depose::Partition => proxies[who].set_both(Fault::Blackhole),
        }
        // Exactly one new leader.
        let h = loop {
            let h = oracle.history();
            if h.holds().iter().any(|x| x.start > t_fault) {
                break h;
            }
            assert!(
                since(t_fault, mono_now()) < 3 * ttl + Duration::from_secs(3),
                "no new leader"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let took = h.next_grant_after(&name, t_fault).unwrap();
        next.push(took);
        if how == Depose::Revoke {
            assert!(
                took < Duration::from_secs(2),
                "new leader {took:?} after the {label}"
            );
        }
        tokio::time::sleep(if how == Depose::Revoke {
            Duration::from_millis(500)
        } else {
            2 * ttl
        })
        .await;
        let resumed = match how {
            Depose::Pause => Some(cands[who].cont()),
            Depose::Partition => {
                proxies[who].heal();
                None
            }
            Depose::Revoke => None,
        };
        let old = &mut cands[who];
        let t_lost = lost_at(&expect(old, "lost", Duration::from_secs(5)).await);
        let after = match resumed {
            Some(resumed) => {
                let after = since(resumed, t_lost);
                assert!(
                    after < Duration::from_secs(1),
                    "lost() {after:?} after SIGCONT"
                );
                after
            }
            None => {
                // By the local deadline at the latest: it was at most one TTL away (the
                // slack is the wake-up; a partitioned etcd session's deadline may come a
                // little later than a Redis hold's, its keep-alive being a round trip).
                let slack = if how == Depose::Partition {
                    Duration::from_secs(1)
                } else {
                    Duration::from_millis(500)
                };
                let after = since(t_fault, t_lost);
                assert!(after < ttl + slack, "lost() {after:?} after the {label}");
                after
            }
        };
        lost_after.push(after);
        // A paused leader can act only after the new one has written: with tokens, its
        // write is rejected. A revoked or partitioned one stops at once (revoke) or at its
        // local deadline (partition, and Redis's DEL: the watchdog's next extend), which
        // may be before the new leader's first write: its write is then accepted, and
        // ordered before the new term (check_tokens below).
        let stale = expect(old, "stale write", Duration::from_secs(5)).await;
        if how == Depose::Pause && t.fenced() {
            assert_eq!(stale, "stale write rejected");
        }
        stale_accepted.push(u64::from(stale == "stale write accepted"));
        if t.kind == Kind::Store {
            assert_eq!(
                expect(old, "stale txn", Duration::from_secs(5)).await,
                "stale txn rejected"
            );
        }
        expect(old, "done", Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut said = String::new();
        for w in &mut cands {
            let lines = w.lines_so_far();
            let t = w.kill();
            oracle.end_holds(w.name(), t, "killed");
            said += &format!("{}: {lines:?}\n{}\n", w.name(), w.stderr());
        }
        let h = oracle.history();
        let checked = if t.fenced() {
            h.check_all(&oracle, &[])
        } else {
            // Without tokens, a stale leader's writes may interleave with the new
            // leader's: the counter is not a property Redlock keeps.
            h.check_tokens().and_then(|()| h.check_intervals(&[]))
        };
        if let Err(e) = checked {
            panic!(
                "{e}\nold leader {old_name}, fault at {t_fault}; holds {:?}\n{said}",
                h.holds()
            );
        }
        let leaders: Vec<_> = h
            .holds()
            .into_iter()
            .filter(|x| x.start > t_fault)
            .collect();
        assert_eq!(leaders.len(), 1, "{leaders:?}");
        assert_ne!(leaders[0].worker, old_name);
        let new_start = leaders[0].start;
        let late = h
            .records
            .iter()
            .filter(|r| {
                r.worker == old_name
                    && r.at > new_start
                    && matches!(r.kind, RecordKind::Write { accepted: true, .. })
            })
            .count();
        late_writes.push(late as u64);
        // Of those, the ordinary writes: made before the old leader reported the loss, so
        // while it believed it still led (the stale probe comes after the report).
        let believed = h
            .records
            .iter()
            .filter(|r| {
                r.worker == old_name
                    && r.at > new_start
                    && r.at < t_lost
                    && matches!(r.kind, RecordKind::Write { accepted: true, .. })
            })
            .count();
        believed_writes.push(believed as u64);
    }
    let l = &t.label;
    report(
        "16",
        l,
        &format!("election, leader {label}: next leader after"),
        &next,
    );
    let from = if how == Depose::Pause {
        "SIGCONT"
    } else {
        label
    };
    report(
        "16",
        l,
        &format!("election, leader {label}: {from} → old leader's lost()"),
        &lost_after,
    );
    report_count(
        "16",
        l,
        &format!("election, leader {label}: old leader's writes accepted after the new grant"),
        &late_writes,
    );
    report_count(
        "16",
        l,
        &format!("election, leader {label}: old leader's stale write accepted"),
        &stale_accepted,
    );
    report_count(
        "16",
        l,
        &format!(
            "election, leader {label}: old leader's writes accepted after the new grant, before its lost()"
        ),
        &believed_writes,
    );
    println!(
        "row 16 {l} {label}: runs with a write accepted after the new grant, before lost(): {} of {} (per run: {believed_writes:?})",
        believed_writes.iter().filter(|n| **n > 0).count(),
        believed_writes.len(),
    );
}

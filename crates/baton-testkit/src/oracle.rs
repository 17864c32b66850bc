//! The fenced-resource oracle and the history checker.
//!
//! [`Oracle`] is a small TCP server on loopback, started by a test, that plays the resource
//! a lock protects. Workers — tasks of the test, or separate OS processes that the test
//! pauses and kills — talk to it through [`OracleClient`]:
//!
//! - it keeps, per lock, the highest fencing token it has seen, and one integer register
//!   (a counter the workers increment with a read-modify-write);
//! - a read or a write carries the worker's token and is **accepted only if the token is at
//!   least the highest seen** (an accepted one raises the highest); otherwise it is rejected
//!   and changes nothing;
//! - it logs every accept and reject, and every hold a worker reports (acquired, and ended
//!   by a release, a loss or the local deadline), with `CLOCK_MONOTONIC` timestamps
//!   ([`mono_now`]), which are comparable across processes on one machine.
//!
//! Fencing reads too (not only writes) is what makes a read-modify-write safe: once a newer
//! holder has read, an older holder can neither read nor write, so no increment is lost even
//! when two holders overlap.
//!
//! [`History`] checks what the oracle logged:
//!
//! - [`History::check_tokens`]: accepted tokens never decrease, per lock;
//! - [`History::check_counter`]: the register equals the number of acknowledged increments;
//! - [`History::check_intervals`]: the hold intervals `[acquired, min(released, lost,
//!   deadline)]` of different holds never overlap, except holds of exempt workers (paused
//!   ones, which fencing covers);
//! - [`History::next_grant_after`]: liveness — how long after a fault the next grant came.
//!
//! The wire protocol is one line per request and one per reply:
//!
//! ```text
//! READ  LOCK TOKEN WORKER          -> OK VALUE | REJECT HIGHEST
//! WRITE LOCK TOKEN WORKER VALUE    -> OK       | REJECT HIGHEST
//! ACQ   LOCK TOKEN WORKER HOLD T              -> OK
//! END   LOCK TOKEN WORKER HOLD T WHY          -> OK     (WHY: released, lost, deadline, killed)
//! ```
//!
//! Names and worker ids contain no spaces. `T` is a `CLOCK_MONOTONIC` time in nanoseconds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// `CLOCK_MONOTONIC` now, in nanoseconds: the same clock in every process of this machine.
pub fn mono_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`, which is a valid timespec.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// An [`std::time::Instant`] (past or future) as a `CLOCK_MONOTONIC` time in nanoseconds.
pub fn mono_of(instant: std::time::Instant) -> u64 {
    let (now_mono, now) = (mono_now(), std::time::Instant::now());
    if instant <= now {
        now_mono.saturating_sub(duration_ns(now - instant))
    } else {
        now_mono.saturating_add(duration_ns(instant - now))
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One thing the oracle saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// When (`CLOCK_MONOTONIC`, ns), as the oracle saw it.
    pub at: u64,
    /// The lock.
    pub lock: String,
    /// The token given.
    pub token: i64,
    /// The worker.
    pub worker: String,
    /// What happened.
    pub kind: RecordKind,
}

/// What a [`Record`] records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A fenced read: accepted (returning the value) or rejected.
    Read {
        /// Whether the token was accepted.
        accepted: bool,
        /// The value returned (0 if rejected).
        value: i64,
    },
    /// A fenced write of `value`: accepted or rejected.
    Write {
        /// Whether the token was accepted.
        accepted: bool,
        /// The value written (or refused).
        value: i64,
    },
    /// A worker reports it holds the lock since `t` (its own clock reading).
    Acquired {
        /// The worker's hold number (unique per worker).
        hold: u64,
        /// When it saw the grant.
        t: u64,
    },
    /// A worker reports its hold ended at `t`: min(released, lost, deadline).
    Ended {
        /// The worker's hold number.
        hold: u64,
        /// When the hold ended.
        t: u64,
        /// released, lost, deadline, killed …
        why: String,
    },
}

#[derive(Default)]
struct State {
    highest: HashMap<String, i64>,
    value: HashMap<String, i64>,
    log: Vec<Record>,
}

impl State {
    fn handle(&mut self, line: &str) -> String {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| parts.get(i).and_then(|s| s.parse::<i64>().ok());
        let unum = |i: usize| parts.get(i).and_then(|s| s.parse::<u64>().ok());
        let (Some(cmd), Some(lock), Some(token), Some(worker)) =
            (parts.first(), parts.get(1), num(2), parts.get(3))
        else {
            return format!("ERR bad request {line:?}");
        };
        let (lock, worker) = (lock.to_string(), worker.to_string());
        let at = mono_now();
        let highest = self.highest.get(&lock).copied().unwrap_or(i64::MIN);
        let accepted = token >= highest;
        let kind = match *cmd {
            "READ" => {
                let value = if accepted {
                    self.highest.insert(lock.clone(), token);
                    self.value.get(&lock).copied().unwrap_or(0)
                } else {
                    0
                };
                RecordKind::Read { accepted, value }
            }
            "WRITE" => {
                let Some(value) = num(4) else {
                    return "ERR missing value".into();
                };
                if accepted {
                    self.highest.insert(lock.clone(), token);
                    self.value.insert(lock.clone(), value);
                }
                RecordKind::Write { accepted, value }
            }
            "ACQ" => {
                let (Some(hold), Some(t)) = (unum(4), unum(5)) else {
                    return "ERR bad ACQ".into();
                };
                RecordKind::Acquired { hold, t }
            }
            "END" => {
                let (Some(hold), Some(t), Some(why)) = (unum(4), unum(5), parts.get(6)) else {
                    return "ERR bad END".into();
                };
                RecordKind::Ended {
                    hold,
                    t,
                    why: why.to_string(),
                }
            }
            other => return format!("ERR unknown command {other}"),
        };
        let reply = match &kind {
            RecordKind::Read {
                accepted: true,
                value,
            } => format!("OK {value}"),
            RecordKind::Read { .. } | RecordKind::Write { .. } if !accepted => {
                format!("REJECT {highest}")
            }
            _ => "OK".to_string(),
        };
        self.log.push(Record {
            at,
            lock,
            token,
            worker,
            kind,
        });
        reply
    }
}

/// The fenced resource, as a TCP server on loopback. See the [module docs](self).
///
/// Dropping it stops the server.
pub struct Oracle {
    addr: SocketAddr,
    state: Arc<StdMutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Oracle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Oracle").field("addr", &self.addr).finish()
    }
}

impl Oracle {
    /// Start the oracle on a free loopback port (needs a tokio runtime).
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub async fn start() -> Oracle {
        let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await {
            Ok(l) => l,
            Err(e) => panic!("oracle: cannot bind a loopback port: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("oracle: no local address: {e}"),
        };
        let state = Arc::new(StdMutex::new(State::default()));
        let task = tokio::spawn(serve(listener, state.clone()));
        Oracle { addr, state, task }
    }

    /// The address workers connect to (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client in this process.
    ///
    /// # Panics
    ///
    /// If the oracle cannot be reached.
    pub async fn client(&self, worker: &str) -> OracleClient {
        match OracleClient::connect(self.addr, worker).await {
            Ok(c) => c,
            Err(e) => panic!("oracle: cannot connect: {e}"),
        }
    }

    /// Record that `worker`'s holds still open at `t` ended then, for reason `why`: the
    /// test knows when it sent SIGKILL (the worker cannot report it), or when an admin
    /// revoked the worker's lease (the worker learns it a round trip later). A hold's end is
    /// the earliest end reported.
    pub fn end_holds(&self, worker: &str, t: u64, why: &str) {
        let mut st = self.state();
        let history = History {
            records: st.log.clone(),
        };
        for h in history.holds() {
            if h.worker == worker && h.start <= t && h.end.is_none_or(|e| e > t) {
                st.log.push(Record {
                    at: mono_now(),
                    lock: h.lock.clone(),
                    token: h.token,
                    worker: worker.to_string(),
                    kind: RecordKind::Ended {
                        hold: h.hold,
                        t,
                        why: why.into(),
                    },
                });
            }
        }
    }

    /// The register of `lock` now.
    pub fn value(&self, lock: &str) -> i64 {
        self.state().value.get(lock).copied().unwrap_or(0)
    }

    /// The highest token seen for `lock`, if any.
    pub fn highest(&self, lock: &str) -> Option<i64> {
        self.state().highest.get(lock).copied()
    }

    /// A copy of everything logged so far.
    pub fn history(&self) -> History {
        History {
            records: self.state().log.clone(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<StdMutex<State>>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let state = state.clone();
                conns.spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let reply = state.lock().unwrap_or_else(|e| e.into_inner()).handle(&line);
                        if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// The answer to a fenced read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced<T> {
    /// Accepted.
    Ok(T),
    /// Rejected: a higher token was seen.
    Rejected {
        /// The highest token the oracle has seen.
        highest: i64,
    },
}

impl<T> Fenced<T> {
    /// True if accepted.
    pub fn is_ok(&self) -> bool {
        matches!(self, Fenced::Ok(_))
    }
}

/// A connection to an [`Oracle`], for one worker.
pub struct OracleClient {
    worker: String,
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    w: tokio::net::tcp::OwnedWriteHalf,
    holds: u64,
}

impl fmt::Debug for OracleClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OracleClient")
            .field("worker", &self.worker)
            .finish()
    }
}

impl OracleClient {
    /// Connect as `worker` (no spaces).
    pub async fn connect(addr: SocketAddr, worker: &str) -> io::Result<OracleClient> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(OracleClient {
            worker: worker.replace(char::is_whitespace, "_"),
            lines: BufReader::new(r).lines(),
            w,
            holds: 0,
        })
    }

    async fn call(&mut self, request: String) -> io::Result<String> {
        self.w.write_all(format!("{request}\n").as_bytes()).await?;
        match self.lines.next_line().await? {
            Some(line) if line.starts_with("ERR") => Err(io::Error::other(line)),
            Some(line) => Ok(line),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "oracle closed",
            )),
        }
    }

    fn fenced(reply: &str) -> io::Result<Fenced<i64>> {
        let mut parts = reply.split_whitespace();
        match (parts.next(), parts.next().map(str::parse::<i64>)) {
            (Some("OK"), Some(Ok(v))) => Ok(Fenced::Ok(v)),
            (Some("OK"), None) => Ok(Fenced::Ok(0)),
            (Some("REJECT"), Some(Ok(highest))) => Ok(Fenced::Rejected { highest }),
            _ => Err(io::Error::other(format!("bad oracle reply {reply:?}"))),
        }
    }

    /// A fenced read of `lock`'s register.
    pub async fn read(&mut self, lock: &str, token: i64) -> io::Result<Fenced<i64>> {
        let reply = self
            .call(format!("READ {lock} {token} {}", self.worker))
            .await?;
        Self::fenced(&reply)
    }

    /// A fenced write of `lock`'s register.
    pub async fn write(&mut self, lock: &str, token: i64, value: i64) -> io::Result<Fenced<()>> {
        let reply = self
            .call(format!("WRITE {lock} {token} {} {value}", self.worker))
            .await?;
        Ok(match Self::fenced(&reply)? {
            Fenced::Ok(_) => Fenced::Ok(()),
            Fenced::Rejected { highest } => Fenced::Rejected { highest },
        })
    }

    /// A fenced increment: read, then write the value plus one. `Ok(true)` if both were
    /// accepted (the increment is acknowledged).
    pub async fn increment(&mut self, lock: &str, token: i64) -> io::Result<bool> {
        let Fenced::Ok(v) = self.read(lock, token).await? else {
            return Ok(false);
        };
        Ok(self.write(lock, token, v + 1).await?.is_ok())
    }

    /// Report that this worker holds `lock` with `token` since `t` (`CLOCK_MONOTONIC` ns);
    /// returns the hold's number, for [`ended`](Self::ended).
    pub async fn acquired(&mut self, lock: &str, token: i64, t: u64) -> io::Result<u64> {
        self.holds += 1;
        let hold = self.holds;
        self.call(format!("ACQ {lock} {token} {} {hold} {t}", self.worker))
            .await?;
        Ok(hold)
    }

    /// Report that hold `hold` ended at `t` (min of released, lost and the local deadline).
    pub async fn ended(
        &mut self,
        lock: &str,
        token: i64,
        hold: u64,
        t: u64,
        why: &str,
    ) -> io::Result<()> {
        self.call(format!(
            "END {lock} {token} {} {hold} {t} {}",
            self.worker,
            why.replace(char::is_whitespace, "_")
        ))
        .await?;
        Ok(())
    }
}

/// One hold, as reported by its worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// The worker.
    pub worker: String,
    /// The lock.
    pub lock: String,
    /// Its fencing token (0 where the backend has none).
    pub token: i64,
    /// The worker's hold number.
    pub hold: u64,
    /// When the grant was seen (`CLOCK_MONOTONIC` ns).
    pub start: u64,
    /// When the hold ended, if reported.
    pub end: Option<u64>,
    /// Why it ended, if reported.
    pub why: Option<String>,
}

/// A violation the checker found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything an [`Oracle`] logged, and the checks on it. See the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct History {
    /// The records, in the order the oracle served them.
    pub records: Vec<Record>,
}

impl History {
    /// Accepted reads and writes for `lock` (`None`: every lock).
    pub fn accepted(&self, lock: Option<&str>) -> usize {
        self.count(lock, true)
    }

    /// Rejected reads and writes for `lock` (`None`: every lock).
    pub fn rejected(&self, lock: Option<&str>) -> usize {
        self.count(lock, false)
    }

    fn count(&self, lock: Option<&str>, want: bool) -> usize {
        self.records
            .iter()
            .filter(|r| lock.is_none_or(|l| r.lock == l))
            .filter(|r| match r.kind {
                RecordKind::Read { accepted, .. } | RecordKind::Write { accepted, .. } => {
                    accepted == want
                }
                _ => false,
            })
            .count()
    }

    /// Rejected reads and writes, per worker.
    pub fn rejected_by_worker(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in &self.records {
            if let RecordKind::Read {
                accepted: false, ..
            }
            | RecordKind::Write {
                accepted: false, ..
            } = r.kind
            {
                *out.entry(r.worker.clone()).or_default() += 1;
            }
        }
        out
    }

    /// Accepted writes of `lock`: the acknowledged increments, when every write is one.
    pub fn accepted_writes(&self, lock: &str) -> usize {
        self.records
            .iter()
            .filter(|r| {
                r.lock == lock && matches!(r.kind, RecordKind::Write { accepted: true, .. })
            })
            .count()
    }

    /// Every lock named in the history.
    pub fn locks(&self) -> Vec<String> {
        let set: HashSet<&str> = self.records.iter().map(|r| r.lock.as_str()).collect();
        let mut v: Vec<String> = set.into_iter().map(str::to_string).collect();
        v.sort();
        v
    }

    /// Accepted tokens never decrease, per lock.
    pub fn check_tokens(&self) -> Result<(), Violation> {
        let mut last: HashMap<&str, (i64, &str)> = HashMap::new();
        for r in &self.records {
            let accepted = matches!(
                r.kind,
                RecordKind::Read { accepted: true, .. } | RecordKind::Write { accepted: true, .. }
            );
            if !accepted {
                continue;
            }
            if let Some((t, w)) = last.get(r.lock.as_str()) {
                if r.token < *t {
                    return Err(Violation(format!(
                        "lock {}: token {} of {} accepted after token {t} of {w}",
                        r.lock, r.token, r.worker
                    )));
                }
            }
            last.insert(&r.lock, (r.token, &r.worker));
        }
        Ok(())
    }

    /// The register of `lock` (`value`, as the oracle holds it) equals `acknowledged`
    /// increments, and every accepted write was an increment of the value last read.
    pub fn check_counter(
        &self,
        lock: &str,
        value: i64,
        acknowledged: usize,
    ) -> Result<(), Violation> {
        if value != acknowledged as i64 {
            return Err(Violation(format!(
                "lock {lock}: counter is {value} but {acknowledged} increments were acknowledged"
            )));
        }
        Ok(())
    }

    /// The holds reported, in the order they were acquired (per the workers' clocks).
    pub fn holds(&self) -> Vec<Hold> {
        let mut holds: Vec<Hold> = Vec::new();
        let mut index: HashMap<(String, u64), usize> = HashMap::new();
        for r in &self.records {
            match &r.kind {
                RecordKind::Acquired { hold, t } => {
                    index.insert((r.worker.clone(), *hold), holds.len());
                    holds.push(Hold {
                        worker: r.worker.clone(),
                        lock: r.lock.clone(),
                        token: r.token,
                        hold: *hold,
                        start: *t,
                        end: None,
                        why: None,
                    });
                }
                RecordKind::Ended { hold, t, why } => {
                    if let Some(&i) = index.get(&(r.worker.clone(), *hold)) {
                        if holds[i].end.is_none_or(|e| *t < e) {
                            holds[i].end = Some(*t);
                            holds[i].why = Some(why.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        holds.sort_by_key(|h| h.start);
        holds
    }

    /// No two holds of one lock overlap, and later holds have greater tokens, except holds
    /// of workers in `exempt` (paused ones). A hold without an end overlaps everything after
    /// its start. A hold that ended before it started — the worker saw its grant only after
    /// its local deadline had passed (a starved task, a paused process) — held nothing while
    /// the worker knew of it, and is left out; fencing covers anything it wrote.
    pub fn check_intervals(&self, exempt: &[&str]) -> Result<(), Violation> {
        let holds: Vec<Hold> = self
            .holds()
            .into_iter()
            .filter(|h| !exempt.contains(&h.worker.as_str()))
            .filter(|h| h.end.is_none_or(|end| end > h.start))
            .collect();
        let mut by_lock: HashMap<&str, Vec<&Hold>> = HashMap::new();
        for h in &holds {
            by_lock.entry(h.lock.as_str()).or_default().push(h);
        }
        for (lock, hs) in by_lock {
            for pair in hs.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                let a_end = a.end.unwrap_or(u64::MAX);
                if b.start < a_end {
                    return Err(Violation(format!(
                        "lock {lock}: hold of {} (token {}, ended {}) overlaps hold of {} (token {}) by {:?}",
                        a.worker,
                        a.token,
                        a.why.as_deref().unwrap_or("never"),
                        b.worker,
                        b.token,
                        Duration::from_nanos(a_end.saturating_sub(b.start)),
                    )));
                }
                // The same worker may hold the same token twice: its release failed, so
                // its key stayed, and its next acquire found it still at the head.
                let reused = b.token == a.token && b.worker == a.worker;
                if b.token != 0 && a.token != 0 && b.token <= a.token && !reused {
                    return Err(Violation(format!(
                        "lock {lock}: token {} of {} granted after token {} of {}",
                        b.token, b.worker, a.token, a.worker
                    )));
                }
            }
        }
        Ok(())
    }

    /// The time from `t` to the first grant of `lock` after it (`None`: none came).
    pub fn next_grant_after(&self, lock: &str, t: u64) -> Option<Duration> {
        self.holds()
            .iter()
            .filter(|h| h.lock == lock && h.start >= t)
            .map(|h| Duration::from_nanos(h.start - t))
            .min()
    }

    /// All the checks that hold whatever the faults: tokens never decrease, no overlap of
    /// holds but those of `exempt`, and for each lock the register equals the accepted
    /// writes (every write is an increment).
    pub fn check_all(&self, oracle: &Oracle, exempt: &[&str]) -> Result<(), Violation> {
        self.check_tokens()?;
        self.check_intervals(exempt)?;
        for lock in self.locks() {
            self.check_counter(&lock, oracle.value(&lock), self.accepted_writes(&lock))?;
        }
        Ok(())
    }
}

/// p50 and max of some durations, for the figures the fault tests print.
pub fn p50_max(samples: &[Duration]) -> (Duration, Duration) {
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    let mut s = samples.to_vec();
    s.sort();
    (s[(s.len() - 1) / 2], s[s.len() - 1])
}

/// How many runs each fault scenario makes: `$BATON_FAULT_RUNS`, else `default`. CI uses the
/// defaults (few runs, to stay fast); the figures in docs/reliability.md come from
/// `BATON_FAULT_RUNS=10`.
pub fn runs(default: usize) -> usize {
    std::env::var("BATON_FAULT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// Print one figure of the fault suite as a table row (`cargo test -- --nocapture` shows
/// them): `FIGURE | row | backend | metric | p50 | max | runs`.
pub fn report(row: &str, backend: &str, metric: &str, samples: &[Duration]) {
    let (p50, max) = p50_max(samples);
    println!(
        "FIGURE | {row} | {backend} | {metric} | {} | {} | {} |",
        ms(p50),
        ms(max),
        samples.len()
    );
}

/// Print a count figure (rejected writes, false losses …): p50 and max over the runs.
pub fn report_count(row: &str, backend: &str, metric: &str, samples: &[u64]) {
    let mut s = samples.to_vec();
    s.sort_unstable();
    let (p50, max) = match s.len() {
        0 => (0, 0),
        n => (s[(n - 1) / 2], s[n - 1]),
    };
    println!(
        "FIGURE | {row} | {backend} | {metric} | {p50} | {max} | {} |",
        s.len()
    );
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mono_clock_is_monotonic_and_converts_instants() {
        let a = mono_now();
        let i = std::time::Instant::now();
        let b = mono_now();
        assert!(b >= a);
        let m = mono_of(i);
        assert!(m + 1_000_000 >= a && m <= b + 1_000_000, "{a} {m} {b}");
        let later = mono_of(i + Duration::from_secs(2));
        assert!(later >= m + 1_990_000_000);
    }

    #[tokio::test]
    async fn fences_reads_and_writes() {
        let oracle = Oracle::start().await;
        let mut a = oracle.client("a").await;
        let mut b = oracle.client("b").await;
        assert_eq!(a.read("l", 5).await.unwrap(), Fenced::Ok(0));
        assert!(a.write("l", 5, 1).await.unwrap().is_ok());
        // b, with a higher token, reads: a can no longer read or write.
        assert_eq!(b.read("l", 7).await.unwrap(), Fenced::Ok(1));
        assert_eq!(
            a.write("l", 5, 2).await.unwrap(),
            Fenced::Rejected { highest: 7 }
        );
        assert!(!a.increment("l", 5).await.unwrap());
        assert!(b.write("l", 7, 2).await.unwrap().is_ok());
        // The same token again is fine (>=).
        assert!(b.increment("l", 7).await.unwrap());
        assert_eq!(oracle.value("l"), 3);
        assert_eq!(oracle.highest("l"), Some(7));
        // Other locks are independent.
        assert!(a.increment("other", 1).await.unwrap());
        let h = oracle.history();
        assert_eq!(h.rejected(Some("l")), 2);
        assert_eq!(h.rejected_by_worker().get("a"), Some(&2));
        assert_eq!(h.accepted_writes("l"), 3);
        h.check_tokens().unwrap();
        h.check_all(&oracle, &[]).unwrap();
        // A counter that disagrees with its acknowledged increments is a violation.
        assert!(h.check_counter("l", 3, 4).is_err());
    }

    fn rec(lock: &str, token: i64, worker: &str, kind: RecordKind) -> Record {
        Record {
            at: 0,
            lock: lock.into(),
            token,
            worker: worker.into(),
            kind,
        }
    }

    #[test]
    fn finds_decreasing_tokens() {
        let h = History {
            records: vec![
                rec(
                    "l",
                    5,
                    "a",
                    RecordKind::Write {
                        accepted: true,
                        value: 1,
                    },
                ),
                rec(
                    "l",
                    4,
                    "b",
                    RecordKind::Write {
                        accepted: true,
                        value: 2,
                    },
                ),
            ],
        };
        assert!(h.check_tokens().is_err());
    }

    #[test]
    fn finds_overlapping_holds_and_exempts_paused_workers() {
        let acq = |hold, t| RecordKind::Acquired { hold, t };
        let end = |hold, t| RecordKind::Ended {
            hold,
            t,
            why: "released".into(),
        };
        let ok = History {
            records: vec![
                rec("l", 1, "a", acq(1, 100)),
                rec("l", 1, "a", end(1, 200)),
                rec("l", 2, "b", acq(1, 201)),
                rec("l", 2, "b", end(1, 300)),
                // Another lock may overlap.
                rec("m", 1, "c", acq(1, 150)),
            ],
        };
        ok.check_intervals(&[]).unwrap();
        assert_eq!(ok.next_grant_after("l", 200), Some(Duration::from_nanos(1)));
        assert_eq!(ok.next_grant_after("l", 301), None);

        let overlap = History {
            records: vec![
                rec("l", 1, "a", acq(1, 100)),
                rec("l", 2, "b", acq(1, 150)),
                rec("l", 2, "b", end(1, 300)),
                rec("l", 1, "a", end(1, 200)),
            ],
        };
        let err = overlap.check_intervals(&[]).unwrap_err();
        assert!(err.0.contains("overlaps"), "{err}");
        overlap.check_intervals(&["a"]).unwrap();

        // A hold never ended overlaps every later one.
        let open = History {
            records: vec![
                rec("l", 1, "a", acq(1, 100)),
                rec("l", 2, "b", acq(1, 5000)),
            ],
        };
        assert!(open.check_intervals(&[]).is_err());

        // A hold seen only after its deadline (it ended before it started) is left out.
        let late = History {
            records: vec![
                rec("l", 5, "a", acq(1, 100)),
                rec("l", 5, "a", end(1, 200)),
                rec("l", 3, "b", acq(1, 300)),
                rec("l", 3, "b", end(1, 250)),
            ],
        };
        late.check_intervals(&[]).unwrap();

        // A later grant with a lower token is a violation.
        let lower = History {
            records: vec![
                rec("l", 5, "a", acq(1, 100)),
                rec("l", 5, "a", end(1, 200)),
                rec("l", 3, "b", acq(1, 300)),
            ],
        };
        assert!(lower.check_intervals(&[]).is_err());
    }

    #[tokio::test]
    async fn end_holds_ends_a_killed_workers_hold() {
        let oracle = Oracle::start().await;
        let mut a = oracle.client("a").await;
        let hold = a.acquired("l", 3, 100).await.unwrap();
        assert_eq!(hold, 1);
        oracle.end_holds("a", 150, "killed");
        let mut b = oracle.client("b").await;
        let hb = b.acquired("l", 4, 200).await.unwrap();
        b.ended("l", 4, hb, 250, "released").await.unwrap();
        let h = oracle.history();
        h.check_intervals(&[]).unwrap();
        let holds = h.holds();
        assert_eq!(holds[0].why.as_deref(), Some("killed"));
        assert_eq!(holds[1].why.as_deref(), Some("released"));
    }

    #[test]
    fn percentiles() {
        let ms = Duration::from_millis;
        assert_eq!(p50_max(&[ms(3), ms(1), ms(2)]), (ms(2), ms(3)));
        assert_eq!(p50_max(&[ms(4), ms(1)]), (ms(1), ms(4)));
        assert_eq!(p50_max(&[]), (ms(0), ms(0)));
    }
}

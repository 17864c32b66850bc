//! `baton demo`: workers share a lock and write to a fenced log; an election fails over
//! after its leader is frozen and its lease revoked; a timeline and a summary.
//!
//! Runs on the embedded store (`mem://demo`) unless `--endpoints` (or `$BATON_ENDPOINTS`)
//! names a backend.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard as StdMutexGuard};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::{self, Global};
use crate::exit::CliError;
use crate::output::{self, Output};
use crate::supervisor::Signals;

const EXAMPLES: &str = "\
Examples:
  baton demo                          # 4 workers, 4 seconds, on the embedded store
  baton demo --workers 8 --seconds 10
  baton --endpoints http://127.0.0.1:2379 demo   # on a running etcd
  baton --json demo | jq 'select(.event == \"summary\")'

What it shows:
  - workers on separate sessions take turns on one lock; every grant carries a fencing
    token, and each holder writes to a log that refuses tokens lower than the highest seen;
  - three nodes elect a leader, which writes heartbeats to a fenced log; partway through,
    the leader is frozen (as in a long GC pause) and its lease revoked; another node takes
    over; the old leader wakes up and its stale write is refused.
The summary gives the grants, the overlaps (two holders at once: must be 0), the leaders
and the failover time; a progress line every 5 s in between. A lock or unlock the
backend did not answer (an etcd restart) is shown and tried again while the worker's
session lives. Exit 0 if every check passed, 1 if one failed, 125 if baton itself failed
(bad input, the backend unreachable or a session lost) or the report could not be written
to stdout (a full disk, an I/O error), 128+N after signal N (every session closed first).
A reader that goes away (baton demo | head -1, quitting less) stops the demo early,
cleaning up as a signal does, with exit 0 and no summary.";

/// The embedded store the demo uses unless told otherwise.
const DEMO_ENDPOINTS: &str = "mem://demo";
/// The nodes that take part in the election.
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// How many grants the timeline shows one by one.
const SHOWN_GRANTS: usize = 10;
/// The session TTL of every worker and node.
const TTL: Duration = Duration::from_secs(10);
/// How often the leader writes a heartbeat.
const HEARTBEAT: Duration = Duration::from_millis(50);
/// How long a thawed old leader may still take, once the demo stops, to be told of its loss.
const LOSS_GRACE: Duration = Duration::from_secs(1);
/// How long the demo waits for its tasks to stop at the end.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The failover step is given at least this long, even past the demo's end.
const STEP_AT_LEAST: Duration = Duration::from_secs(3);
/// A stop that takes longer than this says so (while it waits up to [`STOP_TIMEOUT`]).
const SLOW_STOP: Duration = Duration::from_secs(1);

/// `baton demo`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    // The global --endpoints, with the demo's own default (so that the help says what the
    // demo runs on); clap gives the value given before or after `demo` to both this and
    // `Global::endpoints`, and `Global::endpoints_given` says whether one was given.
    /// Backend URLs, as for every command (see baton --help); by default the demo's own
    /// embedded store.
    #[arg(
        long,
        env = "BATON_ENDPOINTS",
        hide_env_values = true,
        value_name = "URLS",
        default_value = DEMO_ENDPOINTS
    )]
    pub(crate) endpoints: String,

    /// How many workers contend for the lock.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) workers: u16,

    /// How long the demo runs: a number of seconds (2, 0.5) or a duration (1500ms).
    #[arg(long, value_name = "S", default_value = "4", value_parser = seconds)]
    pub(crate) seconds: Duration,
}

/// A number of seconds, or a humantime duration; between 0.5 s and 1 h.
fn seconds(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs.min(1e6)),
        Ok(_) => return Err("must be a positive number of seconds".to_string()),
        Err(_) => cli::duration(s)?,
    };
    if d < Duration::from_millis(500) || d > Duration::from_secs(3600) {
        return Err("must be between 0.5 s and 1 h".to_string());
    }
    Ok(d)
}

/// A resource that refuses writes whose fencing token is lower than the highest it has seen.
#[derive(Debug, Default)]
struct FencedLog {
    highest: i64,
    accepted: u64,
    refused: u64,
}

impl FencedLog {
    /// Accept the write if `token` is at least the highest seen; else the highest.
    fn write(&mut self, token: i64) -> Result<(), i64> {
        if token < self.highest {
            self.refused += 1;
            Err(self.highest)
        } else {
            self.highest = token;
            self.accepted += 1;
            Ok(())
        }
    }
}

fn locked<T>(m: &StdMutex<T>) -> StdMutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints timestamped events.
#[derive(Debug, Clone, Copy)]
struct Timeline {
    start: Instant,
    out: Output,
}

impl Timeline {
    fn event(&self, human: &str, mut json: Value) {
        let ms = self.start.elapsed().as_secs_f64() * 1e3;
        json["t_ms"] = json!((ms * 10.0).round() / 10.0);
        let _ = self.out.emit(&format!("{ms:>8.1} ms  {human}"), &json);
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// What the lock workers share.
#[derive(Debug, Default)]
struct LockShared {
    /// Workers that currently believe they hold the lock.
    holding: AtomicUsize,
    log: StdMutex<FencedLog>,
    stats: StdMutex<LockStats>,
}

#[derive(Debug, Default)]
struct LockStats {
    /// (worker, token), in grant order.
    grants: Vec<(u16, i64)>,
    /// When the last grant was made.
    last_grant: Option<Instant>,
    overlaps: u64,
    lost: u64,
}

/// One election node, and the switch that freezes it.
#[derive(Debug)]
struct Node {
    name: &'static str,
    frozen: AtomicBool,
    thaw: Notify,
}

/// What the election nodes share.
#[derive(Debug, Default)]
struct ElectionShared {
    log: StdMutex<FencedLog>,
    state: StdMutex<ElectionState>,
}

#[derive(Debug, Default)]
struct ElectionState {
    /// (node, token), in the order they were elected.
    leaders: Vec<(&'static str, i64)>,
    /// When the leader was frozen and its lease revoked, and whose it was.
    killed: Option<(Instant, &'static str, i64)>,
    failover: Option<Duration>,
    /// The frozen leader's stale write: (token, highest seen) if refused.
    stale_write: Option<Result<i64, (i64, i64)>>,
    /// Whether the frozen leader, once thawed, was told that it had lost the leadership.
    old_leader_told: bool,
}

/// Why the demo ends before its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A signal, by number: exit 128+N.
    Signal(i32),
    /// The reader of stdout is gone (`baton demo | head -1`, quitting `less`): exit 0.
    ReaderGone,
}

/// Run `baton demo`.
///
/// A signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT) ends the demo early, also while it connects:
/// its workers and nodes stop and close their sessions (revoking their leases, which deletes
/// their keys), and the exit code is 128+N. A second signal stops the closing too.
///
/// So does a reader of stdout that goes away (a pipe whose read end is closed, seen within
/// a quarter of a second, [`output::until_reader_gone`]'s check, or a write that finds the
/// pipe closed): the user chose to see no more, so the demo stops early as on a signal but
/// exits 0, printing nothing more. Other write errors (a full disk) fail with 125.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    let endpoints = if global.endpoints_given {
        global.endpoints.clone()
    } else {
        args.endpoints.clone()
    };
    let out = Output::new(global.json);
    let mut signals = Signals::new()?;
    let admin = signals
        .interruptible(cli::connect(global, &endpoints))
        .await?;
    // The PID alone would not do: two demos with the same PID (PID 1 in two containers)
    // on one etcd would share a lock and an election, and revoke each other's leases.
    let run_id = format!(
        "{:x}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    );
    let lock_name = format!("demo/job-{run_id}");
    let election_name = format!("demo/leader-{run_id}");

    let intro = format!(
        "baton demo on {}: {} workers share lock {lock_name:?}; {} nodes elect a leader of {election_name:?}; {}",
        admin.endpoints(),
        args.workers,
        NODES.len(),
        output::duration(args.seconds),
    );
    // A demo whose report cannot be written is no success: found out here, before it
    // starts anything (the timeline's lines are not checked; the summary's is).
    // A reader gone already (a closed pipe) wants nothing: 0, as below.
    if let Err(e) = out.emit(
        &format!("{intro}\n"),
        &json!({
            "event": "start", "endpoints": admin.endpoints(), "workers": args.workers,
            "lock": lock_name, "election": election_name, "seconds": args.seconds.as_secs_f64(),
        }),
    ) {
        return output::follow_ended(&e);
    }

    let tl = Timeline {
        start: Instant::now(),
        out,
    };
    let stop = CancellationToken::new();
    let lock_shared = Arc::new(LockShared::default());
    let election = Arc::new(ElectionShared::default());
    let nodes: Vec<Arc<Node>> = NODES
        .iter()
        .map(|&name| {
            Arc::new(Node {
                name,
                frozen: AtomicBool::new(false),
                thaw: Notify::new(),
            })
        })
        .collect();

    // Every worker and node is its own "machine": its own client and session. A signal
    // (or a failure) while they connect stops the ones started already, which close their
    // sessions; a session whose lease grant is in flight then is made and closed too.
    let mut tasks = Vec::new();
    let mut observing = None;
    let mut granting = None;
    let starting = signals.interruptible(async {
            for w in 1..=args.workers {
                let session = session_kept(global, &endpoints, &mut granting).await?;
                let mutex = baton::Mutex::new(&session, &lock_name)?;
                tasks.push(tokio::spawn(worker(
                    w,
                    session,
                    mutex,
                    lock_shared.clone(),
                    tl,
                    stop.clone(),
                )));
            }
            let mut observer = baton::Election::observe_with(&admin, &election_name)?;
            observing = Some(tokio::spawn({
                let stop = stop.clone();
                async move {
                    loop {
                        tokio::select! {
                            biased;
                            _ = stop.cancelled() => return,
                            leader = observer.next() => match leader {
                                Some(l) => tl.event(
                                    &format!("observer: the leader is {} (token {})", l.value_str(), l.create_revision),
                                    json!({"event": "observed", "leader": l.value_str(), "fencing_token": l.create_revision}),
                                ),
                                None => return,
                            },
                        }
                    }
                }
            }));
            for node in &nodes {
                let session = session_kept(global, &endpoints, &mut granting).await?;
                let e = baton::Election::new(&session, &election_name)?;
                tasks.push(tokio::spawn(candidate(
                    node.clone(),
                    session,
                    e,
                    election.clone(),
                    tl,
                    stop.clone(),
                )));
                // Stagger the nodes so that node-a leads first.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<(), CliError>(())
        });
    let started = tokio::select! {
        started = starting => started.map(|()| None),
        () = output::reader_gone() => Ok(Some(Stop::ReaderGone)),
    };
    if let Err(_) | Ok(Some(_)) = started {
        stop.cancel();
        let stopping = tokio::time::timeout(STOP_TIMEOUT, async {
            if let Some(grant) = granting {
                if let Ok(Ok(session)) = grant.await {
                    cli::close(&session).await;
                }
            }
            for t in tasks {
                let _ = t.await;
            }
            if let Some(observing) = observing {
                let _ = observing.await;
            }
        });
        tokio::select! {
            _ = stopping => {}
            sig = signals.recv() => {
                tracing::debug!(signal = sig, "interrupted while stopping the demo");
                return Err(CliError::interrupted(sig));
            }
        }
        return match started {
            Err(e) => Err(e),
            Ok(_) => {
                tracing::debug!("the reader of stdout is gone");
                Ok(0)
            }
        };
    }

    // Partway through, freeze the leader and revoke its lease. A signal cuts it short (on
    // a hung etcd it could wait two request timeouts), thawing the frozen node; the reader's
    // going does not.
    let progress = Progress {
        tl,
        shared: &lock_shared,
    };
    let mut interrupted = sleep_until(
        &mut signals,
        tl.start + args.seconds.mul_f64(0.4),
        &progress,
    )
    .await;
    // The step shows progress meanwhile, and is cut short at the demo's end, or
    // STEP_AT_LEAST after it began if that is later (a backend gone or hung: its read and
    // its revoke could each take a request timeout; a short demo whose connecting took it
    // past its end still shows a failover).
    if interrupted.is_none() {
        let end = tl.start + args.seconds;
        let step = tokio::select! {
            biased;
            sig = signals.recv() => Err(Some(Stop::Signal(sig))),
            () = kill_leader(&admin, &election_name, &nodes, &election, tl) => Ok(()),
            () = tokio::time::sleep_until(end.max(Instant::now() + STEP_AT_LEAST)) => {
                tl.event(
                    "operator: the step did not finish by the demo's end (is the backend up?)",
                    json!({"event": "step_cut_short"}),
                );
                Err(None)
            }
            () = progress.every_period() => Err(None),
        };
        interrupted = match step {
            Ok(()) => sleep_until(&mut signals, end, &progress).await,
            Err(stop) => stop,
        };
    }

    // Stop every task, and wait for all of them (each closes its session, revoking its
    // lease), even when one has failed.
    // A stop that takes a while (the backend gone or hung: each close waits for it) says so.
    stop.cancel();
    let stopping = tokio::time::timeout(STOP_TIMEOUT, async {
        let mut first_error = None;
        for t in tasks {
            if let Ok(Err(e)) = t.await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    });
    tokio::pin!(stopping);
    let slow = tokio::time::sleep(SLOW_STOP);
    tokio::pin!(slow);
    let stopped = loop {
        tokio::select! {
            stopped = &mut stopping => break stopped,
            () = &mut slow, if !slow.is_elapsed() => tl.event(
                &format!(
                    "stopping: the sessions are not closed after {}: is the backend up? \
                     (waiting up to {} in all)",
                    output::duration(SLOW_STOP),
                    output::duration(STOP_TIMEOUT)
                ),
                json!({"event": "slow_stop", "after_ms": SLOW_STOP.as_millis() as u64}),
            ),
            sig = signals.recv() => {
                tracing::debug!(signal = sig, "interrupted while stopping the demo");
                return Err(CliError::interrupted(sig));
            }
        }
    };
    if let Some(observing) = observing {
        let _ = observing.await;
    }
    match interrupted {
        Some(Stop::Signal(sig)) => {
            tracing::debug!(signal = sig, "interrupted");
            return Err(CliError::interrupted(sig));
        }
        Some(Stop::ReaderGone) => {
            tracing::debug!("the reader of stdout is gone");
            return Ok(0);
        }
        None => {}
    }
    match stopped {
        Ok(r) => r?,
        Err(_) => {
            return Err(CliError::failed(format!(
                "the demo's workers did not stop within {}: the backend did not answer their \
                 session closes (their leases expire within {} of its last answer)",
                output::duration(STOP_TIMEOUT),
                output::duration(TTL)
            )))
        }
    }
    summary(&out, &args, &lock_shared, &election)
}

/// How often a long demo says how it is going (grants and overlaps so far), so that a quiet
/// stretch between the timeline's events (or a stalled backend) is never silent for long.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What the progress lines report.
struct Progress<'a> {
    tl: Timeline,
    shared: &'a LockShared,
}

impl Progress<'_> {
    /// Shows progress every [`PROGRESS_EVERY`], for ever.
    async fn every_period(&self) {
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            self.show();
        }
    }

    /// The grants and overlaps so far; and, when no grant came for a progress period (the
    /// backend gone or hung: the workers wait on it without a word), for how long.
    fn show(&self) {
        let (grants, overlaps, last_grant) = {
            let stats = locked(&self.shared.stats);
            (stats.grants.len(), stats.overlaps, stats.last_grant)
        };
        let since = last_grant.unwrap_or(self.tl.start).elapsed();
        let (stalled, note) = if since >= PROGRESS_EVERY {
            let s = output::duration(Duration::from_secs(since.as_secs()));
            (
                Some(since.as_millis() as u64),
                format!("; no grant for {s}: is the backend up?"),
            )
        } else {
            (None, String::new())
        };
        self.tl.event(
            &format!("progress: {grants} grants, {overlaps} overlaps so far{note}"),
            json!({
                "event": "progress",
                "grants": grants,
                "overlaps": overlaps,
                "no_grant_for_ms": stalled,
            }),
        );
    }
}

/// A session of a client of its own, for a worker or a node: its lease is granted in a task
/// of its own, whose handle is in `granting` until it is answered, so that a start cut short
/// meanwhile (a signal, the reader gone) can close it, where a dropped grant would leave its
/// lease behind for a TTL.
async fn session_kept(
    global: &Global,
    endpoints: &str,
    granting: &mut Option<tokio::task::JoinHandle<Result<baton::Session, CliError>>>,
) -> Result<baton::Session, CliError> {
    let client = cli::connect(global, endpoints).await?;
    let grant = granting.insert(tokio::spawn(
        async move { cli::session(&client, TTL).await },
    ));
    let made = grant
        .await
        .map_err(|e| CliError::failed(format!("making a session: {e}")))?;
    *granting = None;
    made
}

/// Sleep until `at`, or until a signal comes or the reader of stdout goes first: which.
/// Says how it is going every [`PROGRESS_EVERY`] meanwhile.
async fn sleep_until(signals: &mut Signals, at: Instant, progress: &Progress<'_>) -> Option<Stop> {
    loop {
        let next = Instant::now() + PROGRESS_EVERY;
        // Biased, the signal first: one that came while the operator step ran (which is not
        // cut short) must be seen even when `at` has passed meanwhile, or the stop would
        // take it for a second signal and skip closing the sessions.
        tokio::select! {
            biased;
            sig = signals.recv() => return Some(Stop::Signal(sig)),
            () = tokio::time::sleep_until(at.min(next)) => {
                if at <= next {
                    return None;
                }
                progress.show();
            }
            () = output::reader_gone() => return Some(Stop::ReaderGone),
        }
    }
}

/// How long a worker waits before it tries again after a lock or unlock the backend did not
/// answer (a restart, a lost connection) while its session lives.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// A worker's failed lock or unlock: shown, then tried again after [`RETRY_AFTER`] while
/// the session lives and the failure is one to retry; `Err` ends the worker otherwise.
async fn after_failure(
    w: u16,
    what: &str,
    e: baton::Error,
    session: &baton::Session,
    tl: Timeline,
    stop: &CancellationToken,
) -> Result<(), CliError> {
    if !e.is_retryable() || session.is_lost() {
        return Err(e.into());
    }
    tl.event(
        &format!("worker-{w}: {what} failed ({e}); trying again"),
        json!({"event": "retry", "worker": w, "step": what, "error": e.to_string()}),
    );
    tokio::select! {
        () = tokio::time::sleep(RETRY_AFTER) => {}
        () = stop.cancelled() => {}
    }
    Ok(())
}

/// A lock worker: take the lock, write to the fenced log a few times, release; repeat.
async fn worker(
    w: u16,
    session: baton::Session,
    mutex: baton::Mutex,
    shared: Arc<LockShared>,
    tl: Timeline,
    stop: CancellationToken,
) -> Result<(), CliError> {
    loop {
        let asked = Instant::now();
        let guard = tokio::select! {
            g = mutex.lock() => match g {
                Ok(g) => g,
                Err(e) => {
                    if let Err(e) = after_failure(w, "lock", e, &session, tl, &stop).await {
                        cli::close(&session).await;
                        return Err(e);
                    }
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let waited = asked.elapsed();
        let token = guard.fencing_token();
        let others = shared.holding.fetch_add(1, Ordering::SeqCst);
        let shown = {
            let mut stats = locked(&shared.stats);
            if others > 0 {
                stats.overlaps += 1;
            }
            stats.grants.push((w, token));
            stats.last_grant = Some(Instant::now());
            stats.grants.len()
        };
        if others > 0 {
            tl.event(
                &format!(
                    "OVERLAP: worker-{w} granted token {token} while another worker holds the lock"
                ),
                json!({"event": "overlap", "worker": w, "fencing_token": token}),
            );
        }
        if shown <= SHOWN_GRANTS {
            tl.event(
                &format!(
                    "worker-{w} acquired the lock: token {token}, waited {:.1} ms",
                    ms(waited)
                ),
                json!({"event": "grant", "worker": w, "fencing_token": token, "waited_ms": ms(waited)}),
            );
            if shown == SHOWN_GRANTS {
                tl.event(
                    "(further grants are counted, not shown)",
                    json!({"event": "grants_hidden"}),
                );
            }
        }
        // The critical section: two writes to the fenced log, with some work between.
        let mut lost = false;
        for _ in 0..2 {
            let work = Duration::from_millis(rand::thread_rng().gen_range(3..12));
            tokio::select! {
                _ = tokio::time::sleep(work) => {}
                _ = guard.lost() => { lost = true; break; }
            }
            if let Err(highest) = locked(&shared.log).write(token) {
                tl.event(
                    &format!("worker-{w}'s write with token {token} refused: the log has seen {highest}"),
                    json!({"event": "refused", "worker": w, "fencing_token": token, "highest": highest}),
                );
            }
        }
        shared.holding.fetch_sub(1, Ordering::SeqCst);
        if lost || guard.is_lost() {
            locked(&shared.stats).lost += 1;
            tl.event(
                &format!(
                    "worker-{w} lost the lock: {}",
                    guard.lost_reason().unwrap_or_default()
                ),
                json!({"event": "lost", "worker": w, "fencing_token": token}),
            );
            break;
        }
        if let Err(e) = guard.unlock().await {
            if let Err(e) = after_failure(w, "unlock", e, &session, tl, &stop).await {
                cli::close(&session).await;
                return Err(e);
            }
        }
    }
    cli::close(&session).await;
    Ok(())
}

/// An election node: campaign; while leader, write heartbeats to the fenced log.
async fn candidate(
    node: Arc<Node>,
    session: baton::Session,
    election: baton::Election,
    shared: Arc<ElectionShared>,
    tl: Timeline,
    stop: CancellationToken,
) -> Result<(), CliError> {
    let name = node.name;
    let leadership = tokio::select! {
        biased;
        _ = stop.cancelled() => {
            cli::close(&session).await;
            return Ok(());
        }
        l = election.campaign(name) => l,
    };
    let leadership = match leadership {
        // Elected because the leader resigned at the end of the demo: not a failover.
        Ok(l) if stop.is_cancelled() => {
            let _ = l.resign().await;
            cli::close(&session).await;
            return Ok(());
        }
        Ok(l) => l,
        Err(e) if stop.is_cancelled() || session.is_lost() => {
            tracing::debug!(node = name, error = %e, "campaign ended");
            cli::close(&session).await;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let token = leadership.fencing_token();
    let failover = {
        let mut st = locked(&shared.state);
        st.leaders.push((name, token));
        let failover = st.killed.map(|(at, _, _)| at.elapsed());
        if st.failover.is_none() {
            st.failover = failover;
        }
        failover
    };
    match failover {
        Some(f) => tl.event(
            &format!("{name} elected leader: token {token}, {:.1} ms after the old leader's lease was revoked", ms(f)),
            json!({"event": "elected", "node": name, "fencing_token": token, "failover_ms": ms(f)}),
        ),
        None => tl.event(
            &format!("{name} elected leader: token {token}"),
            json!({"event": "elected", "node": name, "fencing_token": token}),
        ),
    }
    let mut heartbeats = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = heartbeats.tick() => {}
            _ = leadership.lost() => {}
            _ = stop.cancelled() => {
                let _ = leadership.resign().await;
                cli::close(&session).await;
                return Ok(());
            }
        }
        if node.frozen.load(Ordering::SeqCst) {
            // Frozen: it sees nothing until thawed, then carries on where it was, with a
            // write it believes is still a leader's.
            node.thaw.notified().await;
            let result = locked(&shared.log).write(token);
            locked(&shared.state).stale_write =
                Some(result.map(|()| token).map_err(|h| (token, h)));
            match result {
                Err(highest) => tl.event(
                    &format!("{name} wakes up and writes with token {token}: refused, the log has seen token {highest}"),
                    json!({"event": "stale_write", "node": name, "fencing_token": token, "refused": true, "highest": highest}),
                ),
                Ok(()) => tl.event(
                    &format!("{name} wakes up and writes with token {token}: accepted (no newer leader wrote)"),
                    json!({"event": "stale_write", "node": name, "fencing_token": token, "refused": false}),
                ),
            }
            // Its lease was not revoked if the operator step was cut short (a signal)
            // or the revoke failed: then only the stop ends it. A loss already told comes
            // first, and a stop that came meanwhile (a short demo) still gives it a moment,
            // so that the summary can say whether the old leader was told.
            let told = tokio::select! {
                biased;
                _ = leadership.lost() => true,
                _ = async {
                    stop.cancelled().await;
                    tokio::time::sleep(LOSS_GRACE).await;
                } => false,
            };
            if !told {
                let _ = leadership.resign().await;
                cli::close(&session).await;
                return Ok(());
            }
            locked(&shared.state).old_leader_told = true;
            tl.event(
                &format!(
                    "{name} learns it is no longer leader: {}",
                    leadership.lost_reason().unwrap_or_default()
                ),
                json!({"event": "lost", "node": name, "fencing_token": token}),
            );
            return Ok(());
        }
        if leadership.is_lost() {
            tl.event(
                &format!(
                    "{name} lost the leadership: {}",
                    leadership.lost_reason().unwrap_or_default()
                ),
                json!({"event": "lost", "node": name, "fencing_token": token}),
            );
            cli::close(&session).await;
            return Ok(());
        }
        let _ = locked(&shared.log).write(token);
    }
}

/// Freeze the current leader, revoke its lease, wait for a new leader to write, thaw it.
async fn kill_leader(
    admin: &baton::Client,
    election_name: &str,
    nodes: &[Arc<Node>],
    shared: &ElectionShared,
    tl: Timeline,
) {
    let leader = match baton::Election::leader_with(admin, election_name).await {
        Ok(l) => l,
        Err(e) => {
            tl.event(
                &format!("no leader to kill: {e}"),
                json!({"event": "no_leader", "error": e.to_string()}),
            );
            return;
        }
    };
    let Some(node) = nodes.iter().find(|n| leader.value == n.name.as_bytes()) else {
        return;
    };
    node.frozen.store(true, Ordering::SeqCst);
    // Thawed however this ends, cut short by a signal too: a frozen node waits for it.
    let _thaw = Thaw(&node.thaw);
    // The failover clock starts before the revoke is sent: the next leader may hear of it
    // before the revoke's answer comes back.
    locked(&shared.state).killed = Some((Instant::now(), node.name, leader.create_revision));
    let revoked = admin.store().lease_revoke(leader.lease).await;
    tl.event(
        &format!(
            "operator: {} frozen (like a long GC pause) and its lease {} revoked{}",
            node.name,
            output::lease_hex(leader.lease),
            revoked
                .err()
                .map(|e| format!(" (failed: {e})"))
                .unwrap_or_default()
        ),
        json!({"event": "killed", "node": node.name, "fencing_token": leader.create_revision}),
    );
    // Thaw it once a newer leader has written, or after a second at most.
    let deadline = Instant::now() + Duration::from_secs(1);
    while locked(&shared.log).highest <= leader.create_revision && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Thaws a frozen node when dropped.
struct Thaw<'a>(&'a Notify);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// Print the summary; 0 if every check passed, 1 otherwise. A reader gone meanwhile (a
/// closed pipe) is not told; any other failure to write is 125.
fn summary(
    out: &Output,
    args: &Args,
    lock: &LockShared,
    election: &ElectionShared,
) -> Result<u8, CliError> {
    let stats = locked(&lock.stats);
    let log = locked(&lock.log);
    let st = locked(&election.state);
    let increasing = stats.grants.windows(2).all(|w| w[0].1 < w[1].1);
    let mut per_worker: BTreeMap<u16, usize> = (1..=args.workers).map(|w| (w, 0)).collect();
    for (w, _) in &stats.grants {
        *per_worker.entry(*w).or_default() += 1;
    }
    let stale_refused = matches!(st.stale_write, Some(Err(_)));
    let mut problems = Vec::new();
    if stats.overlaps > 0 {
        problems.push(format!("{} overlaps", stats.overlaps));
    }
    if !increasing {
        problems.push("fencing tokens did not increase".to_string());
    }
    if stats.grants.is_empty() {
        problems.push("no lock grants".to_string());
    }
    if st.failover.is_none() {
        problems.push("no failover".to_string());
    }
    if st.stale_write.is_some() && !stale_refused {
        problems.push("the stale leader's write was accepted".to_string());
    }
    if st.killed.is_some() && st.stale_write.is_some() && !st.old_leader_told {
        problems.push("the old leader was not told of its loss".to_string());
    }

    let leaders: Vec<String> = st
        .leaders
        .iter()
        .map(|(n, t)| format!("{n} (token {t})"))
        .collect();
    let workers: Vec<String> = per_worker
        .iter()
        .map(|(w, n)| format!("worker-{w} {n}"))
        .collect();
    if out.is_json() {
        out.json_line(&json!({
            "event": "summary",
            "grants": stats.grants.len(),
            "grants_per_worker": per_worker.values().collect::<Vec<_>>(),
            "tokens_increasing": increasing,
            "overlaps": stats.overlaps,
            "locks_lost": stats.lost,
            "fenced_writes_accepted": log.accepted,
            "fenced_writes_refused": log.refused,
            "leaders": st.leaders.iter().map(|(n, t)| json!({"node": n, "fencing_token": t})).collect::<Vec<_>>(),
            "failover_ms": st.failover.map(ms),
            "stale_write_refused": stale_refused,
            "old_leader_told": st.old_leader_told,
            "ok": problems.is_empty(),
        }))
        .or_else(unless_reader_gone)?;
    } else {
        let yes_no = |b: bool| if b { "yes" } else { "NO" };
        let failover = match (st.failover, st.killed) {
            (Some(f), Some((_, who, _))) => {
                format!(
                    "{:.1} ms from revoking {who}'s lease to the next leader",
                    ms(f)
                )
            }
            _ => "none".to_string(),
        };
        let stale = match st.stale_write {
            Some(Err((token, highest))) => {
                format!("refused (token {token} < {highest}, the new leader's)")
            }
            Some(Ok(token)) => format!("ACCEPTED (token {token})"),
            None => "not attempted".to_string(),
        };
        let text = format!(
            "\nsummary\n  grants:       {} ({})\n  tokens:       strictly increasing: {}\n  overlaps:     {}\n  lock log:     {} fenced writes accepted, {} refused\n  leaders:      {}\n  failover:     {failover}\n  stale leader: write {stale}; told of its loss: {}\n  result:       {}",
            stats.grants.len(),
            workers.join(", "),
            yes_no(increasing),
            stats.overlaps,
            log.accepted,
            log.refused,
            if leaders.is_empty() { "none".to_string() } else { leaders.join(", then ") },
            yes_no(st.old_leader_told),
            if problems.is_empty() { "ok".to_string() } else { format!("FAILED: {}", problems.join(", ")) },
        );
        out.text(&text).or_else(unless_reader_gone)?;
    }
    if problems.is_empty() {
        Ok(0)
    } else {
        Err(CliError::new(
            1,
            format!("the demo found a problem: {}", problems.join(", ")),
        ))
    }
}

/// Nothing if `e` says the reader of stdout is gone (a closed pipe), else the failure to
/// write (125).
fn unless_reader_gone(e: std::io::Error) -> Result<(), CliError> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        tracing::debug!("the reader of stdout is gone");
        Ok(())
    } else {
        Err(output::not_written(None, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_log_refuses_lower_tokens() {
        let mut log = FencedLog::default();
        assert_eq!(log.write(5), Ok(()));
        assert_eq!(log.write(5), Ok(()));
        assert_eq!(log.write(9), Ok(()));
        assert_eq!(log.write(7), Err(9));
        assert_eq!((log.accepted, log.refused), (3, 1));
    }

    #[test]
    fn seconds_accept_numbers_and_durations() {
        assert_eq!(seconds("2"), Ok(Duration::from_secs(2)));
        assert_eq!(seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(seconds("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(seconds("0").is_err());
        assert!(seconds("-1").is_err());
        assert!(seconds("soon").is_err());
        assert!(seconds("2h").is_err());
    }
}

#[cfg(test)]
mod frozen_node {
    use super::*;

    /// The operator step froze the leader but its lease was not revoked: the step was cut
    /// short by a signal before the revoke reached the store (the `Thaw` guard thaws the
    /// node at once), or the revoke failed. The thawed node then waits for the loss of a
    /// leadership that nothing takes away, deaf to the stop: it never closes its session,
    /// and the demo's stop waits STOP_TIMEOUT (10 s) for it, then leaves its lease and
    /// election key behind (exit 128+N on a signal; "did not stop in time", 125, without).
    #[tokio::test]
    async fn a_thawed_node_whose_lease_was_not_revoked_still_stops() {
        let client = baton::Client::memory();
        let session = baton::Session::new(&client).await.unwrap();
        let lease = session.lease_id();
        let election = baton::Election::new(&session, "second-look/leader").unwrap();
        let node = Arc::new(Node {
            name: "node-a",
            frozen: AtomicBool::new(false),
            thaw: Notify::new(),
        });
        let shared = Arc::new(ElectionShared::default());
        let tl = Timeline {
            start: Instant::now(),
            out: Output::new(true),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(candidate(
            node.clone(),
            session,
            election,
            shared.clone(),
            tl,
            stop.clone(),
        ));
        while locked(&shared.state).leaders.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // kill_leader: freeze; a signal drops it before the revoke: the guard thaws.
        node.frozen.store(true, Ordering::SeqCst);
        {
            let _thaw = Thaw(&node.thaw);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The demo stops.
        stop.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(3), task).await;
        assert!(
            ended.is_ok(),
            "the thawed node did not stop within 3 s of the stop (its session, lease {lease:x}, stays open)"
        );
    }
}

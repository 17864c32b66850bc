//! `baton bench SCENARIO`: measure Baton against the backend it runs on, and against a peer
//! implementation in the same run.
//!
//! Every scenario is written once, against the small [`target::Target`] traits, and run first
//! for Baton, then (with `--peer`) for the peer, on the same backend in the same process, so
//! the two are compared under the same load. Absolute numbers depend on the machine; the
//! ratio is the result.
//!
//! A backend or peer plugs in by implementing [`target::Target`] (connect a worker, lock,
//! campaign, release, end a hold from outside, count queued keys, report counters) and, for
//! a peer, a variant of [`peer::Peer`].

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::cli::{self, Global};
use crate::exit::CliError;
use crate::output::{self, Output};
use crate::supervisor::Signals;

pub(crate) mod alloc;
mod chart;
mod peer;
mod progress;
mod redis;
mod report;
mod scenario;
mod target;

pub(crate) use peer::Peer;
use report::Measured;
use target::{BatonTarget, Target, Tracked};

const EXAMPLES: &str = "\
Scenarios:
  uncontended  one worker: lock+unlock on one key
  contended    N workers, each with its own connection and session, on one key
  distinct     N workers, each on its own key
  handover     two candidates: from the leader's resign() returning to the waiting
               candidate's campaign() returning, --ops times
  lost         hold a lock, revoke its lease from another connection, time until the
               holder's lost() fires; --ops probes, --workers at a time
  scale        hold --ops locks on one session (memory, keep-alive traffic); then queue
               --workers waiters on one key (handoff rate, wake-ups per release)

Examples:
  baton bench contended --workers 8 --peer etcd-lock-api
  baton bench uncontended --peer etcd-lock-api --repeat 5   # median of 5 alternating rounds
  baton bench handover --ops 200 --peer etcd-lock-api --json
  baton bench lost --ttl 60s --peer etcd-lock-api
  baton bench scale --ops 10000 --workers 1000
  baton bench contended --sweep --peer etcd-lock-api --chart docs/bench-contended.svg
  baton --endpoints redis://127.0.0.1:6379 bench contended --peer rslock
  baton --endpoints redlock://h1:6379,h2:6379,h3:6379,h4:6379,h5:6379 bench uncontended --peer rslock

Every worker connects as baton does: with --namespace, --user and the TLS options. Peers
apply what they can and refuse the rest: --peer etcd-lock-api puts --namespace before its
names but connects over plain HTTP without logging in; --peer rslock cannot use --namespace.

On redis:// and redlock://, lost ends the hold with DEL of the lock key, handover uses
Baton's Redis election, and scale does not apply (it measures etcd sessions: one lease for many held locks).
After the run (or a signal), the keys its names left on every server (lock keys, fencing
counters, election records, queues) are deleted with DEL, by name: the work is the run's,
never a walk of the server's keys. Waiters' places and release markers (baton:waiter:...,
baton:released:...) expire on their own, within twice the request timeout. A baton killed
with SIGKILL deletes nothing: its fencing counters (baton:fence:baton-bench/...) stay.
On redlock://, a master that cannot be reached is named and left out, as Redlock does,
while a majority is up.

A signal (Ctrl-C, SIGTERM) stops the run: every worker is closed (on etcd, its lease revoked,
which deletes its keys) and baton exits with 128+N.

Progress goes to stderr once a run takes more than a second. A run in which nothing
completes for 20 s (the backend gone: a Redis waiter retries until it is back) fails, exit
125, as does a contended run in which two workers hold the lock at once. What counts: a
lock+unlock (uncontended, contended, distinct); a queued key, a resign or an election
(handover, which waits the --settle too); a probe (lost, which waits up to a keep-alive
interval and the --ttl more); a lock held, a second of the keep-alive window, a release or
a queued key (scale). With --json, the last line of
stdout is one object: scenario, backend, workers, ops, ops_per_sec, p50_us, p99_us, max_us
(null where they do not apply), scenario extras, and with --peer the peer_* fields and the
ratio. With --sweep, one line per point comes first; the last line's rates and ratio are
null, it has the run's server_version, ttl_ms and notes (every point's, once), and its
sweep array has each point's workers, ops_per_sec, peer_ops_per_sec and ratio. A report that cannot be written to stdout (a full disk, a closed pipe) makes baton
exit 125.";

/// The most `--workers`: each is a connection and a session (lease) of its own.
const MAX_WORKERS: u64 = 10_000;

/// The most `--ops`: every operation keeps its latency (16 bytes) until the report.
const MAX_OPS: u64 = 10_000_000;

/// The most `--ops` of `scale`, which holds that many locks at once on one session: each
/// takes about 7 KB of heap on etcd (its key and its watch, on a shared stream;
/// BENCHMARKS.md), so this is about 0.7 GB.
const MAX_SCALE_OPS: u64 = 100_000;

/// `baton bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// What to measure.
    #[arg(value_enum)]
    pub(crate) scenario: Scenario,

    /// Workers (contended, distinct: default 8, at most --ops; not with --sweep, which sets
    /// them), probes at a time (lost:
    /// default 20, at most --ops), or waiters queued on one key (scale: default 100). Each
    /// is a connection and a session of its own: at most 10000.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_WORKERS))]
    pub(crate) workers: Option<u64>,

    /// Operations: lock+unlock cycles, handovers, loss probes, or locks held at once (scale).
    /// The default makes each scenario take a few seconds. At most 10000000; for scale, at
    /// most 100000 (each held lock takes about 7 KB of heap on etcd).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_OPS))]
    pub(crate) ops: Option<u64>,

    /// The TTL of every session (lease); on etcd and mem://, rounded up to whole seconds
    /// (etcd's leases count seconds), for Baton and the peer alike.
    #[arg(long, value_name = "DUR", default_value = "6s", value_parser = cli::positive_duration)]
    pub(crate) ttl: Duration,

    /// Run the same scenario, right after Baton's run, with a peer implementation on the
    /// same backend, and report both and the ratio.
    #[arg(long, value_enum, value_name = "NAME")]
    pub(crate) peer: Option<Peer>,

    /// contended only: run 1, 2, 4, 8, 16 and 32 workers (--ops each, so at least 32) and
    /// draw an SVG chart of ops/s against workers. It sets the workers itself: not with
    /// --workers.
    #[arg(long, conflicts_with = "workers")]
    pub(crate) sweep: bool,

    /// Where --sweep writes its chart (checked to be writable before the sweep starts; its
    /// directory must exist, baton creates none); only with --sweep.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "bench-contended.svg",
        requires = "sweep"
    )]
    pub(crate) chart: PathBuf,

    /// With --peer: run Baton and the peer N times each, alternating which goes first, and
    /// report the round with the median ratio, plus every round's ratio. On a noisy machine
    /// one pair of runs can be off by a quarter; the median of several pairs is not.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub(crate) repeat: u64,

    /// handover only: how long the leader waits, once its successor is queued, before it
    /// resigns (0: at once, the hardest case).
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = cli::duration)]
    pub(crate) settle: Duration,
}

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Scenario {
    /// One worker: lock+unlock on one key.
    Uncontended,
    /// N workers, each with its own session, on one key.
    Contended,
    /// N workers, each on its own key.
    Distinct,
    /// Election handover after resign().
    Handover,
    /// Time from a lease revoke to the holder's lost().
    Lost,
    /// Many held locks on one session; many waiters on one key.
    Scale,
}

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Uncontended => "uncontended",
            Scenario::Contended => "contended",
            Scenario::Distinct => "distinct",
            Scenario::Handover => "handover",
            Scenario::Lost => "lost",
            Scenario::Scale => "scale",
        }
    }
}

/// One run's settings, defaults resolved.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) scenario: Scenario,
    pub(crate) workers: u64,
    pub(crate) ops: u64,
    pub(crate) ttl: Duration,
    pub(crate) settle: Duration,
    /// Prefix of every key this run uses, unique per run.
    pub(crate) prefix: String,
}

impl Config {
    fn new(args: &Args) -> Result<Config, CliError> {
        let (default_workers, default_ops) = match args.scenario {
            Scenario::Uncontended => (1, 1000),
            Scenario::Contended => (8, 300),
            Scenario::Distinct => (8, 2000),
            Scenario::Handover => (2, 50),
            Scenario::Lost => (20, 20),
            Scenario::Scale => (100, 1000),
        };
        let workers = args.workers.unwrap_or(default_workers);
        let fixed = match args.scenario {
            Scenario::Uncontended => Some(1),
            Scenario::Handover => Some(2),
            _ => None,
        };
        if let Some(n) = fixed {
            if workers != n {
                return Err(CliError::failed(format!(
                    "{} runs with {n} worker{}; --workers {workers} does not apply",
                    args.scenario.name(),
                    if n == 1 { "" } else { "s" }
                )));
            }
        }
        if let Some(reason) = args.peer.and_then(|p| p.cannot_run(args.scenario)) {
            return Err(CliError::failed(reason));
        }
        if args.sweep && args.scenario != Scenario::Contended {
            return Err(CliError::failed("--sweep applies to contended only"));
        }
        if args.repeat > 1 {
            if args.peer.is_none() {
                return Err(CliError::failed(
                    "--repeat compares Baton with a peer round by round: add --peer",
                ));
            }
            if args.sweep || args.scenario == Scenario::Scale {
                return Err(CliError::failed(
                    "--repeat applies to uncontended, contended, distinct, handover and lost",
                ));
            }
        }
        if !args.settle.is_zero() && args.scenario != Scenario::Handover {
            return Err(CliError::failed("--settle applies to handover only"));
        }
        if args.ttl < baton::MIN_TTL {
            return Err(CliError::failed(format!(
                "--ttl must be at least {}",
                crate::output::duration(baton::MIN_TTL)
            )));
        }
        let ops = args.ops.unwrap_or(default_ops);
        let most = SWEEP[SWEEP.len() - 1];
        if args.sweep && ops < most {
            // A point with more workers than operations would report a rate for workers
            // that had nothing to do.
            return Err(CliError::failed(format!(
                "--sweep runs up to {most} workers, and every worker needs an operation to \
                 do: --ops {ops} is fewer; give --ops {most} or more"
            )));
        }
        if args.scenario == Scenario::Scale && ops > MAX_SCALE_OPS {
            return Err(CliError::failed(format!(
                "bench scale holds --ops locks at once, about 7 KB of heap each on etcd: \
                 --ops {ops} is more than the {MAX_SCALE_OPS} allowed"
            )));
        }
        let workers = match (args.scenario, args.workers) {
            (Scenario::Lost, _) => workers.min(ops),
            // A worker beyond the ops would only warm up: refuse it when asked for, and
            // make no more by default.
            (Scenario::Contended | Scenario::Distinct, Some(asked)) if asked > ops => {
                return Err(CliError::failed(format!(
                    "--workers {asked} is more than --ops {ops}: every worker needs an \
                     operation to do"
                )));
            }
            (Scenario::Contended | Scenario::Distinct, None) => workers.min(ops),
            _ => workers,
        };
        Ok(Config {
            scenario: args.scenario,
            workers,
            ops,
            ttl: args.ttl,
            settle: args.settle,
            prefix: format!(
                "baton-bench/{:x}-{:06x}",
                std::process::id(),
                rand::random::<u32>() & 0xff_ffff
            ),
        })
    }
}

/// Run `baton bench`.
///
/// A signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT) stops the run where it is: the workers not
/// closed yet are closed (revoking their leases, which deletes their keys), and the exit
/// code is 128+N. A second signal stops the closing too.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    let mut config = Config::new(&args)?;
    if args.sweep {
        // Found out now, not after the whole sweep.
        chart::check_writable(&args.chart).map_err(|e| chart_error(&args.chart, &e))?;
    }
    let on_redis = cli::is_redis(&global.endpoints);
    if on_redis && config.scenario == Scenario::Scale {
        return Err(CliError::failed(
            "bench scale measures what an etcd session shares (one lease for many locks, a \
             queue of waiters); Redis has neither: use etcd or mem://",
        ));
    }
    // etcd's leases (and the embedded store's) count whole seconds: Baton's sessions round
    // the TTL up, and the peer's leases must have the same, and the report say which.
    let mut notes = Vec::new();
    if !on_redis {
        let used = lease_ttl(config.ttl);
        if used != config.ttl {
            notes.push(format!(
                "--ttl {} rounded up to {}: leases count whole seconds, and every lease of \
                 the run was granted {}",
                crate::output::duration(config.ttl),
                crate::output::duration(used),
                crate::output::duration(used)
            ));
            config.ttl = used;
        }
    }
    let mut signals = Signals::new()?;
    let (baton, endpoints, server_version) = signals
        .interruptible(connect(global, &config, on_redis))
        .await?;
    let peer: Option<Box<dyn Target>> = match args.peer {
        Some(p) => Some(signals.interruptible(p.connect(global, config.ttl)).await?),
        None => None,
    };
    let baton = Tracked::new(baton.into());
    let peer = peer.map(|p| Tracked::new(p.into()));
    let context = report::Context {
        backend: baton.backend(),
        endpoints,
        server_version,
        ttl: config.ttl,
        notes,
    };
    let work = measure_and_report(
        global,
        &args,
        &config,
        &context,
        &baton,
        peer.as_ref().map(|p| p as &dyn Target),
    );
    let result = tokio::select! {
        r = work => r,
        sig = signals.recv() => {
            tracing::debug!(signal = sig, "interrupted");
            Err(CliError::interrupted(sig))
        }
    };
    let cleanup = async {
        baton.close_all().await;
        if let Some(p) = &peer {
            p.close_all().await;
        }
        clean_up(&baton, &config.prefix).await;
        if let Some(p) = &peer {
            clean_up(p, &config.prefix).await;
        }
    };
    tokio::select! {
        () = cleanup => {}
        sig = signals.recv() => {
            tracing::debug!(signal = sig, "interrupted while closing the workers");
            return Err(CliError::interrupted(sig));
        }
    }
    result
}

/// `ttl` rounded up to whole seconds, as etcd grants a lease (and Baton's session asks
/// for one).
pub(crate) fn lease_ttl(ttl: Duration) -> Duration {
    Duration::from_secs(
        ttl.as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0)),
    )
}

/// Delete what the run left on `target`'s backend (see [`Target::clean_up`]), within
/// [`CLEAN_UP_TIMEOUT`]; a failure is printed, not fatal.
async fn clean_up(target: &dyn Target, prefix: &str) {
    let failure = match tokio::time::timeout(CLEAN_UP_TIMEOUT, target.clean_up(prefix)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.0,
        Err(_) => format!("no answer within {CLEAN_UP_TIMEOUT:?}"),
    };
    crate::output::notice(&format!(
        "bench: cannot delete the keys {} left under {prefix}: {failure}",
        target.name()
    ));
}

/// How long deleting what a run left may take.
const CLEAN_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Connect Baton's target on the backend: the target, the endpoints (credentials
/// redacted), and the server's version if known.
async fn connect(
    global: &Global,
    config: &Config,
    on_redis: bool,
) -> Result<(Box<dyn Target>, String, Option<String>), CliError> {
    Ok(if on_redis {
        let target = redis::RedisTarget::connect(global, config.ttl).await?;
        let version = target.admin().version().await;
        let endpoints = target.endpoints().to_string();
        (Box::new(target), endpoints, version)
    } else {
        let target = BatonTarget::connect(global, config.ttl).await?;
        let version = peer::server_version(global, target.backend()).await;
        let endpoints = target.endpoints().to_string();
        (Box::new(target), endpoints, version)
    })
}

/// Run the scenario (once, `--repeat` times, or `--sweep`) and print the report.
async fn measure_and_report(
    global: &Global,
    args: &Args,
    config: &Config,
    context: &report::Context,
    baton: &dyn Target,
    peer: Option<&dyn Target>,
) -> Result<u8, CliError> {
    let out = Output::new(global.json);
    if args.sweep {
        return sweep(&out, config, context, baton, peer, &args.chart).await;
    }
    if let (Some(p), true) = (peer, args.repeat > 1) {
        return rounds(&out, config, context, baton, p, args.repeat).await;
    }
    let heap_before = alloc::heap_in_use();
    let ours = measure(config, baton).await?;
    let theirs = match peer {
        Some(p) => {
            quiesce(ours.elapsed).await;
            if config.scenario == Scenario::Scale {
                settle_heap(heap_before).await;
            }
            Some((p.name(), measure(config, p).await?))
        }
        None => None,
    };
    let object = report::object(config, context, &ours, theirs.as_ref());
    if out.is_json() {
        out.json_line(&Value::Object(object))
            .map_err(|e| output::not_written(None, &e))?;
    } else {
        out.text(&report::human(
            config,
            context,
            &ours,
            theirs.as_ref(),
            &object,
        ))
        .map_err(|e| output::not_written(None, &e))?;
    }
    Ok(0)
}

/// `--repeat N`: N rounds of Baton and the peer, alternating which runs first (each round
/// on keys of its own), reported as the round with the median ratio plus every round's
/// ratio, in the order they ran.
async fn rounds(
    out: &Output,
    config: &Config,
    context: &report::Context,
    baton: &dyn Target,
    peer: &dyn Target,
    n: u64,
) -> Result<u8, CliError> {
    let mut done = Vec::new();
    for i in 0..n {
        let mut round = config.clone();
        round.prefix = format!("{}/round-{i}", config.prefix);
        let pair = if i % 2 == 0 {
            let ours = measure(&round, baton).await?;
            quiesce(ours.elapsed).await;
            let theirs = measure(&round, peer).await?;
            quiesce(theirs.elapsed).await;
            (ours, theirs)
        } else {
            let theirs = measure(&round, peer).await?;
            quiesce(theirs.elapsed).await;
            let ours = measure(&round, baton).await?;
            quiesce(ours.elapsed).await;
            (ours, theirs)
        };
        let ratio = report::ratio(config.scenario, &pair.0, &pair.1).0;
        crate::output::notice(&format!(
            "bench {}: round {}/{n}: ratio {}",
            config.scenario.name(),
            i + 1,
            ratio.map_or("-".to_string(), |r| format!("{:.2}", report::round2(r)))
        ));
        done.push((ratio, pair));
    }
    let ratios: Vec<Option<f64>> = done.iter().map(|(r, _)| *r).collect();
    // The median round by ratio (rounds without one last), the lower of the two middle
    // ones for an even count.
    let mut order: Vec<usize> = (0..done.len()).collect();
    order.sort_by(|&a, &b| match (ratios[a], ratios[b]) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    let median = order[(order.len() - 1) / 2];
    let (_, (ours, theirs)) = done.swap_remove(median);
    let theirs = (peer.name(), theirs);
    let mut object = report::object(config, context, &ours, Some(&theirs));
    object.insert("repeat".into(), n.into());
    object.insert(
        "ratios".into(),
        Value::Array(
            ratios
                .iter()
                .map(|r| r.map(report::round2).into())
                .collect(),
        ),
    );
    if out.is_json() {
        out.json_line(&Value::Object(object))
            .map_err(|e| output::not_written(None, &e))?;
    } else {
        let mut text = report::human(config, context, &ours, Some(&theirs), &object);
        let listed: Vec<String> = ratios
            .iter()
            .map(|r| r.map_or("-".to_string(), |r| format!("{:.2}", report::round2(r))))
            .collect();
        text.push_str(&format!(
            "\nratio per round ({n}, alternating which ran first): {}; shown: the median round\n",
            listed.join(", ")
        ));
        out.text(&text).map_err(|e| output::not_written(None, &e))?;
    }
    Ok(0)
}

/// One scenario on one target, its failure turned into the CLI's.
async fn measure(config: &Config, target: &dyn Target) -> Result<Measured, CliError> {
    scenario::run(config, target).await.map_err(|e| {
        CliError::failed(format!(
            "bench {} on {}: {}",
            config.scenario.name(),
            target.name(),
            e.0
        ))
    })
}

/// A pause between two measured runs, so that what one run leaves behind on the server
/// (closing connections and watches, revoked leases) does not count against the next: half
/// as long as the previous run took, at most a second.
async fn quiesce(previous: Duration) {
    tokio::time::sleep((previous / 2).min(Duration::from_secs(1))).await;
}

/// Wait (at most 30 s) until the heap is back near `baseline`: `scale` measures memory with
/// a process-wide counter, so what Baton's run still frees (connections and watch tasks of
/// closed clients end at their next idle check) must not count for the peer.
async fn settle_heap(baseline: i64) {
    const SLACK: i64 = 4 << 20;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    if alloc::heap_in_use() > baseline + SLACK {
        crate::output::notice(
            "bench scale: waiting for baton's closed clients to free their memory",
        );
    }
    while alloc::heap_in_use() > baseline + SLACK && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The worker counts of `--sweep`.
const SWEEP: [u64; 6] = [1, 2, 4, 8, 16, 32];

/// `contended --sweep`: each worker count for Baton, then the peer; one JSON line per point,
/// the chart, and a summary object last. The summary has the fields of every result, null
/// where they are per point (`workers`, the rates and latencies, and with a peer its
/// `peer_*` ones and `ratio`); what the run as a whole was, as each point says it
/// (`server_version`, `ttl_ms`, and `notes`: every point's notes, each once, in the order
/// they came); and `sweep`: each point's workers, rates and ratio, rounded as on the
/// point's own line. The human form ends with the notes too.
async fn sweep(
    out: &Output,
    config: &Config,
    context: &report::Context,
    baton: &dyn Target,
    peer: Option<&dyn Target>,
    chart_path: &std::path::Path,
) -> Result<u8, CliError> {
    let mut points = Vec::new();
    let mut notes: Vec<Value> = Vec::new();
    let mut previous = Duration::ZERO;
    for workers in SWEEP {
        let config = Config {
            workers,
            ..config.clone()
        };
        quiesce(previous).await;
        let ours = measure(&config, baton).await?;
        previous = ours.elapsed;
        let theirs = match peer {
            Some(p) => {
                quiesce(previous).await;
                let m = measure(&config, p).await?;
                previous = m.elapsed;
                Some((p.name(), m))
            }
            None => None,
        };
        let object = report::object(&config, context, &ours, theirs.as_ref());
        for note in object
            .get("notes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !notes.contains(note) {
                notes.push(note.clone());
            }
        }
        if out.is_json() {
            out.json_line(&Value::Object(object.clone()))
                .map_err(|e| output::not_written(None, &e))?;
        } else {
            out.text(&report::sweep_line(&config, &ours, theirs.as_ref()))
                .map_err(|e| output::not_written(None, &e))?;
        }
        points.push(chart::Point {
            workers,
            ours: ours.ops_per_sec.unwrap_or(0.0),
            theirs: theirs.as_ref().and_then(|(_, m)| m.ops_per_sec),
        });
    }
    let series = chart::Series {
        ours: baton.name(),
        theirs: peer.map(|p| p.name()),
        backend: context.backend,
        server_version: context.server_version.clone(),
        ops: config.ops,
        points: &points,
    };
    chart::draw(chart_path, &series).map_err(|e| chart_error(chart_path, &*e))?;
    let mut summary = Map::new();
    summary.insert("scenario".into(), "contended".into());
    summary.insert("backend".into(), context.backend.into());
    summary.insert(
        "server_version".into(),
        context.server_version.clone().into(),
    );
    for field in ["workers", "ops_per_sec", "p50_us", "p99_us", "max_us"] {
        summary.insert(field.into(), Value::Null);
    }
    summary.insert("ops".into(), config.ops.into());
    summary.insert(
        "ttl_ms".into(),
        u64::try_from(context.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .into(),
    );
    summary.insert(
        "sweep".into(),
        points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "workers": p.workers,
                    "ops_per_sec": report::round(p.ours),
                    "peer_ops_per_sec": p.theirs.map(report::round),
                    "ratio": p.theirs.filter(|t| *t > 0.0).map(|t| report::round2(p.ours / t)),
                })
            })
            .collect(),
    );
    if let Some(p) = peer {
        // The fields every result with --peer has; the rates and the ratio are per point.
        summary.insert("peer".into(), p.name().into());
        summary.insert("peer_ops".into(), config.ops.into());
        for field in [
            "peer_ops_per_sec",
            "peer_p50_us",
            "peer_p99_us",
            "peer_max_us",
            "ratio",
        ] {
            summary.insert(field.into(), Value::Null);
        }
        summary.insert(
            "ratio_basis".into(),
            "baton ops/s / peer ops/s, per point (sweep[].ratio)".into(),
        );
    }
    summary.insert("chart".into(), chart_path.display().to_string().into());
    if !notes.is_empty() {
        summary.insert("notes".into(), notes.clone().into());
    }
    if out.is_json() {
        out.json_line(&Value::Object(summary))
            .map_err(|e| output::not_written(None, &e))?;
    } else {
        let mut text: Vec<String> = notes
            .iter()
            .filter_map(Value::as_str)
            .map(|n| format!("note: {n}"))
            .collect();
        text.push(format!("chart written to {}", chart_path.display()));
        out.text(&text.join("\n"))
            .map_err(|e| output::not_written(None, &e))?;
    }
    Ok(0)
}

/// The error for a chart that cannot be written.
fn chart_error(path: &std::path::Path, e: &dyn std::fmt::Display) -> CliError {
    CliError::failed(format!("cannot write the chart {}: {e}", path.display()))
}

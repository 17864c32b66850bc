//! The scenarios, written once against [`Target`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{self, join_all, try_join_all};
use futures::stream::{self, StreamExt, TryStreamExt};
use rand::Rng;
use tokio_util::task::AbortOnDropHandle;

use super::alloc;
use super::progress::Progress;
use super::report::{round, round2, Latencies, Measured};
use super::target::{Failure, Held, Result, Target, Worker};
use super::{Config, Scenario};

/// How many requests a scenario keeps in flight when it sets up many locks or workers.
const IN_FLIGHT: usize = 64;

/// The most entries a scenario reserves room for ahead of time; beyond that, vectors grow
/// as the results come.
const PREALLOCATE: u64 = 1 << 16;

/// How long a run may go without completing an operation before it fails.
const STALL: Duration = Duration::from_secs(20);

/// How long to wait for keys to show up in a queue before giving up.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(60);

/// Run `config.scenario` on `target`.
pub(crate) async fn run(config: &Config, target: &dyn Target) -> Result<Measured> {
    let label = format!("{}/{}", config.scenario.name(), target.name());
    let base = format!(
        "{}/{}/{}-{}",
        config.prefix,
        target.name(),
        config.scenario.name(),
        config.workers
    );
    match config.scenario {
        Scenario::Uncontended | Scenario::Contended => {
            cycles(target, label, &base, config.workers, config.ops, false).await
        }
        Scenario::Distinct => cycles(target, label, &base, config.workers, config.ops, true).await,
        Scenario::Handover => handover(target, label, &base, config.ops, config.settle).await,
        Scenario::Lost => lost(target, label, &base, config).await,
        Scenario::Scale => scale(target, label, &base, config).await,
    }
}

/// Run `task` on the runtime, aborted if its handle is dropped: a scenario cut short (by a
/// signal) leaves no task running.
fn spawn<T: Send + 'static>(
    task: impl std::future::Future<Output = T> + Send + 'static,
) -> AbortOnDropHandle<T> {
    AbortOnDropHandle::new(tokio::spawn(task))
}

/// Connect `n` workers, each with its own connection and session. If one fails, no more
/// are started, those built meanwhile are closed, and the first failure is returned.
async fn workers(target: &dyn Target, n: u64) -> Result<Vec<Arc<dyn Worker>>> {
    let failed = AtomicBool::new(false);
    let results: Vec<Result<Box<dyn Worker>>> = stream::iter(0..n)
        .take_while(|_| future::ready(!failed.load(Ordering::Relaxed)))
        .map(|i| {
            let failed = &failed;
            async move {
                let r = target.worker().await;
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                r.map_err(|e| Failure(format!("worker {} of {n}: {}", i + 1, e.0)))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let mut built = Vec::with_capacity(results.len());
    let mut failure = None;
    for r in results {
        match r {
            Ok(w) => built.push(Arc::from(w)),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        None => Ok(built),
        Some(e) => {
            close_all(&built).await;
            Err(e)
        }
    }
}

/// Close `workers` all at once: each close waits up to the release timeout (5 s) for the
/// backend, and with the backend gone, `IN_FLIGHT` at a time took that long per 64 workers
/// after the run had failed (80 s for 1,000 waiters). Each worker has a connection of its
/// own, which its waits used all at once already.
async fn close_all(workers: &[Arc<dyn Worker>]) {
    stream::iter(workers)
        .for_each_concurrent(None, |w| w.close())
        .await;
}

/// Lock and unlock `name` once; how long it took. With `holders` (every worker on one
/// key), the lock's exclusion is checked: a worker that is granted the lock while another
/// holds it fails the run.
async fn cycle(worker: &dyn Worker, name: &str, holders: Option<&AtomicU64>) -> Result<Duration> {
    let started = Instant::now();
    let held = worker.lock(name).await?;
    if let Some(h) = holders {
        let others = h.fetch_add(1, Ordering::SeqCst);
        if others > 0 {
            return Err(Failure(format!(
                "mutual exclusion violated: {} workers held {name} at once",
                others + 1
            )));
        }
        // Let the other workers run while we hold, so that an overlap shows.
        tokio::task::yield_now().await;
        h.fetch_sub(1, Ordering::SeqCst);
    }
    held.release().await?;
    Ok(started.elapsed())
}

/// uncontended, contended, distinct: `n` workers lock+unlock until `ops` cycles are done,
/// all on one key, or each on its own (`own_keys`).
async fn cycles(
    target: &dyn Target,
    label: String,
    base: &str,
    n: u64,
    ops: u64,
    own_keys: bool,
) -> Result<Measured> {
    let ws = workers(target, n).await?;
    let name = |i: usize| {
        if own_keys {
            format!("{base}/lock-{i}")
        } else {
            format!("{base}/lock")
        }
    };
    // Every worker on one key: count the holders, to check the lock's exclusion.
    let holders = (!own_keys).then(|| Arc::new(AtomicU64::new(0)));
    // Warm up: one cycle per worker (connections, and anything opened on first use).
    let warmed = AtomicU64::new(0);
    let warm_up = try_join_all(ws.iter().enumerate().map(|(i, w)| {
        let (name, holders, warmed) = (name(i), holders.clone(), &warmed);
        async move {
            let r = cycle(w.as_ref(), &name, holders.as_deref()).await;
            warmed.fetch_add(1, Ordering::Relaxed);
            r
        }
    }));
    // The warm-up waits for the backend too: bounded as the run is.
    tokio::select! {
        r = warm_up => { r?; }
        e = stall(|| warmed.load(Ordering::Relaxed), n) => return Err(e),
    }

    let tickets = Arc::new(AtomicU64::new(ops));
    let progress = Arc::new(Progress::start(label, ops, "ops"));
    let before = target.counters();
    let started = Instant::now();
    let tasks: Vec<_> = ws
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let (w, name, tickets, progress, holders) = (
                w.clone(),
                name(i),
                tickets.clone(),
                progress.clone(),
                holders.clone(),
            );
            spawn(async move {
                let mut samples = Vec::new();
                while take(&tickets) {
                    match cycle(w.as_ref(), &name, holders.as_deref()).await {
                        Ok(d) => samples.push(d),
                        Err(e) => {
                            tickets.store(0, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    progress.inc();
                }
                Ok(samples)
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(usize::try_from(ops.min(PREALLOCATE)).unwrap_or(0));
    let mut failure = None;
    // The first failure ends the run: the other workers may be waiting for a backend that
    // is gone (a Redis waiter retries until the server is back), and are aborted.
    let mut running: futures::stream::FuturesUnordered<_> = tasks.into_iter().collect();
    // A run where no operation completes for STALL (the backend gone: Baton's Redis
    // waiters retry until it is back) fails rather than wait forever.
    let watched = progress.clone();
    let mut stalled = Box::pin(async move { stall(|| watched.done(), ops).await });
    loop {
        tokio::select! {
            t = running.next() => match t {
                None => break,
                Some(t) => match t.map_err(Failure::from).and_then(|r| r) {
                    Ok(s) => samples.extend(s),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                },
            },
            e = &mut stalled => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(running);
    drop(stalled);
    let elapsed = started.elapsed();
    let after = target.counters();
    drop(progress);
    close_all(&ws).await;
    if let Some(e) = failure {
        return Err(e);
    }
    let done = samples.len() as u64;
    let mut m = Measured {
        ops: done,
        elapsed,
        ops_per_sec: Some(done as f64 / elapsed.as_secs_f64()),
        latencies: Latencies::of(samples),
        ..Measured::default()
    };
    m.extra(
        "wakeups_per_op",
        match (after.wakeups, before.wakeups) {
            (Some(a), Some(b)) if done > 0 => Some(round2((a - b) as f64 / done as f64)),
            _ => None,
        },
    );
    m.extra(
        "watches_opened",
        match (after.watches_opened, before.watches_opened) {
            (Some(a), Some(b)) => Some(a - b),
            _ => None,
        },
    );
    Ok(m)
}

/// Completes, with the failure, once `done()` has not grown for [`STALL`].
async fn stall(done: impl Fn() -> u64, ops: u64) -> Failure {
    stall_for(done, STALL, |now| {
        format!("no operation completed for {STALL:?} ({now} of {ops} done): is the backend up?")
    })
    .await
}

/// Completes, with the failure `message(done())`, once `done()` has not grown for `limit`.
async fn stall_for(
    done: impl Fn() -> u64,
    limit: Duration,
    message: impl Fn(u64) -> String,
) -> Failure {
    // Tokio's clock (the same as std's unless a test pauses it).
    let (mut last, mut since) = (done(), tokio::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = done();
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() >= limit {
            return Failure(message(now));
        }
    }
}

/// Run `work`, which bumps `activity` at each step it completes; fail it once no step has
/// completed for `limit` (the backend gone: Baton's Redis waiters, and a campaign, retry
/// until it is back, so `work` alone would wait for ever). `work` is dropped then, with
/// whatever it holds.
async fn bounded<T>(
    work: impl std::future::Future<Output = Result<T>>,
    activity: &AtomicU64,
    limit: Duration,
    what: &str,
) -> Result<T> {
    tokio::select! {
        r = work => r,
        e = stall_for(|| activity.load(Ordering::Relaxed), limit, |_| {
            format!("{what}: nothing completed for {limit:?}: is the backend up?")
        }) => Err(e),
    }
}

/// Count one completed step of a [`bounded`] run.
fn step(activity: &AtomicU64) {
    activity.fetch_add(1, Ordering::Relaxed);
}

/// Take one ticket if any is left.
fn take(tickets: &AtomicU64) -> bool {
    tickets
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(1))
        .is_ok()
}

/// Poll until `name` has `n` keys queued; each time more are queued than before is a
/// step of `activity`.
async fn wait_queued(
    target: &dyn Target,
    name: &str,
    n: usize,
    poll: Duration,
    activity: &AtomicU64,
) -> Result<()> {
    let deadline = Instant::now() + QUEUE_TIMEOUT;
    let mut seen = 0;
    loop {
        let queued = target.queued(name).await?;
        if queued > seen {
            seen = queued;
            step(activity);
        }
        if queued >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Failure(format!(
                "{n} keys did not queue on {name} within {QUEUE_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

/// handover: two candidates take turns. Each round the other candidate campaigns; once its
/// key is queued (and `settle` has passed) the leader resigns, and we time from resign()
/// returning to the waiting campaign() returning. One round first warms up, uncounted.
async fn handover(
    target: &dyn Target,
    label: String,
    base: &str,
    ops: u64,
    settle: Duration,
) -> Result<Measured> {
    let name = format!("{base}/election");
    let ws = workers(target, 2).await?;
    let (mut leader_w, mut waiter_w) = (ws[0].clone(), ws[1].clone());
    let activity = AtomicU64::new(0);
    let work = async {
        let mut leader = leader_w.campaign(&name, "candidate-0").await?;
        step(&activity);
        let progress = Progress::start(label, ops, "handovers");
        let mut samples = Vec::new();
        let mut from_call = Vec::new();
        let mut early = 0u64;
        let started = Instant::now();
        for turn in 0..=ops {
            let (w, n, value) = (waiter_w.clone(), name.clone(), format!("candidate-{turn}"));
            let campaign = spawn(async move {
                let r = w.campaign(&n, &value).await;
                (r, Instant::now())
            });
            wait_queued(target, &name, 2, Duration::from_millis(1), &activity).await?;
            if !settle.is_zero() {
                tokio::time::sleep(settle).await;
            }
            let resigning = Instant::now();
            leader.release().await?;
            step(&activity);
            let resigned = Instant::now();
            let (next, elected) = campaign.await?;
            leader = next?;
            step(&activity);
            if turn > 0 {
                // The successor may learn of the delete before the resigner's reply arrives:
                // that counts as 0 from resign() returning.
                samples.push(elected.saturating_duration_since(resigned));
                from_call.push(elected.saturating_duration_since(resigning));
                early += u64::from(elected <= resigned);
                progress.inc();
            }
            std::mem::swap(&mut leader_w, &mut waiter_w);
        }
        let elapsed = started.elapsed();
        leader.release().await?;
        let mut m = Measured {
            ops: samples.len() as u64,
            elapsed,
            latencies: Latencies::of(samples),
            ..Measured::default()
        };
        let call = Latencies::of(from_call);
        m.extra("from_resign_call_p50_us", call.map(|l| l.p50_us));
        m.extra("from_resign_call_p99_us", call.map(|l| l.p99_us));
        m.extra("from_resign_call_max_us", call.map(|l| l.max_us));
        m.extra("elected_before_resign_returned", early);
        Ok::<_, Failure>(m)
    };
    // A turn waits for the backend (a campaign retries until it is back): bounded.
    let result = bounded(work, &activity, STALL + settle, "handover").await;
    close_all(&ws).await;
    let mut m = result?;
    m.extra("settle_ms", settle.as_millis() as u64);
    Ok(m)
}

/// lost: each probe holds a lock on a session of its own, waits a random part of the
/// keep-alive interval (TTL/3, for every target), revokes the lease from another
/// connection, and times until the holder is told. A probe not told within the TTL is
/// missed.
async fn lost(target: &dyn Target, label: String, base: &str, config: &Config) -> Result<Measured> {
    let phase = config.ttl / 3;
    let limit = config.ttl;
    let progress = Progress::start(label, config.ops, "probes");
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut missed = 0u64;
    let mut next = 0;
    // A probe takes its lock, waits up to a keep-alive interval and up to the TTL for the
    // loss: a batch in which no probe ends for that and STALL more fails the run (the
    // backend gone: a lock waits for it).
    let activity = AtomicU64::new(0);
    let limit_all = STALL + phase + limit;
    while next < config.ops {
        let batch = next..config.ops.min(next.saturating_add(config.workers.max(1)));
        next = batch.end;
        let results = join_all(batch.map(|i| {
            let name = format!("{base}/lock-{i}");
            let (progress, activity) = (&progress, &activity);
            async move {
                let r = probe(target, &name, phase, limit).await;
                progress.inc();
                step(activity);
                r
            }
        }));
        let results = bounded(async { Ok(results.await) }, &activity, limit_all, "lost").await?;
        for r in results {
            match r? {
                Some(d) => samples.push(d),
                None => missed += 1,
            }
        }
    }
    let mut m = Measured {
        ops: config.ops,
        elapsed: started.elapsed(),
        latencies: Latencies::of(samples),
        ..Measured::default()
    };
    m.extra("missed", missed);
    m.extra("keep_alive_interval_ms", phase.as_millis() as u64);
    if let Some(note) = target.lost_note() {
        m.notes.push(note.to_string());
    }
    Ok(m)
}

async fn probe(
    target: &dyn Target,
    name: &str,
    phase: Duration,
    limit: Duration,
) -> Result<Option<Duration>> {
    let worker = target.worker().await?;
    let result = async {
        let held = worker.lock(name).await?;
        let wait =
            rand::thread_rng().gen_range(Duration::ZERO..phase.max(Duration::from_millis(1)));
        tokio::time::sleep(wait).await;
        let revoked = Instant::now();
        target.revoke(held.as_ref()).await?;
        let told = tokio::time::timeout(limit, held.lost())
            .await
            .ok()
            .map(|()| revoked.elapsed());
        Ok::<_, Failure>(told)
    }
    .await;
    worker.close().await;
    result
}

/// scale: hold `ops` locks on one session (memory, keep-alive traffic, watches); then queue
/// `workers` waiters on one key and release (handoff rate, wake-ups per release), and run 8
/// contended workers for the reference rate.
async fn scale(
    target: &dyn Target,
    label: String,
    base: &str,
    config: &Config,
) -> Result<Measured> {
    let mut m = Measured::default();
    hold_many(target, &label, base, config, &mut m).await?;
    queue_many(target, &label, base, config, &mut m).await?;
    Ok(m)
}

async fn hold_many(
    target: &dyn Target,
    label: &str,
    base: &str,
    config: &Config,
    m: &mut Measured,
) -> Result<()> {
    let n = config.ops;
    let worker: Arc<dyn Worker> = Arc::from(target.worker().await?);
    let activity = AtomicU64::new(0);
    let work = async {
        let before = target.counters();
        let (heap0, rss0) = (alloc::heap_in_use(), alloc::rss());
        let progress = Progress::start(format!("{label} (hold)"), n, "locks held");
        let started = Instant::now();
        let mut held: Vec<Box<dyn Held>> =
            Vec::with_capacity(usize::try_from(n.min(PREALLOCATE)).unwrap_or(0));
        let mut per_quarter = Vec::new();
        let mut last = (0u64, heap0);
        for q in 1..=4u64 {
            let upto = n * q / 4;
            let more: Vec<Box<dyn Held>> = stream::iter(last.0..upto)
                .map(|i| {
                    let (w, name, progress, activity) = (
                        worker.clone(),
                        format!("{base}/held-{i}"),
                        &progress,
                        &activity,
                    );
                    async move {
                        let h = w.lock(&name).await;
                        progress.inc();
                        step(activity);
                        // The embedded store grants at once: without this the loop never
                        // returns to the runtime, and a signal is never seen.
                        tokio::task::consume_budget().await;
                        h
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect()
                .await?;
            held.extend(more);
            let heap = alloc::heap_in_use();
            if upto > last.0 {
                per_quarter.push((heap - last.1) / i64::try_from(upto - last.0).unwrap_or(1));
            }
            last = (upto, heap);
        }
        let acquire = started.elapsed();
        drop(progress);
        let heap_per_lock = (last.1 - heap0) / i64::try_from(n.max(1)).unwrap_or(1);
        let rss_per_lock = match (rss0, alloc::rss()) {
            (Some(a), Some(b)) => Some((b - a) / i64::try_from(n.max(1)).unwrap_or(1)),
            _ => None,
        };
        let acquired = target.counters();

        // Keep-alive traffic while holding: one and a half keep-alive intervals.
        let interval = config.ttl / 3;
        let window = interval * 3 / 2;
        let watching = Progress::start(
            format!("{label} (keep-alive traffic)"),
            window.as_secs().max(1),
            "s watched",
        );
        let end = Instant::now() + window;
        while let Some(left) = end
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
            watching.inc();
            step(&activity);
        }
        drop(watching);
        let after = target.counters();
        let keep_alives = after.keep_alives - acquired.keep_alives;

        stream::iter(held)
            .map(|h| async {
                let released = h.release().await;
                step(&activity);
                tokio::task::consume_budget().await;
                released
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;

        m.ops = n;
        m.extra("held_locks", n);
        m.extra(
            "hold_acquire_per_sec",
            round(n as f64 / acquire.as_secs_f64()),
        );
        m.extra("heap_bytes_per_held_lock", heap_per_lock);
        m.extra("heap_bytes_per_held_lock_by_quarter", per_quarter);
        m.extra("rss_bytes_per_held_lock", rss_per_lock);
        m.extra(
            "keep_alives_per_sec",
            round2(keep_alives as f64 / window.as_secs_f64()),
        );
        // The keep-alive traffic, in leases: the fewest leases that could have sent it. In
        // a window of 1.5 intervals one lease sends one or two keep-alives, so a count
        // divided by 1.5 could read two leases sending one each as one; the fewest is
        // exact about the traffic (at most one lease's) and never reads many as one.
        let per_lease_max = (window.as_nanos() / interval.as_nanos().max(1)) as u64 + 1;
        m.extra("leases_kept_alive", keep_alives.div_ceil(per_lease_max));
        m.extra(
            "watches_opened_for_held",
            match (acquired.watches_opened, before.watches_opened) {
                (Some(a), Some(b)) => Some(a - b),
                _ => None,
            },
        );
        Ok::<_, Failure>(())
    };
    let result = bounded(work, &activity, STALL, "scale (hold)").await;
    worker.close().await;
    result
}

async fn queue_many(
    target: &dyn Target,
    label: &str,
    base: &str,
    config: &Config,
    m: &mut Measured,
) -> Result<()> {
    let n = config.workers;
    let name = format!("{base}/queue");
    let holder = target.worker().await?;
    let ws = match workers(target, n).await {
        Ok(ws) => ws,
        Err(e) => {
            holder.close().await;
            return Err(e);
        }
    };
    let activity = Arc::new(AtomicU64::new(0));
    let work = async {
        let held = holder.lock(&name).await?;
        step(&activity);
        let progress = Arc::new(Progress::start(format!("{label} (queue)"), n, "handoffs"));
        let tasks: Vec<_> = ws
            .iter()
            .map(|w| {
                let (w, name, progress, activity) =
                    (w.clone(), name.clone(), progress.clone(), activity.clone());
                spawn(async move {
                    let h = w.lock(&name).await?;
                    let at = Instant::now();
                    h.release().await?;
                    progress.inc();
                    step(&activity);
                    Ok::<_, Failure>(at)
                })
            })
            .collect();
        let n_keys = usize::try_from(n).unwrap_or(usize::MAX).saturating_add(1);
        wait_queued(target, &name, n_keys, Duration::from_millis(10), &activity).await?;
        // Let every waiter finish setting up (its read and its watch) before the first
        // release, as waiters that have queued for a while would have.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let before = target.counters();
        let released = Instant::now();
        held.release().await?;
        let mut last = released;
        for t in join_all(tasks).await {
            last = last.max(t??);
        }
        let elapsed = last.saturating_duration_since(released);
        let after = target.counters();
        let rate = n as f64 / elapsed.as_secs_f64();
        m.elapsed = elapsed;
        m.ops_per_sec = Some(rate);
        m.extra("waiters", n);
        m.extra("handoff_per_sec", round(rate));
        m.extra(
            "wakeups_per_release",
            match (after.wakeups, before.wakeups) {
                (Some(a), Some(b)) => Some(round2((a - b) as f64 / n as f64)),
                _ => None,
            },
        );
        Ok::<_, Failure>(())
    };
    // The 250 ms settle above is no step: well within STALL.
    let result = bounded(work, &activity, STALL, "scale (queue)").await;
    close_all(&ws).await;
    holder.close().await;
    result?;

    // The reference: 8 contended workers, as `bench contended` runs them.
    let reference = cycles(
        target,
        format!("{label} (8 contended)"),
        &format!("{base}/contended8"),
        8,
        (n * 2).clamp(16, 200),
        false,
    )
    .await?;
    let r8 = reference.ops_per_sec.unwrap_or(0.0);
    m.extra("contended8_ops_per_sec", round(r8));
    m.extra(
        "handoff_vs_contended8",
        (r8 > 0.0).then(|| round2(m.ops_per_sec.unwrap_or(0.0) / r8)),
    );
    m.notes.push(format!(
        "ops is the number of locks held at once on one session; ops_per_sec is the handoff rate \
         of {n} waiters queued on one key, each with its own connection and session"
    ));
    Ok(())
}

#[cfg(test)]
mod exclusion_tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use async_trait::async_trait;
    use futures::future::BoxFuture;

    use super::super::target::Counters;
    use super::*;

    /// A target that is no backend: its `lock()` grants at once (`grants`: a lock that
    /// excludes nobody, as a broken implementation, or a hold lost mid-run, would) or never
    /// returns (a backend gone, waited for as Baton's Redis waiters do).
    struct Fake {
        grants: bool,
    }
    struct FakeWorker {
        grants: bool,
    }
    struct NoExclusionHeld;

    #[async_trait]
    impl Target for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn backend(&self) -> &'static str {
            "mem"
        }
        async fn worker(&self) -> Result<Box<dyn Worker>> {
            Ok(Box::new(FakeWorker {
                grants: self.grants,
            }))
        }
        async fn revoke(&self, _held: &dyn Held) -> Result<()> {
            Ok(())
        }
        async fn queued(&self, _name: &str) -> Result<usize> {
            Ok(0)
        }
        fn counters(&self) -> Counters {
            Counters::default()
        }
    }

    #[async_trait]
    impl Worker for FakeWorker {
        async fn lock(&self, _name: &str) -> Result<Box<dyn Held>> {
            if !self.grants {
                future::pending::<()>().await;
            }
            Ok(Box::new(NoExclusionHeld))
        }
        async fn campaign(&self, name: &str, _value: &str) -> Result<Box<dyn Held>> {
            self.lock(name).await
        }
        async fn close(&self) {}
    }

    /// A contended run of 4 workers and 40 operations.
    fn contended() -> Config {
        of(Scenario::Contended)
    }

    /// A run of `scenario`, 4 workers and 40 operations, TTL 6 s.
    fn of(scenario: Scenario) -> Config {
        Config {
            scenario,
            workers: 4,
            ops: 40,
            ttl: Duration::from_secs(6),
            settle: Duration::ZERO,
            prefix: "p".into(),
        }
    }

    #[async_trait]
    impl Held for NoExclusionHeld {
        fn lease(&self) -> i64 {
            0
        }
        fn lost(&self) -> BoxFuture<'_, ()> {
            Box::pin(future::pending())
        }
        async fn release(self: Box<Self>) -> Result<()> {
            // Hold for a while, so that the holds of the workers overlap.
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(())
        }
    }

    /// `bench contended` is a run of a mutual-exclusion lock under contention: if two
    /// workers hold the one key at once, the numbers are those of a lock that does not
    /// lock, and the run must fail saying so (it reported a rate: found by review).
    #[tokio::test]
    async fn contended_fails_when_two_workers_hold_the_lock_at_once() {
        match run(&contended(), &Fake { grants: true }).await {
            Ok(m) => panic!(
                "contended on a lock that excludes nobody reported {:?} ops/s and no failure",
                m.ops_per_sec
            ),
            Err(e) => assert!(e.0.contains("at once"), "{}", e.0),
        }
    }

    /// A backend gone during the warm-up (every `lock()` then waits for it, as
    /// Baton's Redis waiters do) hung the run for ever: the 20 s stall check starts only
    /// after the warm-up, which `cycles` awaited with no bound (found by review).
    #[tokio::test]
    async fn a_backend_gone_in_the_warm_up_fails_the_run() {
        let gone = Fake { grants: false };
        let r =
            tokio::time::timeout(STALL + Duration::from_secs(10), run(&contended(), &gone)).await;
        assert!(
            r.is_ok(),
            "the run still waits {:?} after the backend went (warm-up)",
            STALL + Duration::from_secs(10)
        );
    }

    /// `handover`, `lost` and `scale` had no stall check: with the backend gone (every
    /// `lock()` and `campaign()` waiting for it, as Baton's Redis waiters do) they waited
    /// for ever. Each now fails once nothing has completed for STALL (its longest step
    /// added: the settle, or a probe's wait and TTL). The clock is paused: minutes pass at
    /// once.
    #[tokio::test(start_paused = true)]
    async fn a_backend_gone_fails_handover_lost_and_scale() {
        let gone = Fake { grants: false };
        for scenario in [Scenario::Handover, Scenario::Lost, Scenario::Scale] {
            let config = of(scenario);
            let bound = STALL * 3 + config.ttl * 2;
            match tokio::time::timeout(bound, run(&config, &gone)).await {
                Err(_) => panic!("{scenario:?} still waits {bound:?} after the backend went"),
                Ok(Ok(_)) => panic!("{scenario:?} on a backend gone reported a result"),
                Ok(Err(e)) => assert!(e.0.contains("is the backend up?"), "{}", e.0),
            }
        }
    }

    /// The stall check of `lost` must not fail a run whose probes are slow by design: each
    /// waits up to the TTL for a loss that (here) never comes, and is counted missed.
    #[tokio::test(start_paused = true)]
    async fn lost_with_a_long_ttl_is_not_a_stall() {
        let config = Config {
            workers: 1,
            ops: 3,
            ttl: Duration::from_secs(60),
            ..of(Scenario::Lost)
        };
        let m = run(&config, &Fake { grants: true }).await.unwrap();
        assert_eq!(m.ops, 3);
    }

    /// A worker whose backend is gone: its close waits out the release timeout (5 s), as
    /// a session's close does with etcd gone (its lease revoke unanswered).
    struct SlowCloseWorker;

    #[async_trait]
    impl Worker for SlowCloseWorker {
        async fn lock(&self, _name: &str) -> Result<Box<dyn Held>> {
            future::pending().await
        }
        async fn campaign(&self, _name: &str, _value: &str) -> Result<Box<dyn Held>> {
            future::pending().await
        }
        async fn close(&self) {
            tokio::time::sleep(crate::cli::RELEASE_TIMEOUT).await;
        }
    }

    /// A run that failed with the backend gone (the stall check, or an
    /// error) then closed its workers 64 at a time, each close waiting up to 5 s: with etcd
    /// killed mid-`scale` of 1,000 waiters, baton exited 95 s after the kill (80 s of it
    /// closing), and 10,000 waiters would take 13 minutes. Closing them all takes one
    /// release timeout.
    #[tokio::test(start_paused = true)]
    async fn closing_many_workers_with_the_backend_gone_takes_one_release_timeout() {
        let ws: Vec<Arc<dyn Worker>> = (0..1000)
            .map(|_| Arc::new(SlowCloseWorker) as Arc<dyn Worker>)
            .collect();
        let started = tokio::time::Instant::now();
        close_all(&ws).await;
        let took = started.elapsed();
        assert!(
            took <= crate::cli::RELEASE_TIMEOUT * 2,
            "closing 1000 workers with the backend gone took {took:?}"
        );
    }
}

//! What a run found, as one JSON object or a human table, with the targets checked.

use std::time::Duration;

use serde_json::{Map, Value};

use super::{Config, Scenario};

/// What one scenario measured on one target.
#[derive(Debug, Default)]
pub(crate) struct Measured {
    /// Operations completed.
    pub(crate) ops: u64,
    /// Wall time of the measured part.
    pub(crate) elapsed: Duration,
    /// Operations per second, where a rate applies.
    pub(crate) ops_per_sec: Option<f64>,
    /// Latency percentiles, where latencies apply.
    pub(crate) latencies: Option<Latencies>,
    /// Scenario-specific results, in order.
    pub(crate) extras: Vec<(&'static str, Value)>,
    /// What the reader must know to read the numbers.
    pub(crate) notes: Vec<String>,
}

impl Measured {
    pub(crate) fn extra(&mut self, key: &'static str, value: impl Into<Value>) {
        self.extras.push((key, value.into()));
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.extras.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// Latency percentiles in microseconds (nearest rank).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latencies {
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) max_us: u64,
}

impl Latencies {
    /// Percentiles of `samples`, or `None` if there are none.
    pub(crate) fn of(mut samples: Vec<Duration>) -> Option<Latencies> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            micros(samples[rank - 1])
        };
        Some(Latencies {
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us: micros(samples[samples.len() - 1]),
        })
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Where the run happened.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) backend: &'static str,
    pub(crate) endpoints: String,
    pub(crate) server_version: Option<String>,
    /// The TTL the run used (on etcd and the embedded store, --ttl rounded up to whole
    /// seconds).
    pub(crate) ttl: Duration,
    /// What the reader must know about the run as a whole, before the targets' notes.
    pub(crate) notes: Vec<String>,
}

/// Round to one decimal, for rates and ratios.
pub(crate) fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Round to two decimals.
pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// How the ratio is taken: Baton's rate over the peer's, or the peer's p50 over Baton's.
pub(crate) fn ratio(
    scenario: Scenario,
    ours: &Measured,
    theirs: &Measured,
) -> (Option<f64>, &'static str) {
    match scenario {
        Scenario::Handover => {
            // Timed from the resign() call: from its return, Baton's p50 is often 0.
            let p50 = |m: &Measured| m.get("from_resign_call_p50_us").and_then(Value::as_f64);
            let r = match (p50(ours), p50(theirs)) {
                (Some(o), Some(t)) if o > 0.0 => Some(t / o),
                _ => None,
            };
            (
                r,
                "peer p50 / baton p50, both timed from the resign() call (how many times faster)",
            )
        }
        Scenario::Lost => {
            let r = match (ours.latencies, theirs.latencies) {
                (Some(o), Some(t)) if o.p50_us > 0 => Some(t.p50_us as f64 / o.p50_us as f64),
                _ => None,
            };
            (r, "peer p50 / baton p50 (how many times faster)")
        }
        _ => {
            let r = match (ours.ops_per_sec, theirs.ops_per_sec) {
                (Some(o), Some(t)) if t > 0.0 => Some(o / t),
                _ => None,
            };
            (r, "baton ops/s / peer ops/s")
        }
    }
}

/// Whether the `lost` goal is met: not if a probe was missed (even when none was
/// notified, so that there are no latencies), else whether the p99 is within the limit
/// (`within`, `None` without latencies).
fn lost_goal(missed: Option<f64>, within: Option<bool>) -> Option<bool> {
    match missed {
        Some(m) if m > 0.0 => Some(false),
        Some(_) => within,
        None => within.map(|_| false),
    }
}

/// The target for this run, and whether it was met (`None`: cannot tell, e.g. no
/// peer to compare with).
fn goal(
    config: &Config,
    backend: &str,
    ours: &Measured,
    ratio: Option<f64>,
) -> Option<(&'static str, Option<bool>)> {
    let lat = ours.latencies;
    let number = |key: &str| ours.get(key).and_then(Value::as_f64);
    if matches!(backend, "redis" | "redlock") {
        // The Redis issue's targets, against rslock.
        let limit_us = u64::try_from((config.ttl / 3).as_micros()).unwrap_or(u64::MAX) + 50_000;
        return match config.scenario {
            Scenario::Contended if config.workers == 8 => Some((
                ">= 2x the peer's ops/s with 8 workers",
                ratio.map(|r| r >= 2.0),
            )),
            Scenario::Uncontended => Some((">= the peer's ops/s", ratio.map(|r| r >= 1.0))),
            Scenario::Lost => Some((
                "lost() within TTL/3 + 50 ms of the DEL at p99, every probe notified",
                lost_goal(number("missed"), lat.map(|l| l.p99_us <= limit_us)),
            )),
            _ => None,
        };
    }
    match config.scenario {
        Scenario::Contended if config.workers == 8 => Some((
            ">= 10x the peer's ops/s with 8 workers",
            ratio.map(|r| r >= 10.0),
        )),
        Scenario::Contended => None,
        Scenario::Uncontended | Scenario::Distinct => {
            Some((">= the peer's ops/s", ratio.map(|r| r >= 1.0)))
        }
        Scenario::Handover => Some((
            "p50 <= 5 ms and p99 <= 20 ms",
            lat.map(|l| l.p50_us <= 5_000 && l.p99_us <= 20_000),
        )),
        Scenario::Lost => Some((
            "lost() within 50 ms of the revoke at p99, every probe notified",
            lost_goal(number("missed"), lat.map(|l| l.p99_us <= 50_000)),
        )),
        Scenario::Scale => Some((
            "one lease kept alive for all held locks; every release wakes exactly one waiter; \
             handoff rate >= 50% of the 8-worker contended rate",
            match (
                number("leases_kept_alive"),
                number("wakeups_per_release"),
                number("handoff_vs_contended8"),
            ) {
                (Some(leases), Some(w), Some(h)) => Some(leases == 1.0 && w == 1.0 && h >= 0.5),
                _ => None,
            },
        )),
    }
}

/// The result as one JSON object.
pub(crate) fn object(
    config: &Config,
    context: &Context,
    ours: &Measured,
    theirs: Option<&(&'static str, Measured)>,
) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("scenario".into(), config.scenario.name().into());
    o.insert("backend".into(), context.backend.into());
    o.insert(
        "server_version".into(),
        context.server_version.clone().into(),
    );
    o.insert("workers".into(), config.workers.into());
    o.insert("ops".into(), ours.ops.into());
    o.insert(
        "ttl_ms".into(),
        u64::try_from(context.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .into(),
    );
    put_measured(&mut o, "", ours);
    if let Some((name, theirs)) = theirs {
        o.insert("peer".into(), (*name).into());
        o.insert("peer_ops".into(), theirs.ops.into());
        put_measured(&mut o, "peer_", theirs);
        let (r, basis) = ratio(config.scenario, ours, theirs);
        o.insert("ratio".into(), r.map(round2).into());
        o.insert("ratio_basis".into(), basis.into());
    }
    let r = theirs.and_then(|(_, t)| ratio(config.scenario, ours, t).0);
    if let Some((text, met)) = goal(config, context.backend, ours, r) {
        o.insert("goal".into(), text.into());
        o.insert("goal_met".into(), met.into());
    }
    let notes: Vec<Value> = context
        .notes
        .iter()
        .cloned()
        .chain(ours.notes.iter().map(|n| format!("baton: {n}")))
        .chain(
            theirs
                .iter()
                .flat_map(|(name, t)| t.notes.iter().map(move |n| format!("{name}: {n}"))),
        )
        .map(Value::from)
        .collect();
    if !notes.is_empty() {
        o.insert("notes".into(), notes.into());
    }
    o
}

fn put_measured(o: &mut Map<String, Value>, prefix: &str, m: &Measured) {
    o.insert(
        format!("{prefix}ops_per_sec"),
        m.ops_per_sec.map(round).into(),
    );
    o.insert(
        format!("{prefix}p50_us"),
        m.latencies.map(|l| l.p50_us).into(),
    );
    o.insert(
        format!("{prefix}p99_us"),
        m.latencies.map(|l| l.p99_us).into(),
    );
    o.insert(
        format!("{prefix}max_us"),
        m.latencies.map(|l| l.max_us).into(),
    );
    o.insert(
        format!("{prefix}elapsed_ms"),
        u64::try_from(m.elapsed.as_millis())
            .unwrap_or(u64::MAX)
            .into(),
    );
    for (k, v) in &m.extras {
        o.insert(format!("{prefix}{k}"), v.clone());
    }
}

/// The result as a table for people.
pub(crate) fn human(
    config: &Config,
    context: &Context,
    ours: &Measured,
    theirs: Option<&(&'static str, Measured)>,
    object: &Map<String, Value>,
) -> String {
    let mut lines = vec![format!(
        "bench {} on {} ({}{}): {} worker{}, {} ops, ttl {}",
        config.scenario.name(),
        context.backend,
        context.endpoints,
        context
            .server_version
            .as_ref()
            .map(|v| format!(", version {v}"))
            .unwrap_or_default(),
        config.workers,
        if config.workers == 1 { "" } else { "s" },
        ours.ops,
        crate::output::duration(context.ttl),
    )];
    let mut header = vec![String::new(), "baton".to_string()];
    if let Some((name, _)) = theirs {
        header.push((*name).to_string());
    }
    let mut rows = vec![header];
    let both = |f: &dyn Fn(&Measured) -> String| {
        let mut row = vec![f(ours)];
        if let Some((_, t)) = theirs {
            row.push(f(t));
        }
        row
    };
    let mut push = |label: &str, cells: Vec<String>| {
        let mut row = vec![label.to_string()];
        row.extend(cells);
        rows.push(row);
    };
    push(
        "ops/s",
        both(&|m| {
            m.ops_per_sec
                .map(|r| format!("{r:.1}"))
                .unwrap_or("-".into())
        }),
    );
    for (label, pick) in [
        ("p50", (|l: Latencies| l.p50_us) as fn(Latencies) -> u64),
        ("p99", |l: Latencies| l.p99_us),
        ("max", |l: Latencies| l.max_us),
    ] {
        push(
            label,
            both(&|m| m.latencies.map(|l| us(pick(l))).unwrap_or("-".into())),
        );
    }
    let mut keys: Vec<&'static str> = ours.extras.iter().map(|(k, _)| *k).collect();
    if let Some((_, t)) = theirs {
        for (k, _) in &t.extras {
            if !keys.contains(k) {
                keys.push(k);
            }
        }
    }
    for key in keys {
        push(key, both(&|m| m.get(key).map(cell).unwrap_or("-".into())));
    }
    lines.push(table(&rows));
    if let Some(r) = object.get("ratio") {
        let basis = object
            .get("ratio_basis")
            .and_then(Value::as_str)
            .unwrap_or_default();
        lines.push(format!(
            "ratio: {} ({basis})",
            r.as_f64().map(|r| format!("{r:.2}x")).unwrap_or("-".into())
        ));
    }
    if let Some(g) = object.get("goal").and_then(Value::as_str) {
        let verdict = match object.get("goal_met").and_then(Value::as_bool) {
            Some(true) => "met",
            Some(false) => "NOT met",
            None if object.get("peer").is_none()
                && matches!(
                    config.scenario,
                    Scenario::Uncontended | Scenario::Contended | Scenario::Distinct
                ) =>
            {
                "not evaluated (needs --peer)"
            }
            None => "not evaluated",
        };
        lines.push(format!("goal: {g}: {verdict}"));
    }
    if let Some(notes) = object.get("notes").and_then(Value::as_array) {
        for n in notes.iter().filter_map(Value::as_str) {
            lines.push(format!("note: {n}"));
        }
    }
    lines.join("\n")
}

/// One line of a `--sweep`.
pub(crate) fn sweep_line(
    config: &Config,
    ours: &Measured,
    theirs: Option<&(&'static str, Measured)>,
) -> String {
    let rate = |m: &Measured| m.ops_per_sec.unwrap_or(0.0);
    match theirs {
        Some((name, t)) => format!(
            "workers {:>2}: baton {:>8.1} ops/s, {name} {:>8.1} ops/s, ratio {:.2}x",
            config.workers,
            rate(ours),
            rate(t),
            if rate(t) > 0.0 {
                rate(ours) / rate(t)
            } else {
                0.0
            }
        ),
        None => format!(
            "workers {:>2}: baton {:>8.1} ops/s",
            config.workers,
            rate(ours)
        ),
    }
}

/// Microseconds for people.
fn us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else if us >= 1_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{us} us")
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(c, cell)| {
                    if c == 0 {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `lost` run whose every probe missed has no latencies, and its goal is not met
    /// (it was evaluated: no peer is needed), in the JSON and in the text.
    #[test]
    fn lost_with_every_probe_missed_is_not_met() {
        let config = Config {
            scenario: Scenario::Lost,
            workers: 3,
            ops: 3,
            ttl: Duration::from_secs(2),
            settle: Duration::ZERO,
            prefix: "p".into(),
        };
        for backend in ["etcd", "redis"] {
            let context = Context {
                backend,
                endpoints: "x".into(),
                server_version: None,
                ttl: config.ttl,
                notes: Vec::new(),
            };
            let mut ours = Measured {
                ops: 3,
                ..Measured::default()
            };
            ours.extra("missed", 3u64);
            let o = object(&config, &context, &ours, None);
            assert_eq!(o.get("goal_met"), Some(&Value::Bool(false)), "{backend}");
            let text = human(&config, &context, &ours, None, &o);
            assert!(text.contains(": NOT met"), "{backend}: {text}");
            assert!(!text.contains("needs --peer"), "{backend}: {text}");
        }
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let l = Latencies::of(samples).unwrap();
        assert_eq!((l.p50_us, l.p99_us, l.max_us), (50, 99, 100));
        let l = Latencies::of(vec![Duration::from_micros(7)]).unwrap();
        assert_eq!((l.p50_us, l.p99_us, l.max_us), (7, 7, 7));
        assert!(Latencies::of(Vec::new()).is_none());
    }

    #[test]
    fn human_units() {
        assert_eq!(us(850), "850 us");
        assert_eq!(us(1_500), "1.50 ms");
        assert_eq!(us(2_000_000), "2.00 s");
    }
}

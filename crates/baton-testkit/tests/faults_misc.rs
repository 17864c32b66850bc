//! The rest of the fault suite:
//!
//! - **differential testing**: random sequences of store operations (put, delete, txn with
//!   compares, lease grant and revoke, range with sort and limit) on MemStore and on a real
//!   etcd give the same results, modulo a revision offset and lease ids (proptest; failing
//!   cases are kept in `tests/faults_misc.regressions`);
//! - **parser fuzzing** (proptest, RELIABILITY.md row 22): endpoint URLs through
//!   `Client::connect` and `Coordinator::builder`, and names through `Mutex::new`,
//!   `RwLock::new`, `Election::new` and the Coordinator: no panic, no hang, bad input refused
//!   before any network call (durations are fuzzed through the `baton` binary, in
//!   `crates/baton-cli/tests/faults.rs`);
//! - **wall-clock jumps** (row 21): a worker under libfaketime whose wall clock jumps ±1 h
//!   while it holds; and a check that the library reads no wall clock for timing;
//! - **a soak**: 50 workers on 5 locks over a 3-node cluster behind fault proxies, with
//!   random faults (worker paused, proxy blackholed, member killed) for a bounded time: no
//!   violation, and the RSS and open file descriptors of the test process stay flat.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use baton::store::{
    Compare, CompareOp, KeyRange, KeyValue, Range, RangeResponse, SortOrder, SortTarget, Store,
    Txn, TxnOp, TxnOpResponse,
};
use baton::Client;
use baton_testkit::oracle::{mono_now, report_count, runs, Oracle};
use baton_testkit::proxy::{Fault, FaultProxy};
use baton_testkit::scenarios::{acquired, expect, Kind, Target};
use baton_testkit::{EtcdCluster, EtcdServer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_fault-worker");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Differential testing: MemStore vs etcd

/// One store operation, on a small key space so that operations collide.
#[derive(Clone, Debug)]
enum Op {
    Put {
        key: u8,
        value: u8,
        lease: Option<u8>,
    },
    Delete {
        keys: Keys,
    },
    Range {
        keys: Keys,
        sort: Option<(u8, bool)>,
        limit: u8,
    },
    Txn {
        compares: Vec<Cmp>,
        then: Vec<SubOp>,
        otherwise: Vec<SubOp>,
    },
    Grant,
    Revoke {
        lease: u8,
    },
}

#[derive(Clone, Debug)]
enum Keys {
    One(u8),
    Prefix(u8),
    All,
}

#[derive(Clone, Debug)]
struct Cmp {
    key: u8,
    target: u8,
    op: u8,
    /// A revision relative to the run's start (0 stays 0), a version, or a value.
    value: u8,
}

#[derive(Clone, Debug)]
enum SubOp {
    Put { key: u8, value: u8 },
    Delete { keys: Keys },
    Get { keys: Keys, limit: u8 },
}

fn keys_strategy() -> impl Strategy<Value = Keys> {
    prop_oneof![
        4 => (0u8..6).prop_map(Keys::One),
        2 => (0u8..3).prop_map(Keys::Prefix),
        1 => Just(Keys::All),
    ]
}

fn sub_op_strategy() -> impl Strategy<Value = SubOp> {
    prop_oneof![
        (0u8..6, 0u8..4).prop_map(|(key, value)| SubOp::Put { key, value }),
        keys_strategy().prop_map(|keys| SubOp::Delete { keys }),
        (keys_strategy(), 0u8..3).prop_map(|(keys, limit)| SubOp::Get { keys, limit }),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..6, 0u8..4, proptest::option::of(0u8..3))
            .prop_map(|(key, value, lease)| Op::Put { key, value, lease }),
        2 => keys_strategy().prop_map(|keys| Op::Delete { keys }),
        3 => (keys_strategy(), proptest::option::of((0u8..3, any::<bool>())), 0u8..4)
            .prop_map(|(keys, sort, limit)| Op::Range { keys, sort, limit }),
        4 => (
            proptest::collection::vec(
                (0u8..6, 0u8..4, 0u8..4, 0u8..12)
                    .prop_map(|(key, target, op, value)| Cmp { key, target, op, value }),
                0..3,
            ),
            proptest::collection::vec(sub_op_strategy(), 0..3),
            proptest::collection::vec(sub_op_strategy(), 0..3),
        )
            .prop_map(|(compares, then, otherwise)| Op::Txn { compares, then, otherwise }),
        1 => Just(Op::Grant),
        1 => (0u8..3).prop_map(|lease| Op::Revoke { lease }),
    ]
}

/// One store under test, with what makes its results comparable: its revision at the start
/// of the run, and its lease ids by grant order.
struct Side {
    store: Arc<dyn Store>,
    ns: String,
    base: i64,
    leases: Vec<i64>,
}

impl Side {
    async fn new(store: Arc<dyn Store>, ns: String) -> Side {
        let base = store
            .range(Range::key("none"))
            .await
            .unwrap()
            .header_revision;
        Side {
            store,
            ns,
            base,
            leases: Vec::new(),
        }
    }

    fn key(&self, k: u8) -> Vec<u8> {
        // Keys 0..2 live under p0/, 3..5 under p1/: prefixes overlap some keys.
        format!("{}/p{}/k{k}", self.ns, k / 3).into_bytes()
    }

    fn keys(&self, keys: &Keys) -> KeyRange {
        match keys {
            Keys::One(k) => KeyRange::Key(self.key(*k)),
            Keys::Prefix(p) => KeyRange::Prefix(format!("{}/p{p}/", self.ns).into_bytes()),
            Keys::All => KeyRange::Prefix(format!("{}/", self.ns).into_bytes()),
        }
    }

    fn lease(&self, i: u8) -> i64 {
        // A lease never granted is a made-up id, the same on both sides in effect.
        self.leases
            .get(usize::from(i))
            .copied()
            .unwrap_or(0x7fff_0000 + i64::from(i))
    }

    fn rev(&self, rel: u8) -> i64 {
        if rel == 0 {
            0
        } else {
            self.base + i64::from(rel)
        }
    }

    fn range(&self, keys: &Keys, limit: u8) -> Range {
        let r = match self.keys(keys) {
            KeyRange::Key(k) => Range::key(k),
            KeyRange::Prefix(p) => Range::prefix(p),
        };
        r.with_limit(i64::from(limit))
    }

    fn sub_op(&self, s: &SubOp) -> TxnOp {
        match s {
            SubOp::Put { key, value } => TxnOp::put(self.key(*key), vec![b'a' + value], 0),
            SubOp::Delete { keys } => TxnOp::Delete(self.keys(keys)),
            SubOp::Get { keys, limit } => TxnOp::get(
                self.range(keys, *limit)
                    .sort_by(SortTarget::Key, SortOrder::Ascending),
            ),
        }
    }

    /// Apply `op`; its result, normalised.
    async fn apply(&mut self, op: &Op) -> String {
        let s = &self.store;
        match op {
            Op::Put { key, value, lease } => {
                let l = lease.map(|i| self.lease(i)).unwrap_or(0);
                match s.put(&self.key(*key), &[b'a' + value], l).await {
                    Ok(rev) => format!("put rev {}", rev - self.base),
                    Err(e) => format!("put error {}", kind(&e)),
                }
            }
            Op::Delete { keys } => match s.delete(self.keys(keys)).await {
                Ok((n, rev)) => format!("delete {n} rev {}", rev - self.base),
                Err(e) => format!("delete error {}", kind(&e)),
            },
            Op::Range { keys, sort, limit } => {
                let mut r = self.range(keys, *limit);
                if let Some((t, asc)) = sort {
                    let target = [
                        SortTarget::Key,
                        SortTarget::CreateRevision,
                        SortTarget::ModRevision,
                    ][usize::from(*t)];
                    let order = if *asc {
                        SortOrder::Ascending
                    } else {
                        SortOrder::Descending
                    };
                    r = r.sort_by(target, order);
                }
                match s.range(r).await {
                    Ok(resp) => format!("range {}", self.norm_range(&resp)),
                    Err(e) => format!("range error {}", kind(&e)),
                }
            }
            Op::Txn {
                compares,
                then,
                otherwise,
            } => {
                let cmps: Vec<Compare> = compares
                    .iter()
                    .map(|c| {
                        let key = self.key(c.key);
                        let op = [
                            CompareOp::Equal,
                            CompareOp::NotEqual,
                            CompareOp::Greater,
                            CompareOp::Less,
                        ][usize::from(c.op)];
                        match c.target {
                            0 => Compare::create_revision(key, op, self.rev(c.value)),
                            1 => Compare::mod_revision(key, op, self.rev(c.value)),
                            2 => Compare::version(key, op, i64::from(c.value % 4)),
                            _ => Compare::value(key, op, vec![b'a' + c.value % 4]),
                        }
                    })
                    .collect();
                let txn = Txn::new()
                    .when(cmps)
                    .and_then(then.iter().map(|o| self.sub_op(o)))
                    .or_else(otherwise.iter().map(|o| self.sub_op(o)));
                match s.txn(txn).await {
                    Ok(resp) => {
                        let parts: Vec<String> = resp
                            .responses
                            .iter()
                            .map(|r| match r {
                                TxnOpResponse::Put => "put".to_string(),
                                TxnOpResponse::Delete { deleted } => format!("del {deleted}"),
                                TxnOpResponse::Get(g) => format!("get {}", self.norm_range(g)),
                            })
                            .collect();
                        format!(
                            "txn {} rev {} [{}]",
                            resp.succeeded,
                            resp.header_revision - self.base,
                            parts.join("; ")
                        )
                    }
                    Err(e) => format!("txn error {}", kind(&e)),
                }
            }
            Op::Grant => match s.lease_grant(Duration::from_secs(120)).await {
                Ok(g) => {
                    self.leases.push(g.id);
                    format!("grant {} ttl {:?}", self.leases.len() - 1, g.ttl)
                }
                Err(e) => format!("grant error {}", kind(&e)),
            },
            Op::Revoke { lease } => match s.lease_revoke(self.lease(*lease)).await {
                Ok(()) => {
                    let rev = s.range(Range::key("none")).await.unwrap().header_revision;
                    format!("revoke ok rev {}", rev - self.base)
                }
                Err(e) => format!("revoke error {}", kind(&e)),
            },
        }
    }

    fn norm_kv(&self, kv: &KeyValue) -> String {
        let lease = match self.leases.iter().position(|l| *l == kv.lease) {
            Some(i) => format!("L{i}"),
            None if kv.lease == 0 => "-".into(),
            None => format!("?{:x}", kv.lease),
        };
        format!(
            "{}={} c{} m{} v{} {lease}",
            String::from_utf8_lossy(&kv.key).trim_start_matches(&self.ns),
            String::from_utf8_lossy(&kv.value),
            kv.create_revision - self.base,
            kv.mod_revision - self.base,
            kv.version
        )
    }

    fn norm_range(&self, r: &RangeResponse) -> String {
        let kvs: Vec<String> = r.kvs.iter().map(|kv| self.norm_kv(kv)).collect();
        format!(
            "rev {} more {} [{}]",
            r.header_revision - self.base,
            r.more,
            kvs.join(", ")
        )
    }
}

/// The variant of an error (its text may differ between the stores).
fn kind(e: &baton::Error) -> String {
    let s = format!("{e:?}");
    s.split(['(', ' ', '{'])
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Random operation sequences give the same results on MemStore and on etcd.
#[test]
fn differential_mem_vs_etcd() {
    // A server of this test's own, dropped (killed, its directory removed) when it ends.
    let etcd = EtcdServer::start();
    let rt = runtime();
    let etcd_client = rt.block_on(Client::connect(&etcd.endpoint())).unwrap();
    let cases = u32::try_from(runs(1) * 48).unwrap_or(48);
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..Config::default()
    };
    let n = std::sync::atomic::AtomicU64::new(0);
    proptest!(config, |(ops in proptest::collection::vec(op_strategy(), 1..25))| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = format!("diff-{}-{i}", std::process::id());
        let (mem_out, etcd_out) = rt.block_on(async {
            let mut mem = Side::new(Client::memory().store().clone(), ns.clone()).await;
            let mut real = Side::new(etcd_client.store().clone(), ns.clone()).await;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for op in &ops {
                a.push(mem.apply(op).await);
                b.push(real.apply(op).await);
            }
            // Revoke what was granted, so leases do not pile up in etcd.
            for l in &real.leases {
                let _ = real.store.lease_revoke(*l).await;
            }
            (a, b)
        });
        if std::env::var_os("BATON_DIFF_SHOW").is_some() {
            for (op, out) in ops.iter().zip(&mem_out) {
                eprintln!("{op:?} => {out}");
            }
        }
        for (i, (m, e)) in mem_out.iter().zip(&etcd_out).enumerate() {
            prop_assert_eq!(m, e, "op {} {:?} differs; ops: {:?}", i, ops[i], ops);
        }
    });
}

// ---------------------------------------------------------------------------------------
// Parser fuzzing (row 22)

/// Hosts that are only ever loopback, or invalid: a fuzzed URL must never reach a real host.
fn host_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("127.0.0.1".to_string()),
        Just("localhost".to_string()),
        Just("[::1]".to_string()),
        Just(String::new()),
        Just("[::1".to_string()),
        Just("127.0.0.1 ".to_string()),
        Just("127.0.0.%31".to_string()),
        Just("user:pw@127.0.0.1".to_string()),
        Just("::1".to_string()),
        Just("127.0.0.1\0".to_string()),
    ]
}

fn port_strategy(closed: u16) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(closed.to_string()),
        Just(String::new()),
        Just("0".to_string()),
        Just("65536".to_string()),
        Just("99999999999999999999".to_string()),
        Just("-1".to_string()),
        Just("x".to_string()),
        Just(format!("{closed}/db")),
        Just(format!("{closed}/3")),
        Just(format!("{closed}?q=1")),
        Just(format!("{closed}#f")),
    ]
}

fn url_strategy(closed: u16) -> impl Strategy<Value = String> {
    let entry =
        (host_strategy(), port_strategy(closed), any::<bool>()).prop_map(|(h, p, colon)| {
            if colon {
                format!("{h}:{p}")
            } else {
                format!("{h}{p}")
            }
        });
    let scheme = prop_oneof![
        Just("http://"),
        Just("etcd://"),
        Just("redis://"),
        Just("redlock://"),
        Just("https://"),
        Just("rediss://"),
        Just("mem://"),
        Just("ftp://"),
        Just(""),
        Just("http:/"),
        Just("HTTP://"),
    ];
    prop_oneof![
        4 => (scheme.clone(), proptest::collection::vec(entry, 1..4), prop_oneof![Just(","), Just(",http://"), Just(", ")])
            .prop_map(|(s, es, sep)| format!("{s}{}", es.join(sep))),
        // Free text only after schemes that can never connect anywhere.
        1 => ("[a-z]{0,6}", ".{0,40}").prop_map(|(s, rest)| format!("x{s}://{rest}")),
        1 => ".{0,60}".prop_map(|s: String| s.replace("://", "")),
        1 => "[a-zA-Z0-9_-]{0,20}".prop_map(|s| format!("mem://{s}")),
        // Well-formed URLs of closed loopback ports: refused by the kernel at once.
        2 => (0usize..5).prop_map(move |i| {
            let c = closed;
            match i {
                0 => format!("http://127.0.0.1:{c}"),
                1 => format!("etcd://127.0.0.1:{c},localhost:{c}"),
                2 => format!("redis://127.0.0.1:{c}"),
                3 => format!("redlock://127.0.0.1:{c},localhost:{c},[::1]:{c}"),
                _ => format!("http://[::1]:{c}"),
            }
        }),
    ]
}

/// Dial and request timeouts: short ones (the connection to the closed port is refused at
/// once, whatever the timeout), and ones too long for the clock to add.
fn timeout_strategy() -> impl Strategy<Value = Duration> {
    prop_oneof![
        4 => Just(Duration::from_millis(300)),
        1 => Just(Duration::ZERO),
        1 => Just(Duration::from_secs(u64::MAX)),
        1 => Just(Duration::MAX),
        1 => Just(Duration::from_secs(9_000_000_000)),
    ]
}

/// Endpoint URLs: `Client::connect` and `Coordinator::builder(...).connect()` never panic,
/// never hang, and refuse a malformed URL before any network call (in well under the dial
/// timeout).
#[test]
fn fuzz_endpoint_urls() {
    let rt = runtime();
    let closed = baton_testkit::free_port();
    let cases = u32::try_from(runs(1) * 160).unwrap_or(160);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let slowest_refusal = std::sync::Mutex::new(Duration::ZERO);
    runner
        .run(
            &(url_strategy(closed), timeout_strategy()),
            |(url, dial)| {
                rt.block_on(async {
                    // A short dial timeout must be kept; a long one may legitimately be waited
                    // out (the port is closed, and connecting retries until the dial timeout),
                    // so then only the first 300 ms are watched, for a panic.
                    let short = dial <= Duration::from_secs(1);
                    let watch = if short {
                        Duration::from_secs(3)
                    } else {
                        Duration::from_millis(300)
                    };
                    let t = Instant::now();
                    let client = tokio::time::timeout(
                        watch,
                        Client::builder(&url)
                            .with_dial_timeout(dial)
                            .with_request_timeout(dial)
                            .connect(),
                    )
                    .await;
                    let took = t.elapsed();
                    match client {
                        Err(_) if short => panic!("Client::connect({url:?}) hung"),
                        Ok(Err(e)) if e.is_invalid_input() => {
                            let mut s = slowest_refusal.lock().unwrap();
                            *s = (*s).max(took);
                            assert!(
                                took < Duration::from_millis(100),
                                "{url:?} refused after {took:?}"
                            );
                        }
                        _ => {}
                    }
                    let coord = tokio::time::timeout(
                        watch,
                        baton::Coordinator::builder(&url)
                            .with_dial_timeout(dial)
                            .with_request_timeout(dial)
                            .with_ttl(Duration::from_secs(5))
                            .connect(),
                    )
                    .await;
                    match coord {
                        Err(_) if short => panic!("Coordinator::connect({url:?}) hung"),
                        Ok(Ok(c)) => {
                            let _ = c.close().await;
                        }
                        _ => {}
                    }
                });
                Ok(())
            },
        )
        .unwrap();
    report_count(
        "22",
        "any",
        "fuzzed URLs refused, slowest refusal (µs)",
        &[slowest_refusal.lock().unwrap().as_micros() as u64],
    );
}

/// Names: every constructor refuses empty, NUL and over-long names with InvalidArgument
/// and accepts the rest; a lock with any accepted name can be taken and released (on the
/// embedded store). No panic.
#[test]
fn fuzz_names() {
    let rt = runtime();
    let client = rt.block_on(Client::connect("mem://fuzz-names")).unwrap();
    let session = rt
        .block_on(
            baton::Session::builder(&client)
                .with_ttl(Duration::from_secs(10))
                .build(),
        )
        .unwrap();
    let coord = rt
        .block_on(
            baton::Coordinator::builder("mem://fuzz-names")
                .with_ttl(Duration::from_secs(10))
                .connect(),
        )
        .unwrap();
    let names = prop_oneof![
        8 => ".{0,40}",
        1 => "[a/]{0,8}",
        1 => (0usize..3).prop_map(|i| ["x".repeat(1024), "x".repeat(1025), "é".repeat(513)][i].clone()),
        1 => ".{0,5}".prop_map(|s| format!("{s}\0{s}")),
    ];
    let cases = u32::try_from(runs(1) * 256).unwrap_or(256);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&names, |name| {
            let bad = name.is_empty() || name.contains('\0') || name.len() > baton::MAX_NAME_LEN;
            let m = baton::Mutex::new(&session, &name);
            let rw = baton::RwLock::new(&session, &name);
            let e = baton::Election::new(&session, &name);
            let c = coord.lock(&name);
            for (what, invalid) in [
                (
                    "mutex",
                    m.as_ref().err().map(baton::Error::is_invalid_input),
                ),
                (
                    "rwlock",
                    rw.as_ref().err().map(baton::Error::is_invalid_input),
                ),
                (
                    "election",
                    e.as_ref().err().map(baton::Error::is_invalid_input),
                ),
                (
                    "coordinator",
                    c.as_ref().err().map(baton::Error::is_invalid_input),
                ),
            ] {
                prop_assert_eq!(invalid, bad.then_some(true), "{} {:?}", what, name);
            }
            if let Ok(m) = m {
                rt.block_on(async {
                    let g = m.try_lock().await.unwrap();
                    g.unlock().await.unwrap();
                });
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Wall-clock jumps (row 21)

/// libfaketime, where Debian's faketime package puts it (under the architecture's
/// multiarch directory: x86_64-linux-gnu, aarch64-linux-gnu, …).
fn libfaketime() -> Option<std::path::PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists())
}

/// Environment that runs a program under libfaketime, its wall clock offset by what
/// `file` says (re-read on every call), its monotonic clock untouched.
fn faketime_env(cmd: &mut std::process::Command, lib: &std::path::Path, file: &std::path::Path) {
    cmd.env("LD_PRELOAD", lib)
        .env("FAKETIME_TIMESTAMP_FILE", file)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
}

/// A holder whose wall clock jumps +1 h and then −1 h (libfaketime, monotonic clock
/// untouched, as an NTP step does) keeps its lock: nothing is lost, every write is
/// accepted, and the waiter gets the lock after the release with a greater token. (etcd,
/// a Go program, reads its clocks without libc, so only the client's clock jumps; Redis
/// expires keys by the wall clock, which is the inherent weakness docs/reliability.md
/// describes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row21_wall_clock_jumps() {
    let Some(lib) = libfaketime() else {
        // scripts/test.sh installs it; a run without it must not pass silently.
        assert!(
            std::env::var_os("BATON_SKIP_FAKETIME").is_some(),
            "libfaketime is not installed (Debian: faketime; scripts/test.sh installs it); \
             set BATON_SKIP_FAKETIME=1 to skip row 21"
        );
        eprintln!("libfaketime is not installed; BATON_SKIP_FAKETIME is set: row 21 skipped");
        return;
    };
    let etcd = EtcdServer::start_async().await;
    let target = Target::new(WORKER, etcd.endpoint(), "etcd", Kind::Store);
    let mut losses = Vec::new();
    for run in 0..runs(1) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("faketime");
        std::fs::write(&file, "+0\n").unwrap();
        let oracle = Oracle::start().await;
        let lock = format!("clock/{run}");
        let mut cmd = std::process::Command::new(WORKER);
        cmd.args([
            etcd.endpoint(),
            oracle.addr().to_string(),
            "a".into(),
            "--lock".into(),
            lock.clone(),
            "--ttl-ms".into(),
            "2000".into(),
            "--writes".into(),
            "50".into(),
            "--write-every-ms".into(),
            "100".into(),
        ]);
        faketime_env(&mut cmd, &lib, &file);
        let mut a = baton_testkit::worker::WorkerProc::spawn_command("a", cmd);
        let (token_a, _) = acquired(&expect(&mut a, "acquired", Duration::from_secs(15)).await);
        let mut b = target.worker("b", &oracle, &["--lock", &lock, "--ttl-ms", "2000"]);
        expect(&mut b, "ready", Duration::from_secs(15)).await;
        for offset in ["+1h", "-1h", "+0"] {
            std::fs::write(&file, format!("{offset}\n")).unwrap();
            // The jump is real: a program under the same settings sees it.
            let mut date = std::process::Command::new("date");
            date.arg("+%s");
            faketime_env(&mut date, &lib, &file);
            let shown: i64 = String::from_utf8(date.output().unwrap().stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let real = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let want = match offset {
                "+1h" => 3600,
                "-1h" => -3600,
                _ => 0,
            };
            assert!((shown - real - want).abs() < 5, "faketime not in effect");
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let done = expect(&mut a, "done", Duration::from_secs(20)).await;
        assert_eq!(
            done,
            "done acks=50 rejects=0 lost=0 errors=0",
            "{}",
            a.stderr()
        );
        losses.push(0);
        let (token_b, _) = acquired(&expect(&mut b, "acquired", Duration::from_secs(5)).await);
        assert!(token_b > token_a);
        expect(&mut b, "done", Duration::from_secs(10)).await;
        let h = oracle.history();
        h.check_all(&oracle, &[]).unwrap();
        assert_eq!(h.rejected(None), 0);
    }
    report_count("21", "etcd", "holder's clock ±1 h: holds lost", &losses);
}

/// The library times leases, deadlines and waits with the monotonic clock only: its source
/// reads the wall clock in one place, the Go-compatible queue item names of `Queue`.
#[test]
fn library_reads_no_wall_clock_for_timing() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../baton/src");
    let mut uses = Vec::new();
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                if text.contains("SystemTime") || text.contains("UNIX_EPOCH") {
                    uses.push(path.file_name().unwrap().to_string_lossy().into_owned());
                }
            }
        }
    }
    assert_eq!(
        uses,
        ["work_queue.rs"],
        "the wall clock is read in {uses:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Soak

/// VmRSS of this process, in KiB, and its open file descriptors.
fn rss_and_fds() -> (u64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    (rss, fds)
}

/// 45 in-process workers (each its own client and session, through one fault proxy per
/// member of a 3-node cluster) and 5 worker processes contend for 5 locks for
/// `BATON_SOAK_SECS` (default 60) while faults are injected at random every ~2 s: a
/// worker process paused past its TTL, a proxy blackholed for 2 s, a member killed and
/// restarted. No violation (tokens, counter, overlaps); the test process's RSS stays flat,
/// and every file descriptor the workers opened is closed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_50_workers_5_locks_random_faults() {
    use rand::{Rng, SeedableRng};
    let secs: u64 = std::env::var("BATON_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("BATON_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(mono_now);
    eprintln!("soak: {secs} s, seed {seed} (BATON_SOAK_SEED to replay the fault schedule)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cluster = EtcdCluster::start_async(3).await;
    let oracle = Arc::new(Oracle::start().await);
    let mut proxies = Vec::new();
    for m in cluster.members() {
        proxies.push(FaultProxy::start(m.client_port()).await);
    }
    let url = proxies
        .iter()
        .map(|p| p.url("http"))
        .collect::<Vec<_>>()
        .join(",");
    let locks: Vec<String> = (0..5).map(|i| format!("soak/{i}")).collect();
    let stop = tokio_util::sync::CancellationToken::new();
    let until = Instant::now() + Duration::from_secs(secs);

    // In-process workers.
    let mut tasks = Vec::new();
    for i in 0..45 {
        let (url, lock, oracle, stop) = (
            url.clone(),
            locks[i % 5].clone(),
            oracle.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut o = oracle.client(&format!("t{i}")).await;
            let mut grants = 0u64;
            while !stop.is_cancelled() {
                let Ok(client) = Client::builder(&url)
                    .with_request_timeout(Duration::from_secs(1))
                    .with_dial_timeout(Duration::from_secs(1))
                    .connect()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let Ok(session) = baton::Session::builder(&client)
                    .with_ttl(Duration::from_secs(3))
                    .build()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let m = baton::Mutex::new(&session, &lock).unwrap();
                // A few holds per session, then a new client: connections come and go.
                for _ in 0..5 {
                    if stop.is_cancelled() || session.is_lost() {
                        break;
                    }
                    let g = tokio::select! {
                        g = m.lock_timeout(Duration::from_secs(5)) => g,
                        _ = stop.cancelled() => break,
                    };
                    let Ok(g) = g else { continue };
                    let token = g.fencing_token();
                    let hold = o.acquired(&lock, token, mono_now()).await.unwrap();
                    if !g.is_lost() {
                        let _ = o.increment(&lock, token).await.unwrap();
                    }
                    let deadline = baton_testkit::oracle::mono_of(session.deadline().into_std());
                    let why = if g.is_lost() { "lost" } else { "released" };
                    o.ended(&lock, token, hold, mono_now().min(deadline), why)
                        .await
                        .unwrap();
                    grants += 1;
                    if g.unlock().await.is_err() {
                        // The release may still land later: never adopt this key again
                        // (see docs/reliability.md); start over with a new session.
                        break;
                    }
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), session.close()).await;
            }
            grants
        }));
    }
    // Worker processes, which the faults pause.
    let target = Target::new(WORKER, url.clone(), "etcd×3", Kind::Store);
    let mut procs: Vec<_> = (0..5)
        .map(|i| {
            target.worker(
                &format!("p{i}"),
                &oracle,
                &[
                    "--lock",
                    &locks[i],
                    "--rounds",
                    "0",
                    "--ttl-ms",
                    "3000",
                    "--hold-ms",
                    "10",
                    "--request-timeout-ms",
                    "1000",
                ],
            )
        })
        .collect();

    // Open fds before the in-process workers start (the cluster, proxies, oracle and worker
    // processes are up): all of the workers' connections must be closed again at the end.
    let (_, fds_before) = rss_and_fds();
    let mut samples: Vec<(Duration, u64, usize)> = Vec::new();
    let started = Instant::now();
    let mut faults: HashMap<&str, u64> = HashMap::new();
    let mut last_sample = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1500 + rng.gen_range(0..1000))).await;
        match rng.gen_range(0..3) {
            0 => {
                let i = rng.gen_range(0..procs.len());
                procs[i].stop();
                tokio::time::sleep(Duration::from_secs(4)).await;
                procs[i].cont();
                *faults.entry("worker paused 4 s").or_default() += 1;
            }
            1 => {
                let i = rng.gen_range(0..proxies.len());
                proxies[i].set_both(Fault::Blackhole);
                tokio::time::sleep(Duration::from_secs(2)).await;
                proxies[i].heal();
                *faults.entry("proxy blackholed 2 s").or_default() += 1;
            }
            _ => {
                let i = rng.gen_range(0..3);
                tokio::task::block_in_place(|| cluster.kill(i));
                tokio::time::sleep(Duration::from_secs(2)).await;
                tokio::task::block_in_place(|| cluster.restart(i));
                *faults.entry("member killed, restarted").or_default() += 1;
            }
        }
        if last_sample.elapsed() >= Duration::from_secs(5) {
            let (rss, fds) = rss_and_fds();
            samples.push((started.elapsed(), rss, fds));
            last_sample = Instant::now();
        }
    }
    stop.cancel();
    let mut grants = 0;
    for t in tasks {
        grants += tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("worker hung")
            .unwrap();
    }
    for p in &mut procs {
        let t = p.kill();
        oracle.end_holds(p.name(), t, "killed");
    }
    // Dropped clients close their connections, and dropped sessions revoke their leases,
    // in the background: give them a moment.
    let mut fds_after = usize::MAX;
    for _ in 0..50 {
        fds_after = rss_and_fds().1;
        if fds_after <= fds_before + 16 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let h = oracle.history();
    h.check_all(&oracle, &[]).unwrap();
    let holds = h.holds().len();
    eprintln!(
        "soak: {holds} holds ({grants} in-process), faults {faults:?}, rejected {}",
        h.rejected(None)
    );
    eprintln!("soak: (elapsed, RSS KiB, fds) {samples:?}");
    // No fd leak: what the workers opened is closed again. RSS flat: the second half never
    // grows much beyond the first (the oracle's log grows by ~0.5 KiB per hold).
    assert!(
        fds_after <= fds_before + 16,
        "open fds: {fds_before} before the workers, {fds_after} after them"
    );
    let half = samples.len() / 2;
    assert!(half >= 1, "too short a soak to judge leaks");
    let max = |s: &[(Duration, u64, usize)]| {
        (
            s.iter().map(|x| x.1).max().unwrap(),
            s.iter().map(|x| x.2).max().unwrap(),
        )
    };
    let (rss1, fds1) = max(&samples[..half]);
    let (rss2, fds2) = max(&samples[half..]);
    assert!(
        rss2 <= rss1 + rss1 / 4 + 16 * 1024,
        "RSS grew from {rss1} KiB to {rss2} KiB"
    );
    report_count("soak", "etcd×3", "holds in the soak", &[holds as u64]);
    report_count(
        "soak",
        "etcd×3",
        "rejected writes",
        &[h.rejected(None) as u64],
    );
    println!(
        "FIGURE | soak | etcd×3 | RSS KiB, max of first half → second half | {rss1} → {rss2} | | |"
    );
    println!("FIGURE | soak | etcd×3 | open fds, max of first half → second half | {fds1} → {fds2} | | |");
    println!("FIGURE | soak | etcd×3 | open fds, before → after the workers | {fds_before} → {fds_after} | | |");
}

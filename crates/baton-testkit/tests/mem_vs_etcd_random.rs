//! Seeded random sequences on the embedded store and a real etcd, compared answer by
//! answer: what the proptest differential (faults_misc.rs) leaves out — watches (live and
//! replayed, with prev_kv, deletes only), reads at past revisions, max create/mod
//! revision filters, keys only, compaction, and keys bound to leases that are revoked.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::time::Duration;

use baton::store::etcd::{EtcdOptions, EtcdStore};
use baton::store::mem::MemStore;
use baton::store::{
    Compare, CompareOp, Event, KeyRange, LeaseId, Range, Revision, SortOrder, SortTarget, Store,
    Txn, TxnOp, TxnOpResponse, Watch, WatchStream,
};
use baton::Error;
use baton_testkit::EtcdServer;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Ctx {
    base: Revision,
    leases: Vec<LeaseId>,
}

impl Ctx {
    fn rev(&self, r: Revision) -> Revision {
        if r == 0 {
            0
        } else {
            r - self.base
        }
    }
    fn lease(&self, l: LeaseId) -> String {
        if l == 0 {
            return "0".into();
        }
        match self.leases.iter().position(|x| *x == l) {
            Some(i) => format!("L{i}"),
            None => "L?".into(),
        }
    }
    fn kv(&self, kv: &baton::store::KeyValue) -> String {
        format!(
            "{}={}(c{} m{} v{} {})",
            kv.key_str(),
            kv.value_str(),
            self.rev(kv.create_revision),
            self.rev(kv.mod_revision),
            kv.version,
            self.lease(kv.lease)
        )
    }
    fn event(&self, e: &Event) -> String {
        format!(
            "{:?} {} prev {:?}",
            e.kind,
            self.kv(&e.kv),
            e.prev_kv.as_ref().map(|p| self.kv(p))
        )
    }
    fn err(&self, e: Error) -> String {
        match e {
            Error::InvalidArgument(m) => {
                let kind = ["duplicate key", "future", "empty", "not provided"]
                    .into_iter()
                    .find(|k| m.contains(k))
                    .unwrap_or(&m);
                format!("invalid {kind}")
            }
            Error::Compacted {
                requested,
                compact_revision,
            } => format!(
                "compacted {} at {}",
                self.rev(requested),
                self.rev(compact_revision)
            ),
            Error::LeaseNotFound(l) => format!("lease not found {}", self.lease(l)),
            e => format!("{e:?}"),
        }
    }
}

const KEYS: [&str; 5] = ["z/a", "z/b", "z/c", "z/ab", "z/d"];

/// A read's answer (a range, or a transaction's get), revisions relative to the start.
fn read(ctx: &Ctx, g: &baton::store::RangeResponse) -> String {
    let kvs: Vec<String> = g.kvs.iter().map(|kv| ctx.kv(kv)).collect();
    format!(
        "h{} [{}] more={}",
        ctx.rev(g.header_revision),
        kvs.join(","),
        g.more
    )
}

fn key(rng: &mut StdRng) -> String {
    KEYS[rng.gen_range(0..KEYS.len())].to_string()
}

fn keys(rng: &mut StdRng) -> KeyRange {
    match rng.gen_range(0..4) {
        0 => KeyRange::prefix("z/"),
        1 => KeyRange::prefix("z/a"),
        _ => KeyRange::key(key(rng)),
    }
}

fn lease(rng: &mut StdRng, ctx: &Ctx) -> LeaseId {
    match rng.gen_range(0..10) {
        0..=4 => 0,
        9 => 0x1234,
        _ if ctx.leases.is_empty() => 0,
        _ => ctx.leases[rng.gen_range(0..ctx.leases.len())],
    }
}

/// `cur` and `compacted` are relative to `base` (draws must not depend on absolute
/// revisions, or the two sequences would part).
fn range(rng: &mut StdRng, base: Revision, cur: Revision, compacted: Revision) -> Range {
    let mut r = match keys(rng) {
        KeyRange::Key(k) => Range::key(k),
        KeyRange::Prefix(p) => Range::prefix(p),
    };
    if rng.gen_bool(0.4) {
        let t = [
            SortTarget::Key,
            SortTarget::CreateRevision,
            SortTarget::ModRevision,
        ][rng.gen_range(0..3)];
        let o = [SortOrder::Ascending, SortOrder::Descending][rng.gen_range(0..2)];
        r = r.sort_by(t, o);
    }
    if rng.gen_bool(0.4) {
        r = r.with_limit(rng.gen_range(1..4));
    }
    if rng.gen_bool(0.2) {
        r = r.with_max_mod_revision(base + rng.gen_range(0..=cur));
    }
    if rng.gen_bool(0.2) {
        r = r.with_max_create_revision(base + rng.gen_range(0..=cur));
    }
    if rng.gen_bool(0.3) {
        let lo = (compacted - 2).max(0);
        r = r.at_revision(base + rng.gen_range(lo..=cur + 1));
    }
    if rng.gen_bool(0.2) {
        r = r.keys_only();
    }
    r
}

fn op(rng: &mut StdRng, ctx: &Ctx, cur: Revision, compacted: Revision) -> TxnOp {
    let base = ctx.base;
    match rng.gen_range(0..3) {
        0 => TxnOp::put(
            key(rng),
            format!("{}", rng.gen_range(0..9)),
            lease(rng, ctx),
        ),
        1 => TxnOp::Delete(keys(rng)),
        _ => TxnOp::get(range(rng, base, cur, compacted)),
    }
}

fn compare(rng: &mut StdRng, ctx: &Ctx, cur: Revision) -> Compare {
    let k = key(rng);
    let op = [
        CompareOp::Equal,
        CompareOp::NotEqual,
        CompareOp::Greater,
        CompareOp::Less,
    ][rng.gen_range(0..4)];
    let rev = if rng.gen_bool(0.3) {
        0
    } else {
        ctx.base + rng.gen_range(0..=cur)
    };
    match rng.gen_range(0..5) {
        0 => Compare::create_revision(k, op, rev),
        1 => Compare::mod_revision(k, op, rev),
        2 => Compare::version(k, op, rng.gen_range(0..3)),
        3 => Compare::value(k, op, format!("{}", rng.gen_range(0..9))),
        _ => Compare::lease(k, op, lease(rng, ctx)),
    }
}

async fn drain(ctx: &Ctx, w: &mut WatchStream, wait: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(Some(b)) = tokio::time::timeout(wait, w.next()).await {
        match b {
            Ok(b) => out.extend(b.events.iter().map(|e| ctx.event(e))),
            Err(e) => {
                out.push(format!("error {}", ctx.err(e)));
                break;
            }
        }
    }
    out
}

async fn run(s: &dyn Store, seed: u64, steps: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let base = s.range(Range::key("x")).await.unwrap().header_revision;
    let mut ctx = Ctx {
        base,
        leases: Vec::new(),
    };
    let mut log = Vec::new();
    let mut compacted: Revision = 0;
    let (_, mut live) = s
        .watch_from_now(Watch::prefix("z/").with_prev_kv())
        .await
        .unwrap();
    for step in 0..steps {
        let cur = s.range(Range::key("x")).await.unwrap().header_revision - base;
        let line = match rng.gen_range(0..20) {
            0..=4 => {
                let (k, l) = (key(&mut rng), lease(&mut rng, &ctx));
                let v = format!("{}", rng.gen_range(0..9));
                match s.put(k.as_bytes(), v.as_bytes(), l).await {
                    Ok(r) => format!("put {k} {} -> {}", ctx.lease(l), ctx.rev(r)),
                    Err(e) => format!("put {k} -> {}", ctx.err(e)),
                }
            }
            5..=6 => {
                let k = keys(&mut rng);
                match s.delete(k.clone()).await {
                    Ok((n, r)) => format!("delete {k:?} -> {n} at {}", ctx.rev(r)),
                    Err(e) => format!("delete {k:?} -> {}", ctx.err(e)),
                }
            }
            7..=11 => {
                let cmps: Vec<_> = (0..rng.gen_range(0..3))
                    .map(|_| compare(&mut rng, &ctx, cur))
                    .collect();
                let ok: Vec<_> = (0..rng.gen_range(0..4))
                    .map(|_| op(&mut rng, &ctx, cur, compacted))
                    .collect();
                let ko: Vec<_> = (0..rng.gen_range(0..3))
                    .map(|_| op(&mut rng, &ctx, cur, compacted))
                    .collect();
                let t = Txn::new().when(cmps).and_then(ok).or_else(ko);
                match s.txn(t).await {
                    Ok(resp) => {
                        let rs: Vec<String> = resp
                            .responses
                            .iter()
                            .map(|r| match r {
                                TxnOpResponse::Put => "put".into(),
                                TxnOpResponse::Delete { deleted } => format!("del {deleted}"),
                                TxnOpResponse::Get(g) => format!("get {}", read(&ctx, g)),
                            })
                            .collect();
                        format!(
                            "txn {} h{} {rs:?}",
                            resp.succeeded,
                            ctx.rev(resp.header_revision)
                        )
                    }
                    // EtcdStore names the first lease of the txn's puts, etcd says not
                    // which one it missed (the embedded store names that one).
                    Err(Error::LeaseNotFound(_)) => "txn -> lease not found".into(),
                    Err(e) => format!("txn -> {}", ctx.err(e)),
                }
            }
            12..=14 => {
                let r = range(&mut rng, base, cur, compacted);
                match s.range(r).await {
                    Ok(g) => format!("range {}", read(&ctx, &g)),
                    Err(e) => format!("range -> {}", ctx.err(e)),
                }
            }
            15 => {
                let g = s.lease_grant(Duration::from_secs(60)).await.unwrap();
                ctx.leases.push(g.id);
                format!("grant L{}", ctx.leases.len() - 1)
            }
            16 if !ctx.leases.is_empty() => {
                let l = ctx.leases[rng.gen_range(0..ctx.leases.len())];
                match s.lease_revoke(l).await {
                    Ok(()) => format!("revoke {}", ctx.lease(l)),
                    Err(e) => format!("revoke -> {}", ctx.err(e)),
                }
            }
            17 if rng.gen_bool(0.3) => {
                let r = rng.gen_range(compacted.max(1)..=cur.max(1));
                match s.compact(base + r).await {
                    Ok(()) => {
                        compacted = r;
                        format!("compact {r}")
                    }
                    Err(e) => format!("compact {r} -> {}", ctx.err(e)),
                }
            }
            18 | 19 => {
                let lo = (compacted - 1).max(1);
                let from = rng.gen_range(lo..=cur + 1);
                let mut w = Watch::prefix("z/").from_revision(base + from);
                if rng.gen_bool(0.5) {
                    w = w.with_prev_kv();
                }
                if rng.gen_bool(0.2) {
                    w = w.deletes_only();
                }
                let what = format!("watch from {from} {} {}", w.prev_kv, w.deletes_only);
                let mut stream = s.watch(w).await.unwrap();
                let evs = drain(&ctx, &mut stream, Duration::from_millis(1000)).await;
                format!("{what}: {evs:?}")
            }
            _ => continue,
        };
        log.push(format!("#{step} {line}"));
    }
    let evs = drain(&ctx, &mut live, Duration::from_millis(700)).await;
    for e in evs {
        log.push(format!("live {e}"));
    }
    log
}

async fn compare_seed(server: &EtcdServer, seed: u64, steps: usize) {
    let etcd = EtcdStore::connect(&[server.endpoint()], EtcdOptions::default())
        .await
        .unwrap();
    let mem = MemStore::new();
    // Clear the keys of an earlier seed (the revision offset absorbs the rest).
    etcd.delete(KeyRange::prefix("z/")).await.unwrap();
    let (e, m) = tokio::join!(run(&etcd, seed, steps), run(&mem, seed, steps));
    if std::env::var("MEMDIFF_DUMP").is_ok() {
        for (a, b) in e.iter().zip(&m) {
            eprintln!("E {a}\nM {b}");
        }
    }
    let mut diffs = Vec::new();
    for i in 0..e.len().max(m.len()) {
        if e.get(i) != m.get(i) {
            diffs.push(format!("  etcd: {:?}\n  mem:  {:?}", e.get(i), m.get(i)));
        }
    }
    assert!(
        diffs.is_empty(),
        "seed {seed}: {} differences, first:\n{}",
        diffs.len(),
        diffs[..diffs.len().min(4)].join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sequences_answer_as_etcd() {
    let server = EtcdServer::start_async().await;
    let seeds: u64 = std::env::var("MEMDIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let first: u64 = std::env::var("MEMDIFF_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for seed in first..first + seeds {
        compare_seed(&server, seed, 150).await;
    }
}

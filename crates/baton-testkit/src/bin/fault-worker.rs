//! A worker process for the fault suite: takes a lock (or leads an election) on any backend,
//! and while it holds, increments a counter in the fenced-resource oracle
//! (`baton_testkit::oracle`) with its fencing token. It reports each hold's start and end
//! (min of released, lost and the local deadline) to the oracle with `CLOCK_MONOTONIC`
//! timestamps, and prints what it does on stdout, one line per event:
//!
//! ```text
//! ready
//! acquired TOKEN T              (T: CLOCK_MONOTONIC ns)
//! write ok | write rejected
//! txn ok | txn rejected            (--txn, store backends: a write guarded by the lock)
//! lost T REASON
//! stale write rejected|accepted    (--probe-after-loss: what a stale holder's write gets)
//! stale txn rejected|accepted
//! released
//! error MESSAGE
//! done acks=N rejects=N lost=N errors=N
//! ```
//!
//! Usage: `fault-worker ENDPOINTS ORACLE_ADDR WORKER_ID [options]`
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `--lock NAME` | the lock or election | `lock` |
//! | `--elect VALUE` | campaign with VALUE instead of locking | |
//! | `--ttl-ms N` | session TTL (etcd rounds up to seconds) / Redis lock TTL | 2000 |
//! | `--request-timeout-ms N` | client request timeout | 2000 |
//! | `--rounds N` | holds to take; 0: until killed | 1 |
//! | `--writes N` | fenced increments per hold | 1 |
//! | `--write-every-ms N` | pause before each increment | 0 |
//! | `--hold-ms N` | hold this long after the writes | 0 |
//! | `--pause-ms N` | pause between holds | 0 |
//! | `--txn` | also write a key guarded by the lock (store backends) | |
//! | `--probe-after-loss` | after a loss, try one stale write and txn | |
//! | `--keep` | never release: exit (or get killed) holding | |

use std::net::SocketAddr;
use std::time::Duration;

use baton::store::{Txn, TxnOp};
use baton_testkit::oracle::{mono_now, mono_of, OracleClient};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
struct Opts {
    endpoints: String,
    oracle: SocketAddr,
    id: String,
    lock: String,
    elect: Option<String>,
    ttl: Duration,
    request_timeout: Duration,
    rounds: u64,
    writes: u64,
    write_every: Duration,
    hold: Duration,
    pause: Duration,
    txn: bool,
    probe: bool,
    keep: bool,
}

fn parse() -> Result<Opts, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: fault-worker ENDPOINTS ORACLE_ADDR WORKER_ID [options]".into());
    }
    let mut o = Opts {
        endpoints: args[0].clone(),
        oracle: args[1]
            .parse()
            .map_err(|e| format!("oracle address: {e}"))?,
        id: args[2].clone(),
        lock: "lock".into(),
        elect: None,
        ttl: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        rounds: 1,
        writes: 1,
        write_every: Duration::ZERO,
        hold: Duration::ZERO,
        pause: Duration::ZERO,
        txn: false,
        probe: false,
        keep: false,
    };
    let mut it = args[3..].iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        let ms = |v: String| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| format!("{flag}: {e}"))
        };
        match flag.as_str() {
            "--lock" => o.lock = value()?,
            "--elect" => o.elect = Some(value()?),
            "--ttl-ms" => o.ttl = ms(value()?)?,
            "--request-timeout-ms" => o.request_timeout = ms(value()?)?,
            "--rounds" => o.rounds = value()?.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--writes" => o.writes = value()?.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--write-every-ms" => o.write_every = ms(value()?)?,
            "--hold-ms" => o.hold = ms(value()?)?,
            "--pause-ms" => o.pause = ms(value()?)?,
            "--txn" => o.txn = true,
            "--probe-after-loss" => o.probe = true,
            "--keep" => o.keep = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fault-worker: {e}");
            std::process::exit(2);
        }
    };
    let code = match run(opts).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fault-worker: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// The backend: a store client (etcd, mem) or a Redis client.
enum Backend {
    Store(baton::Client),
    Redis(baton::redis::RedisClient),
}

/// Something held.
enum Held {
    Mutex(baton::MutexGuard),
    Leader(baton::Leadership),
    RedisLock(baton::redis::RedisLockGuard),
    RedisLeader(baton::redis::RedisLeadership),
}

impl Held {
    fn token(&self) -> i64 {
        match self {
            Held::Mutex(g) => g.fencing_token(),
            Held::Leader(l) => l.fencing_token(),
            Held::RedisLock(g) => g.fencing_token().unwrap_or(0),
            Held::RedisLeader(l) => l.fencing_token().unwrap_or(0),
        }
    }

    /// Whether the hold is lost, as a user checks before acting on it: this also looks at
    /// the local deadline, which a token taken earlier only sees once something checks.
    fn is_lost(&self) -> bool {
        match self {
            Held::Mutex(g) => g.is_lost(),
            Held::Leader(l) => l.is_lost(),
            Held::RedisLock(g) => g.is_lost(),
            Held::RedisLeader(l) => l.is_lost(),
        }
    }

    fn lost_token(&self) -> CancellationToken {
        match self {
            Held::Mutex(g) => g.lost_token(),
            Held::Leader(l) => l.lost_token(),
            Held::RedisLock(g) => g.lost_token(),
            Held::RedisLeader(l) => l.lost_token(),
        }
    }

    fn lost_reason(&self) -> String {
        match self {
            Held::Mutex(g) => g.lost_reason(),
            Held::Leader(l) => l.lost_reason(),
            Held::RedisLock(g) => g.lost_reason(),
            Held::RedisLeader(l) => l.lost_reason(),
        }
        .unwrap_or_else(|| "unknown".into())
    }

    /// The local deadline, in `CLOCK_MONOTONIC` ns.
    fn deadline(&self) -> u64 {
        let d = match self {
            Held::Mutex(g) => g.session().deadline(),
            Held::Leader(l) => l.session().deadline(),
            Held::RedisLock(g) => g.deadline(),
            Held::RedisLeader(l) => l.deadline(),
        };
        mono_of(d.into_std())
    }

    /// A write to the store guarded by the hold (store backends only).
    async fn txn(&self, key: &str, value: &str) -> Option<bool> {
        let txn = Txn::new().and_then([TxnOp::put(key, value, 0)]);
        let r = match self {
            Held::Mutex(g) => g.txn(txn).await,
            Held::Leader(l) => l.txn(txn).await,
            _ => return None,
        };
        Some(r.is_ok())
    }

    async fn release(self) -> baton::Result<()> {
        match self {
            Held::Mutex(g) => g.unlock().await,
            Held::Leader(l) => l.resign().await,
            Held::RedisLock(g) => g.unlock().await,
            Held::RedisLeader(l) => l.resign().await,
        }
    }
}

#[derive(Default)]
struct Counts {
    acks: u64,
    rejects: u64,
    lost: u64,
    errors: u64,
}

async fn connect(o: &Opts) -> baton::Result<Backend> {
    if o.endpoints.starts_with("redis://") || o.endpoints.starts_with("redlock://") {
        Ok(Backend::Redis(
            baton::redis::RedisClient::builder(&o.endpoints)
                .with_ttl(o.ttl)
                .with_request_timeout(o.request_timeout)
                .with_dial_timeout(o.request_timeout)
                .connect()
                .await?,
        ))
    } else {
        Ok(Backend::Store(
            baton::Client::builder(&o.endpoints)
                .with_request_timeout(o.request_timeout)
                .with_dial_timeout(o.request_timeout)
                .connect()
                .await?,
        ))
    }
}

async fn session(client: &baton::Client, o: &Opts) -> baton::Result<baton::Session> {
    baton::Session::builder(client)
        .with_ttl(o.ttl)
        .build()
        .await
}

async fn run(o: Opts) -> Result<(), Box<dyn std::error::Error>> {
    let mut oracle = OracleClient::connect(o.oracle, &o.id).await?;
    let backend = connect(&o).await?;
    let mut session = match &backend {
        Backend::Store(c) => Some(session(c, &o).await?),
        Backend::Redis(_) => None,
    };
    say("ready");
    let mut counts = Counts::default();
    let mut round = 0u64;
    while o.rounds == 0 || round < o.rounds {
        round += 1;
        if round > 1 && !o.pause.is_zero() {
            tokio::time::sleep(o.pause).await;
        }
        // A lost session cannot take locks again: start a new one.
        if let (Backend::Store(c), Some(s)) = (&backend, &session) {
            if s.is_lost() {
                match self::session(c, &o).await {
                    Ok(s) => session = Some(s),
                    Err(e) => {
                        counts.errors += 1;
                        say(&format!("error session: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        }
        let held = match acquire(&backend, session.as_ref(), &o).await {
            Ok(h) => h,
            Err(e) => {
                counts.errors += 1;
                say(&format!("error acquire: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let t0 = mono_now();
        let token = held.token();
        let hold = oracle.acquired(&o.lock, token, t0).await?;
        say(&format!("acquired {token} {t0}"));
        let lost = held.lost_token();
        let mut was_lost = false;
        for i in 0..o.writes {
            if !o.write_every.is_zero() {
                tokio::select! {
                    biased;
                    _ = lost.cancelled() => {}
                    _ = tokio::time::sleep(o.write_every) => {}
                }
            }
            // Consult the hold right before each write, as a real user would: after a pause
            // past the local deadline this is what says so before the background task runs.
            if held.is_lost() {
                was_lost = true;
                break;
            }
            if oracle.increment(&o.lock, token).await? {
                counts.acks += 1;
                say("write ok");
            } else {
                counts.rejects += 1;
                say("write rejected");
            }
            if o.txn {
                let key = format!("fenced/{}/{}", o.lock, o.id);
                if let Some(ok) = held.txn(&key, &format!("{token}-{i}")).await {
                    say(if ok { "txn ok" } else { "txn rejected" });
                }
            }
        }
        if !was_lost && !o.hold.is_zero() {
            tokio::select! {
                _ = lost.cancelled() => {}
                _ = tokio::time::sleep(o.hold) => {}
            }
        }
        if held.is_lost() {
            let t = mono_now().min(held.deadline());
            counts.lost += 1;
            oracle.ended(&o.lock, token, hold, t, "lost").await?;
            say(&format!("lost {} {}", mono_now(), held.lost_reason()));
            if o.probe {
                let stale = oracle.increment(&o.lock, token).await?;
                say(if stale {
                    "stale write accepted"
                } else {
                    "stale write rejected"
                });
                let key = format!("fenced/{}/{}", o.lock, o.id);
                if let Some(ok) = held.txn(&key, "stale").await {
                    say(if ok {
                        "stale txn accepted"
                    } else {
                        "stale txn rejected"
                    });
                }
            }
            drop(held);
            continue;
        }
        if o.keep {
            say("keeping");
            std::future::pending::<()>().await;
        }
        let t = mono_now().min(held.deadline());
        oracle.ended(&o.lock, token, hold, t, "released").await?;
        match held.release().await {
            Ok(()) => say("released"),
            Err(e) => {
                counts.errors += 1;
                say(&format!("error release: {e}"));
                // The release may still be applied later. The same session would adopt
                // the same key on its next acquire, and that late release would then take
                // it away: start the next round with a new session instead.
                if let Some(s) = &session {
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.close()).await;
                }
            }
        }
    }
    if let Some(s) = session {
        let _ = tokio::time::timeout(Duration::from_secs(2), s.close()).await;
    }
    say(&format!(
        "done acks={} rejects={} lost={} errors={}",
        counts.acks, counts.rejects, counts.lost, counts.errors
    ));
    Ok(())
}

async fn acquire(
    backend: &Backend,
    session: Option<&baton::Session>,
    o: &Opts,
) -> baton::Result<Held> {
    let wait = Duration::from_secs(60);
    match (backend, session, &o.elect) {
        (Backend::Store(_), Some(s), None) => Ok(Held::Mutex(
            baton::Mutex::new(s, &o.lock)?.lock_timeout(wait).await?,
        )),
        (Backend::Store(_), Some(s), Some(v)) => Ok(Held::Leader(
            baton::Election::new(s, &o.lock)?
                .campaign_timeout(v.as_bytes(), wait)
                .await?,
        )),
        (Backend::Redis(r), _, None) => {
            Ok(Held::RedisLock(r.lock(&o.lock)?.lock_timeout(wait).await?))
        }
        (Backend::Redis(r), _, Some(v)) => Ok(Held::RedisLeader(
            r.election(&o.lock)?
                .campaign_timeout(v.as_bytes(), wait)
                .await?,
        )),
        (Backend::Store(_), None, _) => Err(baton::Error::InvalidArgument("no session".into())),
    }
}

//! Mixed FIFO, unqueued and redsync-style clients on one odd lock name,
//! with pub/sub and normal connections killed and the server put to sleep.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton::redis::RedisClient;
use baton_testkit::RedisServer;
use rand::Rng;
use tokio::time::Instant;

const NAME: &str = "{tag} a b/ü:x\t\"q\"";

#[derive(Default)]
struct Oracle {
    /// The current holder: (who, the instant until which it is sure to hold).
    holder: Mutex<Option<(String, Instant, Arc<AtomicBool>)>>,
    violations: Mutex<Vec<String>>,
    last_fence: Mutex<i64>,
    counts: Mutex<std::collections::HashMap<String, u64>>,
}

impl Oracle {
    fn enter(&self, who: &str, until: Instant, lost: Arc<AtomicBool>, fence: Option<i64>) {
        let now = Instant::now();
        let mut h = self.holder.lock().unwrap();
        if let Some((other, dl, olost)) = h.as_ref() {
            if *dl > now && !olost.load(Ordering::SeqCst) {
                self.violations.lock().unwrap().push(format!(
                    "{who} got the lock while {other} holds it for {:?} more",
                    *dl - now
                ));
            }
        }
        if let Some(f) = fence {
            let mut last = self.last_fence.lock().unwrap();
            if f <= *last {
                self.violations
                    .lock()
                    .unwrap()
                    .push(format!("{who} got fence {f} after {}", *last));
            }
            *last = f;
        }
        *h = Some((who.to_string(), until, lost));
        *self
            .counts
            .lock()
            .unwrap()
            .entry(who.to_string())
            .or_default() += 1;
    }

    fn leave(&self, who: &str) {
        let mut h = self.holder.lock().unwrap();
        if h.as_ref().is_some_and(|(w, _, _)| w == who) {
            *h = None;
        }
    }
}

async fn baton_worker(
    url: String,
    who: String,
    fifo: bool,
    oracle: Arc<Oracle>,
    stop: Arc<AtomicBool>,
    overruns: Arc<AtomicU64>,
) {
    let mut b = RedisClient::builder(&url)
        .with_ttl(Duration::from_millis(1000))
        .with_poll_interval(Duration::from_millis(100))
        .with_request_timeout(Duration::from_millis(300));
    if !fifo {
        b = b.without_fifo();
    }
    let client = b.connect().await.unwrap();
    let lock = client.lock(NAME).unwrap();
    while !stop.load(Ordering::SeqCst) {
        let mode = rand::thread_rng().gen_range(0..4);
        let t0 = Instant::now();
        let got = match mode {
            0 => lock.lock().await.ok(),
            1 => {
                let to = Duration::from_millis(rand::thread_rng().gen_range(1..300));
                let r = lock.lock_timeout(to).await;
                if t0.elapsed() > to + Duration::from_millis(700) {
                    overruns.fetch_add(1, Ordering::SeqCst);
                    oracle.violations.lock().unwrap().push(format!(
                        "{who}: lock_timeout({to:?}) took {:?}",
                        t0.elapsed()
                    ));
                }
                r.ok()
            }
            2 => lock.try_lock().await.ok(),
            _ => {
                // A lock() future dropped after a while.
                let d = Duration::from_millis(rand::thread_rng().gen_range(0..60));
                tokio::time::timeout(d, lock.lock())
                    .await
                    .ok()
                    .and_then(|r| r.ok())
            }
        };
        let Some(g) = got else {
            continue;
        };
        let lost = Arc::new(AtomicBool::new(false));
        oracle.enter(&who, g.deadline(), lost.clone(), g.fencing_token());
        let hold = Duration::from_millis(rand::thread_rng().gen_range(0..20));
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            () = g.lost() => {}
        }
        if g.is_lost() {
            lost.store(true, Ordering::SeqCst);
        }
        oracle.leave(&who);
        if rand::thread_rng().gen_bool(0.1) {
            drop(g);
        } else {
            let _ = g.unlock().await;
        }
    }
    client.close().await.unwrap();
}

/// A redsync / redis-py style client: SET NX PX, compare-and-delete, polling.
async fn plain_worker(url: String, oracle: Arc<Oracle>, stop: Arc<AtomicBool>) {
    let c = redis::Client::open(url.as_str()).unwrap();
    let mut conn = c.get_multiplexed_async_connection().await.unwrap();
    let del = redis::Script::new(
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end",
    );
    while !stop.load(Ordering::SeqCst) {
        let token = format!("py{:x}", rand::random::<u64>());
        let sent = Instant::now();
        let r: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(NAME)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(1000)
            .query_async(&mut conn)
            .await;
        match r {
            Ok(Some(_)) => {
                let until = sent + Duration::from_millis(1000 - 12);
                oracle.enter("plain", until, Arc::new(AtomicBool::new(false)), None);
                let d = Duration::from_millis(rand::thread_rng().gen_range(0..20));
                tokio::time::sleep(d).await;
                oracle.leave("plain");
                let _: redis::RedisResult<i64> =
                    del.key(NAME).arg(&token).invoke_async(&mut conn).await;
            }
            Ok(None) => {}
            Err(_) => {
                if let Ok(c2) = c.get_multiplexed_async_connection().await {
                    conn = c2;
                }
            }
        }
        let d = Duration::from_millis(rand::thread_rng().gen_range(20..80));
        tokio::time::sleep(d).await;
    }
}

async fn mixed(chaos: bool, plain: bool) {
    let server = RedisServer::start_async().await;
    let url = server.url();
    let oracle = Arc::new(Oracle::default());
    let stop = Arc::new(AtomicBool::new(false));
    let overruns = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(baton_worker(
            url.clone(),
            format!("fifo{i}"),
            true,
            oracle.clone(),
            stop.clone(),
            overruns.clone(),
        )));
    }
    tasks.push(tokio::spawn(baton_worker(
        url.clone(),
        "unqueued".into(),
        false,
        oracle.clone(),
        stop.clone(),
        overruns.clone(),
    )));
    if plain {
        tasks.push(tokio::spawn(plain_worker(
            url.clone(),
            oracle.clone(),
            stop.clone(),
        )));
    }
    let end = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(400)).await;
        if chaos {
            n += 1;
            let cmd: &[&str] = match n % 3 {
                0 => &["CLIENT", "KILL", "TYPE", "pubsub"],
                1 => &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
                _ => &["DEBUG", "SLEEP", "0.1"],
            };
            let _ = server.command(cmd, Duration::from_secs(2));
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("a worker hung")
            .unwrap();
    }
    let counts = oracle.counts.lock().unwrap().clone();
    eprintln!("grants: {counts:?}");
    let v = oracle.violations.lock().unwrap().clone();
    // Leftovers: live waiter places or the key.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    eprintln!("keys left: {keys:?}");
    assert!(
        v.is_empty(),
        "{} violations: {:#?}",
        v.len(),
        &v[..v.len().min(20)]
    );
    for i in 0..4 {
        assert!(
            counts.get(&format!("fifo{i}")).copied().unwrap_or(0) > 5,
            "starved: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_clients_calm() {
    mixed(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_clients_chaos() {
    mixed(true, true).await;
}

/// Two Baton FIFO clients taking turns keep the key handed over from one to the other, never
/// free: a redsync / redis-py client (SET NX PX every 10 ms) and a Baton client built
/// `without_fifo` never get the lock while the turns go on. The docs say such clients "take
/// the key when it is free", not that they may starve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_unqueued_clients_starve_behind_fifo_turns() {
    let (baton, plain, unq_result) = turns_against_plain_clients(true).await;
    // A hazard test: the behaviour the docs now state (`redis` module docs, README).
    assert!(
        baton > 100 && plain < 3 && unq_result.is_err(),
        "starved: baton turns {baton}, plain grants {plain} (polling every 10 ms for 4 s), \
         unqueued Baton lock_timeout(4 s): {unq_result:?}"
    );
}

/// The remedy the docs give: Baton clients built `without_fifo` (`baton lock --no-fifo`)
/// taking turns on the name leave it free between turns, and the redsync-style client and
/// the other unqueued Baton client get the lock too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_clients_get_turns_among_unqueued_baton_clients() {
    let (baton, plain, unq_result) = turns_against_plain_clients(false).await;
    assert!(
        baton > 10 && plain > 0 && unq_result.is_ok(),
        "baton turns {baton}, plain grants {plain} (polling every 10 ms for 4 s), \
         unqueued Baton lock_timeout(4 s): {unq_result:?}"
    );
}

/// Two Baton clients (`fifo` or not) take turns on `shared` for 4 s, against a
/// redsync-style client (SET NX PX every 10 ms) and a Baton client without FIFO waiting
/// with `lock_timeout(4 s)`: the turns taken, the plain client's grants, the unqueued
/// client's result.
async fn turns_against_plain_clients(fifo: bool) -> (u64, u64, baton::Result<()>) {
    let server = RedisServer::start_async().await;
    let url = server.url();
    let stop = Arc::new(AtomicBool::new(false));
    let mut turns = Vec::new();
    for _ in 0..2 {
        let (url, stop) = (url.clone(), stop.clone());
        turns.push(tokio::spawn(async move {
            let b = RedisClient::builder(&url).with_ttl(Duration::from_secs(2));
            let c = if fifo { b } else { b.without_fifo() }
                .connect()
                .await
                .unwrap();
            let l = c.lock("shared").unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let g = l.lock().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                g.unlock().await.unwrap();
                n += 1;
            }
            c.close().await.unwrap();
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A Baton client without FIFO.
    let unq = RedisClient::builder(&url)
        .without_fifo()
        .connect()
        .await
        .unwrap();
    let unq_lock = unq.lock("shared").unwrap();
    let unqueued = tokio::spawn(async move {
        unq_lock
            .lock_timeout(Duration::from_secs(4))
            .await
            .map(drop)
    });
    // A redsync-style client.
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(4);
    let mut plain = 0u64;
    while Instant::now() < end {
        let r: Option<String> = redis::cmd("SET")
            .arg("shared")
            .arg("py")
            .arg("NX")
            .arg("PX")
            .arg(2000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if r.is_some() {
            plain += 1;
            let _: i64 = redis::Script::new(
                "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end",
            )
            .key("shared")
            .arg("py")
            .invoke_async(&mut conn)
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unq_result = unqueued.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let mut baton = 0;
    for t in turns {
        baton += t.await.unwrap();
    }
    eprintln!("fifo {fifo}: baton turns {baton}, plain grants {plain}, unqueued: {unq_result:?}");
    (baton, plain, unq_result)
}

async fn redlock_worker(url: String, who: String, oracle: Arc<Oracle>, stop: Arc<AtomicBool>) {
    let client = RedisClient::builder(&url)
        .with_ttl(Duration::from_millis(1000))
        .with_poll_interval(Duration::from_millis(100))
        .with_request_timeout(Duration::from_millis(800))
        .connect()
        .await
        .unwrap();
    let lock = client.lock(NAME).unwrap();
    while !stop.load(Ordering::SeqCst) {
        let mode = rand::thread_rng().gen_range(0..3);
        let t0 = Instant::now();
        let got = match mode {
            0 => tokio::time::timeout(Duration::from_secs(5), lock.lock())
                .await
                .ok()
                .and_then(|r| r.ok()),
            1 => {
                let to = Duration::from_millis(rand::thread_rng().gen_range(1..300));
                let r = lock.lock_timeout(to).await;
                if t0.elapsed() > to + Duration::from_millis(700) {
                    oracle.violations.lock().unwrap().push(format!(
                        "{who}: lock_timeout({to:?}) took {:?}",
                        t0.elapsed()
                    ));
                }
                r.ok()
            }
            _ => lock.try_lock().await.ok(),
        };
        let Some(g) = got else {
            continue;
        };
        let lost = Arc::new(AtomicBool::new(false));
        oracle.enter(&who, g.deadline(), lost.clone(), None);
        let hold = Duration::from_millis(rand::thread_rng().gen_range(0..30));
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            () = g.lost() => {}
        }
        if g.is_lost() {
            lost.store(true, Ordering::SeqCst);
        }
        oracle.leave(&who);
        let _ = g.unlock().await;
    }
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_chaos() {
    let servers = baton_testkit::redis::RedisServers::start_async(3).await;
    let url = servers.redlock_url();
    let oracle = Arc::new(Oracle::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(redlock_worker(
            url.clone(),
            format!("rl{i}"),
            oracle.clone(),
            stop.clone(),
        )));
    }
    let end = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        n += 1;
        let i = n % 3;
        let cmd: &[&str] = match n % 4 {
            0 => &["CLIENT", "KILL", "TYPE", "pubsub"],
            1 => &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
            2 => &["DEBUG", "SLEEP", "0.6"],
            _ => &["DEBUG", "SLEEP", "0.05"],
        };
        let _ = servers.server(i).command(cmd, Duration::from_secs(3));
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("a worker hung")
            .unwrap();
    }
    let counts = oracle.counts.lock().unwrap().clone();
    eprintln!("grants: {counts:?}");
    let v = oracle.violations.lock().unwrap().clone();
    assert!(
        v.is_empty(),
        "{} violations: {:#?}",
        v.len(),
        &v[..v.len().min(20)]
    );
    for i in 0..4 {
        assert!(
            counts.get(&format!("rl{i}")).copied().unwrap_or(0) > 3,
            "starved: {counts:?}"
        );
    }
}

/// One Redlock master in `DEBUG SLEEP 3`: try_lock, unlock, lock_timeout and a waiter's
/// hand-over all go on with the two others, quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_debug_sleep_on_one_master() {
    let servers = baton_testkit::redis::RedisServers::start_async(3).await;
    let url = servers.redlock_url();
    let long = format!("{{x}} {}", "n".repeat(1000));
    let a = RedisClient::builder(&url)
        .with_ttl(Duration::from_secs(2))
        .with_poll_interval(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let b = RedisClient::builder(&url)
        .with_ttl(Duration::from_secs(2))
        .with_poll_interval(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    // Warm up (scripts loaded, subscriptions made).
    let g = a.lock(&long).unwrap().try_lock().await.unwrap();
    g.unlock().await.unwrap();
    let addr = servers.server(0).addr();
    let sleeper = std::thread::spawn(move || {
        baton_testkit::redis::redis_command(
            addr.parse().unwrap(),
            &["DEBUG", "SLEEP", "3"],
            Duration::from_secs(10),
        )
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let g = a.lock(&long).unwrap().try_lock().await.unwrap();
    let try_took = t.elapsed();
    let lb = b.lock(&long).unwrap();
    let w = tokio::spawn(async move {
        let t = Instant::now();
        let r = lb.lock_timeout(Duration::from_secs(5)).await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    g.unlock().await.unwrap();
    let unlock_took = t.elapsed();
    let t = Instant::now();
    let (r, _) = w.await.unwrap();
    let handover = t.elapsed();
    let gb = r.unwrap();
    assert!(!gb.is_lost());
    gb.unlock().await.unwrap();
    sleeper.join().unwrap();
    eprintln!("try {try_took:?}, unlock {unlock_took:?}, handover {handover:?}");
    assert!(
        try_took < Duration::from_millis(300),
        "try_lock took {try_took:?}"
    );
    assert!(
        unlock_took < Duration::from_millis(300),
        "unlock took {unlock_took:?}"
    );
    assert!(
        handover < Duration::from_millis(500),
        "waiter got it {handover:?} after the unlock"
    );
}

/// FIFO order holds across a `CLIENT KILL TYPE pubsub` of every waiter's subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_order_across_pubsub_kills() {
    let server = RedisServer::start_async().await;
    let url = server.url();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let a = RedisClient::connect(&url).await.unwrap();
    let held = a.lock(NAME).unwrap().lock().await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut ws = Vec::new();
    for i in 0..4 {
        let c = RedisClient::connect(&url).await.unwrap();
        let order = order.clone();
        ws.push(tokio::spawn(async move {
            let g = c.lock(NAME).unwrap().lock().await.unwrap();
            order.lock().unwrap().push((i, Instant::now()));
            tokio::time::sleep(Duration::from_millis(30)).await;
            g.unlock().await.unwrap();
        }));
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let n: i64 = redis::cmd("LLEN")
                .arg(format!("baton:queue:{NAME}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            if n == i + 1 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let _ = server.command(
        &["CLIENT", "KILL", "TYPE", "pubsub"],
        Duration::from_secs(2),
    );
    let t = Instant::now();
    held.unlock().await.unwrap();
    for w in ws {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .unwrap()
            .unwrap();
    }
    let order = order.lock().unwrap().clone();
    let seq: Vec<i64> = order.iter().map(|(i, _)| *i).collect();
    let gaps: Vec<_> = order.iter().map(|(_, at)| *at - t).collect();
    eprintln!("order {seq:?}, at {gaps:?}");
    assert_eq!(seq, vec![0, 1, 2, 3]);
}

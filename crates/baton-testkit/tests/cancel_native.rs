//! Cancel safety: the store-family primitives (semaphore, double barrier) under a sweep
//! of cut points, guards dropped outside a runtime or on another runtime, and `*_timeout`
//! calls that must leave no key behind; and sweeps of lock / campaign futures dropped at
//! many points (on a free name, and around a hand-off) on the embedded store, etcd, Redis
//! and Redlock: after each drop, nothing left that blocks the others, nobody skipped, no
//! second holder, and a later acquire (same or other client) works.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton::store::{KeyRange, Range};
use baton::{
    Client, Coordinator, DoubleBarrier, Election, Error, Mutex, RwLock, Semaphore, Session,
};
use baton_testkit::{EtcdServer, RedisServer, RedisServers};

static N: AtomicU64 = AtomicU64::new(0);
fn unique(p: &str) -> String {
    format!(
        "{p}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

const TTL: Duration = Duration::from_secs(30);
const BOUND: Duration = Duration::from_secs(4);

async fn session(client: &Client) -> Session {
    Session::builder(client)
        .with_ttl(TTL)
        .build()
        .await
        .unwrap()
}

async fn keys_under(client: &Client, prefix: &str) -> Vec<String> {
    let r = client
        .store()
        .range(Range::prefix(prefix.as_bytes().to_vec()))
        .await
        .unwrap();
    r.kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

/// Semaphore of 2: H holds 2; W1 wants 1, W2 wants 2 behind it. H releases, W1 cut `d`
/// after. W2 gets its 2 permits within the bound (W1 if it got one first releases it).
async fn semaphore_handover_sweep(url: &str, rounds: u64, step_us: u64) {
    let client = Client::connect(url).await.unwrap();
    let (h, w1, w2) = (
        session(&client).await,
        session(&client).await,
        session(&client).await,
    );
    for i in 0..rounds {
        let name = unique("sem");
        let held = Semaphore::new(&h, &name, 2)
            .unwrap()
            .acquire_many(2)
            .await
            .unwrap();
        let s1 = Semaphore::new(&w1, &name, 2).unwrap();
        let t1 = tokio::spawn(async move { s1.acquire().await });
        tokio::time::sleep(Duration::from_millis(60)).await;
        let s2 = Semaphore::new(&w2, &name, 2).unwrap();
        let t2 = tokio::spawn(async move { s2.acquire_many_timeout(2, BOUND).await });
        tokio::time::sleep(Duration::from_millis(60)).await;
        let d = Duration::from_micros((i * step_us) % 4000);
        let rel = tokio::spawn(async move { held.release().await });
        tokio::time::sleep(d).await;
        t1.abort();
        let got1 = t1.await.ok().map(|r| r.unwrap());
        rel.await.unwrap().unwrap();
        if let Some(p) = got1 {
            p.release().await.unwrap();
        }
        let p2 = match t2.await.unwrap() {
            Ok(p) => p,
            Err(e) => panic!(
                "{url} round {i} cut {d:?}: W2 got no permits: {e}; keys {:?}",
                keys_under(&client, &format!("{name}/")).await
            ),
        };
        p2.release().await.unwrap();
        let again = tokio::time::timeout(BOUND, Semaphore::new(&w1, &name, 2).unwrap().acquire())
            .await
            .unwrap_or_else(|_| panic!("{url} round {i}: W1 cannot acquire again"))
            .unwrap();
        again.release().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let left = keys_under(&client, &format!("{name}/")).await;
        assert!(left.is_empty(), "{url} round {i}: left {left:?}");
    }
}

/// Double barrier of 2: A's enter is cut at `d`; if cut, B and C then both enter within
/// the bound and leave.
async fn double_barrier_sweep(url: &str, rounds: u64, step_us: u64) {
    let client = Client::connect(url).await.unwrap();
    let (a, b, c) = (
        session(&client).await,
        session(&client).await,
        session(&client).await,
    );
    let mut bad = 0;
    for i in 0..rounds {
        let name = unique("dbar");
        let ba = DoubleBarrier::new(&a, &name, 2).unwrap();
        let d = Duration::from_micros(i * step_us);
        match ba.enter_timeout(d).await {
            Err(e) if e.is_timeout() => {}
            r => panic!("entered alone: {:?}", r.map(|_| ())),
        }
        let bb = DoubleBarrier::new(&b, &name, 2).unwrap();
        let bc = DoubleBarrier::new(&c, &name, 2).unwrap();
        let (gb, gc) = tokio::join!(
            tokio::time::timeout(BOUND, bb.enter()),
            tokio::time::timeout(BOUND, bc.enter())
        );
        let (gb, gc) = match (gb, gc) {
            (Ok(Ok(gb)), Ok(Ok(gc))) => (gb, gc),
            (Ok(rb), Ok(rc)) => {
                eprintln!(
                    "{url} round {i} cut {d:?}: B {:?} C {:?}",
                    rb.map(|_| ()),
                    rc.map(|_| ())
                );
                bad += 1;
                continue;
            }
            _ => panic!(
                "{url} round {i} cut {d:?}: B and C did not both enter; keys {:?}",
                keys_under(&client, &name).await
            ),
        };
        let (lb, lc) = tokio::join!(gb.leave_timeout(BOUND), gc.leave_timeout(BOUND));
        lb.unwrap();
        lc.unwrap();
    }
    assert_eq!(
        bad, 0,
        "{url}: {bad} of {rounds} rounds counted a dropped enter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_mem() {
    let url = format!("mem://{}", unique("n"));
    semaphore_handover_sweep(&url, 40, 97).await;
    double_barrier_sweep(&url, 40, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_etcd() {
    let s = EtcdServer::start_async().await;
    semaphore_handover_sweep(&s.endpoint(), 40, 97).await;
    double_barrier_sweep(&s.endpoint(), 40, 60).await;
}

/// A guard dropped where there is no runtime, and one dropped on a runtime that shuts
/// down at once: what happens to the key, and can the same session lock again?
async fn drop_outside(url: &str) {
    let client = Client::connect(url).await.unwrap();
    let (s1, s2) = (session(&client).await, session(&client).await);
    for how in ["no runtime", "other runtime"] {
        let name = unique("drop");
        let g = Mutex::new(&s1, &name).unwrap().lock().await.unwrap();
        let key = g.key().to_string();
        match how {
            "no runtime" => std::thread::spawn(move || drop(g)).join().unwrap(),
            _ => std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move { drop(g) });
                drop(rt);
            })
            .join()
            .unwrap(),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left = keys_under(&client, &format!("{name}/")).await;
        eprintln!("{url} {how}: keys after drop {left:?} (key was {key})");
        // Documented: the key stays while s1's lease lives, so s2 is locked out.
        let other = Mutex::new(&s2, &name).unwrap().try_lock().await;
        eprintln!(
            "{url} {how}: other session try_lock: {:?}",
            other.as_ref().map(|g| g.key().to_string())
        );
        // The same session locks again.
        let again = tokio::time::timeout(BOUND, Mutex::new(&s1, &name).unwrap().lock()).await;
        match again {
            Ok(Ok(g)) => {
                eprintln!("{url} {how}: same session re-locked: lost={}", g.is_lost());
                g.unlock().await.unwrap();
                let left = keys_under(&client, &format!("{name}/")).await;
                assert!(left.is_empty(), "{url} {how}: after unlock left {left:?}");
            }
            Ok(Err(e)) => panic!("{url} {how}: same session re-lock failed: {e}"),
            Err(_) => panic!("{url} {how}: same session re-lock hangs"),
        }
        // Same with an election.
        let name = unique("edrop");
        let l = Election::new(&s1, &name)
            .unwrap()
            .campaign("x")
            .await
            .unwrap();
        std::thread::spawn(move || drop(l)).join().unwrap();
        let again =
            tokio::time::timeout(BOUND, Election::new(&s1, &name).unwrap().campaign("y")).await;
        match again {
            Ok(Ok(l)) => {
                let leader = Election::new(&s2, &name).unwrap().leader().await.unwrap();
                assert_eq!(leader.value, b"y", "{url}: stale value after re-campaign");
                l.resign().await.unwrap();
            }
            Ok(Err(e)) => panic!("{url}: same session re-campaign failed: {e}"),
            Err(_) => panic!("{url}: same session re-campaign hangs"),
        }
        let _ = Error::NoLeader {
            name: String::new(),
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_outside_mem() {
    drop_outside(&format!("mem://{}", unique("d"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_outside_etcd() {
    let s = EtcdServer::start_async().await;
    drop_outside(&s.endpoint()).await;
    let _ = KeyRange::key(b"x".to_vec());
}

/// `lock_timeout` / `enter_timeout` say "on timeout our key is removed": is it, when the
/// error is returned?
async fn timeout_leaves_key(url: &str) {
    let client = Client::connect(url).await.unwrap();
    let (h, w) = (session(&client).await, session(&client).await);
    let name = unique("tmo");
    let _g = Mutex::new(&h, &name).unwrap().lock().await.unwrap();
    let m = Mutex::new(&w, &name).unwrap();
    let mut left = 0;
    for _ in 0..20 {
        let e = m.lock_timeout(Duration::from_millis(50)).await.unwrap_err();
        assert!(e.is_timeout());
        if keys_under(&client, &format!("{name}/")).await.len() > 1 {
            left += 1;
        }
    }
    let dname = unique("dtmo");
    let b = DoubleBarrier::new(&w, &dname, 2).unwrap();
    let mut dleft = 0;
    for _ in 0..20 {
        let e = b
            .enter_timeout(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(e.is_timeout());
        if !keys_under(&client, &format!("{dname}/waiters/"))
            .await
            .is_empty()
        {
            dleft += 1;
        }
    }
    let sname = unique("stmo");
    let _p = Semaphore::new(&h, &sname, 1)
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let sem = Semaphore::new(&w, &sname, 1).unwrap();
    let ename = unique("etmo");
    let _l = Election::new(&h, &ename)
        .unwrap()
        .campaign("h")
        .await
        .unwrap();
    let el = Election::new(&w, &ename).unwrap();
    let (mut sleft, mut eleft) = (0, 0);
    for _ in 0..20 {
        assert!(sem
            .acquire_timeout(Duration::from_millis(50))
            .await
            .unwrap_err()
            .is_timeout());
        if keys_under(&client, &format!("{sname}/")).await.len() > 1 {
            sleft += 1;
        }
        let e = el
            .campaign_timeout("w", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(e.is_timeout());
        if keys_under(&client, &format!("{ename}/")).await.len() > 1 {
            eleft += 1;
        }
    }
    assert_eq!(
        (sleft, eleft),
        (0, 0),
        "{url}: key left after Timeout (semaphore, election) of 20"
    );
    // A read-write lock: a reader waits behind a writer, a writer behind a reader.
    let rname = unique("rwtmo");
    let (mut rleft, mut wleft) = (0, 0);
    for _ in 0..10 {
        let w1 = RwLock::new(&h, &rname).unwrap().write().await.unwrap();
        let e = RwLock::new(&w, &rname)
            .unwrap()
            .read_timeout(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        let k = keys_under(&client, &format!("{rname}/")).await;
        if k.len() > 1 {
            eprintln!("after read_timeout: {k:?}");
            rleft += 1;
        }
        w1.unlock().await.unwrap();
        let r1 = RwLock::new(&h, &rname).unwrap().read().await.unwrap();
        let e = RwLock::new(&w, &rname)
            .unwrap()
            .write_timeout(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        let k = keys_under(&client, &format!("{rname}/")).await;
        if k.len() > 1 {
            eprintln!("after write_timeout: {k:?}");
            wleft += 1;
        }
        r1.unlock().await.unwrap();
    }
    assert_eq!(
        (rleft, wleft),
        (0, 0),
        "{url}: key left after Timeout (read, write) of 10"
    );
    assert_eq!(
        (left, dleft),
        (0, 0),
        "{url}: waiter key still there after Timeout returned (mutex, double barrier) of 20"
    );
}

/// The same through the `Coordinator` (what `baton lock --timeout` uses): its
/// `lock_timeout` and `campaign_timeout` wrapped `lock()`/`campaign()` in a plain timeout,
/// so they returned with the key still queued as the primitives' own did.
async fn coordinator_timeout_leaves_key(url: &str) {
    let client = Client::connect(url).await.unwrap();
    let (h, w) = (coord(url).await, coord(url).await);
    let name = unique("ctmo");
    let _g = h.lock(&name).unwrap().lock().await.unwrap();
    let ename = unique("cetmo");
    let _l = h
        .election(&ename)
        .unwrap()
        .campaign(b"h".to_vec())
        .await
        .unwrap();
    let (lock, elector) = (w.lock(&name).unwrap(), w.election(&ename).unwrap());
    let (mut left, mut eleft) = (0, 0);
    for _ in 0..10 {
        let e = lock
            .lock_timeout(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        if keys_under(&client, &format!("{name}/")).await.len() > 1 {
            left += 1;
        }
        let e = elector
            .campaign_timeout(b"w".to_vec(), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        if keys_under(&client, &format!("{ename}/")).await.len() > 1 {
            eleft += 1;
        }
    }
    assert_eq!(
        (left, eleft),
        (0, 0),
        "{url}: key left after a Coordinator Timeout (lock, campaign) of 10"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_timeout_key_mem() {
    coordinator_timeout_leaves_key(&format!("mem://{}", unique("ct"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_timeout_key_etcd() {
    let s = EtcdServer::start_async().await;
    coordinator_timeout_leaves_key(&s.endpoint()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_key_mem() {
    timeout_leaves_key(&format!("mem://{}", unique("t"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_key_etcd() {
    let s = EtcdServer::start_async().await;
    timeout_leaves_key(&s.endpoint()).await;
}

async fn coord(url: &str) -> Coordinator {
    Coordinator::builder(url)
        .with_ttl(TTL)
        .connect()
        .await
        .unwrap()
}

/// A lock or an election through the `Coordinator`, for the sweeps below, which treat both
/// alike: acquire (lock / campaign with a value), with a timeout, and release.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Lock,
    Election,
}

/// A `Lock` or an `Elector` handle on one name.
enum Handle {
    Lock(Box<dyn baton::coordinator::Lock>),
    Election(Box<dyn baton::coordinator::Elector>),
}

/// A guard or a leadership.
enum Held {
    Guard(Box<dyn baton::coordinator::Guard>),
    Leading(Box<dyn baton::coordinator::Leading>),
}

impl Kind {
    fn handle(self, c: &Coordinator, name: &str) -> Handle {
        match self {
            Kind::Lock => Handle::Lock(c.lock(name).unwrap()),
            Kind::Election => Handle::Election(c.election(name).unwrap()),
        }
    }

    /// Checks that `name` is held by the one that acquired it with `tag`: no one else can
    /// take the lock; the election's leader has that value.
    async fn assert_held_by(self, o: &Coordinator, name: &str, tag: &[u8], at: &str) {
        match self {
            Kind::Lock => {
                let err = o.lock(name).unwrap().try_lock().await.unwrap_err();
                assert!(matches!(err, Error::Locked { .. }), "{at}: {err}");
            }
            Kind::Election => {
                let leader = o.election(name).unwrap().leader().await.unwrap();
                assert_eq!(leader.value, tag, "{at}");
            }
        }
    }
}

impl Handle {
    async fn acquire(&self, tag: &[u8]) -> baton::Result<Held> {
        match self {
            Handle::Lock(l) => l.lock().await.map(Held::Guard),
            Handle::Election(e) => e.campaign(tag.to_vec()).await.map(Held::Leading),
        }
    }

    async fn acquire_timeout(&self, tag: &[u8], timeout: Duration) -> baton::Result<Held> {
        match self {
            Handle::Lock(l) => l.lock_timeout(timeout).await.map(Held::Guard),
            Handle::Election(e) => e
                .campaign_timeout(tag.to_vec(), timeout)
                .await
                .map(Held::Leading),
        }
    }
}

impl Held {
    fn is_lost(&self) -> bool {
        match self {
            Held::Guard(g) => g.is_lost(),
            Held::Leading(l) => l.is_lost(),
        }
    }

    async fn release(self) -> baton::Result<()> {
        match self {
            Held::Guard(g) => g.release().await,
            Held::Leading(l) => l.release().await,
        }
    }
}

/// A free name, acquire cut at `cut`: then another coordinator acquires within the bound,
/// and so does the same one.
async fn free_sweep(kind: Kind, url: &str, rounds: u64, step_us: u64) {
    let (a, b) = (coord(url).await, coord(url).await);
    let name = unique("free");
    let (ha, hb) = (kind.handle(&a, &name), kind.handle(&b, &name));
    for i in 0..rounds {
        let cut = Duration::from_micros(i * step_us);
        let at = format!("{kind:?} {url} round {i} cut {cut:?}");
        if let Ok(r) = tokio::time::timeout(cut, ha.acquire(b"a")).await {
            r.unwrap().release().await.unwrap();
        }
        let held = hb
            .acquire_timeout(b"b", BOUND)
            .await
            .unwrap_or_else(|e| panic!("{at}: the other cannot acquire: {e}"));
        assert!(!held.is_lost(), "{at}");
        kind.assert_held_by(&a, &name, b"b", &at).await;
        held.release().await.unwrap();
        let held = tokio::time::timeout(BOUND, ha.acquire(b"a"))
            .await
            .unwrap_or_else(|_| panic!("{at}: the same client's acquire hangs"))
            .unwrap();
        held.release().await.unwrap();
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// H holds, W1 waits, W2 waits behind it. H releases and W1's wait is cut `d` after.
/// Either W1 got it (then released) or W2 gets it, within the bound; no second holder
/// meanwhile; W1's client can acquire again.
async fn handover_sweep(kind: Kind, url: &str, rounds: u64, step_us: u64) {
    let (h, w1, w2, o) = (
        coord(url).await,
        coord(url).await,
        coord(url).await,
        coord(url).await,
    );
    for i in 0..rounds {
        let name = unique("hand");
        let held = kind.handle(&h, &name).acquire(b"h").await.unwrap();
        let h1 = kind.handle(&w1, &name);
        let t1 = tokio::spawn(async move { h1.acquire(b"w1").await });
        tokio::time::sleep(Duration::from_millis(60)).await;
        let h2 = kind.handle(&w2, &name);
        let t2 = tokio::spawn(async move { h2.acquire_timeout(b"w2", BOUND).await });
        tokio::time::sleep(Duration::from_millis(60)).await;
        let d = Duration::from_micros((i * step_us) % 4000);
        let at = format!("{kind:?} {url} round {i} cut {d:?}");
        let rel = tokio::spawn(async move { held.release().await });
        tokio::time::sleep(d).await;
        t1.abort();
        let got1 = match t1.await {
            Ok(r) => Some(r.unwrap()),
            Err(e) => {
                assert!(e.is_cancelled(), "{at}: {e}");
                None
            }
        };
        rel.await.unwrap().unwrap();
        if let Some(held1) = got1 {
            assert!(!t2.is_finished(), "{at}: W2 holds too");
            kind.assert_held_by(&o, &name, b"w1", &at).await;
            held1.release().await.unwrap();
        }
        let held2 = match t2.await.unwrap() {
            Ok(held) => held,
            Err(e) => panic!("{at}: W2 did not get it: {e}"),
        };
        assert!(!held2.is_lost(), "{at}");
        kind.assert_held_by(&o, &name, b"w2", &at).await;
        held2.release().await.unwrap();
        let again = tokio::time::timeout(BOUND, kind.handle(&w1, &name).acquire(b"again"))
            .await
            .unwrap_or_else(|_| panic!("{at}: W1 cannot acquire again"))
            .unwrap();
        again.release().await.unwrap();
    }
    for c in [h, w1, w2, o] {
        c.close().await.unwrap();
    }
}

async fn all(url: &str) {
    for kind in [Kind::Lock, Kind::Election] {
        free_sweep(kind, url, 60, 40).await;
        handover_sweep(kind, url, 40, 97).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_mem() {
    all(&format!("mem://{}", unique("m"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_etcd() {
    let s = EtcdServer::start_async().await;
    all(&s.endpoint()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_redis() {
    let s = RedisServer::start_async().await;
    all(&s.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_redlock() {
    let s = RedisServers::start_async(3).await;
    all(&s.redlock_url()).await;
}

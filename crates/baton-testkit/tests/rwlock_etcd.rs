//! The read-write lock on a real etcd: wake-ups, exclusion under connection cuts
//! and restarts, cancellation at every point.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton::store::Range;
use baton::{Client, Error, RwLock, Session};
use baton_testkit::proxy::FaultProxy;
use baton_testkit::{etcd_available, EtcdServer};

fn require_etcd() -> bool {
    if etcd_available() {
        true
    } else {
        eprintln!("etcd not installed: skipped");
        false
    }
}

async fn session(c: &Client, ttl: Duration) -> Session {
    Session::builder(c).with_ttl(ttl).build().await.unwrap()
}

async fn keys(c: &Client, prefix: &str) -> Vec<String> {
    c.store()
        .range(Range::prefix(prefix.to_string()))
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key_str().into_owned())
        .collect()
}

/// A writer's release grants every reader queued right behind it at once, and not the
/// reader behind the next writer; readers' releases wake the next writer only with the
/// last of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_wakeups_on_etcd() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    for same_client in [false, true] {
        let name = format!("wk-{same_client}");
        let a = Client::connect(&etcd.endpoint()).await.unwrap();
        let b = if same_client {
            a.clone()
        } else {
            Client::connect(&etcd.endpoint()).await.unwrap()
        };
        let c = if same_client {
            a.clone()
        } else {
            Client::connect(&etcd.endpoint()).await.unwrap()
        };
        let ttl = Duration::from_secs(30);
        let w1 = RwLock::new(&session(&a, ttl).await, &name)
            .unwrap()
            .write()
            .await
            .unwrap();
        let mut readers = Vec::new();
        for _ in 0..5 {
            let s = session(&b, ttl).await;
            let rw = RwLock::new(&s, &name).unwrap();
            readers.push(tokio::spawn(async move { rw.read().await.unwrap() }));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let sw2 = session(&c, ttl).await;
        let rw2 = RwLock::new(&sw2, &name).unwrap();
        let w2 = tokio::spawn(async move { rw2.write().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let s6 = session(&b, ttl).await;
        let rw6 = RwLock::new(&s6, &name).unwrap();
        let r6 = tokio::spawn(async move { rw6.read().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (b0, c0) = (b.stats().wakeups, c.stats().wakeups);
        assert!(readers.iter().all(|r| !r.is_finished()));
        let t = std::time::Instant::now();
        w1.unlock().await.unwrap();
        let mut held = Vec::new();
        for r in readers {
            held.push(
                tokio::time::timeout(Duration::from_secs(5), r)
                    .await
                    .expect("a reader behind the writer not granted")
                    .unwrap(),
            );
        }
        let all_in = t.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!r6.is_finished(), "reader behind the second writer granted");
        assert!(!w2.is_finished(), "second writer granted with readers");
        let (b1, c1) = (b.stats().wakeups, c.stats().wakeups);
        eprintln!(
            "same_client={same_client}: 5 readers in {all_in:?}; wakeups readers' client {} writer's client {}",
            b1 - b0,
            c1 - c0
        );
        // Release readers oldest first: the writer waits for the newest, so it must not
        // be woken before the last one.
        let last = held.pop().unwrap();
        for g in held {
            g.unlock().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!w2.is_finished(), "second writer granted with a reader");
        let c2 = c.stats().wakeups;
        eprintln!(
            "same_client={same_client}: wakeups of writer's client for 4 non-last reader releases: {}",
            c2 - c1
        );
        let t = std::time::Instant::now();
        last.unlock().await.unwrap();
        let w2 = tokio::time::timeout(Duration::from_secs(5), w2)
            .await
            .expect("writer not granted after the last reader")
            .unwrap();
        eprintln!("same_client={same_client}: writer in {:?}", t.elapsed());
        assert!(!r6.is_finished());
        w2.unlock().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), r6)
            .await
            .expect("last reader")
            .unwrap()
            .unlock()
            .await
            .unwrap();
    }
}

/// Many sessions on three clients through a fault proxy that resets every connection now
/// and then, and one etcd restart: never a writer beside anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_exclusion_under_cuts_and_restart() {
    if !require_etcd() {
        return;
    }
    let mut etcd = EtcdServer::start_async().await;
    let proxy = Arc::new(FaultProxy::start(etcd.client_port()).await);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            Client::builder(&proxy.url("http"))
                .with_request_timeout(Duration::from_secs(2))
                .with_dial_timeout(Duration::from_secs(2))
                .connect()
                .await
                .unwrap(),
        );
    }
    let state = Arc::new(AtomicI64::new(0));
    let grants = Arc::new(AtomicI64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..9u64 {
        let client = clients[(i % 3) as usize].clone();
        let (state, grants, stop) = (state.clone(), grants.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let s = session(&client, Duration::from_secs(20)).await;
            let rw = RwLock::new(&s, "cut").unwrap();
            let mut n = i;
            let mut errors = Vec::new();
            while !stop.is_cancelled() {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let x = n >> 33;
                let write = x % 3 == 0;
                let timeout = Duration::from_millis(50 + x % 1500);
                let (delta, g): (i64, Option<Box<dyn std::any::Any + Send>>) = if write {
                    match rw.write_timeout(timeout).await {
                        Ok(g) => (1000, Some(Box::new(g))),
                        Err(e) => {
                            errors.push(format!("{e}"));
                            (0, None)
                        }
                    }
                } else {
                    match rw.read_timeout(timeout).await {
                        Ok(g) => (1, Some(Box::new(g))),
                        Err(e) => {
                            errors.push(format!("{e}"));
                            (0, None)
                        }
                    }
                };
                if let Some(g) = g {
                    grants.fetch_add(1, Ordering::SeqCst);
                    let now = state.fetch_add(delta, Ordering::SeqCst) + delta;
                    assert!(
                        now <= 1000 && (delta == 1 || now == 1000),
                        "overlap: state {now} after +{delta} (task {i})"
                    );
                    tokio::time::sleep(Duration::from_millis(x % 40)).await;
                    state.fetch_sub(delta, Ordering::SeqCst);
                    drop(g);
                }
                if s.is_lost() {
                    panic!("session lost: {:?}", s.lost_reason());
                }
            }
            let mut kinds: Vec<String> = errors
                .iter()
                .map(|e| e.chars().take(60).collect())
                .collect();
            kinds.sort();
            kinds.dedup();
            (i, errors.len(), kinds, s)
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut round = 0;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(700)).await;
        round += 1;
        if round == 25 {
            etcd.restart();
        } else {
            proxy.reset_all();
        }
    }
    stop.cancel();
    let mut sessions = Vec::new();
    for t in tasks {
        let (i, n, kinds, s) = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a task hung")
            .unwrap();
        eprintln!("task {i}: {n} errors {kinds:?}");
        sessions.push(s);
    }
    eprintln!("grants: {}", grants.load(Ordering::SeqCst));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left = keys(&clients[0], "cut/").await;
    assert!(left.is_empty(), "keys left behind: {left:?}");
    for s in sessions {
        s.close().await.unwrap();
    }
}

/// A read() or write() dropped at every point of its life (0..60 ms in steps): no key left
/// behind, and nobody else's place lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_cancel_at_every_point() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let client = Client::connect(&etcd.endpoint()).await.unwrap();
    let other = Client::connect(&etcd.endpoint()).await.unwrap();
    let ttl = Duration::from_secs(30);
    let s = session(&client, ttl).await;
    let so = session(&other, ttl).await;
    let rw = RwLock::new(&s, "cx").unwrap();
    let orw = RwLock::new(&so, "cx").unwrap();
    for held in ["none", "read", "write"] {
        for micros in (0..30_000).step_by(500) {
            let g: Option<Box<dyn std::any::Any + Send>> = match held {
                "read" => Some(Box::new(orw.read().await.unwrap())),
                "write" => Some(Box::new(orw.write().await.unwrap())),
                _ => None,
            };
            for write in [false, true] {
                let d = Duration::from_micros(micros);
                let r = if write {
                    tokio::time::timeout(d, rw.write())
                        .await
                        .map(|r| r.map(drop))
                } else {
                    tokio::time::timeout(d, rw.read())
                        .await
                        .map(|r| r.map(drop))
                };
                if let Ok(Err(e)) = r {
                    panic!("{held} {write} {micros}: {e:?}");
                }
                // Our next try must not be refused by our own cancelled key.
                let again = if write {
                    tokio::time::timeout(Duration::from_secs(5), rw.try_write())
                        .await
                        .unwrap()
                        .map(drop)
                } else {
                    tokio::time::timeout(Duration::from_secs(5), rw.try_read())
                        .await
                        .unwrap()
                        .map(drop)
                };
                match (held, write, again) {
                    ("none", _, Ok(())) | ("read", false, Ok(())) => {}
                    ("write", _, Err(Error::Locked { .. }))
                    | ("read", true, Err(Error::Locked { .. })) => {}
                    (h, w, r) => panic!("{h} write={w} {micros}us: the try after: {r:?}"),
                }
            }
            drop(g);
            // Settle, then nobody's key is left.
            let t = std::time::Instant::now();
            loop {
                let left = keys(&client, "cx/").await;
                if left.is_empty() {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "{held} {micros}us: keys left: {left:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A waiting writer's key deleted or freed by hand, or its lease revoked, while a reader
/// holds and another reader waits behind that writer: the writer is told, the reader behind
/// is granted at once, nothing is left; and a holding writer whose lease is revoked learns
/// it from lost() while the readers behind it are granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_hand_deletes_and_revokes() {
    use baton::store::KeyRange;
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let admin = Client::connect(&etcd.endpoint()).await.unwrap();
    let within = Duration::from_secs(3);
    for how in ["delete", "free", "revoke"] {
        let name = format!("hd-{how}");
        let c1 = Client::connect(&etcd.endpoint()).await.unwrap();
        let c2 = Client::connect(&etcd.endpoint()).await.unwrap();
        let ttl = Duration::from_secs(30);
        let s0 = session(&c1, ttl).await;
        let r0 = RwLock::new(&s0, &name).unwrap().read().await.unwrap();
        let sw = session(&c2, ttl).await;
        let wlease = sw.lease_id();
        let rww = RwLock::new(&sw, &name).unwrap();
        let w = tokio::spawn(async move { rww.write().await.map(drop) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s1 = session(&c1, ttl).await;
        let rw1 = RwLock::new(&s1, &name).unwrap();
        let r1 = tokio::spawn(async move { rw1.read().await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!r1.is_finished());
        let wkey = format!("{name}/write/{wlease:x}");
        let t = std::time::Instant::now();
        match how {
            "delete" => {
                admin
                    .store()
                    .delete(KeyRange::key(wkey.as_bytes()))
                    .await
                    .unwrap();
            }
            "free" => {
                admin.store().put(wkey.as_bytes(), b"", 0).await.unwrap();
            }
            _ => {
                admin.store().lease_revoke(wlease).await.unwrap();
            }
        }
        let werr = tokio::time::timeout(within, w)
            .await
            .unwrap_or_else(|_| panic!("{how}: the writer was not told"))
            .unwrap();
        eprintln!("{how}: writer told in {:?}: {werr:?}", t.elapsed());
        assert!(werr.is_err(), "{how}: writer granted");
        let g1 = tokio::time::timeout(within, r1)
            .await
            .unwrap_or_else(|_| panic!("{how}: the reader behind was not granted"))
            .unwrap()
            .unwrap();
        eprintln!("{how}: reader behind granted in {:?}", t.elapsed());
        g1.unlock().await.unwrap();
        r0.unlock().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let left = keys(&admin, &format!("{name}/")).await;
        assert!(left.is_empty(), "{how}: keys left: {left:?}");

        // A holding writer, readers behind it; its lease revoked.
        let sw = session(&c2, ttl).await;
        let wlease = sw.lease_id();
        let g = RwLock::new(&sw, &name).unwrap().write().await.unwrap();
        let mut readers = Vec::new();
        for _ in 0..3 {
            let s = session(&c1, ttl).await;
            let rw = RwLock::new(&s, &name).unwrap();
            readers.push(tokio::spawn(async move { rw.read().await.unwrap() }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = std::time::Instant::now();
        match how {
            "delete" => {
                admin
                    .store()
                    .delete(KeyRange::key(g.key().as_bytes()))
                    .await
                    .unwrap();
            }
            "free" => {
                admin.store().put(g.key().as_bytes(), b"", 0).await.unwrap();
            }
            _ => {
                admin.store().lease_revoke(wlease).await.unwrap();
            }
        }
        tokio::time::timeout(within, g.lost())
            .await
            .unwrap_or_else(|_| panic!("{how}: holding writer's lost() silent"));
        eprintln!("{how}: holder's lost() in {:?}", t.elapsed());
        for r in readers {
            tokio::time::timeout(within, r)
                .await
                .unwrap_or_else(|_| panic!("{how}: reader not granted"))
                .unwrap()
                .unlock()
                .await
                .unwrap();
        }
        let err = g.unlock().await;
        assert!(err.is_err(), "{how}: unlock of a lost guard: {err:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let left = keys(&admin, &format!("{name}/")).await;
        assert!(left.is_empty(), "{how}: keys left: {left:?}");
    }
}

//! Cancel-safety sweeps: futures of lock / campaign / acquire dropped at many points (on a
//! free name, and around a hand-off), on the embedded store, etcd, Redis and Redlock.
//! After each drop: nothing left that blocks the others, nobody skipped, no second holder,
//! and a later acquire (same or other client) works.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton::{Coordinator, Error};
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
/// Far below the TTL: a hold left behind would show as a wait this long.
const BOUND: Duration = Duration::from_secs(4);

async fn coord(url: &str) -> Coordinator {
    Coordinator::builder(url)
        .with_ttl(TTL)
        .connect()
        .await
        .unwrap()
}

/// Lock: a free name, `lock()` cut at `cut`; then another coordinator's try_lock works
/// within the bound, and so does the same one's.
async fn lock_free_sweep(url: &str, rounds: u64, step_us: u64) {
    let (a, b) = (coord(url).await, coord(url).await);
    let name = unique("free");
    let la = a.lock(&name).unwrap();
    let lb = b.lock(&name).unwrap();
    for i in 0..rounds {
        let cut = Duration::from_micros(i * step_us);
        if let Ok(r) = tokio::time::timeout(cut, la.lock()).await {
            r.unwrap().release().await.unwrap();
        }
        let t = tokio::time::Instant::now();
        let g = loop {
            match lb.try_lock().await {
                Ok(g) => break g,
                Err(Error::Locked { .. }) if t.elapsed() < BOUND => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("{url} round {i} cut {cut:?}: other's try_lock: {e}"),
            }
        };
        assert!(!g.is_lost());
        g.release().await.unwrap();
        let g = tokio::time::timeout(BOUND, la.lock())
            .await
            .unwrap_or_else(|_| panic!("{url} round {i}: same client's lock hangs"))
            .unwrap();
        g.release().await.unwrap();
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Lock: H holds, W1 waits, W2 waits behind it. H releases and W1's wait is cut `d` after.
/// Either W1 got it (its guard, then released) or W2 gets it, within the bound; no second
/// holder meanwhile; W1's client can lock again.
async fn lock_handover_sweep(url: &str, rounds: u64, step_us: u64) {
    let (h, w1, w2, o) = (
        coord(url).await,
        coord(url).await,
        coord(url).await,
        coord(url).await,
    );
    for i in 0..rounds {
        let name = unique("hand");
        let held = h.lock(&name).unwrap().lock().await.unwrap();
        let l1 = w1.lock(&name).unwrap();
        let t1 = tokio::spawn(async move { l1.lock().await });
        tokio::time::sleep(Duration::from_millis(60)).await;
        let l2 = w2.lock(&name).unwrap();
        let t2 = tokio::spawn(async move { l2.lock_timeout(BOUND).await });
        tokio::time::sleep(Duration::from_millis(60)).await;
        let d = Duration::from_micros((i * step_us) % 4000);
        let rel = tokio::spawn(async move { held.release().await });
        tokio::time::sleep(d).await;
        t1.abort();
        let got1 = match t1.await {
            Ok(r) => Some(r.unwrap()),
            Err(e) => {
                assert!(e.is_cancelled());
                None
            }
        };
        rel.await.unwrap().unwrap();
        if let Some(g1) = got1 {
            assert!(!t2.is_finished(), "{url} round {i}: W2 holds too");
            let err = o.lock(&name).unwrap().try_lock().await.unwrap_err();
            assert!(matches!(err, Error::Locked { .. }), "{err}");
            g1.release().await.unwrap();
        }
        let g2 = match t2.await.unwrap() {
            Ok(g) => g,
            Err(e) => panic!("{url} round {i} cut {d:?}: W2 did not get the lock: {e}"),
        };
        assert!(!g2.is_lost());
        let err = o.lock(&name).unwrap().try_lock().await.unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{url}: {err}");
        g2.release().await.unwrap();
        let g = tokio::time::timeout(BOUND, w1.lock(&name).unwrap().lock())
            .await
            .unwrap_or_else(|_| panic!("{url} round {i}: W1 cannot lock again"))
            .unwrap();
        g.release().await.unwrap();
    }
    for c in [h, w1, w2, o] {
        c.close().await.unwrap();
    }
}

/// Election: as the hand-off sweep, with campaign/resign.
async fn election_handover_sweep(url: &str, rounds: u64, step_us: u64) {
    let (h, w1, w2, o) = (
        coord(url).await,
        coord(url).await,
        coord(url).await,
        coord(url).await,
    );
    for i in 0..rounds {
        let name = unique("elect");
        let lead = h
            .election(&name)
            .unwrap()
            .campaign(b"h".to_vec())
            .await
            .unwrap();
        let e1 = w1.election(&name).unwrap();
        let t1 = tokio::spawn(async move { e1.campaign(b"w1".to_vec()).await });
        tokio::time::sleep(Duration::from_millis(60)).await;
        let e2 = w2.election(&name).unwrap();
        let t2 = tokio::spawn(async move { e2.campaign_timeout(b"w2".to_vec(), BOUND).await });
        tokio::time::sleep(Duration::from_millis(60)).await;
        let d = Duration::from_micros((i * step_us) % 4000);
        let rel = tokio::spawn(async move { lead.release().await });
        tokio::time::sleep(d).await;
        t1.abort();
        let got1 = match t1.await {
            Ok(r) => Some(r.unwrap()),
            Err(_) => None,
        };
        rel.await.unwrap().unwrap();
        if let Some(l1) = got1 {
            assert!(!t2.is_finished(), "{url} round {i}: W2 leads too");
            l1.release().await.unwrap();
        }
        let l2 = match t2.await.unwrap() {
            Ok(l) => l,
            Err(e) => panic!("{url} round {i} cut {d:?}: W2 did not lead: {e}"),
        };
        let leader = o.election(&name).unwrap().leader().await.unwrap();
        assert_eq!(leader.value, b"w2", "{url} round {i}");
        l2.release().await.unwrap();
        let l = tokio::time::timeout(
            BOUND,
            w1.election(&name).unwrap().campaign(b"again".to_vec()),
        )
        .await
        .unwrap_or_else(|_| panic!("{url} round {i}: W1 cannot campaign again"))
        .unwrap();
        l.release().await.unwrap();
    }
    for c in [h, w1, w2, o] {
        c.close().await.unwrap();
    }
}

/// Election on a free name, campaign cut at `cut`: another then leads within the bound.
async fn election_free_sweep(url: &str, rounds: u64, step_us: u64) {
    let (a, b) = (coord(url).await, coord(url).await);
    let name = unique("efree");
    let ea = a.election(&name).unwrap();
    let eb = b.election(&name).unwrap();
    for i in 0..rounds {
        let cut = Duration::from_micros(i * step_us);
        if let Ok(r) = tokio::time::timeout(cut, ea.campaign(b"a".to_vec())).await {
            r.unwrap().release().await.unwrap();
        }
        let l = tokio::time::timeout(BOUND, eb.campaign(b"b".to_vec()))
            .await
            .unwrap_or_else(|_| panic!("{url} round {i} cut {cut:?}: other cannot lead"))
            .unwrap();
        l.release().await.unwrap();
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
}

async fn all(url: &str) {
    lock_free_sweep(url, 60, 40).await;
    lock_handover_sweep(url, 40, 97).await;
    election_free_sweep(url, 60, 40).await;
    election_handover_sweep(url, 40, 97).await;
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

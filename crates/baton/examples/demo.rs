//! The demo behind `scripts/demo.sh`: workers contend for one lock, every grant carries a
//! fencing token, a fenced resource refuses a stale holder, and a holder whose lease is
//! revoked hears of it at once.
//!
//! Runs on the embedded store by default; set `BATON_ENDPOINTS` to use etcd.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use baton::{Client, Mutex, Session};

/// A resource that remembers the highest fencing token it has seen and refuses lower ones.
#[derive(Default)]
struct FencedResource {
    highest: i64,
    log: Vec<String>,
    accepted: usize,
    rejected: usize,
}

impl FencedResource {
    fn write(&mut self, who: &str, token: i64) -> bool {
        if token < self.highest {
            self.rejected += 1;
            self.log
                .push(format!("REJECT {who} token={token} < {}", self.highest));
            false
        } else {
            self.highest = token;
            self.accepted += 1;
            true
        }
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("demo: {e}");
        std::process::exit(1);
    }
}

async fn run() -> baton::Result<()> {
    let endpoints = std::env::var("BATON_ENDPOINTS").unwrap_or_else(|_| "mem://demo".into());
    let lock = format!("demo/report-{}", std::process::id());
    println!("baton demo on {endpoints}: 4 workers contend for lock {lock:?}\n");

    let resource = Arc::new(StdMutex::new(FencedResource::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 1..=4 {
        // Each worker is its own "machine": its own client and session (lease).
        let client = Client::connect(&endpoints).await?;
        let session = Session::builder(&client)
            .with_ttl(Duration::from_secs(10))
            .build()
            .await?;
        let (lock, resource) = (lock.clone(), resource.clone());
        tasks.push(tokio::spawn(async move {
            let m = Mutex::new(&session, &lock)?;
            let mut grants = Vec::new();
            for _ in 0..3 {
                let t0 = Instant::now();
                let g = m.lock().await?;
                let waited = t0.elapsed();
                let token = g.fencing_token();
                let ok = resource.lock().map(|mut r| r.write(&format!("worker-{w}"), token));
                println!(
                    "{:>7.1} ms  worker-{w} acquired  token={token:<5} key={}  (waited {:.1} ms, write {})",
                    started.elapsed().as_secs_f64() * 1e3,
                    g.key(),
                    waited.as_secs_f64() * 1e3,
                    if ok.unwrap_or(false) { "accepted" } else { "REJECTED" },
                );
                grants.push(token);
                tokio::time::sleep(Duration::from_millis(20)).await;
                g.unlock().await?;
            }
            Ok::<_, baton::Error>(grants)
        }));
    }
    let mut all = BTreeMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let grants = t
            .await
            .map_err(|e| baton::Error::Store(format!("worker panicked: {e}")))??;
        all.insert(i + 1, grants);
    }
    let mut tokens: Vec<i64> = all.values().flatten().copied().collect();
    tokens.sort_unstable();
    println!(
        "\n12 grants, one holder at a time; tokens strictly increase: {}\n",
        tokens.windows(2).all(|w| w[0] < w[1])
    );

    // A holder loses its lock behind its back: an operator revokes its lease.
    println!("-- a stale holder --");
    let admin = Client::connect(&endpoints).await?;
    let a = Session::new(&Client::connect(&endpoints).await?).await?;
    let b = Session::new(&Client::connect(&endpoints).await?).await?;
    let ga = Mutex::new(&a, &lock)?.lock().await?;
    println!("worker-A holds token={}", ga.fencing_token());
    let waiter = tokio::spawn({
        let m = Mutex::new(&b, &lock)?;
        async move { m.lock().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let revoked = Instant::now();
    admin.store().lease_revoke(a.lease_id()).await?;
    println!("operator revoked worker-A's lease");
    ga.lost().await;
    println!(
        "worker-A told \"lock lost: {}\" after {:.1} ms",
        ga.lost_reason().unwrap_or_default(),
        revoked.elapsed().as_secs_f64() * 1e3
    );
    let gb = waiter
        .await
        .map_err(|e| baton::Error::Store(format!("waiter panicked: {e}")))??;
    let ok_b = resource
        .lock()
        .map(|mut r| r.write("worker-B", gb.fencing_token()));
    println!(
        "worker-B acquired token={}: write {}",
        gb.fencing_token(),
        if ok_b.unwrap_or(false) {
            "accepted"
        } else {
            "REJECTED"
        }
    );
    // Had worker-A been paused instead of told, its late write would carry the old token:
    let ok_a = resource
        .lock()
        .map(|mut r| r.write("worker-A", ga.fencing_token()));
    println!(
        "worker-A's late write with token={}: {}",
        ga.fencing_token(),
        if ok_a.unwrap_or(true) {
            "accepted (BUG)"
        } else {
            "refused by the fenced resource"
        }
    );
    gb.unlock().await?;
    b.close().await?;

    if let Ok(r) = resource.lock() {
        println!(
            "\nfenced resource: {} writes accepted, {} refused",
            r.accepted, r.rejected
        );
        for l in &r.log {
            println!("  {l}");
        }
    }
    Ok(())
}

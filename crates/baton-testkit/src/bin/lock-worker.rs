//! A worker process for multi-process tests: takes a lock `ROUNDS` times and, while holding
//! it, does an unprotected read-modify-write of a counter file and appends its fencing token
//! to a log. If two processes ever held the lock at once, increments would be lost.
//!
//! Usage: `lock-worker ENDPOINTS LOCK ROUNDS COUNTER_FILE LOG_FILE`

use std::io::Write;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: lock-worker ENDPOINTS LOCK ROUNDS COUNTER_FILE LOG_FILE");
        std::process::exit(2);
    }
    if let Err(e) = run(&args[1], &args[2], &args[3], &args[4], &args[5]).await {
        eprintln!("lock-worker: {e}");
        std::process::exit(1);
    }
}

async fn run(
    endpoints: &str,
    lock: &str,
    rounds: &str,
    counter: &str,
    log: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = rounds.parse()?;
    let client = baton::Client::connect(endpoints).await?;
    let session = baton::Session::builder(&client)
        .with_ttl(Duration::from_secs(10))
        .build()
        .await?;
    let m = baton::Mutex::new(&session, lock)?;
    for _ in 0..rounds {
        let g = m.lock_timeout(Duration::from_secs(30)).await?;
        let cur: u64 = std::fs::read_to_string(counter)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let tmp = format!("{counter}.{}", std::process::id());
        std::fs::write(&tmp, (cur + 1).to_string())?;
        std::fs::rename(&tmp, counter)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        writeln!(f, "{} {}", std::process::id(), g.fencing_token())?;
        drop(f);
        g.unlock().await?;
    }
    session.close().await?;
    Ok(())
}

//! A worker process for multi-process semaphore tests.
//!
//! - `sem-worker ENDPOINTS NAME PERMITS TTL_SECS rounds N LOG_FILE`: acquires a permit `N`
//!   times; while holding it, sleeps 30 ms and appends `PID START_NS END_NS` to `LOG_FILE`
//!   (wall-clock nanoseconds taken just after the grant and just before the release, so the
//!   interval lies inside the hold). If more than `PERMITS` processes ever held at once,
//!   more than `PERMITS` logged intervals overlap.
//! - `sem-worker ENDPOINTS NAME PERMITS TTL_SECS hold`: acquires a permit, prints
//!   `holding <create revision>`, and holds it until killed (or until it is lost).

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: sem-worker ENDPOINTS NAME PERMITS TTL_SECS (rounds N LOG_FILE | hold)";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("{USAGE}");
        std::process::exit(2);
    }
    if let Err(e) = run(&args[1..]).await {
        eprintln!("sem-worker: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (endpoints, name) = (&args[0], &args[1]);
    let permits: u32 = args[2].parse()?;
    let ttl = Duration::from_secs(args[3].parse()?);
    let client = baton::Client::connect(endpoints).await?;
    let session = baton::Session::builder(&client)
        .with_ttl(ttl)
        .build()
        .await?;
    let sem = baton::Semaphore::new(&session, name, permits)?;
    match (args[4].as_str(), &args[5..]) {
        ("rounds", [n, log]) => {
            for _ in 0..n.parse::<usize>()? {
                let permit = sem.acquire_timeout(Duration::from_secs(60)).await?;
                let start = now_ns();
                tokio::time::sleep(Duration::from_millis(30)).await;
                let end = now_ns();
                if permit.is_lost() {
                    return Err("permit lost while held".into());
                }
                let line = format!("{} {start} {end}\n", std::process::id());
                // One write per line with O_APPEND: lines from processes never interleave.
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?
                    .write_all(line.as_bytes())?;
                permit.release().await?;
            }
            session.close().await?;
            Ok(())
        }
        ("hold", []) => {
            let permit = sem.acquire().await?;
            println!("holding {}", permit.create_revision());
            std::io::stdout().flush()?;
            permit.lost().await;
            Err("permit lost".into())
        }
        _ => Err(USAGE.into()),
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

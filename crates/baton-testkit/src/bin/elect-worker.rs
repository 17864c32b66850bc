//! A candidate process for failover tests: campaigns, prints `leading <token>` once it
//! leads, then holds the leadership until killed.
//!
//! Usage: `elect-worker ENDPOINTS ELECTION VALUE TTL_SECS`

use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: elect-worker ENDPOINTS ELECTION VALUE TTL_SECS");
        std::process::exit(2);
    }
    if let Err(e) = run(&args[1], &args[2], &args[3], &args[4]).await {
        eprintln!("elect-worker: {e}");
        std::process::exit(1);
    }
}

async fn run(
    endpoints: &str,
    election: &str,
    value: &str,
    ttl: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let client = baton::Client::connect(endpoints).await?;
    let session = baton::Session::builder(&client)
        .with_ttl(Duration::from_secs(ttl.parse()?))
        .build()
        .await?;
    let leadership = baton::Election::new(&session, election)?
        .campaign(value)
        .await?;
    println!("leading {}", leadership.fencing_token());
    leadership.lost().await;
    Err("leadership lost".into())
}

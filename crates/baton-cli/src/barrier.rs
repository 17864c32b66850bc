//! `baton barrier NAME --count N`: a double barrier: enter, wait for N, then leave.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::cli::{self, Global};
use crate::exit::{self, CliError};
use crate::output::{self, Output};
use crate::supervisor::Signals;

const EXAMPLES: &str = "\
Examples:
  # on each of 3 machines: start the benchmark together
  baton barrier bench/start --count 3 && ./run-benchmark.sh

  # give up if the others are not there within 2 minutes (exit 124)
  baton barrier deploy/sync --count 5 --timeout 2m

baton enters the barrier, waits until N participants have entered, then leaves and waits
until all of them have left: so every participant returns at about the same time, and none
returns before all N arrived. It prints one line (`passed NAME (round R)`) and exits 0.
If --timeout passes first it exits 124 and counts as gone (removing its key gets 1 s: if
the backend does not answer, a line on stderr says the key expires by itself within the
TTL). N must be the same for everyone:
each participant's key holds its N, and one whose N differs from that of the first
participant waiting exits 125 at once (`in use with different settings`) and does not
count (if that first one leaves before the barrier opens, the next one's N decides, and
those who disagree with it exit 125 then). If N are already inside a round, baton exits 125. If its session is lost while it
waits (its lease revoked or expired), or only its key is deleted, it exits 125 too, saying
which.";

/// `baton barrier`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// The barrier's name. Participants' keys are NAME/waiters/ followed by their lease id,
    /// valued with their N.
    #[arg(value_parser = cli::name)]
    pub(crate) name: String,

    /// How many participants the barrier waits for (at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) count: u32,

    /// Give up after DUR in all (entering and leaving) and exit 124 (default: wait for ever).
    /// Counted once connected: connecting is bounded by --dial-timeout (exit 125 if the
    /// backend does not answer).
    #[arg(long, value_name = "DUR", value_parser = cli::positive_duration)]
    pub(crate) timeout: Option<Duration>,

    /// The session's lease TTL: if baton dies, it stops counting after this long. At least 2s.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = cli::duration)]
    pub(crate) ttl: Duration,
}

/// Run `baton barrier`.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    cli::session_ttl(args.ttl)?;
    let out = Output::new(global.json);
    let mut signals = Signals::new()?;
    let client = signals
        .interruptible(cli::connect(global, &global.endpoints))
        .await?;
    let session = signals
        .interruptible(cli::session(&client, args.ttl))
        .await?;
    // Counted once connected, as its help says (it counted the connect too: found by review).
    let deadline = args.timeout.map(crate::supervisor::deadline_after);
    // As lock, sem and elect close: after a timeout, removing our key gets 1 s, then a line
    // says it expires with the lease (the backend may be gone: --timeout must hold).
    let round = match signals.interruptible(pass(&session, &args, deadline)).await {
        Ok(round) => {
            cli::close_after_wait(Ok(0), global, args.ttl, session.close()).await?;
            round
        }
        Err(e) => return cli::close_after_wait(Err(e), global, args.ttl, session.close()).await,
    };
    out.emit(
        &format!(
            "passed {} (round {round})",
            output::escape_controls(&args.name)
        ),
        &json!({"event": "passed", "name": args.name, "count": args.count, "round": round}),
    )
    .map_err(|e| output::not_written(Some("passed"), &e))?;
    Ok(0)
}

/// Enter, wait for everyone, leave, wait for everyone: the round passed.
async fn pass(
    session: &baton::Session,
    args: &Args,
    deadline: Option<Instant>,
) -> Result<baton::Revision, CliError> {
    let barrier = baton::DoubleBarrier::new(session, &args.name, args.count)?;
    let guard = within(args, deadline, "enter", barrier.enter()).await?;
    let round = guard.round();
    tracing::info!(round, "entered");
    // The library's own timeout, not one around `leave()`: a round seen complete is no
    // timeout, though closing its `ready` key is slow (found by review: exit 124 for a
    // barrier that had completed).
    let left = match deadline {
        Some(deadline) => {
            let left = guard
                .leave_timeout(deadline.saturating_duration_since(Instant::now()))
                .await;
            match left {
                Err(baton::Error::Timeout {
                    operation: "leave", ..
                }) => return Err(timed_out(args, "leave")),
                left => left,
            }
        }
        None => guard.leave().await,
    };
    within(args, None, "leave", async { left }).await?;
    Ok(round)
}

/// Exit 124: `--timeout` passed at `stage`.
fn timed_out(args: &Args, stage: &str) -> CliError {
    let waiting = if stage == "enter" {
        "for the others to enter"
    } else {
        "for the others to leave"
    };
    CliError::new(
        exit::NOT_ACQUIRED,
        format!(
            "barrier {:?}: timed out after {} waiting {waiting}",
            args.name,
            output::duration(args.timeout.unwrap_or_default())
        ),
    )
}

/// Run `work` until the deadline, if any: 124 when it passes.
async fn within<T>(
    args: &Args,
    deadline: Option<Instant>,
    stage: &str,
    work: impl std::future::Future<Output = baton::Result<T>>,
) -> Result<T, CliError> {
    let result = match (deadline, args.timeout) {
        (Some(deadline), Some(_)) => match tokio::time::timeout_at(deadline, work).await {
            Ok(r) => r,
            Err(_) => return Err(timed_out(args, stage)),
        },
        _ => work.await,
    };
    result.map_err(|e| match e {
        baton::Error::BarrierFull { .. } => CliError::failed(format!(
            "barrier {:?} is full: {} participants are already inside a round",
            args.name, args.count
        )),
        e if e.is_lost() => exit::lost_while_waiting(&format!("at barrier {:?}", args.name), &e),
        e => CliError::from(e),
    })
}

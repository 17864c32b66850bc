//! `baton sem NAME --permits N [-- CMD…]`: run CMD while holding a permit of a semaphore.

use std::ffi::OsString;
use std::time::Duration;

use serde_json::json;

use crate::cli::{self, Global};
use crate::exit::{self, CliError};
use crate::output::{self, Output};
use crate::supervisor::{self, Job, Released, Signals};

const EXAMPLES: &str = "\
Examples:
  # at most 4 encoders at a time, across every machine
  baton sem encoders --permits 4 -- ./encode.sh in.mov

  # skip this run if no permit is free for us now (exit 124)
  baton sem --try uploads --permits 2 -- ./upload.sh

  # give up after a minute of waiting (exit 124)
  baton sem --timeout 1m builds --permits 3 -- make -j8

  # hold a permit from a shell until Ctrl-C
  baton sem maintenance --permits 2

Each baton sem holds one permit. Without CMD, baton prints `acquired KEY permits=N` (N is
the semaphore's size, --permits, not what this holder took) and, when a signal makes it
release, `released KEY` (JSON events with --json, and a `lost` event if the permit is lost).
With CMD, stdout is CMD's alone, also with --json.

Every process using the semaphore must give the same --permits while any of them holds or
waits (a different count exits 125). Permits are granted in FIFO order.

CMD gets BATON_SEM_KEY (this holder's key) and BATON_SEM_PERMITS (the size) in its
environment, and
none of the variables baton lock and elect set (an outer baton's are removed: a semaphore
has no fencing token, so no BATON_FENCING_TOKEN). If the
permit is lost while CMD runs (the session's lease expired or the key was deleted), CMD's
process group gets SIGTERM at once and SIGKILL after --grace (another holder may take the
permit in between); baton prints `permit lost` on
stderr and exits 122 (also when the loss is found only as CMD ends, or by the release).
Otherwise baton exits with CMD's exit code. Signals, CMD's background jobs and a baton that
dies (CMD is SIGKILLed before the permit can pass to another) are handled as by
`baton lock`.";

/// `baton sem`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// The semaphore's name. Each holder's key is NAME/ followed by its lease id in hex.
    #[arg(value_parser = cli::name)]
    pub(crate) name: String,

    /// How many permits the semaphore has: at most N holders at once (at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) permits: u32,

    /// The session's lease TTL: if baton dies, its permit is free again after this long.
    /// At least 2s.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = cli::duration)]
    pub(crate) ttl: Duration,

    /// Give up waiting for a permit after DUR and exit 124 (default: wait for ever). Counted
    /// once connected: connecting is bounded by --dial-timeout (exit 125 if the backend does
    /// not answer).
    #[arg(long, value_name = "DUR", value_parser = cli::positive_duration, conflicts_with = "try_acquire")]
    pub(crate) timeout: Option<Duration>,

    /// Do not wait: exit 124 at once if the permits are not free for us now: none is
    /// free, or others wait ahead of us (permits go in FIFO order: a request for more
    /// permits than are free is not overtaken).
    #[arg(long = "try", id = "try_acquire")]
    pub(crate) try_acquire: bool,

    /// After the permit is lost, how long CMD has between SIGTERM and SIGKILL; another holder
    /// may run meanwhile. If baton dies, CMD's group gets SIGKILL sooner if need be: before
    /// the permit can pass to another holder.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = cli::duration)]
    pub(crate) grace: Duration,

    /// The command to run while holding a permit, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub(crate) command: Vec<OsString>,
}

/// Run `baton sem`.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    cli::require_command_after_dash_dash(&args.command)?;
    cli::session_ttl(args.ttl)?;
    let out = Output::new(global.json);
    let mut signals = Signals::forwarding()?;
    let client = signals
        .interruptible(cli::connect(global, &global.endpoints))
        .await?;
    let session = signals
        .interruptible(cli::session(&client, args.ttl))
        .await?;
    let result = held(&out, &session, &args, &mut signals).await;
    cli::close_after_wait(result, global, args.ttl, session.close()).await
}

/// Acquire, hold, release. The caller closes the session whatever happens.
async fn held(
    out: &Output,
    session: &baton::Session,
    args: &Args,
    signals: &mut Signals,
) -> Result<u8, CliError> {
    let sem = baton::Semaphore::new(session, &args.name, args.permits)?;
    let permit = signals.interruptible(acquire(&sem, args)).await?;
    let key = permit.key().to_string();
    tracing::info!(key = %key, "permit acquired");

    let job = if args.command.is_empty() {
        let _ = out.emit(
            &format!(
                "acquired {} permits={}",
                output::escape_controls(&key),
                args.permits
            ),
            &json!({
                "event": "acquired",
                "name": args.name,
                "key": key,
                "permits": args.permits,
                "lease": output::lease_hex(session.lease_id()),
                "ttl_secs": session.ttl().as_secs() + u64::from(session.ttl().subsec_nanos() > 0),
            }),
        );
        None
    } else {
        Some(Job {
            argv: args.command.clone(),
            env: vec![
                ("BATON_SEM_KEY", key.clone()),
                ("BATON_SEM_PERMITS", args.permits.to_string()),
            ],
            grace: args.grace,
            ttl: args.ttl,
        })
    };

    let on_lost = |reason: Option<String>, stopped: bool| {
        let reason = reason.unwrap_or_else(|| "the permit's key is gone".to_string());
        let when = if stopped { " while stopped" } else { "" };
        output::notice(&format!("permit lost{when}: {reason}"));
        // With CMD, stdout is CMD's alone: the line above and the exit code tell the loss.
        if out.is_json() && args.command.is_empty() {
            let _ = out.json_line(&json!({
                "event": "lost", "name": args.name, "key": key, "reason": reason,
            }));
        }
    };
    let ending = supervisor::hold_and_release(permit, job, signals, "the permit", on_lost).await?;
    match ending {
        Released::Exited { code, .. } => Ok(code),
        Released::Stopped { released } => {
            if released {
                let _ = out.emit(
                    &format!("released {}", output::escape_controls(&key)),
                    &json!({"event": "released", "name": args.name, "key": key}),
                );
            }
            Ok(0)
        }
    }
}

/// Wait for a permit as the options say: 124 if `--try` finds none free or `--timeout`
/// passes.
async fn acquire(sem: &baton::Semaphore, args: &Args) -> Result<baton::SemaphorePermit, CliError> {
    let name = &args.name;
    let result = if args.try_acquire {
        sem.try_acquire().await
    } else if let Some(timeout) = args.timeout {
        match tokio::time::timeout(timeout, sem.acquire()).await {
            Ok(r) => r,
            Err(_) => {
                return Err(CliError::new(
                    exit::NOT_ACQUIRED,
                    format!(
                        "no permit of semaphore {name:?} within {}",
                        output::duration(timeout)
                    ),
                ))
            }
        }
    } else {
        sem.acquire().await
    };
    result.map_err(|e| match e {
        baton::Error::NoPermits { .. } => CliError::new(
            exit::NOT_ACQUIRED,
            format!("semaphore {name:?} has no free permit"),
        ),
        e if e.is_lost() => {
            exit::lost_while_waiting(&format!("for a permit of semaphore {name:?}"), &e)
        }
        e => CliError::failed(e),
    })
}

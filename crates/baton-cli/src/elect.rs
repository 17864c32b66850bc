//! `baton elect NAME VALUE [-- CMD…]`: campaign, then run CMD while leader.

use std::ffi::OsString;
use std::time::Duration;

use serde_json::json;

use crate::cli::{self, Global};
use crate::exit::{self, CliError};
use crate::output::{self, Output};
use crate::supervisor::{self, Job, Released, Signals};

const EXAMPLES: &str = "\
Examples:
  # run the scheduler on exactly one machine; another takes over when it stops
  baton elect scheduler \"$(hostname):8080\" -- ./scheduler

  # lead until Ctrl-C, publishing a value that `baton leader scheduler` prints
  baton elect scheduler 10.0.0.7:8080

  # give up after a minute as a standby (exit 124)
  baton elect --timeout 1m scheduler 10.0.0.8:8080 -- ./scheduler

Without CMD, baton prints one line when elected (`elected KEY token=T`) and one when it
resigns on SIGINT, SIGTERM, SIGHUP or SIGQUIT (`resigned KEY`); with --json these are JSON
events, and a lost leadership adds a `lost` event. With CMD, stdout is CMD's alone, also
with --json: baton prints nothing there (as `baton lock`), so `baton elect NAME VALUE --
./report > out.csv` writes the report only. CMD gets BATON_ELECTION_KEY and BATON_FENCING_TOKEN (on
etcd the leader key's create revision; on redis:// the lock's counter; none on redlock://)
in its environment, and none of the other variables baton lock and sem set (an outer
baton's are removed). If the leadership is lost while CMD
runs, CMD's process group gets SIGTERM at once and SIGKILL after --grace (a new leader may
start in between); baton prints `leadership lost` on stderr and exits 122 (also when the loss is found only as CMD ends, or
by the resignation). Otherwise it resigns when CMD exits and exits with CMD's exit code.
Signals, CMD's background jobs and a baton that dies (CMD is SIGKILLed before another
candidate can lead) are handled as by `baton lock`. On etcd the keys are those of etcdctl elect; on Redis the election is
the lock NAME, whose holder leads (candidates are not queued in order).";

/// `baton elect`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// The election's name. On etcd the candidate key is NAME/ followed by the lease id in
    /// hex; on Redis the leader holds the key NAME.
    #[arg(value_parser = cli::name)]
    pub(crate) name: String,

    /// The value to proclaim while leader (an address, say); `baton leader` prints it. It
    /// may start with `-` (`-5`), not with `--` (taken for a misspelt option and refused:
    /// here `--` starts CMD, so such a value cannot be given); give options before it, or
    /// after it but before `--`.
    #[arg(allow_hyphen_values = true)]
    pub(crate) value: String,

    /// The session's lease TTL (on Redis: the key's expiry, renewed every TTL/3): if baton
    /// dies, the next candidate leads after this long. At least 2s on etcd, 10ms on Redis
    /// (where a TTL under a second leaves little room: leadership is lost at the first late
    /// renewal).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = cli::duration)]
    pub(crate) ttl: Duration,

    /// Give up campaigning after DUR and exit 124 (default: wait for ever). Counted once
    /// connected: connecting is bounded by --dial-timeout (exit 125 if the backend does not
    /// answer).
    #[arg(long, value_name = "DUR", value_parser = cli::positive_duration)]
    pub(crate) timeout: Option<Duration>,

    /// After the leadership is lost, how long CMD has between SIGTERM and SIGKILL; a new
    /// leader may run meanwhile. If baton dies, CMD's group gets SIGKILL sooner if need be:
    /// before another candidate can lead.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = cli::duration)]
    pub(crate) grace: Duration,

    /// The command to run while leader, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub(crate) command: Vec<OsString>,
}

/// Run `baton elect`.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    cli::require_command_after_dash_dash(&args.command)?;
    let out = Output::new(global.json);
    let mut signals = Signals::forwarding()?;
    let coordinator = signals
        .interruptible(cli::coordinator(global, args.ttl))
        .await?;
    let result = elected(&out, &coordinator, &args, &mut signals).await;
    cli::close_after_wait(result, global, args.ttl, coordinator.close()).await
}

async fn elected(
    out: &Output,
    coordinator: &baton::Coordinator,
    args: &Args,
    signals: &mut Signals,
) -> Result<u8, CliError> {
    let election = coordinator.election(&args.name)?;
    let leadership = signals
        .interruptible(campaign(election.as_ref(), args))
        .await?;
    let key = leadership.key().to_string();
    let token = leadership.fencing_token();
    tracing::info!(key = %key, token, "elected");

    // As `baton lock`: with CMD, stdout is CMD's alone; without, baton says it leads.
    let job = if args.command.is_empty() {
        output::emit_held(
            out,
            "elected",
            &args.name,
            &key,
            token,
            coordinator,
            args.ttl,
        );
        None
    } else {
        let mut env = vec![("BATON_ELECTION_KEY", key.clone())];
        if let Some(token) = token {
            env.push(("BATON_FENCING_TOKEN", token.to_string()));
        }
        Some(Job {
            argv: args.command.clone(),
            env,
            grace: args.grace,
            ttl: args.ttl,
        })
    };
    let report = |reason: Option<String>, stopped: bool| {
        let reason = reason.unwrap_or_else(|| "the leader key is gone".to_string());
        let when = if stopped { " while stopped" } else { "" };
        output::notice(&format!("leadership lost{when}: {reason}"));
        // With CMD, stdout is CMD's alone: the line above and the exit code tell the loss.
        if out.is_json() && args.command.is_empty() {
            let _ = out.json_line(&json!({
                "event": "lost", "name": args.name, "key": key, "reason": reason,
            }));
        }
    };
    let ending =
        supervisor::hold_and_release(leadership, job, signals, "the leadership", report).await?;
    match ending {
        Released::Exited { code, released } => {
            if released {
                tracing::info!(key = %key, "resigned");
            }
            Ok(code)
        }
        Released::Stopped { released } => {
            if released {
                tracing::info!(key = %key, "resigned");
                let _ = out.emit(
                    &format!("resigned {}", output::escape_controls(&key)),
                    &json!({"event": "resigned", "name": args.name, "key": key}),
                );
            }
            Ok(0)
        }
    }
}

/// Campaign as the options say: 124 if `--timeout` passes.
async fn campaign(
    election: &dyn baton::coordinator::Elector,
    args: &Args,
) -> Result<Box<dyn baton::coordinator::Leading>, CliError> {
    let value = args.value.as_bytes().to_vec();
    let result = match args.timeout {
        Some(timeout) => match tokio::time::timeout(timeout, election.campaign(value)).await {
            Ok(r) => r,
            Err(_) => {
                return Err(CliError::new(
                    exit::NOT_ACQUIRED,
                    format!(
                        "not elected leader of {:?} within {}",
                        args.name,
                        output::duration(timeout)
                    ),
                ))
            }
        },
        None => election.campaign(value).await,
    };
    result.map_err(|e| {
        if e.is_lost() {
            exit::lost_while_waiting(&format!("to lead {:?}", args.name), &e)
        } else {
            CliError::failed(e)
        }
    })
}

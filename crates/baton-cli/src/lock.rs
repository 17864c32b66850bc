//! `baton lock NAME [-- CMD…]`: run CMD while holding a lock.

use std::ffi::OsString;
use std::time::Duration;

use serde_json::json;

use crate::cli::{self, Global};
use crate::exit::{self, CliError};
use crate::output::{self, Output};
use crate::supervisor::{self, Job, Released, Signals};

const EXAMPLES: &str = "\
Examples:
  # run a nightly job on at most one machine at a time
  baton lock reports/nightly -- ./make-report.sh --full

  # skip this run if another machine is at it (exit 124)
  baton lock --try backup -- ./backup.sh

  # give up after 30 s of waiting (exit 124)
  baton lock --timeout 30s deploy -- ./deploy.sh

  # hold the lock from a shell until Ctrl-C
  baton lock maintenance

Without CMD, baton prints `acquired KEY token=T` once it holds the lock and `released KEY`
when a signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT) makes it release; with --json these are
JSON events, and a lost lock adds a `lost` event. With CMD, stdout is CMD's alone, also with
--json: baton prints nothing there.

CMD gets BATON_LOCK_KEY (relative to --namespace: NAME/<lease id> on etcd, NAME on Redis)
and BATON_FENCING_TOKEN in its environment (on etcd also
ETCD_LOCK_KEY and ETCD_LOCK_REV, as etcdctl lock sets them: ETCD_LOCK_REV is the revision
at which the lock was granted, which rises from holder to holder also when etcdctl lock and
baton lock take turns, where BATON_FENCING_TOKEN is the key's create revision, which rises
among baton holders; on redlock:// there is no
fencing token, so no BATON_FENCING_TOKEN). The variables baton lock, elect and sem set
that are not this lock's (left by an outer baton) are removed. If the lock is lost while CMD
runs, CMD's process group gets SIGTERM at once and SIGKILL after --grace (default 10s: the
next holder may start in between, so keep --grace short, or have what CMD writes to check
the fencing token); baton prints `lock lost` on stderr and exits 122 (also when the loss is
found only as CMD ends, or by the release). If baton itself dies (kill -9), a small
guardian process it started sends CMD's group SIGTERM, and SIGKILL after --grace but no
later than the lock's local deadline (at most --ttl after the last acknowledged
keep-alive), so that CMD never runs once the lock can pass to another holder. The guardian
also SIGKILLs CMD's group by that deadline if baton is stopped (SIGSTOP of baton alone,
a debugger) and sends no keep-alive; a pause of the whole machine or of both processes
(a frozen VM or cgroup) is not covered: use the fencing token.

Otherwise baton exits with CMD's exit code. SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to
baton are passed to CMD's process group (and to the groups of its descendants that left
it, while their parent lives), then SIGCONT if CMD was stopped (it read the terminal); one ignored when baton started (nohup ignores SIGHUP, a shell's background job
SIGINT and SIGQUIT) stays ignored, by CMD too. SIGUSR1 and SIGUSR2 are passed on too, and
never end baton (while it waits for the lock, they are ignored). When CMD exits, whatever it left
running in its group gets SIGTERM (SIGKILL after --grace), and the lock is released only
once the group is gone. Ctrl-Z (SIGTSTP, also SIGTTIN and SIGTTOU) stops CMD's process
group, then baton; on SIGCONT (fg, bg) baton checks the lock before CMD goes on, and if it
was lost while stopped, ends CMD as above (`lock lost while stopped`, exit 122). Under
setsid, systemd or cron (an orphaned process group), a stop signal is ignored, as the
kernel would ignore it.

CMD runs in its own process group, in the background of the terminal, so it cannot read
from the terminal (an interactive shell under `baton lock NAME -- bash` stops). To work by
hand under a lock, run `baton lock NAME` without CMD in another terminal.";

/// `baton lock`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// The lock's name. On etcd its key is NAME/ followed by the lease id in hex, as etcdctl
    /// lock makes it; on Redis the key is NAME, as redsync and redis-py make it.
    #[arg(value_parser = cli::name)]
    pub(crate) name: String,

    /// The session's lease TTL (on Redis: the key's expiry, renewed every TTL/3): if baton
    /// dies, the lock is free again after this long. At least 2s on etcd, 10ms on Redis (where
    /// a TTL under a second leaves little room: the hold is lost at the first late renewal).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = cli::duration)]
    pub(crate) ttl: Duration,

    /// Give up waiting for the lock after DUR and exit 124 (default: wait for ever). Counted
    /// once connected: connecting is bounded by --dial-timeout (exit 125 if the backend does
    /// not answer).
    #[arg(long, value_name = "DUR", value_parser = cli::positive_duration, conflicts_with = "try_lock")]
    pub(crate) timeout: Option<Duration>,

    /// Do not wait: exit 124 at once if the lock is held.
    #[arg(long = "try", id = "try_lock")]
    pub(crate) try_lock: bool,

    /// After the lock is lost, how long CMD has between SIGTERM and SIGKILL; another holder
    /// may run meanwhile. If baton dies, CMD's group gets SIGKILL sooner if need be: before
    /// the lock can pass to another holder.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = cli::duration)]
    pub(crate) grace: Duration,

    /// On redis://, wait without queueing: take the lock when it is free, as redsync and
    /// redis-py clients do. Use it on names shared with them: queued waiters get each
    /// release handed to them, so a client that does not queue can wait for ever while
    /// they contend. No effect on etcd and Redlock.
    #[arg(long)]
    pub(crate) no_fifo: bool,

    /// The command to run while holding the lock, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub(crate) command: Vec<OsString>,
}

/// Run `baton lock`.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    cli::require_command_after_dash_dash(&args.command)?;
    let out = Output::new(global.json);
    let mut signals = Signals::forwarding()?;
    let coordinator = signals
        .interruptible(cli::coordinator_fifo(global, args.ttl, !args.no_fifo))
        .await?;
    let result = locked(&out, &coordinator, &args, &mut signals).await;
    cli::close_after_wait(result, global, args.ttl, coordinator.close()).await
}

/// Acquire, hold, release. The caller closes the coordinator whatever happens, which
/// removes a waiter key left by an interrupted or timed-out wait (on etcd).
async fn locked(
    out: &Output,
    coordinator: &baton::Coordinator,
    args: &Args,
    signals: &mut Signals,
) -> Result<u8, CliError> {
    let lock = coordinator.lock(&args.name)?;
    let guard = signals.interruptible(acquire(lock.as_ref(), args)).await?;
    let key = guard.key().to_string();
    let token = guard.fencing_token();
    let granted = guard.granted_revision();
    tracing::info!(key = %key, token, "lock acquired");

    let job = if args.command.is_empty() {
        output::emit_held(
            out,
            "acquired",
            &args.name,
            &key,
            token,
            coordinator,
            args.ttl,
        );
        None
    } else {
        let mut env = vec![("BATON_LOCK_KEY", key.clone())];
        if let Some(token) = token {
            env.push(("BATON_FENCING_TOKEN", token.to_string()));
        }
        // ETCD_LOCK_REV as etcdctl lock sets it: the revision at which the lock was
        // granted (Go's `Mutex.Header().Revision`), not the key's create revision, which
        // a holder that queued behind an etcdctl one may have smaller than its.
        if let (true, Some(granted)) = (coordinator.backend() == "etcd", granted) {
            env.push(("ETCD_LOCK_KEY", key.clone()));
            env.push(("ETCD_LOCK_REV", granted.to_string()));
        }
        Some(Job {
            argv: args.command.clone(),
            env,
            grace: args.grace,
            ttl: args.ttl,
        })
    };

    let on_lost = |reason: Option<String>, stopped: bool| {
        let reason = reason.unwrap_or_else(|| "the lock key is gone".to_string());
        let when = if stopped { " while stopped" } else { "" };
        output::notice(&format!("lock lost{when}: {reason}"));
        // With CMD, stdout is CMD's alone: the line above and the exit code tell the loss.
        if out.is_json() && args.command.is_empty() {
            let _ = out.json_line(&json!({
                "event": "lost", "name": args.name, "key": key, "reason": reason,
            }));
        }
    };
    let ending = supervisor::hold_and_release(guard, job, signals, "the lock", on_lost).await?;
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

/// Wait for the lock as the options say: 124 if `--try` finds it held or `--timeout`
/// passes.
async fn acquire(
    lock: &dyn baton::coordinator::Lock,
    args: &Args,
) -> Result<Box<dyn baton::coordinator::Guard>, CliError> {
    let name = &args.name;
    let result = if args.try_lock {
        lock.try_lock().await
    } else if let Some(timeout) = args.timeout {
        // The lock's own timeout. On Redis a queued (FIFO) waiter that times out leaves the
        // queue, but waits at most 500 ms for the server to confirm it: then it returns and
        // the leave goes on in the background, tracked by the client, so that the close
        // after this waits for it (within CLEANUP_TIMEOUT, the user having asked for an
        // answer by a deadline). If the server never confirms, the place expires with the
        // waiter window.
        match lock.lock_timeout(timeout).await {
            Err(baton::Error::Timeout { .. }) => {
                return Err(CliError::new(
                    exit::NOT_ACQUIRED,
                    format!(
                        "lock {name:?} not acquired within {}",
                        output::duration(timeout)
                    ),
                ))
            }
            r => r,
        }
    } else {
        lock.lock().await
    };
    result.map_err(|e| match e {
        baton::Error::Locked { .. } => CliError::new(
            exit::NOT_ACQUIRED,
            format!("lock {name:?} is held by another owner"),
        ),
        e if e.is_lost() => exit::lost_while_waiting(&format!("for lock {name:?}"), &e),
        e => CliError::failed(e),
    })
}

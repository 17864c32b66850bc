//! `baton queue push|pop|len NAME`: a distributed FIFO work queue.

use std::io::Write;
use std::time::Duration;

use serde_json::json;

use crate::cli::{self, Global};
use crate::exit::{self, CliError};
use crate::output::{self, Output};
use crate::supervisor::Signals;

const EXAMPLES: &str = "\
Examples:
  baton queue push jobs/thumbnails img-1.png
  baton queue push jobs/render --value-file scene.json    # up to 1 MiB, any bytes; - : stdin
  baton queue pop jobs/thumbnails                 # waits for an item, prints it
  baton queue pop --timeout 30s jobs/thumbnails   # exit 124 if nothing comes in 30 s
  baton queue len jobs/thumbnails

  # a worker loop ($(...) drops an item's trailing newlines: use --json to keep them)
  while item=$(baton queue pop --timeout 5m jobs/thumbnails); do ./thumb.sh \"$item\"; done

Each item is popped by exactly one consumer, in the order the items were pushed. Items are
kept (without a lease) until popped. If a popped item cannot be written to stdout (a full
disk, a closed pipe), baton prints it on stderr instead, since it has left the queue, and
exits 125. A signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT) stops a waiting pop with exit 128+N;
one that comes while an item is being claimed lets the claim finish: if it won, the item
is printed and baton exits 0, as for any pop (etcd applies a claim sent, so stopping
then would lose the item). baton waits for the claim's answer up to the request timeout
(10 s). If the claim fails in flight (no answer: etcd may have applied it), baton sends it
again (once at least, even after --timeout or a signal: its answer tells whether the first
send took the item, which is then printed), for about 10 s in all (20 s if the first send
itself timed out), until it is answered or --timeout passes or a signal comes; then it
exits 125 saying the item may have been taken. A second signal, 0.5 s or more after
the first, ends baton at once with 128+N, even during a claim, saying on stderr that the
item may have been taken (one sooner is the same request delivered twice, as timeout(1)
and `kill PID; kill -- -PGID` deliver it, and is ignored).
A signal during a push exits 128+N too, and the item may have been queued all the same (a
write sent is applied): a script that pushes again after 128+N may queue it twice.
The keys are NAME/<nanoseconds>, as Go's recipe.NewQueue makes them, so Go programs share
the queue. pop and len take every key NAME/<16 or more decimal digits> without a lease as an
item, whoever wrote it (an application's users/<Snowflake ID> too): keep other data out
from under a queue's name.";

/// `baton queue`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    #[command(subcommand)]
    pub(crate) command: QueueCommand,
}

/// What to do with the queue.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum QueueCommand {
    /// Add VALUE (or the contents of --value-file) at the tail of the queue.
    Push {
        /// The queue's name.
        #[arg(value_parser = cli::name)]
        name: String,
        /// The item (at most 1 MiB; or give it with --value-file). It may start with `-`
        /// (`-1`); one that starts with `--` is taken for a misspelt option and refused,
        /// unless given after `--` (`baton queue push NAME -- --x`).
        #[arg(
            value_parser = value,
            allow_hyphen_values = true,
            required_unless_present = "value_file",
            conflicts_with = "value_file"
        )]
        value: Option<String>,
        /// Read the item from FILE (`-`: standard input), byte for byte, instead of VALUE:
        /// for an item too long for the command line (Linux takes at most 128 KiB in one
        /// argument), or one that is not text. At most 1 MiB: a longer one is refused,
        /// nothing pushed.
        #[arg(long, value_name = "FILE")]
        value_file: Option<std::path::PathBuf>,
    },
    /// Take the item at the head, waiting for one if the queue is empty, and print it
    /// (just the value; with --json as {"value": …}, or {"value_base64": …} in standard
    /// base64 if the item is not UTF-8).
    Pop {
        /// The queue's name.
        #[arg(value_parser = cli::name)]
        name: String,
        /// Give up after DUR with nothing popped and exit 124 (default: wait for ever;
        /// the message adds "(the backend did not answer)" if it did not in the last second).
        /// DUR bounds the wait, not the claim of an item found in time: its answer is
        /// waited for (up to the request timeout, 10 s), and the item printed (exit 0),
        /// even if it comes after DUR. A claim that failed in flight is sent again once
        /// after DUR (it tells whether the first send took the item: then it is printed),
        /// then no more: baton exits 125, saying the item may have been taken.
        #[arg(long, value_name = "DUR", value_parser = cli::positive_duration)]
        timeout: Option<Duration>,
    },
    /// Print the number of items in the queue.
    Len {
        /// The queue's name.
        #[arg(value_parser = cli::name)]
        name: String,
    },
}

/// A value for a key or a queue: at most [`baton::MAX_VALUE_LEN`] bytes. Checked before
/// connecting.
pub(crate) fn value(s: &str) -> Result<String, String> {
    if s.len() > baton::MAX_VALUE_LEN {
        return Err(format!(
            "the value is {} bytes long; the limit is {}",
            s.len(),
            baton::MAX_VALUE_LEN
        ));
    }
    Ok(s.to_string())
}

/// A signal this soon after the first is the same request delivered twice (timeout(1)
/// signals the child, then its process group), not a second one that ends a claim.
const SIGNAL_REPEATED_WITHIN: Duration = Duration::from_millis(500);

/// The least time the backend gets to answer [`answers_by`]'s read before it may be said
/// not to answer: a wait shorter than that (`--timeout 5ms`) says nothing of the backend.
const PROBE_AT_LEAST: std::time::Duration = std::time::Duration::from_millis(250);

/// True if the backend answers a read of the queue (its first key, keys only) sent at
/// most [`cli::CLEANUP_TIMEOUT`] before `deadline`, by `deadline`; also true if less than
/// [`PROBE_AT_LEAST`] is left (too short to tell).
async fn answers_by(
    store: std::sync::Arc<dyn baton::store::Store>,
    name: String,
    deadline: tokio::time::Instant,
) -> bool {
    let window = deadline.saturating_duration_since(tokio::time::Instant::now());
    if window < PROBE_AT_LEAST {
        return true;
    }
    let window = window.min(cli::CLEANUP_TIMEOUT);
    tokio::time::sleep_until(deadline - window).await;
    let read = baton::store::Range::prefix(format!("{name}/"))
        .keys_only()
        .with_limit(1);
    matches!(
        tokio::time::timeout_at(deadline, store.range(read)).await,
        Ok(Ok(_))
    )
}

/// The value to write: VALUE, or the contents of `file` (`-`: standard input), at most
/// [`baton::MAX_VALUE_LEN`] bytes (read no further: a longer input is refused). Read
/// before connecting, so that a bad file never waits for the network.
pub(crate) fn value_bytes(
    value: Option<String>,
    file: Option<&std::path::Path>,
) -> Result<Vec<u8>, CliError> {
    use std::io::Read;
    let Some(path) = file else {
        // clap asks for one of the two.
        return Ok(value.unwrap_or_default().into_bytes());
    };
    let limit = baton::MAX_VALUE_LEN;
    let mut bytes = Vec::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .take(limit as u64 + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit as u64 + 1).read_to_end(&mut bytes))
    };
    let what = if path.as_os_str() == "-" {
        "standard input".to_string()
    } else {
        path.display().to_string()
    };
    read.map_err(|e| CliError::failed(format!("cannot read the value from {what}: {e}")))?;
    if bytes.len() > limit {
        return Err(CliError::failed(format!(
            "the value in {what} is more than {limit} bytes long; the limit is {limit} \
             (nothing written)"
        )));
    }
    Ok(bytes)
}

/// Write `bytes` to stdout and flush.
pub(crate) fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()
}

/// Run `baton queue`.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    let out = Output::new(global.json);
    let mut command = args.command;
    // An item is read (and checked) before connecting, and before the signal handlers are
    // set: a read of stdin that waits must stay interruptible by SIGINT and SIGTERM.
    let item = match &mut command {
        QueueCommand::Push {
            value, value_file, ..
        } => value_bytes(value.take(), value_file.as_deref())?,
        _ => Vec::new(),
    };
    let mut signals = Signals::new()?;
    let client = signals
        .interruptible(cli::connect(global, &global.endpoints))
        .await?;
    match command {
        QueueCommand::Push { name, .. } => {
            let value = item;
            let queue = baton::Queue::new(&client, &name)?;
            signals
                .interruptible(async { queue.enqueue(value).await.map_err(CliError::from) })
                .await?;
            if out.is_json() {
                out.json_line(&json!({"event": "pushed", "name": name}))
                    .map_err(|e| output::not_written(Some("pushed"), &e))?;
            }
            Ok(0)
        }
        QueueCommand::Pop { name, timeout } => {
            let queue = baton::Queue::new(&client, &name)?;
            // A timeout or a signal stops the pop while it reads or waits. A claim sent is
            // applied by etcd whatever we do, so its answer is awaited and its item printed
            // as by any pop; if it fails in flight, the pop sends it again until the timeout
            // or a signal, then fails saying the item may have been taken. A second signal
            // (which only a claim in flight leaves time for) ends baton at once.
            let (first_signal, signalled) = tokio::sync::oneshot::channel::<()>();
            let mut first_signal = Some(first_signal);
            let mut interrupted_by = None;
            let mut first_signal_at = None;
            let deadline = timeout.map(crate::supervisor::deadline_after);
            // The library retries a failing read or watch by itself: whether the backend
            // answers is asked once more in the wait's last second, so that a timeout can
            // tell "nothing came" from "the backend did not answer".
            let probe = deadline.map(|deadline| {
                tokio::spawn(answers_by(client.store().clone(), name.clone(), deadline))
            });
            let stop = async {
                let timeout = async {
                    match deadline {
                        Some(deadline) => tokio::time::sleep_until(deadline).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = timeout => {}
                    _ = signalled => {}
                }
            };
            // A clone pops, so that `queue` is free to be closed while the pop's future
            // (pinned below) lives on.
            let popper = queue.clone();
            // The lease of the claims' markers (one per handle) is revoked, not left on
            // etcd for a minute after baton exits; not waited for long (a pop that got its
            // item has done its work, and the lease expires anyway). After the item is
            // printed: it has left the queue, and is not held back for a cleanup. Also when
            // the pop failed (a claim that could not be told), not after a second signal.
            let close = || async {
                let _ = tokio::time::timeout(cli::CLEANUP_TIMEOUT, queue.close()).await;
            };
            let pop = popper.dequeue_until(stop);
            let mut pop = std::pin::pin!(pop);
            let popped = loop {
                tokio::select! {
                    biased;
                    popped = &mut pop => match popped {
                        Ok(popped) => break popped,
                        Err(e) => {
                            close().await;
                            return Err(e.into());
                        }
                    },
                    sig = signals.recv() => {
                        if let Some(first) = first_signal.take() {
                            tracing::debug!(signal = sig, "interrupted");
                            interrupted_by = Some(sig);
                            first_signal_at = Some(tokio::time::Instant::now());
                            let _ = first.send(());
                        } else if first_signal_at
                            .is_some_and(|at| at.elapsed() < SIGNAL_REPEATED_WITHIN)
                        {
                            // timeout(1) sends one request to the child and to its group:
                            // the same stop, not a second one.
                            tracing::debug!(signal = sig, "the first signal again; ignored");
                        } else {
                            // After a signal, only a claim in flight holds the pop up.
                            exit::print_error(&format!(
                                "queue {name:?}: a second signal during the claim of an item; \
                                 it may have been taken without being printed"
                            ));
                            return Err(CliError::interrupted(sig));
                        }
                    }
                }
            };
            let answered = match probe {
                Some(probe) if probe.is_finished() => probe.await.unwrap_or(false),
                Some(probe) => {
                    probe.abort();
                    false
                }
                None => true,
            };
            let Some(item) = popped else {
                close().await;
                return Err(match interrupted_by {
                    Some(sig) => CliError::interrupted(sig),
                    None => CliError::new(
                        exit::NOT_ACQUIRED,
                        format!(
                            "queue {name:?}: nothing to pop within {}{}",
                            output::duration(timeout.unwrap_or_default()),
                            if answered {
                                ""
                            } else {
                                " (the backend did not answer)"
                            }
                        ),
                    ),
                });
            };
            // The value as is (it may not be UTF-8), or one JSON line; then a newline.
            let mut printed = if out.is_json() {
                let json = json!({"event": "popped", "name": name, "value": null});
                output::with_bytes(json, "value", &item)
                    .to_string()
                    .into_bytes()
            } else {
                item
            };
            printed.push(b'\n');
            if let Err(e) = write_stdout(&printed) {
                // The item is no longer in the queue: it must not be lost with stdout.
                exit::print_error(&format!(
                    "cannot write to stdout: {e}; the item popped from queue {name:?} follows on stderr"
                ));
                let mut stderr = std::io::stderr().lock();
                let _ = stderr.write_all(&printed).and_then(|()| stderr.flush());
                drop(stderr);
                close().await;
                return Err(CliError::quiet(exit::FAILED));
            }
            close().await;
            Ok(0)
        }
        QueueCommand::Len { name } => {
            let queue = baton::Queue::new(&client, &name)?;
            let len = signals
                .interruptible(async { queue.len().await.map_err(CliError::from) })
                .await?;
            out.emit(
                &len.to_string(),
                &json!({"event": "len", "name": name, "len": len}),
            )
            .map_err(|e| output::not_written(None, &e))?;
            Ok(0)
        }
    }
}

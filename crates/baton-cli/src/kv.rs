//! `baton get KEY`, `baton set KEY VALUE [--if-revision R]` and `baton watch KEY [--prefix]`:
//! plain reads, compare-and-set writes, and following changes.

use std::time::Duration;

use baton::store::{EventKind, KeyValue, Range, Watch};
use futures::StreamExt;
use serde_json::json;

use crate::cli::{self, Global};
use crate::exit::CliError;
use crate::output::{self, Output};
use crate::queue::{value, value_bytes, write_stdout};
use crate::supervisor::Signals;

/// `baton get`: the key does not exist; `baton set --if-revision`: the key changed.
pub(crate) const NOT_MATCHED: u8 = 1;

const GET_EXAMPLES: &str = "\
Examples:
  baton get config/feature-x                       # prints e.g. on
  baton --json get config/feature-x                # value, version, revision (last write)

Prints the value as is, then a newline. With --json, a value that is not UTF-8 is given
as \"value_base64\" (standard base64) instead of \"value\". Exits 1 with a message on stderr if the key does
not exist, and 125 if the value cannot be written to stdout.";

const SET_EXAMPLES: &str = "\
Examples:
  baton set config/feature-x on
  baton set config/cert --value-file cert.pem        # up to 1 MiB, any bytes
  ./render-config | baton set config/app --value-file -
  # only if nobody wrote since the write we read (its revision, from `set` or `get --json`)
  rev=$(baton --json get config/feature-x | jq .revision)
  baton set --if-revision \"$rev\" config/feature-x off
  # only if the key does not exist yet
  baton set --if-revision 0 config/owner \"$(hostname)\"

Prints the key's new version and revision: `set KEY (version V, revision R)`.
--if-revision compares the revision of the key's last write, not its version: a version
starts again at 1 when a key is deleted and written again, a revision is never reused.
Exit codes: 0 written; 1 --if-revision did not match (nothing was written; stderr says the
key's revision now); 125 bad input or backend failure, or written but the result could not
be printed (stdout full or closed).";

const WATCH_EXAMPLES: &str = "\
Examples:
  baton watch config/feature-x
  baton watch --prefix config/
  baton --json watch --prefix jobs/ | jq -r .key

Prints one line per change, from now on, until SIGINT or SIGTERM (exit 0), or until the
reader closes the pipe (exit 0; another failure to write exits 125):
  put config/feature-x = on (version 2, revision 15)
  delete config/feature-x (revision 16)
Control characters in keys and values are shown escaped (\\n, \\t, \\x1b...), so each change
is one line; --json gives them exactly.
With --json, a key or value that is not UTF-8 is given as \"key_base64\" or
\"value_base64\" (standard base64) instead of \"key\" or \"value\".
After a broken connection it watches again from where it was; while it cannot, a line on
stderr says so, and another when it watches again. If the backend compacted
those revisions meanwhile, it prints the keys as they are now (changes in between, and
deletions, may be skipped). An error that retrying cannot fix (permission denied, say,
once a role is revoked) ends it with 125 and the error on stderr.";

/// `baton get`.
#[derive(Debug, clap::Args)]
#[command(after_help = GET_EXAMPLES)]
pub(crate) struct GetArgs {
    /// The key.
    // Not `key`: that is the global --key (a TLS client key).
    #[arg(id = "KEY", value_name = "KEY", value_parser = cli::name)]
    pub(crate) key: String,
}

/// `baton set`.
#[derive(Debug, clap::Args)]
#[command(after_help = SET_EXAMPLES)]
pub(crate) struct SetArgs {
    /// The key.
    // Not `key`: that is the global --key (a TLS client key).
    #[arg(id = "KEY", value_name = "KEY", value_parser = cli::name)]
    pub(crate) key: String,

    /// The value (at most 1 MiB; or give it with --value-file). It may start with `-`
    /// (`-1`); one that starts with `--` is taken for a misspelt option and refused, unless
    /// given after `--` (`baton set KEY -- --x`).
    #[arg(
        value_parser = value,
        allow_hyphen_values = true,
        required_unless_present = "value_file",
        conflicts_with = "value_file"
    )]
    pub(crate) value: Option<String>,

    /// Read the value from FILE (`-`: standard input), byte for byte, instead of VALUE: for
    /// a value too long for the command line (Linux takes at most 128 KiB in one argument),
    /// or one that is not text. At most 1 MiB: a longer one is refused, nothing written.
    #[arg(long, value_name = "FILE")]
    pub(crate) value_file: Option<std::path::PathBuf>,

    /// Write only if the key's last write is revision R (as `set` and `get --json` print
    /// it; 0: only if the key does not exist); otherwise write nothing and exit 1.
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(i64).range(0..))]
    pub(crate) if_revision: Option<i64>,
}

/// `baton watch`.
#[derive(Debug, clap::Args)]
#[command(after_help = WATCH_EXAMPLES)]
pub(crate) struct WatchArgs {
    /// The key (or, with --prefix, the prefix).
    // Not `key`: that is the global --key (a TLS client key).
    #[arg(id = "KEY", value_name = "KEY", value_parser = cli::name)]
    pub(crate) key: String,

    /// Watch every key starting with KEY.
    #[arg(long)]
    pub(crate) prefix: bool,
}

fn versioned_json(event: &str, key: &str, v: &baton::Versioned) -> serde_json::Value {
    let event = json!({
        "event": event,
        "key": key,
        "value": null,
        "version": v.version,
        "revision": v.mod_revision,
        "create_revision": v.create_revision,
    });
    output::with_bytes(event, "value", &v.value)
}

/// Run `baton get`.
pub(crate) async fn get(global: &Global, args: GetArgs) -> Result<u8, CliError> {
    let out = Output::new(global.json);
    let client = cli::connect(global, &global.endpoints).await?;
    let shared = baton::SharedValue::new(&client, &args.key)?;
    let Some(found) = shared.get().await? else {
        return Err(CliError::new(
            NOT_MATCHED,
            format!("key {:?} does not exist", args.key),
        ));
    };
    let printed = if out.is_json() {
        out.json_line(&versioned_json("value", &args.key, &found))
    } else {
        // The value as is (it may not be UTF-8), then a newline.
        let mut value = found.value;
        value.push(b'\n');
        write_stdout(&value)
    };
    printed.map_err(|e| output::not_written(None, &e))?;
    Ok(0)
}

/// Run `baton set`.
pub(crate) async fn set(global: &Global, args: SetArgs) -> Result<u8, CliError> {
    let out = Output::new(global.json);
    // Read (and checked) before connecting.
    let value = value_bytes(args.value, args.value_file.as_deref())?;
    let client = cli::connect(global, &global.endpoints).await?;
    let shared = baton::SharedValue::new(&client, &args.key)?;
    let written = match args.if_revision {
        None => shared.set(value).await?,
        Some(revision) => match shared.compare_and_set(revision, value).await? {
            baton::CompareAndSet::Set(v) => v,
            baton::CompareAndSet::Conflict(now) => {
                let now = match now {
                    // `--if-revision 0` asks that the key does not exist: say it does.
                    Some(v) if revision == 0 => {
                        format!("it exists (its last write is revision {})", v.mod_revision)
                    }
                    Some(v) => format!("its last write is revision {}", v.mod_revision),
                    None => "it does not exist (revision 0)".to_string(),
                };
                return Err(CliError::new(
                    NOT_MATCHED,
                    format!(
                        "key {:?} not set: {now}, not {revision} as --if-revision asks",
                        args.key
                    ),
                ));
            }
        },
    };
    out.emit(
        &format!(
            "set {} (version {}, revision {})",
            output::escape_controls(&args.key),
            written.version,
            written.mod_revision
        ),
        &versioned_json("set", &args.key, &written),
    )
    .map_err(|e| output::not_written(Some("key set"), &e))?;
    Ok(0)
}

/// Run `baton watch`: until a signal, an error, or the reader of stdout is gone.
pub(crate) async fn watch(global: &Global, args: WatchArgs) -> Result<u8, CliError> {
    output::until_reader_gone(|connected| follow(global, args, connected)).await
}

/// Print every change until a signal or an error.
async fn follow(
    global: &Global,
    args: WatchArgs,
    connected: output::Connected,
) -> Result<u8, CliError> {
    let out = Output::new(global.json);
    let mut signals = Signals::new()?;
    let client = signals
        .interruptible(cli::connect(global, &global.endpoints))
        .await?;
    connected.now();
    let store = client.store().clone();
    let key = args.key.as_bytes().to_vec();
    let range = || {
        if args.prefix {
            Range::prefix(key.clone())
        } else {
            Range::key(key.clone())
        }
    };
    let watch_from = |revision| {
        if args.prefix {
            Watch::prefix(key.clone()).from_revision(revision)
        } else {
            Watch::key(key.clone()).from_revision(revision)
        }
    };

    // Where the next watch starts; None: read first (at the start, after a compaction).
    let mut next: Option<baton::Revision> = None;
    let mut first = true;
    let mut pause = Backoff::default();
    let mut outage = output::Outage::new("watch");
    // The changes printed by a catch-up after a compaction that has not finished (a read
    // failed, or was compacted too, and it starts again): not printed twice.
    let mut caught_up: std::collections::HashSet<(Vec<u8>, baton::Revision)> =
        std::collections::HashSet::new();
    loop {
        let from = match next {
            Some(from) => from,
            None => {
                // Keys only: the start needs the revision alone (one key, to learn it), and
                // after a compaction the values of the keys that changed are read one by
                // one; the values under a prefix may be a gigabyte of queue items.
                let read_range = if first {
                    range().keys_only().with_limit(1)
                } else {
                    range().keys_only()
                };
                let read = signals
                    .interruptible(async { Ok(store.range(read_range).await) })
                    .await?;
                let resp = match read {
                    Ok(resp) => resp,
                    // At the start, or a refusal (permission denied…): retrying cannot help.
                    Err(e) if first || !e.is_retryable() => return Err(e.into()),
                    Err(e) => {
                        tracing::debug!(error = ?e, "reading failed; retrying");
                        outage.failing(&e.to_string());
                        if pause.sleep(&mut signals).await {
                            return Ok(0);
                        }
                        continue;
                    }
                };
                if !first {
                    // After a compaction: what changed while we were cut off, as it is now.
                    let since = pause.last_seen;
                    let mut failed = None;
                    let mut compacted = false;
                    for listed in resp.kvs.iter().filter(|kv| kv.mod_revision > since) {
                        let at = Range::key(listed.key.clone()).at_revision(resp.header_revision);
                        let read = signals
                            .interruptible(async { Ok(store.range(at).await) })
                            .await?;
                        let kv = match read {
                            Ok(mut one) if !one.kvs.is_empty() => one.kvs.swap_remove(0),
                            Ok(_) => continue,
                            // Compacted again while reading: list them again.
                            Err(baton::Error::Compacted { .. }) => {
                                compacted = true;
                                break;
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        };
                        if !caught_up.insert((kv.key.clone(), kv.mod_revision)) {
                            continue;
                        }
                        if let Err(e) = print_put(&out, &kv) {
                            return output::follow_ended(&e);
                        }
                    }
                    if compacted {
                        tracing::debug!("compacted while catching up; reading again");
                        continue;
                    }
                    if let Some(e) = failed {
                        if !e.is_retryable() {
                            return Err(e.into());
                        }
                        tracing::debug!(error = ?e, "reading failed; retrying");
                        outage.failing(&e.to_string());
                        if pause.sleep(&mut signals).await {
                            return Ok(0);
                        }
                        continue;
                    }
                }
                first = false;
                caught_up.clear();
                pause.last_seen = resp.header_revision;
                resp.header_revision + 1
            }
        };
        // A break not said yet is said if the watch is not made again within a second.
        let watching = store.watch(watch_from(from));
        tokio::pin!(watching);
        let grace = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(grace);
        let stream = loop {
            tokio::select! {
                s = &mut watching => break s,
                () = &mut grace, if outage.break_unsaid() => outage.say_broken(),
                _ = signals.recv() => return Ok(0),
            }
        };
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(baton::Error::Compacted { .. }) => {
                next = None;
                continue;
            }
            Err(e) if !e.is_retryable() => return Err(e.into()),
            Err(e) => {
                tracing::debug!(error = %e, "watching failed; retrying");
                outage.failing(&e.to_string());
                next = Some(from);
                if pause.sleep(&mut signals).await {
                    return Ok(0);
                }
                continue;
            }
        };
        outage.working();
        next = Some(from);
        loop {
            let batch = tokio::select! {
                b = stream.next() => b,
                _ = signals.recv() => return Ok(0),
            };
            match batch {
                Some(Ok(batch)) => {
                    pause.reset();
                    for event in batch.events {
                        let printed = match event.kind {
                            EventKind::Put => print_put(&out, &event.kv),
                            EventKind::Delete => print_delete(&out, &event.kv),
                        };
                        if let Err(e) = printed {
                            return output::follow_ended(&e);
                        }
                        pause.last_seen = pause.last_seen.max(event.kv.mod_revision);
                        next = Some(pause.last_seen + 1);
                    }
                }
                Some(Err(baton::Error::Compacted { .. })) => {
                    tracing::debug!("watch compacted; reading again");
                    next = None;
                    break;
                }
                Some(Err(e)) if !e.is_retryable() => return Err(e.into()),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "watch broke; watching again");
                    // Said if the watch is not made again at once (it may take seconds to
                    // fail), not for a member gone with others still serving.
                    outage.broke(&e.to_string());
                    if pause.sleep(&mut signals).await {
                        return Ok(0);
                    }
                    break;
                }
                None => {
                    tracing::debug!("watch ended; watching again");
                    if pause.sleep(&mut signals).await {
                        return Ok(0);
                    }
                    break;
                }
            }
        }
    }
}

fn print_put(out: &Output, kv: &KeyValue) -> std::io::Result<()> {
    let key = kv.key_str();
    let key = output::escape_controls(&key);
    let value = kv.value_str();
    let value = output::escape_controls(&value);
    out.emit(
        &format!(
            "put {key} = {value} (version {}, revision {})",
            kv.version, kv.mod_revision
        ),
        &output::with_bytes(
            output::with_bytes(
                json!({
                    "event": "put",
                    "key": null,
                    "value": null,
                    "version": kv.version,
                    "revision": kv.mod_revision,
                    "create_revision": kv.create_revision,
                }),
                "key",
                &kv.key,
            ),
            "value",
            &kv.value,
        ),
    )
}

fn print_delete(out: &Output, kv: &KeyValue) -> std::io::Result<()> {
    let key = kv.key_str();
    let key = output::escape_controls(&key);
    let event = json!({"event": "delete", "key": null, "revision": kv.mod_revision});
    out.emit(
        &format!("delete {key} (revision {})", kv.mod_revision),
        &output::with_bytes(event, "key", &kv.key),
    )
}

/// The pause between attempts after a failure (100 ms doubling to 2 s), and the last
/// revision seen.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    last_seen: baton::Revision,
}

impl Backoff {
    fn reset(&mut self) {
        self.failures = 0;
    }

    /// Pause; true if interrupted meanwhile.
    async fn sleep(&mut self, signals: &mut Signals) -> bool {
        let pause = Duration::from_millis(100)
            .saturating_mul(1 << self.failures.min(5))
            .min(Duration::from_secs(2));
        self.failures += 1;
        tokio::select! {
            () = tokio::time::sleep(pause) => false,
            _ = signals.recv() => true,
        }
    }
}

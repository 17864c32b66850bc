//! What `baton` prints on stdout: one human line per event, or with `--json` one JSON object
//! per line.
//!
//! Writes never panic: a failed write (a closed pipe, a full disk) is reported to the caller
//! as an error. A command that prints a result (`get`, `set`, `queue`, `leader`, `status`,
//! `barrier`, `bench`) then fails with 125 ([`not_written`]): a script must not take a result it
//! never got for success. Commands that follow changes (`observe`, `watch`) stop: with 0
//! when the reader closed the pipe (`baton observe | head -1`), else with 125; they also
//! stop with 0 once they see the reader gone, before a write fails ([`until_reader_gone`]).
//! So does `demo`, whose reader chose to see no more (`baton demo | head -1`), after
//! cleaning up as on a signal; it fails with 125 on any other write error.

use std::io::{self, Write};

use serde_json::Value;

use crate::exit::CliError;

/// Where events go, in which form.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    json: bool,
}

impl Output {
    /// Human lines, or JSON lines if `json`.
    pub(crate) fn new(json: bool) -> Self {
        Output { json }
    }

    /// True if lines are JSON.
    pub(crate) fn is_json(&self) -> bool {
        self.json
    }

    /// Print one event: `human` as text, or `json` as one JSON line.
    pub(crate) fn emit(&self, human: &str, json: &Value) -> io::Result<()> {
        if self.json {
            self.json_line(json)
        } else {
            self.text(human)
        }
    }

    /// Print text (one or more lines) as is; for tables and timelines.
    pub(crate) fn text(&self, text: &str) -> io::Result<()> {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{text}")?;
        stdout.flush()
    }

    /// Print one JSON value on one line.
    pub(crate) fn json_line(&self, value: &Value) -> io::Result<()> {
        self.serialize_line(value)
    }

    /// Print any serializable value as one JSON line, fields in declaration order.
    pub(crate) fn serialize_line(&self, value: &impl serde::Serialize) -> io::Result<()> {
        let mut stdout = io::stdout().lock();
        serde_json::to_writer(&mut stdout, value)?;
        writeln!(stdout)?;
        stdout.flush()
    }
}

/// `event` (a JSON object made with `field: null`) with `bytes` as its `field`: a string if
/// they are UTF-8, else `FIELD_base64`, the bytes in standard base64 (padded), in the same
/// place. A JSON string holds text only: a lossy one would lose the bytes (of a queue item
/// that has left the queue, say).
pub(crate) fn with_bytes(event: Value, field: &str, bytes: &[u8]) -> Value {
    use base64::Engine as _;
    let Value::Object(map) = event else {
        return event;
    };
    let mut entry = Some(match std::str::from_utf8(bytes) {
        Ok(text) => (field.to_string(), Value::from(text)),
        Err(_) => (
            format!("{field}_base64"),
            Value::from(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    });
    let map = map
        .into_iter()
        .map(|(k, v)| match entry.take_if(|_| k == field) {
            Some(replaced) => replaced,
            None => (k, v),
        })
        .collect();
    Value::Object(map)
}

/// `text` for a human line: every control character (C0, DEL, C1) escaped, as `\n`,
/// `\r`, `\t`, `\xNN` (other C0 and DEL) or `\u{NN}` (C1), so that a key or a value
/// from the store can neither add a line nor fake one, nor drive the terminal. Other
/// characters, a backslash included, are kept: --json gives the exact text.
pub(crate) fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write as _;
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if u32::from(c) < 0x80 && c.is_control() => {
                let _ = write!(escaped, "\\x{:02x}", u32::from(c));
            }
            c if c.is_control() => {
                let _ = write!(escaped, "\\u{{{:x}}}", u32::from(c));
            }
            c => escaped.push(c),
        }
    }
    std::borrow::Cow::Owned(escaped)
}

/// The failure for a result that could not be written to stdout: 125, with `done` saying
/// what happened all the same ("key set"), if anything did.
pub(crate) fn not_written(done: Option<&str>, e: &io::Error) -> CliError {
    match done {
        Some(done) => CliError::failed(format!("{done}, but cannot write to stdout: {e}")),
        None => CliError::failed(format!("cannot write to stdout: {e}")),
    }
}

/// How a command that follows changes ends when stdout fails: 0 if the reader is gone (a
/// closed pipe: nobody wants more), else 125.
pub(crate) fn follow_ended(e: &io::Error) -> Result<u8, CliError> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(0)
    } else {
        Err(not_written(None, e))
    }
}

/// How often a command that follows changes checks whether the reader of its stdout is
/// gone.
const READER_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Run `follow` (`watch`, `observe`) until it ends, or until the reader of stdout is gone
/// (a pipe whose read end is closed, `baton watch KEY | head -1`): then 0, as when a write
/// finds the pipe closed, but without waiting for the next change to try one.
///
/// The reader is looked for only once `follow` says it is [`Connected`]: a failure to
/// connect is reported (exit 125) even if nobody reads stdout.
pub(crate) async fn until_reader_gone<F>(
    follow: impl FnOnce(Connected) -> F,
) -> Result<u8, CliError>
where
    F: std::future::Future<Output = Result<u8, CliError>>,
{
    let (connected, is_connected) = tokio::sync::oneshot::channel();
    let follow = follow(Connected(connected));
    let gone = async {
        match is_connected.await {
            Ok(()) => reader_gone().await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = follow => result,
        () = gone => {
            tracing::debug!("the reader of stdout is gone");
            Ok(0)
        }
    }
}

/// Given to a command run by [`until_reader_gone`], to say it has connected.
#[derive(Debug)]
pub(crate) struct Connected(tokio::sync::oneshot::Sender<()>);

impl Connected {
    /// From now on, the command ends when the reader of stdout is gone.
    pub(crate) fn now(self) {
        let _ = self.0.send(());
    }
}

/// Completes once stdout is a pipe (or a socket) that nobody reads any more: poll(2) says
/// POLLERR or POLLHUP on it, checked every [`READER_CHECK`]. Never for stdout on a file, a
/// terminal or /dev/null, which have no reader to lose.
pub(crate) async fn reader_gone() {
    if !stdout_has_reader() {
        return std::future::pending().await;
    }
    let mut check = tokio::time::interval(READER_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        check.tick().await;
        let mut fd = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a timeout of 0: poll(2) only reports, never blocks.
        let ready = unsafe { libc::poll(&mut fd, 1, 0) };
        if ready > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return;
        }
    }
}

/// True if stdout is a pipe or a socket: something with a reader that may go.
fn stdout_has_reader() -> bool {
    // SAFETY: fstat(2) writes into the zeroed stat given; fd 1 may be closed (then -1).
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(libc::STDOUT_FILENO, &mut stat) } != 0 {
        return false;
    }
    matches!(stat.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
}

/// A message for stderr that is not an error of `baton`'s (such as `lock lost`): printed
/// as is, on one line.
pub(crate) fn notice(line: &str) {
    let mut stderr = io::stderr().lock();
    let _ = writeln!(stderr, "{}", crate::exit::one_line(line));
    let _ = stderr.flush();
}

/// Tells the operator, on stderr, when a command that follows changes (`watch`, `observe`)
/// stops getting them and when it gets them again: one line each way, so that a log shows
/// the gap, not a line per retry.
#[derive(Debug)]
pub(crate) struct Outage {
    what: &'static str,
    since: Option<std::time::Instant>,
    /// A stream that broke, not said yet: when, and why (see [`Outage::broke`]).
    broke: Option<(std::time::Instant, String)>,
}

impl Outage {
    pub(crate) fn new(what: &'static str) -> Outage {
        Outage {
            what,
            since: None,
            broke: None,
        }
    }

    /// A stream broke with `error`: said (counting from now) once [`Outage::say_broken`]
    /// is called or an attempt fails, not if the next attempt works at once (a cluster
    /// member gone, the watch made again on another).
    pub(crate) fn broke(&mut self, error: &str) {
        if self.since.is_none() && self.broke.is_none() {
            self.broke = Some((std::time::Instant::now(), error.to_string()));
        }
    }

    /// True if a break is not said yet.
    pub(crate) fn break_unsaid(&self) -> bool {
        self.broke.is_some()
    }

    /// Say a break not said yet.
    pub(crate) fn say_broken(&mut self) {
        if let Some((at, error)) = self.broke.take() {
            self.failing(&error);
            self.since = Some(at);
        }
    }

    /// An attempt failed with `error` and will be retried: say so, the first time.
    pub(crate) fn failing(&mut self, error: &str) {
        if self.since.is_none() {
            let at = self.broke.take().map(|(at, _)| at);
            self.since = Some(at.unwrap_or_else(std::time::Instant::now));
            notice(&format!(
                "{}: {error}; retrying (changes may come late)",
                self.what
            ));
        }
    }

    /// An attempt worked: say so, if the last ones failed.
    pub(crate) fn working(&mut self) {
        self.broke = None;
        if let Some(since) = self.since.take() {
            let gap = std::time::Duration::from_millis(
                u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
            );
            notice(&format!(
                "{}: working again after {}",
                self.what,
                duration(gap)
            ));
        }
    }
}

/// A lease id as etcd tools print it: lowercase hex.
/// The line `baton lock` and `baton elect` print when they hold `key` with no CMD to run:
/// `EVENT KEY token=N`, or with `--json` the event with the hold's details.
pub(crate) fn emit_held(
    out: &Output,
    event: &str,
    name: &str,
    key: &str,
    token: Option<i64>,
    coordinator: &baton::Coordinator,
    ttl: std::time::Duration,
) {
    let _ = out.emit(
        &format!("{event} {}{}", escape_controls(key), token_suffix(token)),
        &serde_json::json!({
            "event": event,
            "name": name,
            "key": key,
            "fencing_token": token,
            "lease": coordinator.lease_id().map(lease_hex),
            // Whole seconds, rounded up as etcd rounds a lease's TTL.
            "ttl_secs": ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0),
            "backend": coordinator.backend(),
        }),
    );
}

pub(crate) fn lease_hex(lease: i64) -> String {
    format!("{lease:x}")
}

/// ` token=N` for a fencing token, or ` (no fencing token)` where the backend has none
/// (Redlock).
pub(crate) fn token_suffix(token: Option<i64>) -> String {
    match token {
        Some(token) => format!(" token={token}"),
        None => " (no fencing token)".to_string(),
    }
}

/// A duration for people: `9s`, `1m 30s`, `250ms`.
pub(crate) fn duration(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_as_text_or_base64() {
        let event = || serde_json::json!({"event": "put", "value": null, "revision": 3});
        assert_eq!(
            with_bytes(event(), "value", b"on").to_string(),
            r#"{"event":"put","value":"on","revision":3}"#
        );
        assert_eq!(
            with_bytes(event(), "value", b"\xff\xfe").to_string(),
            r#"{"event":"put","value_base64":"//4=","revision":3}"#
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert!(matches!(
            escape_controls("plain text, é \\n"),
            std::borrow::Cow::Borrowed("plain text, é \\n")
        ));
        assert_eq!(
            escape_controls("a\nb\r\tc\u{0}\u{1b}[0m\u{7f}\u{85}\u{9f}d"),
            r"a\nb\r\tc\x00\x1b[0m\x7f\u{85}\u{9f}d"
        );
    }

    #[test]
    fn formats() {
        assert_eq!(lease_hex(0x694d7f3a2c1b), "694d7f3a2c1b");
        assert_eq!(duration(std::time::Duration::from_secs(90)), "1m 30s");
    }
}

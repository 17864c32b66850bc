//! Exit codes, and the one error type every command returns.
//!
//! `baton` has a few exit codes of its own; every other code is CMD's, passed through:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (or CMD's own 0) |
//! | 1 | `baton leader`: the election has no leader |
//! | 122 | the lock, leadership or permit was lost while held (CMD may have run without it) |
//! | 124 | not acquired: `--try` found the lock held, or `--timeout` passed |
//! | 125 | `baton` itself failed (also: the session was lost, or the waiter's key deleted, while still waiting, so nothing was held and CMD never ran): bad input, unreachable backend, store error, a result that could not be written to stdout (but `watch`, `observe` and `demo` end with 0 when the reader of stdout goes away) |
//! | 126 | CMD could not be executed |
//! | 127 | CMD was not found |
//! | 128+N | interrupted by signal N while waiting, or CMD killed by signal N |

use std::fmt;
use std::io::Write;

/// The election has no leader (`baton leader`).
pub(crate) const NO_LEADER: u8 = 1;
/// The lock, leadership or permit was lost while held. Only for a hold: a session lost
/// while waiting is [`FAILED`] (see [`lost_while_waiting`]).
pub(crate) const LOST: u8 = 122;
/// Not acquired: `--try` found the lock held, or `--timeout` passed.
pub(crate) const NOT_ACQUIRED: u8 = 124;
/// `baton` itself failed.
pub(crate) const FAILED: u8 = 125;
/// CMD could not be executed.
pub(crate) const CANNOT_EXECUTE: u8 = 126;
/// CMD was not found.
pub(crate) const NOT_FOUND: u8 = 127;

/// The exit code for "killed by signal `signal`", as shells report it.
pub(crate) fn signalled(signal: i32) -> u8 {
    u8::try_from(128 + signal.clamp(0, 127)).unwrap_or(FAILED)
}

/// A command's failure: an exit code, and the one line to print on stderr (if any).
#[derive(Debug)]
pub(crate) struct CliError {
    code: u8,
    message: Option<String>,
}

impl CliError {
    /// Exit with `code`, printing `baton: MESSAGE` on stderr.
    pub(crate) fn new(code: u8, message: impl fmt::Display) -> Self {
        CliError {
            code,
            message: Some(message.to_string()),
        }
    }

    /// Exit with `code` without printing anything more (the reason was printed already).
    pub(crate) fn quiet(code: u8) -> Self {
        CliError {
            code,
            message: None,
        }
    }

    /// The message, if any.
    pub(crate) fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    /// Bad input or an internal failure: exit 125.
    pub(crate) fn failed(message: impl fmt::Display) -> Self {
        CliError::new(FAILED, message)
    }

    /// Interrupted by `signal` before anything was held.
    pub(crate) fn interrupted(signal: i32) -> Self {
        CliError::quiet(signalled(signal))
    }

    /// The exit code.
    pub(crate) fn code(&self) -> u8 {
        self.code
    }

    /// Print the message, on one line, on stderr.
    pub(crate) fn report(&self) {
        if let Some(message) = &self.message {
            print_error(message);
        }
    }
}

/// A wait (for a lock, a leadership, a permit, a barrier) that ended because the session
/// or the waiter's key was lost: nothing was held and CMD never ran, so this is `baton`'s
/// failure (125), not a loss while held (122). `what` says what was waited for ("for lock
/// \"x\""). The message says which was lost: the session (its lease revoked or expired),
/// or only the waiter's key (deleted by someone else, the session alive).
pub(crate) fn lost_while_waiting(what: &str, e: &baton::Error) -> CliError {
    match e {
        baton::Error::NotHeld { key } => {
            CliError::failed(format!("key {key:?} was deleted while waiting {what}"))
        }
        baton::Error::SessionLost { .. } | baton::Error::LeaseNotFound(_) => {
            CliError::failed(format!("session lost while waiting {what}: {e}"))
        }
        e => CliError::failed(format!("lost while waiting {what}: {e}")),
    }
}

/// Print `baton: MESSAGE` as exactly one line on stderr.
pub(crate) fn print_error(message: &str) {
    let line = one_line(message);
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "baton: {line}");
    let _ = stderr.flush();
}

/// Fold a message onto one line.
pub(crate) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<baton::Error> for CliError {
    /// A library error outside a hold: `baton`'s own failure (125), a lost session too,
    /// since nothing was held (122 is only for a hold lost, which the supervisor reports).
    fn from(e: baton::Error) -> Self {
        CliError::failed(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_codes() {
        assert_eq!(signalled(libc::SIGTERM), 143);
        assert_eq!(signalled(libc::SIGINT), 130);
        assert_eq!(signalled(libc::SIGKILL), 137);
    }

    #[test]
    fn messages_fold_to_one_line() {
        assert_eq!(one_line("a\n\n  b  \nc"), "a; b; c");
        assert_eq!(one_line("single"), "single");
    }

    #[test]
    fn library_errors_map_to_codes() {
        // Outside a hold nothing was held: a lost session is a failure, not 122.
        let lost: CliError = baton::Error::SessionLost {
            reason: "lease revoked".into(),
        }
        .into();
        assert_eq!(lost.code(), FAILED);
        let waiting = lost_while_waiting(
            "for lock \"x\"",
            &baton::Error::SessionLost {
                reason: "lease revoked".into(),
            },
        );
        assert_eq!(waiting.code(), FAILED);
        assert!(
            waiting
                .message()
                .is_some_and(|m| m.starts_with("session lost while waiting for lock \"x\": ")),
            "{waiting:?}"
        );
        let deleted = lost_while_waiting(
            "for lock \"x\"",
            &baton::Error::NotHeld { key: "x/1f".into() },
        );
        assert_eq!(deleted.code(), FAILED);
        assert_eq!(
            deleted.message(),
            Some("key \"x/1f\" was deleted while waiting for lock \"x\"")
        );
        let bad: CliError = baton::Error::InvalidArgument("name is empty".into()).into();
        assert_eq!(bad.code(), FAILED);
    }
}

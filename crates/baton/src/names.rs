//! Validation of user-supplied names and the key layouts shared with Go.

use crate::error::{Error, Result};
use crate::store::KeyValue;

/// The longest name Baton accepts, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// Check a lock, election or recipe name before any network call.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("name is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "name is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(Error::invalid("name contains a NUL byte"));
    }
    Ok(())
}

/// The largest value Baton writes for a user (a queue item, a shared value), in bytes: 1 MiB.
///
/// etcd refuses requests over 1.5 MiB by default (`--max-request-bytes`); the margin leaves
/// room for the key and the rest of the request. Larger values are refused with
/// [`Error::InvalidArgument`] before any network call.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// Check a user's value before any network call.
pub(crate) fn validate_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Error::invalid(format!(
            "value is {} bytes long; the limit is {MAX_VALUE_LEN}",
            value.len()
        )));
    }
    Ok(())
}

/// Check a count (permits, participants) before any network call: at least 1.
pub(crate) fn validate_count(what: &str, count: u32) -> Result<()> {
    if count == 0 {
        return Err(Error::invalid(format!("{what} must be at least 1")));
    }
    Ok(())
}

/// The key of a session's entry in a lease-keyed queue: `prefix + hex(lease)`, as Go's
/// `concurrency` package and `etcdctl lock` / `etcdctl elect` write it.
pub(crate) fn lease_key(prefix: &str, lease: i64) -> String {
    format!("{prefix}{lease:x}")
}

/// True if `key` is a direct member of the queue under `prefix`: the rest of the key is a
/// non-empty run of lowercase hex digits (a lease id, or Go's decimal nanosecond suffix).
///
/// This keeps `a` and `a/b` independent: the keys of lock `a/b` (`a/b/<lease>`) live under
/// lock `a`'s prefix `a/`, but are not its members.
pub(crate) fn is_member(prefix: &[u8], key: &[u8]) -> bool {
    match key.strip_prefix(prefix) {
        Some(rest) => !rest.is_empty() && rest.iter().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

/// The fewest digits an item key ends with: Go's `recipe.Queue` and Baton's [`Queue`]
/// (crate::Queue) write the enqueue time in nanoseconds since 1970 (19 digits today), and
/// Go's `recipe.PriorityQueue` and Baton's [`PriorityQueue`](crate::PriorityQueue) a
/// sequence number padded to 16.
pub(crate) const ITEM_DIGITS: usize = 16;

/// True if `digits` is how an item key ends: [`ITEM_DIGITS`] or more decimal digits.
pub(crate) fn is_item_suffix(digits: &[u8]) -> bool {
    digits.len() >= ITEM_DIGITS && digits.iter().all(u8::is_ascii_digit)
}

/// True if `kv` is an item of the queue of items (a [`Queue`](crate::Queue)) under
/// `prefix`: `prefix` then [`ITEM_DIGITS`] or more decimal digits, with no lease. Items
/// never have one, as Go's `recipe.Queue` writes them, while the keys of locks, elections,
/// semaphores and read-write locks always do: a lock `jobs` (`jobs/<lease>`) is no item of
/// queue `jobs`. And the shape keeps out the keys that other types name freely: a
/// `SharedValue`, `CountDownLatch` or `Barrier` named `jobs/1` or `jobs/cafe` is no item.
pub(crate) fn is_item(prefix: &[u8], kv: &KeyValue) -> bool {
    kv.lease == 0 && kv.key.strip_prefix(prefix).is_some_and(is_item_suffix)
}

/// What a mutex or election queue's handoff mark inserts in its name, after its first
/// component (see [`Queue::handoff_key`]): a NUL, which no name contains, so the mark is no
/// key of any other lock, election or recipe.
pub(crate) const HANDOFF_SUFFIX: &[u8] = b"\0baton-handoff";

/// The keys that form one queue, ordered by create revision.
///
/// - A mutex or election queue is the direct members of `NAME/` (see [`is_member`]).
/// - A read-write lock's full queue is the direct members of `NAME/read/` and `NAME/write/`;
///   its writers' queue is the direct members of `NAME/write/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Queue {
    /// Every member's key starts with this.
    pub(crate) prefix: Vec<u8>,
    read_write: bool,
}

impl Queue {
    /// The direct members of `prefix`.
    pub(crate) fn direct(prefix: &str) -> Queue {
        Queue {
            prefix: prefix.as_bytes().to_vec(),
            read_write: false,
        }
    }

    /// The readers and writers of the read-write lock whose prefix is `prefix` (`NAME/`).
    pub(crate) fn read_write(prefix: &str) -> Queue {
        Queue {
            prefix: prefix.as_bytes().to_vec(),
            read_write: true,
        }
    }

    /// True if `kv` is a member of this queue: its key is (see [`contains`](Queue::contains)),
    /// and it has a lease. Every key of these queues is bound to its session's lease, in Go
    /// too, while a queue item, a barrier or a latch has none: queue `jobs`'s items
    /// (`jobs/<hex>`) and barrier `deploy/1` are not holders of lock `jobs` or `deploy`.
    pub(crate) fn admits(&self, kv: &KeyValue) -> bool {
        kv.lease != 0 && self.contains(&kv.key)
    }

    /// The key where a holder of this mutex or election queue (`NAME/`) that waited in a long
    /// queue leaves its create revision as it releases, in the transaction that deletes its
    /// key: [`HANDOFF_SUFFIX`] inserted after the name's first component (`jobs` →
    /// `jobs\0baton-handoff`, `locks/db/main` → `locks\0baton-handoff/db/main`). So it lies
    /// outside the prefix of the name and of each of its parents (`locks/`, `locks/db/`):
    /// Go's waiters, which count every key under their prefix, never see it, not even those
    /// of a parent name (a mark under `locks/` would hold up `etcdctl lock locks` for as long
    /// as it lives: found by review). Names contain no NUL, so it is no key of any other
    /// lock, election or recipe. `None` for a read-write lock's full queue, or a prefix that
    /// does not end in `/`.
    ///
    /// Its successor, woken by that delete, reads it with its own key (two point reads)
    /// instead of scanning the whole queue for anyone still ahead of it: the mark proves the
    /// deleted key was once at the head, so nobody created before it is left (see
    /// `wait::handed_over`).
    pub(crate) fn handoff_key(&self) -> Option<Vec<u8>> {
        if self.read_write {
            return None;
        }
        let name = self.prefix.strip_suffix(b"/").filter(|n| !n.is_empty())?;
        let first = name.iter().position(|&b| b == b'/').unwrap_or(name.len());
        let (head, rest) = name.split_at(first);
        Some([head, HANDOFF_SUFFIX, rest].concat())
    }

    /// True if `key` is a member of this queue, judging by the key alone (our own key, or
    /// a key whose lease is not known): see [`admits`](Queue::admits).
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        if !self.read_write {
            return is_member(&self.prefix, key);
        }
        let Some(rest) = key.strip_prefix(self.prefix.as_slice()) else {
            return false;
        };
        [&b"read/"[..], &b"write/"[..]]
            .iter()
            .any(|sub| rest.starts_with(sub) && is_member(sub, rest))
    }
}

/// A duration in an error message: as `{:?}` prints it (`500ms`, `2s`), but zero as `0s`,
/// as users write it, not `0ns`.
pub(crate) fn show_duration(d: std::time::Duration) -> String {
    if d.is_zero() {
        "0s".to_string()
    } else {
        format!("{d:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("").is_err());
        assert!(validate_name("a\0b").is_err());
        assert!(validate_name(&"x".repeat(1025)).is_err());
        assert!(validate_name(&"x".repeat(1024)).is_ok());
        assert!(validate_name("locks/job-1").is_ok());
    }

    #[test]
    fn values_and_counts() {
        assert!(validate_value(&vec![0; MAX_VALUE_LEN]).is_ok());
        let err = validate_value(&vec![0; MAX_VALUE_LEN + 1]).unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        assert!(err.to_string().contains("the limit is 1048576"), "{err}");
        assert!(validate_count("permits", 1).is_ok());
        let err = validate_count("permits", 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid argument: permits must be at least 1"
        );
    }

    #[test]
    fn keys() {
        assert_eq!(lease_key("job/", 0x694d7f3a2c1b), "job/694d7f3a2c1b");
        assert!(is_member(b"a/", b"a/694d"));
        assert!(!is_member(b"a/", b"a/b/694d"));
        assert!(!is_member(b"a/", b"a/"));
        assert!(!is_member(b"a/", b"b/1"));
    }

    #[test]
    fn queues() {
        let rw = Queue::read_write("a/");
        assert!(rw.contains(b"a/read/1f"));
        assert!(rw.contains(b"a/write/1700000000000000000"));
        assert!(!rw.contains(b"a/1f"));
        assert!(!rw.contains(b"a/b/read/1f"));
        assert!(!rw.contains(b"a/read/x/1f"));
        assert_eq!(rw.handoff_key(), None);
        let q = Queue::direct("a/");
        let mark = q.handoff_key().unwrap();
        assert_eq!(mark, b"a\0baton-handoff");
        assert!(!q.contains(&mark));
        assert!(!mark.starts_with(b"a/"));
        // A nested name's mark is under none of its parents' prefixes, where Go's waiters
        // would count it.
        let nested = Queue::direct("a/b/c/").handoff_key().unwrap();
        assert_eq!(nested, b"a\0baton-handoff/b/c");
        for parent in [&b"a/"[..], b"a/b/", b"a/b/c/"] {
            assert!(!nested.starts_with(parent));
        }
        // One mark per name.
        assert_ne!(
            Queue::direct("a/b/").handoff_key(),
            Queue::direct("a/").handoff_key()
        );
        assert_eq!(
            Queue::direct("a//").handoff_key().unwrap(),
            b"a\0baton-handoff/"
        );
        assert_eq!(Queue::direct("/").handoff_key(), None);
        let w = Queue::direct("a/write/");
        assert!(w.contains(b"a/write/1f"));
        assert!(!w.contains(b"a/read/1f"));
    }
}

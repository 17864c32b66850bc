//! What `baton status` shows on Redis: the lock keys under a prefix, who holds them (by
//! quorum, on Redlock), and for how long.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};

use super::node::{Inspected, Keys};
use super::RedisClient;
use crate::error::Result;

/// How many keys are read at once.
const CONCURRENCY: usize = 32;

/// A lock (or election) key held on Redis, from [`RedisClient::holds`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisHold {
    /// The lock's name: the key without the client's prefix.
    pub name: String,
    /// The Redis key.
    pub key: String,
    /// True if the holder is a Baton election leader (it wrote a leader record).
    pub election: bool,
    /// On a single instance, the lock's fencing counter (`baton:fence:KEY`): the holder's
    /// fencing token when the holder is a Baton client, since Baton's acquire bumps it in
    /// the script that sets the key. Redis does not record which client set a key, so for
    /// a key taken by another library (redsync, redis-py) this is the counter of the last
    /// Baton grant, not a token of that holder. `None` on Redlock (no counter), and when
    /// the counter does not exist (no Baton client ever took the lock).
    pub fencing_token: Option<i64>,
    /// The time left before the key expires (the least among the servers that agree).
    pub ttl: Duration,
    /// How many servers hold the holder's token (at least the quorum).
    pub servers: usize,
    /// How many live waiters queue for the lock in Baton's FIFO queue (`baton:queue:KEY`,
    /// single instance only): waiters whose place has not expired. Waiters that do not
    /// queue (Redlock, elections, clients built without FIFO, other libraries) are not
    /// counted: Redis keeps no trace of them.
    pub waiters: usize,
}

impl RedisClient {
    /// Every lock key whose name starts with `prefix`: keys (under the client's prefix)
    /// that are strings with an expiry, as lock keys are — Baton's, redsync's and
    /// redis-py's alike — and whose value the same holder has on a quorum of servers.
    /// Values (the holders' secret tokens) are not returned. Waiters are counted only where
    /// they queue: Baton's FIFO waiters on a single instance (see [`RedisHold::waiters`]).
    /// Keys of another type where Baton's bookkeeping keys would be are ignored, and so are
    /// keys that are not UTF-8 (Baton's lock names are text; another library may have
    /// written a binary key).
    ///
    /// It lists keys with `SCAN` (which never blocks the server) on every server, then
    /// reads each key with one script call: with a large database and a short prefix, this
    /// reads every key's name. Servers that fail are skipped, as long as a quorum
    /// answers; so are those that have not answered shortly after the others settled it
    /// (1% of the TTL, at least 10 ms, or as long as those answers took if longer): a
    /// quorum listed the keys, or, for a key, a quorum agrees on its holder or no holder
    /// can have a quorum any more. A hung server does not hold the listing up by a request
    /// timeout.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn holds(&self, prefix: &str) -> Result<Vec<RedisHold>> {
        let inner = self.inner();
        inner.check_open()?;
        let ns = inner.opts.prefix.clone();
        let pattern = format!("{}*", glob_escape(&format!("{ns}{prefix}")));
        let n = inner.nodes.len();
        let straggle = super::redlock::straggle(inner.opts.ttl);
        let scans = inner.nodes.iter().map(|node| node.scan(&pattern)).collect();
        let failed = super::redlock::too_many_failed(n, inner.quorum);
        let listed = super::redlock::quorum_succeeded(inner.quorum);
        let (scans, _) = super::redlock::gather(scans, listed, straggle, failed).await;
        let mut names = BTreeSet::new();
        let mut answered = 0;
        let mut first_error = None;
        for scan in scans {
            match scan {
                Ok(keys) => {
                    answered += 1;
                    for key in keys {
                        let Ok(key) = String::from_utf8(key) else {
                            continue;
                        };
                        if is_internal(&key) {
                            continue;
                        }
                        if let Some(name) = key.strip_prefix(&ns) {
                            names.insert(name.to_string());
                        }
                    }
                }
                Err(e) => super::redlock::keep_error(&mut first_error, e),
            }
        }
        if answered < inner.quorum {
            if let Some(e) = first_error {
                return Err(if inner.redlock {
                    inner.no_quorum(answered, format!("listing keys failed: {e}"))
                } else {
                    e
                });
            }
        }
        let redlock = inner.redlock;
        let quorum = inner.quorum;
        let ns = &ns;
        let holds: Vec<Option<RedisHold>> = futures::stream::iter(names)
            .map(|name| async move {
                let keys = Keys::new(ns, &name);
                let reads = inner.nodes.iter().map(|n| n.inspect(&keys)).collect();
                let failed = super::redlock::too_many_failed(n, quorum);
                let held = super::redlock::holder_settled(n, quorum, same_holder);
                let (reads, _) = super::redlock::gather(reads, held, straggle, failed).await;
                // A server that did not answer in time counts as failed.
                let failed = n - reads.iter().filter(|r| r.is_ok()).count();
                let mut found: Vec<Inspected> = Vec::new();
                let mut error = None;
                for read in reads {
                    match read {
                        Ok(seen) => found.extend(seen),
                        Err(e) => super::redlock::keep_error(&mut error, e),
                    }
                }
                if let Some(e) = error.filter(|_| failed > n - quorum) {
                    return Err(if redlock {
                        inner.no_quorum(n - failed, format!("read failed: {e}"))
                    } else {
                        e
                    });
                }
                Ok::<_, crate::Error>(agree(&found, quorum).map(|(seen, servers)| RedisHold {
                    key: keys.lock.clone(),
                    name,
                    election: seen.election,
                    fencing_token: (!redlock && seen.fence > 0).then_some(seen.fence),
                    ttl: Duration::from_millis(u64::try_from(seen.pttl_ms).unwrap_or(0)),
                    servers,
                    waiters: seen.waiters,
                }))
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(holds.into_iter().flatten().collect())
    }
}

/// The value a quorum of servers agree on, with the least time left among them, and how
/// many agree.
fn agree(found: &[Inspected], quorum: usize) -> Option<(Inspected, usize)> {
    let mut by_value: HashMap<&[u8], Vec<&Inspected>> = HashMap::new();
    for f in found {
        by_value.entry(&f.value).or_default().push(f);
    }
    let (_, agreeing) = by_value.into_iter().find(|(_, v)| v.len() >= quorum)?;
    let least = agreeing.iter().min_by_key(|f| f.pttl_ms)?;
    Some(((*least).clone(), agreeing.len()))
}

/// Whether two servers see the same holder of a key.
fn same_holder(a: &Option<Inspected>, b: &Option<Inspected>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a.value == b.value)
}

/// Baton's own bookkeeping keys, never shown as locks.
fn is_internal(key: &str) -> bool {
    [
        "baton:fence:",
        "baton:leader:",
        "baton:wake:",
        "baton:queue:",
        "baton:waiter:",
        "baton:released:",
    ]
    .iter()
    .any(|p| key.starts_with(p))
}

/// `s` with the glob characters of `SCAN MATCH` escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(value: &str, pttl_ms: i64) -> Inspected {
        Inspected {
            value: value.as_bytes().to_vec(),
            pttl_ms,
            fence: 0,
            election: false,
            waiters: 0,
        }
    }

    #[test]
    fn a_quorum_must_agree() {
        let found = [seen("a", 900), seen("a", 800), seen("b", 500)];
        let (least, n) = agree(&found, 2).unwrap();
        assert_eq!(
            (least.value.as_slice(), least.pttl_ms, n),
            (&b"a"[..], 800, 2)
        );
        assert!(agree(&found, 3).is_none());
        assert!(agree(&[], 1).is_none());
    }

    #[test]
    fn globs_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert!(is_internal("baton:fence:x"));
        assert!(is_internal("baton:released:x:0123"));
        assert!(!is_internal("baton-jobs"));
    }
}

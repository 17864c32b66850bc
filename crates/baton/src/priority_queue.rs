//! A distributed priority queue (Go's `recipe.PriorityQueue`): lower numbers first, FIFO
//! within a priority.

use std::fmt;

use tracing::Instrument;

use crate::client::Client;
use crate::error::Result;
use crate::names::{validate_name, validate_value};
use crate::store::{Compare, CompareOp, Range, SortTarget, Txn, TxnOp};
use crate::work_queue::{take_methods, Items};

/// A distributed priority queue: items with a lower priority number are dequeued first,
/// and items of one priority in the order they were enqueued.
///
/// Taking items works as for [`Queue`](crate::Queue) — each item goes to exactly one
/// consumer, never twice, and items do not vanish (no lease) — with items ordered by key
/// instead of create revision.
///
/// # Key layout
///
/// Go's `recipe.NewPriorityQueue(client, NAME)` layout, so Go and Baton share one queue:
/// - items are `NAME/PPPPP/SSSSSSSSSSSSSSSS`: the priority and a sequence number per
///   priority, both zero-padded decimal, so key order is priority order, then enqueue order;
/// - the bookkeeping key `__NAME/PPPPP` (empty value, no lease) is rewritten by every
///   enqueue at that priority. The sequence number of a new item is one more than the
///   largest at its priority, and the enqueue transaction succeeds only if the bookkeeping
///   key was not written since that was read, so concurrent producers never get the same
///   number or an order out of step with their commits. The bookkeeping keys stay when the
///   queue is empty (one per priority ever used).
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let q = baton::PriorityQueue::new(&client, "alerts")?;
/// q.enqueue("disk 80%", 5).await?;
/// q.enqueue("disk 99%", 0).await?;
/// q.enqueue("disk 85%", 5).await?;
/// assert_eq!(q.dequeue().await?, b"disk 99%");
/// assert_eq!(q.dequeue().await?, b"disk 80%");
/// assert_eq!(q.dequeue().await?, b"disk 85%");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PriorityQueue {
    name: String,
    items: Items,
}

impl fmt::Debug for PriorityQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PriorityQueue")
            .field("name", &self.name)
            .finish()
    }
}

impl PriorityQueue {
    /// The priority queue named `name`.
    ///
    /// Fails with [`Error::InvalidArgument`](crate::Error::InvalidArgument) if the name is
    /// empty, longer than 1 KiB, or contains a NUL byte.
    pub fn new(client: &Client, name: &str) -> Result<PriorityQueue> {
        validate_name(name)?;
        Ok(PriorityQueue {
            name: name.to_string(),
            items: Items {
                store: client.store().clone(),
                what: "priority queue",
                prefix: format!("{name}/"),
                order: SortTarget::Key,
                is_item,
            },
        })
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Add an item with `priority` (0 is served first).
    ///
    /// Fails with [`Error::InvalidArgument`](crate::Error::InvalidArgument) before any
    /// network call if the value is over [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the item may or may not have been enqueued.
    pub async fn enqueue(&self, value: impl Into<Vec<u8>>, priority: u16) -> Result<()> {
        let value = value.into();
        validate_value(&value)?;
        self.append(value, priority)
            .instrument(tracing::debug_span!("enqueue", queue = %self.name, priority))
            .await
    }

    /// Go's `newSequentialKV`: the next sequence number at this priority, guarded by the
    /// bookkeeping key.
    async fn append(&self, value: Vec<u8>, priority: u16) -> Result<()> {
        let store = &self.items.store;
        let level = format!("{}{priority:05}", self.items.prefix);
        let bookkeeping = format!("__{level}");
        loop {
            let last = store
                .range(
                    Range::prefix(format!("{level}/"))
                        .sort_by(SortTarget::Key, crate::store::SortOrder::Descending)
                        .with_limit(1),
                )
                .await?;
            let next = last
                .kvs
                .first()
                .and_then(|kv| sequence(&kv.key))
                .map_or(0, |n| n + 1);
            let key = format!("{level}/{next:016}");
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    bookkeeping.as_bytes(),
                    CompareOp::Less,
                    last.header_revision + 1,
                )])
                .and_then([
                    TxnOp::put(bookkeeping.as_bytes(), "", 0),
                    TxnOp::put(key.as_bytes(), value.clone(), 0),
                ]);
            if store.txn(txn).await?.succeeded {
                return Ok(());
            }
            // Another producer enqueued at this priority since our read: read again.
        }
    }

    take_methods!("the first item (lowest priority number, then oldest)");
}

/// True if `key` is an item under `prefix`: `PPPPP/` then a decimal sequence number.
fn is_item(prefix: &[u8], key: &[u8]) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    match rest.split_at_checked(5) {
        Some((priority, tail)) => {
            priority.iter().all(u8::is_ascii_digit) && sequence(tail).is_some()
        }
        None => false,
    }
}

/// The sequence number at the end of an item key (`…/SSSS`), as Go parses it.
fn sequence(key: &[u8]) -> Option<u64> {
    let digits = &key[key.iter().rposition(|b| *b == b'/')? + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_keys() {
        assert!(is_item(b"q/", b"q/00003/0000000000000001"));
        assert!(!is_item(b"q/", b"q/0003/0000000000000001"));
        assert!(!is_item(b"q/", b"q/00003/"));
        assert!(!is_item(b"q/", b"q/00003/x"));
        assert!(!is_item(b"q/", b"q/sub/00003/0000000000000001"));
        assert_eq!(sequence(b"q/00003/0000000000000012"), Some(12));
    }

    #[tokio::test]
    async fn priority_then_fifo_with_concurrent_producers() {
        let client = Client::memory();
        let q = PriorityQueue::new(&client, "pq").unwrap();
        let producers: Vec<_> = (0..3)
            .map(|p| {
                let q = q.clone();
                tokio::spawn(async move {
                    for i in 0..20_u16 {
                        q.enqueue(format!("{}-{p}-{i:02}", i % 3), i % 3)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for p in producers {
            p.await.unwrap();
        }
        assert_eq!(q.len().await.unwrap(), 60);
        let mut got = Vec::new();
        while let Some(v) = q.try_dequeue().await.unwrap() {
            got.push(String::from_utf8(v).unwrap());
        }
        assert_eq!(got.len(), 60);
        let priorities: Vec<_> = got.iter().map(|v| v[..1].to_string()).collect();
        assert!(priorities.windows(2).all(|w| w[0] <= w[1]), "{got:?}");
        for p in 0..3 {
            let mine: Vec<_> = got
                .iter()
                .filter(|v| v[2..].starts_with(&format!("{p}-")))
                .collect();
            for pr in 0..3 {
                let at: Vec<_> = mine
                    .iter()
                    .filter(|v| v.starts_with(&format!("{pr}-")))
                    .collect();
                assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
            }
        }
        let big = vec![0_u8; crate::MAX_VALUE_LEN + 1];
        assert!(q.enqueue(big, 1).await.unwrap_err().is_invalid_input());
    }
}

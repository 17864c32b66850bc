//! A distributed priority queue (Go's `recipe.PriorityQueue`): lower numbers first, FIFO
//! within a priority.

use std::fmt;

use tracing::Instrument;

use crate::client::Client;
use crate::error::Result;
use crate::names::{validate_name, validate_value};
use crate::store::{Compare, CompareOp, KeyValue, Range, SortTarget, Txn, TxnOp};
use crate::work_queue::{take_methods, Items};

/// A distributed priority queue: items with a lower priority number are dequeued first,
/// and items of one priority in the order they were enqueued.
///
/// Taking items works as for [`Queue`](crate::Queue) — each item goes to exactly one
/// consumer, never twice, and items do not vanish (no lease) — with items ordered by key
/// instead of create revision. An item claimed for a dequeue future that was dropped and
/// put back keeps its key, so its place among the items still there. If its level emptied
/// meanwhile, the level's numbering starts again at 0 (as Go's does), so items enqueued at
/// its level since then come before it; if they took its key, it goes under the first
/// free key after theirs.
///
/// # Key layout
///
/// Go's `recipe.NewPriorityQueue(client, NAME)` layout, so Go and Baton share one queue:
/// - items are `NAME/PPPPP/SSSSSSSSSSSSSSSS`: the priority and a sequence number per
///   priority, both zero-padded decimal, so key order is priority order, then enqueue order;
/// - the bookkeeping key `__NAME/PPPPP` (empty value, no lease) is rewritten by every
///   enqueue at that priority (and every put-back of an item there, see above). The sequence number of a new item is one more than the
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
                hub: client.hub().clone(),
                what: "priority queue",
                prefix: format!("{name}/"),
                order: SortTarget::Key,
                is_item: is_item_kv,
                hand_back: Default::default(),
                marks: Default::default(),
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
            // The last item at this level. Keys of a nested name (`LEVEL/jobs/…`) sort
            // after every item (a letter after a digit), so the newest keys are read until
            // an item comes: usually one key. Keys only: the sequence number is in the key,
            // and an item's value may be up to `MAX_VALUE_LEN`.
            let level_prefix = format!("{level}/");
            let mut limit = 1;
            let last = loop {
                let read = store
                    .range(
                        Range::prefix(level_prefix.clone())
                            .sort_by(SortTarget::Key, crate::store::SortOrder::Descending)
                            .with_limit(limit)
                            .keys_only(),
                    )
                    .await?;
                let found = read
                    .kvs
                    .iter()
                    .find(|kv| is_item_kv(self.items.prefix.as_bytes(), kv))
                    .and_then(|kv| sequence(&kv.key));
                if found.is_some() || !read.more {
                    break (read.header_revision, found);
                }
                limit = 0;
            };
            let next = match last.1 {
                None => 0,
                // Keys sort in numeric order only at a fixed width of 16 digits: a 17-digit
                // sequence number would sort before the older items (and u64 would wrap).
                Some(n) if n >= MAX_SEQUENCE => {
                    return Err(crate::Error::InvalidData {
                        key: format!("{level}/{n:016}"),
                        reason: format!(
                            "the last item at this priority has sequence number {n}; the next \
                             would not fit the 16 digits that keep items in order (keys \
                             under the queue were written by something other than a queue)"
                        ),
                    })
                }
                Some(n) => n + 1,
            };
            let key = format!("{level}/{next:016}");
            // The bookkeeping key orders producers; the key must be new, so that nothing
            // is ever overwritten (a nested name's key, a bookkeeping key written by hand).
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(bookkeeping.as_bytes(), CompareOp::Less, last.0 + 1),
                    Compare::create_revision(key.as_bytes(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(bookkeeping.as_bytes(), "", 0),
                    TxnOp::put(key.as_bytes(), value.clone(), 0),
                ]);
            if store.txn(txn).await?.succeeded {
                return Ok(());
            }
            // Another producer enqueued at this priority since our read: read again. Unless
            // the key we chose exists and is not the last item (keys written by something
            // other than a queue): then every retry would choose it again.
            let taken = store.range(Range::key(key.as_bytes()).keys_only()).await?;
            if taken
                .kvs
                .first()
                .is_some_and(|kv| kv.create_revision <= last.0)
            {
                return Err(crate::Error::InvalidData {
                    key,
                    reason: "the next item key at this priority already exists, though it \
                             is not the last item: keys under the queue were written by \
                             something other than a queue"
                        .into(),
                });
            }
        }
    }

    take_methods!("the first item (lowest priority number, then oldest)");
}

/// The largest sequence number an item key holds in its 16 digits.
const MAX_SEQUENCE: u64 = 9_999_999_999_999_999;

/// True if `kv` is an item under `prefix`: its key is (see [`is_item`]), and it has no lease
/// (as Go writes items; a lock's keys always have one).
fn is_item_kv(prefix: &[u8], kv: &KeyValue) -> bool {
    kv.lease == 0 && is_item(prefix, &kv.key)
}

/// True if `key` is an item under `prefix`: `PPPPP/` then a decimal sequence number of
/// [`ITEM_DIGITS`](crate::names::ITEM_DIGITS) digits or more (Go pads it to 16), and nothing
/// more (`PPPPP/jobs/7` is a key of a nested name; a `SharedValue` `NAME/00001/7` is no item).
fn is_item(prefix: &[u8], key: &[u8]) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    match rest.split_at_checked(5) {
        Some((priority, tail)) => {
            priority.iter().all(u8::is_ascii_digit)
                && tail.first() == Some(&b'/')
                && crate::names::is_item_suffix(&tail[1..])
                && sequence(tail).is_some()
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
        assert!(!is_item(b"q/", b"q/00003/jobs/0000000000000001"));
        assert!(!is_item(b"q/", b"q/00003/0000000000000001/x"));
        assert_eq!(sequence(b"q/00003/0000000000000012"), Some(12));
    }

    /// A consumer whose claim of the first item fails (another consumer took it) while a
    /// producer added an item of the same priority reads again: it takes that item, not a
    /// lower-priority candidate from its old read.
    #[tokio::test]
    async fn a_failed_claim_reads_again_in_priority_order() {
        use crate::store::slow::SlowWatches;
        use crate::store::{KeyRange, TxnOp};
        let store = std::sync::Arc::new(SlowWatches::new(
            "mem",
            std::time::Duration::ZERO,
            std::time::Duration::ZERO,
        ));
        let client = Client::from_arc(store.clone());
        let q = PriorityQueue::new(&client, "pq").unwrap();
        q.enqueue("p1-first", 1).await.unwrap();
        q.enqueue("p2", 2).await.unwrap();
        // Between our read and our claim: a producer adds a priority-1 item, and another
        // consumer takes the first one.
        *store.before_next_txn.lock().unwrap() = Some(Txn::new().and_then([
            TxnOp::put("pq/00001/0000000000000001", "p1-second", 0),
            TxnOp::Delete(KeyRange::key("pq/00001/0000000000000000")),
        ]));
        assert_eq!(
            q.try_dequeue().await.unwrap().as_deref(),
            Some(&b"p1-second"[..])
        );
        assert!(store.before_next_txn.lock().unwrap().is_none());
        assert_eq!(q.try_dequeue().await.unwrap().as_deref(), Some(&b"p2"[..]));
    }

    /// Keys of a nested name under a priority level (`pq/00003/jobs/…`, a queue of its
    /// own) are neither items nor a sequence to continue: enqueues at that level neither
    /// overwrite one another nor take the nested queue's items.
    #[tokio::test]
    async fn a_nested_name_under_a_level_is_left_alone() {
        let client = Client::memory();
        let nested = crate::Queue::new(&client, "pq/00003/jobs").unwrap();
        nested.enqueue("nested-item").await.unwrap();
        let q = PriorityQueue::new(&client, "pq").unwrap();
        q.enqueue("a", 3).await.unwrap();
        q.enqueue("b", 3).await.unwrap();
        assert_eq!(q.len().await.unwrap(), 2);
        let mut got = Vec::new();
        while let Some(v) = q.try_dequeue().await.unwrap() {
            got.push(String::from_utf8(v).unwrap());
        }
        assert_eq!(got, ["a", "b"]);
        assert_eq!(
            nested.try_dequeue().await.unwrap().as_deref(),
            Some(&b"nested-item"[..])
        );
    }

    /// An item key written by hand with the largest sequence number (or one past what 16
    /// digits hold) makes the next enqueue at its level fail with `InvalidData`: no panic,
    /// and no item that wraps around to sort before it. Other levels still work.
    #[tokio::test]
    async fn a_sequence_at_its_limit_refuses_the_next_enqueue() {
        for last in ["18446744073709551615", "9999999999999999"] {
            let client = Client::memory();
            let key = format!("pq/00001/{last}");
            client.store().put(key.as_bytes(), b"x", 0).await.unwrap();
            let q = PriorityQueue::new(&client, "pq").unwrap();
            let err = q.enqueue("next", 1).await.unwrap_err();
            assert!(
                matches!(&err, crate::Error::InvalidData { reason, .. } if reason.contains("16 digits")),
                "{last}: {err}"
            );
            assert_eq!(q.len().await.unwrap(), 1, "{last}");
            q.enqueue("elsewhere", 2).await.unwrap();
            assert_eq!(q.try_dequeue().await.unwrap().as_deref(), Some(&b"x"[..]));
            assert_eq!(
                q.try_dequeue().await.unwrap().as_deref(),
                Some(&b"elsewhere"[..])
            );
        }
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

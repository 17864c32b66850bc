//! `baton status [PREFIX]`: the locks, elections, semaphores, barriers, read-write locks
//! and queues under a prefix.
//!
//! A lock or election named `NAME` is the set of keys `NAME/<lease id in hex>` bound to that
//! lease (the layout of Baton, Go's `concurrency` package, `etcdctl lock` and `etcdctl
//! elect`). Other keys are ignored. The holder (or leader) is the key created first; its
//! create revision is the fencing token; the others wait in create-revision order.
//!
//! A semaphore has the same keys, each valued `COUNT/PERMITS` (see [`baton::Semaphore`]):
//! when every key of a name says so, with one PERMITS, it is shown as a semaphore, whose
//! holders are the keys the semaphore grants (in create order, while their counts add up
//! to at most PERMITS) and whose waiters are the rest. A double barrier (`baton barrier`,
//! [`baton::DoubleBarrier`]) named `NAME` has its participants' keys, valued with their
//! count (or empty, Go's), under `NAME/waiters/`: when the counts are one count and, unless
//! a round is open (`NAME/ready`), the keys are no more than it, they are shown as one
//! barrier `NAME`, the participants of its open round (all of them if none is open) as
//! holders, later arrivals as waiters.
//! A read-write lock ([`baton::RwLock`], Go's `recipe.RWMutex`) named `NAME` has keys under
//! `NAME/read/` and `NAME/write/`: shown as one entry `NAME`, whose holders are the writer
//! that queued first or else the readers that queued before the first writer. Go's recipes
//! end their keys in the creation time in decimal, not the lease: those are read too.
//! Semaphores, barriers and read-write locks may have several holders; their token is the
//! first holder's create revision.
//!
//! Work queues ([`baton::Queue`], Go's `recipe.NewQueue`) and priority queues
//! ([`baton::PriorityQueue`], Go's `recipe.NewPriorityQueue`) are listed apart, with their
//! item counts, told conservatively by their items' keys, which have no lease:
//! `NAME/<19 or more decimal digits>` is an item of the queue `NAME`, and
//! `NAME/<5 digits>/<16 digits>` one of the priority queue `NAME` (see [`queues`]). Any
//! lease-less key of that shape counts, whoever wrote it (an application's
//! `users/<Snowflake ID>`), as `baton queue pop NAME` would take it.
//!
//! Values are never shown: an election's value is public, but a key that only looks like a
//! lock key may hold anything.
//!
//! The keys under the prefix are read without their values (a work queue's items, shared
//! values or an application's data may be large, and `baton status` reads the whole
//! keyspace by default); then, at that same revision, only the values that tell what the
//! keys are: those of keys bound to a lease, and of a barrier's `NAME/ready` (see
//! [`snapshot`]). So the answer is one consistent snapshot.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use baton::store::{KeyValue, Range, RangeResponse, Store, Txn, TxnOp, TxnOpResponse};
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;

use crate::cli::{self, Global};
use crate::exit::CliError;
use crate::output::{self, Output};

const EXAMPLES: &str = "\
Examples:
  baton status                 # every lock, election, semaphore, barrier, rwlock, queue
  baton status jobs/           # those whose names start with jobs/
  baton --json status | jq '.entries[] | select(.waiter_count > 0)'
  baton --json status | jq '.queues[] | select(.item_count > 100)'

Columns: NAME, KIND (lock: empty value; election: a value; semaphore: every value is
COUNT/PERMITS; barrier: keys NAME/waiters/<lease>; rwlock: keys NAME/read/<lease> and
NAME/write/<lease>), HOLDER (the key created first; for a semaphore every key granted a
permit, for a barrier every participant of the open round, for a read-write lock the
writer or the readers that hold it, comma-separated), TOKEN (the first holder's create
revision: the fencing token of the lock or the leader; for a semaphore, a barrier or
readers, which many hold at once, only the first key's create revision, which fences
nothing), TTL (the time left on the (first)
holder's lease), WAITERS (how many queue behind, and their keys). JSON has, per entry:
name, kind, holder, fencing_token, permits (semaphores only), holder_count, holders,
waiter_count, waiters; a name or key that is not UTF-8 comes as name_base64 or key_base64
(standard base64) instead. Control characters in names and keys are shown escaped (\\n,
\\x1b...) in the table; JSON gives them exactly.

The kind is guessed from the keys, which cannot always tell: an election whose values all
look like COUNT/PERMITS (\"1/2\") shows as a semaphore; a lock named NAME/waiters, or an
election named NAME/waiters whose values are all one number N with at most N candidates
(a barrier's participants say their count), as a barrier; and locks named NAME/read and
NAME/write as one read-write lock NAME. --kind says
what the names are instead. Keys of Go's recipes (RWMutex, DoubleBarrier), which end in
a decimal time instead of the lease, are shown too.

Work queues (baton queue, Go's recipe.NewQueue) and priority queues (Go's
recipe.NewPriorityQueue) follow in a second table, NAME, KIND (queue or priority_queue),
ITEMS (how many items wait), if there are any; in JSON as the array queues, each with name
(or name_base64), kind and item_count. They are told by their items' keys alone, which
have no lease, and only these: NAME/<19 or more decimal digits> is an item of the queue
NAME, NAME/<5 digits>/<16 digits> one of the priority queue NAME. That is any key
NAME/<19 or more decimal digits> without a lease, whoever wrote it: an application's
users/1541815603606036480 (a Snowflake ID) or logs/1700000000000000000 (a time in
nanoseconds) is listed as an item of the queue users or logs, because baton queue pop NAME
would take it. (baton queue pop also takes NAME/<16 to 18 digits>, which status does not
list.) Other keys (config/1, jobs/2024) are not listed, nor is an empty queue (it has no
keys). --kind does not apply to queues. Values are read only for keys bound to a lease
(and a barrier's NAME/ready): large queue items and other data under PREFIX are not
downloaded.

On redis:// and redlock://, the locks are the keys under PREFIX that are strings with an
expiry (Baton's, redsync's and redis-py's locks alike) and that a quorum of servers agree
on. Columns: NAME, KIND, KEY (relative to --namespace, as every name and key baton prints,
so the name; Redis's key is the namespace plus the name), TOKEN (the lock's fencing counter: the holder's token if the
holder is a Baton client, but for another library's lock only the last Baton grant's; - on
Redlock and where no Baton client ever took the lock), TTL (the time left on the key),
SERVERS (how many hold it). Keys that are not UTF-8 are not listed on Redis (Baton's lock
names are text; another library's binary key is skipped). JSON has, per entry on Redis:
name, kind, key, fencing_token, ttl_ms, servers, waiter_count (no holder or holders object:
a Redis lock's key is its holder's, and its value a token, not a lease); waiter_count counts
the live waiters in Baton's FIFO queue (single instance only; waiters that do not queue
leave no trace in Redis). Keys are listed with SCAN, which never blocks the server. --kind
does not apply there (a name's kind is known): it is refused.";

/// `baton status`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// Show only names starting with PREFIX (default: all); a PREFIX inside a name's keys
    /// (NAME/KEY) shows that name whole.
    #[arg(default_value = "")]
    pub(crate) prefix: String,

    /// What the names under PREFIX are, when the keys cannot tell (see below): auto
    /// (guess from the keys), lock, election, semaphore, barrier or rwlock.
    #[arg(long, value_enum, default_value_t = Kind::Auto)]
    pub(crate) kind: Kind,
}

/// `--kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// Guess from the keys' layout and values.
    Auto,
    /// Locks: the first key holds, the rest wait.
    Lock,
    /// Elections: the first key leads, the rest wait.
    Election,
    /// Semaphores: values COUNT/PERMITS; keys hold while their counts fit.
    Semaphore,
    /// Double barriers: keys NAME/waiters/<lease>.
    Barrier,
    /// Read-write locks: keys NAME/read/<lease> and NAME/write/<lease>.
    Rwlock,
}

/// One key of a lock or election queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Member {
    key: String,
    lease: String,
    create_revision: i64,
    /// The time left on the lease, in whole seconds; `None` if it has just ended.
    ttl_secs: Option<u64>,
    #[serde(skip)]
    lease_id: i64,
    /// The key as stored: JSON gives it as `key_base64` if it is not UTF-8.
    #[serde(skip)]
    key_bytes: Vec<u8>,
}

/// One lock, election, semaphore or barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Entry {
    name: String,
    /// The name as stored: JSON gives it as `name_base64` if it is not UTF-8.
    #[serde(skip)]
    name_bytes: Vec<u8>,
    kind: &'static str,
    /// The holder, the leader, or the first of the holders (semaphore, barrier).
    holder: Member,
    /// The (first) holder's create revision: the fencing token of its grant.
    fencing_token: i64,
    /// A semaphore's permits.
    #[serde(skip_serializing_if = "Option::is_none")]
    permits: Option<u32>,
    holder_count: usize,
    /// Every holder, in create order: one for a lock or election.
    holders: Vec<Member>,
    waiter_count: usize,
    waiters: Vec<Member>,
}

/// One work queue or priority queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct QueueEntry {
    name: String,
    /// The name as stored: JSON gives it as `name_base64` if it is not UTF-8.
    #[serde(skip)]
    name_bytes: Vec<u8>,
    /// `queue` ([`baton::Queue`]) or `priority_queue` ([`baton::PriorityQueue`]).
    kind: &'static str,
    item_count: usize,
}

/// Everything under the prefix.
#[derive(Debug, Serialize)]
struct Status {
    prefix: String,
    revision: i64,
    entries: Vec<Entry>,
    queues: Vec<QueueEntry>,
}

/// Run `baton status`.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    let out = Output::new(global.json);
    if cli::is_redis(&global.endpoints) {
        if args.kind != Kind::Auto {
            // Told before connecting: bad input never waits for the network.
            return Err(CliError::failed(
                "invalid argument: --kind applies to etcd only: on redis:// and redlock:// \
                 a name's kind (lock or election) is known from its keys",
            ));
        }
        return redis_status(global, &out, args.prefix).await;
    }
    let client = cli::connect(global, &global.endpoints).await?;
    let store = client.store();
    let prefix = args.prefix.as_bytes();
    let mut resp = snapshot(store.as_ref(), prefix).await?;
    let mut entries = group_as(&resp.kvs, args.kind);
    let mut queues = queues(&resp.kvs);
    // A PREFIX that cuts into a name's keys (`lk/<lease>`, a waiter pasting its own key;
    // `cfg/write`; one item of a queue) read only some of them: its holder and waiters
    // would be told from a part of its queue (a waiter shown as the holder), a queue's items
    // counted in part. Such a name is read whole (`NAME/`, which PREFIX starts with) and
    // shown, with the names whose keys all lie under PREFIX.
    let cut: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| &e.name_bytes)
        .chain(queues.iter().map(|q| &q.name_bytes))
        .filter(|name| !whole_under(name, prefix))
        .cloned()
        .collect();
    if let Some(shortest) = cut.iter().min_by_key(|n| n.len()) {
        let mut wider = shortest.clone();
        wider.push(b'/');
        resp = snapshot(store.as_ref(), &wider).await?;
        let shown = |name: &Vec<u8>| whole_under(name, prefix) || cut.contains(name);
        entries = group_as(&resp.kvs, args.kind);
        entries.retain(|e| shown(&e.name_bytes));
        queues = self::queues(&resp.kvs);
        queues.retain(|q| shown(&q.name_bytes));
    }

    let mut leases: Vec<i64> = entries
        .iter()
        .flat_map(|e| e.holders.iter().chain(&e.waiters))
        .map(|m| m.lease_id)
        .collect();
    leases.sort_unstable();
    leases.dedup();
    // etcd has no batched lease lookup: one request per lease, a bounded number at once
    // (thousands of sessions must not become thousands of requests in flight).
    let ttls: Vec<_> = futures::stream::iter(leases.iter().map(|&id| store.lease_time_to_live(id)))
        .buffered(LEASE_LOOKUPS_IN_FLIGHT)
        .collect()
        .await;
    let mut ttl_of: HashMap<i64, Option<Duration>> = HashMap::new();
    for (id, ttl) in leases.into_iter().zip(ttls) {
        ttl_of.insert(id, ttl.map_err(CliError::failed)?);
    }
    for entry in &mut entries {
        for m in std::iter::once(&mut entry.holder)
            .chain(entry.holders.iter_mut())
            .chain(entry.waiters.iter_mut())
        {
            m.ttl_secs = ttl_of
                .get(&m.lease_id)
                .copied()
                .flatten()
                .map(|d| d.as_secs());
        }
    }

    let status = Status {
        prefix: args.prefix,
        revision: resp.header_revision,
        entries,
        queues,
    };
    let printed = if out.is_json() {
        status_json(&status).and_then(|json| out.json_line(&json))
    } else {
        out.text(&table(&status))
    };
    printed.map_err(|e| output::not_written(None, &e))?;
    Ok(0)
}

/// How many leases' time to live `baton status` asks for at once.
const LEASE_LOOKUPS_IN_FLIGHT: usize = 32;

/// How many values one of [`snapshot`]'s batches reads at once when etcd takes fewer
/// operations per transaction than the batch has.
const VALUE_READS_IN_FLIGHT: usize = 16;

/// How many of [`snapshot`]'s batches of values are read at once.
const VALUE_BATCHES_IN_FLIGHT: usize = 4;

/// The most key bytes in one of [`snapshot`]'s batches (besides at most
/// [`baton::MAX_TXN_KEYS`] keys): well under etcd's default request limit (1.5 MiB, plus
/// 512 KiB for gRPC), so a batch of long keys is not refused. A longer key goes alone.
const VALUE_BATCH_KEY_BYTES: usize = 512 * 1024;

/// The keys under `prefix`, with the values of only the keys that need them ([`needs_value`];
/// the others' values are left empty), all as of one revision (the response's
/// `header_revision`).
///
/// The keys come from one keys-only read; the values are read at its revision, in
/// read-only transactions of up to [`baton::MAX_TXN_KEYS`] gets each (etcd's default
/// `--max-txn-ops`), [`VALUE_BATCHES_IN_FLIGHT`] at once: 5,000 lock keys cost 41 requests,
/// not 5,001. If that revision is compacted meanwhile, everything is read again once, from
/// scratch; a second compaction fails with a clear error.
async fn snapshot(store: &dyn Store, prefix: &[u8]) -> Result<RangeResponse, CliError> {
    if let Some(resp) = snapshot_once(store, prefix).await? {
        return Ok(resp);
    }
    match snapshot_once(store, prefix).await? {
        Some(resp) => Ok(resp),
        None => Err(CliError::failed(format!(
            "the store was compacted past the revision of the keys under {:?} while their \
             values were read, twice; try again",
            String::from_utf8_lossy(prefix)
        ))),
    }
}

/// One try of [`snapshot`]: `None` if the revision of the keys was compacted before every
/// value needed was read at it.
async fn snapshot_once(
    store: &dyn Store,
    prefix: &[u8],
) -> Result<Option<RangeResponse>, CliError> {
    let mut resp = store
        .range(Range::prefix(prefix.to_vec()).keys_only())
        .await
        .map_err(CliError::failed)?;
    let revision = resp.header_revision;
    let wanted: Vec<usize> = (0..resp.kvs.len())
        .filter(|&i| needs_value(&resp.kvs[i]))
        .collect();
    let batches = batches(&wanted, |i| resp.kvs[i].key.len());
    let read = futures::stream::iter(batches.iter().map(|batch| {
        let keys: Vec<Vec<u8>> = batch.iter().map(|&i| resp.kvs[i].key.clone()).collect();
        read_at(store, keys, revision)
    }))
    .buffered(VALUE_BATCHES_IN_FLIGHT)
    .try_collect::<Vec<Vec<Option<KeyValue>>>>()
    .await;
    let values = match read {
        Ok(values) => values,
        Err(baton::Error::Compacted { .. }) => return Ok(None),
        Err(e) => return Err(CliError::failed(e)),
    };
    for (batch, values) in batches.iter().zip(values) {
        for (&i, read) in batch.iter().zip(values) {
            let kv = &mut resp.kvs[i];
            match read {
                Some(read) if read.mod_revision == kv.mod_revision => kv.value = read.value,
                // Cannot be at one revision; never guess a kind from a value that is not
                // there.
                _ => {
                    return Err(CliError::failed(format!(
                        "key {:?} was not found as of revision {revision}, where it was listed",
                        kv.key_str()
                    )))
                }
            }
        }
    }
    Ok(Some(resp))
}

/// The keys `keys` as of `revision`, in order (`None`: not there), read in one read-only
/// transaction; or, from an etcd that refuses that many operations in one transaction
/// (`--max-txn-ops` below [`baton::MAX_TXN_KEYS`]), with one read each.
async fn read_at(
    store: &dyn Store,
    keys: Vec<Vec<u8>>,
    revision: i64,
) -> baton::Result<Vec<Option<KeyValue>>> {
    let gets = keys
        .iter()
        .map(|key| TxnOp::get(Range::key(key.clone()).at_revision(revision)));
    match store.txn(Txn::new().and_then(gets)).await {
        Ok(reply) if reply.responses.len() == keys.len() => Ok(reply
            .responses
            .into_iter()
            .map(|value| match value {
                TxnOpResponse::Get(got) => got.kvs.into_iter().next(),
                _ => None,
            })
            .collect()),
        Ok(reply) => Err(baton::Error::Store(format!(
            "the store answered {} of {} reads in one transaction",
            reply.responses.len(),
            keys.len()
        ))),
        Err(e) if keys.len() > 1 && e.to_string().contains("too many operations") => {
            futures::stream::iter(keys.into_iter().map(|key| async move {
                let read = store.range(Range::key(key).at_revision(revision)).await?;
                Ok::<_, baton::Error>(read.kvs.into_iter().next())
            }))
            .buffered(VALUE_READS_IN_FLIGHT)
            .try_collect()
            .await
        }
        Err(e) => Err(e),
    }
}

/// `items` split, in order, into batches of at most [`baton::MAX_TXN_KEYS`] items and (unless
/// one item alone is longer) at most [`VALUE_BATCH_KEY_BYTES`] of `len`.
fn batches(items: &[usize], len: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0;
    for &item in items {
        let n = len(item);
        match batches.last_mut() {
            Some(batch)
                if batch.len() < baton::MAX_TXN_KEYS && bytes + n <= VALUE_BATCH_KEY_BYTES =>
            {
                batch.push(item);
                bytes += n;
            }
            _ => {
                batches.push(vec![item]);
                bytes = n;
            }
        }
    }
    batches
}

/// True if the kind of a key (and so of its name) depends on its value: a key bound to a
/// lease (a lock, election, semaphore, barrier or read-write lock key), or a barrier's
/// `NAME/ready` (the open round). Queue items and other lease-less keys are told by their
/// keys alone.
fn needs_value(kv: &KeyValue) -> bool {
    kv.lease != 0 || kv.key.ends_with(BARRIER_READY.as_bytes())
}

/// `status` as JSON, each name and key that is not UTF-8 given as `name_base64` or
/// `key_base64` (standard base64) in its place, as every --json output gives bytes.
fn status_json(status: &Status) -> std::io::Result<serde_json::Value> {
    use serde_json::Value;
    let mut json = serde_json::to_value(status)?;
    let with_key = |json: &mut Value, member: &Member| {
        *json = output::with_bytes(std::mem::take(json), "key", &member.key_bytes);
    };
    if let Some(entries) = json.get_mut("entries").and_then(Value::as_array_mut) {
        for (json, entry) in entries.iter_mut().zip(&status.entries) {
            if let Some(holder) = json.get_mut("holder") {
                with_key(holder, &entry.holder);
            }
            for (field, members) in [("holders", &entry.holders), ("waiters", &entry.waiters)] {
                if let Some(list) = json.get_mut(field).and_then(Value::as_array_mut) {
                    for (json, member) in list.iter_mut().zip(members) {
                        with_key(json, member);
                    }
                }
            }
            *json = output::with_bytes(std::mem::take(json), "name", &entry.name_bytes);
        }
    }
    if let Some(queues) = json.get_mut("queues").and_then(Value::as_array_mut) {
        for (json, queue) in queues.iter_mut().zip(&status.queues) {
            *json = output::with_bytes(std::mem::take(json), "name", &queue.name_bytes);
        }
    }
    Ok(json)
}

/// The work queues and priority queues that have items among `kvs`, by name, with their
/// item counts. Only keys of these exact shapes, with no lease, are items (an
/// application's `config/1` or `jobs/2024` is not):
/// - `NAME/<19 or more decimal digits>`: an item of the queue `NAME` ([`baton::Queue`],
///   Go's `recipe.NewQueue`, whose keys end in the enqueue time in nanoseconds);
/// - `NAME/<5 digits>/<16 digits>`: an item of the priority queue `NAME`
///   ([`baton::PriorityQueue`], Go's `recipe.NewPriorityQueue`: the priority, then the
///   sequence number). Its bookkeeping keys `__NAME/<5 digits>` are not counted.
///
/// An empty queue has no keys, and is not listed.
pub(crate) fn queues(kvs: &[KeyValue]) -> Vec<QueueEntry> {
    let mut counts: BTreeMap<(Vec<u8>, &'static str), usize> = BTreeMap::new();
    for kv in kvs.iter().filter(|kv| kv.lease == 0) {
        if let Some((name, kind)) = queue_of(&kv.key) {
            *counts.entry((name.to_vec(), kind)).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|((name, kind), item_count)| QueueEntry {
            name: String::from_utf8_lossy(&name).into_owned(),
            name_bytes: name,
            kind,
            item_count,
        })
        .collect()
}

/// The queue whose item `key` is, and its kind, if the key has an item's shape (see
/// [`queues`]).
fn queue_of(key: &[u8]) -> Option<(&[u8], &'static str)> {
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let (parent, last) = split_last(key)?;
    if last.len() >= QUEUE_ITEM_DIGITS && digits(last) {
        return Some((parent, "queue")).filter(|(name, _)| !name.is_empty());
    }
    let (name, priority) = split_last(parent)?;
    let priority_item = last.len() == PRIORITY_SEQUENCE_DIGITS
        && digits(last)
        && priority.len() == PRIORITY_DIGITS
        && digits(priority)
        && !name.is_empty();
    priority_item.then_some((name, "priority_queue"))
}

/// `key` split at its last `/`: what comes before it, and after it.
fn split_last(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let slash = key.iter().rposition(|&b| b == b'/')?;
    Some((&key[..slash], &key[slash + 1..]))
}

/// The fewest digits that end a work queue's item key: Baton pads the enqueue time in
/// nanoseconds to 19, which Go's has from 2001 to 2262. (A priority queue's items end in
/// 16.)
const QUEUE_ITEM_DIGITS: usize = 19;

/// A priority queue's item key: `NAME/<priority, 5 digits>/<sequence, 16 digits>`.
const PRIORITY_DIGITS: usize = 5;
const PRIORITY_SEQUENCE_DIGITS: usize = 16;

/// Group lock, election, semaphore and barrier keys by name, in create-revision order,
/// guessing each name's kind.
#[cfg(test)]
pub(crate) fn group(kvs: &[KeyValue]) -> Vec<Entry> {
    group_as(kvs, Kind::Auto)
}

/// Group keys by name, in create-revision order, as names of `kind`.
pub(crate) fn group_as(kvs: &[KeyValue], kind: Kind) -> Vec<Entry> {
    // Names are grouped as stored, bytes and all: two names that differ only in bytes
    // that are not UTF-8 are two names, though their text is the same.
    let mut by_name: BTreeMap<Vec<u8>, Vec<(&KeyValue, Member)>> = BTreeMap::new();
    // Open barrier rounds: NAME/ready (no lease), valued with the create revision of the
    // round's last participant.
    let mut ready: HashMap<Vec<u8>, i64> = HashMap::new();
    for kv in kvs {
        let key = kv.key.as_slice();
        if kv.lease == 0 {
            if let Some(name) = key.strip_suffix(BARRIER_READY.as_bytes()) {
                if let Some(last) = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|v| v.parse::<i64>().ok())
                {
                    ready.insert(name.to_vec(), last);
                }
            }
            continue;
        }
        let Some(slash) = key.iter().rposition(|&b| b == b'/') else {
            continue;
        };
        let (name, suffix) = (&key[..slash], &key[slash + 1..]);
        let lease = output::lease_hex(kv.lease);
        // Baton's keys and Go's Mutex and Election end in the lease in hex; Go's recipes
        // (RWMutex, DoubleBarrier) in the creation time in decimal nanoseconds, under
        // NAME/read/, NAME/write/ or NAME/waiters/. Other keys ending in a number (a service
        // registry's `nodes/3`) are not ours.
        let go_recipe = suffix.len() >= GO_TIME_DIGITS
            && suffix.iter().all(u8::is_ascii_digit)
            && [RWLOCK_READ, RWLOCK_WRITE, BARRIER_WAITERS]
                .iter()
                .any(|s| name.ends_with(s.as_bytes()));
        if name.is_empty() || (suffix != lease.as_bytes() && !go_recipe) {
            continue;
        }
        by_name.entry(name.to_vec()).or_default().push((
            kv,
            Member {
                key: kv.key_str().into_owned(),
                lease,
                create_revision: kv.create_revision,
                ttl_secs: None,
                lease_id: kv.lease,
                key_bytes: kv.key.clone(),
            },
        ));
    }
    // Read-write locks: NAME/read/… and NAME/write/… are one lock NAME.
    let mut rwlocks: BTreeMap<Vec<u8>, Vec<(&KeyValue, Member, bool)>> = BTreeMap::new();
    if matches!(kind, Kind::Auto | Kind::Rwlock) {
        let names: Vec<Vec<u8>> = by_name.keys().cloned().collect();
        for name in names {
            let (parent, write) = match (
                name.strip_suffix(RWLOCK_READ.as_bytes()),
                name.strip_suffix(RWLOCK_WRITE.as_bytes()),
            ) {
                (Some(p), _) => (p, false),
                (_, Some(p)) => (p, true),
                _ => continue,
            };
            if parent.is_empty() {
                continue;
            }
            let parent = parent.to_vec();
            let members = by_name.remove(&name).unwrap_or_default();
            let all_empty = members.iter().all(|(kv, _)| kv.value.is_empty());
            if !all_empty {
                // Not a read-write lock's keys (they are empty): shown as they were.
                by_name.insert(name, members);
                continue;
            }
            rwlocks
                .entry(parent)
                .or_default()
                .extend(members.into_iter().map(|(kv, m)| (kv, m, write)));
        }
    }
    let rw_entries = rwlocks.into_iter().filter_map(|(name, mut members)| {
        members.sort_by_key(|(kv, _, _)| kv.create_revision);
        // A writer holds if it queued first; else the readers that queued before the
        // first writer hold together (RwLock's rule, and Go's RWMutex's).
        let held = match members.first() {
            Some((_, _, true)) => 1,
            _ => members.iter().take_while(|(_, _, write)| !write).count(),
        };
        let mut members: Vec<(&KeyValue, Member)> =
            members.into_iter().map(|(kv, m, _)| (kv, m)).collect();
        let waiters = members.split_off(held);
        entry(name, "rwlock", None, members, waiters)
    });
    let mut entries: Vec<Entry> = by_name
        .into_iter()
        .filter_map(|(name, mut members)| {
            members.sort_by_key(|(kv, _)| kv.create_revision);
            let guess = |k: Kind| kind == Kind::Auto || kind == k;
            let permits = match kind {
                Kind::Auto | Kind::Semaphore => semaphore_permits(&members),
                _ => None,
            };
            if let Some(permits) = permits {
                // Granted in create order while the counts fit, as the semaphore does.
                let mut used = 0_u64;
                let held = members
                    .iter()
                    .take_while(|(kv, _)| {
                        used += semaphore_value(&kv.value).map_or(u64::MAX, |(c, _)| c.into());
                        used <= u64::from(permits)
                    })
                    .count();
                let waiters = members.split_off(held);
                return entry(name, "semaphore", Some(permits), members, waiters);
            }
            if let Some(barrier) = name
                .strip_suffix(BARRIER_WAITERS.as_bytes())
                .filter(|_| guess(Kind::Barrier))
            {
                if !barrier.is_empty()
                    && barrier_keys(&members, ready.contains_key(barrier), kind == Kind::Auto)
                {
                    // An open round's participants are the keys created up to the last
                    // of them; later ones wait for the next round.
                    let round = ready.get(barrier).copied().unwrap_or(i64::MAX);
                    let inside = members
                        .iter()
                        .take_while(|(kv, _)| kv.create_revision <= round)
                        .count();
                    let waiters = members.split_off(inside);
                    return entry(barrier.to_vec(), "barrier", None, members, waiters);
                }
            }
            let kind = match kind {
                Kind::Lock => "lock",
                Kind::Election => "election",
                // Not of the kind asked for: shown as what its keys say.
                _ if members.first()?.0.value.is_empty() => "lock",
                _ => "election",
            };
            let waiters = members.split_off(1);
            entry(name, kind, None, members, waiters)
        })
        .chain(rw_entries)
        .collect();
    entries.sort_by(|a, b| a.name_bytes.cmp(&b.name_bytes));
    entries
}

/// True if `members` (keys under `NAME/waiters/`) can be a double barrier's participants:
/// each key empty (Go's) or saying a count. Guessing (`auto`), also: the counts they say
/// are one count (participants that disagree fail), and unless a round is `open`, they are
/// no more than it. So an election named `NAME/waiters` whose candidates publish numbers
/// is told apart, unless its values are one number at least as large as its candidates.
fn barrier_keys(members: &[(&KeyValue, Member)], open: bool, guessing: bool) -> bool {
    let mut count = None;
    for (kv, _) in members {
        if kv.value.is_empty() {
            continue;
        }
        let Some(says) = baton::DoubleBarrier::decode_value(&kv.value) else {
            return false;
        };
        if guessing && count.is_some_and(|c| c != says) {
            return false;
        }
        count = Some(says);
    }
    !guessing || open || count.is_none_or(|c| members.len() <= c as usize)
}

/// True if every key of the name `name` (`NAME/…`) lies under `prefix`.
fn whole_under(name: &[u8], prefix: &[u8]) -> bool {
    let mut keys = name.to_vec();
    keys.push(b'/');
    keys.starts_with(prefix)
}

/// The fewest digits of the creation time (in nanoseconds since 1970) that ends the keys of
/// Go's recipes.
const GO_TIME_DIGITS: usize = 16;

/// The suffixes of a read-write lock's readers' and writers' prefixes: `NAME/read/…`,
/// `NAME/write/…`.
const RWLOCK_READ: &str = "/read";
const RWLOCK_WRITE: &str = "/write";

/// The suffix of a double barrier's participants' prefix: `NAME/waiters/<lease>`.
const BARRIER_WAITERS: &str = "/waiters";

/// The key that opens a double barrier's round: `NAME/ready`.
const BARRIER_READY: &str = "/ready";

/// An entry of `holders` and `waiters` (in create order); `None` if no one holds.
fn entry(
    name: Vec<u8>,
    kind: &'static str,
    permits: Option<u32>,
    holders: Vec<(&KeyValue, Member)>,
    waiters: Vec<(&KeyValue, Member)>,
) -> Option<Entry> {
    let holders: Vec<Member> = holders.into_iter().map(|(_, m)| m).collect();
    let waiters: Vec<Member> = waiters.into_iter().map(|(_, m)| m).collect();
    let holder = holders.first()?.clone();
    Some(Entry {
        name: String::from_utf8_lossy(&name).into_owned(),
        name_bytes: name,
        kind,
        fencing_token: holder.create_revision,
        holder,
        permits,
        holder_count: holders.len(),
        holders,
        waiter_count: waiters.len(),
        waiters,
    })
}

/// A semaphore's permits, if every key of a name is a semaphore key (`COUNT/PERMITS`, one
/// PERMITS, 1 <= COUNT <= PERMITS).
fn semaphore_permits(members: &[(&KeyValue, Member)]) -> Option<u32> {
    let mut permits = None;
    for (kv, _) in members {
        let (count, p) = semaphore_value(&kv.value)?;
        if count == 0 || count > p || permits.is_some_and(|seen| seen != p) {
            return None;
        }
        permits = Some(p);
    }
    permits
}

/// A semaphore key's value, `COUNT/PERMITS` in ASCII decimal.
fn semaphore_value(value: &[u8]) -> Option<(u32, u32)> {
    baton::Semaphore::decode_value(value)
}

/// The human output: the locks' table (or a line saying there are none), then the queues'
/// table after a blank line if there are queues.
fn table(status: &Status) -> String {
    let locks = locks_table(status);
    if status.queues.is_empty() {
        return locks;
    }
    let rows: Vec<Vec<String>> = status
        .queues
        .iter()
        .map(|q| vec![q.name.clone(), q.kind.to_string(), q.item_count.to_string()])
        .collect();
    format!("{locks}\n\n{}", render(&["NAME", "KIND", "ITEMS"], &rows))
}

/// The table of locks, elections, semaphores, barriers and read-write locks.
fn locks_table(status: &Status) -> String {
    if status.entries.is_empty() {
        return if status.prefix.is_empty() {
            "no locks or elections".to_string()
        } else {
            format!("no locks or elections under {:?}", status.prefix)
        };
    }
    let rows: Vec<Vec<String>> = status
        .entries
        .iter()
        .map(|e| {
            let ttl = match e.holder.ttl_secs {
                Some(s) => output::duration(Duration::from_secs(s)),
                None => "expired".to_string(),
            };
            let waiters = if e.waiters.is_empty() {
                "0".to_string()
            } else {
                let keys: Vec<&str> = e.waiters.iter().map(|w| w.key.as_str()).collect();
                format!("{}: {}", e.waiter_count, keys.join(", "))
            };
            let holders: Vec<&str> = e.holders.iter().map(|h| h.key.as_str()).collect();
            vec![
                e.name.clone(),
                e.kind.to_string(),
                holders.join(","),
                e.fencing_token.to_string(),
                ttl,
                waiters,
            ]
        })
        .collect();
    render(
        &["NAME", "KIND", "HOLDER", "TOKEN", "TTL", "WAITERS"],
        &rows,
    )
}

/// Columns padded to their widest cell; the last column is not padded. Control characters
/// in cells (names and keys come from the store) are shown escaped: one line per entry.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|cell| output::escape_controls(cell).into_owned())
                .collect()
        })
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (cell, &w))| {
                    if i + 1 == row.len() {
                        cell.clone()
                    } else {
                        // By hand: a format width above u16::MAX panics (a name of 64 Ki
                        // characters).
                        let pad = w.saturating_sub(cell.chars().count());
                        format!("{cell}{}", " ".repeat(pad))
                    }
                })
                .collect();
            cells.join("  ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One lock or election on Redis.
#[derive(Debug, Serialize)]
struct RedisEntry {
    name: String,
    kind: &'static str,
    /// The key relative to the namespace (the name), as the holder's BATON_LOCK_KEY.
    key: String,
    /// The lock's fencing counter (the holder's token if the holder is a Baton client);
    /// `None` on Redlock and where no Baton client ever took the lock.
    fencing_token: Option<i64>,
    /// The time left before the key expires, in ms.
    ttl_ms: u64,
    /// How many servers hold it (at least the quorum).
    servers: usize,
    /// The live waiters in Baton's FIFO queue (single instance; 0 on Redlock).
    waiter_count: Option<usize>,
}

/// `baton status` on `redis://` and `redlock://`.
async fn redis_status(global: &Global, out: &Output, prefix: String) -> Result<u8, CliError> {
    let coordinator = cli::coordinator(global, baton::DEFAULT_TTL).await?;
    let Some(redis) = coordinator.redis() else {
        return Err(CliError::failed("not a Redis backend"));
    };
    let holds = redis.holds(&prefix).await;
    cli::close_coordinator(&coordinator).await;
    let entries: Vec<RedisEntry> = holds
        .map_err(CliError::failed)?
        .into_iter()
        .map(|h| RedisEntry {
            kind: if h.election { "election" } else { "lock" },
            // Relative to the namespace, as every key baton prints (and as on etcd): the
            // name, which is what the holder's BATON_LOCK_KEY says; `h.key` has the prefix.
            key: h.name.clone(),
            name: h.name,
            fencing_token: h.fencing_token,
            ttl_ms: u64::try_from(h.ttl.as_millis()).unwrap_or(u64::MAX),
            servers: h.servers,
            waiter_count: Some(h.waiters),
        })
        .collect();
    let printed = if out.is_json() {
        out.serialize_line(&serde_json::json!({
            "prefix": prefix,
            "backend": coordinator.backend(),
            "entries": entries,
            // Baton has no queues on Redis; the field is there so that one script (`jq
            // '.queues[]'`) reads every backend's status.
            "queues": [],
        }))
    } else if entries.is_empty() {
        out.text(&if prefix.is_empty() {
            "no locks or elections".to_string()
        } else {
            format!("no locks or elections under {prefix:?}")
        })
    } else {
        let rows: Vec<Vec<String>> = entries
            .iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    e.kind.to_string(),
                    e.key.clone(),
                    e.fencing_token
                        .map_or_else(|| "-".to_string(), |t| t.to_string()),
                    output::duration(Duration::from_millis(e.ttl_ms)),
                    e.servers.to_string(),
                ]
            })
            .collect();
        out.text(&render(
            &["NAME", "KIND", "KEY", "TOKEN", "TTL", "SERVERS"],
            &rows,
        ))
    };
    printed.map_err(|e| output::not_written(None, &e))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::SeqCst;

    fn kv(key: &str, value: &str, rev: i64, lease: i64) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease,
        }
    }

    #[test]
    fn groups_by_name_in_create_order() {
        let kvs = [
            kv("jobs/a/1b", "", 7, 0x1b),
            kv("jobs/a/2c", "", 5, 0x2c),
            kv("jobs/a/b/3d", "", 9, 0x3d),
            kv("jobs/a/4e", "", 8, 0x4e),
            kv("config/x", "secret", 3, 0),
            kv("config/5f", "secret", 4, 0x60),
            kv("sched/6a", "10.0.0.7", 2, 0x6a),
        ];
        let entries = group(&kvs);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["jobs/a", "jobs/a/b", "sched"]);
        let a = &entries[0];
        assert_eq!(a.kind, "lock");
        assert_eq!(a.holder.key, "jobs/a/2c");
        assert_eq!(a.fencing_token, 5);
        assert_eq!(a.waiter_count, 2);
        assert_eq!(a.waiters[0].key, "jobs/a/1b");
        assert_eq!(a.waiters[1].key, "jobs/a/4e");
        assert_eq!(entries[2].kind, "election");
    }

    /// A queue's put-back marker (`__NAME/returned/<lease>.marker`, a leased key while an
    /// item taken for a dropped dequeue is put back) is no lock.
    #[test]
    fn a_queue_put_back_marker_is_no_lock() {
        let kvs = [
            kv(
                "__jobs/returned/694d7a1b2c3d4e5f.marker",
                "",
                7,
                0x694d_7a1b_2c3d_4e5f,
            ),
            kv("jobs/a/2c", "", 8, 0x2c),
        ];
        let names: Vec<String> = group(&kvs).into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["jobs/a"]);
    }

    /// A queue claim's marker (`__NAME/claimed/<random>.marker`, leased) is no lock, and
    /// no queue item.
    #[test]
    fn a_queue_claim_marker_is_no_lock_nor_item() {
        let kvs = [
            kv(
                "__jobs/claimed/0123456789abcdef0123456789abcdef.marker",
                "jobs/1700000000000000000",
                7,
                0x694d_7a1b_2c3d_4e5f,
            ),
            kv("jobs/a/2c", "", 8, 0x2c),
        ];
        let names: Vec<String> = group(&kvs).into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["jobs/a"]);
        assert!(queues(&kvs).is_empty());
    }

    #[test]
    fn semaphores_show_granted_keys_as_holders() {
        let kvs = [
            kv("s/1a", "1/3", 4, 0x1a),
            kv("s/2b", "2/3", 5, 0x2b),
            kv("s/3c", "1/3", 6, 0x3c),
            kv("s/4d", "1/3", 7, 0x4d),
            // Another size: not one semaphore; shown as before.
            kv("m/5e", "1/2", 8, 0x5e),
            kv("m/6f", "1/3", 9, 0x6f),
        ];
        let entries = group(&kvs);
        let s = entries.iter().find(|e| e.name == "s").unwrap();
        assert_eq!(s.kind, "semaphore");
        assert_eq!(s.permits, Some(3));
        assert_eq!(s.fencing_token, 4);
        let keys = |ms: &[Member]| ms.iter().map(|m| m.key.clone()).collect::<Vec<_>>();
        // 1 + 2 permits are granted; the third key does not fit, and FIFO stops there.
        assert_eq!(keys(&s.holders), ["s/1a", "s/2b"]);
        assert_eq!(s.holder.key, "s/1a");
        assert_eq!(s.holder_count, 2);
        assert_eq!(keys(&s.waiters), ["s/3c", "s/4d"]);
        assert_eq!(s.waiter_count, 2);
        let m = entries.iter().find(|e| e.name == "m").unwrap();
        assert_eq!(m.kind, "election");
    }

    #[test]
    fn barriers_show_as_one_entry_per_name() {
        // Baton's participants write their count; Go's, nothing.
        let kvs = [
            kv("b/ready", "6", 7, 0),
            kv("b/waiters/1a", "2", 4, 0x1a),
            kv("b/waiters/2b", "", 6, 0x2b),
            kv("b/waiters/3c", "2", 8, 0x3c),
            kv("c/waiters/4d", "3", 9, 0x4d),
        ];
        let entries = group(&kvs);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        let b = &entries[0];
        assert_eq!(b.kind, "barrier");
        assert_eq!(b.fencing_token, 4);
        // The open round is the keys up to revision 6; the later one waits for the next.
        assert_eq!(b.holder_count, 2);
        assert_eq!(b.waiters[0].key, "b/waiters/3c");
        assert_eq!(entries[1].holder_count, 1);
        assert_eq!(entries[1].waiter_count, 0);
    }

    /// An election named `NAME/waiters` whose candidates publish numbers is no barrier:
    /// a barrier's participants all say one count (they fail otherwise), and are no more
    /// than that count unless a round is open.
    #[test]
    fn numbers_under_waiters_are_an_election_unless_they_say_one_count() {
        let kvs = [
            kv("pool/waiters/1a", "7", 4, 0x1a),
            kv("pool/waiters/2b", "12", 5, 0x2b),
        ];
        assert_eq!(group(&kvs)[0].kind, "election");
        // One number, but more candidates than it: an election too.
        let kvs = [
            kv("pool/waiters/1a", "2", 4, 0x1a),
            kv("pool/waiters/2b", "2", 5, 0x2b),
            kv("pool/waiters/3c", "2", 6, 0x3c),
        ];
        assert_eq!(group(&kvs)[0].kind, "election");
        // Participants that say one count (or none, Go's), at most that many: a barrier.
        let kvs = [
            kv("db/waiters/1a", "3", 4, 0x1a),
            kv("db/waiters/2b", "", 5, 0x2b),
            kv("db/waiters/3c", "3", 6, 0x3c),
        ];
        assert_eq!(group(&kvs)[0].kind, "barrier");
        // --kind election says what the keys cannot.
        let kvs = [kv("pool/waiters/1a", "2", 4, 0x1a)];
        assert_eq!(group(&kvs)[0].kind, "barrier");
        assert_eq!(group_as(&kvs, Kind::Election)[0].kind, "election");
    }

    /// NAME/read/… and NAME/write/… are one read-write lock, with Baton's keys (the lease in
    /// hex) or Go's (a decimal time): the readers before the first writer hold it together,
    /// or the writer alone if it queued first.
    #[test]
    fn read_write_locks_show_as_one_entry() {
        let kvs = [
            kv("rw/read/1a", "", 4, 0x1a),
            kv("rw/read/1796470887636158422", "", 5, 0x2b),
            kv("rw/write/3c", "", 6, 0x3c),
            kv("rw/read/4d", "", 7, 0x4d),
            kv("w/write/1796470887636158423", "", 8, 0x5e),
            kv("w/read/6f", "", 9, 0x6f),
            // A Go DoubleBarrier participant.
            kv("db/waiters/1796470887936093916", "", 10, 0x70),
            // Keys ending in a number that are not a recipe's: a service registry's.
            kv("nodes/3", "10.0.0.3", 11, 0x71),
            kv("nodes/1796470887936093917", "10.0.0.4", 12, 0x72),
            kv("rw/read/17", "", 13, 0x73),
        ];
        let entries = group(&kvs);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["db", "rw", "w"]);
        let keys = |ms: &[Member]| ms.iter().map(|m| m.key.clone()).collect::<Vec<_>>();
        let rw = &entries[1];
        assert_eq!(rw.kind, "rwlock");
        assert_eq!(
            keys(&rw.holders),
            ["rw/read/1a", "rw/read/1796470887636158422"]
        );
        assert_eq!(keys(&rw.waiters), ["rw/write/3c", "rw/read/4d"]);
        assert_eq!(rw.fencing_token, 4);
        let w = &entries[2];
        assert_eq!(keys(&w.holders), ["w/write/1796470887636158423"]);
        assert_eq!(keys(&w.waiters), ["w/read/6f"]);
        assert_eq!(entries[0].kind, "barrier");
        // --kind lock shows them as the locks their names say.
        let locks = group_as(&kvs[..4], Kind::Lock);
        let names: Vec<&str> = locks.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["rw/read", "rw/write"]);
    }

    /// What the keys cannot tell, --kind can: an election whose values look like a
    /// semaphore's, and a lock named NAME/waiters.
    #[test]
    fn kind_overrides_the_guess() {
        let kvs = [
            kv("shard/1a", "1/2", 4, 0x1a),
            kv("shard/2b", "2/2", 5, 0x2b),
            kv("deploy/waiters/3c", "", 6, 0x3c),
            kv("deploy/waiters/4d", "", 7, 0x4d),
        ];
        let guessed = group(&kvs);
        assert_eq!(guessed[1].kind, "semaphore", "the guess, as documented");
        assert_eq!(
            guessed[1].fencing_token, 4,
            "the token is kept all the same"
        );
        let election = group_as(&kvs[..2], Kind::Election);
        assert_eq!(election[0].kind, "election");
        assert_eq!(election[0].holder.key, "shard/1a");
        assert_eq!(election[0].fencing_token, 4);
        assert_eq!(election[0].waiter_count, 1);
        let lock = group_as(&kvs[2..], Kind::Lock);
        assert_eq!(lock[0].name, "deploy/waiters");
        assert_eq!(lock[0].kind, "lock");
        assert_eq!((lock[0].holder_count, lock[0].waiter_count), (1, 1));
        // A kind that does not fit the keys: shown as what they say.
        let as_semaphore = group_as(&kvs[2..], Kind::Semaphore);
        assert_eq!(as_semaphore[0].kind, "lock");
    }

    /// The embedded store, compacting past the revision of the next `compactions`
    /// keys-only reads right after each: as if etcd compacted between `baton status`'s
    /// read of the keys and its reads of their values.
    #[derive(Debug)]
    struct CompactingStore {
        inner: baton::store::mem::MemStore,
        compactions: std::sync::atomic::AtomicU32,
    }

    #[async_trait::async_trait]
    impl Store for CompactingStore {
        fn backend(&self) -> &'static str {
            "mem"
        }
        async fn range(&self, range: Range) -> baton::Result<RangeResponse> {
            let keys_only = range.keys_only;
            let resp = self.inner.range(range).await?;
            let left = &self.compactions;
            if keys_only
                && left
                    .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                let rev = self.inner.put(b"elsewhere", b"", 0).await?;
                self.inner.compact(rev).await?;
            }
            Ok(resp)
        }
        async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> baton::Result<i64> {
            self.inner.put(key, value, lease).await
        }
        async fn delete(&self, keys: baton::store::KeyRange) -> baton::Result<(i64, i64)> {
            self.inner.delete(keys).await
        }
        async fn txn(&self, txn: baton::store::Txn) -> baton::Result<baton::store::TxnResponse> {
            self.inner.txn(txn).await
        }
        async fn lease_grant(&self, ttl: Duration) -> baton::Result<baton::store::LeaseGrant> {
            self.inner.lease_grant(ttl).await
        }
        async fn lease_keep_alive(&self, id: i64) -> baton::Result<Option<Duration>> {
            self.inner.lease_keep_alive(id).await
        }
        async fn lease_revoke(&self, id: i64) -> baton::Result<()> {
            self.inner.lease_revoke(id).await
        }
        async fn lease_time_to_live(&self, id: i64) -> baton::Result<Option<Duration>> {
            self.inner.lease_time_to_live(id).await
        }
        async fn watch(
            &self,
            watch: baton::store::Watch,
        ) -> baton::Result<baton::store::WatchStream> {
            self.inner.watch(watch).await
        }
        async fn compact(&self, revision: i64) -> baton::Result<()> {
            self.inner.compact(revision).await
        }
    }

    /// The values status needs are read at the revision of its keys-only read; only those
    /// (lease-bound keys, NAME/ready); and if that revision is compacted meanwhile, all is
    /// read again once, then status fails saying so.
    #[tokio::test]
    async fn snapshot_reads_needed_values_at_one_revision_and_retries_a_compaction_once() {
        let store = CompactingStore {
            inner: baton::store::mem::MemStore::new(),
            compactions: 0.into(),
        };
        let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap().id;
        store.put(b"q/el/1a", b"10.0.0.7", lease).await.unwrap();
        store.put(b"q/b/ready", b"3", 0).await.unwrap();
        store.put(b"q/data", b"large", 0).await.unwrap();
        let values = |resp: &RangeResponse| -> Vec<(String, String)> {
            resp.kvs
                .iter()
                .map(|kv| {
                    (
                        kv.key_str().into_owned(),
                        String::from_utf8_lossy(&kv.value).into_owned(),
                    )
                })
                .collect()
        };
        let want = [
            ("q/b/ready".to_string(), "3".to_string()),
            ("q/data".to_string(), String::new()),
            ("q/el/1a".to_string(), "10.0.0.7".to_string()),
        ];

        let resp = snapshot(&store, b"q/").await.unwrap();
        assert_eq!(values(&resp), want);

        // Compacted once between the keys and their values: read again.
        store.compactions.store(1, SeqCst);
        let resp = snapshot(&store, b"q/").await.unwrap();
        assert_eq!(values(&resp), want);
        assert_eq!(store.compactions.load(SeqCst), 0);

        // Twice: a clear error, not a wrong answer.
        store.compactions.store(2, SeqCst);
        let err = snapshot(&store, b"q/").await.unwrap_err();
        assert!(
            err.message()
                .is_some_and(|m| m.contains("compacted") && m.contains("try again")),
            "{err:?}"
        );
    }

    /// Values are read in batches of at most MAX_TXN_KEYS keys and VALUE_BATCH_KEY_BYTES
    /// of keys, in order; a key longer than that goes alone.
    #[test]
    fn values_are_read_in_batches_that_etcd_takes() {
        let items: Vec<usize> = (0..300).collect();
        let sizes: Vec<usize> = batches(&items, |_| 10).iter().map(Vec::len).collect();
        assert_eq!(sizes, [128, 128, 44]);
        assert_eq!(batches(&items, |_| 10).concat(), items);
        assert!(batches(&[], |_| 10).is_empty());
        let big = VALUE_BATCH_KEY_BYTES / 2;
        let len = |i: usize| {
            if i == 1 {
                VALUE_BATCH_KEY_BYTES + 1
            } else {
                big
            }
        };
        assert_eq!(
            batches(&[0, 1, 2, 3, 4], len),
            [vec![0], vec![1], vec![2, 3], vec![4]]
        );
    }

    /// Lease-less keys of a queue item's exact shape are items; nothing else is.
    #[test]
    fn queues_are_told_by_their_item_keys() {
        let kvs = [
            // Baton's and Go's queue items: the time in nanoseconds, 19 digits or more.
            kv("jobs/1796470887636158422", "a", 3, 0),
            kv("jobs/0000000000000000005", "b", 4, 0),
            kv("jobs/sub/17964708876361584220", "c", 5, 0),
            // A priority queue's items, and its bookkeeping keys (not counted).
            kv("alerts/00005/0000000000000000", "x", 6, 0),
            kv("alerts/00005/0000000000000001", "y", 7, 0),
            kv("alerts/00000/0000000000000000", "z", 8, 0),
            kv("__alerts/00005", "", 9, 0),
            kv("__alerts/00000", "", 10, 0),
            // An application's keys ending in numbers.
            kv("config/1", "", 11, 0),
            kv("jobs/2024", "", 12, 0),
            kv("seq/0000000000000042", "", 13, 0),
            kv("seq/000000000000000042", "", 14, 0),
            kv("p/0005/0000000000000001", "", 15, 0),
            kv("p/000005/0000000000000001", "", 15, 0),
            kv("p/00005/000000000000001", "", 16, 0),
            kv("p/00005/00000000000000001", "", 17, 0),
            kv("/1796470887636158422", "", 18, 0),
            kv("1796470887636158422", "", 19, 0),
            kv("/00005/0000000000000001", "", 20, 0),
            // Bound to a lease: a lock's or a recipe's key, never an item.
            kv("held/1796470887636158422", "", 21, 0x1a),
            kv("held/00005/0000000000000001", "", 22, 0x1a),
        ];
        let queues = queues(&kvs);
        let found: Vec<(&str, &str, usize)> = queues
            .iter()
            .map(|q| (q.name.as_str(), q.kind, q.item_count))
            .collect();
        assert_eq!(
            found,
            [
                ("alerts", "priority_queue", 3),
                ("jobs", "queue", 2),
                ("jobs/sub", "queue", 1),
            ]
        );
    }

    /// A queue's name that is not UTF-8 comes as `name_base64` in JSON; the entries are
    /// unchanged.
    #[test]
    fn queue_names_that_are_not_utf8_come_as_base64() {
        let mut item = b"q\xff/".to_vec();
        item.extend_from_slice(b"1796470887636158422");
        let kvs = [
            KeyValue {
                key: item,
                value: Vec::new(),
                create_revision: 3,
                mod_revision: 3,
                version: 1,
                lease: 0,
            },
            kv("t/1796470887636158423", "", 4, 0),
        ];
        let status = Status {
            prefix: String::new(),
            revision: 4,
            entries: group(&kvs),
            queues: queues(&kvs),
        };
        let json = status_json(&status).unwrap();
        assert_eq!(json["entries"], serde_json::json!([]));
        assert_eq!(
            json["queues"],
            serde_json::json!([
                {"name_base64": "cf8=", "kind": "queue", "item_count": 1},
                {"name": "t", "kind": "queue", "item_count": 1},
            ])
        );
    }

    #[test]
    fn table_lines_up() {
        let mut entries = group(&[kv("l/1", "", 4, 1), kv("l/2", "", 6, 2)]);
        entries[0].holder.ttl_secs = Some(9);
        let text = table(&Status {
            prefix: String::new(),
            revision: 6,
            entries,
            queues: Vec::new(),
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("NAME  KIND  HOLDER  TOKEN  TTL  WAITERS"),
            "{text}"
        );
        assert!(
            lines[1].contains("l/1") && lines[1].contains("9s") && lines[1].contains("1: l/2"),
            "{text}"
        );
    }
}

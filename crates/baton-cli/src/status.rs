//! `baton status [PREFIX]`: the locks and elections under a prefix.
//!
//! A lock or election named `NAME` is the set of keys `NAME/<lease id in hex>` bound to that
//! lease (the layout of Baton, Go's `concurrency` package, `etcdctl lock` and `etcdctl
//! elect`). Other keys are ignored. The holder (or leader) is the key created first; its
//! create revision is the fencing token; the others wait in create-revision order.
//!
//! Values are never shown: an election's value is public, but a key that only looks like a
//! lock key may hold anything.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use baton::store::{KeyValue, Range};
use serde::Serialize;

use crate::cli::{self, Global};
use crate::exit::CliError;
use crate::output::{self, Output};

const EXAMPLES: &str = "\
Examples:
  baton status                 # every lock and election
  baton status jobs/           # those whose names start with jobs/
  baton --json status | jq '.entries[] | select(.waiter_count > 0)'

Columns: NAME, KIND (lock: empty value; election: a value; a semaphore's permits look like
an election's keys, which they share), HOLDER (the key created first),
TOKEN (its create revision, the fencing token), TTL (the time left on the holder's lease),
WAITERS (how many queue behind it, and their keys).

On redis:// and redlock://, the locks are the keys under PREFIX that are strings with an
expiry (Baton's, redsync's and redis-py's locks alike) and that a quorum of servers agree
on. Columns: NAME, KIND, KEY, TOKEN (the lock's fencing counter: the holder's token if the
holder is a Baton client, but for another library's lock only the last Baton grant's; - on
Redlock and where no Baton client ever took the lock), TTL (the time left on the key),
SERVERS (how many hold it). JSON's waiter_count counts the live waiters in Baton's FIFO
queue (single instance only; waiters that do not queue leave no trace in Redis). Keys are
listed with SCAN, which never blocks the server.";

/// `baton status`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// Show only names starting with PREFIX (default: all).
    #[arg(default_value = "")]
    pub(crate) prefix: String,
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
}

/// One lock or election.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Entry {
    name: String,
    kind: &'static str,
    holder: Member,
    fencing_token: i64,
    waiter_count: usize,
    waiters: Vec<Member>,
}

/// Everything under the prefix.
#[derive(Debug, Serialize)]
struct Status {
    prefix: String,
    revision: i64,
    entries: Vec<Entry>,
}

/// Run `baton status`.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    let out = Output::new(global.json);
    if cli::is_redis(&global.endpoints) {
        return redis_status(global, &out, args.prefix).await;
    }
    let client = cli::connect(global, &global.endpoints).await?;
    let store = client.store();
    let resp = store
        .range(Range::prefix(args.prefix.as_bytes().to_vec()))
        .await
        .map_err(CliError::failed)?;
    let mut entries = group(&resp.kvs);

    let mut leases: Vec<i64> = entries
        .iter()
        .flat_map(|e| std::iter::once(&e.holder).chain(&e.waiters))
        .map(|m| m.lease_id)
        .collect();
    leases.sort_unstable();
    leases.dedup();
    let ttls =
        futures::future::join_all(leases.iter().map(|&id| store.lease_time_to_live(id))).await;
    let mut ttl_of: HashMap<i64, Option<Duration>> = HashMap::new();
    for (id, ttl) in leases.into_iter().zip(ttls) {
        ttl_of.insert(id, ttl.map_err(CliError::failed)?);
    }
    for entry in &mut entries {
        for m in std::iter::once(&mut entry.holder).chain(entry.waiters.iter_mut()) {
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
    };
    let printed = if out.is_json() {
        out.serialize_line(&status)
    } else {
        out.text(&table(&status))
    };
    printed.map_err(|e| output::not_written(None, &e))?;
    Ok(0)
}

/// Group lock and election keys by name, in create-revision order.
pub(crate) fn group(kvs: &[KeyValue]) -> Vec<Entry> {
    let mut by_name: BTreeMap<String, Vec<(&KeyValue, Member)>> = BTreeMap::new();
    for kv in kvs {
        if kv.lease == 0 {
            continue;
        }
        let key = kv.key_str();
        let Some((name, suffix)) = key.rsplit_once('/') else {
            continue;
        };
        let lease = output::lease_hex(kv.lease);
        if name.is_empty() || suffix != lease {
            continue;
        }
        by_name.entry(name.to_string()).or_default().push((
            kv,
            Member {
                key: key.to_string(),
                lease,
                create_revision: kv.create_revision,
                ttl_secs: None,
                lease_id: kv.lease,
            },
        ));
    }
    by_name
        .into_iter()
        .filter_map(|(name, mut members)| {
            members.sort_by_key(|(kv, _)| kv.create_revision);
            let mut members = members.into_iter();
            let (head, holder) = members.next()?;
            let waiters: Vec<Member> = members.map(|(_, m)| m).collect();
            Some(Entry {
                name,
                kind: if head.value.is_empty() {
                    "lock"
                } else {
                    "election"
                },
                fencing_token: holder.create_revision,
                holder,
                waiter_count: waiters.len(),
                waiters,
            })
        })
        .collect()
}

/// The human table.
fn table(status: &Status) -> String {
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
            vec![
                e.name.clone(),
                e.kind.to_string(),
                e.holder.key.clone(),
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

/// Columns padded to their widest cell; the last column is not padded.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
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
                        format!("{cell:<w$}")
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
            name: h.name,
            key: h.key,
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

    #[test]
    fn table_lines_up() {
        let mut entries = group(&[kv("l/1", "", 4, 1), kv("l/2", "", 6, 2)]);
        entries[0].holder.ttl_secs = Some(9);
        let text = table(&Status {
            prefix: String::new(),
            revision: 6,
            entries,
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

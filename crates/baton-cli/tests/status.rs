//! `baton status` against real etcd: holder, token, TTL and waiters, as a table and as JSON.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::*;

#[test]
fn status_shows_holder_token_ttl_and_waiters() {
    let etcd = etcd();
    let ep = etcd.endpoint();

    let (out, _) = run(baton(&ep).args(["status"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "no locks or elections\n");

    let holder = Proc::spawn(baton(&ep).args(["lock", "st/job", "--ttl", "20s"]));
    let acquired = holder.line();
    let (key, token) = acquired
        .strip_prefix("acquired ")
        .unwrap()
        .split_once(" token=")
        .unwrap();
    let token: i64 = token.parse().unwrap();
    let _waiters: Vec<Proc> = (0..2)
        .map(|_| Proc::spawn(baton(&ep).args(["lock", "st/job", "--", "true"])))
        .collect();
    let leader = Proc::spawn(baton(&ep).args(["elect", "st/sched", "10.0.0.7:8080"]));
    assert!(leader.line().starts_with("elected st/sched/"));
    // A key that is not a lock key is ignored, and its value never shown.
    assert!(etcd
        .etcdctl(["put", "st/config", "hunter2"])
        .status
        .success());
    wait_until("two waiters", || keys(&etcd, "st/job/").len() == 3);
    let mut waiter_keys: Vec<String> = keys(&etcd, "st/job/")
        .into_iter()
        .filter(|k| k != key)
        .collect();
    waiter_keys.sort_by_key(|k| create_revision(&etcd, k));

    let (out, _) = run(baton(&ep).args(["status", "st/"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let table = stdout(&out);
    assert!(!table.contains("hunter2"), "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME"), "{table}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &row[..4],
        ["st/job", "lock", key, &token.to_string()],
        "{table}"
    );
    let ttl = humantime::parse_duration(row[4]).unwrap();
    assert!(ttl.as_secs() >= 15 && ttl.as_secs() <= 20, "{table}");
    assert!(
        lines[1].ends_with(&format!("2: {}, {}", waiter_keys[0], waiter_keys[1])),
        "{table}"
    );
    assert!(
        lines[2].starts_with("st/sched") && lines[2].contains("election"),
        "{table}"
    );

    let (out, _) = run(baton(&ep).args(["--json", "status", "st/"]));
    let status: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let job = &status["entries"][0];
    assert_eq!(job["name"], "st/job");
    assert_eq!(job["kind"], "lock");
    assert_eq!(job["holder"]["key"], key);
    assert_eq!(job["fencing_token"], token);
    let ttl = job["holder"]["ttl_secs"].as_u64().unwrap();
    assert!((15..=20).contains(&ttl), "{job}");
    assert_eq!(job["waiter_count"], 2);
    assert_eq!(job["waiters"][0]["key"], waiter_keys[0].as_str());
    assert_eq!(job["waiters"][1]["key"], waiter_keys[1].as_str());
    assert_eq!(status["entries"][1]["kind"], "election");
    assert!(!stdout(&out).contains("hunter2"));
}

/// The `--json` status entry named `name` under `prefix`.
fn entry(ep: &str, prefix: &str, name: &str) -> serde_json::Value {
    let (out, _) = run(baton(ep).args(["--json", "status", prefix]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let status: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let entries = status["entries"].as_array().unwrap();
    let found: Vec<&serde_json::Value> = entries.iter().filter(|e| e["name"] == name).collect();
    assert_eq!(found.len(), 1, "no single entry {name:?}: {status}");
    found[0].clone()
}

/// The keys of a status entry's `holders` or `waiters`.
fn member_keys(entry: &serde_json::Value, field: &str) -> Vec<String> {
    entry[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["key"].as_str().unwrap().to_string())
        .collect()
}

/// A semaphore shows as one: every key granted a permit is a holder (in queue order, as the
/// semaphore grants them), the rest wait; it has no fencing token.
#[test]
fn status_shows_semaphore_holders_and_waiters() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let sem = |name: &str, permits: &str| {
        Proc::spawn(baton(&ep).args(["sem", name, "--permits", permits, "--", "sleep", "30"]))
    };

    let _two: Vec<Proc> = (0..2).map(|_| sem("sm/two", "2")).collect();
    wait_until("two holders", || keys(&etcd, "sm/two/").len() == 2);
    let mut holders = keys(&etcd, "sm/two/");
    holders.sort_by_key(|k| create_revision(&etcd, k));
    let two = entry(&ep, "sm/", "sm/two");
    assert_eq!(two["kind"], "semaphore", "{two}");
    assert_eq!(two["permits"], 2, "{two}");
    assert_eq!(member_keys(&two, "holders"), holders, "{two}");
    assert_eq!(two["holder"]["key"], holders[0].as_str(), "{two}");
    assert_eq!(two["holder_count"], 2, "{two}");
    assert_eq!(two["waiter_count"], 0, "{two}");
    // The first permit's create revision, as the semaphore's grant reports it.
    assert_eq!(
        two["fencing_token"],
        create_revision(&etcd, &holders[0]),
        "{two}"
    );

    let mut three: Vec<Proc> = Vec::new();
    for n in 1..=3 {
        three.push(sem("sm/three", "3"));
        wait_until("the next holder", || keys(&etcd, "sm/three/").len() == n);
    }
    three.push(sem("sm/three", "3"));
    wait_until("a waiter", || keys(&etcd, "sm/three/").len() == 4);
    let mut all = keys(&etcd, "sm/three/");
    all.sort_by_key(|k| create_revision(&etcd, k));
    let e = entry(&ep, "sm/", "sm/three");
    assert_eq!(e["kind"], "semaphore", "{e}");
    assert_eq!(member_keys(&e, "holders"), all[..3], "{e}");
    assert_eq!(e["waiter_count"], 1, "{e}");
    assert_eq!(member_keys(&e, "waiters"), all[3..], "{e}");

    let (out, _) = run(baton(&ep).args(["status", "sm/"]));
    let table = stdout(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with("sm/three "))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "semaphore", "{table}");
    assert_eq!(cells[2], all[..3].join(","), "{table}");
    assert_eq!(
        cells[3],
        create_revision(&etcd, &all[0]).to_string(),
        "{table}"
    );
    assert!(row.ends_with(&format!("1: {}", all[3])), "{table}");
}

/// Participants of `baton barrier` show as a barrier named NAME, not as a lock named
/// NAME/waiters.
#[test]
fn status_shows_barrier_participants() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let _waiting: Vec<Proc> = (0..2)
        .map(|_| Proc::spawn(baton(&ep).args(["barrier", "bar/rier", "--count", "3"])))
        .collect();
    wait_until("two participants", || {
        keys(&etcd, "bar/rier/waiters/").len() == 2
    });
    let mut inside = keys(&etcd, "bar/rier/waiters/");
    inside.sort_by_key(|k| create_revision(&etcd, k));

    let (out, _) = run(baton(&ep).args(["--json", "status", "bar/"]));
    let status: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let entries = status["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{status}");
    let e = &entries[0];
    assert_eq!(e["name"], "bar/rier", "{e}");
    assert_eq!(e["kind"], "barrier", "{e}");
    assert_eq!(member_keys(e, "holders"), inside, "{e}");
    assert_eq!(e["waiter_count"], 0, "{e}");
    assert!(e["fencing_token"].is_i64(), "{e}");
}

/// `baton status --json` gives a name or key that is not UTF-8 as `name_base64` /
/// `key_base64` (standard base64), as every --json output does, not as a lossy string; and
/// names that differ only in such bytes stay two entries.
#[test]
fn status_json_keeps_names_that_are_not_utf8() {
    use base64::Engine as _;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let etcd = etcd();
    let ep = etcd.endpoint();
    // A lock key NAME/<lease hex> bound to its lease, as `etcdctl lock` makes it.
    let lock_key = |name: &[u8]| -> Vec<u8> {
        let granted = etcd.etcdctl(["lease", "grant", "60"]);
        let granted = String::from_utf8_lossy(&granted.stdout).to_string();
        let lease = granted.split_whitespace().nth(1).unwrap().to_string();
        // etcdctl prints the id zero-padded to 16 digits; keys have it as `%x`.
        let id = u64::from_str_radix(&lease, 16).unwrap();
        let mut key = name.to_vec();
        key.extend_from_slice(format!("/{id:x}").as_bytes());
        let out = etcd.etcdctl([
            OsStr::new("put"),
            OsStr::new(&format!("--lease={lease}")),
            OsStr::from_bytes(&key),
            OsStr::new(""),
        ]);
        assert!(out.status.success(), "{out:?}");
        key
    };
    let holder = lock_key(b"bin\xff");
    let waiter = lock_key(b"bin\xff");
    let other = lock_key(b"bin\xfe");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);

    let (out, _) = run(baton(&ep).args(["--json", "status", "bin"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{v}");
    let ff = entries
        .iter()
        .find(|e| e["name_base64"] == b64(b"bin\xff"))
        .unwrap_or_else(|| panic!("no entry bin\\xff: {v}"));
    assert!(ff.get("name").is_none(), "{ff}");
    assert_eq!(ff["holder"]["key_base64"], b64(&holder), "{ff}");
    assert!(ff["holder"].get("key").is_none(), "{ff}");
    assert_eq!(ff["holders"][0]["key_base64"], b64(&holder), "{ff}");
    assert_eq!(ff["waiter_count"], 1, "{ff}");
    assert_eq!(ff["waiters"][0]["key_base64"], b64(&waiter), "{ff}");
    let fe = entries
        .iter()
        .find(|e| e["name_base64"] == b64(b"bin\xfe"))
        .unwrap_or_else(|| panic!("no entry bin\\xfe: {v}"));
    assert_eq!(fe["holder"]["key_base64"], b64(&other), "{fe}");
    assert_eq!(fe["waiter_count"], 0, "{fe}");

    // Text stays text.
    let lock = Proc::spawn(baton(&ep).args(["lock", "bin-text"]));
    assert!(lock.line().starts_with("acquired bin-text/"));
    let (out, _) = run(baton(&ep).args(["--json", "status", "bin-"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["entries"][0];
    assert_eq!(e["name"], "bin-text", "{v}");
    assert!(
        e["holder"]["key"]
            .as_str()
            .unwrap()
            .starts_with("bin-text/"),
        "{v}"
    );
    assert!(e.get("name_base64").is_none(), "{v}");
}

/// Bytes etcd has sent to its gRPC clients so far.
fn sent_bytes(etcd: &EtcdServer) -> f64 {
    etcd.metric("etcd_network_client_grpc_sent_bytes_total")
        .expect("etcd_network_client_grpc_sent_bytes_total")
}

/// What `baton status ARGS` prints, and how many bytes etcd sent meanwhile.
fn status_and_bytes(etcd: &EtcdServer, args: &[&str]) -> (String, f64) {
    let before = sent_bytes(etcd);
    let (out, _) = run(baton(&etcd.endpoint()).arg("status").args(args));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    (stdout(&out), sent_bytes(etcd) - before)
}

/// `baton status` reads the keys without their values, then the values of the few keys
/// it needs (lease-bound ones, a barrier's NAME/ready): large values under the prefix (an
/// application's data, shared values) are not downloaded, and the answer is the same.
#[test]
fn status_does_not_download_values_it_does_not_need() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let holder = Proc::spawn(baton(&ep).args(["lock", "big/job", "--ttl", "30s"]));
    assert!(holder.line().starts_with("acquired big/job/"));
    let leader = Proc::spawn(baton(&ep).args(["elect", "big/sched", "10.0.0.7:8080"]));
    assert!(leader.line().starts_with("elected big/sched/"));
    let (lean, lean_bytes) = status_and_bytes(&etcd, &[]);
    let (lean_json, _) = status_and_bytes(&etcd, &["--json"]);

    // 8 values of 1 MiB, no lease: an application's data under the same prefix.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = baton::Client::connect(&ep).await.unwrap();
        let value = vec![b'x'; 1 << 20];
        for i in 0..8 {
            client
                .store()
                .put(format!("big/data/blob-{i}").as_bytes(), &value, 0)
                .await
                .unwrap();
        }
    });

    let (fat, fat_bytes) = status_and_bytes(&etcd, &[]);
    let (fat_json, _) = status_and_bytes(&etcd, &["--json"]);
    eprintln!("etcd sent {lean_bytes} bytes for status without the data, {fat_bytes} with 8 MiB");
    // The TTL column (the fifth) may tick down a second between the two reads.
    let strip = |s: &str| -> Vec<Vec<String>> {
        s.lines()
            .map(|l| {
                let mut cells: Vec<String> = l.split_whitespace().map(str::to_string).collect();
                cells.remove(4);
                cells
            })
            .collect()
    };
    assert_eq!(strip(&fat), strip(&lean), "{fat}");
    let entries = |s: &str| {
        let mut v: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
        for e in v["entries"].as_array_mut().unwrap() {
            e["holder"]["ttl_secs"] = serde_json::Value::Null;
            for m in e["holders"].as_array_mut().unwrap() {
                m["ttl_secs"] = serde_json::Value::Null;
            }
        }
        v["entries"].clone()
    };
    assert_eq!(entries(&fat_json), entries(&lean_json));
    assert!(
        fat_bytes < lean_bytes + 64.0 * 1024.0,
        "status downloaded the 8 MiB of values: {fat_bytes} bytes sent (without them: {lean_bytes})"
    );
}

/// The `queues` of `baton --json status PREFIX`, as (name, kind, item_count).
fn queues(ep: &str, prefix: &str) -> Vec<(String, String, u64)> {
    let (out, _) = run(baton(ep).args(["--json", "status", prefix]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let status: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    status["queues"]
        .as_array()
        .unwrap_or_else(|| panic!("no queues array: {status}"))
        .iter()
        .map(|q| {
            (
                q["name"].as_str().unwrap().to_string(),
                q["kind"].as_str().unwrap().to_string(),
                q["item_count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Work queues (`baton queue`, Go's recipe.NewQueue: NAME/<19+ digits>, no lease) and
/// priority queues (Go's recipe.NewPriorityQueue: NAME/<5 digits>/<16 digits>, no lease)
/// are listed with their item counts: in JSON as `queues`, in the table as a second table.
/// An application's lease-less keys ending in a number are not.
#[test]
fn status_lists_queues() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    for item in ["a", "b", "c"] {
        let (out, _) = run(baton(&ep).args(["queue", "push", "wq/jobs", item]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = baton::Client::connect(&ep).await.unwrap();
        let alerts = baton::PriorityQueue::new(&client, "wq/alerts").unwrap();
        alerts.enqueue("disk 80%", 5).await.unwrap();
        alerts.enqueue("disk 99%", 0).await.unwrap();
        alerts.enqueue("disk 85%", 5).await.unwrap();
    });
    // An application's keys: not queues, nor items of one.
    for key in ["wq/config/1", "wq/jobs/2024", "wq/builds/0000000000000042"] {
        assert!(etcd.etcdctl(["put", key, "x"]).status.success());
    }
    let holder = Proc::spawn(baton(&ep).args(["lock", "wq/deploy"]));
    assert!(holder.line().starts_with("acquired wq/deploy/"));

    let both = vec![
        ("wq/alerts".to_string(), "priority_queue".to_string(), 3),
        ("wq/jobs".to_string(), "queue".to_string(), 3),
    ];
    assert_eq!(queues(&ep, "wq/"), both);
    // The whole keyspace: the priority queue's bookkeeping keys (__wq/alerts/00005) are
    // no queue either.
    assert_eq!(queues(&ep, ""), both);
    assert_eq!(queues(&ep, "wq/j"), both[1..]);
    assert_eq!(queues(&ep, "wq/al"), both[..1]);
    assert_eq!(queues(&ep, "config"), []);
    // --kind is about the lock-like names; queues are listed all the same.
    let (out, _) = run(baton(&ep).args(["--json", "status", "--kind", "lock", "wq/"]));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["queues"].as_array().unwrap().len(), 2, "{v}");
    // The entries are as they were.
    let deploy = entry(&ep, "wq/", "wq/deploy");
    assert_eq!(deploy["kind"], "lock", "{deploy}");
    let (out, _) = run(baton(&ep).args(["--json", "status", "wq/"]));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["entries"].as_array().unwrap().len(), 1, "{v}");

    // Human: the locks' table, then the queues'.
    let (out, _) = run(baton(&ep).args(["status", "wq/"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert!(lines[0].starts_with("NAME"), "{text}");
    assert!(lines[1].starts_with("wq/deploy "), "{text}");
    assert_eq!(lines[2], "", "{text}");
    let cells = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(cells(lines[3]), ["NAME", "KIND", "ITEMS"], "{text}");
    assert_eq!(
        cells(lines[4]),
        ["wq/alerts", "priority_queue", "3"],
        "{text}"
    );
    assert_eq!(cells(lines[5]), ["wq/jobs", "queue", "3"], "{text}");
    // Queues only: the usual line for no locks, then the queues.
    let (out, _) = run(baton(&ep).args(["status", "wq/jobs"]));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(
        lines[0], "no locks or elections under \"wq/jobs\"",
        "{text}"
    );
    assert_eq!(lines[1], "", "{text}");
    assert_eq!(cells(lines[3]), ["wq/jobs", "queue", "3"], "{text}");
    // No queues: no second table.
    let (out, _) = run(baton(&ep).args(["status", "wq/d"]));
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));
}

/// Range and Txn requests etcd has answered so far.
fn reads(etcd: &EtcdServer) -> f64 {
    ["Range", "Txn"]
        .iter()
        .map(|method| {
            etcd.metric_sum(
                "grpc_server_handled_total",
                &[&format!("grpc_method=\"{method}\"")],
            )
            .expect("grpc_server_handled_total")
        })
        .sum()
}

/// Put `count` names `PREFIX<i>` (`i` as 3 digits), each one key `NAME/<lease>` valued
/// `value`, all bound to one new lease.
fn put_names(ep: &str, prefix: &str, count: usize, value: &[u8]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = baton::Client::connect(ep).await.unwrap();
        let store = client.store();
        let lease = store
            .lease_grant(std::time::Duration::from_secs(60))
            .await
            .unwrap()
            .id;
        for i in 0..count {
            let key = format!("{prefix}{i:03}/{lease:x}");
            store.put(key.as_bytes(), value, lease).await.unwrap();
        }
    });
}

/// `baton status` reads the values it needs in batches (up to 128 gets per read-only
/// transaction, at the revision of its keys-only read), not one request per key: 600
/// lease-bound lock keys cost a handful of requests, not 600, and are all listed.
#[test]
fn status_reads_values_in_batches() {
    const LOCKS: usize = 600;
    let etcd = etcd();
    let ep = etcd.endpoint();
    put_names(&ep, "many/l", LOCKS, b"");

    let before = reads(&etcd);
    let (out, _) = run(baton(&ep).args(["--json", "status", "many/"]));
    let requests = reads(&etcd) - before;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), LOCKS, "{v}");
    assert!(entries.iter().all(|e| e["kind"] == "lock"), "{v}");
    eprintln!("status of {LOCKS} lease-bound keys: {requests} Range/Txn requests");
    assert!(
        requests <= 10.0,
        "status of {LOCKS} lease-bound keys made {requests} Range/Txn requests"
    );
}

/// An application's lease-less key ending in 19 or more digits (a Snowflake ID, a time in
/// nanoseconds) has a queue item's shape: `baton status` lists it as one, as `baton queue
/// pop` would take it, and `status --help` says so plainly, not only that `config/1` and
/// `jobs/2024` are not listed.
#[test]
fn status_lists_snowflake_keys_as_queue_items_and_says_so() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    assert!(etcd
        .etcdctl(["put", "sf/users/1541815603606036480", "{\"name\":\"ann\"}"])
        .status
        .success());
    assert_eq!(
        queues(&ep, "sf/"),
        [("sf/users".to_string(), "queue".to_string(), 1)]
    );
    let (out, _) = run(baton(&ep).args(["queue", "pop", "--timeout", "1s", "sf/users"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "{\"name\":\"ann\"}\n");

    let (out, _) = run(baton(&ep).args(["status", "--help"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = stdout(&out)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for said in [
        "any key NAME/<19 or more decimal digits> without a lease",
        "users/1541815603606036480",
        "baton queue pop NAME would take it",
    ] {
        assert!(
            help.contains(said),
            "status --help does not say {said:?}:\n{help}"
        );
    }
    let (out, _) = run(baton(&ep).args(["queue", "--help"]));
    let help = stdout(&out)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        help.contains("every key NAME/<16 or more decimal digits> without a lease"),
        "queue --help:\n{help}"
    );
}

/// An etcd that takes fewer operations per transaction than `baton status`'s batches of
/// value reads (`--max-txn-ops 64`; the default is 128): status reads that batch one key at
/// a time instead of failing ("too many operations in txn request", found by review).
#[test]
fn status_works_with_a_lower_max_txn_ops() {
    const SEMAPHORES: usize = 100;
    let etcd = EtcdServer::start_with(baton_testkit::EtcdServerOptions::new().with_max_txn_ops(64));
    let ep = etcd.endpoint();
    put_names(&ep, "low/s", SEMAPHORES, b"1/3");
    let (out, _) = run(baton(&ep).args(["--json", "status", "low/"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), SEMAPHORES, "{v}");
    assert!(entries.iter().all(|e| e["kind"] == "semaphore"), "{v}");
}

/// A name of 64 Ki characters or more in the table: Rust's format width stops at
/// `u16::MAX`, and `baton status` panicked ("internal error (a bug)", found by review).
#[test]
fn status_prints_a_name_of_64_ki_characters() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let long = "n".repeat(70_000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = baton::Client::connect(&ep).await.unwrap();
        let key = format!("long/{long}/00000000000000000001");
        client
            .store()
            .put(key.as_bytes(), b"item", 0)
            .await
            .unwrap();
    });
    let (out, _) = run(baton(&ep).args(["status", "long/"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains(&long));
}

/// A cluster that lost its majority (two members of three killed, one up): `status` exits
/// 125 within the dial timeout, and its message does not leave the operator thinking every
/// member is down (the one up does not answer a read without a quorum).
#[test]
fn status_says_a_member_without_a_quorum_does_not_answer() {
    let mut cluster = baton_testkit::EtcdCluster::start(3);
    let ep = cluster.endpoints_url();
    cluster.kill(1);
    cluster.kill(2);
    let (out, took) = run(baton(&ep).args(["--dial-timeout", "2s", "status"]));
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no member answered"), "{stderr}");
    assert!(stderr.contains("no quorum"), "{stderr}");
    assert!(took < std::time::Duration::from_secs(8), "took {took:?}");
}

/// A PREFIX that cuts into a name's keys (a key of a lock, the writers of a read-write lock)
/// saw only part of its queue: before, a waiter was shown as the holder (`status
/// lk/<waiter's lease>`: HOLDER the waiter; `status cfg/write`: the waiting writer holding
/// rwlock cfg while readers hold). Such names are not shown; whole names still are.
#[test]
fn status_prefix_inside_a_names_keys_shows_no_false_holder() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let lease = || {
        let out = etcd.etcdctl(["lease", "grant", "60"]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    let put = |key: &str, l: &str| {
        assert!(etcd
            .etcdctl(["put", key, "", &format!("--lease={l}")])
            .status
            .success());
    };
    let (l1, l2) = (lease(), lease());
    put(&format!("lk/{l1}"), &l1);
    put(&format!("lk/{l2}"), &l2);
    let (r, w) = (lease(), lease());
    put(&format!("cfg/read/{r}"), &r);
    put(&format!("cfg/write/{w}"), &w);
    // A prefix inside a name's keys shows that name whole: its real holder first, the
    // waiter as a waiter.
    for (prefix, name, holder, waiter) in [
        (
            format!("lk/{l2}"),
            "lk",
            format!("lk/{l1}"),
            format!("lk/{l2}"),
        ),
        (
            "cfg/write".to_string(),
            "cfg",
            format!("cfg/read/{r}"),
            format!("cfg/write/{w}"),
        ),
        (
            "cfg/write/".to_string(),
            "cfg",
            format!("cfg/read/{r}"),
            format!("cfg/write/{w}"),
        ),
    ] {
        let (out, _) = run(baton(&ep).args(["--json", "status", &prefix]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        let entries = json["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 1, "status {prefix}: {json}");
        let e = &entries[0];
        assert_eq!(e["name"], name, "status {prefix}: {json}");
        assert_eq!(
            e["holder"]["key"],
            holder.as_str(),
            "status {prefix}: {json}"
        );
        assert_eq!(
            e["waiters"][0]["key"],
            waiter.as_str(),
            "status {prefix}: {json}"
        );
        assert_eq!(e["holder_count"], 1, "status {prefix}: {json}");
    }
    for (prefix, holder) in [
        ("lk/", format!("lk/{l1}")),
        ("cfg", format!("cfg/read/{r}")),
    ] {
        let (out, _) = run(baton(&ep).args(["status", prefix]));
        let text = stdout(&out);
        assert!(text.contains(&holder), "status {prefix}: {text}");
    }
}

/// A PREFIX that cuts into a queue's items (`NAME/00005` of a priority queue, one item's
/// key) counted only the items under it as the queue's (2 of 3): the queue is read whole
/// and shown with all its items, as a lock cut so is (found by the second look).
#[test]
fn status_prefix_cutting_into_a_queue_shows_it_whole() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let first = rt.block_on(async {
        let client = baton::Client::connect(&ep).await.unwrap();
        let alerts = baton::PriorityQueue::new(&client, "cq/alerts").unwrap();
        alerts.enqueue("disk 80%", 5).await.unwrap();
        alerts.enqueue("disk 99%", 0).await.unwrap();
        alerts.enqueue("disk 85%", 5).await.unwrap();
        let jobs = baton::Queue::new(&client, "cq/jobs").unwrap();
        for j in ["a", "b", "c"] {
            jobs.enqueue(j).await.unwrap();
        }
        let kvs = client
            .store()
            .range(baton::store::Range::prefix(b"cq/jobs/".to_vec()))
            .await
            .unwrap()
            .kvs;
        String::from_utf8(kvs[0].key.clone()).unwrap()
    });
    let alerts = ("cq/alerts".to_string(), "priority_queue".to_string(), 3);
    let jobs = ("cq/jobs".to_string(), "queue".to_string(), 3);
    assert_eq!(queues(&ep, "cq/"), [alerts.clone(), jobs.clone()]);
    assert_eq!(queues(&ep, "cq/alerts/00005"), [alerts]);
    assert_eq!(queues(&ep, &first), [jobs]);
}

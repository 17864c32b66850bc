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

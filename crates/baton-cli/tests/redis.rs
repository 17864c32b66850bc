//! `baton lock`, `elect`, `leader`, `observe` and `status` on `redis://` and `redlock://`,
//! against real redis-server processes, run as a user would.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use baton_testkit::{RedisServer, RedisServers};
use common::*;

fn redis() -> RedisServer {
    assert!(
        baton_testkit::redis_available(),
        "redis-server is needed for these tests: run scripts/test.sh (it installs it)"
    );
    RedisServer::start()
}

fn exists(server: &RedisServer, key: &str) -> bool {
    server.command(&["EXISTS", key], Duration::from_secs(2)) == Some(":1".to_string())
}

/// Two `baton lock` processes never run their commands at once on one name, on one Redis
/// server and on Redlock over five; CMD gets the key, and on `redis://` a fencing token
/// that grows with each grant (on `redlock://` there is none).
#[test]
fn two_processes_never_run_cmd_at_once() {
    let single = redis();
    let five = RedisServers::start(5);
    for (url, fenced) in [(single.url(), true), (five.redlock_url(), false)] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let script = r#"echo "start $$ $(date +%s%N) ${BATON_FENCING_TOKEN:-none} $BATON_LOCK_KEY" >> "$LOG"; sleep 0.1; echo "end $$ $(date +%s%N)" >> "$LOG""#;
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let (url, log) = (url.clone(), log.clone());
                std::thread::spawn(move || {
                    for _ in 0..3 {
                        let (out, _) = run(baton(&url).env("LOG", &log).args([
                            "lock",
                            "--ttl",
                            "3s",
                            "shared-job",
                            "--",
                            "sh",
                            "-c",
                            script,
                        ]));
                        assert_eq!(out.status.code(), Some(0), "{url}: {out:?}");
                    }
                })
            })
            .collect();
        for r in runs {
            r.join().unwrap();
        }
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
        assert_eq!(lines.len(), 12, "{url}: {text}");
        let mut tokens = Vec::new();
        for (i, pair) in lines.chunks(2).enumerate() {
            let (s, e) = (&pair[0], &pair[1]);
            assert_eq!(
                (s[0], e[0]),
                ("start", "end"),
                "{url}: interleaved at run {i}:\n{text}"
            );
            assert_eq!(s[1], e[1], "{url}: interleaved at run {i}:\n{text}");
            assert_eq!(s[4], "shared-job", "{url}: BATON_LOCK_KEY\n{text}");
            tokens.push(s[3].to_string());
        }
        if fenced {
            let tokens: Vec<i64> = tokens.iter().map(|t| t.parse().unwrap()).collect();
            assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{url}: {tokens:?}");
        } else {
            assert!(tokens.iter().all(|t| t == "none"), "{url}: {tokens:?}");
        }
    }
    assert!(!exists(&single, "shared-job"), "the key was left behind");
    for i in 0..5 {
        assert!(!exists(five.server(i), "shared-job"), "left on server {i}");
    }
}

/// Without CMD, `baton lock` holds until SIGTERM, then releases (the key is gone) and exits
/// 0; meanwhile `--try` exits 124 at once and `--timeout` exits 124 after it.
#[test]
fn try_timeout_and_release() {
    let server = redis();
    let url = server.url();
    let mut holder = Proc::spawn(baton(&url).args(["--json", "lock", "held"]));
    let acquired: serde_json::Value = serde_json::from_str(&holder.line()).unwrap();
    assert_eq!(acquired["event"], "acquired");
    assert_eq!(acquired["key"], "held");
    assert_eq!(acquired["backend"], "redis");
    assert!(
        acquired["fencing_token"].as_i64().unwrap() > 0,
        "{acquired}"
    );
    assert!(acquired["lease"].is_null(), "{acquired}");
    assert!(exists(&server, "held"));

    let (out, took) = run(baton(&url).args(["lock", "--try", "held", "--", "true"]));
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(took < Duration::from_secs(2), "--try took {took:?}");
    assert!(
        stderr_lines(&out)[0].contains("held by another owner"),
        "{out:?}"
    );

    let (out, took) = run(baton(&url).args(["lock", "--timeout", "300ms", "held", "--", "true"]));
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(took >= Duration::from_millis(300), "took {took:?}");

    holder.signal(libc::SIGTERM);
    assert_eq!(holder.code(), 0);
    let released: serde_json::Value = serde_json::from_str(&holder.line()).unwrap();
    assert_eq!(released["event"], "released");
    assert!(!exists(&server, "held"), "released, yet the key is there");
    let (out, _) = run(baton(&url).args(["lock", "--try", "held", "--", "true"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// `baton lock --ttl TTL NAME -- sh -c SCRIPT`, once SCRIPT has started (and the lock is
/// held); the directory of its start marker lives as long as the returned one.
fn holding(server: &RedisServer, name: &str, ttl: &str, script: &str) -> (Proc, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("running");
    let holder = Proc::spawn(baton(&server.url()).env("MARK", &marker).args([
        "lock",
        "--ttl",
        ttl,
        name,
        "--",
        "sh",
        "-c",
        &format!("echo x > \"$MARK\"; {script}"),
    ]));
    wait_for_file(&marker);
    (holder, dir)
}

/// Deleting the lock key with `DEL` kills CMD once the watchdog's next extend finds it
/// gone (within TTL/3, plus slack for a loaded machine); baton exits 122.
#[test]
fn deleted_key_kills_cmd() {
    let server = redis();
    let (mut holder, _dir) = holding(&server, "doomed", "3s", "exec sleep 30");
    let deleted = Instant::now();
    assert_eq!(
        server.command(&["DEL", "doomed"], Duration::from_secs(2)),
        Some(":1".to_string())
    );
    assert_eq!(holder.code(), 122);
    let took = deleted.elapsed();
    assert!(took < Duration::from_secs(3), "loss noticed after {took:?}");
    let err = holder.stderr_after_exit().join("\n");
    assert!(err.contains("lock lost"), "{err}");
}

/// The key deleted while CMD finishes, before the watchdog's next extend notices: the
/// release finds the lock no longer ours, and baton exits 122 (not CMD's 0), saying so.
#[test]
fn a_loss_found_by_the_release_exits_122() {
    let server = redis();
    let (mut holder, _dir) = holding(&server, "quietly-lost", "30s", "sleep 1");
    assert_eq!(
        server.command(&["DEL", "quietly-lost"], Duration::from_secs(2)),
        Some(":1".to_string())
    );
    assert_eq!(holder.code(), 122);
    let err = holder.stderr_after_exit().join("\n");
    assert!(err.contains("lock lost"), "{err}");
}

/// The server restarts (without persistence: the key is gone) while CMD runs, and another
/// holder takes the key before CMD ends: the release, sent again on a new connection (the
/// old one died with the server), finds the lock not ours, and baton exits 122 (not CMD's
/// 0), saying so. Found by a review: the retried release's answer was taken for "unknown",
/// and baton exited 0 with a notice.
#[test]
fn a_lock_lost_in_a_restart_and_found_by_the_release_exits_122() {
    let mut server = redis();
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let (mut holder, _held) = holding(
        &server,
        "restarted",
        "30s",
        &format!("while [ ! -e '{}' ]; do sleep 0.05; done", go.display()),
    );
    server.restart();
    assert_eq!(
        server.command(
            &["SET", "restarted", "another-holder", "PX", "30000"],
            Duration::from_secs(2)
        ),
        Some("+OK".to_string())
    );
    std::fs::write(&go, "").unwrap();
    assert_eq!(holder.code(), 122);
    let err = holder.stderr_after_exit().join("\n");
    assert!(err.contains("lock lost"), "{err}");
    assert_eq!(
        server.command(
            &[
                "EVAL",
                "return redis.call('GET', KEYS[1]) == 'another-holder' and 1 or 0",
                "1",
                "restarted"
            ],
            Duration::from_secs(2)
        ),
        Some(":1".to_string()),
        "the other holder's key was touched"
    );
}

/// A `--timeout` too long for the clock to add is a wait without end, not a crash.
#[test]
fn a_huge_timeout_is_no_crash() {
    let server = redis();
    let (out, _) = run(baton(&server.url()).args([
        "lock",
        "--timeout",
        "18446744073709551615s",
        "huge-timeout",
        "--",
        "true",
    ]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// `baton elect` on Redis: `leader` prints the value, `--json leader` the token, `observe`
/// the leader, `status` the election; when the leader stops, `leader` exits 1.
#[test]
fn elect_leader_observe_status() {
    let server = redis();
    let url = server.url();
    let mut leader = Proc::spawn(baton(&url).args(["elect", "sched", "10.0.0.7:8080"]));
    let elected = leader.line();
    assert!(elected.starts_with("elected sched token="), "{elected}");
    let token: i64 = elected.rsplit('=').next().unwrap().parse().unwrap();

    let (out, _) = run(baton(&url).args(["leader", "sched"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out).trim(), "10.0.0.7:8080");
    let (out, _) = run(baton(&url).args(["--json", "leader", "sched"]));
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["fencing_token"], token, "{json}");
    assert_eq!(json["key"], "sched");

    let observer = Proc::spawn(baton(&url).args(["observe", "sched"]));
    let seen = observer.line();
    assert!(
        seen.starts_with(&format!(
            "10.0.0.7:8080 (key sched, revision 1, token {token})"
        )),
        "{seen}"
    );

    let (out, _) = run(baton(&url).args(["--json", "status"]));
    let status: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let entries = status["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{status}");
    assert_eq!(entries[0]["kind"], "election");
    assert_eq!(entries[0]["fencing_token"], token);
    assert!(entries[0]["ttl_ms"].as_u64().unwrap() > 0);
    assert_eq!(status["queues"], serde_json::json!([]), "{status}");

    leader.signal(libc::SIGTERM);
    assert_eq!(leader.code(), 0);
    let (out, _) = run(baton(&url).args(["leader", "sched"]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr_lines(&out)[0].contains("no leader"), "{out:?}");
}

/// `baton observe` on Redis says on stderr, once, that it cannot read the leader while the
/// server is down, and again when it can; then it goes on.
#[test]
fn observe_says_when_the_server_is_down_and_back() {
    let mut server = redis();
    let url = server.url();
    let observer = Proc::spawn(baton(&url).args(["observe", "down"]));
    let leader = Proc::spawn(baton(&url).args(["elect", "down", "first"]));
    assert!(leader.line().starts_with("elected down "));
    assert!(observer.line().starts_with("first (key down, "));
    assert!(observer.stderr_so_far().is_empty());

    server.kill();
    let mut err = Vec::new();
    wait_until("observe says it cannot read", || {
        err.extend(observer.stderr_so_far());
        err.iter()
            .any(|l| l.starts_with("observe: ") && l.ends_with("retrying (changes may come late)"))
    });
    std::thread::sleep(Duration::from_secs(2));
    err.extend(observer.stderr_so_far());
    assert_eq!(err.len(), 1, "once, not once per retry: {err:?}");
    drop(leader);

    // Without persistence the restarted server is empty: a new leader.
    server.restart();
    wait_until("observe says it works again", || {
        err.extend(observer.stderr_so_far());
        err.iter()
            .any(|l| l.starts_with("observe: working again after "))
    });
    let _second = Proc::spawn(baton(&url).args(["elect", "down", "second"]));
    assert!(observer.line().starts_with("second (key down, "));
    assert_eq!(err.len(), 2, "{err:?}");
}

/// With `--namespace`, what baton reports on Redis is relative to the namespace, as on etcd:
/// CMD's BATON_LOCK_KEY and BATON_ELECTION_KEY, the `elected` line, `leader --json`,
/// `observe`, and `status`'s names and keys; only Redis itself sees the prefixed key.
#[test]
fn keys_are_relative_to_the_namespace() {
    let server = redis();
    let url = server.url();
    let ns = |cmd: std::process::Command| {
        let mut cmd = cmd;
        cmd.args(["--namespace", "team-a/"]);
        cmd
    };
    let (out, _) = run(ns(baton(&url)).args([
        "lock",
        "n3",
        "--",
        "sh",
        "-c",
        "echo \"key=$BATON_LOCK_KEY\"",
    ]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).lines().any(|l| l == "key=n3"), "{out:?}");

    let mut holder = Proc::spawn(ns(baton(&url)).args(["lock", "jobs"]));
    assert!(holder.line().starts_with("acquired jobs "));
    assert!(
        exists(&server, "team-a/jobs"),
        "the Redis key is not prefixed"
    );
    let mut leader = Proc::spawn(ns(baton(&url)).args([
        "elect",
        "sched",
        "v1",
        "--",
        "sh",
        "-c",
        "echo \"key=$BATON_ELECTION_KEY\"; sleep 30",
    ]));
    // With CMD, stdout is CMD's alone (no `elected` line).
    assert_eq!(leader.line(), "key=sched");
    // Without, baton prints the `elected` line.
    let mut standalone = Proc::spawn(ns(baton(&url)).args(["elect", "solo", "v"]));
    let elected = standalone.line();
    assert!(elected.starts_with("elected solo token="), "{elected}");
    standalone.signal(libc::SIGTERM);
    assert_eq!(standalone.code(), 0);
    assert_eq!(standalone.line(), "resigned solo");

    let (out, _) = run(ns(baton(&url)).args(["--json", "leader", "sched"]));
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["key"], "sched", "{json}");
    let observer = Proc::spawn(ns(baton(&url)).args(["observe", "sched"]));
    let seen = observer.line();
    assert!(seen.starts_with("v1 (key sched, "), "{seen}");

    let (out, _) = run(ns(baton(&url)).args(["--json", "status"]));
    let status: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let entries: Vec<(&str, &str)> = status["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["key"].as_str().unwrap()))
        .collect();
    assert_eq!(entries, [("jobs", "jobs"), ("sched", "sched")], "{status}");

    holder.signal(libc::SIGTERM);
    assert_eq!(holder.code(), 0);
    leader.signal(libc::SIGTERM);
    leader.code();
}

/// `baton status` on Redlock shows the locks a quorum agrees on, with no token, and skips
/// keys that are not locks (no expiry) and Baton's bookkeeping keys.
#[test]
fn status_on_redlock() {
    let five = RedisServers::start(5);
    let url = five.redlock_url();
    five.server(0)
        .command(&["SET", "jobs/plain", "x"], Duration::from_secs(2))
        .unwrap();
    let mut holder = Proc::spawn(baton(&url).args(["lock", "jobs/a"]));
    let acquired = holder.line();
    assert_eq!(acquired, "acquired jobs/a (no fencing token)");
    let (out, _) = run(baton(&url).args(["status", "jobs/"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("NAME"), "{text}");
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        (cells[0], cells[1], cells[3]),
        ("jobs/a", "lock", "-"),
        "{text}"
    );
    assert_eq!(cells.last(), Some(&"5"), "{text}");
    holder.signal(libc::SIGTERM);
    assert_eq!(holder.code(), 0);
    let (out, _) = run(baton(&url).args(["status", "jobs/"]));
    assert_eq!(stdout(&out).trim(), "no locks or elections under \"jobs/\"");
}

/// An ACL user whose key patterns do not cover the election: `baton observe` exits 125 at
/// once with `permission denied`, as `baton leader` and `baton elect` do (and as `observe`
/// does on etcd), instead of retrying silently for ever.
#[test]
fn observe_denied_by_the_acl_exits_125() {
    assert!(baton_testkit::redis_available(), "redis-server is needed");
    let server = RedisServer::start_with(
        baton_testkit::RedisServerOptions::new()
            .with_acl_user("obs", "on >opw ~allowed* ~baton:*:allowed* &* +@all"),
    );
    observing_is_denied_outside_the_acl(&server.url());
}

/// The same on Redlock: every node refuses access, so no quorum answers and nothing will
/// change on a retry. `baton observe` exits 125 with the node's error, as `baton leader`
/// does, instead of retrying silently for ever (each node's failure was wrapped in
/// `no quorum`, which observe took for a transient failure).
#[test]
fn observe_denied_by_the_acl_exits_125_on_redlock() {
    assert!(baton_testkit::redis_available(), "redis-server is needed");
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| {
            RedisServer::start_with(
                baton_testkit::RedisServerOptions::new()
                    .with_acl_user("obs", "on >opw ~allowed* ~baton:*:allowed* &* +@all"),
            )
        })
        .collect();
    let addrs: Vec<String> = servers.iter().map(RedisServer::addr).collect();
    let url = format!("redlock://{}", addrs.join(","));
    observing_is_denied_outside_the_acl(&url);
}

/// As user `obs` (password `opw`), allowed only keys under `allowed`: `leader` and
/// `observe` of another name exit 125 at once with "permission denied" (and no password
/// in the message); observing an allowed name works.
fn observing_is_denied_outside_the_acl(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "opw\n").unwrap();
    let as_obs = || {
        let mut cmd = baton(url);
        cmd.env_remove("BATON_PASSWORD")
            .args(["--user", "obs", "--password-file"])
            .arg(&pw);
        cmd
    };
    for args in [
        &["leader", "secret"][..],
        &["observe", "secret"],
        &["--json", "observe", "secret"],
    ] {
        let (out, took) = run(as_obs().args(args));
        assert_eq!(out.status.code(), Some(125), "{args:?}: {out:?}");
        let err = stderr_lines(&out);
        assert_eq!(err.len(), 1, "{args:?}: {err:?}");
        assert!(err[0].contains("permission denied"), "{args:?}: {err:?}");
        assert!(!err[0].contains("opw"), "{err:?}");
        assert!(stdout(&out).is_empty(), "{args:?}: {out:?}");
        assert!(
            took < Duration::from_secs(5),
            "{args:?}: denied after {took:?}"
        );
    }
    // Where the ACL allows it, observing works for the same user.
    let observer = Proc::spawn(as_obs().args(["observe", "allowed/e"]));
    let (out, _) = run(as_obs().args(["elect", "allowed/e", "v", "--", "sh", "-c", "sleep 1"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(observer.line().starts_with("v (key allowed/e, "));
    observer.signal(libc::SIGTERM);
}

/// With one master down (of three, of five), `baton leader` on a free election says there
/// is no leader (1) every time: the masters that are up are a quorum and hold nothing. A
/// refused connection answers at once, and the masters that had not answered yet were
/// counted as failed (`redlock quorum not reached`, 125).
#[test]
fn leader_of_a_free_election_with_a_master_down_is_none() {
    assert!(baton_testkit::redis_available(), "redis-server is needed");
    for n in [3, 5] {
        let mut masters = RedisServers::start(n);
        let url = masters.redlock_url();
        let (out, _) = run(baton(&url).args(["leader", "free1"]));
        assert_eq!(out.status.code(), Some(1), "{n} masters: {out:?}");
        masters.kill(1);
        for _ in 0..6 {
            let (out, _) = run(baton(&url).args(["leader", "free1"]));
            assert_eq!(out.status.code(), Some(1), "{n} masters, one down: {out:?}");
        }
    }
}

/// Two masters of three refuse access, one allows it: no quorum can answer, and retrying
/// cannot help, so `baton leader` and `baton observe` exit 125 with `permission denied`
/// every time, whichever master answers first (only the refusals that came before the
/// others' answers were counted: `quorum not reached`, and observe retried).
#[test]
fn denied_by_most_masters_exits_125_every_time() {
    assert!(baton_testkit::redis_available(), "redis-server is needed");
    let servers: Vec<RedisServer> = (0..3)
        .map(|i| {
            let keys = if i == 0 {
                "~* &* +@all"
            } else {
                "~allowed* ~baton:*:allowed* &* +@all"
            };
            RedisServer::start_with(
                baton_testkit::RedisServerOptions::new()
                    .with_acl_user("obs", &format!("on >opw {keys}")),
            )
        })
        .collect();
    let addrs: Vec<String> = servers.iter().map(RedisServer::addr).collect();
    let url = format!("redlock://{}", addrs.join(","));
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "opw\n").unwrap();
    let as_obs = || {
        let mut cmd = baton(&url);
        cmd.env_remove("BATON_PASSWORD")
            .args(["--user", "obs", "--password-file"])
            .arg(&pw);
        cmd
    };
    for _ in 0..4 {
        for args in [&["leader", "secret"][..], &["observe", "secret"]] {
            let (out, took) = run(as_obs().args(args));
            assert_eq!(out.status.code(), Some(125), "{args:?}: {out:?}");
            let err = stderr_lines(&out);
            assert_eq!(err.len(), 1, "{args:?}: {err:?}");
            assert!(err[0].contains("permission denied"), "{args:?}: {err:?}");
            assert!(
                took < Duration::from_secs(3),
                "{args:?}: denied after {took:?}"
            );
        }
    }
}

/// Commands that need a key-value store refuse Redis with a clear message, and a bad
/// Redlock URL is refused before any wait.
#[test]
fn clear_errors() {
    let server = redis();
    let (out, _) = run(baton(&server.url()).args(["get", "x"]));
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        stderr_lines(&out)[0].contains("no key-value store"),
        "{out:?}"
    );
    let (out, took) =
        run(baton(&server.url().replace("redis", "redlock")).args(["lock", "x", "--", "true"]));
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(stderr_lines(&out)[0].contains("at least 3"), "{out:?}");
}

/// A `baton lock` queued behind a holder and killed with SIGKILL (it cannot leave the
/// queue) holds up the next waiter no longer than its waiter window (3 polls: 1.5 s by
/// default), even when the holder releases while the dead waiter's place is still alive.
#[test]
fn a_killed_queued_waiter_blocks_the_lock_at_most_its_window() {
    let server = redis();
    let url = server.url();
    let queued = || {
        server
            .command(&["LLEN", "baton:queue:busy"], Duration::from_secs(2))
            .unwrap_or_default()
    };
    let mut holder = Proc::spawn(baton(&url).args(["--json", "lock", "busy"]));
    let acquired: serde_json::Value = serde_json::from_str(&holder.line()).unwrap();
    assert_eq!(acquired["event"], "acquired");
    let waiter = Proc::spawn(baton(&url).args(["lock", "busy", "--", "true"]));
    wait_until("the waiter queues", || queued() == ":1");
    waiter.signal(libc::SIGKILL);
    holder.signal(libc::SIGTERM);
    assert_eq!(holder.code(), 0);
    // Released within the dead waiter's window: handed to it, not freed.
    assert!(exists(&server, "busy"), "the lock was not handed over");
    let (out, took) = run(baton(&url).args(["lock", "--timeout", "10s", "busy", "--", "true"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        took < Duration::from_millis(2500),
        "the next waiter waited {took:?} behind a dead one"
    );
}

/// `baton lock --no-fifo` waits without queueing (no place in `baton:queue:NAME`), as
/// redsync and redis-py clients wait, so that it starves none of them; it still gets the
/// lock once it is released.
#[test]
fn no_fifo_waits_without_queueing() {
    let server = redis();
    let url = server.url();
    let mut holder = Proc::spawn(baton(&url).args(["--json", "lock", "shared"]));
    let acquired: serde_json::Value = serde_json::from_str(&holder.line()).unwrap();
    assert_eq!(acquired["event"], "acquired");
    let mut waiter = Proc::spawn(baton(&url).args(["lock", "--no-fifo", "shared", "--", "true"]));
    // Long enough for a queueing waiter to be queued (a few ms: see
    // `a_killed_queued_waiter_blocks_the_lock_at_most_its_window`).
    std::thread::sleep(Duration::from_millis(800));
    let queued = server.command(&["EXISTS", "baton:queue:shared"], Duration::from_secs(2));
    assert_eq!(queued.as_deref(), Some(":0"), "the --no-fifo waiter queued");
    holder.signal(libc::SIGTERM);
    assert_eq!(holder.code(), 0);
    assert_eq!(waiter.code(), 0);
}

/// The documented order holds on Redis too: the password from `--password-file`, else
/// `$BATON_PASSWORD`, else the URL; the user from `--user`, else the URL. Before, the
/// URL's credentials beat the options (the library's rule for URLs).
#[test]
fn password_and_user_options_beat_the_url() {
    assert!(baton_testkit::redis_available(), "redis-server is needed");
    let server = RedisServer::start_with(
        baton_testkit::RedisServerOptions::new()
            .with_requirepass("rpw")
            .with_acl_user("full", "on >fpw ~* &* +@all"),
    );
    let dir = tempfile::tempdir().unwrap();
    let fpw = dir.path().join("fpw");
    std::fs::write(&fpw, "fpw\n").unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "bad\n").unwrap();
    let addr = server.addr();
    let lock = |cmd: &mut std::process::Command| -> std::process::Output {
        let (out, _) = run(cmd
            .env_remove("BATON_USER")
            .args(["lock", "x", "--", "true"]));
        out
    };
    let ok = |out: &std::process::Output| assert_eq!(out.status.code(), Some(0), "{out:?}");
    let refused = |out: &std::process::Output| {
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        let text = format!("{out:?}");
        assert!(!text.contains("rpw") && !text.contains("fpw"), "{text}");
    };

    // $BATON_PASSWORD beats the URL's password, both ways.
    ok(&lock(
        baton(&format!("redis://:bad@{addr}")).env("BATON_PASSWORD", "rpw"),
    ));
    refused(&lock(
        baton(&format!("redis://:rpw@{addr}")).env("BATON_PASSWORD", "bad"),
    ));
    // --password-file beats $BATON_PASSWORD and the URL.
    ok(&lock(
        baton(&format!("redis://:bad@{addr}"))
            .env("BATON_PASSWORD", "bad")
            .arg("--password-file")
            .arg(&fpw)
            .args(["--user", "full"]),
    ));
    // --user and --password-file beat the URL's user and password.
    ok(&lock(
        baton(&format!("redis://full:bad@{addr}"))
            .env_remove("BATON_PASSWORD")
            .args(["--user", "full", "--password-file"])
            .arg(&fpw),
    ));
    refused(&lock(
        baton(&format!("redis://full:fpw@{addr}"))
            .env_remove("BATON_PASSWORD")
            .args(["--user", "full", "--password-file"])
            .arg(&bad),
    ));
    // --user with the URL's password: the option's user, the URL's password.
    ok(&lock(
        baton(&format!("redis://default:fpw@{addr}"))
            .env_remove("BATON_PASSWORD")
            .args(["--user", "full"]),
    ));
    // Only the URL: its credentials, as before.
    ok(&lock(
        baton(&format!("redis://full:fpw@{addr}")).env_remove("BATON_PASSWORD"),
    ));
}

/// On Redlock, the options replace the credentials of every master, those given after
/// the first included; `--user` alone keeps each master's own password from the URL.
#[test]
fn options_beat_every_redlock_masters_url() {
    assert!(baton_testkit::redis_available(), "redis-server is needed");
    let servers: Vec<RedisServer> = ["f0", "f1", "f2"]
        .iter()
        .map(|p| {
            RedisServer::start_with(
                baton_testkit::RedisServerOptions::new()
                    .with_requirepass("shared")
                    .with_acl_user("full", &format!("on >{p} ~* &* +@all")),
            )
        })
        .collect();
    let url = |creds: [&str; 3]| {
        let parts: Vec<String> = servers
            .iter()
            .zip(creds)
            .map(|(s, c)| format!("{c}@{}", s.addr()))
            .collect();
        format!("redlock://{}", parts.join(","))
    };
    let lock = |endpoints: &str, user: Option<&str>, password: Option<&str>| {
        let mut cmd = baton(endpoints);
        cmd.env_remove("BATON_USER").env_remove("BATON_PASSWORD");
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        if let Some(p) = password {
            cmd.env("BATON_PASSWORD", p);
        }
        let (out, _) = run(cmd.args(["lock", "x", "--", "true"]));
        out.status.code()
    };
    // Each master's own credentials, from the URL.
    assert_eq!(
        lock(&url(["full:f0", "full:f1", "full:f2"]), None, None),
        Some(0)
    );
    // $BATON_PASSWORD replaces every master's password.
    let wrong = url([":bad0", ":bad1", "redis://:bad2"]);
    assert_eq!(lock(&wrong, None, None), Some(125));
    assert_eq!(lock(&wrong, None, Some("shared")), Some(0));
    // --user replaces every master's user and keeps its password.
    let as_default = url(["default:f0", "default:f1", "redis://default:f2"]);
    assert_eq!(lock(&as_default, Some("full"), None), Some(0));
}

/// `baton bench` on Redis takes its credentials in the same order as `baton lock` (the
/// options, then the URL), for its own connections and the rslock peer's too, not only for
/// its Baton workers.
#[test]
fn bench_follows_the_credential_options_over_the_url() {
    assert!(baton_testkit::redis_available(), "redis-server is needed");
    let server = RedisServer::start_with(
        baton_testkit::RedisServerOptions::new()
            .with_requirepass("rpw")
            .with_acl_user("full", "on >fpw ~* &* +@all"),
    );
    let addr = server.addr();
    let bench = |url: &str, envs: &[(&str, &str)], extra: &[&str]| {
        let mut cmd = baton(url);
        cmd.env_remove("BATON_USER").env_remove("BATON_PASSWORD");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.args(extra)
            .args(["bench", "uncontended", "--ops", "4", "--peer", "rslock"]);
        let (out, _) = run(&mut cmd);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{url} {envs:?} {extra:?}: {out:?}"
        );
        let text = format!("{out:?}");
        assert!(!text.contains("rpw") && !text.contains("fpw"), "{text}");
    };
    // $BATON_PASSWORD beats the URL's password.
    bench(
        &format!("redis://:bad@{addr}"),
        &[("BATON_PASSWORD", "rpw")],
        &[],
    );
    // --user beats the URL's user, with the URL's password.
    bench(
        &format!("redis://default:fpw@{addr}"),
        &[],
        &["--user", "full"],
    );
    // Both options beat both of the URL's.
    bench(
        &format!("redis://nobody:bad@{addr}"),
        &[("BATON_PASSWORD", "fpw")],
        &["--user", "full"],
    );
}

/// A listener that records the first bytes each client sends it, then hangs up: a
/// Redlock master that never answers, to see what a client would have sent it.
fn sniffer() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            buf.truncate(n);
            record.lock().unwrap().push(buf);
        }
    });
    (port, seen)
}

/// `redlock://rediss://…` (the first master with its own scheme, as the library accepts)
/// with `--password-file` or `--user`: every master is dialled with TLS, and the lock
/// works. Before, the CLI read the first master's `rediss` as a user and rewrote it to
/// `redlock://rediss@host:port`, a plaintext master that got `AUTH rediss PASSWORD` in
/// clear (with `--user`: `redlock://app@rediss://…`, refused as a bad URL).
#[test]
fn the_first_redlock_master_keeps_its_tls_scheme() {
    assert!(baton_testkit::redis_available(), "redis-server is needed");
    let pki = baton_testkit::TestPki::generate();
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| {
            RedisServer::start_with(
                baton_testkit::RedisServerOptions::new()
                    .with_tls(&pki)
                    .with_acl_user("app", "on >Tls-Secret-51 ~* &* +@all"),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "Tls-Secret-51\n").unwrap();
    let masters = |user: &str| -> Vec<String> {
        servers
            .iter()
            .map(|s| {
                s.tls_url()
                    .replace("rediss://", &format!("rediss://{user}"))
            })
            .collect()
    };
    let lock = |endpoints: &str, extra: &[&str]| -> std::process::Output {
        let mut cmd = baton(endpoints);
        cmd.env_remove("BATON_USER")
            .env_remove("BATON_PASSWORD")
            .arg("--password-file")
            .arg(&password_file)
            .args(["--dial-timeout", "5s"])
            .args(extra)
            .args(["lock", "x", "--", "sh", "-c", "echo ran"]);
        run(&mut cmd).0
    };
    let ca = pki.ca_file();
    let ca = ["--cacert", ca.to_str().unwrap()];
    let works = |endpoints: &str, extra: &[&str]| {
        let out = lock(endpoints, extra);
        assert_eq!(out.status.code(), Some(0), "{endpoints} {extra:?}: {out:?}");
        assert_eq!(stdout(&out).trim(), "ran");
        assert!(!format!("{out:?}").contains("Tls-Secret-51"), "{out:?}");
    };
    // A first master that records what it is sent: a TLS ClientHello, never the password.
    // (Without --cacert the others' certificates are not trusted, so no quorum: the point
    // is what went over the wire.)
    let (port, seen) = sniffer();
    let endpoints = format!(
        "redlock://rediss://app@127.0.0.1:{port},{}",
        masters("app@").join(",")
    );
    let out = lock(&endpoints, &[]);
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.is_empty(),
        "the first master was never dialled: {out:?}"
    );
    for bytes in &seen {
        assert!(
            !String::from_utf8_lossy(bytes).contains("Tls-Secret-51"),
            "the password went in clear: {:?}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(bytes.first(), Some(&0x16), "not a TLS handshake: {bytes:?}");
    }

    // The user in each URL, the password from the file.
    works(&format!("redlock://{}", masters("app@").join(",")), &ca);
    // The user from --user.
    let mut extra = ca.to_vec();
    extra.extend(["--user", "app"]);
    works(&format!("redlock://{}", masters("").join(",")), &extra);
}

/// `baton observe --vacancies` on Redis: `no leader` at the start, the leader, and `no
/// leader` once, when it resigns.
#[test]
fn observe_vacancies_says_no_leader() {
    let server = redis();
    let url = server.url();
    let mut observer = Proc::spawn(baton(&url).args(["observe", "--vacancies", "sched"]));
    assert_eq!(observer.line(), "no leader");
    let mut leader = Proc::spawn(baton(&url).args(["elect", "sched", "v1"]));
    assert!(leader.line().starts_with("elected sched token="));
    let seen = observer.line();
    assert!(
        seen.starts_with("v1 (key sched, revision 1, token "),
        "{seen}"
    );
    leader.signal(libc::SIGTERM);
    assert_eq!(leader.code(), 0);
    assert_eq!(observer.line(), "no leader");
    assert_eq!(observer.line_within(Duration::from_millis(1500)), None);
    observer.signal(libc::SIGINT);
    assert_eq!(observer.code(), 0);
}

/// The reviewer's case: `baton lock outer -- baton --endpoints redlock://… lock inner --
/// CMD`. Redlock has no fencing token, so the inner `baton` sets no BATON_FENCING_TOKEN:
/// CMD must not see the outer lock's (before, it did, and the outer's key as ETCD_LOCK_KEY
/// on etcd).
#[test]
fn a_nested_redlock_cmd_gets_no_outer_fencing_token() {
    let single = redis();
    let three = RedisServers::start(3);
    let (out, _) = run(baton(&single.url()).args([
        "lock",
        "outer",
        "--",
        env!("CARGO_BIN_EXE_baton"),
        "--endpoints",
        &three.redlock_url(),
        "lock",
        "inner",
        "--",
        "sh",
        "-c",
        r#"echo "${BATON_FENCING_TOKEN-unset} $BATON_LOCK_KEY""#,
    ]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "unset inner\n");
}

/// Redlock over three masters, one up and two refusing connections: the error counts what
/// failed ("2 of 3 masters failed"). It said "only 0 of 3 masters answered", though the
/// one up was never waited for (the dials stop once two failed), sending an operator to
/// look for three dead servers (found by a review).
#[test]
fn redlock_connect_error_does_not_say_none_answered_when_one_is_up() {
    let server = redis();
    let url = format!(
        "redlock://{},127.0.0.1:{},127.0.0.1:{}",
        server.url().trim_start_matches("redis://"),
        baton_testkit::free_port(),
        baton_testkit::free_port()
    );
    let (out, _) = run(baton(&url).args(["lock", "x", "--", "true"]));
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = stderr_lines(&out);
    assert!(!err[0].contains("only 0 of 3 masters answered"), "{err:?}");
}

/// Redlock over five masters, all refusing: the dials stop once three failed, and the
/// error says the other two were not waited for ("3 of 5 masters failed" alone read as if
/// two had answered: found by the README review).
#[test]
fn redlock_connect_error_says_which_masters_were_not_waited_for() {
    let ports: Vec<String> = (0..5)
        .map(|_| format!("127.0.0.1:{}", baton_testkit::free_port()))
        .collect();
    let url = format!("redlock://{}", ports.join(","));
    let (out, _) = run(baton(&url).args(["lock", "x", "--", "true"]));
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = stderr_lines(&out);
    assert!(
        err[0].contains("3 of 5 masters failed (the other 2 not waited for"),
        "{err:?}"
    );
}

/// `status --kind` on Redis: refused at once (exit 125, nothing connected), not ignored: a
/// name's kind is known there from its keys.
#[test]
fn status_refuses_kind_on_redis() {
    for ep in [
        "redis://127.0.0.1:1",
        "redlock://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3",
    ] {
        let (out, took) = run(baton(ep).args(["status", "--kind", "election"]));
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--kind applies to etcd only"), "{stderr}");
        assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
    }
    let (out, _) = run(baton("redis://127.0.0.1:1").args(["status", "--kind", "auto"]));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("--kind"),
        "auto is the default, never refused: {out:?}"
    );
}

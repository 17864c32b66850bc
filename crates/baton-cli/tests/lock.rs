//! `baton lock` against real etcd, run as a user would.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Two `baton lock` processes on one name never run their commands at once: each CMD
/// appends start and end markers with timestamps to one file, and no two intervals overlap.
#[test]
fn two_processes_never_run_cmd_at_once() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let script = r#"echo "start $$ $(date +%s%N)" >> "$LOG"; sleep 0.15; echo "end $$ $(date +%s%N)" >> "$LOG""#;
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let endpoint = etcd.endpoint();
            let log = log.clone();
            std::thread::spawn(move || {
                for _ in 0..3 {
                    let (out, _) = run(baton(&endpoint).env("LOG", &log).args([
                        "lock",
                        "shared-job",
                        "--",
                        "sh",
                        "-c",
                        script,
                    ]));
                    assert_eq!(out.status.code(), Some(0), "{out:?}");
                }
            })
        })
        .collect();
    for r in runs {
        r.join().unwrap();
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<(&str, &str, u128)> = text
        .lines()
        .map(|l| {
            let parts: Vec<&str> = l.split(' ').collect();
            (parts[0], parts[1], parts[2].parse().unwrap())
        })
        .collect();
    assert_eq!(lines.len(), 12, "{text}");
    for (i, pair) in lines.chunks(2).enumerate() {
        let ((s, pid_s, t_s), (e, pid_e, t_e)) = (pair[0], pair[1]);
        assert_eq!((s, e), ("start", "end"), "interleaved at run {i}:\n{text}");
        assert_eq!(pid_s, pid_e, "interleaved at run {i}:\n{text}");
        assert!(t_s <= t_e, "{text}");
    }
    for w in lines.windows(2) {
        assert!(w[0].2 <= w[1].2, "timestamps out of order:\n{text}");
    }
    // Nothing is left behind.
    assert!(keys(&etcd, "shared-job/").is_empty());
}

/// Without CMD, `baton lock` prints the key and token and holds until SIGTERM, then
/// releases and exits 0. `--try` while it is held exits 124 at once.
#[test]
fn try_while_held_exits_124_at_once() {
    let etcd = etcd();
    let mut holder = Proc::spawn(baton(&etcd.endpoint()).args(["lock", "try-me"]));
    let acquired = holder.line();
    let (key, token) = parse_acquired(&acquired);
    assert!(key.starts_with("try-me/"), "{acquired}");
    assert_eq!(create_revision(&etcd, &key), token);

    let (out, took) = run(baton(&etcd.endpoint()).args(["lock", "--try", "try-me", "--", "true"]));
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(took < Duration::from_secs(2), "--try took {took:?}");
    let err = stderr_lines(&out);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("held"), "{err:?}");
    assert_eq!(
        keys(&etcd, "try-me/"),
        std::slice::from_ref(&key),
        "--try left its key behind"
    );

    holder.signal(libc::SIGTERM);
    assert_eq!(holder.code(), 0);
    assert_eq!(holder.line(), format!("released {key}"));
    assert!(keys(&etcd, "try-me/").is_empty());
    let (out, _) = run(baton(&etcd.endpoint()).args(["lock", "--try", "try-me", "--", "true"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// `--timeout` passing exits 124 and leaves no waiter key.
#[test]
fn timeout_expiry_exits_124() {
    let etcd = etcd();
    let holder = Proc::spawn(baton(&etcd.endpoint()).args(["lock", "slow"]));
    let (key, _) = parse_acquired(&holder.line());
    let (out, took) =
        run(baton(&etcd.endpoint()).args(["lock", "--timeout", "500ms", "slow", "--", "true"]));
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    let err = stderr_lines(&out);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("not acquired within 500ms"), "{err:?}");
    assert_eq!(keys(&etcd, "slow/"), [key]);
}

/// With etcd gone during the wait, `--timeout` still ends baton about on time: exit 124,
/// and a line saying the waiter's key could not be removed (it expires with the lease),
/// after at most CLEANUP_TIMEOUT (1 s) of trying, not RELEASE_TIMEOUT (5 s). `sem` and
/// `elect` share the close.
#[test]
fn timeout_with_etcd_gone_exits_124_about_on_time() {
    let mut etcd = etcd();
    for what in ["lock", "sem", "elect"] {
        if what != "lock" {
            etcd.restart();
        }
        let ep = etcd.endpoint();
        let name = format!("gone-{what}");
        let hold: Vec<&str> = match what {
            "lock" => vec!["lock", &name],
            "sem" => vec!["sem", &name, "--permits", "1"],
            _ => vec!["elect", &name, "first"],
        };
        let holder = Proc::spawn(baton(&ep).args(&hold));
        let _ = holder.line();
        let mut wait: Vec<&str> = hold.clone();
        if what == "elect" {
            wait[2] = "second";
        }
        wait.extend(["--timeout", "2s", "--", "true"]);
        let waiter = Proc::spawn(baton(&ep).args(&wait));
        let started = Instant::now();
        wait_until("the waiter's key", || {
            keys(&etcd, &format!("{name}/")).len() == 2
        });
        etcd.kill();
        let mut waiter = waiter;
        let code = waiter.code();
        let took = started.elapsed();
        let err = waiter.stderr_after_exit();
        assert_eq!(code, 124, "{what}: {err:?}");
        assert!(took < Duration::from_millis(4500), "{what}: took {took:?}");
        assert!(err[0].contains("within 2s"), "{what}: {err:?}");
        assert!(
            err.iter()
                .any(|l| l.starts_with("the backend did not confirm within 1s")),
            "{what}: {err:?}"
        );
        drop(holder);
    }
}

/// Revoking the holder's lease with etcdctl kills CMD within a second; baton prints
/// `lock lost` and exits 122.
#[test]
fn revoked_lease_kills_cmd_within_a_second() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "doomed",
        "--",
        "sh",
        "-c",
        r#"echo $$ > "$D/pid"; echo "$BATON_LOCK_KEY" > "$D/key"; exec sleep 30"#,
    ]));
    let key = wait_for_file(&dir.path().join("key")).trim().to_string();
    let pid: u32 = wait_for_file(&dir.path().join("pid"))
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));

    let revoked = Instant::now();
    revoke(&etcd, &key);
    let status = holder.wait(Duration::from_secs(5)).expect("baton exits");
    let took = revoked.elapsed();
    assert_eq!(status.code(), Some(122));
    assert!(took < Duration::from_secs(1), "CMD killed after {took:?}");
    assert!(!alive(pid), "CMD still runs");
    let err = holder.stderr_after_exit();
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].starts_with("lock lost"), "{err:?}");
}

/// With CMD, stdout is CMD's alone also with --json when the hold is lost (lock, elect,
/// sem): the loss is told by the `... lost` line on stderr and exit 122, not by a JSON
/// event mixed into CMD's output. Without CMD, the `lost` event follows `acquired` on
/// stdout.
#[test]
fn with_cmd_a_loss_adds_nothing_to_stdout_with_json() {
    let etcd = etcd();
    for (args, var, lost) in [
        (&["lock", "doomed"][..], "BATON_LOCK_KEY", "lock lost"),
        (
            &["elect", "doomed-e", "v"],
            "BATON_ELECTION_KEY",
            "leadership lost",
        ),
        (
            &["sem", "doomed-s", "--permits", "2"],
            "BATON_SEM_KEY",
            "permit lost",
        ),
    ] {
        let script = format!(r#"echo "${var}"; exec sleep 30"#);
        let mut holder = Proc::spawn(
            baton(&etcd.endpoint())
                .arg("--json")
                .args(args)
                .args(["--", "sh", "-c", &script]),
        );
        let key = holder.line();
        revoke(&etcd, &key);
        assert_eq!(holder.code(), 122, "{args:?}");
        let rest: Vec<String> =
            std::iter::from_fn(|| holder.line_within(Duration::from_millis(200))).collect();
        assert!(
            rest.is_empty(),
            "{args:?}: stdout after CMD's line: {rest:?}"
        );
        let err = holder.stderr_all();
        assert_eq!(err.len(), 1, "{args:?}: {err:?}");
        assert!(err[0].starts_with(lost), "{args:?}: {err:?}");
    }

    let holder = Proc::spawn(baton(&etcd.endpoint()).args(["--json", "lock", "doomed"]));
    let acquired: serde_json::Value = serde_json::from_str(&holder.line()).unwrap();
    assert_eq!(acquired["event"], "acquired");
    revoke(&etcd, acquired["key"].as_str().unwrap());
    let lost: serde_json::Value = serde_json::from_str(&holder.line()).unwrap();
    assert_eq!(lost["event"], "lost", "{lost}");
}

/// A CMD that ignores SIGTERM is SIGKILLed once `--grace` has passed.
#[test]
fn cmd_ignoring_sigterm_is_killed_after_grace() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "stubborn",
        "--grace",
        "1s",
        "--",
        "sh",
        "-c",
        r#"trap '' TERM; echo $$ > "$D/pid"; echo "$BATON_LOCK_KEY" > "$D/key"; sleep 30; echo survived > "$D/survived""#,
    ]));
    let key = wait_for_file(&dir.path().join("key")).trim().to_string();
    let pid: u32 = wait_for_file(&dir.path().join("pid"))
        .trim()
        .parse()
        .unwrap();

    let revoked = Instant::now();
    revoke(&etcd, &key);
    let status = holder.wait(Duration::from_secs(5)).expect("baton exits");
    let took = revoked.elapsed();
    assert_eq!(status.code(), Some(122));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "baton exited {took:?} after the revoke; --grace is 1s"
    );
    assert!(!alive(pid), "CMD still runs");
    assert!(!dir.path().join("survived").exists());
}

/// SIGTERM to baton is forwarded to CMD, the lock is released, and the next waiter
/// acquires at once, long before the TTL would have freed it.
#[test]
fn sigterm_releases_and_next_waiter_acquires_at_once() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let mut first = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "handover",
        "--ttl",
        "30s",
        "--",
        "sh",
        "-c",
        r#"echo "$BATON_LOCK_KEY" > "$D/first"; exec sleep 30"#,
    ]));
    wait_for_file(&dir.path().join("first"));
    let mut second = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "handover",
        "--",
        "sh",
        "-c",
        r#"echo "$BATON_LOCK_KEY" > "$D/second""#,
    ]));
    wait_until("the second waiter to queue", || {
        keys(&etcd, "handover/").len() == 2
    });

    let signalled = Instant::now();
    first.signal(libc::SIGTERM);
    assert_eq!(second.code(), 0);
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the next waiter acquired {took:?} after SIGTERM"
    );
    // sleep died of the forwarded SIGTERM: 128 + 15.
    assert_eq!(first.code(), 143);
    assert!(dir.path().join("second").exists());
    assert!(keys(&etcd, "handover/").is_empty());
}

/// SIGHUP (a closed terminal or ssh session) is forwarded to CMD like SIGTERM, and the lock
/// is released at once, not left to its TTL.
#[test]
fn sighup_is_forwarded_and_releases() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "--ttl",
        "30s",
        "hangup",
        "--",
        "sh",
        "-c",
        r#"trap 'echo hup > "$D/hup"; exit 0' HUP; echo x > "$D/ready"; while :; do sleep 0.05; done"#,
    ]));
    wait_for_file(&dir.path().join("ready"));
    holder.signal(libc::SIGHUP);
    assert_eq!(holder.code(), 0, "CMD's own exit code after its HUP trap");
    assert!(dir.path().join("hup").exists(), "CMD never got SIGHUP");
    assert!(keys(&etcd, "hangup/").is_empty(), "the lock was left held");
}

/// What CMD leaves running in its process group (a background job) is part of the job: it
/// gets SIGTERM when CMD exits, and the lock is released only after it is gone.
#[test]
fn background_jobs_end_before_the_lock_is_released() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = run(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "--grace",
        "10s",
        "background",
        "--",
        "sh",
        "-c",
        r#"(trap 'sleep 0.5; echo done > "$D/bg-done"; exit 0' TERM; echo x > "$D/bg"; while :; do sleep 0.05; done) & while [ ! -e "$D/bg" ]; do sleep 0.01; done; exit 3"#,
    ]));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        dir.path().join("bg-done").exists(),
        "baton returned before the background job had ended"
    );
    assert!(keys(&etcd, "background/").is_empty());
}

/// CMD's exit code passes through; a missing CMD is 127, a non-executable one 126; each
/// with one line on stderr, and the lock is released every time.
#[test]
fn cmd_exit_codes() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("script.sh");
    std::fs::write(&not_executable, "#!/bin/sh\nexit 0\n").unwrap();
    let not_executable = not_executable.to_str().unwrap().to_string();
    let cases: [(&[&str], i32); 5] = [
        (&["sh", "-c", "exit 7"], 7),
        (&["true"], 0),
        (&["no-such-command-for-baton"], 127),
        (&["/nonexistent/dir/cmd"], 127),
        (&[not_executable.as_str()], 126),
    ];
    for (cmd, code) in cases {
        let mut args = vec!["lock", "codes", "--"];
        args.extend_from_slice(cmd);
        let (out, _) = run(baton(&etcd.endpoint()).args(&args));
        assert_eq!(out.status.code(), Some(code), "{cmd:?}: {out:?}");
        if code >= 126 {
            let err = stderr_lines(&out);
            assert_eq!(err.len(), 1, "{err:?}");
        }
        assert!(
            keys(&etcd, "codes/").is_empty(),
            "{cmd:?} left the lock held"
        );
    }
}

/// CMD's environment has BATON_LOCK_KEY and BATON_FENCING_TOKEN, and on etcd
/// ETCD_LOCK_KEY and ETCD_LOCK_REV, naming the key Baton created and its create revision
/// (uncontended, the revision of the grant is the key's create revision).
#[test]
fn env_vars_name_the_key_baton_created() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "envy",
        "--",
        "sh",
        "-c",
        r#"env | grep -E '^(BATON|ETCD)_(LOCK|FENCING)' > "$D/env.tmp"; mv "$D/env.tmp" "$D/env"; i=0; while [ ! -e "$D/go" ] && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done"#,
    ]));
    let env = wait_for_file(&dir.path().join("env"));
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing from {env}"))
            .to_string()
    };
    let on_etcd = keys(&etcd, "envy/");
    assert_eq!(on_etcd.len(), 1);
    assert_eq!(var("ETCD_LOCK_KEY"), on_etcd[0]);
    assert_eq!(var("BATON_LOCK_KEY"), on_etcd[0]);
    let rev = create_revision(&etcd, &on_etcd[0]);
    assert_eq!(var("ETCD_LOCK_REV"), rev.to_string());
    assert_eq!(var("BATON_FENCING_TOKEN"), rev.to_string());
    std::fs::write(dir.path().join("go"), "").unwrap();
    assert_eq!(holder.code(), 0);
}

/// A waiter's ETCD_LOCK_REV is the revision at which it was granted, as etcdctl lock sets
/// it (Go's `Mutex.Header().Revision`): after its predecessor's release, so larger than its
/// own key's create revision (BATON_FENCING_TOKEN) and than its predecessor's ETCD_LOCK_REV.
#[test]
fn a_waiters_etcd_lock_rev_is_the_revision_of_its_grant() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let script = |file: &str| {
        format!(
            r#"echo "$ETCD_LOCK_REV $BATON_FENCING_TOKEN" > "$D/{file}.tmp"; mv "$D/{file}.tmp" "$D/{file}"; i=0; while [ ! -e "$D/go-{file}" ] && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done"#
        )
    };
    let mut first = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "granted",
        "--",
        "sh",
        "-c",
        &script("first"),
    ]));
    let first_vars = wait_for_file(&dir.path().join("first"));
    let mut second = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "granted",
        "--",
        "sh",
        "-c",
        &script("second"),
    ]));
    wait_until("the second waiter to queue", || {
        keys(&etcd, "granted/").len() == 2
    });
    std::fs::write(dir.path().join("go-first"), "").unwrap();
    assert_eq!(first.code(), 0);
    let second_vars = wait_for_file(&dir.path().join("second"));
    std::fs::write(dir.path().join("go-second"), "").unwrap();
    assert_eq!(second.code(), 0);
    let numbers = |vars: &str| -> (i64, i64) {
        let (rev, token) = vars.trim().split_once(' ').unwrap();
        (rev.parse().unwrap(), token.parse().unwrap())
    };
    let (first_rev, first_token) = numbers(&first_vars);
    let (second_rev, second_token) = numbers(&second_vars);
    // Uncontended, the grant's revision is the key's create revision.
    assert_eq!(first_rev, first_token);
    assert!(second_token > first_token);
    assert!(
        second_rev > second_token && second_rev > first_rev,
        "the waiter's ETCD_LOCK_REV {second_rev} (token {second_token}, first holder's \
         {first_rev})"
    );
}

/// A waiter whose session is lost (its lease revoked) never held the lock and never ran
/// CMD: it exits 125 saying so, not 122 ("lost while held").
#[test]
fn waiter_whose_lease_is_revoked_exits_125() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let holder = Proc::spawn(baton(&etcd.endpoint()).args(["lock", "queued"]));
    let (key, _) = parse_acquired(&holder.line());
    let mut waiter = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "queued",
        "--",
        "sh",
        "-c",
        r#"touch "$D/ran""#,
    ]));
    revoke_waiter_and_expect_125(
        &etcd,
        "queued/",
        &key,
        &mut waiter,
        "baton: session lost while waiting for lock \"queued\"",
    );
    assert!(!dir.path().join("ran").exists(), "CMD ran");
    assert_eq!(keys(&etcd, "queued/"), [key]);
}

/// A waiter whose key is deleted (an admin's `etcdctl del`; its session alive) never held
/// the lock: it exits 125 saying its key was deleted, not that its session was lost.
#[test]
fn waiter_whose_key_is_deleted_exits_125() {
    let etcd = etcd();
    let holder = Proc::spawn(baton(&etcd.endpoint()).args(["lock", "kdl"]));
    let (key, _) = parse_acquired(&holder.line());
    let mut waiter = Proc::spawn(baton(&etcd.endpoint()).args(["lock", "kdl", "--", "true"]));
    delete_waiter_key_and_expect_125(&etcd, "kdl/", &key, &mut waiter, "for lock \"kdl\"");
    assert_eq!(keys(&etcd, "kdl/"), [key]);
}

/// A `baton lock` whose CMD writes its pid to `$D/pid` and its key to `$D/key`, then
/// appends `A` to `$D/log` every 50 ms; the pids of baton and CMD, and the key.
/// `baton lock` holding NAME while CMD appends to `DIR/log`, as a shell's job would run it:
/// in a process group of its own (its parent, this test, can continue it), or, with
/// `setsid`, in a session of its own, as a service would.
fn ticking_holder(etcd: &EtcdServer, dir: &Path, name: &str, ttl: &str) -> (Proc, u32, String) {
    ticking_holder_in(etcd, dir, name, ttl, false)
}

fn ticking_holder_in(
    etcd: &EtcdServer,
    dir: &Path,
    name: &str,
    ttl: &str,
    setsid: bool,
) -> (Proc, u32, String) {
    use std::os::unix::process::CommandExt;
    let mut command = baton(&etcd.endpoint());
    if setsid {
        // SAFETY: setsid(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    } else {
        command.process_group(0);
    }
    let holder = Proc::spawn(command.env("D", dir).args([
        "lock",
        name,
        "--ttl",
        ttl,
        "--grace",
        "2s",
        "--",
        "sh",
        "-c",
        r#"echo $$ > "$D/pid"; echo "$BATON_LOCK_KEY" > "$D/key"; while :; do echo A >> "$D/log"; sleep 0.05; done"#,
    ]));
    let key = wait_for_file(&dir.join("key")).trim().to_string();
    let pid: u32 = wait_for_file(&dir.join("pid")).trim().parse().unwrap();
    wait_until("CMD writing", || file_size(&dir.join("log")) > 0);
    (holder, pid, key)
}

/// Ctrl-Z (SIGTSTP) stops CMD's process group along with baton, as a shell's job control
/// would: CMD must not run on while baton's keep-alives are stopped. SIGCONT resumes both
/// while the lock is still held.
#[test]
fn sigtstp_stops_cmd_and_sigcont_resumes_it() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (mut holder, cmd, _) = ticking_holder(&etcd, dir.path(), "tstp", "10s");

    holder.signal(libc::SIGTSTP);
    wait_until("baton stopped", || proc_state(holder.pid()) == Some('T'));
    wait_until("CMD stopped", || group_stopped(cmd));
    std::thread::sleep(Duration::from_millis(200));
    let stopped_at = file_size(&log);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        file_size(&log),
        stopped_at,
        "CMD kept writing while stopped"
    );

    holder.signal(libc::SIGCONT);
    wait_until("CMD running again", || proc_state(cmd) != Some('T'));
    wait_until("CMD writing again", || file_size(&log) > stopped_at);
    assert!(holder.child.try_wait().unwrap().is_none(), "baton exited");

    holder.signal(libc::SIGTERM);
    assert_eq!(holder.code(), 128 + libc::SIGTERM);
    assert!(!alive(cmd), "CMD still runs");
    assert!(keys(&etcd, "tstp/").is_empty());
}

/// Under setsid (a service, a cron job: an orphaned process group, whose stop signals the
/// kernel discards), nothing could continue a stopped baton: a stop signal is ignored, and
/// baton and CMD run on, instead of freezing for good.
#[test]
fn a_stop_signal_is_ignored_where_nothing_could_continue() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (mut holder, cmd, _) = ticking_holder_in(&etcd, dir.path(), "tstp-setsid", "10s", true);
    for signal in [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU] {
        holder.signal(signal);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(proc_state(holder.pid()), Some('T'), "baton stopped");
    assert_ne!(proc_state(cmd), Some('T'), "CMD stopped");
    let size = file_size(&log);
    wait_until("CMD writing on", || file_size(&log) > size);
    holder.signal(libc::SIGTERM);
    assert_eq!(holder.code(), 128 + libc::SIGTERM);
    assert!(!alive(cmd), "CMD still runs");
    assert!(keys(&etcd, "tstp-setsid/").is_empty());
}

/// A lease revoked while baton and CMD are stopped (SIGTSTP): on SIGCONT, CMD is killed
/// without running on, and baton says so and exits 122.
#[test]
fn lock_lost_while_stopped_kills_cmd_on_sigcont() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (mut holder, cmd, key) = ticking_holder(&etcd, dir.path(), "tstp-lost", "10s");

    holder.signal(libc::SIGTSTP);
    wait_until("baton stopped", || proc_state(holder.pid()) == Some('T'));
    wait_until("CMD stopped", || group_stopped(cmd));
    std::thread::sleep(Duration::from_millis(200));
    let stopped_at = file_size(&log);
    revoke(&etcd, &key);
    std::thread::sleep(Duration::from_millis(300));

    holder.signal(libc::SIGCONT);
    let status = holder.wait(Duration::from_secs(5)).expect("baton exits");
    assert_eq!(status.code(), Some(122));
    assert!(!alive(cmd), "CMD still runs");
    assert_eq!(file_size(&log), stopped_at, "CMD ran on after the loss");
    let err = holder.stderr_after_exit();
    assert!(
        err.iter().any(|l| l.starts_with("lock lost while stopped")),
        "{err:?}"
    );
}

/// The reviewer's case: stopped (SIGTSTP) past its TTL, the lock goes to another process;
/// the stopped holder's CMD never runs alongside it, and is killed on SIGCONT.
#[test]
fn stopped_past_ttl_never_runs_cmd_beside_the_next_holder() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (mut holder, cmd, _) = ticking_holder(&etcd, dir.path(), "tstp-ttl", "2s");

    holder.signal(libc::SIGTSTP);
    wait_until("baton stopped", || proc_state(holder.pid()) == Some('T'));
    wait_until("CMD stopped", || group_stopped(cmd));
    std::thread::sleep(Duration::from_secs(4));
    assert!(group_stopped(cmd), "CMD no longer stopped");
    let (out, _) = run(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "--try",
        "tstp-ttl",
        "--",
        "sh",
        "-c",
        r#"echo B >> "$D/log"; sleep 0.5; echo B >> "$D/log""#,
    ]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.ends_with("B\nB\n"),
        "CMD ran beside the next holder:\n{text}"
    );

    holder.signal(libc::SIGCONT);
    let status = holder.wait(Duration::from_secs(5)).expect("baton exits");
    assert_eq!(status.code(), Some(122));
    assert!(!alive(cmd), "CMD still runs");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.ends_with("B\nB\n"),
        "CMD ran on after the loss:\n{text}"
    );
}

/// `acquired KEY token=N`.
fn parse_acquired(line: &str) -> (String, i64) {
    let rest = line
        .strip_prefix("acquired ")
        .unwrap_or_else(|| panic!("not an acquired line: {line}"));
    let (key, token) = rest.split_once(" token=").unwrap();
    (key.to_string(), token.parse().unwrap())
}

/// `--json`'s `ttl_secs` is the lease's TTL in whole seconds rounded up, as etcd grants it
/// (`--ttl 2500ms`: a 3 s lease), not rounded down (before: 2).
#[test]
fn json_ttl_secs_is_rounded_up() {
    let etcd = etcd();
    let mut held =
        Proc::spawn(baton(&etcd.endpoint()).args(["--json", "lock", "--ttl", "2500ms", "ttl-r"]));
    let line: serde_json::Value = serde_json::from_str(&held.line()).unwrap();
    assert_eq!(line["event"], "acquired", "{line}");
    assert_eq!(line["ttl_secs"], 3, "{line}");
    held.signal(libc::SIGTERM);
    held.code();
}

/// While `baton` lives, its guardian process (which ends CMD's group if `baton` dies) only
/// waits: it reads nothing but what `baton` tells it. Before, it scanned the whole of /proc
/// every 100 ms for CMD's whole life (one /proc/N/stat read per process on the host each
/// time: ~12 % of a core with 1,580 processes). The test counts what the guardian reads
/// over 2 s (/proc/PID/io), which does not depend on how busy the machine is.
#[test]
fn the_guardian_reads_nothing_while_baton_lives() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "idle-guardian",
        "--",
        "sh",
        "-c",
        r#"echo x > "$D/ready"; exec sleep 30"#,
    ]));
    wait_for_file(&dir.path().join("ready"));
    let guardian = guardian_of(holder.pid());
    // Past its start (the loader and the runtime read a few KiB).
    std::thread::sleep(Duration::from_millis(500));
    let (bytes, calls) = reads_of(guardian);
    std::thread::sleep(Duration::from_secs(2));
    let (bytes_after, calls_after) = reads_of(guardian);
    let (bytes, calls) = (bytes_after - bytes, calls_after - calls);
    assert!(
        bytes < 1000 && calls < 20,
        "the guardian read {bytes} bytes in {calls} calls in 2 s"
    );
    holder.signal(libc::SIGTERM);
    assert_eq!(holder.code(), 128 + libc::SIGTERM);
}

/// SIGSTOP of `baton` alone (not of CMD's group, as Ctrl-Z would): its keep-alives stop and
/// the lease expires while CMD runs on. The guardian ends CMD's group (SIGKILL) once the
/// lock's local deadline is near without word from `baton`, and `baton` is seen stopped:
/// CMD never runs beside the next holder. Before, it ran on until `baton` was continued.
/// On SIGCONT `baton` finds the lock lost and exits 122.
#[test]
fn sigstop_of_baton_alone_never_runs_cmd_beside_the_next_holder() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (mut holder, cmd, _) = ticking_holder(&etcd, dir.path(), "stop-alone", "2s");
    // In charge from its start, a few ms after CMD's.
    guardian_of(holder.pid());

    holder.signal(libc::SIGSTOP);
    wait_until("baton stopped", || proc_state(holder.pid()) == Some('T'));
    let (out, _) = run(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "--timeout",
        "10s",
        "stop-alone",
        "--",
        "sh",
        "-c",
        r#"echo B >> "$D/log"; sleep 0.5; echo B >> "$D/log""#,
    ]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&log).unwrap();
    let tail: Vec<&str> = text.lines().rev().take(8).collect();
    assert!(
        text.ends_with("A\nB\nB\n"),
        "CMD ran beside the next holder; the log's last lines, last first: {tail:?}"
    );
    // Killed: a zombie until baton, stopped, reaps it.
    assert!(
        matches!(proc_state(cmd), None | Some('Z')),
        "CMD still runs"
    );

    holder.signal(libc::SIGCONT);
    let status = holder.wait(Duration::from_secs(5)).expect("baton exits");
    assert_eq!(status.code(), Some(122));
    let err = holder.stderr_after_exit();
    assert!(err.iter().any(|l| l.starts_with("lock lost")), "{err:?}");
}

/// A signal ignored when `baton` starts (`nohup` ignores SIGHUP, a shell's `trap '' INT`,
/// a non-interactive shell's background job ignores SIGINT and SIGQUIT) stays ignored, by
/// `baton` and by CMD, as for any command. Before, `baton` caught it anyway (tokio's handler
/// replaces SIG_IGN) and passed it to CMD, which died of it: `nohup baton lock … ` then
/// `kill -HUP` exited 129.
#[test]
fn signals_ignored_at_start_stay_ignored() {
    use std::os::unix::process::CommandExt;
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
        let ready = dir.path().join(format!("ready-{sig}"));
        let mut command = baton(&etcd.endpoint());
        command.env("READY", &ready).args([
            "lock",
            &format!("ignored-{sig}"),
            "--",
            "sh",
            "-c",
            r#"echo x > "$READY"; sleep 1; echo survived"#,
        ]);
        // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            command.pre_exec(move || {
                libc::signal(sig, libc::SIG_IGN);
                Ok(())
            });
        }
        let mut holder = Proc::spawn(&mut command);
        wait_for_file(&ready);
        holder.signal(sig);
        assert_eq!(
            holder.code(),
            0,
            "signal {sig}: {:?}",
            holder.stderr_so_far()
        );
        assert_eq!(holder.line(), "survived", "signal {sig}");
    }
}

/// CMD gets the variables of its own hold only. Those `baton` sets for other holds, left in
/// the environment by an outer `baton` (`baton lock outer -- baton elect inner -- CMD`),
/// are removed, not passed on stale: before, `baton elect` passed the outer lock's
/// BATON_LOCK_KEY, ETCD_LOCK_KEY and ETCD_LOCK_REV, and `baton sem` (which has no fencing
/// token) its BATON_FENCING_TOKEN, as if they were the inner hold's.
#[test]
fn cmd_gets_no_stale_variables_of_an_outer_hold() {
    const VARS: [&str; 7] = [
        "BATON_FENCING_TOKEN",
        "BATON_LOCK_KEY",
        "ETCD_LOCK_KEY",
        "ETCD_LOCK_REV",
        "BATON_ELECTION_KEY",
        "BATON_SEM_KEY",
        "BATON_SEM_PERMITS",
    ];
    let etcd = etcd();
    let script = VARS.map(|v| format!("echo {v}=${{{v}-unset}}")).join("; ");
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["lock", "stale-l"],
            &[
                "BATON_FENCING_TOKEN",
                "BATON_LOCK_KEY",
                "ETCD_LOCK_KEY",
                "ETCD_LOCK_REV",
            ],
        ),
        (
            &["elect", "stale-e", "v"],
            &["BATON_FENCING_TOKEN", "BATON_ELECTION_KEY"],
        ),
        (
            &["sem", "stale-s", "--permits", "2"],
            &["BATON_SEM_KEY", "BATON_SEM_PERMITS"],
        ),
    ];
    for (args, own) in cases {
        let mut command = baton(&etcd.endpoint());
        for var in VARS {
            command.env(var, "stale");
        }
        let (out, _) = run(command.args(args).args(["--", "sh", "-c", &script]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        for line in stdout(&out).lines() {
            let (var, value) = line.split_once('=').unwrap();
            if own.contains(&var) {
                assert!(value != "stale" && value != "unset", "{args:?}: {line}");
            } else {
                assert_eq!(value, "unset", "{args:?}: {var} passed on");
            }
        }
    }
}

/// A CMD stopped while baton runs (it read from the terminal and got SIGTTIN, or an
/// operator's `kill -STOP`) is continued after a forwarded SIGTERM, as shells do, and
/// ends: a stopped process keeps the signal pending, and baton waited for CMD, holding the
/// lock, for ever (found by a review).
#[test]
fn a_forwarded_sigterm_ends_a_stopped_cmd() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "stopped-cmd",
        "--",
        "sh",
        "-c",
        // As `read` from the terminal in a background group does (SIGTTIN).
        r#"echo $$ > "$D/pid"; kill -TTIN $$; echo resumed > "$D/resumed""#,
    ]));
    let pid: u32 = wait_for_file(&dir.path().join("pid"))
        .trim()
        .parse()
        .unwrap();
    wait_until("CMD to be stopped", || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(')').unwrap().1.trim_start().starts_with('T'))
            .unwrap_or(false)
    });
    holder.signal(libc::SIGTERM);
    let status = holder.wait(Duration::from_secs(5));
    let held = keys(&etcd, "stopped-cmd/");
    assert!(
        status.is_some(),
        "baton did not end 5 s after SIGTERM: CMD is still stopped, and the lock held ({held:?})"
    );
    assert_eq!(status.unwrap().code(), Some(143));
    assert!(held.is_empty(), "{held:?}");
}

/// The guardian is `baton` itself. Once the binary has been replaced on disk (a package
/// upgrade while a `baton lock` waits for its lock, or holds it), `current_exe()` is
/// `/…/baton (deleted)`, which cannot be run: the guardian did not start (a trace line
/// said so), and a `baton` killed with SIGKILL left CMD's background jobs running on
/// without the lock (found by a review). It is started from `/proc/self/exe` now.
#[test]
fn the_guardian_starts_after_the_binary_was_replaced() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("baton");
    std::fs::copy(env!("CARGO_BIN_EXE_baton"), &bin).unwrap();
    let holder = Proc::spawn(baton(&etcd.endpoint()).args(["lock", "upgraded"]));
    let _ = holder.line();
    let cmd = baton(&etcd.endpoint());
    let mut waiter = std::process::Command::new(&bin);
    waiter
        .envs(cmd.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .env("D", dir.path())
        .stdin(std::process::Stdio::null())
        .args([
            "lock",
            "upgraded",
            "--",
            "sh",
            "-c",
            // A background job, as a long job starts; then CMD waits.
            r#"(sleep 30; echo orphan ran on > "$D/orphan") & echo $! > "$D/bg"; sleep 30"#,
        ]);
    let mut waiter = Proc::spawn(&mut waiter);
    wait_until("the waiter to queue", || {
        keys(&etcd, "upgraded/").len() == 2
    });
    // The upgrade: a new binary renamed over the old one.
    let new = dir.path().join("baton.new");
    std::fs::copy(env!("CARGO_BIN_EXE_baton"), &new).unwrap();
    std::fs::rename(&new, &bin).unwrap();
    holder.signal(libc::SIGTERM);
    let bg: u32 = wait_for_file(&dir.path().join("bg"))
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    waiter.signal(libc::SIGKILL);
    let _ = waiter.wait(STEP);
    // The guardian ends CMD's group (background job included) at once.
    let ended = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if !std::fs::read_to_string(format!("/proc/{bg}/stat"))
                .map(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
                .unwrap_or(false)
            {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    if !ended {
        // Its whole group (the job's own `sleep` too).
        let stat = std::fs::read_to_string(format!("/proc/{bg}/stat")).unwrap_or_default();
        if let Some(pgid) = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(2))
        {
            unsafe { libc::kill(-pgid.parse::<i32>().unwrap(), libc::SIGKILL) };
        }
    }
    assert!(
        ended,
        "CMD's background job runs on after baton was SIGKILLed: no guardian was started"
    );
}

/// SIGUSR1 (a log rotation's `pkill -USR1 -f myjob`, which matches `baton lock x -- myjob`
/// too) is forwarded to CMD, as SIGINT, SIGTERM, SIGHUP and SIGQUIT are. It killed `baton`
/// by its default action: CMD got SIGTERM from its death signal instead of the SIGUSR1 it
/// traps, and the lock stayed held until the lease expired (found by a review).
#[test]
fn sigusr1_is_forwarded_not_fatal() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Proc::spawn(baton(&etcd.endpoint()).env("D", dir.path()).args([
        "lock",
        "--ttl",
        "30s",
        "usr",
        "--",
        "sh",
        "-c",
        r#"trap 'echo usr1 > "$D/usr1"; exit 0' USR1; echo x > "$D/ready"; while :; do sleep 0.05; done"#,
    ]));
    wait_for_file(&dir.path().join("ready"));
    holder.signal(libc::SIGUSR1);
    let status = holder.wait(STEP).unwrap();
    assert_eq!(status.code(), Some(0), "baton: {status:?}");
    assert!(dir.path().join("usr1").exists(), "CMD never got SIGUSR1");
    assert!(keys(&etcd, "usr/").is_empty(), "the lock was left held");
}

/// `baton lock outer -- baton lock inner -- CMD`, the nesting the supervisor strips outer
/// variables for, and `kill -9` of the outer baton: the outer's guardian ended the outer
/// CMD's process group (the inner baton) by the outer lock's deadline, but the inner CMD
/// has a process group of its own, and ran on (given the inner `--grace`, bounded only by
/// the inner lock's deadline) after the outer lease expired and the next outer holder
/// started (found by review). The groups of the descendants are ended too now.
#[test]
fn a_nested_batons_cmd_never_runs_beside_the_next_outer_holder() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let pidfile = dir.path().join("inner-pid");
    let stubborn = format!(
        r#"trap '' TERM; echo $$ > '{}'; while :; do echo A >> '{}'; sleep 0.05; done"#,
        pidfile.display(),
        log.display()
    );
    let next = format!(
        r#"for i in 1 2 3 4 5 6 7 8 9 10; do echo B >> '{}'; sleep 0.1; done"#,
        log.display()
    );
    let exe = env!("CARGO_BIN_EXE_baton");
    let mut a = Proc::spawn(baton(&etcd.endpoint()).args([
        "lock", "--ttl", "2s", "outer", "--", exe, "lock", "--ttl", "10s", "inner", "--", "sh",
        "-c", &stubborn,
    ]));
    let inner_pid: i32 = wait_for_file(&pidfile).trim().parse().unwrap();
    let mut b = Proc::spawn(
        baton(&etcd.endpoint()).args(["lock", "--ttl", "2s", "outer", "--", "sh", "-c", &next]),
    );
    std::thread::sleep(Duration::from_millis(500));
    a.signal(libc::SIGKILL);
    let _ = a.wait(STEP);
    assert_eq!(b.code(), 0);
    let text = std::fs::read_to_string(&log).unwrap();
    // Clean up whatever still runs.
    // SAFETY: kill(2).
    unsafe { libc::kill(-inner_pid, libc::SIGKILL) };
    assert_no_a_after_b(&text, "killed");
}

/// Ctrl-Z (SIGTSTP) of an outer `baton` stopped the outer CMD's group only (`stop` sends
/// SIGSTOP to it), which holds the inner `baton` alone: the nested CMD, in a group of its
/// own, ran on while no keep-alive of the outer lock was sent; the outer lease expired, the
/// next outer holder started, and the nested CMD ran beside it until the inner lock's
/// deadline (found by review). The guardian now stops what left the group.
#[test]
fn ctrl_z_of_an_outer_baton_stops_the_nested_cmd_too() {
    use std::os::unix::process::CommandExt;
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let pidfile = dir.path().join("inner-pid");
    let ticking = format!(
        r#"echo $$ > '{}'; while :; do echo A >> '{}'; sleep 0.05; done"#,
        pidfile.display(),
        log.display()
    );
    let exe = env!("CARGO_BIN_EXE_baton");
    let mut command = baton(&etcd.endpoint());
    // A job of a shell: job control applies (as `sigtstp_stops_cmd_and_sigcont_resumes_it`).
    command.process_group(0);
    let mut a = Proc::spawn(command.args([
        "lock",
        "--ttl",
        "2s",
        "tstp-outer",
        "--",
        exe,
        "lock",
        "--ttl",
        "10s",
        "tstp-inner",
        "--",
        "sh",
        "-c",
        &ticking,
    ]));
    let inner_pid: i32 = wait_for_file(&pidfile).trim().parse().unwrap();
    wait_until("nested CMD writing", || file_size(&log) > 0);
    a.signal(libc::SIGTSTP);
    wait_until("outer baton stopped", || proc_state(a.pid()) == Some('T'));
    // Past the outer TTL: the outer lock goes to the next holder.
    std::thread::sleep(Duration::from_secs(4));
    let (out, _) = run(baton(&etcd.endpoint()).args([
        "lock",
        "--try",
        "tstp-outer",
        "--",
        "sh",
        "-c",
        &format!(
            r#"echo B >> '{0}'; sleep 0.5; echo B >> '{0}'"#,
            log.display()
        ),
    ]));
    let text = std::fs::read_to_string(&log).unwrap();
    // Clean up.
    // SAFETY: kill(2).
    unsafe { libc::kill(-inner_pid, libc::SIGKILL) };
    a.signal(libc::SIGKILL);
    let _ = a.wait(STEP);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_no_a_after_b(&text, "stopped");
}

/// On a loss of the outer lock, the nested CMD got SIGTERM twice (found by review): once
/// from the outer `baton` directly (entry 79's first walk), once forwarded by the inner
/// `baton`. A CMD that shuts down gracefully on the first SIGTERM and at once on the
/// second (Go's `signal.NotifyContext` idiom, many servers) lost its `--grace`.
#[test]
fn a_loss_of_the_outer_lock_sends_the_nested_cmd_one_sigterm() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("terms");
    let pidfile = dir.path().join("inner-pid");
    // Counts each SIGTERM (perl runs its handler once per delivery), keeps running.
    let counting = format!(
        r#"$SIG{{TERM}} = sub {{ open(my $f, '>>', '{}'); print $f "T\n"; close($f) }}; open(my $p, '>', '{}'); print $p "$$\n"; close($p); while (1) {{ select(undef, undef, undef, 0.02) }}"#,
        log.display(),
        pidfile.display()
    );
    let exe = env!("CARGO_BIN_EXE_baton");
    let mut a = Proc::spawn(baton(&etcd.endpoint()).args([
        "lock",
        "--grace",
        "2s",
        "term-outer",
        "--",
        exe,
        "lock",
        "term-inner",
        "--",
        "perl",
        "-e",
        &counting,
    ]));
    let inner_pid: i32 = wait_for_file(&pidfile).trim().parse().unwrap();
    let key = keys(&etcd, "term-outer/")
        .into_iter()
        .next()
        .expect("the outer key");
    revoke(&etcd, &key);
    let status = a.wait(STEP).expect("outer baton exits");
    let terms = std::fs::read_to_string(&log).unwrap_or_default();
    // SAFETY: kill(2).
    unsafe { libc::kill(inner_pid, libc::SIGKILL) };
    assert_eq!(status.code(), Some(122));
    assert_eq!(
        terms.lines().count(),
        1,
        "the nested CMD got {} SIGTERMs for one loss",
        terms.lines().count()
    );
}

/// A `setsid` child of CMD (a group of its own, its parent in CMD's group) gets SIGTERM on
/// a loss. With SIGTERM sent to CMD's group only (a first fix of a nested CMD's double
/// SIGTERM) it ran on beside the next holder: the SIGKILL at the end of `--grace` never
/// came, as CMD exited within it and the orphan was no longer found (found by review).
#[test]
fn a_setsid_child_of_cmd_ends_on_a_loss() {
    let (code, alive, before, after) = setsid_child_after_a_loss(false);
    assert_eq!(code, Some(122));
    assert!(
        !alive && before == after,
        "the setsid child of CMD runs on after the loss (alive={alive}, log {before} -> {after} bytes)"
    );
}

/// A group that left CMD's and that CMD (or the user) stopped on purpose stays stopped
/// through Ctrl-Z and `fg` of `baton`: the guardian SIGSTOPped every group apart on `S`
/// and SIGCONTed them all on `R`, already-stopped ones included (found by review).
#[test]
fn ctrl_z_and_fg_leave_a_group_cmd_stopped_on_purpose_stopped() {
    use std::os::unix::process::CommandExt;
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let pidfile = dir.path().join("child-pid");
    let script = format!(
        r#"setsid sh -c 'echo $$ > {0}; while :; do echo A >> {1}; sleep 0.05; done' & wait"#,
        pidfile.display(),
        log.display()
    );
    let mut command = baton(&etcd.endpoint());
    command.process_group(0);
    let mut a = Proc::spawn(command.args(["lock", "stopped-apart", "--", "sh", "-c", &script]));
    let child: i32 = wait_for_file(&pidfile).trim().parse().unwrap();
    wait_until("setsid child writing", || file_size(&log) > 0);
    // Stopped on purpose, before any Ctrl-Z.
    // SAFETY: kill(2).
    unsafe { libc::kill(-child, libc::SIGSTOP) };
    // Its leader may show `D` rather than `T` (the stop landed in a `vfork`).
    wait_until("child stopped", || group_stopped(child as u32));
    a.signal(libc::SIGTSTP);
    wait_until("baton stopped", || proc_state(a.pid()) == Some('T'));
    std::thread::sleep(Duration::from_millis(300));
    a.signal(libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(1000));
    let stopped = group_stopped(child as u32);
    // SAFETY: kill(2).
    unsafe { libc::kill(-child, libc::SIGKILL) };
    a.signal(libc::SIGTERM);
    let _ = a.wait(STEP);
    assert!(
        stopped,
        "the group stopped on purpose was continued by fg of baton"
    );
}

/// In the log of ticks `text`, no `A` (the nested CMD of the first outer holder, `how`:
/// killed or stopped) after the first `B` (the next outer holder's CMD).
fn assert_no_a_after_b(text: &str, how: &str) {
    let first_b = text.find('B').expect("B never ran");
    let overlap = text[first_b..].matches('A').count();
    assert_eq!(
        overlap, 0,
        "the nested CMD of the {how} outer holder ran beside the next outer holder's CMD ({overlap} ticks):\n{text}"
    );
}

/// A `setsid` child of a nested `baton`'s CMD gets SIGTERM on a loss of the outer lock, as a
/// `setsid` child of the outer CMD does (`a_setsid_child_of_cmd_ends_on_a_loss`). The outer
/// `baton` skips below the nested one, counting on it to forward the SIGTERM, but a
/// forwarded signal went to the nested CMD's group only: the nested CMD exited, the orphan
/// was out of reach of the outer's SIGKILL, and ran on beside the next outer holder (found by
/// review).
#[test]
fn a_setsid_child_of_a_nested_cmd_ends_on_a_loss_of_the_outer_lock() {
    let (code, alive, before, after) = setsid_child_after_a_loss(true);
    assert_eq!(code, Some(122));
    assert!(
        !alive && before == after,
        "the setsid child of the nested CMD runs on after the outer loss (alive={alive}, log {before} -> {after} bytes)"
    );
}

/// `baton lock --grace 5s` (`nested`: around a nested `baton lock`) of a CMD that starts a
/// `setsid` child writing to a log; the outer lock's lease revoked. `baton`'s exit code,
/// then 1 s later: whether the child still runs, and the log's size then and 0.5 s after.
fn setsid_child_after_a_loss(nested: bool) -> (Option<i32>, bool, u64, u64) {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let pidfile = dir.path().join("child-pid");
    let script = format!(
        r#"setsid sh -c 'echo $$ > {0}; while :; do echo A >> {1}; sleep 0.05; done' & wait"#,
        pidfile.display(),
        log.display()
    );
    let exe = env!("CARGO_BIN_EXE_baton");
    let mut args = vec!["lock", "--grace", "5s", "setsid-outer", "--"];
    if nested {
        args.extend([exe, "lock", "setsid-inner", "--"]);
    }
    args.extend(["sh", "-c", &script]);
    let mut a = Proc::spawn(baton(&etcd.endpoint()).args(args));
    let child: i32 = wait_for_file(&pidfile).trim().parse().unwrap();
    wait_until("setsid child writing", || file_size(&log) > 0);
    let key = keys(&etcd, "setsid-outer/")
        .into_iter()
        .next()
        .expect("the outer key");
    revoke(&etcd, &key);
    let status = a.wait(STEP).expect("baton exits");
    std::thread::sleep(Duration::from_secs(1));
    let before = file_size(&log);
    std::thread::sleep(Duration::from_millis(500));
    let after = file_size(&log);
    // Not gone, nor a zombie (reaped by whoever adopted it).
    let alive = !matches!(proc_state(child as u32), None | Some('Z'));
    // SAFETY: kill(2).
    unsafe { libc::kill(-child, libc::SIGKILL) };
    (status.code(), alive, before, after)
}

/// The final SIGKILL freezes CMD's group before its /proc walk, but not the groups apart it
/// then finds: a `setsid` child of CMD that starts `setsid` children of its own (a process
/// manager) kept doing so during the walk, and those it started meanwhile were found by
/// nobody: their parent killed, they ran on, orphaned, after `baton` exited 122 (found by
/// review). Many idle processes make the walk take as long as on a busy machine.
#[test]
fn the_final_sigkill_reaches_what_a_group_apart_starts_during_the_walk() {
    let etcd = etcd();
    // A group apart that ignores SIGTERM and starts SIGTERM-proof `setsid` sleepers as
    // fast as it can.
    let mut walk = BusyWalk::new("trap '' TERM; echo x", "");
    let script = format!(
        r#"trap '' TERM; setsid sh '{}' & while :; do sleep 1; done"#,
        walk.manager.display()
    );
    let mut a = Proc::spawn(baton(&etcd.endpoint()).env("MARK", &walk.mark).args([
        "lock",
        "--grace",
        "0s",
        "walk-race",
        "--",
        "sh",
        "-c",
        &script,
    ]));
    wait_for_file(&walk.ready);
    std::thread::sleep(Duration::from_millis(300));
    let key = keys(&etcd, "walk-race/")
        .into_iter()
        .next()
        .expect("the key");
    revoke(&etcd, &key);
    let status = a.wait(STEP).expect("baton exits");
    std::thread::sleep(Duration::from_millis(500));
    let all = walk.started();
    let survivors: Vec<i32> = all
        .iter()
        .copied()
        .filter(|&p| marked(p, &walk.mark))
        .collect();
    walk.end(&[]);
    assert_eq!(status.code(), Some(122));
    assert!(
        survivors.is_empty(),
        "{} of {} sleepers started by a group apart run on after the loss",
        survivors.len(),
        all.len()
    );
}

/// A process manager to be found by /proc walks made as slow as on a busy machine: 1,000
/// idle processes, and a script (`manager`) that writes a line to `ready` (`first`: the
/// commands before, ending in `echo …`), then starts `setsid` sleepers as fast as it can
/// (`pause` between them), each writing its pid to `pids`. Every process the test starts
/// has `MARK=mark` in its environment when started through `baton` with it.
struct BusyWalk {
    _dir: tempfile::TempDir,
    pids: std::path::PathBuf,
    ready: std::path::PathBuf,
    manager: std::path::PathBuf,
    mark: String,
    idle: Vec<std::process::Child>,
}

impl BusyWalk {
    fn new(first: &str, pause: &str) -> BusyWalk {
        let dir = tempfile::tempdir().unwrap();
        let (pids, ready) = (dir.path().join("pids"), dir.path().join("ready"));
        let idle = (0..1000)
            .filter_map(|_| std::process::Command::new("sleep").arg("60").spawn().ok())
            .collect();
        let manager = dir.path().join("manager.sh");
        std::fs::write(
            &manager,
            format!(
                "{first} > '{1}'; while :; do setsid sh -c 'echo $$ >> \"$0\"; exec sleep 60' '{0}' & {pause} done\n",
                pids.display(),
                ready.display()
            ),
        )
        .unwrap();
        let mark = dir.path().display().to_string();
        BusyWalk {
            _dir: dir,
            pids,
            ready,
            manager,
            mark,
            idle,
        }
    }

    /// The pids of the sleepers started so far.
    fn started(&self) -> Vec<i32> {
        std::fs::read_to_string(&self.pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .collect()
    }

    /// Kill the groups of the sleepers and of `more` that are still ours, and the idle
    /// processes.
    fn end(&mut self, more: &[i32]) {
        for p in self.started().into_iter().chain(more.iter().copied()) {
            if marked(p, &self.mark) {
                // SAFETY: kill(2).
                unsafe { libc::kill(-p, libc::SIGKILL) };
            }
        }
        for other in &mut self.idle {
            let _ = other.kill();
            let _ = other.wait();
        }
    }
}

/// On Ctrl-Z the guardian stops the groups apart from CMD's, but it walked /proc once: what
/// a group apart started during the walk (a process manager's `setsid` workers) was not
/// stopped and ran on while `baton` sent no keep-alive, beside the next holder until `fg`
/// (found by review).
#[test]
fn ctrl_z_stops_what_a_group_apart_starts_during_the_walk() {
    use std::os::unix::process::CommandExt;
    let etcd = etcd();
    let mut walk = BusyWalk::new("echo $$", "sleep 0.002;");
    let script = format!(
        r#"setsid sh '{}' & while :; do sleep 1; done"#,
        walk.manager.display()
    );
    let mut command = baton(&etcd.endpoint());
    command.env("MARK", &walk.mark).process_group(0);
    let mut a = Proc::spawn(command.args(["lock", "tstp-walk", "--", "sh", "-c", &script]));
    let manager_pid: i32 = wait_for_file(&walk.ready).trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    a.signal(libc::SIGTSTP);
    wait_until("baton stopped", || proc_state(a.pid()) == Some('T'));
    // Stopped, or blocked in a `vfork` whose child is (see `group_stopped`).
    wait_until("the manager stopped", || group_stopped(manager_pid as u32));
    std::thread::sleep(Duration::from_millis(500));
    let all = walk.started();
    let running: Vec<i32> = all
        .iter()
        .copied()
        .filter(|&p| matches!(proc_state(p as u32), Some('S' | 'R')) && marked(p, &walk.mark))
        .collect();
    // Clean up.
    a.signal(libc::SIGKILL);
    let _ = a.wait(STEP);
    std::thread::sleep(Duration::from_millis(500));
    walk.end(&[manager_pid]);
    assert!(
        running.is_empty(),
        "{} of {} workers started by a group apart run on while baton is stopped",
        running.len(),
        all.len()
    );
}

/// True if process `pid` runs and has `MARK=mark` in its environment: one of the test's own,
/// not a process that took a reused pid (pid_max may be 32768).
fn marked(pid: i32, mark: &str) -> bool {
    !matches!(proc_state(pid as u32), None | Some('Z'))
        && std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
            env.split(|&b| b == 0)
                .any(|var| var == format!("MARK={mark}").as_bytes())
        })
}

/// A group apart stopped on purpose whose leader is a shell blocked in a `vfork` (state `D`:
/// its child, stopped between `vfork` and `exec`, holds it) is stopped all the same; the
/// guardian's check looked at the leader's state only (`T`), so it took such a group for a
/// running one, and `fg` of `baton` continued it (found by review).
#[test]
fn ctrl_z_and_fg_leave_a_group_stopped_in_a_vfork_stopped() {
    use std::os::unix::process::CommandExt;
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child-pid");
    let script = format!(
        r#"setsid sh -c 'echo $$ > {0}; while :; do /bin/true; done' & wait"#,
        pidfile.display(),
    );
    let mut command = baton(&etcd.endpoint());
    command.process_group(0);
    let mut a = Proc::spawn(command.args(["lock", "vfork-apart", "--", "sh", "-c", &script]));
    let child: i32 = wait_for_file(&pidfile).trim().parse().unwrap();
    // Stop it on purpose until the stop lands inside a vfork.
    let mut in_vfork = false;
    for _ in 0..200 {
        // SAFETY: kill(2).
        unsafe { libc::kill(-child, libc::SIGSTOP) };
        wait_until("child stopped", || group_stopped(child as u32));
        if proc_state(child as u32) == Some('D') {
            in_vfork = true;
            break;
        }
        // SAFETY: kill(2).
        unsafe { libc::kill(-child, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(5));
    }
    a.signal(libc::SIGTSTP);
    wait_until("baton stopped", || proc_state(a.pid()) == Some('T'));
    std::thread::sleep(Duration::from_millis(300));
    a.signal(libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(1000));
    let stopped = group_stopped(child as u32);
    // SAFETY: kill(2).
    unsafe { libc::kill(-child, libc::SIGKILL) };
    a.signal(libc::SIGTERM);
    let _ = a.wait(STEP);
    assert!(
        in_vfork,
        "no stop landed inside a vfork: the shell does not use vfork"
    );
    assert!(
        stopped,
        "the group stopped on purpose (in a vfork) was continued by fg of baton"
    );
}

/// A `setsid` child CMD leaves behind on purpose (a daemon) is not left stopped when CMD
/// exits right after Ctrl-Z and `fg`: the guardian stops the groups apart on `S` and
/// continues them on the next word, but it walks /proc a few times first, and `baton`
/// killed it on exit before it read that word: the daemon stayed stopped for ever after
/// `baton` exited 0 (found by review). Idle processes make the walks take as long as on a
/// busy machine; each round is a chance for the race.
#[test]
fn a_daemon_cmd_leaves_is_not_left_stopped_by_ctrl_z_and_fg() {
    use std::os::unix::process::CommandExt;
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().display().to_string();
    let mut idle: Vec<std::process::Child> = (0..1000)
        .filter_map(|_| {
            std::process::Command::new("sleep")
                .arg("60")
                .env("MARK", &mark)
                .spawn()
                .ok()
        })
        .collect();
    let mut left_stopped = Vec::new();
    for round in 0..5 {
        let pidfile = dir.path().join(format!("daemon-{round}"));
        let go = dir.path().join(format!("go-{round}"));
        let script = format!(
            r#"setsid sh -c 'echo $$ > {0}; exec sleep 60' & while [ ! -e {1} ]; do sleep 0.01; done"#,
            pidfile.display(),
            go.display()
        );
        let mut command = baton(&etcd.endpoint());
        command.env("MARK", &mark).process_group(0);
        let mut a = Proc::spawn(command.args(["lock", "daemon-left", "--", "sh", "-c", &script]));
        let daemon: i32 = wait_for_file(&pidfile).trim().parse().unwrap();
        a.signal(libc::SIGTSTP);
        wait_until("baton stopped", || proc_state(a.pid()) == Some('T'));
        // CMD exits as soon as it is continued; `fg` at once.
        std::fs::write(&go, "").unwrap();
        a.signal(libc::SIGCONT);
        assert_eq!(a.wait(STEP).and_then(|s| s.code()), Some(0));
        std::thread::sleep(Duration::from_millis(500));
        if marked(daemon, &mark) && group_stopped(daemon as u32) {
            left_stopped.push(round);
        }
        // SAFETY: kill(2).
        unsafe { libc::kill(-daemon, libc::SIGKILL) };
    }
    for other in &mut idle {
        let _ = other.kill();
        let _ = other.wait();
    }
    assert!(
        left_stopped.is_empty(),
        "the daemon CMD left was stopped for ever after baton exited 0 (rounds {left_stopped:?})"
    );
}

/// Review (today2): as the hold ends, `baton` waited for its guardian to quit (up to 2 s)
/// in a blocking loop inside `Drop`, on its single-threaded runtime: no keep-alive was
/// sent meanwhile. A guardian slow to quit (busy walking /proc after a Ctrl-Z on a loaded
/// machine; here stopped) made a short TTL pass: `baton` told a CMD that ran its whole
/// course under the lock "lock lost" and exited 122.
#[test]
fn a_guardian_slow_to_quit_does_not_lose_a_short_lock() {
    let etcd = etcd();
    let script = r#"sleep 1.2; g=$(ps -eo pid=,args= | awk -v p="$PPID" '$2=="baton" && $3=="__baton-guardian" && $6==p {print $1}'); [ -n "$g" ] && kill -STOP $g"#;
    let started = Instant::now();
    let out = baton(&etcd.endpoint())
        .args(["lock", "--ttl", "2s", "short", "--", "sh", "-c", script])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "after {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
}

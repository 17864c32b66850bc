//! Bad input and unreachable backends: exit 125 with exactly one line on stderr, no panic,
//! no backtrace (even with RUST_BACKTRACE=1), and no waiting beyond the dial timeout.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;

fn assert_one_line_125_on(endpoints: &str, args: &[&str], expect: &str) {
    let (out, took) = run(baton(endpoints).args(args));
    assert_eq!(out.status.code(), Some(125), "{args:?}: {out:?}");
    let err = stderr_lines(&out);
    assert_eq!(err.len(), 1, "{args:?}: stderr {err:?}");
    assert!(err[0].starts_with("baton: "), "{args:?}: {err:?}");
    assert!(
        err[0].contains(expect),
        "{args:?}: {err:?} lacks {expect:?}"
    );
    assert!(!err[0].contains("panicked"), "{err:?}");
    assert!(
        stdout(&out).is_empty(),
        "{args:?}: stdout {:?}",
        stdout(&out)
    );
    assert!(took < Duration::from_secs(2), "{args:?} took {took:?}");
}

#[test]
fn empty_name_exits_125_with_one_line() {
    let etcd = etcd();
    let assert_one_line_125 =
        |args: &[&str], expect: &str| assert_one_line_125_on(&etcd.endpoint(), args, expect);
    // Checked before connecting: the default endpoint need not exist.
    for cmd in [
        &["lock", "", "--", "true"][..],
        &["lock", ""],
        &["elect", "", "v"],
        &["observe", ""],
        &["leader", ""],
    ] {
        assert_one_line_125(cmd, "the name is empty");
    }
}

#[test]
fn bad_urls_exit_125_with_one_line() {
    let etcd = etcd();
    let assert_one_line_125 =
        |args: &[&str], expect: &str| assert_one_line_125_on(&etcd.endpoint(), args, expect);
    for url in [
        "localhost:2379",
        "ftp://x:1",
        "http://host",
        "http://host:99999",
        "https://h",
    ] {
        assert_one_line_125(&["--endpoints", url, "lock", "x"], "invalid endpoint");
    }
    // Malformed Redis URLs are refused before any network call.
    for url in [
        "redis://",
        "redis://h:99999",
        "redlock://127.0.0.1:1,127.0.0.1:2",
    ] {
        assert_one_line_125(&["--endpoints", url, "lock", "x"], "invalid endpoint");
    }
    // Commands that need a key-value store say so on Redis, before connecting.
    for args in [
        &["get", "x"][..],
        &["sem", "x", "--permits", "2"],
        &["demo"],
    ] {
        let mut full = vec!["--endpoints", "redis://127.0.0.1:6379"];
        full.extend_from_slice(args);
        assert_one_line_125(&full, "no key-value store");
    }
    // Credentials in a bad URL are never printed.
    let (out, _) =
        run(baton(&etcd.endpoint()).args(["--endpoints", "http://u:hunter2@h", "leader", "x"]));
    assert_eq!(out.status.code(), Some(125));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
}

#[test]
fn bad_options_exit_125_with_one_line() {
    let etcd = etcd();
    let assert_one_line_125 =
        |args: &[&str], expect: &str| assert_one_line_125_on(&etcd.endpoint(), args, expect);
    assert_one_line_125(&["lock", "x", "--ttl", "soon"], "--ttl");
    assert_one_line_125(&["lock", "x", "--ttl", "1s"], "ttl");
    assert_one_line_125(&["lock", "x", "--timeout", "0s"], "greater than zero");
    assert_one_line_125(
        &["lock", "x", "--try", "--timeout", "1s"],
        "cannot be used with",
    );
    assert_one_line_125(&["lock", "x", "--bogus"], "--bogus");
    assert_one_line_125(&["--dial-timeout", "forever", "status"], "--dial-timeout");
    assert_one_line_125(&["demo", "--workers", "0"], "--workers");
    assert_one_line_125(&["frobnicate"], "frobnicate");
    assert_one_line_125(&[], "no command given");
    assert_one_line_125(&["lock"], "NAME");
    // An empty $CMD in a script: `--` with nothing after it is not "hold until a signal".
    for cmd in [
        &["lock", "x", "--"][..],
        &["elect", "x", "v", "--"],
        &["sem", "x", "--permits", "2", "--"],
    ] {
        assert_one_line_125(cmd, "no command after `--`");
    }
}

/// A command given without `--` (`baton lock NAME ./job.sh`, as `etcdctl lock NAME CMD`
/// takes it) is refused, and the message says where the command goes. It said only
/// "unexpected argument './job.sh' found", which does not tell a user coming from etcdctl
/// (found by a review).
#[test]
fn a_command_without_separator_says_where_it_goes() {
    for (args, usage) in [
        (&["lock", "x", "./job.sh"][..], "baton lock NAME -- CMD"),
        (
            &["lock", "x", "./job.sh", "--full"],
            "baton lock NAME -- CMD",
        ),
        (&["lock", "--try", "x", "true"], "baton lock NAME -- CMD"),
        (
            &["elect", "x", "v", "./scheduler"],
            "baton elect NAME VALUE -- CMD",
        ),
        (
            &["sem", "x", "--permits", "2", "make"],
            "baton sem NAME --permits N -- CMD",
        ),
    ] {
        // Refused before connecting: no server needed.
        assert_one_line_125_on("http://127.0.0.1:1", args, usage);
    }
    // Other commands, and an unknown option, keep clap's own message.
    assert_one_line_125_on(
        "http://127.0.0.1:1",
        &["get", "k", "extra"],
        "unexpected argument 'extra'",
    );
    // A word that starts with '-' is not an option there; clap's tip, to pass it after
    // `--`, would make it the command, so the message says where the command goes instead.
    for (args, usage) in [
        (&["lock", "x", "--bogus"][..], "baton lock NAME -- CMD"),
        (&["lock", "x", "-5"], "baton lock NAME -- CMD"),
        (&["lock", "x", "-5", "--", "true"], "baton lock NAME -- CMD"),
        (&["elect", "x", "v", "-5"], "baton elect NAME VALUE -- CMD"),
        (
            &["sem", "x", "--permits", "2", "-x"],
            "baton sem NAME --permits N -- CMD",
        ),
    ] {
        let (out, _) = run(baton("http://127.0.0.1:1").args(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not an option of"), "{args:?}: {err}");
        assert!(err.contains(usage), "{args:?}: {err}");
        assert!(!err.contains("as a value, use '--"), "{args:?}: {err}");
        assert_one_line_125_on("http://127.0.0.1:1", args, usage);
    }
    // A misspelt option keeps clap's tip of the similar one, and nothing about `--`.
    let (out, _) = run(baton("http://127.0.0.1:1").args(["lock", "x", "--ttll", "5s"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'--ttl'"), "{err}");
    assert!(!err.contains("-- CMD") && !err.contains("use '--"), "{err}");
}

/// A long option given with one dash (`-ttl 5s`, as some tools take it) is named, with the
/// option meant; clap said only "unexpected argument '-t'", and on `lock` that the command
/// goes after `--`, which was not the mistake.
#[test]
fn a_long_option_with_one_dash_names_the_option_meant() {
    for (args, meant) in [
        (&["lock", "n1", "-ttl", "5s", "--", "true"][..], "--ttl"),
        (&["lock", "n1", "-ttl=5s", "--", "true"], "--ttl"),
        (&["elect", "e", "v", "-ttl", "5s", "--", "true"], "--ttl"),
        (&["sem", "s", "-permits", "2", "--", "true"], "--permits"),
        (&["status", "-json"], "--json"),
        (
            &["lock", "n1", "-endpoints", "x", "--", "true"],
            "--endpoints",
        ),
    ] {
        let err = assert_names_the_long_option(args, meant);
        assert!(
            !err.contains("-- CMD") && !err.contains("=5s"),
            "{args:?}: {err}"
        );
    }
}

/// Asserts that `args` fail with one line, exit 125, naming `-LONG` as unknown and `meant`
/// (`--LONG`) as the option meant; returns stderr.
fn assert_names_the_long_option(args: &[&str], meant: &str) -> String {
    let (out, _) = run(baton("http://127.0.0.1:1").args(args));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let long = meant.trim_start_matches('-');
    assert!(
        err.contains(&format!("unknown option '-{long}'"))
            && err.contains(&format!("two dashes: '{meant}'")),
        "{args:?}: {err}"
    );
    assert_one_line_125_on("http://127.0.0.1:1", args, meant);
    err
}

/// A global option given with one dash where the README puts it, before the subcommand
/// (`baton -endpoints URL lock ...`), is named too: it said only "unexpected argument '-e'".
#[test]
fn a_global_long_option_with_one_dash_before_the_subcommand_is_named() {
    for (args, meant) in [
        (
            &["-endpoints", "x", "lock", "n1", "--", "true"][..],
            "--endpoints",
        ),
        (&["-json", "status"], "--json"),
        (&["-dial-timeout", "1s", "get", "k"], "--dial-timeout"),
    ] {
        assert_names_the_long_option(args, meant);
    }
    // A subcommand's option there (`baton -ttl 5s lock ...`) is named with its subcommand,
    // and where it goes: it said only "unexpected argument '-t'".
    for (args, meant, sub) in [
        (
            &["-ttl", "5s", "lock", "n1", "--", "true"][..],
            "--ttl",
            "lock",
        ),
        (
            &["-timeout", "5s", "queue", "pop", "q"],
            "--timeout",
            "queue pop",
        ),
        (
            &["-permits", "2", "sem", "s", "--", "true"],
            "--permits",
            "sem",
        ),
    ] {
        let (out, _) = run(baton("http://127.0.0.1:1").args(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "'{meant}' (two dashes) is an option of 'baton {sub}'"
            )) && err.contains(&format!("goes after '{sub}'")),
            "{args:?}: {err}"
        );
        assert_one_line_125_on("http://127.0.0.1:1", args, meant);
    }
}

/// A stray `-5` on a command that runs no CMD (barrier, queue pop) drops clap's tip "to pass
/// '-5' as a value, use '-- -5'": that command line is refused too. Where the tip works
/// (`get -- -5` reads the key `-5`), it is kept.
#[test]
fn a_stray_hyphen_word_gets_no_tip_that_would_not_parse() {
    for (args, sub) in [
        (&["barrier", "b1", "-5"][..], "baton barrier"),
        (&["barrier", "b1", "--count", "2", "-5"], "baton barrier"),
        (&["queue", "pop", "q", "-5"], "baton queue pop"),
    ] {
        let (out, _) = run(baton("http://127.0.0.1:1").args(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("not an option of '{sub}'")) && !err.contains("use '-- -5'"),
            "{args:?}: {err}"
        );
        assert_one_line_125_on("http://127.0.0.1:1", args, "'-5'");
    }
    let (out, _) = run(baton("http://127.0.0.1:1").args(["get", "-5"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("use '-- -5'"), "{err}");
}

/// A misspelt option in VALUE's place (set, elect, queue push) is refused with 125, naming
/// the option meant, instead of being taken as the value; the message says how to give a
/// value that starts with `--` on purpose. A value that starts with one `-` is still the
/// value, and after `--` (set, queue push) any word is.
#[test]
fn a_misspelt_option_is_no_value() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let assert_one_line_125 =
        |args: &[&str], expect: &str| assert_one_line_125_on(&ep, args, expect);
    for (args, meant) in [
        (&["set", "k", "--if-revison=0"][..], "--if-revision"),
        (&["set", "k", "--if-revison=0", "v"], "--if-revision"),
        (&["set", "k", "--if-revison", "0", "v"], "--if-revision"),
        (&["elect", "x", "--timout=1s", "--", "true"], "--timeout"),
        (&["elect", "x", "--timout=1s"], "--timeout"),
        (&["queue", "push", "q", "--jsn"], "--json"),
    ] {
        assert_one_line_125(args, &format!("did you mean '{meant}'?"));
        let (out, _) = run(baton(&ep).args(args));
        let err = stderr_lines(&out).join("\n");
        assert!(
            !err.contains("'v'") && !err.contains("'0'"),
            "{args:?}: {err}"
        );
    }
    assert_one_line_125(&["set", "k", "--frobnicate"], "baton set KEY -- VALUE");
    assert_one_line_125(
        &["queue", "push", "q", "--frobnicate"],
        "baton queue push NAME -- VALUE",
    );
    assert_one_line_125(
        &["elect", "x", "--frobnicate", "--", "true"],
        "cannot start with '--'",
    );
    // The value is not echoed beyond the option-like word.
    assert_one_line_125(&["set", "k", "--if-revison=s3cret"], "--if-revison'");
    let (out, _) = run(baton(&ep).args(["set", "k", "--if-revison=s3cret"]));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("s3cret"));

    // Each parses and runs (on one etcd: the --if-revision 0 keys are new ones).
    for args in [
        &["set", "k", "-5"][..],
        &["set", "k", "-"],
        &["set", "k", "--", "--literal"],
        &["set", "--if-revision", "0", "new-1", "--", "--x"],
        &["queue", "push", "q", "-x"],
        &["queue", "push", "q", "--", "--literal"],
        // The same word before the `--` as a real option.
        &["--json", "set", "k", "--", "--json"],
        &["set", "--if-revision", "0", "new-2", "--", "--if-revision"],
        &["--json", "queue", "push", "q", "--", "--json"],
        &["elect", "x", "-5", "--", "true"],
        &["elect", "x", "-", "--", "true"],
    ] {
        let (out, _) = run(baton(&ep).args(args));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
    }
}

#[test]
fn help_and_version_exit_0() {
    // Nothing is connected to: an endpoint nobody listens on does.
    let nobody = format!("http://127.0.0.1:{}", baton_testkit::free_port());
    for args in [&["--help"][..], &["--version"], &["lock", "--help"]] {
        let (out, _) = run(baton(&nobody).args(args));
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!stdout(&out).is_empty());
    }
    for cmd in ["lock", "elect", "observe", "leader", "status", "demo"] {
        let (out, _) = run(baton(&nobody).args([cmd, "--help"]));
        assert!(
            stdout(&out).contains("Examples:"),
            "{cmd} --help has no examples"
        );
    }
}

/// An endpoint nobody listens on: 125 with one line, within the dial timeout.
#[test]
fn unreachable_endpoint_exits_125_within_the_dial_timeout() {
    let port = baton_testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [
        &["--dial-timeout", "1s", "lock", "x", "--", "true"][..],
        &["--dial-timeout", "1s", "leader", "x"],
        &["--dial-timeout", "1s", "status"],
    ] {
        let (out, took) = run(baton(&url).args(args));
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        let err = stderr_lines(&out);
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(err[0].contains("cannot connect"), "{err:?}");
        assert!(
            took < Duration::from_millis(1800),
            "took {took:?} with a 1s dial timeout"
        );
    }
}

/// mem:// is a store inside the one `baton` process: nothing in it is shared with another
/// process, and it is gone at exit. Every command but `demo` and `bench` refuses it (125,
/// one line saying so) instead of succeeding quietly (`set` then `get`: no such key;
/// `lock`: no exclusion at all; `barrier --count 2`: never met). Bad input is still told
/// first, and `demo` still runs on it.
#[test]
fn mem_is_refused_outside_demo_and_bench() {
    for endpoints in ["mem://", "mem://x"] {
        for args in [
            &["set", "k", "v"][..],
            &["get", "k"],
            &["queue", "push", "q", "v"],
            &["queue", "pop", "--timeout", "1s", "q"],
            &["queue", "len", "q"],
            &["lock", "n", "--", "true"],
            &["lock", "n"],
            &["elect", "n", "v", "--", "true"],
            &["sem", "n", "--permits", "1", "--", "true"],
            &["barrier", "b", "--count", "2"],
            &["leader", "n"],
            &["status"],
            &["watch", "k"],
            &["observe", "n"],
        ] {
            let (out, took) = run(baton(endpoints).args(args));
            assert_eq!(
                out.status.code(),
                Some(125),
                "{endpoints} {args:?}: {out:?}"
            );
            let err = stderr_lines(&out);
            assert_eq!(err.len(), 1, "{endpoints} {args:?}: {err:?}");
            assert!(
                err[0].starts_with("baton: mem:// is a store inside this one baton process"),
                "{args:?}: {err:?}"
            );
            assert!(err[0].contains("use etcd"), "{args:?}: {err:?}");
            assert!(stdout(&out).is_empty(), "{args:?}: {out:?}");
            assert!(took < Duration::from_secs(2), "{args:?} took {took:?}");
        }
    }
    // Bad input first.
    assert_one_line_125_on("mem://", &["lock", "x", "--"], "no command after `--`");
    assert_one_line_125_on("mem://", &["lock", ""], "the name is empty");
    // The Redis message no longer points to mem://.
    let (out, _) = run(baton("redis://127.0.0.1:1").args(["get", "k"]));
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("mem://"),
        "{out:?}"
    );
    // `demo` and `bench` still run on it: tests/demo.rs and tests/bench.rs.
}

/// An etcd URL with a user and no password (`http://app@h:p`), and no --password-file or
/// $BATON_PASSWORD: the error names the options that give it (it named a library method,
/// `ClientBuilder::with_password`; found by a review).
#[test]
fn a_user_without_password_names_the_options() {
    let port = baton_testkit::free_port();
    let url = format!("http://app@127.0.0.1:{port}");
    let (out, _) = run(baton(&url)
        .env_remove("BATON_PASSWORD")
        .args(["lock", "x", "--", "true"]));
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = stderr_lines(&out);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("--password-file") && !err[0].contains("ClientBuilder"),
        "{err:?}"
    );
}

/// A --ttl out of range is bad input, told at once whatever the backend, as `lock` and
/// `elect` tell it: `sem` and `barrier` checked it only once connected, so with the backend
/// down they waited the dial timeout and blamed the backend (found by review, kvcli).
#[test]
fn sem_and_barrier_refuse_a_bad_ttl_before_connecting() {
    for args in [
        &["sem", "s", "--permits", "1", "--ttl", "1s"][..],
        &["barrier", "b", "--count", "1", "--ttl", "1s"][..],
    ] {
        assert_one_line_125_on("http://127.0.0.1:1", args, "below the minimum");
    }
}

/// A zero --ttl is told as the user wrote it ("ttl 0s"), not as Rust prints a zero
/// `Duration` ("0ns": found by the README review), on every command and backend.
#[test]
fn a_zero_ttl_is_told_as_0s() {
    for (endpoints, args) in [
        (
            "http://127.0.0.1:1",
            &["lock", "--ttl", "0s", "x", "--", "true"][..],
        ),
        (
            "http://127.0.0.1:1",
            &["elect", "--ttl", "0s", "e", "v", "--", "true"][..],
        ),
        (
            "http://127.0.0.1:1",
            &["sem", "s", "--permits", "1", "--ttl", "0s", "--", "true"][..],
        ),
        (
            "redis://127.0.0.1:1",
            &["lock", "--ttl", "0s", "x", "--", "true"][..],
        ),
    ] {
        assert_one_line_125_on(endpoints, args, "ttl 0s is below the minimum");
    }
}

/// A negative option value (`--timeout -1s`) is told as such: clap took it for flags and
/// tipped "to pass '-1' as a value, use '-- -1'", which would run `-1` as the command
/// (found by the README review).
#[test]
fn a_negative_option_value_says_it_cannot_be_negative() {
    for (args, option) in [
        (
            &["lock", "--timeout", "-1s", "x", "--", "true"][..],
            "--timeout",
        ),
        (&["lock", "--ttl", "-5s", "x", "--", "true"][..], "--ttl"),
        (
            &["sem", "s", "--permits", "-2", "--", "true"][..],
            "--permits",
        ),
    ] {
        assert_one_line_125_on(
            "http://127.0.0.1:1",
            args,
            &format!("for '{option}': it cannot be negative"),
        );
    }
    // Zero with a sign is not called negative, with or without `=`.
    for args in [
        &["lock", "--ttl", "-0s", "x", "--", "true"][..],
        &["lock", "--ttl=-0s", "x", "--", "true"],
        &["lock", "--timeout", "-0", "x", "--", "true"],
    ] {
        let (out, _) = run(baton("http://127.0.0.1:1").args(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("a duration is written without a sign") && !err.contains("negative"),
            "{args:?}: {err}"
        );
        assert_one_line_125_on("http://127.0.0.1:1", args, "without a sign");
    }
}

/// A value that starts with `-` and a digit for an option that takes text or a path
/// (`--user -1`, `--namespace -1`, `--cacert -1.pem`) is not said to be negative: such a
/// value is fine, given as `--user=-1`, and the message says so.
#[test]
fn a_hyphen_text_value_is_not_called_negative() {
    for (args, option, value) in [
        (&["--user", "-1", "status"][..], "--user", "-1"),
        (&["--namespace", "-1", "status"][..], "--namespace", "-1"),
        (&["--cacert", "-1.pem", "status"][..], "--cacert", "-1.pem"),
        // Not only a digit after the '-': a value clap took for flags (found by the second
        // look: these said "not an option of 'baton lock'", about the command).
        (
            &["lock", "--user", "-bob", "n1", "--", "true"][..],
            "--user",
            "-bob",
        ),
        (
            &["lock", "n1", "--namespace", "-t/", "--", "true"][..],
            "--namespace",
            "-t/",
        ),
    ] {
        assert_one_line_125_on(
            "http://127.0.0.1:1",
            args,
            &format!("give it as '{option}={value}'"),
        );
    }
    // Given with `=`, a negative duration is told the same (it said humantime's "expected
    // number at 0").
    for (args, option) in [
        (
            &["lock", "--timeout=-5s", "x", "--", "true"][..],
            "--timeout",
        ),
        (&["lock", "x", "--ttl=-5s", "--", "true"], "--ttl"),
    ] {
        let (out, _) = run(baton("http://127.0.0.1:1").args(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("for '{option}")) && err.contains("it cannot be negative"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("expected number"), "{args:?}: {err}");
    }
    // A duration that is neither negative nor one.
    assert_one_line_125_on(
        "http://127.0.0.1:1",
        &["lock", "n1", "--ttl", "-x", "--", "true"],
        "invalid value '-x' for '--ttl'",
    );
}

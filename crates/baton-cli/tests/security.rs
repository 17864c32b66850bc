//! `baton` against etcd with TLS (mutual), authentication and a prefix-scoped role: the
//! flags work, denials exit 125 at once, and no password or token is ever printed.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use baton_testkit::{EtcdServerOptions, TestPki};
use common::*;

const ROOT_PASSWORD: &str = "Root-Secret-7c4e";
const APP_PASSWORD: &str = "App-Secret-2b9a";

/// Everything `baton` printed, both streams.
fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fail if a secret appears anywhere in the output: the passwords, or anything that looks
/// like an etcd simple token (16 letters, a dot, a number).
fn assert_no_secret(what: &str, out: &Output) {
    let text = all_output(out);
    for secret in [APP_PASSWORD, ROOT_PASSWORD, "wrong-Secret-0000"] {
        assert!(!text.contains(secret), "{what} printed a password:\n{text}");
    }
    assert!(
        !looks_like_token(&text),
        "{what} printed something like a token:\n{text}"
    );
}

/// True if `text` holds a word shaped like an etcd 3.4 simple token: 16 random letters, a
/// dot, the index of the Authenticate request.
fn looks_like_token(text: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
        .any(|w| {
            let Some((head, tail)) = w.split_once('.') else {
                return false;
            };
            head.len() == 16
                && head.chars().all(|c| c.is_ascii_alphabetic())
                && !tail.is_empty()
                && tail.chars().all(|c| c.is_ascii_digit())
        })
}

#[test]
fn the_token_detector_detects_tokens() {
    assert!(looks_like_token("token: \"qWeRtYuIoPaSdFgH.42\""));
    assert!(!looks_like_token("lock locks/x/694d7f3a2c1b token 17"));
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[test]
fn tls_user_and_prefix_role_through_the_command_line() {
    let pki = TestPki::generate();
    let etcd = {
        assert!(baton_testkit::etcd_available(), "etcd is needed");
        EtcdServer::start_with(
            EtcdServerOptions::new()
                .with_tls(&pki)
                .with_client_cert_auth(),
        )
    };
    etcd.enable_auth(ROOT_PASSWORD, &[("app", APP_PASSWORD, "locks/")]);
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{APP_PASSWORD}\n")).unwrap();
    let wrong_file = dir.path().join("wrong");
    std::fs::write(&wrong_file, "wrong-Secret-0000\n").unwrap();

    let ca = pki.ca_file();
    let (cert, key) = (pki.client_cert_file(), pki.client_key_file());
    let secure = |endpoints: &str| -> Command {
        let mut cmd = baton(endpoints);
        cmd.env_remove("BATON_PASSWORD")
            .env_remove("BATON_USER")
            .arg("--cacert")
            .arg(&ca)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key);
        cmd
    };
    let endpoint = etcd.endpoint();
    let mut outputs: Vec<(String, Output)> = Vec::new();

    // In the role's prefix: the lock is taken and CMD runs.
    let (out, _) = run(secure(&endpoint)
        .args(["--user", "app", "--password-file"])
        .arg(&password_file)
        .args(["lock", "locks/x", "--", "sh", "-c", "echo ran"]));
    assert_eq!(code(&out), 0, "{}", all_output(&out));
    assert_eq!(stdout(&out).trim(), "ran");
    outputs.push(("lock in the prefix".into(), out));

    // The same with $BATON_USER / $BATON_PASSWORD, --json; CMD does not inherit the
    // password.
    let (out, _) = run(secure(&endpoint)
        .env("BATON_USER", "app")
        .env("BATON_PASSWORD", APP_PASSWORD)
        .args(["--json", "lock", "locks/y", "--", "sh", "-c"])
        .arg(r#"echo "password=${BATON_PASSWORD:-unset}""#));
    assert_eq!(code(&out), 0, "{}", all_output(&out));
    assert!(
        stdout(&out).contains("password=unset"),
        "{}",
        all_output(&out)
    );
    outputs.push(("lock --json, env password".into(), out));

    // Outside the prefix: denied, exit 125 at once, one clear line.
    let (out, took) = run(secure(&endpoint)
        .args(["--user", "app", "--password-file"])
        .arg(&password_file)
        .args(["lock", "other/x", "--", "true"]));
    assert_eq!(code(&out), 125, "{}", all_output(&out));
    let err = stderr_lines(&out);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("permission denied"), "{err:?}");
    assert!(took < Duration::from_secs(5), "denied after {took:?}");
    outputs.push(("lock outside the prefix".into(), out));

    // Observing an election outside the prefix: the same, not retried forever.
    let (out, took) = run(secure(&endpoint)
        .args(["--user", "app", "--password-file"])
        .arg(&password_file)
        .args(["observe", "other/e"]));
    assert_eq!(code(&out), 125, "{}", all_output(&out));
    assert!(
        stderr_lines(&out)[0].contains("permission denied"),
        "{}",
        all_output(&out)
    );
    assert!(took < Duration::from_secs(5), "denied after {took:?}");
    outputs.push(("observe outside the prefix".into(), out));

    // A wrong password: 125, "authentication failed", the password not shown.
    let (out, _) = run(secure(&endpoint)
        .args(["--json", "--user", "app", "--password-file"])
        .arg(&wrong_file)
        .args(["lock", "locks/x", "--", "true"]));
    assert_eq!(code(&out), 125, "{}", all_output(&out));
    assert!(
        all_output(&out).contains("authentication failed"),
        "{}",
        all_output(&out)
    );
    outputs.push(("wrong password".into(), out));

    // The password in the URL works too (and is redacted from every message).
    let port = etcd.client_port();
    let in_url = format!("https://app:{APP_PASSWORD}@127.0.0.1:{port}");
    let (out, _) = run(secure(&in_url).args(["lock", "locks/z", "--", "true"]));
    assert_eq!(code(&out), 0, "{}", all_output(&out));
    outputs.push(("password in the URL".into(), out));
    let (out, _) = run(secure(&in_url).args(["lock", "other/z", "--", "true"]));
    assert_eq!(code(&out), 125, "{}", all_output(&out));
    outputs.push(("password in the URL, denied".into(), out));
    let bad_url = format!("https://app:{APP_PASSWORD}@127.0.0.1:{port}/path");
    let (out, _) = run(secure(&bad_url).args(["lock", "locks/z", "--", "true"]));
    assert_eq!(code(&out), 125, "{}", all_output(&out));
    outputs.push(("malformed URL with a password".into(), out));

    // --user without a password, and TLS problems, are clear errors too.
    let (out, _) = run(secure(&endpoint).args(["--user", "app", "lock", "locks/x", "--", "true"]));
    assert_eq!(code(&out), 125);
    assert!(
        stderr_lines(&out)[0].contains("needs a password"),
        "{out:?}"
    );
    let (out, _) = run(baton(&endpoint)
        .env("BATON_USER", "app")
        .env("BATON_PASSWORD", APP_PASSWORD)
        .args(["lock", "locks/x", "--", "true"]));
    assert_eq!(code(&out), 125);
    assert!(
        stderr_lines(&out)[0].contains("trusted CA"),
        "{}",
        all_output(&out)
    );
    outputs.push(("no CA".into(), out));
    let (out, _) = run(baton(&endpoint)
        .env("BATON_USER", "app")
        .env("BATON_PASSWORD", APP_PASSWORD)
        .arg("--cacert")
        .arg(&ca)
        .args(["lock", "locks/x", "--", "true"]));
    assert_eq!(code(&out), 125);
    assert!(
        stderr_lines(&out)[0].contains("client certificate"),
        "{}",
        all_output(&out)
    );
    outputs.push(("no client certificate".into(), out));

    // Full tracing, on a success and a failure: still no secret.
    for (what, name) in [("trace, success", "locks/t"), ("trace, denied", "other/t")] {
        let (out, _) = run(secure(&endpoint)
            .env("RUST_LOG", "trace")
            .env("BATON_USER", "app")
            .env("BATON_PASSWORD", APP_PASSWORD)
            .args(["lock", name, "--", "true"]));
        assert!(!out.stderr.is_empty(), "RUST_LOG=trace printed nothing");
        outputs.push((what.into(), out));
    }

    for (what, out) in &outputs {
        if std::env::var_os("SHOW_OUTPUT").is_some() && !what.starts_with("trace") {
            eprintln!("--- {what}: {}", all_output(out).trim());
        }
        assert_no_secret(what, out);
    }
}

#[test]
fn namespaces_keep_teams_apart() {
    let etcd = etcd();
    let endpoint = etcd.endpoint();
    let mut holder = Proc::spawn(baton(&endpoint).args(["--namespace", "team-a/", "lock", "jobs"]));
    let line = holder.line();
    assert!(line.contains("jobs/"), "{line}");

    // Team B's lock of the same name is free; team A's is taken.
    let (out, _) = run(baton(&endpoint).args([
        "--namespace",
        "team-b/",
        "lock",
        "--try",
        "jobs",
        "--",
        "true",
    ]));
    assert_eq!(code(&out), 0, "{}", all_output(&out));
    let (out, _) = run(baton(&endpoint)
        .env("BATON_NAMESPACE", "team-a/")
        .args(["lock", "--try", "jobs", "--", "true"]));
    assert_eq!(code(&out), 124, "{}", all_output(&out));

    // The keys live under the namespace.
    let held = keys(&etcd, "team-a/jobs/");
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(keys(&etcd, "jobs/").is_empty());
    holder.signal(libc::SIGTERM);
    assert_eq!(holder.code(), 0);
}

/// `baton watch` whose permission is revoked while it runs: once its watch breaks (here, a
/// reset connection) and etcd refuses it again, it exits 125 with the denial, rather than
/// retrying for ever and looking alive while it prints nothing.
#[test]
fn watch_exits_125_once_its_permission_is_revoked() {
    use baton_testkit::proxy::FaultProxy;
    let etcd = etcd();
    etcd.enable_auth(ROOT_PASSWORD, &[("app", APP_PASSWORD, "w/")]);
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{APP_PASSWORD}\n")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxy = rt.block_on(FaultProxy::start(etcd.client_port()));
    let mut watch = Proc::spawn(
        baton(&proxy.url("http"))
            .env_remove("BATON_PASSWORD")
            .args(["--user", "app", "--password-file"])
            .arg(&password_file)
            .args(["watch", "--prefix", "w/"]),
    );
    let mut i = 0;
    while watch.line_within(Duration::from_millis(200)).is_none() {
        assert!(i < 50, "no change printed: {:?}", watch.stderr_so_far());
        let out = etcd.etcdctl(["put", "w/a", &format!("v{i}")]);
        assert!(out.status.success(), "{out:?}");
        i += 1;
    }
    let out = etcd.etcdctl([
        "role",
        "revoke-permission",
        "app-role",
        "--prefix=true",
        "w/",
    ]);
    assert!(out.status.success(), "{out:?}");
    proxy.reset_all();
    let status = watch.wait(STEP).unwrap_or_else(|| {
        panic!(
            "baton watch still runs {STEP:?} after its permission was revoked; stderr: {:?}",
            watch.stderr_so_far()
        )
    });
    assert_eq!(status.code(), Some(125), "{:?}", watch.stderr_so_far());
    let err = watch.stderr_all();
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("permission denied"), "{err:?}");
}

/// `--user` (or `$BATON_USER`) names the user even when the URL names another: the
/// password then comes from the URL (no password option given). Before, the URL's user
/// was used silently.
#[test]
fn the_user_option_beats_the_urls_user() {
    let etcd = etcd();
    etcd.enable_auth(ROOT_PASSWORD, &[("app", APP_PASSWORD, "locks/")]);
    let port = etcd.client_port();
    let plain = |endpoints: &str| -> Command {
        let mut cmd = baton(endpoints);
        cmd.env_remove("BATON_PASSWORD").env_remove("BATON_USER");
        cmd
    };
    let mut outputs: Vec<(String, Output)> = Vec::new();

    // root with app's password: refused, loudly (not a quiet login as app).
    let app_url = format!("http://app:{APP_PASSWORD}@127.0.0.1:{port}");
    let (out, _) = run(plain(&app_url).args([
        "--user", "root", "lock", "locks/x", "--", "sh", "-c", "echo ran",
    ]));
    assert_ne!(code(&out), 0, "{}", all_output(&out));
    assert!(!stdout(&out).contains("ran"), "{}", all_output(&out));
    outputs.push(("--user root, app's URL".into(), out));
    let (out, _) = run(plain(&app_url)
        .env("BATON_USER", "root")
        .args(["lock", "locks/x", "--", "sh", "-c", "echo ran"]));
    assert_ne!(code(&out), 0, "{}", all_output(&out));
    outputs.push(("$BATON_USER=root, app's URL".into(), out));

    // root with root's password from the URL: root, who may lock outside app's prefix.
    let url = format!("http://app:{ROOT_PASSWORD}@127.0.0.1:{port}");
    let (out, _) = run(plain(&url).args([
        "--user", "root", "lock", "other/x", "--", "sh", "-c", "echo ran",
    ]));
    assert_eq!(code(&out), 0, "{}", all_output(&out));
    assert_eq!(stdout(&out).trim(), "ran");
    outputs.push(("--user root, root's password in the URL".into(), out));

    // A user and no password anywhere: the CLI's own error.
    let (out, _) = run(plain(&format!("http://127.0.0.1:{port}"))
        .args(["--user", "root", "lock", "other/x", "--", "true"]));
    assert_eq!(code(&out), 125, "{}", all_output(&out));
    assert!(
        all_output(&out).contains("--user root needs a password"),
        "{}",
        all_output(&out)
    );
    // A password and no user anywhere: the CLI's error says where the password came from
    // (an exported $BATON_PASSWORD is easy to forget), and what to do.
    let (out, _) = run(plain(&format!("http://127.0.0.1:{port}"))
        .env_remove("BATON_USER")
        .env("BATON_PASSWORD", ROOT_PASSWORD)
        .args(["lock", "other/x", "--", "true"]));
    assert_eq!(code(&out), 125, "{}", all_output(&out));
    assert!(
        stderr_lines(&out)[0].contains("$BATON_PASSWORD is set but no user is named")
            && stderr_lines(&out)[0].contains("--user"),
        "{}",
        all_output(&out)
    );
    outputs.push(("$BATON_PASSWORD without a user".into(), out));
    for (what, out) in &outputs {
        assert_no_secret(what, out);
    }
}

/// `http://` to a TLS etcd and `redis://` to a TLS Redis: `baton` exits 125 at once saying
/// the server uses TLS, as it does for the reverse mistakes. Before, `get` waited out the
/// whole `--dial-timeout` and said "broken pipe"; `lock` on Redis said "Connection reset by
/// peer".
#[test]
fn plaintext_urls_to_tls_servers_say_so_at_once() {
    assert!(baton_testkit::redis_available(), "redis-server is needed");
    let pki = TestPki::generate();
    let etcd = {
        assert!(baton_testkit::etcd_available(), "etcd is needed");
        EtcdServer::start_with(EtcdServerOptions::new().with_tls(&pki))
    };
    let redis = baton_testkit::RedisServer::start_with(
        baton_testkit::RedisServerOptions::new().with_tls(&pki),
    );
    for (endpoints, args, scheme) in [
        (
            etcd.endpoint().replacen("https://", "http://", 1),
            &["get", "k"][..],
            "https://",
        ),
        (
            redis.tls_url().replacen("rediss://", "redis://", 1),
            &["lock", "x", "--", "true"][..],
            "rediss://",
        ),
    ] {
        let (out, took) = run(baton(&endpoints)
            .env_remove("BATON_PASSWORD")
            .env_remove("BATON_USER")
            .args(["--dial-timeout", "30s"])
            .args(args));
        assert_eq!(code(&out), 125, "{endpoints}: {}", all_output(&out));
        let text = all_output(&out);
        assert!(text.contains("the server uses TLS"), "{text}");
        assert!(text.contains(scheme), "{text}");
        assert!(took < Duration::from_secs(5), "{endpoints}: took {took:?}");
    }
}

/// A `baton queue pop` that fails (here: a role that may not read the queue) still revokes
/// its markers' lease before it exits (docs/reliability.md entry 97): the failed pop left
/// it on etcd for 60 s, as its error exit skipped the close.
#[test]
fn a_failed_queue_pop_leaves_no_lease() {
    let etcd = etcd();
    etcd.enable_auth(ROOT_PASSWORD, &[("app", APP_PASSWORD, "locks/")]);
    for _ in 0..3 {
        let (out, _) = run(baton(&etcd.endpoint())
            .env_remove("BATON_USER")
            .env("BATON_PASSWORD", APP_PASSWORD)
            .args(["--user", "app", "queue", "pop", "jobs", "--timeout", "2s"]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        assert!(err.contains("permission denied"), "{err}");
    }
    assert_eq!(leases(&etcd), 0, "leases left by 3 failed pops");
}

//! `baton demo` on the embedded store: a short run with no overlaps and a failover.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::*;

#[test]
fn demo_runs_on_mem_with_no_overlaps() {
    let json = std::thread::spawn(|| {
        let mut cmd = baton("unused");
        cmd.env_remove("BATON_ENDPOINTS");
        run(cmd.args(["--json", "demo", "--seconds", "1.5", "--workers", "3"]))
    });
    let mut cmd = baton("unused");
    cmd.env_remove("BATON_ENDPOINTS");
    let (out, took) = run(cmd.args(["demo", "--seconds", "2"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(took.as_secs_f64() < 6.0, "took {took:?}");
    let text = stdout(&out);
    assert!(text.starts_with("baton demo on mem://demo"), "{text}");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("overlaps"), "0");
    assert_eq!(field("result"), "ok");
    assert!(field("leaders").contains(", then "), "{text}");
    assert!(field("failover").ends_with("to the next leader"), "{text}");
    assert!(field("stale leader").starts_with("write refused"), "{text}");

    let (out, _) = json.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let events: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["overlaps"], 0);
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["grants_per_worker"].as_array().unwrap().len(), 3);
    assert!(summary["grants"].as_u64().unwrap() > 3);
    assert_eq!(summary["leaders"].as_array().unwrap().len(), 2);
    assert!(summary["failover_ms"].as_f64().unwrap() < 1000.0);
}

/// A signal stops the demo: its workers and nodes close their sessions (revoking their
/// leases, deleting their keys) and it exits 128+N, leaving nothing on etcd.
#[test]
fn an_interrupted_demo_leaves_nothing_behind() {
    let etcd = etcd();
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut demo = Proc::spawn(baton(&etcd.endpoint()).args(["demo", "--seconds", "4"]));
        let first = demo.line();
        assert!(first.starts_with("baton demo on"), "{first}");
        std::thread::sleep(std::time::Duration::from_secs(1));
        demo.signal(signal);
        assert_eq!(demo.code(), code, "{:?}", demo.stderr_so_far());
        let left = keys(&etcd, "");
        assert!(left.is_empty(), "{} keys left: {left:?}", left.len());
        assert_eq!(leases(&etcd), 0, "leases left");
    }
}

/// `scripts/demo.sh` runs the baton that cargo builds wherever the target directory is
/// (here `$CARGO_TARGET_DIR`), not a fixed `target/release/baton`: with a stand-in cargo
/// that records its arguments, the script hands the demo's options to `cargo run`.
#[test]
fn demo_script_runs_through_cargo_with_any_target_dir() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let record = dir.path().join("cargo-args");
    let fake = |name: &str, body: String| {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    fake("cargo", format!("echo \"$*\" >> '{}'", record.display()));
    fake("rustc", "echo 'rustc 1.999.0 (stand-in)'".to_string());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/demo.sh");
    let (out, _) = run(std::process::Command::new("bash")
        .arg(script)
        .args(["--seconds", "1"])
        .env("HOME", dir.path())
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("CARGO_TARGET_DIR", dir.path().join("target")));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let args = std::fs::read_to_string(&record).unwrap();
    assert!(
        args.lines()
            .any(|l| l.starts_with("run --release") && l.ends_with("demo --seconds 1")),
        "{args}"
    );
}

/// `baton demo --help` gives the demo's own default endpoints, the embedded store it runs
/// on, not the etcd default of the other commands.
#[test]
fn demo_help_gives_the_embedded_store_as_default() {
    let mut cmd = baton("unused");
    cmd.env_remove("BATON_ENDPOINTS");
    let (out, _) = run(cmd.args(["demo", "--help"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("[default: mem://demo]"), "{text}");
    assert!(!text.contains("[default: http://127.0.0.1:2379]"), "{text}");
}

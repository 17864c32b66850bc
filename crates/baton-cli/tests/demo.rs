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

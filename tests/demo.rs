//! `parasync demo --json` trains the MLP through a real local cluster to the accuracy a
//! single process reaches.

mod common;

use std::process::Command;

fn run_demo(mode: &str) -> serde_json::Value {
    let out = Command::new(common::exe())
        .args(["demo", "--json", "--mode", mode])
        .output()
        .expect("running parasync demo");
    assert!(out.status.success(), "demo failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("demo printed {stdout:?}: {e}"))
}

#[test]
fn demo_reaches_target_accuracy_in_sync_and_async_modes() {
    for (mode, target) in [("sync", 0.95), ("async", 0.94)] {
        let r = run_demo(mode);
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!(acc >= target, "{mode}: held-out accuracy {acc} < {target}");
        assert_eq!(r["mode"], mode);
        assert!(r["bytes_pushed"].as_u64().unwrap() > 0 && r["bytes_pulled"].as_u64().unwrap() > 0);
        assert!(r["steps_per_second"].as_f64().unwrap() > 0.0);
        let staleness = r["staleness"].as_object().unwrap();
        if mode == "sync" {
            assert_eq!(staleness.keys().collect::<Vec<_>>(), vec!["0"], "sync gradients are never stale");
        } else {
            assert!(staleness.keys().any(|k| k != "0"), "async workers observe staleness: {staleness:?}");
        }
    }
}

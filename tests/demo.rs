//! `parasync demo --json` trains the MLP through a real local cluster to the accuracy a
//! single process reaches.

mod common;

use std::process::Command;

fn run_demo(mode: &str) -> serde_json::Value {
    run_demo_with(mode, &[])
}

fn run_demo_with(mode: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(common::exe())
        .args(["demo", "--json", "--mode", mode])
        .args(extra)
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

/// A shard killed with SIGKILL mid-training and started again from its checkpoint: the
/// workers ride it out and the model still reaches its accuracy.
#[test]
fn demo_survives_a_shard_killed_mid_training() {
    for (mode, target, shard) in [("sync", 0.95, "1"), ("async", 0.94, "0")] {
        let r = run_demo_with(mode, &["--kill-shard-at", "120", "--kill-shard", shard]);
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!(acc >= target, "{mode}: held-out accuracy {acc} < {target} after a shard's death");
        let kill = &r["kill"];
        assert_eq!(kill["shard"].as_u64().unwrap().to_string(), shard);
        assert!(kill["at_step"].as_u64().unwrap() >= 120, "{kill}");
        let restored = kill["restored_step"].as_u64().unwrap();
        let at = kill["at_step"].as_u64().unwrap();
        if mode == "sync" {
            // The shard had completed at most the step worker 0 was at.
            assert!((10..=at).contains(&restored), "{mode}: restored from step {restored}: {kill}");
        } else {
            // Async checkpoints are named by the step of the worker whose push took them, and
            // another worker may be well ahead of worker 0 (every 10 steps, 330 in all).
            assert!(restored >= 10 && restored <= 330 && restored % 10 == 0, "{mode}: restored from step {restored}: {kill}");
        }
        assert!(kill["recovery_seconds"].as_f64().unwrap() > 0.0, "{kill}");
        assert!(r["checkpoints"].as_u64().unwrap() > 0);
    }
}

/// A straggler in sync mode: the other workers spend their time waiting for it at every
/// step, the straggler computing; worker 0's accuracy curve shows when the model got good.
#[test]
fn a_straggler_makes_the_others_wait_in_sync_mode_and_the_curve_shows_progress() {
    // 10 ms a step is far more than a step's own work, even on a loaded machine.
    let r = run_demo_with("sync", &["--straggler-delay-ms", "10", "--eval-every", "10", "--epochs", "5"]);
    let wait: Vec<f64> = r["wait_fraction"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
    assert_eq!(wait.len(), 4);
    let straggler = wait[3];
    assert!(wait[..3].iter().all(|&w| w > straggler + 0.2) && straggler < 0.5, "the others wait for the straggler: {wait:?}");
    let curve = r["accuracy_curve"].as_array().unwrap();
    let steps = r["steps_per_worker"].as_u64().unwrap();
    assert_eq!(curve.len() as u64, steps / 10, "{curve:?}");
    assert!(curve.iter().enumerate().all(|(i, p)| p["step"].as_u64() == Some(10 * (i as u64 + 1))));
    let first_good = curve.iter().find(|p| p["accuracy"].as_f64().unwrap() >= 0.95).map(|p| p["seconds"].as_f64().unwrap());
    assert_eq!(r["seconds_to_095"].as_f64(), first_good);
    assert!(curve.last().unwrap()["accuracy"].as_f64().unwrap() > curve[0]["accuracy"].as_f64().unwrap() - 0.05);
}

#[test]
fn bench_staleness_in_a_small_configuration_writes_its_table_and_plots() {
    let dir = std::env::temp_dir().join(format!("parasync-staleness-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(common::exe())
        .args(["bench", "staleness", "--epochs", "3", "--staleness", "1,4", "--delay-ms", "1", "--eval-every", "5", "--out"])
        .arg(dir.join("st"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = std::fs::read_to_string(dir.join("st.md")).unwrap();
    let rows: Vec<&str> = table.lines().skip(2).collect();
    let names: Vec<&str> = rows.iter().map(|r| r.split('|').nth(1).unwrap().trim()).collect();
    assert_eq!(names, ["sync", "sync, 3 of 4", "bounded, S=1", "bounded, S=4", "async", "async, lr ÷ staleness"], "{table}");
    let lines = std::fs::read_to_string(dir.join("st.jsonl")).unwrap();
    for l in lines.lines() {
        let r: serde_json::Value = serde_json::from_str(l).unwrap();
        let w = r["wait_fraction"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&w) && r["final_accuracy"].as_f64().unwrap() > 0.5, "{l}");
        assert!(!r["curve"].as_array().unwrap().is_empty(), "{l}");
    }
    for plot in ["st-accuracy.svg", "st-wait.svg"] {
        let svg = std::fs::read_to_string(dir.join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{plot}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `demo --model ctr`: a click-through model with a sparse embedding table (admission after
/// two updates, LFU eviction at a capacity below the vocabulary) reaches a held-out AUC
/// within 0.02 of the planted model's, and reports the table's rows and evictions.
#[test]
fn ctr_demo_comes_within_two_points_of_the_planted_auc() {
    let out = Command::new(common::exe()).args(["demo", "--model", "ctr", "--json"]).output().expect("running parasync demo");
    assert!(out.status.success(), "demo failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (auc, planted) = (r["test_auc"].as_f64().unwrap(), r["planted_auc"].as_f64().unwrap());
    assert!(planted > 0.7 && auc >= planted - 0.02, "held-out AUC {auc}, planted {planted}");
    let (held, capacity) = (r["rows_held"].as_u64().unwrap(), r["capacity"].as_u64().unwrap());
    assert!(held > 0 && held <= capacity, "{held} rows held, capacity {capacity}");
    assert!(r["evicted"].as_u64().unwrap() > 0 && r["dropped_updates"].as_u64().unwrap() > 0, "{r}");
}

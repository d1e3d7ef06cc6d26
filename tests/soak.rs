//! `parasync soak` in a short configuration: it samples every process, drives every kind
//! of traffic, and passes on a healthy cluster.

mod common;

#[test]
fn a_short_soak_passes_and_reports_every_process() {
    let out = std::process::Command::new(common::exe())
        .args(["soak", "--seconds", "12", "--report-every-s", "2", "--workers", "4"])
        .env_remove("PARASYNC_AUTH_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let samples: Vec<&str> = stdout.lines().filter(|l| l.starts_with("t=")).collect();
    assert!(samples.len() >= 5, "{stdout}");
    for l in &samples {
        for who in ["shard 0: rss", "shard 1: rss", "workers: rss", "fds", "threads"] {
            assert!(l.contains(who), "{l}");
        }
        assert!(l.ends_with("failed 0"), "{l}");
    }
    let done = stdout.lines().find(|l| l.starts_with("# done")).expect("a summary line");
    for kind in ["bad_request", "cut_connection", "pull", "push", "push_pull", "reconnect", "register"] {
        let n: u64 = done.split(&format!("{kind} ")).nth(1).and_then(|r| r.split([',', ';']).next()?.parse().ok()).unwrap_or(0);
        assert!(n > 0, "no {kind} in {done}");
    }
    assert!(stdout.contains("# soak passed"), "{stdout}");
}

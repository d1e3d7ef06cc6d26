//! Tier 3: real `collective-rank` processes over TCP on 127.0.0.1.

mod common;

use common::Job;
use std::time::{Duration, Instant};

fn all_ok(results: &[(Option<i32>, Vec<String>)], want: &str) {
    for (r, (code, lines)) in results.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r} failed: {lines:?}");
        assert!(
            lines.iter().any(|l| l.contains(want)),
            "rank {r}: {lines:?}"
        );
    }
}

/// The number after `key` in the first line of `lines` that has it.
fn field(lines: &[String], key: &str) -> Option<u64> {
    lines.iter().find_map(|l| {
        let rest = &l[l.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Whether this machine lets a process read a sibling's memory (`process_vm_readv`, which
/// peer copies need): Yama must not restrict ptrace to descendants, and a read of a child
/// process's stack must work (no seccomp rule against it). `Err` says why not.
fn peer_reads_permitted() -> Result<(), String> {
    if let Ok(scope) = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        if scope.trim() != "0" {
            return Err(format!("Yama ptrace_scope is {}", scope.trim()));
        }
    }
    let mut child = std::process::Command::new("sleep")
        .arg("10")
        .spawn()
        .map_err(|e| format!("no child process: {e}"))?;
    let pid = child.id();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let stack = maps
        .lines()
        .find(|l| l.ends_with("[stack]"))
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok());
    let result = match stack {
        None => Err("the child's stack is not listed".to_string()),
        Some(addr) => {
            let mut byte = [0u8; 1];
            let local = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            let remote = libc::iovec {
                iov_base: addr as usize as *mut libc::c_void,
                iov_len: 1,
            };
            // SAFETY: `local` is one writable byte of this process; the remote side is only read.
            let rc = unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) };
            if rc == 1 {
                Ok(())
            } else {
                Err(format!("process_vm_readv: {}", std::io::Error::last_os_error()))
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[test]
fn peer_copies_on_one_host_give_the_same_results_as_sockets() {
    // 600_000 elements: the ring's f32, f64 and integer steps move 1.2 MB and more per step
    // at N = 2, over the peer-copy threshold; bf16 steps and the small sizes stay inline.
    let mut job = Job::start(2, "every-op", &["--count", "600000"]);
    let res = job.finish(Duration::from_secs(90));
    all_ok(&res, "RESULT every-op");
    let copied: Vec<u64> = res.iter().map(|(_, l)| field(l, "peer_copied=").expect("reported")).collect();
    match peer_reads_permitted() {
        Ok(()) => assert!(copied.iter().all(|&c| c > 0), "peer copies were not used: {copied:?}"),
        Err(why) => eprintln!("peer copies are not permitted here ({why}): the sockets carried everything"),
    }
    let mut job = Job::start(2, "every-op", &["--count", "600000", "--no-peer-copy"]);
    let res = job.finish(Duration::from_secs(90));
    all_ok(&res, "RESULT every-op");
    for (_, lines) in &res {
        assert_eq!(field(lines, "peer_copied="), Some(0), "{lines:?}");
    }
}

#[test]
fn pairs_with_and_without_peer_copies_mix_in_one_ring() {
    // Rank 0 declines peer copies, so its neighbours stream to it over the socket while they
    // receive from their other neighbour by peer copy (and the reverse): the results are
    // bitwise those of an all-socket and an all-peer-copy ring. 1_100_001 elements: 1.1 MB
    // per ring step at N = 4.
    let count = "1100001";
    let digest = |no_peer: &[bool]| {
        let n = no_peer.len();
        let extra = |r: usize| -> Vec<&str> {
            let mut a = vec!["--count", count];
            if no_peer[r] {
                a.push("--no-peer-copy");
            }
            a
        };
        let mut job = Job::start_host(n, "digest", &extra(0));
        for r in 1..n {
            job.add(r, n, "digest", &extra(r));
        }
        let res = job.finish(Duration::from_secs(90));
        all_ok(&res, "RESULT digest");
        let line = |l: &Vec<String>| l.iter().find(|l| l.starts_with("RESULT digest")).unwrap().clone();
        let first = line(&res[0].1);
        assert!(res.iter().all(|(_, l)| line(l) == first), "ranks disagree: {res:?}");
        let copied: Vec<u64> = res.iter().map(|(_, l)| field(l, "peer_copied=").expect("reported")).collect();
        (first, copied)
    };
    let (sockets, none) = digest(&[true; 4]);
    assert!(none.iter().all(|&c| c == 0), "{none:?}");
    let (peers, _) = digest(&[false; 4]);
    let (mixed, copied) = digest(&[true, false, false, false]);
    assert_eq!(peers, sockets, "peer copies change the result");
    assert_eq!(mixed, sockets, "a mixed ring changes the result");
    // In the ring rank r receives from rank r-1: rank 1 only from rank 0 (sockets), ranks 2
    // and 3 from peers that copy.
    assert_eq!(copied[..2], [0, 0], "ranks 0 and 1 receive only over sockets: {copied:?}");
    if peer_reads_permitted().is_ok() {
        assert!(copied[2..].iter().all(|&c| c > 0), "peer copies were not used: {copied:?}");
    }
}

#[test]
fn a_step_just_under_the_peer_copy_size_mixes_with_one_over_it() {
    // 524_287 f32 at N = 2: one ring segment is exactly 1 MiB (peer copy), the other 4 bytes
    // less (frames), so each rank streams frames to the peer that reads its memory, on the
    // same connection: the answers must wait for whole frames.
    let digest = |extra: &[&str]| {
        let mut job = Job::start(2, "digest", extra);
        let res = job.finish(Duration::from_secs(60));
        all_ok(&res, "RESULT digest");
        let lines: Vec<String> = res
            .iter()
            .map(|(_, l)| l.iter().find(|l| l.starts_with("RESULT digest")).unwrap().clone())
            .collect();
        assert_eq!(lines[0], lines[1], "ranks disagree");
        lines[0].clone()
    };
    for _ in 0..3 {
        assert_eq!(
            digest(&["--count", "524287"]),
            digest(&["--count", "524287", "--no-peer-copy"])
        );
    }
}

#[test]
fn two_and_four_ranks_run_every_op_and_dtype() {
    for n in [2, 4] {
        // 100_000 elements (200 KB as bf16) exceed the direct threshold for every dtype; the
        // scenario's small sizes (0, 1, n+1, 1000) take the direct path: both families run.
        let mut job = Job::start(n, "every-op", &["--count", "100000"]);
        all_ok(&job.finish(Duration::from_secs(60)), "RESULT every-op");
    }
}

#[test]
fn small_frames_stream_through_the_tcp_ring() {
    // 4 KiB frames: every ring step streams many frames and reduces them as they arrive.
    let mut job = Job::start(
        3,
        "every-op",
        &["--count", "30000", "--chunk-bytes", "4096"],
    );
    all_ok(&job.finish(Duration::from_secs(60)), "RESULT every-op");
}

#[test]
fn several_connections_per_pair_give_the_same_results() {
    // Three connections per pair and 4 KiB frames: frames of one transfer land out of order.
    let args = [
        "--count",
        "30000",
        "--chunk-bytes",
        "4096",
        "--streams",
        "3",
    ];
    let mut job = Job::start(3, "every-op", &args);
    all_ok(&job.finish(Duration::from_secs(60)), "RESULT every-op");
    let mut job = Job::start(2, "fused", &["--streams", "2"]);
    all_ok(&job.finish(Duration::from_secs(60)), "RESULT fused-equal");
}

#[test]
fn spin_mode_gives_the_same_results() {
    let mut job = Job::start(2, "every-op", &["--count", "5000", "--spin"]);
    all_ok(&job.finish(Duration::from_secs(60)), "RESULT every-op");
}

#[test]
fn fused_buckets_equal_unfused_results_over_tcp() {
    for n in [2, 4] {
        let mut job = Job::start(n, "fused", &[]);
        all_ok(&job.finish(Duration::from_secs(60)), "RESULT fused-equal");
    }
}

#[test]
fn two_runs_give_bitwise_equal_results() {
    let digests = || {
        let mut job = Job::start(4, "digest", &["--count", "300001"]);
        let res = job.finish(Duration::from_secs(60));
        all_ok(&res, "RESULT digest");
        res.iter()
            .map(|(_, l)| {
                l.iter()
                    .find(|l| l.starts_with("RESULT digest"))
                    .unwrap()
                    .clone()
            })
            .collect::<Vec<_>>()
    };
    let first = digests();
    assert!(
        first.windows(2).all(|w| w[0] == w[1]),
        "ranks disagree: {first:?}"
    );
    assert_eq!(digests(), first, "second run differs");
}

#[test]
fn a_killed_rank_is_named_by_every_other_rank_within_the_timeout() {
    // 4 MB per allreduce over the sockets; 12 MB (3 MB per ring step) by peer copy where
    // this machine permits it: the kill lands mid-operation.
    killed_rank_named(&["--count", "1000000", "--no-peer-copy"]);
    killed_rank_named(&["--count", "3000000"]);
}

fn killed_rank_named(args: &[&str]) {
    let timeout_ms = 8000u64;
    let t = timeout_ms.to_string();
    let mut all = args.to_vec();
    all.extend(["--timeout-ms", &t]);
    let mut job = Job::start(4, "loop", &all);
    for r in 0..4 {
        job.wait_line(
            r,
            |l| l.starts_with("RESULT looping"),
            Duration::from_secs(30),
        )
        .expect("every rank loops");
    }
    let killed = Instant::now();
    job.kill(2);
    let res = job.finish(Duration::from_millis(timeout_ms + 5000));
    let took = killed.elapsed();
    assert!(
        took < Duration::from_millis(timeout_ms),
        "ranks took {took:?} to give up"
    );
    for (r, (code, lines)) in res.iter().enumerate().filter(|(r, _)| *r != 2) {
        let err = lines
            .iter()
            .find(|l| l.starts_with("ERROR"))
            .unwrap_or_else(|| panic!("rank {r} printed no error: {lines:?}"));
        assert_eq!(*code, Some(3), "rank {r}");
        assert!(
            err.contains("culprit=2 "),
            "rank {r} blames the wrong rank: {err}"
        );
        assert!(!err.contains("seq=-"), "rank {r} names no operation: {err}");
    }
}

#[test]
fn a_stalled_rank_is_named_by_every_other_rank_within_the_timeout() {
    // 4 MB allreduces run on the ring: only the stalled rank's neighbours wait on it
    // directly; the others find it by asking along the chain of waits. 4 KB ones run on
    // the direct algorithm, where everyone waits on it directly.
    // 12 MB ones move by peer copy where this machine permits it: the stalled rank's memory
    // can still be read, but it never confirms.
    for count in ["1000000", "1000", "3000000"] {
        let timeout_ms = 3000u64;
        let t = timeout_ms.to_string();
        let mut job = Job::start(4, "loop", &["--count", count, "--timeout-ms", &t]);
        for r in 0..4 {
            job.wait_line(
                r,
                |l| l.starts_with("RESULT looping"),
                Duration::from_secs(30),
            )
            .expect("every rank loops");
        }
        let stopped = Instant::now();
        job.stop(2);
        for r in [0, 1, 3] {
            let err = job
                .wait_line(
                    r,
                    |l| l.starts_with("ERROR"),
                    Duration::from_millis(timeout_ms + 3000),
                )
                .unwrap_or_else(|| panic!("count {count}: rank {r} did not give up"));
            assert!(
                err.contains("culprit=2 "),
                "count {count}: rank {r} blames the wrong rank: {err}"
            );
        }
        let took = stopped.elapsed();
        assert!(
            took < Duration::from_millis(timeout_ms + 1000),
            "count {count}: took {took:?}"
        );
        job.kill(2);
    }
}

#[test]
fn mismatched_sizes_or_dtypes_error_on_every_rank() {
    for (scenario, want) in [
        ("mismatch-count", "element count (1000 vs 999)"),
        ("mismatch-dtype", "dtype (f32 vs f64)"),
    ] {
        let mut job = Job::start(3, scenario, &["--timeout-ms", "5000"]);
        let res = job.finish(Duration::from_secs(20));
        for (r, (code, lines)) in res.iter().enumerate() {
            assert_eq!(*code, Some(3), "rank {r}: {lines:?}");
            let err = lines
                .iter()
                .find(|l| l.starts_with("ERROR"))
                .expect("an error line");
            let flipped = want
                .replace("1000 vs 999", "999 vs 1000")
                .replace("f32 vs f64", "f64 vs f32");
            assert!(
                err.contains(want) || err.contains(&flipped),
                "rank {r}: {err}"
            );
        }
    }
}

#[test]
fn a_wrong_job_token_is_refused_and_the_job_goes_on() {
    let mut job = Job::start_host(2, "barrier", &["--timeout-ms", "10000"]);
    let intruder = job.add(
        1,
        2,
        "barrier",
        &["--token", "another-job", "--timeout-ms", "10000"],
    );
    let refused = job
        .wait_line(
            intruder,
            |l| l.starts_with("ERROR"),
            Duration::from_secs(15),
        )
        .expect("the intruder is refused");
    assert!(refused.contains("job token refused"), "{refused}");
    job.add(1, 2, "barrier", &["--timeout-ms", "10000"]);
    let res = job.finish(Duration::from_secs(20));
    assert_eq!(res[intruder].0, Some(3));
    assert_eq!(res[0].0, Some(0), "{:?}", res[0].1);
    assert_eq!(res[2].0, Some(0), "{:?}", res[2].1);
}

/// 60 allreduces in a row by peer copy (3 and 4 ranks, ring steps over 1 MiB): none may
/// come near the timeout. A `Copied` answer taken off its link by the abort check, while
/// the sending half was about to wait on that link, once slept until 3/4 of the timeout.
/// And a rank that finished the last allreduce and exited right after its final `Confirmed`
/// was taken for lost by the neighbour that read that answer and then the end of the stream
/// in one look (about one run in five).
#[test]
fn steady_peer_copy_allreduces_never_stall() {
    // Also the rendezvous timeout: four debug-build ranks starting on two busy cores.
    let timeout_ms = 8000u64;
    let t = timeout_ms.to_string();
    for n in [3, 4] {
        let mut job = Job::start(n, "steady", &["--count", "1500000", "--timeout-ms", &t]);
        let res = job.finish(Duration::from_secs(120));
        all_ok(&res, "RESULT slowest_ms=");
        for (r, (_, lines)) in res.iter().enumerate() {
            let slowest = field(lines, "slowest_ms=").expect("slowest_ms reported");
            assert!(slowest < timeout_ms / 2, "N={n}: rank {r}'s slowest allreduce took {slowest} ms: {lines:?}");
        }
    }
}

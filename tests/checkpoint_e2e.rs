//! Checkpoints end to end: real `parasync server` processes write them, are killed with
//! SIGKILL, and restart from them (on the same or another shard count); the files are
//! checked as a user would read them.

mod common;

use common::{complete_checkpoints, TempDir};

use std::path::Path;
use std::time::Duration;

use parasync::cluster::{ClusterOptions, LocalCluster};
use parasync_client::{Client, DType, Init, Optimizer, VariableSpec};

const WORKERS: u32 = 4;

/// f32 and bf16 storage, SGD with momentum and Adam; `big` and `emb` are split over the
/// shards (split threshold 1 KiB), the others are whole.
fn specs() -> Vec<VariableSpec> {
    let mut big = VariableSpec::new("big", &[40, 33]);
    big.optimizer = Optimizer::Sgd { lr: 0.05, momentum: 0.9, nesterov: false };
    big.init = Init::Uniform { low: -1.0, high: 1.0, seed: 7 };
    let mut emb = VariableSpec::new("emb", &[50, 16]);
    emb.dtype = DType::Bf16;
    emb.optimizer = Optimizer::adam(0.01);
    emb.init = Init::Normal { mean: 0.0, stddev: 0.5, seed: 3 };
    let mut bias = VariableSpec::new("bias", &[33]);
    bias.optimizer = Optimizer::adam(0.02);
    bias.init = Init::Values((0..33).map(|i| i as f32 * 0.1).collect());
    let mut scale = VariableSpec::new("scale", &[5, 3]);
    scale.dtype = DType::Bf16;
    scale.optimizer = Optimizer::Sgd { lr: 0.1, momentum: 0.8, nesterov: true };
    scale.init = Init::Constant(0.5);
    vec![big, emb, bias, scale]
}

/// A worker's gradient: a function of the values, the worker and the step, so any
/// difference in state shows in every later step.
fn gradient(worker: u32, step: u64, var: usize, values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| (v * 1.7 + (worker as f32 + 1.0) * 0.31 - step as f32 * 0.013 + (i + var) as f32 * 1e-3).sin())
        .collect()
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter().map(|x| x.iter().map(|f| f.to_bits()).collect()).collect()
}


fn start(shards: usize, args: &[&str], log_dir: Option<&Path>) -> LocalCluster {
    let mut opts = ClusterOptions::new(shards, args);
    opts.show_logs = std::env::var_os("PARASYNC_TEST_LOGS").is_some();
    opts.log_dir = log_dir.map(Path::to_path_buf);
    opts.log_filter = log_dir.map(|_| "info".to_string());
    LocalCluster::start(&common::exe(), &opts).expect("starting the cluster")
}

async fn connect(addrs: &[String], worker: u32) -> Client {
    common::client_at(addrs, worker, 1024, true).await
}

/// Four workers register and train steps `from..to`; returns the values of step `to`.
async fn train(addrs: &[String], from: u64, to: u64) -> Vec<Vec<f32>> {
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let addrs = addrs.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&addrs, w).await;
            c.register(specs()).await.unwrap();
            let mut params = c.pull(from).await.unwrap();
            for step in from..to {
                let grads: Vec<Vec<f32>> = params.iter().enumerate().map(|(i, p)| gradient(w, step, i, p)).collect();
                let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
                let s = c.push_pull(step, &refs, &mut params).await.unwrap();
                assert_eq!(s.dropped_stale, 0);
            }
            params
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let last = results.pop().unwrap();
    for other in &results {
        assert_eq!(bits(other), bits(&last), "every worker sees the same values");
    }
    last
}

async fn pull_at(addrs: &[String], step: u64) -> Vec<Vec<f32>> {
    let mut c = connect(addrs, 0).await;
    c.register(specs()).await.unwrap();
    c.pull(step).await.unwrap()
}

fn exported(dir: &Path, out: &Path) -> Vec<(String, Vec<u8>)> {
    let st = std::process::Command::new(common::exe())
        .args(["checkpoint", "export"])
        .arg(dir)
        .arg("--out")
        .arg(out)
        .arg("--slots")
        .output()
        .unwrap();
    assert!(st.status.success(), "export failed: {}", String::from_utf8_lossy(&st.stderr));
    let r = ps_server::checkpoint::safetensors::Reader::open(out).unwrap();
    r.tensors
        .iter()
        .map(|(name, info)| {
            let mut buf = vec![0u8; (info.end - info.start) as usize];
            r.read_elements(name, 0..info.elements(), &mut buf).unwrap();
            (name.clone(), buf)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_job_killed_after_a_checkpoint_continues_bit_for_bit() {
    common::bounded(240, async {
        let sync = ["--mode", "sync", "--num-workers", "4"];
        // 20 steps straight.
        let straight = {
            let cluster = start(2, &sync, None);
            let v10 = train(&cluster.addrs(), 0, 10).await;
            let v20 = train(&cluster.addrs(), 10, 20).await;
            (v10, v20)
        };

        // 10 steps with checkpoints every 5 steps (one kept) and one asked for at 10, then
        // every server killed, restarted from the latest, 10 more steps.
        let dir = TempDir::new("sync");
        let d = dir.0.to_str().unwrap();
        let mut args = sync.to_vec();
        args.extend(["--num-shards", "2", "--checkpoint-dir", d, "--checkpoint-every-steps", "5", "--keep-checkpoints", "1"]);
        let cluster = start(2, &args, None);
        let v10 = train(&cluster.addrs(), 0, 10).await;
        assert_eq!(bits(&v10), bits(&straight.0));
        let files = connect(&cluster.addrs(), 0).await.checkpoint(10).await.unwrap();
        assert_eq!(files.len(), 2);
        assert!(files.iter().all(|f| f.step == 10 && f.bytes > 0), "{files:?}");
        drop(cluster); // SIGKILL, every shard
        let step10 = dir.0.join("step-10");
        for f in ["shard-0-of-2.safetensors", "shard-0-of-2.json", "shard-1-of-2.safetensors", "shard-1-of-2.json", "manifest.json"] {
            assert!(step10.join(f).is_file(), "{f} in {}", step10.display());
        }
        assert!(!dir.0.join("step-5").exists(), "older checkpoints are pruned to --keep-checkpoints");

        let mut args = sync.to_vec();
        args.extend(["--num-shards", "2", "--checkpoint-dir", d, "--restore", "latest"]);
        let cluster = start(2, &args, None);
        let info = connect(&cluster.addrs(), 0).await.shard_info().await.unwrap();
        assert!(info.iter().all(|i| i.restored_step == Some(10) && i.checkpoints), "{info:?}");
        let restored = train(&cluster.addrs(), 10, 20).await;
        assert_eq!(bits(&restored), bits(&straight.1), "values and optimizer slots came back exactly");

        // A user reads the checkpoint without Parasync: every tensor whole.
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(step10.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["step"], 10);
        let big = manifest["variables"].as_array().unwrap().iter().find(|v| v["name"] == "big").unwrap();
        assert_eq!(big["shape"], serde_json::json!([40, 33]));
        assert_eq!(big["parts"].as_array().unwrap().len(), 2, "split over both shards: {big}");
        let tensors = exported(&step10, &dir.0.join("model.safetensors"));
        let names: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(names, ["bias", "bias:exp_avg", "bias:exp_avg_sq", "big", "big:momentum_buffer", "emb", "emb:exp_avg", "emb:exp_avg_sq", "scale", "scale:momentum_buffer"]);
        let big_values: Vec<f32> = tensors[3].1.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(bits(&[big_values]), bits(&straight.0[..1]), "export joins big's parts as pulled");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_restores_onto_three_shards_and_then_one() {
    common::bounded(240, async {
        let sync = ["--mode", "sync", "--num-workers", "4"];
        let two = TempDir::new("two");
        let three = TempDir::new("three");
        let mut args = sync.to_vec();
        args.extend(["--num-shards", "2", "--checkpoint-dir", two.0.to_str().unwrap()]);
        let cluster = start(2, &args, None);
        let v3 = train(&cluster.addrs(), 0, 3).await;
        connect(&cluster.addrs(), 0).await.checkpoint(3).await.unwrap();
        let v5 = train(&cluster.addrs(), 3, 5).await;
        drop(cluster);
        let from_two = exported(&two.0.join("step-3"), &two.0.join("export.safetensors"));

        // 2 → 3: each new shard cuts its rows from the old files as the clients register.
        let mut args = sync.to_vec();
        let restore2 = two.0.join("step-3");
        args.extend(["--num-shards", "3", "--restore", restore2.to_str().unwrap(), "--checkpoint-dir", three.0.to_str().unwrap()]);
        let cluster = start(3, &args, None);
        let mut c = connect(&cluster.addrs(), 0).await;
        c.register(specs()).await.unwrap();
        let big_parts = &c.placement().unwrap().parts[0];
        assert_eq!(big_parts.len(), 3, "big is split over three shards now: {big_parts:?}");
        assert_eq!(bits(&c.pull(3).await.unwrap()), bits(&v3), "every value equal after 2 → 3");
        c.checkpoint(3).await.unwrap();
        drop(cluster);
        let from_three = exported(&three.0.join("step-3"), &three.0.join("export.safetensors"));
        assert_eq!(from_three, from_two, "values and slots equal, element for element");

        // 3 → 1.
        let restore3 = three.0.join("step-3");
        let cluster = start(1, &["--mode", "sync", "--num-workers", "4", "--num-shards", "1", "--restore", restore3.to_str().unwrap()], None);
        // A registration that disagrees with the checkpoint is refused, naming the difference.
        let mut other = specs();
        other[2].optimizer = Optimizer::adam(0.5);
        let err = connect(&cluster.addrs(), 0).await.register(other).await.unwrap_err().to_string();
        assert!(err.contains("holds bias otherwise") && err.contains("optimizer"), "{err}");
        assert_eq!(bits(&pull_at(&cluster.addrs(), 3).await), bits(&v3), "every value equal after 3 → 1");

        // Training goes on from the restored state on the new shard count as it went on
        // on the old one: the optimizer slots and update counts came along.
        let on_one = train(&cluster.addrs(), 3, 5).await;
        assert_eq!(bits(&on_one), bits(&v5), "slots and counters were restored too");
    })
    .await;
}

/// A checkpoint whose write was cut short by SIGKILL is never restored; one with a flipped
/// byte is skipped, and the log names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_and_corrupt_checkpoints_are_skipped() {
    common::bounded(240, async {
        let dir = TempDir::new("corrupt");
        let logs = TempDir::new("corrupt-logs");
        let d = dir.0.to_str().unwrap();
        let base = ["--mode", "sync", "--num-workers", "1", "--num-shards", "1", "--checkpoint-dir", d];
        let mut large = VariableSpec::new("large", &[4096, 4096]); // 64 MiB of f32, 192 MiB with Adam's slots
        large.optimizer = Optimizer::adam(0.001);
        large.init = Init::Constant(1.0);
        let grad = vec![0.5f32; large.len()];
        let cluster = start(1, &base, Some(&logs.0));
        let mut c = connect(&cluster.addrs(), 0).await;
        c.register(vec![large.clone()]).await.unwrap();
        let mut values = vec![vec![0f32; large.len()]];
        for step in 0..2u64 {
            c.push_pull(step, &[&grad], &mut values).await.unwrap();
            c.checkpoint(step + 1).await.unwrap();
        }
        let v2 = values[0][0];
        c.push_pull(2, &[&grad], &mut values).await.unwrap();
        // Kill the shard while it writes step 3's file.
        let addrs = cluster.addrs();
        let writing = tokio::spawn(async move { connect(&addrs, 0).await.checkpoint(3).await });
        let tmp = dir.0.join("step-3").join(".shard-0-of-1.safetensors.tmp");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !tmp.exists() {
            assert!(std::time::Instant::now() < deadline, "the write of step 3 never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(cluster);
        assert!(writing.await.unwrap().is_err(), "the checkpoint call fails with its shard");
        assert!(!dir.0.join("step-3").join("shard-0-of-1.json").exists());

        let mut args = base.to_vec();
        args.extend(["--restore", "latest"]);
        let restored_step = |cluster: &LocalCluster| {
            let addrs = cluster.addrs();
            async move { connect(&addrs, 0).await.shard_info().await.unwrap()[0].restored_step }
        };
        let cluster = start(1, &args, Some(&logs.0));
        assert_eq!(restored_step(&cluster).await, Some(2), "the unfinished step 3 is passed over");
        let mut c = connect(&cluster.addrs(), 0).await;
        c.register(vec![large.clone()]).await.unwrap();
        assert_eq!(c.pull(2).await.unwrap()[0][0], v2);
        drop(cluster);
        let log = std::fs::read_to_string(logs.0.join("shard-0.log")).unwrap();
        assert!(log.contains("step-3") && log.contains("incomplete"), "{log}");

        // Flip one byte in the middle of step 2's file: restore falls back to step 1.
        let file = dir.0.join("step-2").join("shard-0-of-1.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&file, &bytes).unwrap();
        let cluster = start(1, &args, Some(&logs.0));
        assert_eq!(restored_step(&cluster).await, Some(1));
        drop(cluster);
        let log = std::fs::read_to_string(logs.0.join("shard-0.log")).unwrap();
        assert!(log.contains("step-2") && log.contains("CRC-32"), "{log}");
    })
    .await;
}

/// Async and bounded mode: a checkpoint every 4 steps is taken when the first push of a
/// worker's step 4, 8, … arrives, before it is applied; a shard killed and restored from it
/// has each variable at that version (and, bounded, each worker's clock), and training goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_and_bounded_checkpoints_restore_the_version_a_worker_step_began_with() {
    common::bounded(240, async {
        for mode in ["async", "bounded"] {
            let dir = TempDir::new(mode);
            let d = dir.0.to_str().unwrap();
            let base = ["--mode", mode, "--num-workers", "1", "--max-staleness", "1", "--num-shards", "2", "--checkpoint-dir", d];
            let mut args = base.to_vec();
            args.extend(["--checkpoint-every-steps", "4"]);
            let cluster = start(2, &args, None);
            let mut c = connect(&cluster.addrs(), 0).await;
            c.register(specs()).await.unwrap();
            let mut params = c.pull(0).await.unwrap();
            let mut before_step = Vec::new(); // the values each step's push found
            for step in 0..10u64 {
                before_step.push(params.clone());
                let grads: Vec<Vec<f32>> = params.iter().enumerate().map(|(i, p)| gradient(0, step, i, p)).collect();
                let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
                c.push_pull(step, &refs, &mut params).await.unwrap();
            }
            // The writer may still be busy with step 8's files: wait for them, bounded.
            let manifests = ["shard-0-of-2.json", "shard-1-of-2.json"].map(|f| dir.0.join("step-8").join(f));
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !manifests.iter().all(|m| m.is_file()) {
                assert!(std::time::Instant::now() < deadline, "{mode}: step 8's checkpoint never appeared");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(c);
            drop(cluster);

            let mut args = base.to_vec();
            args.extend(["--restore", "latest"]);
            let cluster = start(2, &args, None);
            let mut c = connect(&cluster.addrs(), 0).await;
            c.register(specs()).await.unwrap();
            let info = c.shard_info().await.unwrap();
            assert!(info.iter().all(|i| i.restored_step == Some(8)), "{mode}: {info:?}");
            let mut restored = c.pull(8).await.unwrap();
            assert_eq!(bits(&restored), bits(&before_step[8]), "{mode}: the values step 8's push found");
            for step in 8..10u64 {
                let grads: Vec<Vec<f32>> = restored.iter().enumerate().map(|(i, p)| gradient(0, step, i, p)).collect();
                let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
                c.push_pull(step, &refs, &mut restored).await.unwrap();
            }
            assert_eq!(bits(&restored), bits(&params), "{mode}: the same two steps give the same values again");
        }
    })
    .await;
}

/// A shard killed with SIGKILL mid-training comes back from its checkpoint; the workers ride
/// it out without restarting: their push-pulls wait for the shard, re-push the steps the
/// restored shard lacks, and (sync) every worker ends with the same values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_ride_out_a_shard_killed_and_restored_mid_training() {
    common::bounded(240, ride_out_a_killed_shard(&["--mode", "sync"])).await;
}

/// The same in bounded mode: each worker re-pushes the steps the restored shard lacks of it,
/// each once the slowest worker lets it through, and every worker's clock gets to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_workers_ride_out_a_shard_killed_and_restored_mid_training() {
    common::bounded(240, ride_out_a_killed_shard(&["--mode", "bounded", "--max-staleness", "2"])).await;
}

async fn ride_out_a_killed_shard(mode: &[&str]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let sync = mode[1] == "sync";
    let dir = TempDir::new(&format!("kill-{}", mode[1]));
    let d = dir.0.to_str().unwrap();
    let mut args = mode.to_vec();
    args.extend(["--num-workers", "4", "--num-shards", "2", "--checkpoint-dir", d, "--checkpoint-every-steps", "5"]);
    let mut cluster = start(2, &args, None);
    let addrs = cluster.addrs();
    let progress = Arc::new(AtomicU64::new(0));
    // Workers wait at step 14 for the kill, so that it lands mid-training in every mode.
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steps = 24u64;
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (addrs, progress, killed) = (addrs.clone(), Arc::clone(&progress), Arc::clone(&killed));
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&addrs, w).await;
            c.register(specs()).await.unwrap();
            let mut params = c.pull(0).await.unwrap();
            let mut retried_on = std::collections::BTreeSet::new();
            for step in 0..steps {
                while step == 14 && !killed.load(Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let grads: Vec<Vec<f32>> = params.iter().enumerate().map(|(i, p)| gradient(w, step, i, p)).collect();
                let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
                let s = c.push_pull(step, &refs, &mut params).await.unwrap_or_else(|e| panic!("worker {w}, step {step}: {e}"));
                // big and emb are split over both shards, bias and scale are whole.
                assert_eq!(s.parts.len(), 6, "{s:?}");
                assert!(s.parts.iter().all(|p| p.applied), "{s:?}");
                retried_on.extend(s.parts.iter().filter(|p| p.attempts > 1).map(|p| p.shard));
                if w == 0 {
                    progress.store(step + 1, Ordering::Release);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(retried_on, [1].into(), "worker {w}: the summaries name the parts of shard 1 as sent again");
            (params, c.shard_info().await.unwrap())
        }));
    }
    while progress.load(Ordering::Acquire) < 13 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Step 10's checkpoint is complete once its manifests are there (written in the background).
    let step10 = dir.0.join("step-10");
    while !(step10.join("shard-0-of-2.json").is_file() && step10.join("shard-1-of-2.json").is_file()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed_at = std::time::Instant::now();
    cluster.kill(1);
    killed.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.restart(1, &["--restore", "latest"]).unwrap();
    let restarted_after = killed_at.elapsed();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let (last, info) = results.pop().unwrap();
    if sync {
        for (other, _) in &results {
            assert_eq!(bits(other), bits(&last), "every worker ends with the same values");
        }
    } else {
        // Bounded (staleness 2): step `steps + 2` can be pulled only once every worker has
        // pushed all its steps, the lost ones again included, to every part on both shards.
        let mut c = connect(&addrs, 0).await;
        c.register(specs()).await.unwrap();
        c.pull(steps + 2).await.expect("every worker's clock reached the last step");
    }
    assert!(info[1].restored_step.is_some_and(|s| (10..=15).contains(&s)), "{info:?}");
    assert_eq!(info[0].restored_step, None);
    if sync {
        assert!(info.iter().all(|i| i.variables.iter().all(|(_, v)| *v == steps)), "every part completed every step: {info:?}");
    }
    assert!(last.iter().flatten().all(|x| x.is_finite()));
    eprintln!("{}: shard 1 back {restarted_after:?} after its SIGKILL", mode[1]);
}


/// `--checkpoint-every-s`: shards with their own timers agree on the steps they write
/// through the workers' pushes. Sync: every shard writes the same steps, each exactly the
/// state that step left (as the workers pulled it). Async: every shard writes each step
/// named, so every checkpoint is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_based_checkpoints_are_taken_at_the_same_step_on_every_shard() {
    common::bounded(240, async {
        for mode in ["sync", "async"] {
            let dir = TempDir::new(&format!("timed-{mode}"));
            let d = dir.0.to_str().unwrap();
            let workers = 2u32;
            let args = [
                "--mode", mode, "--num-workers", "2", "--num-shards", "2", "--checkpoint-dir", d,
                "--checkpoint-every-s", "0.25", "--keep-checkpoints", "1000",
            ];
            let cluster = start(2, &args, None);
            let steps = 40u64;
            let mut tasks = Vec::new();
            for w in 0..workers {
                let addrs = cluster.addrs();
                tasks.push(tokio::spawn(async move {
                    let mut c = connect(&addrs, w).await;
                    c.register(specs()).await.unwrap();
                    let mut params = c.pull(0).await.unwrap();
                    let mut after = vec![params.clone()]; // after[s]: the values step s found
                    for step in 0..steps {
                        let grads: Vec<Vec<f32>> = params.iter().enumerate().map(|(i, p)| gradient(w, step, i, p)).collect();
                        let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
                        c.push_pull(step, &refs, &mut params).await.unwrap();
                        after.push(params.clone());
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    after
                }));
            }
            let mut seen = Vec::new();
            for t in tasks {
                seen.push(t.await.unwrap());
            }
            let steps_written = complete_checkpoints(&dir.0, 2).await;
            eprintln!("{mode}: complete checkpoints at steps {steps_written:?}");
            assert!(steps_written.len() >= 2, "{mode}: about one checkpoint per 0.25 s of a ≥ 1 s run: {steps_written:?}");
            if mode == "sync" {
                for &s in &steps_written {
                    let tensors = exported(&dir.0.join(format!("step-{s}")), &dir.0.join(format!("step-{s}.safetensors")));
                    let big = &tensors.iter().find(|t| t.0 == "big").unwrap().1;
                    let big: Vec<f32> = big.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                    assert_eq!(bits(&[big]), bits(&seen[0][s as usize][..1]), "sync: step {s}'s checkpoint holds what step {s} left");
                }
            }
            drop(cluster);
        }
    })
    .await;
}

/// Sync mode, `push` then `pull`: a pull that finds its shard restored to an older step
/// fails at once, saying which steps to push again (a pull has no gradient to re-push);
/// pushing them lets the same pull through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_from_a_shard_restored_to_an_older_step_says_what_to_push() {
    common::bounded(240, async {
        let dir = TempDir::new("pull-restart");
        let d = dir.0.to_str().unwrap();
        let args = ["--mode", "sync", "--num-workers", "1", "--num-shards", "2", "--checkpoint-dir", d];
        let mut cluster = start(2, &args, None);
        let mut c = connect(&cluster.addrs(), 0).await;
        c.register(specs()).await.unwrap();
        let mut params = c.pull(0).await.unwrap();
        let mut step_grads = Vec::new();
        for step in 0..4u64 {
            let grads: Vec<Vec<f32>> = params.iter().enumerate().map(|(i, p)| gradient(0, step, i, p)).collect();
            let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            c.push(step, &refs).await.unwrap();
            params = c.pull(step + 1).await.unwrap();
            step_grads.push(grads);
            if step == 1 {
                c.checkpoint(2).await.unwrap();
            }
        }
        cluster.kill(1);
        let pulling = tokio::spawn(async move {
            let r = c.pull(4).await;
            (c, r)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.restart(1, &["--restore", "latest"]).unwrap();
        let (c, r) = pulling.await.unwrap();
        let e = r.expect_err("step 4 is not on the restored shard");
        assert_eq!(e.kind, parasync_client::ErrorKind::FailedPrecondition, "{e}");
        assert!(e.message.contains("restarted from its checkpoint of step 2") && e.message.contains("steps 2..3"), "{e}");
        for step in 2..4u64 {
            let refs: Vec<&[f32]> = step_grads[step as usize].iter().map(|g| g.as_slice()).collect();
            c.push(step, &refs).await.unwrap();
        }
        let again = c.pull(4).await.unwrap();
        assert_eq!(bits(&again), bits(&params), "the same gradients give the same step 4");
    })
    .await;
}

//! Helpers shared by the end-to-end tests: real `parasync server` processes on 127.0.0.1.
#![allow(dead_code)]

pub mod raw;

use std::path::PathBuf;
use std::time::Duration;

use parasync::cluster::{ClusterOptions, LocalCluster};
use parasync_client::{Client, ClientOptions};

/// The `parasync` binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_parasync"))
}

/// Starts `shards` servers with `args`, logging to a temp dir printed on failure.
pub fn cluster(shards: usize, args: &[&str]) -> LocalCluster {
    let mut opts = ClusterOptions::new(shards, args);
    opts.show_logs = std::env::var_os("PARASYNC_TEST_LOGS").is_some();
    LocalCluster::start(&exe(), &opts)
    .expect("starting the cluster")
}

/// A client for `worker` with small split threshold so test variables get partitioned.
pub async fn client(cluster: &LocalCluster, worker: u32, split_bytes: usize) -> Client {
    client_with(cluster, worker, split_bytes, true).await
}

/// [`client`], choosing whether tensors go over the shards' data plane or over gRPC.
pub async fn client_with(cluster: &LocalCluster, worker: u32, split_bytes: usize, data_plane: bool) -> Client {
    client_at(&cluster.addrs(), worker, split_bytes, data_plane).await
}

/// [`client_with`] for shard addresses (a cluster whose shards restart keeps them).
pub async fn client_at(addrs: &[String], worker: u32, split_bytes: usize, data_plane: bool) -> Client {
    let opts = ClientOptions {
        data_plane,
        worker_id: worker,
        split_bytes,
        chunk_bytes: 4096,
        pull_timeout: Some(Duration::from_secs(20)),
        connect_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    Client::connect(addrs, opts).await.expect("connecting")
}

/// Bounds a whole async test body.
pub async fn bounded<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f).await.expect("test timed out")
}

/// A folder removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, empty folder named after `tag` and this process.
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("parasync-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The complete checkpoints in `dir` (every one of `shards` shard manifests and the joined
/// one), by step, once no unfinished one is left (bounded wait).
pub async fn complete_checkpoints(dir: &std::path::Path, shards: usize) -> Vec<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (mut complete, mut unfinished) = (Vec::new(), Vec::new());
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let Some(step) = e.file_name().to_str().and_then(|n| n.strip_prefix("step-")).and_then(|n| n.parse::<u64>().ok()) else { continue };
            let have = (0..shards).filter(|i| e.path().join(format!("shard-{i}-of-{shards}.json")).is_file()).count();
            if have == shards && e.path().join("manifest.json").is_file() {
                complete.push(step);
            } else {
                unfinished.push(step);
            }
        }
        complete.sort();
        if unfinished.is_empty() {
            return complete;
        }
        assert!(std::time::Instant::now() < deadline, "checkpoints {unfinished:?} never got every shard's part (complete: {complete:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

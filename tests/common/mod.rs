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
    let opts = ClientOptions {
        data_plane,
        worker_id: worker,
        split_bytes,
        chunk_bytes: 4096,
        pull_timeout: Some(Duration::from_secs(20)),
        connect_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    Client::connect(&cluster.addrs(), opts).await.expect("connecting")
}

/// Bounds a whole async test body.
pub async fn bounded<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f).await.expect("test timed out")
}

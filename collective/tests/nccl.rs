//! NCCL backend: the GPU test runs on every visible GPU (one rank per GPU, ranks as threads)
//! and is ignored by default (`cargo test -p parasync-collective --features nccl --test nccl --
//! --ignored` on a GPU machine); the availability test runs everywhere.
#![cfg(feature = "nccl")]

use parasync_collective::nccl::{unavailable_reason, DeviceBf16, NcclCommunicator};
use parasync_collective::{
    CommConfig, ConnectOptions, Error, JoinSpec, ReduceOp, RendezvousHost, TcpOptions,
};
use std::time::Duration;

fn opts(rank: usize, world: usize, master: &str) -> ConnectOptions {
    let t = Duration::from_secs(60);
    ConnectOptions {
        spec: JoinSpec {
            rank,
            world_size: world,
            master: master.into(),
            token: "nccl-test".into(),
            auth_token: None,
            tls: None,
            timeout: t,
        },
        comm: CommConfig {
            timeout: t,
            ..CommConfig::default()
        },
        tcp: TcpOptions::default(),
        data_host: None,
    }
}

/// Without a GPU (or libnccl) a one-rank connect fails at once with the reason; with one, it
/// connects.
#[test]
fn connect_fails_fast_saying_why_unless_a_gpu_is_there() {
    let host = RendezvousHost::bind("127.0.0.1:0").unwrap();
    let master = host.local_addr().unwrap().to_string();
    let connected = NcclCommunicator::connect(&opts(0, 1, &master), Some(host), 0);
    match (unavailable_reason(), connected) {
        (Some(why), Err(Error::Nccl(msg))) => assert_eq!(msg, why),
        (Some(_), Err(e)) => panic!("unexpected error {e}"),
        (Some(why), Ok(_)) => panic!("connected although NCCL is unavailable: {why}"),
        (None, Err(e)) => panic!("a GPU is present but a one-rank connect failed: {e}"),
        (None, Ok(_)) => {}
    }
}

#[test]
#[ignore = "needs a GPU with NCCL (run with --ignored on a GPU machine, or scripts/gpu-smoke.sh)"]
fn allreduce_broadcast_allgather_on_every_visible_gpu() {
    if let Some(why) = unavailable_reason() {
        panic!("NCCL is unavailable here: {why}");
    }
    let n = cudarc::driver::CudaContext::device_count().unwrap() as usize;
    let host = RendezvousHost::bind("127.0.0.1:0").unwrap();
    let master = host.local_addr().unwrap().to_string();
    let mut host = Some(host);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let h = if r == 0 { host.take() } else { None };
                let o = opts(r, n, &master);
                s.spawn(move || {
                    let mut c = NcclCommunicator::connect(&o, h, r).unwrap();
                    let st = c.stream().clone();
                    let mut f = st.clone_htod(&vec![(r + 1) as f32; 1025]).unwrap();
                    c.allreduce(&mut f, ReduceOp::Sum).unwrap();
                    assert!(st
                        .clone_dtoh(&f)
                        .unwrap()
                        .iter()
                        .all(|&x| x == (n * (n + 1) / 2) as f32));
                    let mut b = st
                        .clone_htod(&vec![DeviceBf16::from_f32((r + 1) as f32); 1025])
                        .unwrap();
                    c.allreduce(&mut b, ReduceOp::Max).unwrap();
                    assert!(st
                        .clone_dtoh(&b)
                        .unwrap()
                        .iter()
                        .all(|&x| x.to_f32() == n as f32));
                    let mut v = st.clone_htod(&vec![r as f32; 33]).unwrap();
                    c.broadcast(&mut v, n - 1).unwrap();
                    assert!(st
                        .clone_dtoh(&v)
                        .unwrap()
                        .iter()
                        .all(|&x| x == (n - 1) as f32));
                    let send = st.clone_htod(&vec![r as i32; 3]).unwrap();
                    let mut all = st.alloc_zeros::<i32>(3 * n).unwrap();
                    c.allgather(&send, &mut all).unwrap();
                    assert_eq!(
                        st.clone_dtoh(&all).unwrap(),
                        (0..3 * n).map(|j| (j / 3) as i32).collect::<Vec<_>>()
                    );
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
}

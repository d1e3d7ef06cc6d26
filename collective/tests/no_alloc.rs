//! The hot path allocates nothing once warm: steady-state operations over TCP are counted
//! by a global allocator that tallies the calling thread's allocations.

use parasync_collective::{
    connect, connect_hosting, Algorithm, Bf16, CommConfig, ConnectOptions, JoinSpec, ReduceOp,
    RendezvousHost, TcpOptions,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only adds a thread-local counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

#[test]
fn steady_state_operations_do_not_allocate() {
    let host = RendezvousHost::bind("127.0.0.1:0").unwrap();
    let master = host.local_addr().unwrap().to_string();
    let mut host = Some(host);
    let t = Duration::from_secs(20);
    let counts: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|r| {
                let o = ConnectOptions {
                    spec: JoinSpec {
                        rank: r,
                        world_size: 3,
                        master: master.clone(),
                        token: "alloc".into(),
                        auth_token: None,
                        tls: None,
                        timeout: t,
                    },
                    comm: CommConfig {
                        timeout: t,
                        chunk_bytes: 64 << 10,
                        algorithm: Algorithm::Auto,
                        ..CommConfig::default()
                    },
                    tcp: TcpOptions::default(),
                    data_host: None,
                };
                let h = if r == 0 { host.take() } else { None };
                s.spawn(move || {
                    let mut c = match h {
                        Some(h) => connect_hosting(&o, h).unwrap(),
                        None => connect(&o).unwrap(),
                    };
                    let mut small = vec![1.0f32; 1000];
                    let mut large = vec![1.0f32; 300_000];
                    // 1.33 MB per ring step: read by peer copy where the machine permits it
                    let mut huge = vec![1.0f32; 1_000_000];
                    let mut half = vec![Bf16::from_f32(1.0); 300_001];
                    let mut gathered = vec![0i64; 3 * 5000];
                    let mut scattered = vec![0f64; 7000];
                    let send = vec![1f64; 3 * 7000];
                    let mut round = |c: &mut parasync_collective::Communicator| {
                        c.allreduce(&mut small, ReduceOp::Sum).unwrap();
                        c.allreduce(&mut large, ReduceOp::Max).unwrap();
                        c.allreduce(&mut huge, ReduceOp::Max).unwrap();
                        c.allreduce(&mut half, ReduceOp::Avg).unwrap();
                        c.broadcast(&mut large, 1).unwrap();
                        c.allgather_in_place(&mut gathered).unwrap();
                        c.reduce_scatter(&send, &mut scattered, ReduceOp::Sum)
                            .unwrap();
                        c.barrier().unwrap();
                    };
                    round(&mut c); // warm: scratch buffers grow to size once
                    let before = allocs();
                    for _ in 0..5 {
                        round(&mut c);
                    }
                    allocs() - before
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        counts,
        vec![0, 0, 0],
        "allocations per rank in 5 warm rounds"
    );
}

//! Tier 2/3: the rendezvous and the TCP data plane in one process (ranks as threads).

use parasync_collective::{
    connect, connect_hosting, CommConfig, Communicator, ConnectOptions, Error, JoinSpec, ReduceOp,
    RendezvousHost, TcpOptions,
};
use std::time::{Duration, Instant};

fn opts(rank: usize, world: usize, master: &str, timeout: Duration) -> ConnectOptions {
    ConnectOptions {
        spec: JoinSpec {
            rank,
            world_size: world,
            master: master.into(),
            token: "tcp-test".into(),
            auth_token: None,
            tls: None,
            timeout,
        },
        comm: CommConfig {
            timeout,
            ..CommConfig::default()
        },
        tcp: TcpOptions::default(),
        data_host: None,
    }
}

/// Runs `f(rank, communicator)` for `ranks` (a subset of a world of `world`) as threads.
fn job<R: Send>(
    world: usize,
    ranks: &[usize],
    timeout: Duration,
    f: impl Fn(usize, Result<Communicator, Error>) -> R + Sync,
) -> Vec<R> {
    let host = RendezvousHost::bind("127.0.0.1:0").unwrap();
    let master = host.local_addr().unwrap().to_string();
    let mut host = Some(host);
    std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .iter()
            .map(|&r| {
                let o = opts(r, world, &master, timeout);
                let h = if r == 0 { host.take() } else { None };
                let f = &f;
                s.spawn(move || {
                    let c = match h {
                        Some(h) => connect_hosting(&o, h),
                        None => connect(&o),
                    };
                    f(r, c)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_new_communicator_forms_after_a_rank_is_lost() {
    let t = Duration::from_secs(10);
    let errors = job(3, &[0, 1, 2], t, |r, c| {
        let mut c = c.unwrap();
        let mut v = vec![1.0f32; 100_000];
        c.allreduce(&mut v, ReduceOp::Sum).unwrap();
        assert_eq!(v[0], 3.0);
        if r == 2 {
            return None; // leaves the job: its sockets close
        }
        Some(c.allreduce(&mut v, ReduceOp::Sum).unwrap_err())
    });
    for e in errors.into_iter().flatten() {
        assert_eq!(e.culprit(), Some(2), "{e}");
        assert_eq!(e.seq(), Some(1), "{e}");
    }
    // The survivors meet again as a world of two.
    let sums = job(2, &[0, 1], t, |r, c| {
        let mut c = c.unwrap();
        let mut v = vec![r as f64 + 1.0; 10];
        c.allreduce(&mut v, ReduceOp::Sum).unwrap();
        v[0]
    });
    assert_eq!(sums, vec![3.0, 3.0]);
}

#[test]
fn the_rendezvous_names_ranks_that_do_not_show_up() {
    let started = Instant::now();
    let errors = job(3, &[0, 1], Duration::from_millis(800), |_, c| {
        c.err().expect("cannot meet without rank 2").to_string()
    });
    assert!(started.elapsed() < Duration::from_secs(10));
    for e in errors {
        assert!(e.contains("[2]"), "{e}");
    }
}

#[test]
fn a_world_size_disagreement_is_refused() {
    let host = RendezvousHost::bind("127.0.0.1:0").unwrap();
    let master = host.local_addr().unwrap().to_string();
    let t = Duration::from_secs(1);
    std::thread::scope(|s| {
        let h0 = s.spawn(|| connect_hosting(&opts(0, 2, &master, t), host).err());
        let e1 = connect(&opts(1, 3, &master, t)).err().expect("refused");
        assert!(e1.to_string().contains("world size 3"), "{e1}");
        assert!(h0.join().unwrap().is_some());
    });
}

#[test]
fn a_world_of_one_runs_every_operation() {
    let out = job(1, &[0], Duration::from_secs(5), |_, c| {
        let mut c = c.unwrap();
        let mut v = vec![1.5f32, -2.0, 7.0];
        c.allreduce(&mut v, ReduceOp::Avg).unwrap();
        c.broadcast(&mut v, 0).unwrap();
        let mut all = vec![0f32; 3];
        c.allgather(&v, &mut all).unwrap();
        let mut mine = vec![0f32; 3];
        c.reduce_scatter(&all, &mut mine, ReduceOp::Max).unwrap();
        c.barrier().unwrap();
        mine
    });
    assert_eq!(out, vec![vec![1.5, -2.0, 7.0]]);
}

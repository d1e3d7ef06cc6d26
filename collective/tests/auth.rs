//! A job with an auth token: ranks that present it form a communicator; a rank without it,
//! or with a wrong one, is refused by the rendezvous with a message that says so, and the
//! others report it missing instead of waiting forever.

use parasync_collective::{
    connect, connect_hosting, AuthToken, CommConfig, ConnectOptions, Error, JoinSpec, ReduceOp, RendezvousHost,
    TcpOptions,
};
use std::time::Duration;

fn opts(rank: usize, master: &str, auth: Option<&str>, timeout: Duration) -> ConnectOptions {
    ConnectOptions {
        spec: JoinSpec {
            rank,
            world_size: 2,
            master: master.into(),
            token: "auth-test".into(),
            auth_token: auth.map(|a| AuthToken::new(a).unwrap()),
            tls: None,
            timeout,
        },
        comm: CommConfig { timeout, ..CommConfig::default() },
        tcp: TcpOptions::default(),
        data_host: None,
    }
}

/// Rank 0 with `host_auth`, rank 1 with `joiner_auth`: what each one's allreduce of
/// `[rank + 1; 4]` gave, or its error.
fn two_ranks(host_auth: Option<&str>, joiner_auth: Option<&str>, timeout: Duration) -> [Result<Vec<f32>, Error>; 2] {
    let host = RendezvousHost::bind("127.0.0.1:0").unwrap();
    let master = host.local_addr().unwrap().to_string();
    let run = |rank: usize, c: Result<parasync_collective::Communicator, Error>| {
        let mut c = c?;
        let mut v = vec![rank as f32 + 1.0; 4];
        c.allreduce(&mut v, ReduceOp::Sum)?;
        Ok(v)
    };
    std::thread::scope(|s| {
        let o0 = opts(0, &master, host_auth, timeout);
        let o1 = opts(1, &master, joiner_auth, timeout);
        let r0 = s.spawn(move || run(0, connect_hosting(&o0, host)));
        let r1 = s.spawn(move || run(1, connect(&o1)));
        [r0.join().unwrap(), r1.join().unwrap()]
    })
}

#[test]
fn ranks_with_the_token_form_a_communicator() {
    let [a, b] = two_ranks(Some("job-s3cret"), Some("job-s3cret"), Duration::from_secs(20));
    assert_eq!(a.unwrap(), vec![3.0; 4]);
    assert_eq!(b.unwrap(), vec![3.0; 4]);
}

#[test]
fn a_rank_without_the_token_or_with_a_wrong_one_is_refused_and_named_missing() {
    for (joiner, why) in [(None, "presented none"), (Some("a-guess"), "wrong auth token")] {
        let started = std::time::Instant::now();
        let [host, joiner_result] = two_ranks(Some("job-s3cret"), joiner, Duration::from_secs(3));
        match joiner_result {
            Err(Error::TokenRefused(m)) => assert!(m.contains(why), "{m}"),
            other => panic!("the joiner got {other:?}"),
        }
        match host {
            Err(Error::Rendezvous(m)) => assert!(m.contains("ranks [1] did not join"), "{m}"),
            other => panic!("rank 0 got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    }
}

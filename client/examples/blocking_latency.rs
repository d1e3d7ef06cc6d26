//! Round-trip time of a 100 B push through `Client` (async, `block_on`) and through
//! `BlockingClient`, against a running shard: `cargo run --release -p parasync-client
//! --example blocking_latency -- HOST:PORT`.

use std::time::Instant;

use parasync_client::{BlockingClient, Client, ClientOptions, VariableSpec};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let addr = std::env::args().nth(1).expect("usage: blocking_latency HOST:PORT");
    let addrs = vec![addr];
    let spec = vec![VariableSpec::new("latency/w", &[25])];
    let grad = vec![1.0f32; 25];
    let rounds = 300;

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut c = rt.block_on(Client::connect(&addrs, ClientOptions::default())).unwrap();
    rt.block_on(c.register(spec.clone())).unwrap();
    let mut times = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        rt.block_on(c.push(0, &[&grad])).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!("Client, current thread push 100 B: median {:.1} us", median(times));

    let b = BlockingClient::connect(&addrs, ClientOptions::default()).unwrap();
    b.register(spec, &mut || false).unwrap();
    let mut times = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        b.push(0, &[&grad], &mut || false).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!("BlockingClient         push 100 B: median {:.1} us", median(times));
}

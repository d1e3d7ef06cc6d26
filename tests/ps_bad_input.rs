//! Every class of bad input gets the right gRPC status and a message naming the variable,
//! and leaves the server serving with every variable unchanged.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw::RawCodec;
use parasync_proto::ps::{self, parameter_server_client::ParameterServerClient};
use tonic::transport::Channel;
use tonic::{Code, Status};

const F32: i32 = ps::Dtype::F32 as i32;

fn f32_bytes(v: &[f32]) -> Bytes {
    let mut b = Vec::new();
    for x in v {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b.into()
}

fn push_msgs(header: ps::PushHeader, chunks: Vec<Bytes>) -> Vec<ps::PushRequest> {
    let mut header = Some(header);
    chunks.into_iter().map(|data| ps::PushRequest { header: header.take(), data }).collect()
}

fn header(variable: &str, worker: u32, step: u64, n: u64) -> ps::PushHeader {
    ps::PushHeader {
        variable: variable.into(),
        worker_id: worker,
        step,
        base_version: step,
        wire_dtype: F32,
        num_elements: n,
        kind: ps::PushKind::Gradient as i32,
        ..Default::default()
    }
}

async fn push(c: &mut ParameterServerClient<Channel>, msgs: Vec<ps::PushRequest>) -> Result<ps::PushResponse, Status> {
    c.push(futures::stream::iter(msgs)).await.map(|r| r.into_inner())
}

async fn pull_values(c: &mut ParameterServerClient<Channel>, name: &str) -> Vec<u8> {
    let req = ps::PullRequest { variable: name.into(), worker_id: 0, step: 0, wire_dtype: F32, timeout_ms: 1000 };
    let mut s = c.pull(req).await.expect("pull").into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.expect("pull stream") {
        out.extend_from_slice(&m.data);
    }
    out
}

fn expect(r: Result<impl std::fmt::Debug, Status>, code: Code, needle: &str, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got success {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            assert!(s.message().contains(needle), "{what}: message {:?} should mention {needle:?}", s.message());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    common::bounded(60, async {
        let cluster = common::cluster(
            1,
            &["--mode", "sync", "--num-workers", "2", "--chunk-bytes", "65536", "--max-message-bytes", "1048576"],
        );
        let addr = format!("http://{}", cluster.addrs()[0]);
        let channel = Channel::from_shared(addr).unwrap().connect().await.unwrap();
        let mut c = ParameterServerClient::new(channel.clone()).max_encoding_message_size(8 << 20);

        let sgd = ps::Optimizer { kind: Some(ps::optimizer::Kind::Sgd(ps::Sgd { learning_rate: 1.0, momentum: 0.0, nesterov: false })) };
        let init = ps::Initializer { kind: Some(ps::initializer::Kind::Uniform(ps::UniformInit { low: -1.0, high: 1.0, seed: 3 })) };
        let reg = ps::RegisterRequest {
            name: "w".into(),
            shape: vec![4, 3],
            storage_dtype: F32,
            optimizer: Some(sgd),
            init: Some(init),
            stochastic_rounding: false,
        };
        assert!(c.register(reg.clone()).await.unwrap().into_inner().created);
        let before = pull_values(&mut c, "w").await;
        assert_eq!(before.len(), 48);

        // registration
        expect(c.register(ps::RegisterRequest { shape: vec![3, 4], ..reg.clone() }).await, Code::AlreadyExists, "\"w\"", "conflicting shape");
        expect(c.register(ps::RegisterRequest { storage_dtype: 0, ..reg.clone() }).await, Code::InvalidArgument, "storage_dtype", "unspecified dtype");
        expect(c.register(ps::RegisterRequest { name: "z".into(), shape: vec![2, 0], ..reg.clone() }).await, Code::InvalidArgument, "zero dimension", "zero dim");
        let bad_lr = ps::Optimizer { kind: Some(ps::optimizer::Kind::Sgd(ps::Sgd { learning_rate: -1.0, momentum: 0.0, nesterov: false })) };
        expect(c.register(ps::RegisterRequest { name: "z".into(), optimizer: Some(bad_lr), ..reg.clone() }).await, Code::InvalidArgument, "optimizer", "negative lr");
        expect(c.register(ps::RegisterRequest { name: "z".into(), optimizer: None, ..reg.clone() }).await, Code::InvalidArgument, "no optimizer", "missing optimizer");

        // unknown variable
        expect(push(&mut c, push_msgs(header("nope", 0, 0, 12), vec![f32_bytes(&[0.0; 12])])).await, Code::NotFound, "\"nope\"", "push unknown");
        let pull_nope = c.pull(ps::PullRequest { variable: "nope".into(), wire_dtype: F32, ..Default::default() }).await;
        expect(pull_nope.map(|_| ()), Code::NotFound, "\"nope\"", "pull unknown");

        let ok_data = f32_bytes(&[1.0; 12]);
        // shape / element count mismatch
        expect(push(&mut c, push_msgs(header("w", 0, 0, 10), vec![ok_data.clone()])).await, Code::InvalidArgument, "shape [4, 3]", "wrong count");
        // dtype
        let mut h = header("w", 0, 0, 12);
        h.wire_dtype = 0;
        expect(push(&mut c, push_msgs(h.clone(), vec![ok_data.clone()])).await, Code::InvalidArgument, "wire_dtype", "unspecified wire dtype");
        h.wire_dtype = 99;
        expect(push(&mut c, push_msgs(h, vec![ok_data.clone()])).await, Code::InvalidArgument, "unknown value 99", "unknown wire dtype");
        let mut h = header("w", 0, 0, 12);
        h.pull_wire_dtype = 42;
        expect(push(&mut c, push_msgs(h, vec![ok_data.clone()])).await, Code::InvalidArgument, "pull_wire_dtype has unknown value 42", "unknown pull wire dtype");
        let mut h = header("w", 0, 0, 12);
        h.kind = 7;
        expect(push(&mut c, push_msgs(h, vec![ok_data.clone()])).await, Code::InvalidArgument, "unknown push kind 7", "unknown kind");
        // byte lengths
        expect(push(&mut c, push_msgs(header("w", 0, 0, 12), vec![Bytes::from_static(&[0; 5])])).await, Code::InvalidArgument, "not a whole number", "ragged bytes");
        expect(push(&mut c, push_msgs(header("w", 0, 0, 12), vec![ok_data.slice(..40)])).await, Code::InvalidArgument, "after 10 of 12", "short");
        expect(push(&mut c, push_msgs(header("w", 0, 0, 12), vec![ok_data.clone(), ok_data.slice(..4)])).await, Code::InvalidArgument, "overruns", "long");
        // step, worker
        expect(push(&mut c, push_msgs(header("w", 0, 5, 12), vec![ok_data.clone()])).await, Code::OutOfRange, "step 5", "future step");
        expect(push(&mut c, push_msgs(header("w", 9, 0, 12), vec![ok_data.clone()])).await, Code::InvalidArgument, "worker id 9", "unknown worker");
        // non-finite values, in a later chunk
        let mut vals = [1.0f32; 12];
        vals[7] = f32::INFINITY;
        let inf = f32_bytes(&vals);
        expect(push(&mut c, push_msgs(header("w", 0, 0, 12), vec![inf.slice(..16), inf.slice(16..)])).await, Code::InvalidArgument, "element 7 is inf", "non-finite");
        // malformed framing
        expect(push(&mut c, vec![ps::PushRequest { header: None, data: ok_data.clone() }]).await, Code::InvalidArgument, "header", "no header");
        expect(push(&mut c, vec![]).await, Code::InvalidArgument, "empty push", "empty stream");
        let mut twice = push_msgs(header("w", 0, 0, 12), vec![ok_data.slice(..24), ok_data.slice(24..)]);
        twice[1].header = Some(header("w", 0, 0, 12));
        expect(push(&mut c, twice).await, Code::InvalidArgument, "first message only", "repeated header");
        // oversized message (server limit 1 MiB)
        let big = Bytes::from(vec![0u8; 2 << 20]);
        let r = push(&mut c, push_msgs(header("w", 0, 0, 12), vec![ok_data.slice(..8), big.clone()])).await;
        expect(r, Code::ResourceExhausted, "a chunk of a push to \"w\" is larger than this server accepts", "oversized chunk");
        let r = push(&mut c, vec![ps::PushRequest { header: Some(header("w", 0, 0, 12)), data: big }]).await;
        expect(r, Code::ResourceExhausted, "the first message of a push is larger", "oversized first message");
        // a message that is not protobuf at all
        let mut raw = tonic::client::Grpc::new(channel.clone());
        raw.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/parasync.ps.v1.ParameterServer/Register");
        let r = raw.unary(tonic::Request::new(vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]), path, RawCodec).await;
        expect(r.map(|_| ()), Code::InvalidArgument, "malformed", "garbage bytes");
        // a pull for a step that never completes names the missing workers
        let req = ps::PullRequest { variable: "w".into(), worker_id: 0, step: 1, wire_dtype: F32, timeout_ms: 200 };
        expect(c.pull(req).await.map(|_| ()), Code::DeadlineExceeded, "worker(s) [0, 1]", "pull timeout");

        // nothing changed, the server still serves, and a valid push still works
        assert_eq!(pull_values(&mut c, "w").await, before, "rejected calls must not change the variable");
        let mut again = ParameterServerClient::new(Channel::from_shared(format!("http://{}", cluster.addrs()[0])).unwrap().connect().await.unwrap());
        let info = again.server_info(ps::ServerInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.variables.len(), 1, "rejected registrations created nothing");
        push(&mut c, push_msgs(header("w", 0, 0, 12), vec![ok_data.clone()])).await.unwrap();
        expect(push(&mut c, push_msgs(header("w", 0, 0, 12), vec![ok_data.clone()])).await, Code::FailedPrecondition, "already pushed", "duplicate");
        push(&mut c, push_msgs(header("w", 1, 0, 12), vec![ok_data.clone()])).await.unwrap();
        let after = pull_values(&mut c, "w").await;
        let expected: Vec<u8> = before
            .chunks(4)
            .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) - 1.0).to_le_bytes())
            .collect();
        assert_eq!(after, expected, "one sync step applied the mean gradient");
        let _ = Duration::ZERO;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_non_finite_accepts_and_applies_nan_and_inf() {
    common::bounded(60, async {
        // Off by default (the test above); with the flag, non-finite gradients are applied
        // like any other, on both transports.
        let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1", "--allow-non-finite"]);
        for data_plane in [true, false] {
            let mut c = common::client_with(&cluster, 0, 1 << 20, data_plane).await;
            let name = format!("w{}", data_plane as u8);
            let mut v = parasync_client::VariableSpec::new(&name, &[4]);
            v.optimizer = parasync_client::Optimizer::sgd(1.0);
            c.register(vec![v]).await.unwrap();
            c.push(0, &[&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0]]).await.unwrap();
            let w = c.pull(0).await.unwrap();
            assert!(w[0][0].is_nan(), "{data_plane}: {:?}", w[0]);
            assert_eq!(&w[0][1..], &[f32::NEG_INFINITY, f32::INFINITY, -1.0], "{data_plane}");
        }
    })
    .await;
}

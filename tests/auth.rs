//! A shard started with an auth token: every gRPC method and the data plane refuse callers
//! without it (or with a wrong one) and change nothing; health checks stay open; clients
//! that present it work over both transports.

mod common;

use std::time::Duration;

use common::raw::{f32_bytes, hello_op, pull_op, push_op, Raw};
use parasync_client::{AuthToken, Client, ClientOptions, ErrorKind, Init, Optimizer, VariableSpec};
use parasync_proto::auth::PresentToken;
use parasync_proto::ps::{self, parameter_server_client::ParameterServerClient};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

const TOKEN: &str = "shard-s3cret-0123456789";

type Stub = ParameterServerClient<InterceptedService<Channel, PresentToken>>;

/// A one-shard async cluster whose token is in a file; returns the cluster and the file's
/// folder (removed by the caller).
fn cluster_with_token() -> (parasync::cluster::LocalCluster, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("parasync-auth-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let cluster = common::cluster(1, &["--mode", "async", "--num-workers", "1", "--auth-token-file", file.to_str().unwrap()]);
    (cluster, dir)
}

async fn stub(cluster: &parasync::cluster::LocalCluster, token: Option<&str>) -> Stub {
    let channel = Channel::from_shared(format!("http://{}", cluster.addrs()[0])).unwrap().connect().await.unwrap();
    ParameterServerClient::with_interceptor(channel, PresentToken(token.map(|t| AuthToken::new(t).unwrap())))
}

fn options(token: Option<&str>, data_plane: bool) -> ClientOptions {
    ClientOptions {
        data_plane,
        connect_timeout: Duration::from_secs(10),
        pull_timeout: Some(Duration::from_secs(10)),
        auth_token: token.map(|t| AuthToken::new(t).unwrap()),
        ..Default::default()
    }
}

fn push_header(variable: &str, n: u64) -> ps::PushHeader {
    ps::PushHeader {
        variable: variable.into(),
        wire_dtype: ps::Dtype::F32 as i32,
        num_elements: n,
        kind: ps::PushKind::Gradient as i32,
        ..Default::default()
    }
}

/// Calls every method of the service; returns each one's status code and message.
async fn call_every_method(c: &mut Stub) -> Vec<(&'static str, Code, String)> {
    let push = || {
        futures::stream::iter(vec![ps::PushRequest { header: Some(push_header("w", 4)), data: f32_bytes(&[100.0; 4]).into() }])
    };
    let sgd = ps::Optimizer { kind: Some(ps::optimizer::Kind::Sgd(ps::Sgd { learning_rate: 5.0, momentum: 0.0, nesterov: false })) };
    let register = ps::RegisterRequest {
        name: "intruder".into(),
        shape: vec![1 << 20],
        storage_dtype: ps::Dtype::F32 as i32,
        optimizer: Some(sgd),
        ..Default::default()
    };
    let status = |name, r: Result<(), tonic::Status>| match r {
        Ok(()) => (name, Code::Ok, String::new()),
        Err(s) => (name, s.code(), s.message().to_string()),
    };
    let pull = ps::PullRequest { variable: "w".into(), wire_dtype: ps::Dtype::F32 as i32, timeout_ms: 1000, ..Default::default() };
    let rate = ps::SetLearningRateRequest { learning_rate: Some(0.0), all_variables: true, ..Default::default() };
    vec![
        status("register", c.register(register).await.map(drop)),
        status("push", c.push(push()).await.map(drop)),
        status("pull", c.pull(pull).await.map(drop)),
        status("push_pull", c.push_pull(push()).await.map(drop)),
        status("set_learning_rate", c.set_learning_rate(rate).await.map(drop)),
        status("server_info", c.server_info(ps::ServerInfoRequest {}).await.map(drop)),
        status("checkpoint", c.checkpoint(ps::CheckpointRequest { step: 1 }).await.map(drop)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_and_the_data_plane_refuse_callers_without_the_token() {
    common::bounded(90, async {
        let (cluster, dir) = cluster_with_token();

        // The right token: a variable to protect, registered, pushed and pulled over both transports.
        let mut w = VariableSpec::new("w", &[4]);
        w.optimizer = Optimizer::sgd(1.0);
        w.init = Init::Values(vec![1.0, 2.0, 3.0, 4.0]);
        for data_plane in [true, false] {
            let mut c = Client::connect(&cluster.addrs(), options(Some(TOKEN), data_plane)).await.unwrap();
            assert_eq!(c.shard_info().await.unwrap()[0].data_plane.is_some(), data_plane);
            c.register(vec![w.clone()]).await.unwrap();
            c.push(0, &[&[0.5; 4]]).await.unwrap();
        }
        let mut owner = Client::connect(&cluster.addrs(), options(Some(TOKEN), true)).await.unwrap();
        owner.register(vec![w.clone()]).await.unwrap();
        let expected = vec![vec![0.0, 1.0, 2.0, 3.0]];
        assert_eq!(owner.pull(0).await.unwrap(), expected);
        let data_addr = owner.shard_info().await.unwrap()[0].data_plane.clone().unwrap();

        // No token, then a wrong one: every method is refused.
        for (token, why) in [(None, "presented none"), (Some("shard-s3cret-012345678X"), "wrong auth token")] {
            let mut c = stub(&cluster, token).await;
            for (method, code, message) in call_every_method(&mut c).await {
                assert_eq!(code, Code::Unauthenticated, "{method} with {token:?}: {message}");
                assert!(message.contains(why), "{method}: {message}");
            }
        }
        // The client says so at connect, as its own kind of error.
        for token in [None, Some("guess")] {
            let e = Client::connect(&cluster.addrs(), options(token, true)).await.err().expect("refused");
            assert_eq!(e.kind, ErrorKind::Unauthenticated, "{e}");
        }

        // The data plane: requests before a hello, a hello without the token or with a
        // wrong one are answered `unauthenticated` and the connection closes.
        let addr = data_addr.clone();
        tokio::task::spawn_blocking(move || {
            let mut raw = Raw::open(&addr);
            raw.send(push_op("w", 4, ps::Dtype::F32), &f32_bytes(&[100.0; 4]));
            raw.expect(Code::Unauthenticated, "requires an auth token", "a push without a hello");
            assert!(raw.closed());
            let mut raw = Raw::open(&addr);
            raw.send(pull_op("w"), &[]);
            raw.expect(Code::Unauthenticated, "requires an auth token", "a pull without a hello");
            for (token, why) in [("", "presented none"), ("guess", "wrong auth token")] {
                let mut raw = Raw::open(&addr);
                raw.send(hello_op(token), &[]);
                raw.expect(Code::Unauthenticated, why, "a hello with a bad token");
                assert!(raw.closed());
            }
            // The right hello opens the connection for requests.
            let mut raw = Raw::open(&addr);
            raw.send(hello_op(TOKEN), &[]);
            raw.expect(Code::Ok, "", "the right hello");
            raw.send(pull_op("w"), &[]);
            let (reply, values) = raw.reply();
            assert_eq!(reply.code, 0, "{}", reply.message);
            assert_eq!(values, f32_bytes(&[0.0, 1.0, 2.0, 3.0]));
        })
        .await
        .unwrap();

        // Nothing the refused callers sent changed anything.
        assert_eq!(owner.pull(0).await.unwrap(), expected);
        let info = stub(&cluster, Some(TOKEN)).await.server_info(ps::ServerInfoRequest {}).await.unwrap().into_inner();
        let vars: Vec<_> = info.variables.iter().map(|v| (v.name.as_str(), v.learning_rate, v.version)).collect();
        assert_eq!(vars, vec![("w", 1.0, 2)], "only the two authorised pushes, at the rate registered");

        // Health checks need no token.
        let channel = Channel::from_shared(format!("http://{}", cluster.addrs()[0])).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let h = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
        assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        drop(cluster);
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[test]
fn a_bad_token_file_stops_the_server_with_a_message() {
    let dir = std::env::temp_dir().join(format!("parasync-auth-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "two words\n").unwrap();
    for (path, needle) in [(file.to_str().unwrap(), "printable ASCII"), ("/nonexistent/parasync-token", "/nonexistent/parasync-token")] {
        let out = std::process::Command::new(common::exe())
            .args(["server", "--listen", "127.0.0.1:0", "--auth-token-file", path])
            .env_remove("PARASYNC_AUTH_TOKEN")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {path}");
        assert!(stderr.contains(needle), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

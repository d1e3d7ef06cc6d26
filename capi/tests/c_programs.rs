//! C programs (tests/c/) compiled against `include/parasync.h` and the static library,
//! run as child processes: against a real parameter server, as the two ranks of a job, and
//! with bad arguments. Every program checks its own results and exits non-zero, saying why,
//! on the first mismatch. Only 127.0.0.1 and ephemeral ports; every wait is bounded.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long one C program may run.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(60);

/// `target/<profile>`: this test runs from `target/<profile>/deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.parent().and_then(Path::parent).expect("the test runs from target/<profile>/deps").to_path_buf()
}

/// The static library: `deps/` holds the one `cargo test` just built with this test;
/// `cargo build` also copies it up to `target/<profile>/`.
fn static_lib() -> PathBuf {
    let dir = profile_dir();
    let candidates = [dir.join("deps/libparasync.a"), dir.join("libparasync.a")];
    candidates.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| {
        panic!(
            "libparasync.a is in neither {} nor {}: build it with `cargo build -p parasync-capi` \
             (with the same --release / CARGO_TARGET_DIR as this test)",
            candidates[0].display(),
            candidates[1].display()
        )
    })
}

fn capi_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where the compiled programs go.
fn out_dir() -> PathBuf {
    let dir = profile_dir().join("capi-c-tests");
    std::fs::create_dir_all(&dir).expect("creating the C programs' directory");
    dir
}

/// Compiles `tests/c/<name>.c` once per test process and returns the executable.
fn program(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(exe) = built.get(name) {
        return exe.clone();
    }
    let exe = compile(&capi_dir().join(format!("tests/c/{name}.c")), name);
    built.insert(name.to_string(), exe.clone());
    exe
}

/// Compiles and links one C file against the header and the static library.
fn compile(src: &Path, name: &str) -> PathBuf {
    let exe = out_dir().join(name);
    let output = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-D_POSIX_C_SOURCE=200809L", "-g"])
        .arg("-I")
        .arg(capi_dir().join("include"))
        .arg(src)
        .arg(static_lib())
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("running the C compiler (`cc`, or $CC)");
    assert!(
        output.status.success(),
        "compiling {} failed:\n{}{}",
        src.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// A running C program whose output is collected.
struct Running {
    what: String,
    child: Child,
    output: Vec<std::thread::JoinHandle<String>>,
}

impl Running {
    fn start(mut cmd: Command, what: &str) -> Running {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starting a C program");
        let read = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let output = vec![read(Box::new(child.stdout.take().unwrap())), read(Box::new(child.stderr.take().unwrap()))];
        Running { what: what.to_string(), child, output }
    }

    /// Waits (at most [`PROGRAM_TIMEOUT`], then kills it) and fails unless it exited with 0.
    fn expect_success(mut self) -> String {
        let deadline = Instant::now() + PROGRAM_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for a C program") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text: Vec<String> = self.output.drain(..).map(|t| t.join().unwrap_or_default()).collect();
        let shown = format!("--- stdout\n{}--- stderr\n{}", text[0], text[1]);
        match status {
            None => panic!("{} ran past {PROGRAM_TIMEOUT:?} and was killed\n{shown}", self.what),
            Some(s) if !s.success() => panic!("{} failed ({s})\n{shown}", self.what),
            Some(_) => {
                println!("{} passed\n{shown}", self.what);
                shown
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that fails early must not leave the program behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback port that nothing listens on any more (bound, then released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    l.local_addr().unwrap().port()
}

/// One parameter-server shard, in this process: sync mode, one worker, data plane on.
struct Server {
    addr: String,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The server's outcome, its error as text.
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Server {
    fn start(checkpoint_dir: Option<std::path::PathBuf>) -> Server {
        Server::start_with(checkpoint_dir, None)
    }

    fn start_with(checkpoint_dir: Option<std::path::PathBuf>, auth_token: Option<&str>) -> Server {
        use ps_server::config::ServerSettings;
        use ps_server::consistency::Mode;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (listener, data) = runtime.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the server");
            let d = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the data plane");
            (l, d)
        });
        let addr = listener.local_addr().unwrap().to_string();
        let settings = ServerSettings {
            listen: addr.clone(),
            shard_index: 0,
            mode: Mode::Sync { num_workers: 1, replicas_to_aggregate: 1 },
            pull_timeout: Duration::from_secs(20),
            allow_non_finite: false,
            spare_buffer_bytes: 0,
            max_shard_bytes: u64::MAX,
            max_variable_elements: ps_server::store::MAX_ELEMENTS,
            metrics_listen: None,
            chunk_bytes: 1 << 20,
            max_message_bytes: 16 << 20,
            drain_timeout: Duration::from_secs(2),
            worker_threads: 2,
            data_listen: Some(data.local_addr().unwrap().to_string()),
            data_limits: ps_server::dataplane::Limits { max_connections: 64, idle_timeout: Duration::from_secs(300) },
            num_shards: Some(1),
            checkpoint_dir,
            checkpoint_every_steps: 0,
            checkpoint_every: None,
            keep_checkpoints: 1,
            restore: None,
            auth_token: auth_token.map(|t| parasync_client::AuthToken::new(t).unwrap()),
            tls: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            ps_server::server::run(listener, None, Some(data), settings, shutdown).await.map_err(|e| format!("{e:#}"))
        });
        Server { addr, runtime, stop: Some(stop), task: Some(task) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            let result = self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
            if !std::thread::panicking() {
                match result {
                    Ok(Ok(Ok(()))) => {}
                    other => panic!("the parameter server did not stop cleanly: {other:?}"),
                }
            }
        }
    }
}

#[test]
fn a_c_worker_trains_against_a_real_parameter_server() {
    let dir = std::env::temp_dir().join(format!("parasync-capi-ckpt-{}", std::process::id()));
    let server = Server::start(Some(dir.clone()));
    let mut cmd = Command::new(program("ps_client"));
    cmd.arg(&server.addr);
    let out = Running::start(cmd, "ps_client").expect_success();
    assert!(out.contains("training steps: every value as expected"), "{out}");
    assert!(out.contains("checkpoint of step 4 written"), "{out}");
    assert!(out.contains("ps_client: all checks passed"), "{out}");
    let written = ["shard-0-of-1.safetensors", "shard-0-of-1.json", "manifest.json"].map(|f| dir.join("step-4").join(f).is_file());
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(written, [true; 3], "the checkpoint's files");
}

#[test]
fn a_shard_with_a_token_refuses_c_clients_without_it() {
    let server = Server::start_with(None, Some("c-s3cret"));
    let mut cmd = Command::new(program("auth"));
    cmd.args([&server.addr, "c-s3cret"]);
    cmd.env_remove("PARASYNC_AUTH_TOKEN").env_remove("PARASYNC_AUTH_TOKEN_FILE");
    let out = Running::start(cmd, "auth").expect_success();
    assert!(out.contains("-> PARASYNC_STATUS_UNAUTHENTICATED: ") && out.contains("wrong auth token"), "{out}");
    assert!(out.contains("auth: all checks passed"), "{out}");
}

/// Both ranks of a two-rank job as C processes.
fn two_ranks(mode: &str) -> [String; 2] {
    let exe = program("collectives");
    let master = format!("127.0.0.1:{}", free_port());
    let ranks = [0, 1].map(|rank| {
        let mut cmd = Command::new(&exe);
        cmd.args([rank.to_string(), master.clone(), mode.to_string()]);
        Running::start(cmd, &format!("collectives rank {rank} ({mode})"))
    });
    ranks.map(Running::expect_success)
}

#[test]
fn two_c_processes_run_every_collective() {
    for (rank, out) in two_ranks("ops").iter().enumerate() {
        assert!(out.contains(&format!("rank {rank}: all checks passed")), "{out}");
        assert!(out.contains("broadcast root 5 is not a rank of 2"), "{out}");
    }
}

#[test]
fn the_survivor_of_a_departed_rank_is_told_which_rank_left() {
    let [survivor, leaver] = two_ranks("leave");
    assert!(leaver.contains("rank 1: left"), "{leaver}");
    assert!(survivor.contains("PARASYNC_STATUS_PEER") && survivor.contains("PARASYNC_STATUS_POISONED"), "{survivor}");
}

#[test]
fn bad_arguments_and_absent_peers_fail_quickly_with_messages() {
    let mut cmd = Command::new(program("errors"));
    cmd.arg(format!("127.0.0.1:{}", free_port()));
    // An empty launcher environment, whatever this test runs under.
    for var in ["TF_CONFIG", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"] {
        cmd.env_remove(var);
    }
    let out = Running::start(cmd, "errors").expect_success();
    assert!(out.contains("errors: all checks passed"), "{out}");
}

#[test]
fn the_readme_example_trains_against_a_real_parameter_server() {
    let readme = std::fs::read_to_string(capi_dir().join("README.md")).expect("reading README.md");
    let example = readme.split("```c\n").nth(1).and_then(|rest| rest.split("```").next()).expect("README.md has a ```c block");
    let src = out_dir().join("readme_example.c");
    std::fs::write(&src, example).unwrap();
    let exe = compile(&src, "readme_example");
    let server = Server::start(None);
    let mut cmd = Command::new(exe);
    cmd.arg(&server.addr);
    Running::start(cmd, "the README's example").expect_success();
}

#[test]
fn the_header_compiles_as_cpp() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    assert!(
        Command::new(&cxx).arg("--version").output().is_ok(),
        "no C++ compiler ({cxx}): install g++ or set CXX"
    );
    let src = out_dir().join("header_check.cc");
    std::fs::write(
        &src,
        "#include \"parasync.h\"\n\
         int main() { ParasyncStatus s = parasync_ps_options_default(nullptr); return s == PARASYNC_STATUS_USAGE ? 0 : 1; }\n",
    )
    .unwrap();
    let output = Command::new(&cxx)
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only", "-I"])
        .arg(capi_dir().join("include"))
        .arg(&src)
        .output()
        .expect("running the C++ compiler");
    assert!(output.status.success(), "include/parasync.h does not compile as C++:\n{}", String::from_utf8_lossy(&output.stderr));
}

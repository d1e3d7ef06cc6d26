//! Serving: the gRPC server (with health and reflection) and the metrics endpoint, until
//! a shutdown signal arrives, then a drain of in-flight calls.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use parasync_proto::ps::parameter_server_server::ParameterServerServer;
use parasync_proto::auth::RequireToken;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tokio::sync::watch;

use crate::config::ServerSettings;
use crate::metrics::Metrics;
use crate::service::{PsService, ServiceConfig};
use crate::store::{StoreConfig, VariableStore};

/// HTTP/2 flow-control windows: large, so one stream can keep a loopback link busy.
const STREAM_WINDOW: u32 = 64 << 20;
const CONNECTION_WINDOW: u32 = 256 << 20;

/// Serves `settings` on `listener` (and the metrics endpoint on `metrics`) until `shutdown`
/// completes; then stops accepting, releases waiting pulls, and lets in-flight calls finish.
pub async fn run(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    data_listener: Option<TcpListener>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let prepared = prepare(&settings)?;
    run_prepared(prepared, listener, metrics_listener, data_listener, settings, shutdown).await
}

/// A shard's state before it serves: its store, restored from a checkpoint if `--restore`
/// asks for one, and its checkpointer.
pub struct Prepared {
    metrics: Arc<Metrics>,
    store: Arc<VariableStore>,
    /// The restored checkpoint's step and the job's shard count.
    restored_step: Option<(u64, u32)>,
}

/// Builds the store of `settings` and restores it (reading the checkpoint: seconds for
/// large shards, which is why a launcher hears of the address only after this).
pub fn prepare(settings: &ServerSettings) -> anyhow::Result<Prepared> {
    let metrics = Arc::new(Metrics::default());
    let store = Arc::new(VariableStore::new(
        StoreConfig {
            mode: settings.mode,
            allow_non_finite: settings.allow_non_finite,
            spare_buffer_bytes: settings.spare_buffer_bytes,
            max_shard_bytes: settings.max_shard_bytes,
            max_variable_elements: settings.max_variable_elements,
        },
        Arc::clone(&metrics),
    ));
    let restored_step = restore(&store, settings)?;
    if let Some((step, _)) = restored_step {
        metrics.restored_step.store(step, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(dir) = &settings.checkpoint_dir {
        let num_shards = match (settings.num_shards, &restored_step) {
            (Some(n), _) => n,
            (None, Some((_, n))) => *n,
            (None, None) => anyhow::bail!("--checkpoint-dir needs the job's shard count: pass --num-shards (or TF_CONFIG)"),
        };
        let cs = crate::checkpoint::CheckpointSettings {
            dir: dir.clone(),
            every_steps: settings.checkpoint_every_steps,
            every: settings.checkpoint_every,
            keep: settings.keep_checkpoints,
            shard: settings.shard_index,
            num_shards,
        };
        let step = restored_step.map_or(0, |(s, _)| s);
        store.set_checkpointer(crate::checkpoint::Checkpointer::start(cs, settings.mode, step, Arc::clone(&metrics))?);
    }
    Ok(Prepared { metrics, store, restored_step })
}

/// [`run`] with the store [`prepare`] made.
pub async fn run_prepared(
    prepared: Prepared,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    data_listener: Option<TcpListener>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Prepared { metrics, store, restored_step } = prepared;
    let store_checkpointer = store.checkpointer().cloned();
    let tables_of = Arc::clone(&store);
    let (stop_tx, stop_rx) = watch::channel(false);
    let service = PsService::new(
        store,
        ServiceConfig {
            shard_index: settings.shard_index,
            default_pull_timeout: settings.pull_timeout,
            chunk_bytes: settings.chunk_bytes,
            data_port: data_listener.as_ref().and_then(|l| l.local_addr().ok()).map_or(0, |a| a.port()),
            restored_step: restored_step.map(|(s, _)| s),
        },
        stop_rx.clone(),
    );
    let checkpointer = store_checkpointer.clone();
    let data_task = data_listener.map(|l| {
        let limits = settings.data_limits;
        let access = crate::dataplane::Access { token: settings.auth_token.clone(), tls: settings.tls.as_ref().map(|t| t.acceptor()) };
        tokio::spawn(crate::dataplane::serve(l, service.clone(), stop_rx.clone(), limits, access))
    });
    // Every service but health needs the token (when the shard has one).
    let auth = RequireToken(settings.auth_token.clone());
    let ps = ParameterServerServer::new(service)
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes);
    let ps = InterceptedService::new(ps, auth.clone());

    let (health_reporter, health) = crate::health::health_reporter(stop_rx.clone());
    health_reporter.set_serving::<ParameterServerServer<PsService>>().await;
    // Reflection lists the services this server offers (the descriptor set also holds the
    // collectives' rendezvous service, which it does not), in both protocol versions:
    // v1alpha is what older grpcurl / grpc_cli builds ask for.
    let reflection_builder = || {
        let served = [
            "parasync.ps.v1.ParameterServer",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        served.into_iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(parasync_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // Both versions' own descriptors, since each endpoint lists both services
                // (a builder adds only its own version's).
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(name),
        )
    };
    let reflection = InterceptedService::new(reflection_builder().build_v1().context("building the reflection service")?, auth.clone());
    let reflection_v1alpha =
        InterceptedService::new(reflection_builder().build_v1alpha().context("building the v1alpha reflection service")?, auth);

    let metrics_task = metrics_listener.map(|l| {
        let metrics = Arc::clone(&metrics);
        let shard = settings.shard_index;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let m = Arc::clone(&metrics);
                    let store = Arc::clone(&tables_of);
                    async move {
                        let mut out = m.render(shard);
                        store.tables().render_metrics(shard, &mut out);
                        out
                    }
                }),
            );
            let _ = axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|&s| s).await;
                })
                .await;
        })
    });

    // On shutdown: mark not serving, wake waiting pulls, then let tonic drain, for at most
    // `drain_timeout`: a client that never finishes its call must not keep the server up.
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = async move {
        let _ = signalled_rx.await;
        tracing::info!("shutting down: no new calls, draining in-flight ones");
        health_reporter.set_not_serving::<ParameterServerServer<PsService>>().await;
        // The whole server too: probes (Kubernetes' among them) ask for "" by default.
        health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        let _ = stop_tx.send(true);
    };
    // `Server::tcp_nodelay` only configures sockets tonic accepts itself; these are ours.
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &settings.tls {
        builder = builder.tls_config(tls.grpc()).context("configuring TLS")?;
    }
    let serve = builder
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(Some((1 << 24) - 1))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(ps)
        .serve_with_incoming_shutdown(incoming, drain);
    let drain_timeout = settings.drain_timeout;
    let deadline = async move {
        shutdown.await;
        let _ = signalled_tx.send(());
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        r = serve => r.context("gRPC server failed")?,
        _ = deadline => tracing::warn!(?drain_timeout, "in-flight calls did not finish in time; closing their connections"),
    }
    // Both finish once `stop` turned true and their requests in flight are done.
    for t in [metrics_task, data_task].into_iter().flatten() {
        let _ = tokio::time::timeout(drain_timeout, t).await;
    }
    if let Some(c) = checkpointer {
        c.finish(); // checkpoints taken are written before the process exits
    }
    tracing::info!("stopped");
    Ok(())
}

/// Restores the checkpoint `--restore` names, if any: the newest of those it names that is
/// complete and intact (each one passed over is logged with the reason). Returns its step
/// and the job's shard count.
fn restore(store: &VariableStore, settings: &ServerSettings) -> anyhow::Result<Option<(u64, u32)>> {
    let Some(what) = &settings.restore else { return Ok(None) };
    let restored = crate::checkpoint::Checkpoint::first_usable(what, settings.checkpoint_dir.as_deref(), |dir| restore_one(store, settings, dir));
    match (restored, what.as_str()) {
        (Ok(Some(r)), _) => Ok(Some(r)),
        (Ok(None), "latest") => {
            tracing::info!("no checkpoint to restore: starting empty");
            Ok(None)
        }
        (Err(e), "latest") => {
            tracing::warn!("no intact checkpoint to restore (the oldest failed with: {e:#}): starting empty");
            Ok(None)
        }
        (Ok(None), _) => anyhow::bail!("no checkpoint in {what}"),
        (Err(e), _) => Err(e.context(format!("restoring {what}"))),
    }
}

/// Restores checkpoint folder `dir`; returns its step and the job's shard count.
fn restore_one(store: &VariableStore, settings: &ServerSettings, dir: &std::path::Path) -> anyhow::Result<(u64, u32)> {
    let started = std::time::Instant::now();
    let c = crate::checkpoint::Checkpoint::load_deferring(dir, Some(settings.shard_index))?;
    let (step, old_shards) = (c.step, c.num_shards);
    let num_shards = settings.num_shards.unwrap_or(old_shards);
    if settings.shard_index >= num_shards {
        anyhow::bail!(
            "written by {old_shards} shards, and this is shard {}: pass --num-shards to restore it onto more",
            settings.shard_index
        );
    }
    if c.mode != settings.mode.name() {
        tracing::warn!(checkpoint = %dir.display(), "the checkpoint was written in {} mode, this shard runs {}", c.mode, settings.mode.name());
    }
    let n = crate::checkpoint::restore_into(store, Arc::new(c), settings.shard_index, num_shards)?;
    if num_shards == old_shards {
        tracing::info!(checkpoint = %dir.display(), step, variables = n, seconds = started.elapsed().as_secs_f64(), "restored");
    } else {
        tracing::info!(
            checkpoint = %dir.display(),
            step,
            from_shards = old_shards,
            to_shards = num_shards,
            "restoring onto another shard count: variables are cut from the checkpoint as clients register them"
        );
    }
    Ok((step, num_shards))
}

/// Listens for SIGTERM and Ctrl-C (SIGINT) from the moment it is called (inside a tokio
/// runtime; elsewhere than unix, for Ctrl-C from its first poll); the future completes on
/// the first of them.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = interrupt.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// The whole `ps-server` program after flag parsing: resolve settings, bind, announce the
/// address on stdout (one line, for launchers that bind port 0), and serve until a signal.
pub fn main_with(args: crate::config::ServerArgs) -> anyhow::Result<()> {
    let tf = crate::config::TfConfig::from_env()?;
    let settings = args.resolve(tf.as_ref())?;
    let rt = match settings.worker_threads {
        0 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    rt.block_on(async move {
        let listener = TcpListener::bind(&settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        let addr = listener.local_addr()?;
        let metrics_listener = match &settings.metrics_listen {
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("binding metrics on {a}"))?),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let data_listener = match &settings.data_listen {
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("binding the data plane on {a}"))?),
            None => None,
        };
        let data_addr = data_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        // The checkpoint is restored before the address is announced: a launcher (and a
        // client that retries) then finds the shard serving its restored state.
        let prepared = prepare(&settings)?;
        // Signals are handled from here on, before the address is announced: a launcher
        // that stops the server right after reading it gets a clean drain and exit 0.
        let shutdown = shutdown_signal().context("installing the SIGTERM / Ctrl-C handlers")?;
        tracing::info!(
            %addr, ?data_addr, shard = settings.shard_index, mode = settings.mode.name(),
            auth = settings.auth_token.is_some(), tls = settings.tls.is_some(), "listening"
        );
        warn_if_open(&settings, [Some(addr), metrics_addr, data_addr].into_iter().flatten());
        // The launcher (demo, tests) reads this line to learn an ephemeral port.
        match metrics_addr {
            Some(m) => println!("ps-server listening on {addr} metrics {m}"),
            None => println!("ps-server listening on {addr}"),
        }
        run_prepared(prepared, listener, metrics_listener, data_listener, settings, shutdown).await
    })
}

/// A shard that others can reach and that asks for no token lets anyone on the network
/// read the model and change it: say so at start.
fn warn_if_open(settings: &ServerSettings, bound: impl IntoIterator<Item = std::net::SocketAddr>) {
    let exposed: Vec<String> = bound.into_iter().filter(|a| !a.ip().is_loopback()).map(|a| a.to_string()).collect();
    if exposed.is_empty() {
        return;
    }
    if settings.auth_token.is_none() {
        tracing::warn!(
            addresses = %exposed.join(", "),
            "listening beyond loopback without authentication: anyone who reaches these ports can read and change \
             the variables; set PARASYNC_AUTH_TOKEN or --auth-token-file"
        );
    }
    if settings.tls.is_none() {
        tracing::warn!(
            addresses = %exposed.join(", "),
            "listening beyond loopback without TLS: the variables (and the auth token) cross the network in clear; \
             set --tls-cert and --tls-key"
        );
    }
}

/// Sets up `tracing` output on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

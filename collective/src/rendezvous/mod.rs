//! How ranks meet: rank 0 hosts a small gRPC service at `MASTER_ADDR:MASTER_PORT`, every
//! other rank joins it with the job token and its data-plane address, and everyone learns
//! every rank's address (plus an opaque blob from rank 0, such as the NCCL unique id).
//! Then the ranks connect the TCP data plane among themselves; gRPC is for control only.

pub mod service;

use crate::comm::{CommConfig, Communicator};
use crate::error::{Error, Result};
use crate::transport::tcp::{bind_listener, TcpOptions, TcpTransport};
use parasync_proto::collective::rendezvous_client::RendezvousClient;
use parasync_proto::collective::rendezvous_server::RendezvousServer;
use parasync_proto::auth::{AuthToken, PresentToken, RequireToken};
use parasync_proto::tls::{ClientTls, ServerTls};
use std::path::Path;
use parasync_proto::collective::JoinRequest;
use service::{RendezvousService, Shared, Table};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Who this process is in the job and where to meet.
#[derive(Clone, Debug)]
pub struct JoinSpec {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// `host:port` of rank 0's rendezvous service.
    pub master: String,
    /// Identifies the job: processes of another job are refused (not a secret: by default
    /// the launcher's job id).
    pub token: String,
    /// The secret every rank must present (to the rendezvous and to each other's data
    /// plane); `None`: no authentication.
    pub auth_token: Option<AuthToken>,
    /// TLS for the rendezvous and between ranks; `None`: plain TCP. Experimental, and several
    /// times slower than plain TCP (user-space TLS on a thread per link).
    pub tls: Option<JobTls>,
    /// How long to wait for every rank to show up.
    pub timeout: Duration,
}

/// TLS between the ranks of a job, and to rank 0's rendezvous: every rank presents its
/// certificate and checks the others' against the job's authority (mutual TLS). A rank's
/// certificate must name the address the others dial it at, or `domain` (which every
/// certificate then names).
#[derive(Clone, Debug)]
pub struct JobTls {
    /// This rank as a server (accepting higher ranks, hosting the rendezvous).
    pub server: ServerTls,
    /// This rank as a client (dialling lower ranks, joining the rendezvous).
    pub client: ClientTls,
}

impl JobTls {
    /// From PEM files: this rank's certificate and key, and the authority.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path, domain: Option<String>) -> std::result::Result<JobTls, String> {
        Ok(JobTls {
            server: ServerTls::from_files(cert, key, Some(ca))?,
            client: ClientTls::from_files(ca, Some(cert), Some(key), domain)?,
        })
    }

    /// From `PARASYNC_TLS_CERT`, `PARASYNC_TLS_KEY` and `PARASYNC_TLS_CA` (and
    /// `PARASYNC_TLS_DOMAIN`) when `PARASYNC_COLLECTIVE_TLS=1` asks for it: collectives over
    /// TLS are experimental and several times slower (see the README), so the variables that
    /// configure a parameter-server client's TLS do not turn them on.
    pub fn from_env() -> std::result::Result<Option<JobTls>, String> {
        if std::env::var("PARASYNC_COLLECTIVE_TLS").map_or(true, |v| v != "1") {
            return Ok(None);
        }
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
        match (var("PARASYNC_TLS_CERT"), var("PARASYNC_TLS_KEY"), var("PARASYNC_TLS_CA")) {
            (Some(cert), Some(key), Some(ca)) => {
                let domain = std::env::var("PARASYNC_TLS_DOMAIN").ok().filter(|d| !d.is_empty());
                JobTls::from_files(&cert, &key, &ca, domain).map(Some).map_err(|e| format!("PARASYNC_TLS_*: {e}"))
            }
            _ => Err("PARASYNC_COLLECTIVE_TLS=1 needs PARASYNC_TLS_CERT, PARASYNC_TLS_KEY and PARASYNC_TLS_CA".into()),
        }
    }
}

/// What the rendezvous tells every rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meeting {
    /// Data-plane address of every rank, by rank.
    pub addrs: Vec<SocketAddr>,
    /// The blob rank 0 published (empty if none).
    pub blob: Vec<u8>,
}

/// Rank 0's bound rendezvous listener, made before the other ranks start (so that a port of
/// 0 can be resolved and announced to them).
pub struct RendezvousHost {
    listener: std::net::TcpListener,
}

impl RendezvousHost {
    /// Binds `addr` (`host:port`; port 0 picks a free one).
    pub fn bind(addr: &str) -> Result<RendezvousHost> {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            Error::Rendezvous(format!("rank 0 cannot host the rendezvous at {addr}: {e}"))
        })?;
        Ok(RendezvousHost { listener })
    }

    /// The address ranks must join.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn parse_addrs(addrs: &[String]) -> Result<Vec<SocketAddr>> {
    addrs
        .iter()
        .map(|a| {
            a.parse()
                .map_err(|_| Error::Rendezvous(format!("rendezvous returned a bad address {a:?}")))
        })
        .collect()
}

/// Hosts the rendezvous as rank 0 until every rank has joined and been answered.
pub fn host(
    host: RendezvousHost,
    spec: &JoinSpec,
    my_data_addr: SocketAddr,
    blob: Vec<u8>,
) -> Result<Meeting> {
    let rt = runtime()?;
    rt.block_on(async move {
        let deadline = tokio::time::Instant::now() + spec.timeout;
        let mut table = Table::new(spec.token.clone(), spec.world_size);
        table.set_blob(blob.clone());
        table
            .join(&spec.token, 0, spec.world_size, my_data_addr.to_string())
            .map_err(|r| Error::Rendezvous(format!("rank 0 cannot register itself: {r:?}")))?;
        let shared = Arc::new(Shared {
            table: Mutex::new(table),
            joined: watch::channel(1).0,
            answered: watch::channel(0).0,
            deadline,
        });
        host.listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(host.listener)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let svc = RendezvousServer::with_interceptor(
            RendezvousService {
                shared: shared.clone(),
            },
            RequireToken(spec.auth_token.clone()),
        );
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &spec.tls {
            builder = builder
                .tls_config(tls.server.grpc())
                .map_err(|e| Error::Rendezvous(format!("TLS settings of the rendezvous: {e}")))?;
        }
        let server = tokio::spawn(
            builder
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stop_rx.await;
                    },
                ),
        );
        let n = spec.world_size;
        let mut joined = shared.joined.subscribe();
        let all = tokio::time::timeout_at(deadline, joined.wait_for(|&c| c == n))
            .await
            .is_ok();
        // Let every waiting rank get its answer (success or the list of missing ranks).
        let mut answered = shared.answered.subscribe();
        let waiting = *shared.joined.borrow() - 1;
        let _ = tokio::time::timeout(Duration::from_secs(5), answered.wait_for(|&c| c >= waiting))
            .await;
        let _ = stop_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        let table = shared.table.lock().expect("table lock");
        match (all, table.complete()) {
            (true, Some(addrs)) => Ok(Meeting {
                addrs: parse_addrs(&addrs)?,
                blob,
            }),
            _ => Err(Error::Rendezvous(format!(
                "ranks {:?} did not join within {:?}",
                table.missing(),
                spec.timeout
            ))),
        }
    })
}

/// Joins rank 0's rendezvous as a rank other than 0; retries until the host is up.
pub fn join(spec: &JoinSpec, my_data_addr: SocketAddr) -> Result<Meeting> {
    let rt = runtime()?;
    rt.block_on(async move {
        let until = Instant::now() + spec.timeout;
        let scheme = if spec.tls.is_some() { "https" } else { "http" };
        let uri = format!("{scheme}://{}", spec.master);
        let mut endpoint = tonic::transport::Endpoint::from_shared(uri.clone())
            .map_err(|e| Error::Rendezvous(format!("bad master address {:?}: {e}", spec.master)))?
            .connect_timeout(Duration::from_secs(2));
        if let Some(tls) = &spec.tls {
            let host = spec.master.rsplit_once(':').map_or(spec.master.as_str(), |(h, _)| h);
            endpoint = endpoint
                .tls_config(tls.client.grpc(host))
                .map_err(|e| Error::Rendezvous(format!("TLS settings for the rendezvous: {e}")))?;
        }
        let mut last = String::from("not tried");
        while Instant::now() < until {
            let mut client = match endpoint.connect().await {
                Ok(ch) => RendezvousClient::with_interceptor(ch, PresentToken(spec.auth_token.clone())),
                Err(e) => {
                    last = format!("cannot reach {}: {e}", spec.master);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let mut req = tonic::Request::new(JoinRequest {
                job_token: spec.token.clone(),
                rank: spec.rank as u32,
                world_size: spec.world_size as u32,
                data_addr: my_data_addr.to_string(),
            });
            // The host answers by its own deadline; allow a little beyond it.
            req.set_timeout(
                until.saturating_duration_since(Instant::now()) + Duration::from_secs(2),
            );
            match client.join(req).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let mut addrs = parse_addrs(&resp.data_addrs)?;
                    if addrs.len() != spec.world_size {
                        return Err(Error::Rendezvous(format!(
                            "the rendezvous at {} answered {} data addresses for a world of {}",
                            spec.master,
                            addrs.len(),
                            spec.world_size
                        )));
                    }
                    reach_host_at_master(&mut addrs[0], &spec.master);
                    return Ok(Meeting {
                        addrs,
                        blob: resp.shared_blob.to_vec(),
                    });
                }
                Err(s) if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) => {
                    return Err(Error::TokenRefused(format!(
                        "the rendezvous at {} says: {}",
                        spec.master,
                        s.message()
                    )))
                }
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    last = format!("{}: {}", spec.master, s.message());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => {
                    return Err(Error::Rendezvous(format!(
                        "rank {} refused by {}: {}",
                        spec.rank,
                        spec.master,
                        s.message()
                    )))
                }
            }
        }
        Err(Error::Rendezvous(format!(
            "rank {} gave up after {:?}: {last}",
            spec.rank, spec.timeout
        )))
    })
}

/// Everything needed to form a TCP communicator.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Rank, world size, master address, token, rendezvous timeout.
    pub spec: JoinSpec,
    /// Collective tuning (identical on every rank).
    pub comm: CommConfig,
    /// Data-plane options.
    pub tcp: TcpOptions,
    /// IP to bind the data plane on; by default loopback when the master is loopback,
    /// otherwise all interfaces (announced as the address the host sees the rank from).
    pub data_host: Option<IpAddr>,
}

impl ConnectOptions {
    /// Options for the job the launcher's environment describes (see [`crate::env`]), with
    /// default tuning and `timeout` for the rendezvous and for every operation.
    pub fn from_env(timeout: Duration) -> Result<ConnectOptions> {
        let l = crate::env::from_env()?;
        Ok(ConnectOptions {
            spec: JoinSpec {
                rank: l.rank,
                world_size: l.world_size,
                master: l.master,
                token: l.token,
                auth_token: AuthToken::from_env().map_err(Error::Env)?,
                tls: JobTls::from_env().map_err(Error::Env)?,
                timeout,
            },
            comm: CommConfig {
                timeout,
                ..CommConfig::default()
            },
            tcp: TcpOptions::default(),
            data_host: None,
        })
    }
}

/// Rank 0 announces the data address it bound, which may be a wildcard (0.0.0.0) or, where
/// its own `MASTER_ADDR` says `localhost` (as Kubeflow sets it in the master pod), loopback.
/// A rank that reached the rendezvous at a routable address dials rank 0's data plane at
/// that same address instead.
fn reach_host_at_master(host_data: &mut SocketAddr, master: &str) {
    let ip = host_data.ip();
    if !(ip.is_unspecified() || ip.is_loopback()) {
        return;
    }
    let Some(master_ip) = master.to_socket_addrs().ok().and_then(|mut a| a.next()).map(|a| a.ip()) else {
        return;
    };
    if ip.is_unspecified() || !master_ip.is_loopback() {
        host_data.set_ip(master_ip);
    }
}

/// Where rank 0 hosts the rendezvous when it binds it itself: the master's port on every
/// interface (as torchrun's store does), since `MASTER_ADDR` names where the others reach
/// rank 0, which rank 0's own view may call `localhost`. Only a loopback IP written as
/// such (`127.0.0.1:port`, a single-host job) is bound as it is.
fn rendezvous_bind_addr(master: &str) -> String {
    let Some((host, port)) = master.rsplit_once(':') else {
        return master.to_string();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => master.to_string(),
        Ok(IpAddr::V6(_)) => format!("[::]:{port}"),
        _ => format!("0.0.0.0:{port}"),
    }
}

fn data_host(opts: &ConnectOptions) -> IpAddr {
    if let Some(ip) = opts.data_host {
        return ip;
    }
    let master = &opts.spec.master;
    let master_is_loopback = master.to_socket_addrs().map(|mut a| a.all(|a| a.ip().is_loopback())).unwrap_or(false);
    // Rank 0 keeps to loopback only where it also hosts the rendezvous there.
    let hosts_wide = opts.spec.rank == 0 && rendezvous_bind_addr(master) != *master;
    if master_is_loopback && !hosts_wide {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

/// Meets the other ranks and connects the data plane. Rank 0 binds the master address
/// itself; use [`connect_hosting`] to bind it beforehand (port 0).
pub fn connect(opts: &ConnectOptions) -> Result<Communicator> {
    connect_with_blob(opts, None, Vec::new()).map(|(c, _)| c)
}

/// Like [`connect`] for rank 0 with an already bound rendezvous listener.
pub fn connect_hosting(opts: &ConnectOptions, host: RendezvousHost) -> Result<Communicator> {
    connect_with_blob(opts, Some(host), Vec::new()).map(|(c, _)| c)
}

/// Forms a communicator; rank 0 also publishes `blob`, which every rank gets back.
pub fn connect_with_blob(
    opts: &ConnectOptions,
    host_listener: Option<RendezvousHost>,
    blob: Vec<u8>,
) -> Result<(Communicator, Vec<u8>)> {
    let spec = &opts.spec;
    if spec.world_size == 0 || spec.rank >= spec.world_size {
        return Err(Error::InvalidArgument(format!(
            "rank {} of world size {}",
            spec.rank, spec.world_size
        )));
    }
    let started = Instant::now();
    let listener = bind_listener(data_host(opts))?;
    let mut my_addr = listener.local_addr()?;
    let meeting = if spec.rank == 0 {
        let h = match host_listener {
            Some(h) => h,
            None => RendezvousHost::bind(&rendezvous_bind_addr(&spec.master))?,
        };
        if my_addr.ip().is_unspecified() {
            my_addr.set_ip(h.local_addr()?.ip());
        }
        host(h, spec, my_addr, blob)?
    } else {
        join(spec, my_addr)?
    };
    let deadline = started + spec.timeout + Duration::from_secs(5);
    let transport = TcpTransport::connect_mesh(
        spec.rank,
        &meeting.addrs,
        listener,
        &spec.token,
        spec.auth_token.as_ref(),
        spec.tls.as_ref(),
        deadline,
        opts.tcp,
    )?;
    Ok((
        Communicator::new(Box::new(transport), opts.comm.clone()),
        meeting.blob,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_0_hosts_on_every_interface_unless_given_a_loopback_ip() {
        assert_eq!(rendezvous_bind_addr("127.0.0.1:29500"), "127.0.0.1:29500");
        assert_eq!(rendezvous_bind_addr("[::1]:29500"), "[::1]:29500");
        assert_eq!(rendezvous_bind_addr("localhost:29500"), "0.0.0.0:29500");
        assert_eq!(rendezvous_bind_addr("job-master-0:29500"), "0.0.0.0:29500");
        assert_eq!(rendezvous_bind_addr("10.1.2.3:29500"), "0.0.0.0:29500");
        assert_eq!(rendezvous_bind_addr("[fd00::5]:29500"), "[::]:29500");
    }

    #[test]
    fn joiners_dial_rank_0_where_they_reached_the_rendezvous() {
        let fix = |announced: &str, master: &str| {
            let mut a: SocketAddr = announced.parse().unwrap();
            reach_host_at_master(&mut a, master);
            a.to_string()
        };
        // a wildcard, or loopback seen from a routable master address: the master's IP
        assert_eq!(fix("0.0.0.0:4000", "10.1.2.3:29500"), "10.1.2.3:4000");
        assert_eq!(fix("127.0.0.1:4000", "10.1.2.3:29500"), "10.1.2.3:4000");
        assert_eq!(fix("0.0.0.0:4000", "127.0.0.1:29500"), "127.0.0.1:4000");
        // loopback on a single host, or a routable address: kept
        assert_eq!(fix("127.0.0.1:4000", "127.0.0.1:29500"), "127.0.0.1:4000");
        assert_eq!(fix("10.9.9.9:4000", "10.1.2.3:29500"), "10.9.9.9:4000");
    }
}

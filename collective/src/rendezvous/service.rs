//! The gRPC rendezvous service hosted by rank 0: a thin adapter over [`Table`].

use parasync_proto::collective::rendezvous_server::Rendezvous;
use parasync_proto::collective::{JoinRequest, JoinResponse};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Who has joined: the pure bookkeeping of a rendezvous (no I/O).
#[derive(Debug)]
pub struct Table {
    /// Secret every joining rank must present.
    token: String,
    /// `addrs[r]`: data-plane address of rank `r` once it joined.
    addrs: Vec<Option<String>>,
    /// Bytes rank 0 publishes to everyone (NCCL unique id).
    blob: Vec<u8>,
}

/// Why a join was refused, mapped one-to-one onto gRPC codes.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong job token.
    Token,
    /// World size or rank does not fit this job.
    Invalid(String),
    /// The rank has already joined.
    Taken(usize),
}

impl Table {
    /// An empty table for a job of `world` ranks.
    pub fn new(token: String, world: usize) -> Table {
        Table {
            token,
            addrs: vec![None; world],
            blob: Vec::new(),
        }
    }

    /// Records rank `rank` at `addr`.
    pub fn join(
        &mut self,
        token: &str,
        rank: usize,
        world: usize,
        addr: String,
    ) -> Result<(), Refusal> {
        if token != self.token {
            return Err(Refusal::Token);
        }
        if world != self.addrs.len() {
            return Err(Refusal::Invalid(format!(
                "world size {world} differs from the job's {}",
                self.addrs.len()
            )));
        }
        if rank >= world {
            return Err(Refusal::Invalid(format!(
                "rank {rank} is not below the world size {world}"
            )));
        }
        if self.addrs[rank].is_some() {
            return Err(Refusal::Taken(rank));
        }
        self.addrs[rank] = Some(addr);
        Ok(())
    }

    /// Gives back the slot of `rank` (its join call was abandoned: the process died or
    /// gave up), unless every rank has joined by now (then the meeting stands).
    /// Returns whether the slot was freed.
    pub fn leave(&mut self, rank: usize) -> bool {
        if self.complete().is_some() || rank >= self.addrs.len() {
            return false;
        }
        self.addrs[rank].take().is_some()
    }

    /// Ranks that have not joined yet.
    pub fn missing(&self) -> Vec<usize> {
        self.addrs
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_none())
            .map(|(r, _)| r)
            .collect()
    }

    /// Every address, once all ranks joined.
    pub fn complete(&self) -> Option<Vec<String>> {
        self.addrs.iter().cloned().collect()
    }

    /// Sets the blob rank 0 publishes.
    pub fn set_blob(&mut self, blob: Vec<u8>) {
        self.blob = blob;
    }
}

/// State shared between the service and the hosting rank.
pub(crate) struct Shared {
    pub table: Mutex<Table>,
    /// Bumped whenever a rank joins.
    pub joined: watch::Sender<usize>,
    /// Bumped whenever a non-host rank has been answered.
    pub answered: watch::Sender<usize>,
    /// When waiting for missing ranks ends.
    pub deadline: tokio::time::Instant,
}

/// The tonic service.
pub(crate) struct RendezvousService {
    pub shared: Arc<Shared>,
}

/// Replaces an unspecified host (0.0.0.0 / [::]) by the address the call came from.
pub fn resolve_addr(announced: &str, seen_from: Option<SocketAddr>) -> Result<String, Status> {
    let addr: SocketAddr = announced.parse().map_err(|_| {
        Status::invalid_argument(format!("data address {announced:?} is not ip:port"))
    })?;
    match (addr.ip().is_unspecified(), seen_from) {
        (true, Some(from)) => Ok(SocketAddr::new(from.ip(), addr.port()).to_string()),
        _ => Ok(addr.to_string()),
    }
}

#[tonic::async_trait]
impl Rendezvous for RendezvousService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let from = request.remote_addr();
        let req = request.into_inner();
        let addr = resolve_addr(&req.data_addr, from)?;
        let (rank, world) = (req.rank as usize, req.world_size as usize);
        {
            let mut table = self.shared.table.lock().expect("table lock");
            table
                .join(&req.job_token, rank, world, addr)
                .map_err(|r| match r {
                    Refusal::Token => {
                        Status::permission_denied("job token does not match this job's; refused")
                    }
                    Refusal::Invalid(m) => Status::invalid_argument(m),
                    Refusal::Taken(r) => {
                        Status::already_exists(format!("rank {r} has already joined"))
                    }
                })?;
        }
        self.shared.joined.send_modify(|c| *c += 1);
        // If this call is dropped before the meeting completes (the rank's process died, or
        // its call timed out), its slot is freed, so that the rank can join again when it
        // restarts instead of being refused and blamed for the whole meeting.
        let mut slot = Slot { shared: &self.shared, rank, answered: false };
        let mut rx = self.shared.joined.subscribe();
        let all = tokio::time::timeout_at(self.shared.deadline, rx.wait_for(|&c| c == world)).await;
        let table = self.shared.table.lock().expect("table lock");
        let reply = match (all, table.complete()) {
            (Ok(Ok(_)), Some(addrs)) => Ok(Response::new(JoinResponse {
                data_addrs: addrs,
                shared_blob: table.blob.clone().into(),
            })),
            _ => Err(Status::deadline_exceeded(format!(
                "ranks {:?} did not join in time",
                table.missing()
            ))),
        };
        drop(table);
        slot.answered = true;
        self.shared.answered.send_modify(|c| *c += 1);
        reply
    }
}

/// A joined rank whose call has not been answered yet.
struct Slot<'a> {
    shared: &'a Shared,
    rank: usize,
    answered: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let freed = self.shared.table.lock().map(|mut t| t.leave(self.rank)).unwrap_or(false);
        if freed {
            self.shared.joined.send_modify(|c| *c -= 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn shared(world: usize, wait: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            table: Mutex::new(Table::new("secret".into(), world)),
            joined: watch::channel(0).0,
            answered: watch::channel(0).0,
            deadline: tokio::time::Instant::now() + wait,
        })
    }

    fn req(token: &str, rank: u32, world: u32) -> Request<JoinRequest> {
        Request::new(JoinRequest {
            job_token: token.into(),
            rank,
            world_size: world,
            data_addr: "127.0.0.1:9".into(),
        })
    }

    #[test]
    fn table_refusals() {
        let mut t = Table::new("tok".into(), 2);
        assert_eq!(t.join("bad", 0, 2, "a".into()), Err(Refusal::Token));
        assert!(matches!(
            t.join("tok", 0, 3, "a".into()),
            Err(Refusal::Invalid(_))
        ));
        assert!(matches!(
            t.join("tok", 2, 2, "a".into()),
            Err(Refusal::Invalid(_))
        ));
        assert_eq!(t.join("tok", 1, 2, "a".into()), Ok(()));
        assert_eq!(t.join("tok", 1, 2, "b".into()), Err(Refusal::Taken(1)));
        assert_eq!(t.missing(), vec![0]);
        assert_eq!(t.complete(), None);
        t.join("tok", 0, 2, "z".into()).unwrap();
        assert_eq!(t.complete(), Some(vec!["z".to_string(), "a".to_string()]));
    }

    #[test]
    fn unspecified_hosts_take_the_callers_address() {
        let from: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        assert_eq!(
            resolve_addr("0.0.0.0:7000", Some(from)).unwrap(),
            "10.1.2.3:7000"
        );
        assert_eq!(
            resolve_addr("127.0.0.1:7000", Some(from)).unwrap(),
            "127.0.0.1:7000"
        );
        assert_eq!(
            resolve_addr("nonsense", None).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn wrong_token_is_permission_denied() {
        let svc = RendezvousService {
            shared: shared(2, Duration::from_secs(1)),
        };
        let err = svc.join(req("intruder", 1, 2)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            svc.shared.table.lock().unwrap().missing(),
            vec![0, 1],
            "the intruder took no slot"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn missing_ranks_are_named_when_the_deadline_passes() {
        let svc = RendezvousService {
            shared: shared(3, Duration::from_secs(30)),
        };
        let err = svc.join(req("secret", 1, 3)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(err.message().contains("[0, 2]"), "{}", err.message());
    }

    #[tokio::test]
    async fn a_rank_whose_join_is_abandoned_can_join_again() {
        let svc = Arc::new(RendezvousService {
            shared: shared(3, Duration::from_secs(10)),
        });
        // rank 1 joins, then its process dies while rank 2 is still late
        let first = tokio::spawn({
            let svc = Arc::clone(&svc);
            async move { svc.join(req("secret", 1, 3)).await }
        });
        while svc.shared.table.lock().unwrap().missing() != vec![0, 2] {
            tokio::task::yield_now().await;
        }
        first.abort();
        let _ = first.await;
        assert_eq!(svc.shared.table.lock().unwrap().missing(), vec![0, 1, 2], "the slot is free again");
        // the restarted rank 1 joins from its new address, and the meeting completes with it
        let again = tokio::spawn({
            let svc = Arc::clone(&svc);
            async move {
                let mut r = req("secret", 1, 3);
                r.get_mut().data_addr = "127.0.0.1:11".into();
                svc.join(r).await
            }
        });
        let late = tokio::spawn({
            let svc = Arc::clone(&svc);
            async move { svc.join(req("secret", 2, 3)).await }
        });
        while svc.shared.table.lock().unwrap().missing() != vec![0] {
            tokio::task::yield_now().await;
        }
        svc.shared.table.lock().unwrap().join("secret", 0, 3, "127.0.0.1:1".into()).unwrap();
        svc.shared.joined.send_modify(|c| *c += 1);
        let addrs = again.await.unwrap().unwrap().into_inner().data_addrs;
        assert_eq!(addrs, vec!["127.0.0.1:1", "127.0.0.1:11", "127.0.0.1:9"]);
        late.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn every_rank_gets_every_address_and_the_blob() {
        let sh = shared(2, Duration::from_secs(5));
        {
            let mut t = sh.table.lock().unwrap();
            t.join("secret", 0, 2, "127.0.0.1:1".into()).unwrap();
            t.set_blob(vec![7, 7]);
        }
        sh.joined.send_modify(|c| *c += 1);
        let svc = RendezvousService { shared: sh };
        let resp = svc.join(req("secret", 1, 2)).await.unwrap().into_inner();
        assert_eq!(resp.data_addrs, vec!["127.0.0.1:1", "127.0.0.1:9"]);
        assert_eq!(&resp.shared_blob[..], &[7, 7]);
    }
}

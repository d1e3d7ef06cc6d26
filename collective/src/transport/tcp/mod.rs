//! The TCP data plane: one connection per pair of ranks (or several, see
//! [`TcpOptions::streams`]), nonblocking sockets progressed by `poll(2)` (or busy-polled in
//! spin mode), no allocation per exchange once warm.
//!
//! Connections are set up after the rendezvous: rank `r` connects to every lower rank and
//! accepts every higher one; the connecting side opens with a hello that carries the job
//! token (and the auth token, when the job has one), so processes of another job (or stray
//! port scanners) are refused. The accepting side answers with one byte: [`ACK_OK`],
//! [`ACK_REFUSED`] or [`ACK_AUTH`] (wrong or missing auth token).

mod multi;
mod peer;
mod progress;
mod sys;
mod tunnel;
mod waiting;

use crate::error::{Error, Result};
use crate::frame::{OpDesc, HEADER_LEN};
use parasync_proto::auth::AuthToken;
use tunnel::LinkStream;

pub use crate::rendezvous::JobTls;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use sys::{recv_some, would_block};

const HELLO_MAGIC: [u8; 4] = *b"PSC2";
/// A hello's answers: accepted; refused (not this job, or a rank that does not fit); the
/// auth token is wrong or missing.
const ACK_OK: u8 = 1;
const ACK_REFUSED: u8 = 0;
const ACK_AUTH: u8 = 2;
/// Longest job token accepted in a hello.
const MAX_TOKEN: usize = 1024;
/// How long a wait busy-polls in spin mode before it sleeps in `poll(2)`.
const SPIN_BUDGET: Duration = Duration::from_micros(500);

/// Most connections per pair of ranks.
pub const MAX_STREAMS: usize = 8;

/// Options of the TCP transport (every rank must use the same).
#[derive(Clone, Copy, Debug)]
pub struct TcpOptions {
    /// Busy-poll instead of sleeping in `poll(2)`: lowest latency, one core per rank.
    pub spin: bool,
    /// Connections per pair of ranks (0 or 1: one; at most [`MAX_STREAMS`]). Large transfers
    /// spread their frames over all of them, which helps where one TCP stream cannot fill
    /// the link (one core's copy rate); on one host with few cores it does not.
    pub streams: usize,
    /// Ranks on the same host read large payloads straight out of each other's memory
    /// (`process_vm_readv(2)`: one copy per byte instead of a copy into and one out of the
    /// kernel's socket buffers); the socket then carries only headers. Used for a pair of
    /// ranks only where a probe at connection time shows that each can read the other
    /// (same host and PID namespace, ptrace permission), and only with one stream per pair.
    pub peer_copy: bool,
}

impl Default for TcpOptions {
    fn default() -> TcpOptions {
        TcpOptions {
            spin: false,
            streams: 1,
            peer_copy: true,
        }
    }
}

impl TcpOptions {
    /// Connections per pair actually used.
    pub fn stream_count(&self) -> usize {
        self.streams.clamp(1, MAX_STREAMS)
    }
}

/// A connected peer.
struct Link {
    stream: LinkStream,
    fd: i32,
    /// Bytes of the frame being sent that are not written yet (an abort must first finish it).
    send_owed: usize,
    /// The peer's process id where this rank may read its memory (see
    /// [`TcpOptions::peer_copy`]).
    peer_pid: Option<i32>,
}

/// Progress of one send or receive within an exchange.
#[derive(Clone, Copy, Default)]
struct Progress {
    /// Header bytes done.
    hdr: usize,
    /// Payload bytes done.
    body: usize,
    done: bool,
}

/// A rank's connections to every other rank of one communicator.
pub struct TcpTransport {
    rank: usize,
    links: Vec<Option<Link>>,
    /// `extra[p]`: connections 1.. to rank `p` (empty with one stream per pair).
    extra: Vec<Vec<Link>>,
    opts: TcpOptions,
    aborted: bool,
    /// Start of the current stretch without progress (spin mode's budget).
    idle_since: Option<Instant>,
    // Reused per exchange.
    send_hdr: Vec<[u8; HEADER_LEN]>,
    send_prog: Vec<Progress>,
    recv_hdr: Vec<[u8; HEADER_LEN]>,
    recv_prog: Vec<Progress>,
    pollfds: Vec<libc::pollfd>,
    /// Per peer: watched for abort frames during this exchange.
    watch: Vec<bool>,
    /// The rank this one is waiting on right now (answer to a peer's wait query).
    waiting_on: Option<usize>,
    /// Operation the wait chase below is about.
    chase_seq: Option<u64>,
    /// Per peer: its answer in `chase_seq` — `Some(waits_on)` once it replied.
    replies: Vec<Option<Option<usize>>>,
    /// Per peer: already asked whom it waits on in `chase_seq`.
    asked: Vec<bool>,
    /// Per peer: the operation of its last [`FrameKind::Copied`](crate::frame::FrameKind)
    /// not yet acted on.
    copied: Vec<Option<u64>>,
    /// Per peer: the operation of its last `Confirmed` frame not yet acted on.
    confirmed: Vec<Option<u64>>,
    /// Payload bytes read from peers' memory so far.
    peer_copied: u64,
}

/// A hello: magic, rank, world size, connection index, the lengths of the job token and
/// of the auth token (u32 little-endian each), then the two tokens.
fn hello_bytes(token: &str, auth: Option<&AuthToken>, rank: usize, n: usize, stream: usize) -> Vec<u8> {
    let t = token.as_bytes();
    let a = auth.map_or(&b""[..], |a| a.expose().as_bytes());
    let mut b = Vec::with_capacity(24 + t.len() + a.len());
    b.extend_from_slice(&HELLO_MAGIC);
    for word in [rank, n, stream, t.len(), a.len()] {
        b.extend_from_slice(&(word as u32).to_le_bytes());
    }
    b.extend_from_slice(t);
    b.extend_from_slice(a);
    b
}

/// Why a hello was refused, and the answer it gets.
type Refusal = (u8, String);

/// Reads and checks a hello: returns the peer's rank and connection index, or why it is
/// refused.
fn read_hello(
    s: &mut impl Read,
    token: &str,
    auth: Option<&AuthToken>,
    me: usize,
    n: usize,
) -> std::result::Result<(usize, usize), Refusal> {
    let refused = |why: String| (ACK_REFUSED, why);
    let mut fixed = [0u8; 24];
    s.read_exact(&mut fixed)
        .map_err(|e| refused(format!("no hello: {e}")))?;
    if fixed[..4] != HELLO_MAGIC {
        return Err(refused("not a parasync collective peer (or one of another version)".into()));
    }
    let word = |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().expect("4 bytes")) as usize;
    let (rank, world, stream, tlen, alen) = (word(4), word(8), word(12), word(16), word(20));
    if tlen > MAX_TOKEN || alen > parasync_proto::auth::MAX_TOKEN_BYTES {
        return Err(refused("token too long".into()));
    }
    let mut t = vec![0u8; tlen + alen];
    s.read_exact(&mut t)
        .map_err(|e| refused(format!("truncated hello: {e}")))?;
    let (t, a) = t.split_at(tlen);
    if let Some(auth) = auth {
        if !auth.matches(a) {
            let how = if a.is_empty() { "no auth token" } else { "a wrong auth token" };
            return Err((ACK_AUTH, format!("{how} from a process claiming rank {rank}")));
        }
    }
    if !parasync_proto::auth::constant_time_eq(token.as_bytes(), t) {
        return Err(refused(format!(
            "wrong job token from a process claiming rank {rank}"
        )));
    }
    if world != n || rank >= n || rank <= me {
        return Err(refused(format!(
            "hello from rank {rank} of {world} does not fit rank {me} of {n}"
        )));
    }
    Ok((rank, stream))
}

fn configure(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
}

impl TcpTransport {
    /// Connects rank `rank` to every other rank: `addrs[p]` is rank `p`'s data-plane address
    /// and `listener` this rank's own (already bound and announced) listener. Fails if a
    /// peer is not connected by `deadline`, naming the missing ranks.
    pub fn connect_mesh(
        rank: usize,
        addrs: &[SocketAddr],
        listener: TcpListener,
        token: &str,
        auth: Option<&AuthToken>,
        tls: Option<&JobTls>,
        deadline: Instant,
        opts: TcpOptions,
    ) -> Result<TcpTransport> {
        let n = addrs.len();
        let k = opts.stream_count();
        let mut links: Vec<Option<Link>> = (0..n).map(|_| None).collect();
        let mut extra: Vec<Vec<Link>> = (0..n).map(|_| Vec::new()).collect();
        for (p, c) in (0..rank).flat_map(|p| (0..k).map(move |c| (p, c))) {
            let addr = &addrs[p];
            let hello = hello_bytes(token, auth, rank, n, c);
            let s = loop {
                match TcpStream::connect_timeout(addr, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(Error::Rendezvous(format!(
                            "rank {rank} could not connect to rank {p} at {addr}: {e}"
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            configure(&s)?;
            let mut s = match tls {
                Some(t) => tunnel::connect(s, &t.client, &addr.ip().to_string()).map_err(|e| {
                    Error::Rendezvous(format!("rank {rank} could not open TLS to rank {p} at {addr}: {e}"))
                })?,
                None => LinkStream::Tcp(s),
            };
            s.write_all(&hello)?;
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).map_err(|e| {
                Error::Rendezvous(format!("rank {p} at {addr} refused rank {rank}: {e}"))
            })?;
            match ack[0] {
                ACK_OK => {}
                ACK_AUTH => {
                    return Err(Error::TokenRefused(format!(
                        "rank {p} at {addr} refused the connection: the auth token is wrong or missing \
                         (every rank needs the same PARASYNC_AUTH_TOKEN)"
                    )))
                }
                _ => {
                    return Err(Error::TokenRefused(format!(
                        "rank {p} at {addr} refused the connection"
                    )))
                }
            }
            let link = Link {
                fd: s.fd(),
                stream: s,
                send_owed: 0,
                peer_pid: None,
            };
            if c == 0 {
                links[p] = Some(link);
            } else {
                extra[p].push(link);
            }
        }
        listener.set_nonblocking(true)?;
        while (rank + 1..n).any(|p| links[p].is_none() || extra[p].len() + 1 < k) {
            match listener.accept() {
                Ok((s, from)) => {
                    s.set_nonblocking(false)?;
                    configure(&s)?;
                    let mut s = match tls {
                        Some(t) => match tunnel::accept(s, &t.server) {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::warn!("rank {rank}: refused data connection from {from}: {e}");
                                continue;
                            }
                        },
                        None => LinkStream::Tcp(s),
                    };
                    match read_hello(&mut s, token, auth, rank, n) {
                        Ok((p, c)) if c == 0 && links[p].is_none() => {
                            s.write_all(&[ACK_OK])?;
                            links[p] = Some(Link {
                                fd: s.fd(),
                                stream: s,
                                send_owed: 0,
                                peer_pid: None,
                            });
                        }
                        // Connections of one peer arrive in order (it waits for each ack).
                        Ok((p, c)) if c < k && c == extra[p].len() + 1 && links[p].is_some() => {
                            s.write_all(&[ACK_OK])?;
                            extra[p].push(Link {
                                fd: s.fd(),
                                stream: s,
                                send_owed: 0,
                                peer_pid: None,
                            });
                        }
                        Ok((p, _)) => tracing::warn!(
                            "rank {rank}: duplicate connection from rank {p} ({from}) refused"
                        ),
                        Err((ack, why)) => {
                            tracing::warn!(
                                "rank {rank}: refused data connection from {from}: {why}"
                            );
                            let _ = s.write_all(&[ack]);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (rank + 1..n)
                            .filter(|&p| links[p].is_none() || extra[p].len() + 1 < k)
                            .collect();
                        return Err(Error::Rendezvous(format!(
                            "rank {rank}: ranks {missing:?} did not connect in time"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let peer_copy = opts.peer_copy && k == 1;
        // The check below waits for every peer, some of which may still be connecting to
        // others: allow it until the meeting's deadline rather than the sockets' 5 s.
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(5));
        for l in links.iter().flatten() {
            l.stream.set_read_timeout(Some(left))?;
        }
        peer::probe(rank, &mut links, peer_copy)?;
        for l in links.iter().flatten().chain(extra.iter().flatten()) {
            l.stream.set_nonblocking(true)?;
        }
        Ok(TcpTransport {
            rank,
            links,
            extra,
            opts,
            aborted: false,
            idle_since: None,
            send_hdr: Vec::new(),
            send_prog: Vec::new(),
            recv_hdr: Vec::new(),
            recv_prog: Vec::new(),
            pollfds: Vec::new(),
            watch: vec![false; n],
            waiting_on: None,
            chase_seq: None,
            replies: vec![None; n],
            asked: vec![false; n],
            copied: vec![None; n],
            confirmed: vec![None; n],
            peer_copied: 0,
        })
    }

    fn link(&mut self, peer: usize) -> &mut Link {
        self.links[peer]
            .as_mut()
            .expect("a link to every other rank")
    }

    /// Connection `c` (0: the primary one) to `peer`.
    fn link_c(&mut self, peer: usize, c: usize) -> &mut Link {
        if c == 0 {
            self.link(peer)
        } else {
            &mut self.extra[peer][c - 1]
        }
    }

    fn lost(peer: usize, op: &OpDesc, detail: impl std::fmt::Display) -> Error {
        Error::PeerLost {
            peer,
            seq: op.seq,
            op: op.to_string(),
            detail: detail.to_string(),
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        if !self.aborted {
            return;
        }
        // Half-close, then drain what peers still send for a moment: closing a socket with
        // unread data sends a reset, which could destroy our abort frame before it is read.
        let fds: Vec<i32> = self
            .links
            .iter()
            .flatten()
            .chain(self.extra.iter().flatten())
            .map(|l| l.fd)
            .collect();
        for l in self
            .links
            .iter()
            .flatten()
            .chain(self.extra.iter().flatten())
        {
            let _ = l.stream.shutdown(std::net::Shutdown::Write);
        }
        let until = Instant::now() + Duration::from_millis(500);
        let mut open = vec![true; fds.len()];
        let mut sink = vec![0u8; 64 << 10];
        while open.iter().any(|&o| o) && Instant::now() < until {
            let mut idle = true;
            for (i, o) in open.iter_mut().enumerate() {
                if !*o {
                    continue;
                }
                match recv_some(fds[i], &mut sink) {
                    Ok(0) => *o = false,
                    Ok(_) => idle = false,
                    Err(e) if would_block(&e) => {}
                    Err(_) => *o = false,
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Binds the data-plane listener of this rank on `host` (port chosen by the OS).
pub fn bind_listener(host: std::net::IpAddr) -> Result<TcpListener> {
    Ok(TcpListener::bind(SocketAddr::new(host, 0))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hello written by a client socket and read by the accepted end.
    fn exchange(hello: &[u8], token: &str, auth: Option<&AuthToken>) -> std::result::Result<(usize, usize), Refusal> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.write_all(hello).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        configure(&accepted).unwrap();
        read_hello(&mut accepted, token, auth, 0, 2)
    }

    #[test]
    fn hellos_must_carry_the_job_token_and_the_auth_token() {
        let secret = AuthToken::new("s3cret").unwrap();
        let guess = AuthToken::new("s3crex").unwrap();
        assert_eq!(exchange(&hello_bytes("job", Some(&secret), 1, 2, 0), "job", Some(&secret)), Ok((1, 0)));
        assert_eq!(exchange(&hello_bytes("job", None, 1, 2, 0), "job", None), Ok((1, 0)));
        let (ack, why) = exchange(&hello_bytes("job", None, 1, 2, 0), "job", Some(&secret)).unwrap_err();
        assert_eq!((ack, why.as_str()), (ACK_AUTH, "no auth token from a process claiming rank 1"));
        let (ack, why) = exchange(&hello_bytes("job", Some(&guess), 1, 2, 0), "job", Some(&secret)).unwrap_err();
        assert_eq!((ack, why.as_str()), (ACK_AUTH, "a wrong auth token from a process claiming rank 1"));
        // The right secret does not make up for another job's token.
        let (ack, why) = exchange(&hello_bytes("other", Some(&secret), 1, 2, 0), "job", Some(&secret)).unwrap_err();
        assert_eq!(ack, ACK_REFUSED, "{why}");
        // A hello announcing an oversized token is refused before anything is allocated.
        let mut huge = hello_bytes("job", None, 1, 2, 0);
        huge[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(exchange(&huge, "job", Some(&secret)).unwrap_err().1, "token too long");
        let (ack, _) = exchange(b"PSCH\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", "job", None).unwrap_err();
        assert_eq!(ack, ACK_REFUSED, "an older version's hello");
    }
}

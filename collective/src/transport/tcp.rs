//! The TCP data plane: one connection per pair of ranks, nonblocking sockets progressed by
//! `poll(2)` (or busy-polled in spin mode), no allocation per exchange once warm.
//!
//! Connections are set up after the rendezvous: rank `r` connects to every lower rank and
//! accepts every higher one; the connecting side opens with a hello that carries the job
//! token, so processes of another job (or stray port scanners) are refused.

use super::{
    abort_error, frame_count, frame_range, Deadline, RecvOp, SendOp, Transport, MAX_REASON,
};
use crate::error::{Error, Result};
use crate::frame::{validate, FrameHeader, FrameKind, OpDesc, HEADER_LEN};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const HELLO_MAGIC: [u8; 4] = *b"PSCH";
/// Longest job token accepted in a hello.
const MAX_TOKEN: usize = 1024;
/// How long a wait busy-polls in spin mode before it sleeps in `poll(2)`.
const SPIN_BUDGET: Duration = Duration::from_micros(500);

/// Options of the TCP transport.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpOptions {
    /// Busy-poll instead of sleeping in `poll(2)`: lowest latency, one core per rank.
    pub spin: bool,
}

/// A connected peer.
struct Link {
    stream: TcpStream,
    fd: i32,
    /// Bytes of the frame being sent that are not written yet (an abort must first finish it).
    send_owed: usize,
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
}

fn hello_bytes(token: &str, rank: usize, n: usize) -> Vec<u8> {
    let t = token.as_bytes();
    let mut b = Vec::with_capacity(16 + t.len());
    b.extend_from_slice(&HELLO_MAGIC);
    b.extend_from_slice(&(rank as u32).to_le_bytes());
    b.extend_from_slice(&(n as u32).to_le_bytes());
    b.extend_from_slice(&(t.len() as u32).to_le_bytes());
    b.extend_from_slice(t);
    b
}

/// Reads and checks a hello: returns the peer's rank, or why it is refused.
fn read_hello(
    s: &mut TcpStream,
    token: &str,
    me: usize,
    n: usize,
) -> std::result::Result<usize, String> {
    let mut fixed = [0u8; 16];
    s.read_exact(&mut fixed)
        .map_err(|e| format!("no hello: {e}"))?;
    if fixed[..4] != HELLO_MAGIC {
        return Err("not a parasync collective peer".into());
    }
    let word = |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().expect("4 bytes")) as usize;
    let (rank, world, tlen) = (word(4), word(8), word(12));
    if tlen > MAX_TOKEN {
        return Err("job token too long".into());
    }
    let mut t = vec![0u8; tlen];
    s.read_exact(&mut t)
        .map_err(|e| format!("truncated hello: {e}"))?;
    if t != token.as_bytes() {
        return Err(format!(
            "wrong job token from a process claiming rank {rank}"
        ));
    }
    if world != n || rank >= n || rank <= me {
        return Err(format!(
            "hello from rank {rank} of {world} does not fit rank {me} of {n}"
        ));
    }
    Ok(rank)
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
        deadline: Instant,
        opts: TcpOptions,
    ) -> Result<TcpTransport> {
        let n = addrs.len();
        let mut links: Vec<Option<Link>> = (0..n).map(|_| None).collect();
        let hello = hello_bytes(token, rank, n);
        for (p, addr) in addrs.iter().enumerate().take(rank) {
            let mut s = loop {
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
            s.write_all(&hello)?;
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).map_err(|e| {
                Error::Rendezvous(format!("rank {p} at {addr} refused rank {rank}: {e}"))
            })?;
            if ack[0] != 1 {
                return Err(Error::TokenRefused(format!(
                    "rank {p} at {addr} refused the connection"
                )));
            }
            links[p] = Some(Link {
                fd: s.as_raw_fd(),
                stream: s,
                send_owed: 0,
            });
        }
        listener.set_nonblocking(true)?;
        while links
            .iter()
            .enumerate()
            .any(|(p, l)| p > rank && l.is_none())
        {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false)?;
                    configure(&s)?;
                    match read_hello(&mut s, token, rank, n) {
                        Ok(p) if links[p].is_none() => {
                            s.write_all(&[1])?;
                            links[p] = Some(Link {
                                fd: s.as_raw_fd(),
                                stream: s,
                                send_owed: 0,
                            });
                        }
                        Ok(p) => tracing::warn!(
                            "rank {rank}: duplicate connection from rank {p} ({from}) refused"
                        ),
                        Err(why) => {
                            tracing::warn!(
                                "rank {rank}: refused data connection from {from}: {why}"
                            );
                            let _ = s.write_all(&[0]);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (rank + 1..n).filter(|&p| links[p].is_none()).collect();
                        return Err(Error::Rendezvous(format!(
                            "rank {rank}: ranks {missing:?} did not connect in time"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
        for l in links.iter().flatten() {
            l.stream.set_nonblocking(true)?;
        }
        Ok(TcpTransport {
            rank,
            links,
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
        })
    }

    fn link(&mut self, peer: usize) -> &mut Link {
        self.links[peer]
            .as_mut()
            .expect("a link to every other rank")
    }

    fn lost(peer: usize, op: &OpDesc, detail: impl std::fmt::Display) -> Error {
        Error::PeerLost {
            peer,
            seq: op.seq,
            op: op.to_string(),
            detail: detail.to_string(),
        }
    }

    /// Waits for readiness, at most until `deadline`. In spin mode it busy-polls (yielding the
    /// core between looks) for the first [`SPIN_BUDGET`] of a wait, then sleeps like the
    /// normal mode, so that more ranks than cores still make progress.
    fn wait(&mut self, deadline: Instant) {
        let spinning = self.opts.spin && self.idle_since.is_some_and(|t| t.elapsed() < SPIN_BUDGET);
        let timeout_ms = if spinning {
            0
        } else {
            let left = deadline.saturating_duration_since(Instant::now());
            left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        };
        // SAFETY: `pollfds` is a valid, initialized array of `len` pollfd structs.
        let rc = unsafe {
            libc::poll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if spinning && rc == 0 {
            std::thread::yield_now();
        }
    }

    /// Looks at every watched peer (no frame of it in progress) for a pending abort frame.
    /// Returns its error if one is there; unwatches peers whose next frame is data.
    fn check_watched(&mut self, op: &OpDesc) -> Result<()> {
        let mut p = 0;
        'peers: while p < self.links.len() {
            if !self.watch[p] {
                p += 1;
                continue;
            }
            let fd = self.link(p).fd;
            let mut raw = [0u8; HEADER_LEN];
            // SAFETY: `raw` is a writable buffer of HEADER_LEN bytes.
            let got = unsafe {
                libc::recv(
                    fd,
                    raw.as_mut_ptr().cast(),
                    HEADER_LEN,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if got == HEADER_LEN as isize {
                match FrameHeader::decode(&raw) {
                    Ok(
                        h @ FrameHeader {
                            kind: FrameKind::Abort { .. },
                            ..
                        },
                    ) => {
                        self.consume(p, HEADER_LEN, op)?;
                        let mut reason = [0u8; MAX_REASON];
                        let len = (h.payload_len as usize).min(MAX_REASON);
                        self.read_exact_briefly(p, &mut reason[..len]);
                        return Err(abort_error(p, &h, &reason[..len]));
                    }
                    Ok(FrameHeader {
                        kind: kind @ (FrameKind::Query { .. } | FrameKind::Reply { .. }),
                        ..
                    }) => {
                        self.consume(p, HEADER_LEN, op)?;
                        self.on_wait_frame(p, &kind);
                        continue 'peers;
                    }
                    // Data of a later operation: an abort could only come after it.
                    _ => self.watch[p] = false,
                }
            } else if got == 0 {
                self.watch[p] = false; // the peer closed after finishing; not our business yet
            }
            p += 1;
        }
        Ok(())
    }

    /// Acts on a complete received header: an abort becomes its error (after reading its
    /// message), a data frame is validated against `op` and the expected length (`true`: its
    /// payload follows), a wait query or reply is handled (`false`: the frame is over).
    fn on_header(
        &mut self,
        peer: usize,
        raw: &[u8; HEADER_LEN],
        op: &OpDesc,
        expect_len: usize,
    ) -> Result<bool> {
        let hdr = FrameHeader::decode(raw).map_err(|detail| Error::Protocol { peer, detail })?;
        match &hdr.kind {
            FrameKind::Abort { .. } => {
                let mut reason = [0u8; MAX_REASON];
                let len = (hdr.payload_len as usize).min(MAX_REASON);
                self.read_exact_briefly(peer, &mut reason[..len]);
                Err(abort_error(peer, &hdr, &reason[..len]))
            }
            FrameKind::Data(theirs) => {
                validate(op, theirs, hdr.payload_len, expect_len, self.rank, peer).map(|()| true)
            }
            kind @ (FrameKind::Query { .. } | FrameKind::Reply { .. }) => {
                self.on_wait_frame(peer, kind);
                Ok(false)
            }
        }
    }

    /// Starts (or keeps) the bookkeeping of the wait chase for operation `seq`.
    fn begin_op(&mut self, seq: u64) {
        if self.chase_seq != Some(seq) {
            self.chase_seq = Some(seq);
            self.replies.iter_mut().for_each(|r| *r = None);
            self.asked.iter_mut().for_each(|a| *a = false);
        }
    }

    /// Sends a header-only control frame if the link is between frames (best effort).
    fn send_control(&mut self, p: usize, kind: FrameKind) {
        if self.link(p).send_owed == 0 {
            let hdr = FrameHeader {
                kind,
                payload_len: 0,
            }
            .encode();
            self.write_all_briefly(p, &hdr, Instant::now() + Duration::from_millis(50));
        }
    }

    /// Asks `p` whom it waits on (once per operation).
    fn ask(&mut self, p: usize, seq: u64) {
        if p != self.rank && !self.asked[p] {
            self.asked[p] = true;
            self.send_control(p, FrameKind::Query { seq });
        }
    }

    /// The rank to blame, following the answers from each of `waited` (the ranks this one
    /// waits on): the first chain that ends in a rank that was asked and never answered (it
    /// stalled), or that answered it waits on nobody (it is not in an operation: it is what
    /// everyone waits for). Without such evidence, the first rank waited on.
    fn culprit(&self, waited: impl Iterator<Item = usize>) -> Option<usize> {
        let mut first = None;
        for start in waited {
            first.get_or_insert(start);
            let mut c = start;
            for _ in 0..self.links.len() {
                match self.replies[c] {
                    None if self.asked[c] => return Some(c),
                    Some(None) => return Some(c),
                    Some(Some(y)) if y != self.rank && y != c => c = y,
                    _ => break,
                }
            }
        }
        first
    }

    /// The wait chase. A rank that has waited for most of its timeout asks the rank it waits
    /// on whom *that* rank waits on, and follows the answers: the rank that never answers (it
    /// stalled) or answers that it waits on nobody in this operation (it never called it) is
    /// the one every rank ends up blaming, instead of each blaming its innocent neighbour.
    fn on_wait_frame(&mut self, from: usize, kind: &FrameKind) {
        match *kind {
            FrameKind::Query { seq } => {
                // Answered whatever operation this rank is in: a rank that is behind answers
                // whom it waits on, which is where the asker's chain continues.
                let answer = self.culprit(self.waiting_on.into_iter());
                self.send_control(
                    from,
                    FrameKind::Reply {
                        seq,
                        waits_on: answer,
                    },
                );
            }
            FrameKind::Reply { seq, waits_on }
                if Some(seq) == self.chase_seq && self.asked[from] =>
            {
                self.replies[from] = Some(waits_on);
                if let Some(y) = waits_on.filter(|&y| y != self.rank) {
                    self.ask(y, seq);
                }
            }
            _ => {}
        }
    }

    /// Sleeps in `poll(2)` (or spins) until one of the given links may progress or a watched
    /// peer sends something; then looks at the watched peers for aborts.
    fn wait_links(
        &mut self,
        op: &OpDesc,
        out: Option<usize>,
        inp: Option<usize>,
        deadline: Instant,
    ) -> Result<()> {
        self.pollfds.clear();
        if let Some(p) = out {
            let fd = self.link(p).fd;
            self.pollfds.push(libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            });
        }
        if let Some(p) = inp {
            let fd = self.link(p).fd;
            self.pollfds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let watched_from = self.pollfds.len();
        for p in 0..self.watch.len() {
            if self.watch[p] {
                let fd = self.link(p).fd;
                self.pollfds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        self.wait(deadline);
        if self.pollfds[watched_from..].iter().any(|p| p.revents != 0) {
            self.check_watched(op)?;
        }
        Ok(())
    }

    /// Discards `len` bytes already known to be readable.
    fn consume(&mut self, p: usize, len: usize, op: &OpDesc) -> Result<()> {
        let mut sink = [0u8; HEADER_LEN];
        self.link(p)
            .stream
            .read_exact(&mut sink[..len])
            .map_err(|e| Self::lost(p, op, e))
    }

    /// Best-effort read of an abort message (up to one second).
    fn read_exact_briefly(&mut self, p: usize, buf: &mut [u8]) {
        let until = Instant::now() + Duration::from_secs(1);
        let mut at = 0;
        while at < buf.len() && Instant::now() < until {
            match self.link(p).stream.read(&mut buf[at..]) {
                Ok(0) => break,
                Ok(k) => at += k,
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// After a failure of `peer`, gives other ranks a moment to tell whom they blame (a
    /// closing peer may itself only be reacting to another rank's failure).
    fn prefer_abort(&mut self, op: &OpDesc, err: Error, window: Duration) -> Error {
        let until = Instant::now() + window;
        loop {
            if let Err(abort) = self.check_watched(op) {
                return abort;
            }
            if Instant::now() >= until || !self.watch.iter().any(|&w| w) {
                return err;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn write_all_briefly(&mut self, p: usize, mut data: &[u8], until: Instant) -> bool {
        while !data.is_empty() {
            match send_nosignal(self.link(p).fd, data) {
                Ok(k) => data = &data[k..],
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    if Instant::now() >= until {
                        return false;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(_) => return false,
            }
        }
        true
    }
}

/// When a rank whose data a peer does not drain gives up and blames that peer: before the
/// deadline, so that its abort (naming the peer that stopped reading, the strongest evidence
/// of a stalled rank) reaches the ranks that are only waiting to receive before they time out
/// and blame their own, innocent, neighbour.
fn send_blame_at(deadline: &Deadline) -> Instant {
    deadline.at - deadline.timeout / 5
}

/// When a rank that only waits to receive starts asking whom its peer waits on.
fn suspect_at(deadline: &Deadline) -> Instant {
    deadline.at - deadline.timeout / 4
}

/// `send(2)` without SIGPIPE (the library may live in a process that does not ignore it).
fn send_nosignal(fd: i32, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a valid readable buffer of `data.len()` bytes.
    let rc = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Header and payload in one `sendmsg(2)` (one syscall for small frames), without SIGPIPE.
fn send2_nosignal(fd: i32, a: &[u8], b: &[u8]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut _,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: b.len(),
        },
    ];
    // SAFETY: msghdr is plain data; zeroed is a valid empty message, then iov is filled in.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = 2;
    // SAFETY: `msg` points at two valid iovecs over live buffers.
    let rc = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

fn recv_some(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    let rc = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.links.len()
    }

    fn exchange(
        &mut self,
        op: &OpDesc,
        sends: &[SendOp<'_>],
        recvs: &mut [RecvOp<'_>],
        deadline: Deadline,
    ) -> Result<()> {
        self.begin_op(op.seq);
        self.send_hdr.clear();
        self.send_prog.clear();
        for s in sends {
            self.send_hdr.push(
                FrameHeader {
                    kind: FrameKind::Data(*op),
                    payload_len: s.payload.len() as u32,
                }
                .encode(),
            );
            self.send_prog.push(Progress::default());
        }
        self.recv_hdr.clear();
        self.recv_prog.clear();
        self.recv_hdr.resize(recvs.len(), [0; HEADER_LEN]);
        self.recv_prog.resize(recvs.len(), Progress::default());
        for (p, w) in self.watch.iter_mut().enumerate() {
            *w = p != self.rank && !recvs.iter().any(|r| r.peer == p);
        }
        let mut watch_checked = false;
        loop {
            let mut progress = false;
            for (i, s) in sends.iter().enumerate() {
                let pr = self.send_prog[i];
                if pr.done {
                    continue;
                }
                let fd = self.link(s.peer).fd;
                let res = if pr.hdr < HEADER_LEN {
                    send2_nosignal(fd, &self.send_hdr[i][pr.hdr..], s.payload)
                } else {
                    send_nosignal(fd, &s.payload[pr.body..])
                };
                match res {
                    Ok(mut k) => {
                        progress |= k > 0;
                        let pr = &mut self.send_prog[i];
                        let h = k.min(HEADER_LEN - pr.hdr);
                        pr.hdr += h;
                        k -= h;
                        pr.body += k;
                        pr.done = pr.hdr == HEADER_LEN && pr.body == s.payload.len();
                        let owed = HEADER_LEN - pr.hdr + s.payload.len() - pr.body;
                        self.link(s.peer).send_owed = owed;
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) => {
                        let err = Self::lost(s.peer, op, e);
                        return Err(self.prefer_abort(op, err, Duration::from_millis(100)));
                    }
                }
            }
            for (i, r) in recvs.iter_mut().enumerate() {
                let pr = self.recv_prog[i];
                if pr.done {
                    continue;
                }
                let fd = self.link(r.peer).fd;
                let res = if pr.hdr < HEADER_LEN {
                    recv_some(fd, &mut self.recv_hdr[i][pr.hdr..])
                } else {
                    recv_some(fd, &mut r.buf[pr.body..])
                };
                match res {
                    Ok(0) if pr.hdr < HEADER_LEN || !r.buf.is_empty() => {
                        let err = Self::lost(r.peer, op, "connection closed by the peer");
                        return Err(self.prefer_abort(op, err, Duration::from_millis(100)));
                    }
                    Ok(k) => {
                        progress |= k > 0;
                        let pr = &mut self.recv_prog[i];
                        if pr.hdr < HEADER_LEN {
                            pr.hdr += k;
                            if pr.hdr == HEADER_LEN {
                                let raw = self.recv_hdr[i];
                                if !self.on_header(r.peer, &raw, op, r.buf.len())? {
                                    self.recv_prog[i].hdr = 0; // a wait frame: read the next header
                                }
                            }
                        } else {
                            pr.body += k;
                        }
                        let pr = &mut self.recv_prog[i];
                        pr.done = pr.hdr == HEADER_LEN && pr.body == r.buf.len();
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) => {
                        let err = Self::lost(r.peer, op, e);
                        return Err(self.prefer_abort(op, err, Duration::from_millis(100)));
                    }
                }
            }
            if self.send_prog.iter().all(|p| p.done) && self.recv_prog.iter().all(|p| p.done) {
                return Ok(());
            }
            if progress {
                self.idle_since = None;
                continue;
            }
            self.idle_since.get_or_insert_with(Instant::now);
            // Nothing moved: look for aborts once, then sleep until something can move.
            if !watch_checked {
                self.check_watched(op)?;
                watch_checked = true;
            }
            let blocked_send = sends
                .iter()
                .zip(&self.send_prog)
                .find(|(_, p)| !p.done)
                .map(|(s, _)| s.peer);
            let now = Instant::now();
            if let (Some(peer), true) = (blocked_send, now >= send_blame_at(&deadline)) {
                return Err(self.prefer_abort(
                    op,
                    deadline.timeout_error(peer, op),
                    Duration::ZERO,
                ));
            }
            let pending_recv = recvs
                .iter()
                .zip(&self.recv_prog)
                .find(|(_, p)| !p.done)
                .map(|(r, _)| r.peer);
            self.waiting_on = blocked_send.or(pending_recv);
            let chasing = blocked_send.is_none() && now >= suspect_at(&deadline);
            if chasing && !self.asked.iter().any(|&a| a) {
                for i in 0..recvs.len() {
                    if !self.recv_prog[i].done {
                        self.ask(recvs[i].peer, op.seq);
                    }
                }
            }
            if now >= deadline.at {
                let waited = recvs
                    .iter()
                    .zip(&self.recv_prog)
                    .filter(|(_, p)| !p.done)
                    .map(|(r, _)| r.peer);
                let peer = self
                    .culprit(waited)
                    .or(blocked_send)
                    .expect("something is pending");
                let err = deadline.timeout_error(peer, op);
                return Err(self.prefer_abort(op, err, Duration::ZERO));
            }
            self.pollfds.clear();
            for (s, p) in sends.iter().zip(&self.send_prog) {
                if !p.done {
                    let fd = self.links[s.peer].as_ref().expect("link").fd;
                    self.pollfds.push(libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    });
                }
            }
            for (r, p) in recvs.iter().zip(&self.recv_prog) {
                if !p.done {
                    let fd = self.links[r.peer].as_ref().expect("link").fd;
                    self.pollfds.push(libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            let watched_from = self.pollfds.len();
            for (p, &w) in self.watch.iter().enumerate() {
                if w {
                    let fd = self.links[p].as_ref().expect("link").fd;
                    self.pollfds.push(libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            let wake = if blocked_send.is_some() {
                send_blame_at(&deadline)
            } else if !self.asked.iter().any(|&a| a) {
                suspect_at(&deadline)
            } else {
                deadline.at
            };
            self.wait(wake);
            if self.pollfds[watched_from..].iter().any(|p| p.revents != 0) {
                self.check_watched(op)?;
            }
        }
    }

    fn stream(
        &mut self,
        op: &OpDesc,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        frame: usize,
        deadline: Deadline,
        on_frame: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<()> {
        self.begin_op(op.seq);
        let frame = frame.max(1);
        let (to, sbuf) = send.unwrap_or((usize::MAX, &[]));
        let (from, rbuf) = match recv {
            Some((p, b)) => (p, b),
            None => (usize::MAX, &mut [][..]),
        };
        let ns = if to == usize::MAX {
            0
        } else {
            frame_count(sbuf.len(), frame)
        };
        let nr = if from == usize::MAX {
            0
        } else {
            frame_count(rbuf.len(), frame)
        };
        for (p, w) in self.watch.iter_mut().enumerate() {
            *w = p != self.rank && p != from;
        }
        // Sending state: frame index, bytes of header and body written.
        let (mut sk, mut sh, mut sb) = (0usize, 0usize, 0usize);
        let mut shdr = [0u8; HEADER_LEN];
        let mut srange = 0..0;
        if sk < ns {
            srange = frame_range(sbuf.len(), frame, 0);
            shdr = FrameHeader {
                kind: FrameKind::Data(*op),
                payload_len: srange.len() as u32,
            }
            .encode();
        }
        // Receiving state.
        let (mut rk, mut rh, mut rb) = (0usize, 0usize, 0usize);
        let mut rhdr = [0u8; HEADER_LEN];
        let mut rrange = frame_range(rbuf.len(), frame, 0);
        let mut watch_checked = false;
        loop {
            let mut progress = false;
            while sk < ns {
                let body = &sbuf[srange.clone()];
                let fd = self.link(to).fd;
                let res = if sh < HEADER_LEN {
                    send2_nosignal(fd, &shdr[sh..], body)
                } else {
                    send_nosignal(fd, &body[sb..])
                };
                match res {
                    Ok(mut k) => {
                        progress |= k > 0;
                        let h = k.min(HEADER_LEN - sh);
                        sh += h;
                        k -= h;
                        sb += k;
                        self.link(to).send_owed = HEADER_LEN - sh + body.len() - sb;
                        if sh == HEADER_LEN && sb == body.len() {
                            sk += 1;
                            (sh, sb) = (0, 0);
                            if sk < ns {
                                srange = frame_range(sbuf.len(), frame, sk);
                                shdr = FrameHeader {
                                    kind: FrameKind::Data(*op),
                                    payload_len: srange.len() as u32,
                                }
                                .encode();
                            }
                        } else if k == 0 && h == 0 {
                            break;
                        }
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) => {
                        let err = Self::lost(to, op, e);
                        return Err(self.prefer_abort(op, err, Duration::from_millis(100)));
                    }
                }
            }
            while rk < nr {
                let fd = self.link(from).fd;
                let res = if rh < HEADER_LEN {
                    recv_some(fd, &mut rhdr[rh..])
                } else {
                    recv_some(fd, &mut rbuf[rrange.start + rb..rrange.end])
                };
                match res {
                    Ok(0) if rh < HEADER_LEN || rb < rrange.len() => {
                        let err = Self::lost(from, op, "connection closed by the peer");
                        return Err(self.prefer_abort(op, err, Duration::from_millis(100)));
                    }
                    Ok(k) => {
                        progress |= k > 0;
                        if rh < HEADER_LEN {
                            rh += k;
                            if rh == HEADER_LEN && !self.on_header(from, &rhdr, op, rrange.len())? {
                                rh = 0; // a wait frame: read the next header
                            }
                        } else {
                            rb += k;
                        }
                        if rh == HEADER_LEN && rb == rrange.len() {
                            on_frame(rrange.start, &mut rbuf[rrange.clone()]);
                            rk += 1;
                            (rh, rb) = (0, 0);
                            rrange = frame_range(rbuf.len(), frame, rk);
                        }
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) => {
                        let err = Self::lost(from, op, e);
                        return Err(self.prefer_abort(op, err, Duration::from_millis(100)));
                    }
                }
            }
            if sk >= ns && rk >= nr {
                return Ok(());
            }
            if progress {
                self.idle_since = None;
                continue;
            }
            self.idle_since.get_or_insert_with(Instant::now);
            if !watch_checked {
                self.check_watched(op)?;
                watch_checked = true;
            }
            let now = Instant::now();
            if sk < ns && now >= send_blame_at(&deadline) {
                return Err(self.prefer_abort(op, deadline.timeout_error(to, op), Duration::ZERO));
            }
            self.waiting_on = if sk < ns { Some(to) } else { Some(from) };
            if rk < nr && sk >= ns && now >= suspect_at(&deadline) {
                self.ask(from, op.seq);
            }
            if now >= deadline.at {
                let peer = if rk < nr {
                    self.culprit(std::iter::once(from))
                } else {
                    None
                };
                let peer = peer.unwrap_or(to);
                let err = deadline.timeout_error(peer, op);
                return Err(self.prefer_abort(op, err, Duration::ZERO));
            }
            let out = (sk < ns).then_some(to);
            let inp = (rk < nr).then_some(from);
            let wake = if sk < ns {
                send_blame_at(&deadline)
            } else if !self.asked[from] {
                suspect_at(&deadline)
            } else {
                deadline.at
            };
            self.wait_links(op, out, inp, wake)?;
        }
    }

    fn abort(&mut self, seq: u64, culprit: Option<usize>, reason: &str) {
        if self.aborted {
            return;
        }
        self.aborted = true;
        let reason = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
        let hdr = FrameHeader {
            kind: FrameKind::Abort { seq, culprit },
            payload_len: reason.len() as u32,
        }
        .encode();
        let until = Instant::now() + Duration::from_millis(500);
        let zeros = [0u8; 4096];
        for p in 0..self.links.len() {
            if self.links[p].is_none() || Some(p) == culprit {
                continue;
            }
            // Finish the frame in flight with padding so the peer can parse the abort.
            let mut owed = self.link(p).send_owed;
            let mut ok = true;
            while owed > 0 && ok {
                let k = owed.min(zeros.len());
                ok = self.write_all_briefly(p, &zeros[..k], until);
                owed -= k;
            }
            if ok && self.write_all_briefly(p, &hdr, until) {
                self.write_all_briefly(p, reason, until);
            }
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
        for l in self.links.iter().flatten() {
            let _ = l.stream.shutdown(std::net::Shutdown::Write);
        }
        let until = Instant::now() + Duration::from_millis(500);
        let mut open: Vec<bool> = self.links.iter().map(|l| l.is_some()).collect();
        let mut sink = vec![0u8; 64 << 10];
        while open.iter().any(|&o| o) && Instant::now() < until {
            let mut idle = true;
            for (p, o) in open.iter_mut().enumerate() {
                if !*o {
                    continue;
                }
                match recv_some(self.links[p].as_ref().expect("link").fd, &mut sink) {
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

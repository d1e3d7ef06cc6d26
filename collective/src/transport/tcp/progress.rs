//! Carrying out exchanges and streams: the nonblocking progress loops of [`TcpTransport`].

use super::sys::{recv_some, send2_nosignal, send_nosignal, would_block};
use super::waiting::{send_blame_at, suspect_at};
use super::peer::{PeerRecv, PeerSend};
use super::{Progress, TcpTransport};
use crate::error::Result;
use crate::frame::{FrameHeader, FrameKind, OpDesc, HEADER_LEN};
use crate::transport::{frame_count, frame_range, Deadline, RecvOp, SendOp, Transport, MAX_REASON};
use std::time::{Duration, Instant};

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
                        if pr.done {
                            // Between frames again: watch it for aborts and wait queries.
                            self.watch[r.peer] = true;
                        }
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
                for (i, r) in recvs.iter().enumerate() {
                    if !self.recv_prog[i].done {
                        self.ask(r.peer, op.seq);
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
        let frame = frame.max(1);
        let tx_peer = send.is_some_and(|(p, b)| self.peer_copy(p, b.len()));
        let rx_peer = recv.as_ref().is_some_and(|(p, b)| self.peer_copy(*p, b.len()));
        if self.opts.stream_count() > 1 {
            return self.stream_multi(op, send, recv, frame, deadline, on_frame);
        }
        self.begin_op(op.seq);
        let mut tx: Tx<'_> = match send {
            None => Half::Idle,
            Some((to, b)) if tx_peer => Half::Peer(PeerSend::new(to, b)),
            Some((to, b)) => Half::Frames(FrameSender::new(op, to, b, frame)),
        };
        let mut rx: Rx<'_> = match recv {
            None => Half::Idle,
            Some((from, b)) if rx_peer => Half::Peer(PeerRecv::new(from, b, frame)),
            Some((from, b)) => Half::Frames(FrameReceiver::new(from, b, frame)),
        };
        let (to, from) = (tx.peer(), rx.peer());
        for (p, w) in self.watch.iter_mut().enumerate() {
            *w = p != self.rank && p != from;
        }
        let mut watch_checked = false;
        loop {
            // The sending half reads its receiver's answers itself unless the receiving half
            // is in the middle of that same link's frames.
            let read_to = !matches!(&rx, Half::Frames(r) if r.from == to && !r.done());
            let mut progress = match &mut tx {
                Half::Idle => false,
                Half::Frames(s) => s.progress(self, op)?,
                Half::Peer(s) => s.progress(self, op, &deadline, read_to)?,
            };
            progress |= match &mut rx {
                Half::Idle => false,
                Half::Frames(r) => r.progress(self, op, on_frame)?,
                Half::Peer(r) => r.progress(self, op, &deadline, on_frame)?,
            };
            if tx.done() && rx.done() {
                return Ok(());
            }
            if progress {
                self.idle_since = None;
                continue;
            }
            // A receiver that has not copied this rank's offered data may itself be waiting
            // on someone: that is asked, like the wait for a sender, rather than blamed.
            let out = matches!(&tx, Half::Frames(s) if !s.done()).then_some(to);
            let answers = matches!(&tx, Half::Peer(s) if s.blocked()).then_some(to);
            let awaited = [(!rx.done()).then_some(from), answers];
            let wake = self.pair_idle(op, &deadline, to, out.is_some(), awaited, &mut watch_checked)?;
            let inp = match &rx {
                Half::Frames(r) if !r.done() => Some(from),
                Half::Peer(r) if r.waiting() => Some(from),
                _ => None,
            };
            self.wait_links(op, out, [inp, answers], wake)?;
        }
    }

    fn peer_copied_bytes(&self) -> u64 {
        self.peer_copied
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
            // On every connection (a peer may be reading any of them): finish the frame in
            // flight with padding so the peer can parse the abort, then send it.
            for c in 0..1 + self.extra[p].len() {
                let mut owed = self.link_c(p, c).send_owed;
                let mut ok = true;
                while owed > 0 && ok {
                    let k = owed.min(zeros.len());
                    ok = self.write_all_briefly_on(p, c, &zeros[..k], until);
                    owed -= k;
                }
                if ok && self.write_all_briefly_on(p, c, &hdr, until) {
                    self.write_all_briefly_on(p, c, reason, until);
                }
            }
        }
    }
}

/// One half of a stream: nothing to do, frames through the socket, or a peer copy.
enum Half<F, P> {
    Idle,
    Frames(F),
    Peer(P),
}

/// The sending half of a stream.
type Tx<'a> = Half<FrameSender<'a>, PeerSend<'a>>;
/// The receiving half of a stream.
type Rx<'a> = Half<FrameReceiver<'a>, PeerRecv<'a>>;

/// What the stream loop asks of either kind of half.
pub(super) trait Side {
    fn done(&self) -> bool;
    /// The rank at the other end.
    fn peer(&self) -> usize;
}

impl<F: Side, P: Side> Half<F, P> {
    fn done(&self) -> bool {
        match self {
            Half::Idle => true,
            Half::Frames(f) => f.done(),
            Half::Peer(p) => p.done(),
        }
    }

    fn peer(&self) -> usize {
        match self {
            Half::Idle => usize::MAX,
            Half::Frames(f) => f.peer(),
            Half::Peer(p) => p.peer(),
        }
    }
}

impl Side for FrameSender<'_> {
    fn done(&self) -> bool {
        self.at.k >= self.at.count
    }
    fn peer(&self) -> usize {
        self.to
    }
}

impl Side for FrameReceiver<'_> {
    fn done(&self) -> bool {
        self.at.k >= self.at.count
    }
    fn peer(&self) -> usize {
        self.from
    }
}

/// Where a transfer in data frames of at most `frame` bytes (at least one frame) stands.
struct Frames {
    frame: usize,
    /// Frames in all, and the index of the one in progress.
    count: usize,
    k: usize,
    /// Header and body bytes of frame `k` done.
    h: usize,
    b: usize,
    hdr: [u8; HEADER_LEN],
    /// Byte range of frame `k` within the payload.
    range: std::ops::Range<usize>,
}

impl Frames {
    fn new(len: usize, frame: usize) -> Frames {
        Frames {
            frame,
            count: frame_count(len, frame),
            k: 0,
            h: 0,
            b: 0,
            hdr: [0; HEADER_LEN],
            range: frame_range(len, frame, 0),
        }
    }

    /// Moves on to the next frame of a payload of `len` bytes.
    fn next(&mut self, len: usize) {
        self.k += 1;
        (self.h, self.b) = (0, 0);
        self.range = frame_range(len, self.frame, self.k);
    }
}

/// Sends a payload to one peer as data frames.
struct FrameSender<'a> {
    to: usize,
    buf: &'a [u8],
    at: Frames,
}

impl<'a> FrameSender<'a> {
    fn new(op: &OpDesc, to: usize, buf: &'a [u8], frame: usize) -> Self {
        let mut s = FrameSender {
            to,
            buf,
            at: Frames::new(buf.len(), frame),
        };
        s.start_frame(op);
        s
    }

    fn start_frame(&mut self, op: &OpDesc) {
        if self.at.k < self.at.count {
            self.at.hdr = FrameHeader {
                kind: FrameKind::Data(*op),
                payload_len: self.at.range.len() as u32,
            }
            .encode();
        }
    }

    /// Writes as much as the socket takes; `true` if anything was written.
    fn progress(&mut self, t: &mut TcpTransport, op: &OpDesc) -> Result<bool> {
        let mut progress = false;
        while self.at.k < self.at.count {
            let body = &self.buf[self.at.range.clone()];
            let fd = t.link(self.to).fd;
            let at = &mut self.at;
            let res = if at.h < HEADER_LEN {
                send2_nosignal(fd, &at.hdr[at.h..], body)
            } else {
                send_nosignal(fd, &body[at.b..])
            };
            match res {
                Ok(mut k) => {
                    progress |= k > 0;
                    let h = k.min(HEADER_LEN - at.h);
                    at.h += h;
                    k -= h;
                    at.b += k;
                    let owed = HEADER_LEN - at.h + body.len() - at.b;
                    let whole = at.h == HEADER_LEN && at.b == body.len();
                    t.link(self.to).send_owed = owed;
                    if whole {
                        self.at.next(self.buf.len());
                        self.start_frame(op);
                    } else if k == 0 && h == 0 {
                        break;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) => {
                    let err = TcpTransport::lost(self.to, op, e);
                    return Err(t.prefer_abort(op, err, Duration::from_millis(100)));
                }
            }
        }
        Ok(progress)
    }
}

/// Receives a payload from one peer as data frames, handing each on as soon as it is
/// complete.
struct FrameReceiver<'a> {
    from: usize,
    buf: &'a mut [u8],
    at: Frames,
}

impl<'a> FrameReceiver<'a> {
    fn new(from: usize, buf: &'a mut [u8], frame: usize) -> Self {
        let at = Frames::new(buf.len(), frame);
        FrameReceiver { from, buf, at }
    }

    /// Reads what the socket has; `true` if anything was read.
    fn progress(
        &mut self,
        t: &mut TcpTransport,
        op: &OpDesc,
        on_frame: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<bool> {
        let mut progress = false;
        let from = self.from;
        while self.at.k < self.at.count {
            let fd = t.link(from).fd;
            let at = &mut self.at;
            let res = if at.h < HEADER_LEN {
                recv_some(fd, &mut at.hdr[at.h..])
            } else {
                recv_some(fd, &mut self.buf[at.range.start + at.b..at.range.end])
            };
            match res {
                Ok(0) if at.h < HEADER_LEN || at.b < at.range.len() => {
                    let err = TcpTransport::lost(from, op, "connection closed by the peer");
                    return Err(t.prefer_abort(op, err, Duration::from_millis(100)));
                }
                Ok(k) => {
                    progress |= k > 0;
                    if at.h < HEADER_LEN {
                        at.h += k;
                        if at.h == HEADER_LEN && !t.on_header(from, &at.hdr, op, at.range.len())? {
                            at.h = 0; // a wait or answer frame: read the next header
                        }
                    } else {
                        at.b += k;
                    }
                    if at.h == HEADER_LEN && at.b == at.range.len() {
                        on_frame(at.range.start, &mut self.buf[at.range.clone()]);
                        self.at.next(self.buf.len());
                        // All received: watch it for aborts and wait queries.
                        t.watch[from] |= self.at.k == self.at.count;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) => {
                    let err = TcpTransport::lost(from, op, e);
                    return Err(t.prefer_abort(op, err, Duration::from_millis(100)));
                }
            }
        }
        Ok(progress)
    }
}

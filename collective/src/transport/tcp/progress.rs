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
        let mut tx = match send {
            None => Tx::Idle,
            Some((to, b)) if tx_peer => Tx::Peer(PeerSend::new(to, b)),
            Some((to, b)) => Tx::Frames(FrameSender::new(op, to, b, frame)),
        };
        let mut rx = match recv {
            None => Rx::Idle,
            Some((from, b)) if rx_peer => Rx::Peer(PeerRecv::new(from, b, frame)),
            Some((from, b)) => Rx::Frames(FrameReceiver::new(from, b, frame)),
        };
        let (to, from) = (tx.peer(), rx.peer());
        for (p, w) in self.watch.iter_mut().enumerate() {
            *w = p != self.rank && p != from;
        }
        let mut watch_checked = false;
        loop {
            // The sending half reads its receiver's answers itself unless the receiving half
            // is in the middle of that same link's frames.
            let read_to = !matches!(&rx, Rx::Frames(r) if r.from == to && !r.done());
            let mut progress = match &mut tx {
                Tx::Idle => false,
                Tx::Frames(s) => s.progress(self, op)?,
                Tx::Peer(s) => s.progress(self, op, &deadline, read_to)?,
            };
            progress |= match &mut rx {
                Rx::Idle => false,
                Rx::Frames(r) => r.progress(self, op, on_frame)?,
                Rx::Peer(r) => r.progress(self, op, &deadline, on_frame)?,
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
            let out = matches!(&tx, Tx::Frames(s) if !s.done()).then_some(to);
            let answers = matches!(&tx, Tx::Peer(s) if s.blocked()).then_some(to);
            let awaited = [(!rx.done()).then_some(from), answers];
            let wake = self.pair_idle(op, &deadline, to, out.is_some(), awaited, &mut watch_checked)?;
            let inp = match &rx {
                Rx::Frames(r) if !r.done() => Some(from),
                Rx::Peer(r) if r.waiting() => Some(from),
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

/// The sending half of a stream.
enum Tx<'a> {
    Idle,
    Frames(FrameSender<'a>),
    Peer(PeerSend<'a>),
}

impl Tx<'_> {
    fn done(&self) -> bool {
        match self {
            Tx::Idle => true,
            Tx::Frames(s) => s.done(),
            Tx::Peer(s) => s.done(),
        }
    }

    fn peer(&self) -> usize {
        match self {
            Tx::Idle => usize::MAX,
            Tx::Frames(s) => s.to,
            Tx::Peer(s) => s.to,
        }
    }
}

/// The receiving half of a stream.
enum Rx<'a> {
    Idle,
    Frames(FrameReceiver<'a>),
    Peer(PeerRecv<'a>),
}

impl Rx<'_> {
    fn done(&self) -> bool {
        match self {
            Rx::Idle => true,
            Rx::Frames(r) => r.done(),
            Rx::Peer(r) => r.done(),
        }
    }

    fn peer(&self) -> usize {
        match self {
            Rx::Idle => usize::MAX,
            Rx::Frames(r) => r.from,
            Rx::Peer(r) => r.from,
        }
    }
}

/// Sends a payload to one peer as data frames of at most `frame` bytes (at least one frame).
struct FrameSender<'a> {
    to: usize,
    buf: &'a [u8],
    frame: usize,
    /// Frames in all, and the index of the one being written.
    count: usize,
    k: usize,
    /// Header and body bytes of frame `k` written.
    h: usize,
    b: usize,
    hdr: [u8; HEADER_LEN],
    range: std::ops::Range<usize>,
}

impl<'a> FrameSender<'a> {
    fn new(op: &OpDesc, to: usize, buf: &'a [u8], frame: usize) -> Self {
        let mut s = FrameSender {
            to,
            buf,
            frame,
            count: frame_count(buf.len(), frame),
            k: 0,
            h: 0,
            b: 0,
            hdr: [0; HEADER_LEN],
            range: 0..0,
        };
        s.start_frame(op);
        s
    }

    fn start_frame(&mut self, op: &OpDesc) {
        if self.k < self.count {
            self.range = frame_range(self.buf.len(), self.frame, self.k);
            self.hdr = FrameHeader {
                kind: FrameKind::Data(*op),
                payload_len: self.range.len() as u32,
            }
            .encode();
        }
    }

    fn done(&self) -> bool {
        self.k >= self.count
    }

    /// Writes as much as the socket takes; `true` if anything was written.
    fn progress(&mut self, t: &mut TcpTransport, op: &OpDesc) -> Result<bool> {
        let mut progress = false;
        while self.k < self.count {
            let body = &self.buf[self.range.clone()];
            let fd = t.link(self.to).fd;
            let res = if self.h < HEADER_LEN {
                send2_nosignal(fd, &self.hdr[self.h..], body)
            } else {
                send_nosignal(fd, &body[self.b..])
            };
            match res {
                Ok(mut k) => {
                    progress |= k > 0;
                    let h = k.min(HEADER_LEN - self.h);
                    self.h += h;
                    k -= h;
                    self.b += k;
                    t.link(self.to).send_owed = HEADER_LEN - self.h + body.len() - self.b;
                    if self.h == HEADER_LEN && self.b == body.len() {
                        self.k += 1;
                        (self.h, self.b) = (0, 0);
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

/// Receives a payload from one peer as data frames of at most `frame` bytes, handing each on
/// as soon as it is complete.
struct FrameReceiver<'a> {
    from: usize,
    buf: &'a mut [u8],
    frame: usize,
    count: usize,
    k: usize,
    h: usize,
    b: usize,
    hdr: [u8; HEADER_LEN],
    range: std::ops::Range<usize>,
}

impl<'a> FrameReceiver<'a> {
    fn new(from: usize, buf: &'a mut [u8], frame: usize) -> Self {
        let range = frame_range(buf.len(), frame, 0);
        FrameReceiver {
            from,
            count: frame_count(buf.len(), frame),
            buf,
            frame,
            k: 0,
            h: 0,
            b: 0,
            hdr: [0; HEADER_LEN],
            range,
        }
    }

    fn done(&self) -> bool {
        self.k >= self.count
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
        while self.k < self.count {
            let fd = t.link(from).fd;
            let res = if self.h < HEADER_LEN {
                recv_some(fd, &mut self.hdr[self.h..])
            } else {
                recv_some(fd, &mut self.buf[self.range.start + self.b..self.range.end])
            };
            match res {
                Ok(0) if self.h < HEADER_LEN || self.b < self.range.len() => {
                    let err = TcpTransport::lost(from, op, "connection closed by the peer");
                    return Err(t.prefer_abort(op, err, Duration::from_millis(100)));
                }
                Ok(k) => {
                    progress |= k > 0;
                    if self.h < HEADER_LEN {
                        self.h += k;
                        if self.h == HEADER_LEN && !t.on_header(from, &self.hdr, op, self.range.len())? {
                            self.h = 0; // a wait or answer frame: read the next header
                        }
                    } else {
                        self.b += k;
                    }
                    if self.h == HEADER_LEN && self.b == self.range.len() {
                        on_frame(self.range.start, &mut self.buf[self.range.clone()]);
                        self.k += 1;
                        // All received: watch it for aborts and wait queries.
                        t.watch[from] |= self.k == self.count;
                        (self.h, self.b) = (0, 0);
                        self.range = frame_range(self.buf.len(), self.frame, self.k);
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

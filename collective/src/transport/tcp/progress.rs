//! Carrying out exchanges and streams: the nonblocking progress loops of [`TcpTransport`].

use super::sys::{recv_some, send2_nosignal, send_nosignal, would_block};
use super::waiting::{send_blame_at, suspect_at};
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
        if self.opts.stream_count() > 1 {
            return self.stream_multi(op, send, recv, frame, deadline, on_frame);
        }
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
                            // All received: watch it for aborts and wait queries.
                            self.watch[from] |= rk == nr;
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
            let (sending, receiving) = (sk < ns, rk < nr);
            let wake = self.pair_idle(op, &deadline, to, from, sending, receiving, &mut watch_checked)?;
            self.wait_links(op, sending.then_some(to), receiving.then_some(from), wake)?;
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

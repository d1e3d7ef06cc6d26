//! Streams over several connections per pair of ranks: frame `f` of a transfer travels on
//! connection `f mod k`, and each connection progresses on its own, so `k` kernel copies can
//! run at once. Frames may complete out of order across connections; the caller's
//! `on_frame` works on each frame's own range, so order does not matter to it.

use super::sys::{recv_some, send2_nosignal, send_nosignal, would_block};
use super::{TcpTransport, MAX_STREAMS};
use crate::error::Result;
use crate::frame::{FrameHeader, FrameKind, OpDesc, HEADER_LEN};
use crate::transport::{frame_count, frame_range, Deadline};
use std::time::Duration;

/// Progress of one direction of one connection: the frame it is on and bytes done.
#[derive(Clone, Copy, Default)]
struct Lane {
    /// Index of the frame this connection carries now.
    frame: usize,
    hdr: usize,
    body: usize,
}

fn data_header(op: &OpDesc, len: usize) -> [u8; HEADER_LEN] {
    FrameHeader {
        kind: FrameKind::Data(*op),
        payload_len: len as u32,
    }
    .encode()
}

impl TcpTransport {
    /// [`crate::transport::Transport::stream`] over `opts.streams` connections per pair.
    pub(super) fn stream_multi(
        &mut self,
        op: &OpDesc,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        frame: usize,
        deadline: Deadline,
        on_frame: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<()> {
        self.begin_op(op.seq);
        let k = self.opts.stream_count();
        let fsz = frame.max(1);
        let (to, sbuf) = send.unwrap_or((usize::MAX, &[]));
        let (from, rbuf) = match recv {
            Some((p, b)) => (p, b),
            None => (usize::MAX, &mut [][..]),
        };
        let ns = if to == usize::MAX {
            0
        } else {
            frame_count(sbuf.len(), fsz)
        };
        let nr = if from == usize::MAX {
            0
        } else {
            frame_count(rbuf.len(), fsz)
        };
        for (p, w) in self.watch.iter_mut().enumerate() {
            *w = p != self.rank && p != from;
        }
        let mut out = [Lane::default(); MAX_STREAMS];
        let mut inp = [Lane::default(); MAX_STREAMS];
        let mut ohdr = [[0u8; HEADER_LEN]; MAX_STREAMS];
        let mut ihdr = [[0u8; HEADER_LEN]; MAX_STREAMS];
        for c in 0..k {
            out[c].frame = c;
            inp[c].frame = c;
            if c < ns {
                ohdr[c] = data_header(op, frame_range(sbuf.len(), fsz, c).len());
            }
        }
        let (mut sent, mut received) = (0usize, 0usize);
        let mut watch_checked = false;
        loop {
            let mut progress = false;
            for c in 0..k {
                while out[c].frame < ns {
                    let body = &sbuf[frame_range(sbuf.len(), fsz, out[c].frame)];
                    let fd = self.link_c(to, c).fd;
                    let l = out[c];
                    let res = if l.hdr < HEADER_LEN {
                        send2_nosignal(fd, &ohdr[c][l.hdr..], body)
                    } else {
                        send_nosignal(fd, &body[l.body..])
                    };
                    match res {
                        Ok(mut n) => {
                            progress |= n > 0;
                            let l = &mut out[c];
                            let h = n.min(HEADER_LEN - l.hdr);
                            l.hdr += h;
                            n -= h;
                            l.body += n;
                            self.link_c(to, c).send_owed =
                                HEADER_LEN - out[c].hdr + body.len() - out[c].body;
                            let l = &mut out[c];
                            if l.hdr == HEADER_LEN && l.body == body.len() {
                                sent += 1;
                                *l = Lane {
                                    frame: l.frame + k,
                                    hdr: 0,
                                    body: 0,
                                };
                                if l.frame < ns {
                                    ohdr[c] = data_header(
                                        op,
                                        frame_range(sbuf.len(), fsz, l.frame).len(),
                                    );
                                }
                            } else if n == 0 && h == 0 {
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
                while inp[c].frame < nr {
                    let range = frame_range(rbuf.len(), fsz, inp[c].frame);
                    let fd = self.link_c(from, c).fd;
                    let l = inp[c];
                    let res = if l.hdr < HEADER_LEN {
                        recv_some(fd, &mut ihdr[c][l.hdr..])
                    } else {
                        recv_some(fd, &mut rbuf[range.start + l.body..range.end])
                    };
                    match res {
                        Ok(0) if l.hdr < HEADER_LEN || l.body < range.len() => {
                            let err = Self::lost(from, op, "connection closed by the peer");
                            return Err(self.prefer_abort(op, err, Duration::from_millis(100)));
                        }
                        Ok(n) => {
                            progress |= n > 0;
                            if inp[c].hdr < HEADER_LEN {
                                inp[c].hdr += n;
                                if inp[c].hdr == HEADER_LEN
                                    && !self.on_header(from, &ihdr[c], op, range.len())?
                                {
                                    inp[c].hdr = 0; // a wait frame: read the next header
                                }
                            } else {
                                inp[c].body += n;
                            }
                            let l = &mut inp[c];
                            if l.hdr == HEADER_LEN && l.body == range.len() {
                                on_frame(range.start, &mut rbuf[range.clone()]);
                                received += 1;
                                // All received: watch it for aborts and wait queries.
                                self.watch[from] |= received == nr;
                                *l = Lane {
                                    frame: l.frame + k,
                                    hdr: 0,
                                    body: 0,
                                };
                            }
                        }
                        Err(e) if would_block(&e) => break,
                        Err(e) => {
                            let err = Self::lost(from, op, e);
                            return Err(self.prefer_abort(op, err, Duration::from_millis(100)));
                        }
                    }
                }
            }
            if sent >= ns && received >= nr {
                return Ok(());
            }
            if progress {
                self.idle_since = None;
                continue;
            }
            let (sending, receiving) = (sent < ns, received < nr);
            let wake = self.pair_idle(op, &deadline, to, sending, [receiving.then_some(from), None], &mut watch_checked)?;
            self.pollfds.clear();
            for c in 0..k {
                if out[c].frame < ns {
                    let fd = self.link_c(to, c).fd;
                    self.pollfds.push(libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    });
                }
                if inp[c].frame < nr {
                    let fd = self.link_c(from, c).fd;
                    self.pollfds.push(libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
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
            self.wait(wake);
            if self.pollfds[watched_from..].iter().any(|p| p.revents != 0) {
                self.check_watched(op)?;
            }
        }
    }
}

//! Waiting, watching and blaming: sleeping until sockets can move, spotting abort frames
//! from peers not otherwise read, and the wait chase that finds a stalled rank.

use super::sys::{peek, send_nosignal};
use super::{TcpTransport, SPIN_BUDGET};
use crate::error::{Error, Result};
use crate::frame::{validate, FrameHeader, FrameKind, OpDesc, HEADER_LEN};
use crate::transport::{abort_error, Deadline, MAX_REASON};
use std::io::{self, Read};
use std::time::{Duration, Instant};

impl TcpTransport {
    /// Waits for readiness, at most until `deadline`. In spin mode it busy-polls (yielding the
    /// core between looks) for the first [`SPIN_BUDGET`] of a wait, then sleeps like the
    /// normal mode, so that more ranks than cores still make progress.
    pub(super) fn wait(&mut self, deadline: Instant) {
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
    /// Returns its error if one is there; unwatches peers whose next frame is data. Control
    /// frames found on the way are consumed and acted on; `Ok(true)` says one of them was
    /// a peer-copy answer (`Copied`, `Confirmed`), which a stream half may be waiting for.
    pub(super) fn check_watched(&mut self, op: &OpDesc) -> Result<bool> {
        let mut answered = false;
        let mut p = 0;
        'peers: while p < self.links.len() {
            if !self.watch[p] {
                p += 1;
                continue;
            }
            let fd = self.link(p).fd;
            let mut raw = [0u8; HEADER_LEN];
            let got = peek(fd, &mut raw);
            if got == HEADER_LEN as isize {
                match FrameHeader::decode(&raw) {
                    Ok(
                        h @ FrameHeader {
                            kind: FrameKind::Abort { .. },
                            ..
                        },
                    ) => return Err(self.take_abort(p, &h, op)),
                    Ok(FrameHeader {
                        kind:
                            kind @ (FrameKind::Query { .. }
                            | FrameKind::Reply { .. }
                            | FrameKind::Copied { .. }
                            | FrameKind::Confirmed { .. }),
                        ..
                    }) => {
                        self.consume(p, HEADER_LEN, op)?;
                        answered |= matches!(kind, FrameKind::Copied { .. } | FrameKind::Confirmed { .. });
                        self.on_control(p, &kind);
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
        Ok(answered)
    }

    /// Acts on a complete received header: an abort becomes its error (after reading its
    /// message), a data frame is validated against `op` and the expected length (`true`: its
    /// payload follows), a wait query or reply is handled (`false`: the frame is over).
    pub(super) fn on_header(
        &mut self,
        peer: usize,
        raw: &[u8; HEADER_LEN],
        op: &OpDesc,
        expect_len: usize,
    ) -> Result<bool> {
        let hdr = FrameHeader::decode(raw).map_err(|detail| Error::Protocol { peer, detail })?;
        match &hdr.kind {
            FrameKind::Abort { .. } => Err(self.abort_reason(peer, &hdr)),
            FrameKind::Data(theirs) => {
                validate(op, theirs, hdr.payload_len, expect_len, self.rank, peer).map(|()| true)
            }
            kind @ (FrameKind::Query { .. }
            | FrameKind::Reply { .. }
            | FrameKind::Copied { .. }
            | FrameKind::Confirmed { .. }) => {
                self.on_control(peer, kind);
                Ok(false)
            }
            FrameKind::Remote(theirs) => {
                validate(op, theirs, expect_len as u32, expect_len, self.rank, peer)?;
                Err(Error::Protocol {
                    peer,
                    detail: format!("data of {op} #{} offered in place where frames were expected", op.seq),
                })
            }
        }
    }

    /// Consumes the abort frame whose header `hdr` was peeked on `p`'s link; returns its error.
    pub(super) fn take_abort(&mut self, p: usize, hdr: &FrameHeader, op: &OpDesc) -> Error {
        match self.consume(p, HEADER_LEN, op) {
            Ok(()) => self.abort_reason(p, hdr),
            Err(e) => e,
        }
    }

    /// Reads the message of the abort frame whose header `hdr` was read; returns its error.
    pub(super) fn abort_reason(&mut self, p: usize, hdr: &FrameHeader) -> Error {
        let mut reason = [0u8; MAX_REASON];
        let len = (hdr.payload_len as usize).min(MAX_REASON);
        self.read_exact_briefly(p, &mut reason[..len]);
        abort_error(p, hdr, &reason[..len])
    }

    /// Acts on a header-only control frame: a wait query or reply, or a peer-copy answer.
    pub(super) fn on_control(&mut self, p: usize, kind: &FrameKind) {
        match kind {
            FrameKind::Copied { .. } | FrameKind::Confirmed { .. } => self.on_copy_frame(p, kind),
            _ => self.on_wait_frame(p, kind),
        }
    }

    /// Starts (or keeps) the bookkeeping of the wait chase for operation `seq`.
    pub(super) fn begin_op(&mut self, seq: u64) {
        if self.chase_seq != Some(seq) {
            self.chase_seq = Some(seq);
            self.replies.iter_mut().for_each(|r| *r = None);
            self.asked.iter_mut().for_each(|a| *a = false);
        }
    }

    /// Sends a header-only control frame if the link is between frames (best effort).
    pub(super) fn send_control(&mut self, p: usize, kind: FrameKind) {
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
    pub(super) fn ask(&mut self, p: usize, seq: u64) {
        if p != self.rank && !self.asked[p] {
            self.asked[p] = true;
            self.send_control(p, FrameKind::Query { seq });
        }
    }

    /// The rank to blame, following the answers from each of `waited` (the ranks this one
    /// waits on): the first chain that ends in a rank that was asked and never answered (it
    /// stalled), or that answered it waits on nobody (it is not in an operation: it is what
    /// everyone waits for). Without such evidence, the first rank waited on.
    pub(super) fn culprit(&self, waited: impl Iterator<Item = usize>) -> Option<usize> {
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
    pub(super) fn on_wait_frame(&mut self, from: usize, kind: &FrameKind) {
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
                // A rank outside the world (a peer built differently, or corrupt bytes) is
                // taken as waiting on nobody, so the chase ends at the rank that sent it
                // instead of indexing past its tables.
                let waits_on = waits_on.filter(|&y| y < self.links.len());
                self.replies[from] = Some(waits_on);
                if let Some(y) = waits_on.filter(|&y| y != self.rank) {
                    self.ask(y, seq);
                }
            }
            _ => {}
        }
    }

    /// Sleeps in `poll(2)` (or spins) until one of the given links may progress (`out`
    /// writable, one of `inp` readable) or a watched peer sends something; then looks at the
    /// watched peers for aborts.
    pub(super) fn wait_links(
        &mut self,
        op: &OpDesc,
        out: Option<usize>,
        inp: [Option<usize>; 2],
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
        for p in inp.into_iter().flatten() {
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

    /// The idle step of a stream that sends to `to` (`sending`: frames not yet all written)
    /// and waits to hear from the ranks in `awaited` (its sender; the receiver of data it
    /// offered in place, until that copied it), when a pass moved nothing: looks for aborts
    /// once (`watch_checked`), fails past the deadline naming the peer to blame, asks silent
    /// peers what they wait for, and returns when to wake up next.
    pub(super) fn pair_idle(
        &mut self,
        op: &OpDesc,
        deadline: &Deadline,
        to: usize,
        sending: bool,
        awaited: [Option<usize>; 2],
        watch_checked: &mut bool,
    ) -> Result<Instant> {
        self.idle_since.get_or_insert_with(Instant::now);
        if !*watch_checked {
            *watch_checked = true;
            if self.check_watched(op)? {
                // An answer the sending half waits for was just taken off its link: the
                // socket is empty now, so waiting on it would sleep through the answer.
                return Ok(Instant::now());
            }
        }
        let now = Instant::now();
        if sending && now >= send_blame_at(deadline) {
            return Err(self.prefer_abort(op, deadline.timeout_error(to, op), Duration::ZERO));
        }
        let first = awaited.iter().flatten().next().copied();
        self.waiting_on = if sending { Some(to) } else { first };
        if !sending && now >= suspect_at(deadline) {
            for p in awaited.into_iter().flatten() {
                self.ask(p, op.seq);
            }
        }
        if now >= deadline.at {
            let peer = self.culprit(awaited.into_iter().flatten());
            let err = deadline.timeout_error(peer.unwrap_or(to), op);
            return Err(self.prefer_abort(op, err, Duration::ZERO));
        }
        Ok(if sending {
            send_blame_at(deadline)
        } else if awaited.into_iter().flatten().any(|p| !self.asked[p]) {
            suspect_at(deadline)
        } else {
            deadline.at
        })
    }

    /// Discards `len` bytes already known to be readable.
    pub(super) fn consume(&mut self, p: usize, len: usize, op: &OpDesc) -> Result<()> {
        let mut sink = [0u8; HEADER_LEN];
        self.link(p)
            .stream
            .read_exact(&mut sink[..len])
            .map_err(|e| Self::lost(p, op, e))
    }

    /// Best-effort read of an abort message (up to one second).
    pub(super) fn read_exact_briefly(&mut self, p: usize, buf: &mut [u8]) {
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
    pub(super) fn prefer_abort(&mut self, op: &OpDesc, err: Error, window: Duration) -> Error {
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

    pub(super) fn write_all_briefly(&mut self, p: usize, data: &[u8], until: Instant) -> bool {
        self.write_all_briefly_on(p, 0, data, until)
    }

    /// Like [`Self::write_all_briefly`] on connection `c` to `p`.
    pub(super) fn write_all_briefly_on(
        &mut self,
        p: usize,
        c: usize,
        mut data: &[u8],
        until: Instant,
    ) -> bool {
        let whole = data.len();
        while !data.is_empty() {
            match send_nosignal(self.link_c(p, c).fd, data) {
                Ok(k) => data = &data[k..],
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    if Instant::now() >= until {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(_) => break,
            }
        }
        if !data.is_empty() && data.len() < whole {
            // Part of the frame went out: an abort must first pad the rest, or the peer
            // would read the abort's header as the remainder of this frame.
            self.link_c(p, c).send_owed += data.len();
        }
        data.is_empty()
    }
}

/// When a rank whose data a peer does not drain gives up and blames that peer: before the
/// deadline, so that its abort (naming the peer that stopped reading, the strongest evidence
/// of a stalled rank) reaches the ranks that are only waiting to receive before they time out
/// and blame their own, innocent, neighbour.
pub(super) fn send_blame_at(deadline: &Deadline) -> Instant {
    deadline.at - deadline.timeout / 5
}

/// When a rank that only waits to receive starts asking whom its peer waits on.
pub(super) fn suspect_at(deadline: &Deadline) -> Instant {
    deadline.at - deadline.timeout / 4
}

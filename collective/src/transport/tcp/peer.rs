//! Peer copies: a rank on the same host as its peer reads a large payload straight out of the
//! sender's memory with `process_vm_readv(2)` — one copy per byte, where TCP makes two (into
//! the kernel's socket buffers and out again) plus the protocol work around them.
//!
//! The socket still carries the operation's frames, so every check of the TCP path holds:
//! 1. the sender announces its buffer in a [`FrameKind::Remote`] frame (the operation's
//!    header, validated like a data frame, and the buffer's address and length);
//! 2. the receiver copies it frame by frame, handing each frame on as it arrives, and answers
//!    [`FrameKind::Copied`];
//! 3. the sender, which has kept the buffer unchanged (it is still inside the call), answers
//!    [`FrameKind::Confirmed`]; only then does the receiver's copy stand.
//!
//! A sender that fails mid-way never confirms, so a receiver cannot finish with data read
//! from a buffer its owner had already given up; a sender whose process dies makes the copy
//! fail, which names it like a closed connection does.

use super::sys::{peek, random_bytes, read_peer};
use super::progress::Side;
use super::{Link, TcpTransport};
use crate::error::{Error, Result};
use crate::frame::{validate, FrameHeader, FrameKind, OpDesc, HEADER_LEN};
use crate::transport::Deadline;
use std::io::{Read, Write};
use std::time::Instant;

/// Payloads at least this large move by peer copy where the pair allows it; smaller ones are
/// cheaper inline (the announcement and the two answers cost about two round trips).
pub(super) const PEER_COPY_MIN: usize = 1 << 20;

/// Length of the announcement's payload: address and length, little-endian u64 each.
const ANNOUNCE_LEN: usize = 16;

/// Finds out, for every link, whether each side can read the other's memory: both send their
/// process id and the address and value of a random cookie, each tries to read the other's
/// cookie, and both report. A pair uses peer copies only if both reads worked (`enabled`
/// false: this rank declines, and so the pair does not). Runs on blocking sockets right after
/// the hellos; every rank writes before it reads, so no order of ranks can deadlock.
pub(super) fn probe(rank: usize, links: &mut [Option<Link>], enabled: bool) -> Result<()> {
    let cookie: [u8; 16] = random_bytes();
    let mut mine = [0u8; 28];
    if enabled {
        mine[..4].copy_from_slice(&std::process::id().to_le_bytes());
        mine[4..12].copy_from_slice(&(cookie.as_ptr() as usize as u64).to_le_bytes());
        mine[12..].copy_from_slice(&cookie);
    }
    // Names the peer an exchange failed with (it may have died, or still be connecting to
    // a rank that died).
    let failed = |p: usize, e: std::io::Error| {
        Error::Rendezvous(format!("rank {rank}: the connection check with rank {p} failed: {e}"))
    };
    for (p, l) in links.iter_mut().enumerate() {
        let Some(l) = l else { continue };
        l.stream.write_all(&mine).map_err(|e| failed(p, e))?;
    }
    let mut readable = vec![None; links.len()];
    for (p, l) in links.iter_mut().enumerate() {
        let Some(l) = l else { continue };
        let mut theirs = [0u8; 28];
        l.stream.read_exact(&mut theirs).map_err(|e| failed(p, e))?;
        let pid = u32::from_le_bytes(theirs[..4].try_into().expect("4 bytes"));
        let addr = u64::from_le_bytes(theirs[4..12].try_into().expect("8 bytes"));
        let mut seen = [0u8; 16];
        let ok = enabled
            && pid != 0
            && i32::try_from(pid).is_ok_and(|pid| read_peer(pid, addr, &mut seen).is_ok())
            && seen == theirs[12..];
        l.stream.write_all(&[u8::from(ok)]).map_err(|e| failed(p, e))?;
        readable[p] = ok.then_some(pid as i32);
    }
    for (p, l) in links.iter_mut().enumerate() {
        let Some(l) = l else { continue };
        let mut answer = [0u8; 1];
        l.stream.read_exact(&mut answer).map_err(|e| failed(p, e))?;
        l.peer_pid = readable[p].filter(|_| answer[0] == 1);
        if enabled && l.peer_pid.is_none() {
            tracing::debug!("rank {rank}: no peer copies with rank {p} (not on this host, or not permitted)");
        }
    }
    std::hint::black_box(&cookie);
    Ok(())
}

/// The sending half of a stream whose receiver copies the data in place.
pub(super) struct PeerSend<'a> {
    pub(super) to: usize,
    buf: &'a [u8],
    stage: SendStage,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SendStage {
    Announce,
    AwaitCopied,
    Done,
}

/// The receiving half of a stream whose sender announced its buffer.
pub(super) struct PeerRecv<'a> {
    pub(super) from: usize,
    buf: &'a mut [u8],
    frame: usize,
    stage: RecvStage,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RecvStage {
    AwaitAnnounce,
    Copy { addr: u64, at: usize },
    /// Copied, and the answer waits for the link to be between frames (this rank may be
    /// streaming frames of its own to the same peer).
    Answer,
    AwaitConfirmed,
    Done,
}

impl Side for PeerSend<'_> {
    fn done(&self) -> bool {
        self.stage == SendStage::Done
    }
    fn peer(&self) -> usize {
        self.to
    }
}

impl Side for PeerRecv<'_> {
    fn done(&self) -> bool {
        self.stage == RecvStage::Done
    }
    fn peer(&self) -> usize {
        self.from
    }
}

impl<'a> PeerSend<'a> {
    pub(super) fn new(to: usize, buf: &'a [u8]) -> Self {
        PeerSend {
            to,
            buf,
            stage: SendStage::Announce,
        }
    }

    /// Moves on as far as it can without waiting; `true` if anything happened. `read_to`:
    /// this half may read control frames from the receiver's link (no frame of it is being
    /// read by the stream's receiving half).
    pub(super) fn progress(
        &mut self,
        t: &mut TcpTransport,
        op: &OpDesc,
        deadline: &Deadline,
        read_to: bool,
    ) -> Result<bool> {
        match self.stage {
            SendStage::Announce => {
                let hdr = FrameHeader {
                    kind: FrameKind::Remote(*op),
                    payload_len: ANNOUNCE_LEN as u32,
                }
                .encode();
                let mut frame = [0u8; HEADER_LEN + ANNOUNCE_LEN];
                frame[..HEADER_LEN].copy_from_slice(&hdr);
                frame[HEADER_LEN..HEADER_LEN + 8]
                    .copy_from_slice(&(self.buf.as_ptr() as usize as u64).to_le_bytes());
                frame[HEADER_LEN + 8..].copy_from_slice(&(self.buf.len() as u64).to_le_bytes());
                t.send_whole(self.to, &frame, op, deadline)?;
                self.stage = SendStage::AwaitCopied;
                Ok(true)
            }
            SendStage::AwaitCopied => {
                let mut moved = false;
                if t.copied[self.to] != Some(op.seq) && read_to {
                    moved = t.read_controls(self.to, op, false)?.is_some();
                }
                if t.copied[self.to] != Some(op.seq) {
                    return Ok(moved);
                }
                t.copied[self.to] = None;
                let confirm = FrameHeader {
                    kind: FrameKind::Confirmed { seq: op.seq },
                    payload_len: 0,
                }
                .encode();
                t.send_whole(self.to, &confirm, op, deadline)?;
                self.stage = SendStage::Done;
                Ok(true)
            }
            SendStage::Done => Ok(false),
        }
    }

    /// Waiting on the receiver (it has not copied yet).
    pub(super) fn blocked(&self) -> bool {
        self.stage == SendStage::AwaitCopied
    }
}

impl<'a> PeerRecv<'a> {
    pub(super) fn new(from: usize, buf: &'a mut [u8], frame: usize) -> Self {
        PeerRecv {
            from,
            buf,
            frame,
            stage: RecvStage::AwaitAnnounce,
        }
    }

    /// Waiting for a frame from the sender (its announcement or its confirmation).
    pub(super) fn waiting(&self) -> bool {
        matches!(self.stage, RecvStage::AwaitAnnounce | RecvStage::AwaitConfirmed)
    }

    /// Moves on as far as it can without waiting, copying at most one frame per call (so the
    /// stream's other half keeps moving); `true` if anything happened.
    pub(super) fn progress(
        &mut self,
        t: &mut TcpTransport,
        op: &OpDesc,
        deadline: &Deadline,
        on_frame: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<bool> {
        let from = self.from;
        match self.stage {
            RecvStage::AwaitAnnounce => {
                let Some(addr) = t.read_controls(from, op, true)?.flatten() else {
                    return Ok(false);
                };
                let (addr, len) = addr;
                if len != self.buf.len() as u64 {
                    return Err(t.prefer_abort(
                        op,
                        Error::Protocol {
                            peer: from,
                            detail: format!(
                                "{len} bytes offered during {op} #{}, expected {}",
                                op.seq,
                                self.buf.len()
                            ),
                        },
                        std::time::Duration::ZERO,
                    ));
                }
                self.stage = RecvStage::Copy { addr, at: 0 };
                Ok(true)
            }
            RecvStage::Copy { addr, at } => {
                let end = (at + self.frame).min(self.buf.len());
                let pid = t.link(from).peer_pid.expect("peer copies only with a probed peer");
                if let Err(e) = read_peer(pid, addr + at as u64, &mut self.buf[at..end]) {
                    // A sender that gave up because of another rank's failure has unmapped
                    // or reused its buffer, and its abort frame, naming that rank, is next
                    // on its link (which is between frames here): look there too.
                    t.watch[from] = true;
                    let err = TcpTransport::lost(from, op, format!("reading its memory failed: {e}"));
                    return Err(t.prefer_abort(op, err, std::time::Duration::from_millis(100)));
                }
                t.peer_copied += (end - at) as u64;
                on_frame(at, &mut self.buf[at..end]);
                self.stage = if end < self.buf.len() {
                    RecvStage::Copy { addr, at: end }
                } else {
                    RecvStage::Answer
                };
                Ok(true)
            }
            RecvStage::Answer => {
                if t.link(from).send_owed > 0 {
                    return Ok(false);
                }
                let copied = FrameHeader {
                    kind: FrameKind::Copied { seq: op.seq },
                    payload_len: 0,
                }
                .encode();
                t.send_whole(from, &copied, op, deadline)?;
                self.stage = RecvStage::AwaitConfirmed;
                Ok(true)
            }
            RecvStage::AwaitConfirmed => {
                let mut moved = false;
                if t.confirmed[from] != Some(op.seq) {
                    moved = t.read_controls(from, op, false)?.is_some();
                }
                if t.confirmed[from] != Some(op.seq) {
                    return Ok(moved);
                }
                t.confirmed[from] = None;
                // Between frames again: watch it for aborts and wait queries.
                t.watch[from] = true;
                self.stage = RecvStage::Done;
                Ok(true)
            }
            RecvStage::Done => Ok(false),
        }
    }
}

impl TcpTransport {
    /// Whether a payload of `len` bytes to or from `peer` moves by peer copy. Both ends of a
    /// pair decide alike: the probe's result is the same on both, and so is the length.
    pub(super) fn peer_copy(&self, peer: usize, len: usize) -> bool {
        len >= PEER_COPY_MIN && self.links[peer].as_ref().is_some_and(|l| l.peer_pid.is_some())
    }

    /// Records a [`FrameKind::Copied`] or [`FrameKind::Confirmed`] frame from `peer`.
    pub(super) fn on_copy_frame(&mut self, peer: usize, kind: &FrameKind) {
        match *kind {
            FrameKind::Copied { seq } => self.copied[peer] = Some(seq),
            FrameKind::Confirmed { seq } => self.confirmed[peer] = Some(seq),
            _ => {}
        }
    }

    /// Reads the complete header-only frames waiting on `peer`'s link (never part of one):
    /// records answers, handles wait queries, turns an abort into its error. Stops before a
    /// data frame. An announcement is consumed when `announce` is set: `Some(Some((addr,
    /// len)))`, after validating it against `op`. `Some(None)`: something was consumed;
    /// `None`: nothing.
    pub(super) fn read_controls(
        &mut self,
        peer: usize,
        op: &OpDesc,
        announce: bool,
    ) -> Result<Option<Option<(u64, u64)>>> {
        let mut moved = None;
        loop {
            let fd = self.link(peer).fd;
            let mut raw = [0u8; HEADER_LEN];
            let got = peek(fd, &mut raw);
            if got == 0 && moved.is_some() {
                // The frames before the end are acted on first: a peer that answered (its
                // last `Confirmed`, say) and then finished and exited is lost only if
                // something more is needed from it, which the next look finds out.
                return Ok(moved);
            }
            if got == 0 {
                let err = Self::lost(peer, op, "connection closed by the peer");
                return Err(self.prefer_abort(op, err, std::time::Duration::from_millis(100)));
            }
            if got != HEADER_LEN as isize {
                return Ok(moved);
            }
            let hdr = FrameHeader::decode(&raw).map_err(|detail| Error::Protocol { peer, detail })?;
            match &hdr.kind {
                FrameKind::Abort { .. } => return Err(self.take_abort(peer, &hdr, op)),
                kind @ (FrameKind::Query { .. }
                | FrameKind::Reply { .. }
                | FrameKind::Copied { .. }
                | FrameKind::Confirmed { .. }) => {
                    self.consume(peer, HEADER_LEN, op)?;
                    self.on_control(peer, kind);
                }
                FrameKind::Remote(theirs) if announce => {
                    validate(op, theirs, ANNOUNCE_LEN as u32, hdr.payload_len as usize, self.rank, peer)
                        .map_err(|e| self.prefer_abort(op, e, std::time::Duration::ZERO))?;
                    // Taken only once whole (it is written in one piece, so it arrives so).
                    let mut whole = [0u8; HEADER_LEN + ANNOUNCE_LEN];
                    if peek(fd, &mut whole) != whole.len() as isize {
                        return Ok(moved);
                    }
                    self.link(peer).stream.read_exact(&mut whole).map_err(|e| Self::lost(peer, op, e))?;
                    let word = |i: usize| u64::from_le_bytes(whole[HEADER_LEN + i..HEADER_LEN + i + 8].try_into().expect("8 bytes"));
                    return Ok(Some(Some((word(0), word(8)))));
                }
                FrameKind::Data(theirs) if announce => {
                    // The sender chose frames: only a different call can make it do that.
                    validate(op, theirs, 0, 0, self.rank, peer)
                        .map_err(|e| self.prefer_abort(op, e, std::time::Duration::ZERO))?;
                    return Err(Error::Protocol {
                        peer,
                        detail: format!("frames of {op} #{} where its data was to be offered in place", op.seq),
                    });
                }
                // Data of the stream's receiving half or of a later operation.
                FrameKind::Remote(_) | FrameKind::Data(_) => return Ok(moved),
            }
            moved = Some(None);
        }
    }

    /// Writes a small frame whole (the link carries no frame in progress), waiting for room
    /// at most until the deadline.
    pub(super) fn send_whole(&mut self, p: usize, frame: &[u8], op: &OpDesc, deadline: &Deadline) -> Result<()> {
        if self.write_all_briefly(p, frame, deadline.at.max(Instant::now())) {
            return Ok(());
        }
        let err = Self::lost(p, op, "could not write to it");
        Err(self.prefer_abort(op, err, std::time::Duration::from_millis(100)))
    }
}

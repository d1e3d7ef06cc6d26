//! Moving frames between ranks: the [`Transport`] trait and its implementations.
//!
//! A transport knows nothing about algorithms: it carries out one *exchange* at a time — a
//! set of frames to send and a set to receive, all of the same operation, progressed
//! concurrently until all are done or the deadline passes. Receiving validates every header
//! against the caller's operation (see [`crate::frame`]).

pub mod mem;
pub mod tcp;

use crate::error::{Error, Result};
use crate::frame::{FrameHeader, FrameKind, OpDesc};
use std::time::{Duration, Instant};

/// One frame to send: `payload` goes to rank `peer`.
#[derive(Debug)]
pub struct SendOp<'a> {
    /// Destination rank.
    pub peer: usize,
    /// Payload bytes (the header is added by the transport).
    pub payload: &'a [u8],
}

/// One frame to receive from rank `peer`; its payload must be exactly `buf.len()` bytes.
#[derive(Debug)]
pub struct RecvOp<'a> {
    /// Source rank.
    pub peer: usize,
    /// Where the payload goes.
    pub buf: &'a mut [u8],
}

/// When an operation must be over, and the timeout it came from (for messages).
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    /// The instant after which waiting is an error.
    pub at: Instant,
    /// The operation's timeout.
    pub timeout: Duration,
}

impl Deadline {
    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    /// The error for having waited on `peer` past this deadline.
    pub fn timeout_error(&self, peer: usize, op: &OpDesc) -> Error {
        Error::Timeout {
            peer,
            seq: op.seq,
            op: op.to_string(),
            timeout_ms: self.timeout.as_millis() as u64,
        }
    }
}

/// Frame-level connectivity between the ranks of one communicator.
///
/// Contract: within one [`Transport::exchange`] there is at most one send and at most one
/// receive per peer; frames between two ranks arrive in the order they were sent.
pub trait Transport: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Sends every frame of `sends` and receives every frame of `recvs`, all data frames of
    /// operation `op`, concurrently; returns when all are complete. Errors: a header that
    /// differs from `op` ([`Error::Mismatch`]), an abort from a peer, a lost peer, or the
    /// deadline ([`Error::Timeout`] naming the peer still awaited).
    fn exchange(
        &mut self,
        op: &OpDesc,
        sends: &[SendOp<'_>],
        recvs: &mut [RecvOp<'_>],
        deadline: Deadline,
    ) -> Result<()>;
    /// Streams `send.1` to rank `send.0` while receiving `recv.1` from rank `recv.0`, both cut
    /// into frames of at most `frame` bytes (at least one frame, possibly empty), and calls
    /// `on_frame(offset, bytes)` on each received frame as soon as it is complete, in order,
    /// so that the caller can reduce it while later frames are still in flight. Sender and
    /// receiver must agree on the lengths (they are validated per frame).
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
        let ns = send
            .as_ref()
            .map_or(0, |(_, b)| frame_count(b.len(), frame));
        let (from, rbuf) = match recv {
            Some((p, b)) => (p, b),
            None => (usize::MAX, &mut [][..]),
        };
        let nr = if from == usize::MAX {
            0
        } else {
            frame_count(rbuf.len(), frame)
        };
        for k in 0..ns.max(nr) {
            let sends: Option<SendOp<'_>> = send.filter(|_| k < ns).map(|(p, b)| SendOp {
                peer: p,
                payload: &b[frame_range(b.len(), frame, k)],
            });
            let range = frame_range(rbuf.len(), frame, k);
            {
                let mut recvs: Option<RecvOp<'_>> = (k < nr).then(|| RecvOp {
                    peer: from,
                    buf: &mut rbuf[range.clone()],
                });
                self.exchange(op, sends.as_slice(), recvs.as_mut_slice(), deadline)?;
            }
            if k < nr {
                on_frame(range.start, &mut rbuf[range]);
            }
        }
        Ok(())
    }
    /// Payload bytes received by reading peers' memory directly rather than through the
    /// transport's connections (0 for transports without that path).
    fn peer_copied_bytes(&self) -> u64 {
        0
    }
    /// Tells every peer, best effort and briefly, that this rank gives up operation `seq`,
    /// blaming `culprit`; afterwards the transport is not used for data again.
    fn abort(&mut self, seq: u64, culprit: Option<usize>, reason: &str);
}

/// Number of frames a payload of `len` bytes is cut into (at least one).
pub fn frame_count(len: usize, frame: usize) -> usize {
    len.div_ceil(frame.max(1)).max(1)
}

/// Byte range of frame `k` of a payload of `len` bytes.
pub fn frame_range(len: usize, frame: usize, k: usize) -> std::ops::Range<usize> {
    let start = (k * frame).min(len);
    start..(start + frame).min(len)
}

/// Converts a received abort frame into the error it stands for.
pub(crate) fn abort_error(from: usize, hdr: &FrameHeader, reason: &[u8]) -> Error {
    let (seq, culprit) = match hdr.kind {
        FrameKind::Abort { seq, culprit } => (seq, culprit),
        FrameKind::Data(d) | FrameKind::Remote(d) => (d.seq, None),
        FrameKind::Query { seq }
        | FrameKind::Reply { seq, .. }
        | FrameKind::Copied { seq }
        | FrameKind::Confirmed { seq } => (seq, None),
    };
    Error::PeerAborted {
        from,
        culprit,
        seq,
        reason: String::from_utf8_lossy(reason).into_owned(),
    }
}

/// Longest abort message sent; longer ones are cut.
pub(crate) const MAX_REASON: usize = 4096;

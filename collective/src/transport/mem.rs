//! An in-memory transport: byte pipes between threads of one process, for testing the
//! algorithms for any number of ranks without sockets.

use super::{abort_error, Deadline, RecvOp, SendOp, Transport, MAX_REASON};
use crate::error::{Error, Result};
use crate::frame::{validate, FrameHeader, FrameKind, OpDesc, HEADER_LEN};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// One direction between two ranks: an unbounded byte queue (sending never blocks).
#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
    ready: Condvar,
}

#[derive(Default)]
struct PipeState {
    bytes: VecDeque<u8>,
    /// The writer was dropped: no more bytes will come.
    closed: bool,
}

/// A rank's end of an in-memory network made by [`network`].
pub struct MemTransport {
    rank: usize,
    /// `outgoing[p]`: pipe to rank `p` (unused for `p == rank`).
    outgoing: Vec<Arc<Pipe>>,
    /// `incoming[p]`: pipe from rank `p`.
    incoming: Vec<Arc<Pipe>>,
}

/// Creates `n` connected transports, one per rank, to be moved into `n` threads.
pub fn network(n: usize) -> Vec<MemTransport> {
    let pipes: Vec<Vec<Arc<Pipe>>> = (0..n)
        .map(|_| (0..n).map(|_| Arc::default()).collect())
        .collect();
    (0..n)
        .map(|r| MemTransport {
            rank: r,
            outgoing: (0..n).map(|p| pipes[r][p].clone()).collect(),
            incoming: (0..n).map(|p| pipes[p][r].clone()).collect(),
        })
        .collect()
}

impl MemTransport {
    fn push(&self, peer: usize, hdr: &FrameHeader, payload: &[u8]) {
        let pipe = &self.outgoing[peer];
        let mut st = pipe.state.lock().expect("pipe lock");
        st.bytes.extend(hdr.encode());
        st.bytes.extend(payload);
        pipe.ready.notify_all();
    }

    /// Reads exactly `buf.len()` bytes from `peer`, waiting until the deadline.
    fn pull(&self, peer: usize, buf: &mut [u8], op: &OpDesc, deadline: Deadline) -> Result<()> {
        let pipe = &self.incoming[peer];
        let mut st = pipe.state.lock().expect("pipe lock");
        while st.bytes.len() < buf.len() {
            if st.closed {
                return Err(Error::PeerLost {
                    peer,
                    seq: op.seq,
                    op: op.to_string(),
                    detail: "connection closed".into(),
                });
            }
            let now = Instant::now();
            if now >= deadline.at {
                return Err(deadline.timeout_error(peer, op));
            }
            st = pipe
                .ready
                .wait_timeout(st, deadline.at - now)
                .expect("pipe lock")
                .0;
        }
        let len = buf.len();
        for (dst, src) in buf.iter_mut().zip(st.bytes.drain(..len)) {
            *dst = src;
        }
        Ok(())
    }
}

impl Transport for MemTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.outgoing.len()
    }

    fn exchange(
        &mut self,
        op: &OpDesc,
        sends: &[SendOp<'_>],
        recvs: &mut [RecvOp<'_>],
        deadline: Deadline,
    ) -> Result<()> {
        for s in sends {
            let hdr = FrameHeader {
                kind: FrameKind::Data(*op),
                payload_len: s.payload.len() as u32,
            };
            self.push(s.peer, &hdr, s.payload);
        }
        for r in recvs.iter_mut() {
            let mut raw = [0u8; HEADER_LEN];
            self.pull(r.peer, &mut raw, op, deadline)?;
            let hdr = FrameHeader::decode(&raw).map_err(|detail| Error::Protocol {
                peer: r.peer,
                detail,
            })?;
            match &hdr.kind {
                FrameKind::Abort { .. } => {
                    let mut reason = vec![0u8; (hdr.payload_len as usize).min(MAX_REASON)];
                    self.pull(r.peer, &mut reason, op, deadline)?;
                    return Err(abort_error(r.peer, &hdr, &reason));
                }
                FrameKind::Data(theirs) => {
                    validate(op, theirs, hdr.payload_len, r.buf.len(), self.rank, r.peer)?
                }
                other => {
                    return Err(Error::Protocol {
                        peer: r.peer,
                        detail: format!("unexpected {other:?} frame on the in-memory transport"),
                    })
                }
            }
            self.pull(r.peer, r.buf, op, deadline)?;
        }
        Ok(())
    }

    fn abort(&mut self, seq: u64, culprit: Option<usize>, reason: &str) {
        let reason = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
        let hdr = FrameHeader {
            kind: FrameKind::Abort { seq, culprit },
            payload_len: reason.len() as u32,
        };
        for p in (0..self.outgoing.len()).filter(|&p| p != self.rank) {
            self.push(p, &hdr, reason);
        }
    }
}

impl Drop for MemTransport {
    fn drop(&mut self) {
        for pipe in &self.outgoing {
            pipe.state.lock().expect("pipe lock").closed = true;
            pipe.ready.notify_all();
        }
    }
}

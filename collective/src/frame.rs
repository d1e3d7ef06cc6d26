//! Frame headers of the data plane: encoding, decoding and validation (no I/O).
//!
//! Every frame starts with a fixed 32-byte header that carries the operation's sequence
//! number, kind, dtype, reduction operator, element count and root, and the payload length.
//! A receiver compares the header with the operation it is running itself; any difference
//! is an [`Error::Mismatch`] that says what differed, never a hang or wrong data.

use crate::dtype::{DType, ReduceOp};
use crate::error::Error;
use std::fmt;

/// Size of an encoded [`FrameHeader`] in bytes.
pub const HEADER_LEN: usize = 32;
const MAGIC: [u8; 4] = *b"PSC1";
/// `root` value of an abort frame that blames no particular rank.
const NO_CULPRIT: u32 = u32::MAX;

/// The collective operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Reduce every rank's buffer and give every rank the result.
    AllReduce,
    /// Copy the root's buffer to every rank.
    Broadcast,
    /// Concatenate every rank's buffer, in rank order, on every rank.
    AllGather,
    /// Reduce, then give rank `r` the `r`-th block of the result.
    ReduceScatter,
    /// Wait until every rank has arrived.
    Barrier,
}

impl OpKind {
    const fn code(self) -> u8 {
        match self {
            OpKind::AllReduce => 1,
            OpKind::Broadcast => 2,
            OpKind::AllGather => 3,
            OpKind::ReduceScatter => 4,
            OpKind::Barrier => 5,
        }
    }

    fn from_code(c: u8) -> Option<OpKind> {
        [
            OpKind::AllReduce,
            OpKind::Broadcast,
            OpKind::AllGather,
            OpKind::ReduceScatter,
            OpKind::Barrier,
        ]
        .into_iter()
        .find(|k| k.code() == c)
    }

    /// Lower-case name, as in messages.
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "allreduce",
            OpKind::Broadcast => "broadcast",
            OpKind::AllGather => "allgather",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::Barrier => "barrier",
        }
    }
}

/// One rank's call of a collective: what every peer's call must equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpDesc {
    /// Position of the call in the communicator's sequence of operations (from 0).
    pub seq: u64,
    /// Which collective.
    pub kind: OpKind,
    /// Element type (barrier: ignored, always `F32`).
    pub dtype: DType,
    /// Reduction operator of allreduce and reduce_scatter.
    pub reduce: Option<ReduceOp>,
    /// Elements per rank as the caller passed them (allgather / reduce_scatter: per block).
    pub count: u64,
    /// Root rank of broadcast (0 otherwise).
    pub root: u32,
}

impl OpDesc {
    /// A barrier at `seq`.
    pub fn barrier(seq: u64) -> OpDesc {
        OpDesc {
            seq,
            kind: OpKind::Barrier,
            dtype: DType::F32,
            reduce: None,
            count: 0,
            root: 0,
        }
    }
}

impl fmt::Display for OpDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (k, d, n) = (self.kind.name(), self.dtype, self.count);
        match (self.kind, self.reduce) {
            (OpKind::Barrier, _) => write!(f, "barrier"),
            (OpKind::Broadcast, _) => write!(f, "{k}({d}, {n} elements, root {})", self.root),
            (OpKind::AllGather, _) => write!(f, "{k}({d}, {n} elements per rank)"),
            (OpKind::ReduceScatter, Some(op)) => write!(f, "{k}({d}, {op}, {n} elements per rank)"),
            (_, Some(op)) => write!(f, "{k}({d}, {op}, {n} elements)"),
            (_, None) => write!(f, "{k}({d}, {n} elements)"),
        }
    }
}

/// What a frame carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Part of an operation's data (possibly empty: an announcement).
    Data(OpDesc),
    /// "Whom are you waiting on in operation `seq`?" — sent by a rank about to time out, to
    /// find the rank at the end of a chain of waits (a stalled rank does not answer).
    Query {
        /// The operation the asker is stuck in.
        seq: u64,
    },
    /// Answer to a [`FrameKind::Query`]: the rank the sender is waiting on (or blames).
    Reply {
        /// The operation the answer is about.
        seq: u64,
        /// The rank the sender waits on, if any.
        waits_on: Option<usize>,
    },
    /// The operation's data for this receiver is not in the frame but in the sender's memory
    /// on the same host, to be read in place (see `transport::tcp` peer copies); the payload
    /// is its address and length (two little-endian u64).
    Remote(OpDesc),
    /// The receiver of a [`FrameKind::Remote`] announcement of operation `seq` has copied the
    /// data: the sender may reuse its buffer once it has answered [`FrameKind::Confirmed`].
    Copied {
        /// The operation whose data was copied.
        seq: u64,
    },
    /// The sender of a [`FrameKind::Remote`] announcement of operation `seq` kept its buffer
    /// unchanged until [`FrameKind::Copied`] arrived: the receiver's copy stands.
    Confirmed {
        /// The operation whose data was copied.
        seq: u64,
    },
    /// The sender failed operation `seq` and gives up; the payload is its error message.
    Abort {
        /// The failed operation.
        seq: u64,
        /// The rank the sender blames, if any.
        culprit: Option<usize>,
    },
}

/// A decoded frame header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Data or abort.
    pub kind: FrameKind,
    /// Bytes of payload that follow the header.
    pub payload_len: u32,
}

impl FrameHeader {
    /// Encodes the header into its fixed 32 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&MAGIC);
        match &self.kind {
            FrameKind::Data(d) | FrameKind::Remote(d) => {
                b[4] = if matches!(self.kind, FrameKind::Data(_)) { 1 } else { 5 };
                b[5] = d.kind.code();
                b[6] = d.dtype.code();
                b[7] = d.reduce.map_or(0, |o| o.code());
                b[8..16].copy_from_slice(&d.seq.to_le_bytes());
                b[16..24].copy_from_slice(&d.count.to_le_bytes());
                b[24..28].copy_from_slice(&d.root.to_le_bytes());
            }
            FrameKind::Query { seq } => {
                b[4] = 3;
                b[8..16].copy_from_slice(&seq.to_le_bytes());
            }
            FrameKind::Copied { seq } => {
                b[4] = 6;
                b[8..16].copy_from_slice(&seq.to_le_bytes());
            }
            FrameKind::Confirmed { seq } => {
                b[4] = 7;
                b[8..16].copy_from_slice(&seq.to_le_bytes());
            }
            FrameKind::Reply { seq, waits_on } => {
                b[4] = 4;
                b[8..16].copy_from_slice(&seq.to_le_bytes());
                let w = waits_on.map_or(NO_CULPRIT, |c| c as u32);
                b[24..28].copy_from_slice(&w.to_le_bytes());
            }
            FrameKind::Abort { seq, culprit } => {
                b[4] = 2;
                b[8..16].copy_from_slice(&seq.to_le_bytes());
                let c = culprit.map_or(NO_CULPRIT, |c| c as u32);
                b[24..28].copy_from_slice(&c.to_le_bytes());
            }
        }
        b[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Decodes a header; the error says what is malformed.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, String> {
        if b[..4] != MAGIC {
            return Err(format!(
                "bad frame magic {:02x?} (not a parasync peer, or a desynchronized stream)",
                &b[..4]
            ));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let payload_len = u32_at(28);
        let kind = match b[4] {
            1 | 5 => {
                let kind = OpKind::from_code(b[5])
                    .ok_or_else(|| format!("unknown operation code {}", b[5]))?;
                let dtype =
                    DType::from_code(b[6]).ok_or_else(|| format!("unknown dtype code {}", b[6]))?;
                let reduce = match b[7] {
                    0 => None,
                    c => Some(
                        ReduceOp::from_code(c).ok_or_else(|| format!("unknown reduce code {c}"))?,
                    ),
                };
                let desc = OpDesc {
                    seq: u64_at(8),
                    kind,
                    dtype,
                    reduce,
                    count: u64_at(16),
                    root: u32_at(24),
                };
                if b[4] == 1 {
                    FrameKind::Data(desc)
                } else {
                    FrameKind::Remote(desc)
                }
            }
            2 => {
                let c = u32_at(24);
                FrameKind::Abort {
                    seq: u64_at(8),
                    culprit: (c != NO_CULPRIT).then_some(c as usize),
                }
            }
            3 => FrameKind::Query { seq: u64_at(8) },
            6 => FrameKind::Copied { seq: u64_at(8) },
            7 => FrameKind::Confirmed { seq: u64_at(8) },
            4 => {
                let w = u32_at(24);
                FrameKind::Reply {
                    seq: u64_at(8),
                    waits_on: (w != NO_CULPRIT).then_some(w as usize),
                }
            }
            k => return Err(format!("unknown frame kind {k}")),
        };
        Ok(FrameHeader { kind, payload_len })
    }
}

/// Checks that a peer's data frame belongs to the same operation as this rank's call and has
/// the expected payload length. `me` and `peer` are ranks, for the message.
pub fn validate(
    mine: &OpDesc,
    theirs: &OpDesc,
    payload_len: u32,
    expect_len: usize,
    me: usize,
    peer: usize,
) -> Result<(), Error> {
    if mine != theirs {
        return Err(mismatch(mine, theirs, me, peer));
    }
    if payload_len as usize != expect_len {
        return Err(Error::Protocol {
            peer,
            detail: format!(
                "frame of {payload_len} bytes during {mine} #{}, expected {expect_len}",
                mine.seq
            ),
        });
    }
    Ok(())
}

/// Builds the error for two different calls, listing every field that differs.
pub fn mismatch(mine: &OpDesc, theirs: &OpDesc, me: usize, peer: usize) -> Error {
    let mut diffs = Vec::new();
    if mine.seq != theirs.seq {
        diffs.push(format!(
            "sequence number (#{} here, #{} on rank {peer}: a rank skipped or added a call)",
            mine.seq, theirs.seq
        ));
    }
    if mine.kind != theirs.kind {
        diffs.push("operation".to_string());
    }
    if mine.dtype != theirs.dtype && mine.kind != OpKind::Barrier && theirs.kind != OpKind::Barrier
    {
        diffs.push(format!("dtype ({} vs {})", mine.dtype, theirs.dtype));
    }
    if mine.reduce != theirs.reduce && mine.kind == theirs.kind {
        diffs.push("reduction operator".to_string());
    }
    if mine.count != theirs.count && mine.kind == theirs.kind {
        diffs.push(format!(
            "element count ({} vs {})",
            mine.count, theirs.count
        ));
    }
    if mine.root != theirs.root && mine.kind == theirs.kind {
        diffs.push(format!("root ({} vs {})", mine.root, theirs.root));
    }
    Error::Mismatch {
        seq: mine.seq,
        peer,
        detail: format!(
            "rank {me} called {mine} but rank {peer} called {theirs}; differs in {}",
            diffs.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ar(seq: u64, dtype: DType, count: u64) -> OpDesc {
        OpDesc {
            seq,
            kind: OpKind::AllReduce,
            dtype,
            reduce: Some(ReduceOp::Sum),
            count,
            root: 0,
        }
    }

    #[test]
    fn headers_round_trip() {
        let cases = [
            FrameHeader {
                kind: FrameKind::Data(ar(7, DType::Bf16, 1 << 40)),
                payload_len: 12,
            },
            FrameHeader {
                kind: FrameKind::Data(OpDesc::barrier(0)),
                payload_len: 0,
            },
            FrameHeader {
                kind: FrameKind::Data(OpDesc {
                    seq: 3,
                    kind: OpKind::Broadcast,
                    dtype: DType::I64,
                    reduce: None,
                    count: 5,
                    root: 3,
                }),
                payload_len: u32::MAX,
            },
            FrameHeader {
                kind: FrameKind::Abort {
                    seq: 9,
                    culprit: Some(2),
                },
                payload_len: 40,
            },
            FrameHeader {
                kind: FrameKind::Remote(ar(8, DType::F64, 1 << 33)),
                payload_len: 16,
            },
            FrameHeader {
                kind: FrameKind::Copied { seq: 11 },
                payload_len: 0,
            },
            FrameHeader {
                kind: FrameKind::Confirmed { seq: u64::MAX },
                payload_len: 0,
            },
            FrameHeader {
                kind: FrameKind::Abort {
                    seq: 9,
                    culprit: None,
                },
                payload_len: 0,
            },
            FrameHeader {
                kind: FrameKind::Query { seq: 4 },
                payload_len: 0,
            },
            FrameHeader {
                kind: FrameKind::Reply {
                    seq: 4,
                    waits_on: Some(3),
                },
                payload_len: 0,
            },
            FrameHeader {
                kind: FrameKind::Reply {
                    seq: 4,
                    waits_on: None,
                },
                payload_len: 0,
            },
        ];
        for h in cases {
            assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let mut b = FrameHeader {
            kind: FrameKind::Data(ar(1, DType::F32, 1)),
            payload_len: 4,
        }
        .encode();
        let mut bad_magic = b;
        bad_magic[0] = b'X';
        assert!(FrameHeader::decode(&bad_magic)
            .unwrap_err()
            .contains("magic"));
        b[6] = 99;
        assert!(FrameHeader::decode(&b).unwrap_err().contains("dtype"));
    }

    #[test]
    fn mismatches_name_what_differed() {
        let table: &[(OpDesc, &str)] = &[
            (ar(4, DType::F32, 99), "element count (100 vs 99)"),
            (ar(4, DType::Bf16, 100), "dtype (f32 vs bf16)"),
            (ar(5, DType::F32, 100), "sequence number"),
            (
                OpDesc {
                    reduce: Some(ReduceOp::Max),
                    ..ar(4, DType::F32, 100)
                },
                "reduction operator",
            ),
            (
                OpDesc {
                    kind: OpKind::Broadcast,
                    reduce: None,
                    ..ar(4, DType::F32, 100)
                },
                "operation",
            ),
        ];
        let mine = ar(4, DType::F32, 100);
        for (theirs, want) in table {
            let err = validate(&mine, theirs, 0, 0, 0, 3).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(want), "{msg} lacks {want}");
            assert!(msg.contains("rank 3 called"), "{msg}");
            assert_eq!(err.culprit(), Some(3));
        }
        assert!(validate(&mine, &mine, 8, 8, 0, 1).is_ok());
        assert!(matches!(
            validate(&mine, &mine, 8, 4, 0, 1),
            Err(Error::Protocol { peer: 1, .. })
        ));
    }
}

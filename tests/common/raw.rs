//! A raw data-plane connection and request builders, for sending what no client would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use parasync_proto::data::{put_frame, MAGIC};
use parasync_proto::ps::{self, data_request::Op};
use prost::Message;
use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// A raw data-plane connection, for sending what no client would.
pub struct Raw(pub TcpStream);

impl Raw {
    pub fn open(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw(s);
        r.0.write_all(MAGIC).unwrap();
        r
    }

    pub fn send(&mut self, op: Option<Op>, payload: &[u8]) {
        let mut out = Vec::new();
        put_frame(&ps::DataRequest { op, payload_bytes: payload.len() as u64 }, &mut out);
        out.extend_from_slice(payload);
        self.0.write_all(&out).unwrap();
    }

    /// The next reply and the values that follow it.
    pub fn reply(&mut self) -> (ps::DataReply, Vec<u8>) {
        let mut prefix = [0u8; 4];
        self.0.read_exact(&mut prefix).unwrap();
        let mut msg = vec![0u8; u32::from_le_bytes(prefix) as usize];
        self.0.read_exact(&mut msg).unwrap();
        let reply = ps::DataReply::decode(msg.as_slice()).unwrap();
        let mut values = vec![0u8; reply.payload_bytes as usize];
        self.0.read_exact(&mut values).unwrap();
        (reply, values)
    }

    pub fn expect(&mut self, code: Code, needle: &str, what: &str) {
        let (r, _) = self.reply();
        assert_eq!(r.code, code as u32, "{what}: {}", r.message);
        assert!(r.message.contains(needle), "{what}: message {:?} should mention {needle:?}", r.message);
    }

    /// True when the server closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn push_op(variable: &str, n: u64, wire: ps::Dtype) -> Option<Op> {
    Some(Op::Push(ps::PushHeader {
        variable: variable.into(),
        worker_id: 0,
        step: 0,
        base_version: 0,
        wire_dtype: wire as i32,
        num_elements: n,
        kind: ps::PushKind::Gradient as i32,
        ..Default::default()
    }))
}

pub fn pull_op(variable: &str) -> Option<Op> {
    Some(Op::Pull(ps::PullRequest { variable: variable.into(), worker_id: 0, step: 0, wire_dtype: ps::Dtype::F32 as i32, timeout_ms: 1000 }))
}

pub fn hello_op(auth_token: &str) -> Option<Op> {
    Some(Op::Hello(ps::DataHello { auth_token: auth_token.into() }))
}

/// Sends arbitrary bytes as a gRPC message.
#[derive(Clone, Default)]
pub struct RawCodec;
pub struct RawEnc;
pub struct RawDec;
impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}
impl Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}
impl Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

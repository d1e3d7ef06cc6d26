//! Framing of the parameter server's data plane (see `DataRequest` in `ps.proto`): the
//! constants and helpers both ends share.

use prost::Message;

/// The greeting a client sends first on every data-plane connection.
pub const MAGIC: &[u8; 8] = b"PSDATA01";

/// Largest `DataRequest` / `DataReply` message (variable names are at most 1 KiB).
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// Appends `msg` to `out` as one frame: its length (u32, little-endian), then its bytes.
pub fn put_frame(msg: &impl Message, out: &mut Vec<u8>) {
    let len = msg.encoded_len();
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode(out).expect("a Vec grows as needed");
}

/// The length a frame header announces, or an error naming it when it is too large to be
/// a Parasync message.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, String> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_HEADER_BYTES {
        return Err(format!("data-plane message of {len} bytes announced; at most {MAX_HEADER_BYTES} are allowed"));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ps;

    #[test]
    fn frames_round_trip_and_oversized_lengths_are_refused() {
        let req = ps::DataRequest { op: Some(ps::data_request::Op::Pull(ps::PullRequest { variable: "w".into(), ..Default::default() })), payload_bytes: 0 };
        let mut out = Vec::new();
        put_frame(&req, &mut out);
        let len = frame_len(out[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, out.len() - 4);
        assert_eq!(ps::DataRequest::decode(&out[4..]).unwrap(), req);
        assert!(frame_len((MAX_HEADER_BYTES as u32 + 1).to_le_bytes()).unwrap_err().contains("at most"));
    }
}

//! The codec of every Parasync service: prost encoding, with two differences from the
//! stock one. A message that does not decode is the caller's mistake, so it gets
//! `invalid_argument` (not `internal`); and buffers are sized for megabyte chunks.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// Metadata key the parameter server sets on every status its service code produces
/// (see [`mark_service_status`]).
pub const SERVICE_STATUS_KEY: &str = "parasync-service-status";

/// Marks `status` as the parameter server's own answer (not the transport's): the server
/// marks every error it returns, the client marks data-plane replies.
pub fn mark_service_status(status: &mut Status) {
    status.metadata_mut().insert(SERVICE_STATUS_KEY, tonic::metadata::MetadataValue::from_static("1"));
}

/// True for tonic's refusal of a message over the receiver's size limit. tonic reports it
/// as `out_of_range`, before any service code runs; the service's own `out_of_range`
/// answers (a step ahead of the variable) carry the [`SERVICE_STATUS_KEY`] mark, so an
/// unmarked one is the size limit, whatever tonic's wording. The server and the client
/// each turn it into an error that says what to change.
pub fn is_oversized_message(status: &Status) -> bool {
    status.code() == Code::OutOfRange && !status.metadata().contains_key(SERVICE_STATUS_KEY)
}

/// Buffer settings for tensor chunks: fewer, larger buffer growths per message.
fn buffers() -> BufferSettings {
    BufferSettings::new(256 << 10, 1 << 20)
}

/// Codec used by the generated clients and servers.
#[derive(Debug, Clone)]
pub struct PsCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for PsCodec<T, U> {
    fn default() -> Self {
        PsCodec(PhantomData)
    }
}

impl<T, U> Codec for PsCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = PsEncoder<T>;
    type Decoder = PsDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        PsEncoder(ProstCodec::<T, U>::raw_encoder(buffers()))
    }

    fn decoder(&mut self) -> Self::Decoder {
        PsDecoder(ProstCodec::<T, U>::raw_decoder(buffers()))
    }
}

/// Encoder half of [`PsCodec`].
#[derive(Debug)]
pub struct PsEncoder<T>(tonic_prost::ProstEncoder<T>);

impl<T: prost::Message> Encoder for PsEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}

/// Decoder half of [`PsCodec`].
#[derive(Debug)]
pub struct PsDecoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for PsDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            if s.code() == Code::Internal {
                Status::invalid_argument(format!("malformed message: {}", s.message()))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}

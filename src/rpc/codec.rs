//! The gRPC message codec: prost encoding, and decoding straight from the received bytes.
//!
//! tonic hands a decoder its message in one contiguous buffer, behind a `Buf` whose every
//! `advance` goes through a length-limited wrapper. prost's generic decode calls that per
//! varint, and a delta is mostly packed varints: on the ingest benchmark (16 shards × 5,000
//! files) decoding deltas through the wrapper was 17% of the daemon's CPU. Decoding the same
//! bytes as a slice takes prost's slice fast path. Malformed protobuf is the sender's fault, so
//! it is answered INVALID_ARGUMENT (tonic's own codec says INTERNAL).

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// The codec every `covd.v1` method uses (named in `build.rs`).
#[derive(Debug)]
pub struct SliceCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SliceCodec<T, U> {
    fn default() -> Self {
        SliceCodec(PhantomData)
    }
}

impl<T, U> Codec for SliceCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SliceDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        SliceDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct SliceDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for SliceDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = buf.remaining();
        let decoded = if buf.chunk().len() == len {
            let item = U::decode(buf.chunk());
            buf.advance(len);
            item
        } else {
            // Not contiguous (tonic does not do this today): the generic path.
            U::decode(buf)
        };
        decoded.map(Some).map_err(|e| {
            Status::invalid_argument(format!("the message does not decode as covd.v1: {e}"))
        })
    }
}

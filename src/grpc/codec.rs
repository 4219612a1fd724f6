//! The codec of every generated service and client (`build.rs` names it with
//! `codec_path`): tonic's prost codec, except for what a request that does not decode is
//! answered. tonic answers `INTERNAL`, as gRPC's status code table has it; but bytes that
//! are not the request message, or a string field that is not UTF-8, are the caller's
//! mistake, not the server's, and an `INTERNAL` would page an operator for anyone's
//! garbage. So such a request is `INVALID_ARGUMENT`, naming the message and where it broke
//! ([`undecodable`], with the other error mappings).
//! Nothing reaches a handler: a request that does not decode appends and reads nothing.
//!
//! The same codec decodes responses on the client side, where a message that does not
//! decode is the server's fault, and stays `INTERNAL`. Which one a message is, is known by
//! its name: buf's STANDARD lint (`RPC_REQUEST_STANDARD_NAME`, `buf.yaml`) has every RPC
//! take a `<Method>Request` and answer a `<Method>Response`.

use std::marker::PhantomData;

use prost::{Message, Name};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

use super::status::undecodable;

/// [`ProstCodec`] with decoding failures of requests answered `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        ProtoCodec {
            prost: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder {
            message: PhantomData,
        }
    }
}

/// Decodes a `U`; see the module documentation for the status of a failure.
#[derive(Debug, Clone)]
pub struct ProtoDecoder<U> {
    message: PhantomData<U>,
}

impl<U: Message + Name + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(undecodable::<U>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AppendRequest, AppendResponse};
    use tonic::Code;

    fn decode<U: Name + Message + Default>(bytes: &[u8]) -> Result<U, Status> {
        U::decode(bytes).map_err(undecodable::<U>)
    }

    #[test]
    fn a_request_that_does_not_decode_is_the_callers_mistake() {
        // AppendRequest { communication (1) { message_id (1): 0xff 0xfe } }: not UTF-8.
        let invalid_utf8 = [0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe];
        let status = decode::<AppendRequest>(&invalid_utf8).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("the request is not a valid audit.ledger.v1.AppendRequest")
                && status.message().contains("message_id")
                && status.message().contains("UTF-8"),
            "{}",
            status.message()
        );
        // A truncated varint.
        let status = decode::<AppendRequest>(&[0x08, 0xff]).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        // A response that does not decode is the server's fault.
        let status = decode::<AppendResponse>(&[0x08, 0xff]).unwrap_err();
        assert_eq!(status.code(), Code::Internal);
    }
}

//! `covd.v1.IngestRequest` as the daemon reads it: the same wire form as the generated type,
//! except that a delta stays the bytes the client encoded (`build.rs` maps the proto type
//! here). The daemon decodes those bytes once to merge them, and the durable store keeps them
//! as they are: before, re-encoding every delta for the store was 22% of the daemon's
//! instructions on the ingest benchmark (callgrind, 16 shards × 500 files).

use prost::Message;

use super::proto;

/// The generated type's twin; see the module docs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IngestRequest {
    #[prost(oneof = "ingest_request::Msg", tags = "1, 2, 3")]
    pub msg: Option<ingest_request::Msg>,
}

pub mod ingest_request {
    use super::proto;

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Msg {
        /// First message of every stream.
        #[prost(message, tag = "1")]
        Header(proto::ShardHeader),
        /// A `covd.v1.Delta`, encoded.
        #[prost(bytes = "bytes", tag = "2")]
        Delta(bytes::Bytes),
        /// Last message: the shard's coverage is all in.
        #[prost(message, tag = "3")]
        Finish(proto::Finish),
    }
}

impl IngestRequest {
    /// A request carrying `delta`.
    pub fn delta(delta: &proto::Delta) -> IngestRequest {
        IngestRequest {
            msg: Some(ingest_request::Msg::Delta(delta.encode_to_vec().into())),
        }
    }
}

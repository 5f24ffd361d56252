//! Generated code for every skv protobuf package. No logic lives here.
//!
//! - [`v1`]: the public client API (`skv.v1.Kv`).
//! - [`internal`]: storenode, Raft transport and placement (`skv.internal.v1`).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The public client API, `skv.v1`.
pub mod v1 {
    tonic::include_proto!("skv.v1");
}

/// Internal APIs between skv components, `skv.internal.v1`.
pub mod internal {
    tonic::include_proto!("skv.internal.v1");
}

/// Encoded `FileDescriptorSet` of every skv proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/skv_descriptor.bin"));

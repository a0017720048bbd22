//! Lifeboat's wire protocol: generated gRPC types and services.

#![allow(missing_docs)]

/// Version 1 of the protocol (`lifeboat.v1`).
pub mod v1 {
    tonic::include_proto!("lifeboat.v1");
}

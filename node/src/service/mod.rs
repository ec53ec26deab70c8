//! The public gRPC services.

pub mod admin;
pub mod kv;
pub mod records;

//! The `kvferry-node` binary, compiled as part of this package for the integration tests.
include!("../../../cuda-backend/src/bin/kvferry-node.rs");

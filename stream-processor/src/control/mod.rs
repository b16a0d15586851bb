//! placeholder
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("edgeloop.control.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/control_descriptor.bin"));
}

//! Code generated at build time (build.rs) from meshlet's own protocol definitions in proto/:
//! shared by the programs that speak them (the identity service and the sidecar's client).

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("meshlet.identity.v1");
    }
}

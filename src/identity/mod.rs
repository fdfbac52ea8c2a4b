//! `meshlet identity`: the mesh's certificate authority, a separate program in the same binary
//! (never imported by the proxy). A sidecar proves its ServiceAccount with a projected token;
//! the service checks it with the TokenReview API ([`review`]) and signs a short-lived
//! certificate carrying the SPIFFE ID ([`ca`]); [`server`] is the gRPC service over TLS.

pub mod ca;
pub mod review;
pub mod server;

//! The sidecar's side of identity: the client of `meshlet identity` ([`client`]). The key, the
//! renewal and the rustls configs of the mTLS hop come next (issue 15).

pub mod client;

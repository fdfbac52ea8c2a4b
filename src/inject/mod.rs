//! `meshlet inject`: the mutating admission webhook that meshes pods by annotation.
//!
//! [`patch`] decides and builds the JSON Patch (a pure function, golden-file tested);
//! [`server`] serves it as AdmissionReview v1 over TLS.

pub mod patch;
pub mod server;

pub use patch::{InjectConfig, Outcome, inject};

//! The gRPC health protobuf, hand-encoded in meshlet: the server's `HealthCheckRequest` decoder
//! (`health::grpc::decode_request`, what a kubelet or any client sends to `admin.grpc_listen`)
//! and the probe client's `HealthCheckResponse` decoder (`health::probes::decode_check_response`,
//! what an app answers to its gRPC probe), with their encoders and the `grpc-message`
//! percent-encoding.
//!
//! Input: one gRPC-framed message (5-byte header, protobuf), fed to both decoders; the same
//! bytes as text for the encoders.
//!
//! Invariants checked besides "no panic":
//! - a decoded service name, encoded again, decodes to itself; any UTF-8 name round-trips;
//! - a decoded serving status that has a name, encoded again, decodes to itself;
//! - `grpc-message` percent-encoding round-trips and its output is a valid header value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlet::health::grpc::{Serving, decode_request, encode_response, percent_encode};
use meshlet::health::probes::{decode_check_response, encode_check_request, percent_decode};

fn round_trip(service: &str) {
    let encoded = encode_check_request(service).expect("a name shorter than 4 GiB encodes");
    assert_eq!(
        decode_request(&encoded).as_deref(),
        Ok(service),
        "service name {service:?} does not round-trip"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(service) = decode_request(data) {
        round_trip(&service);
    }
    if let Ok(status) = decode_check_response(data) {
        let serving = match status {
            0 => Some(Serving::Unknown),
            1 => Some(Serving::Serving),
            2 => Some(Serving::NotServing),
            3 => Some(Serving::ServiceUnknown),
            _ => None,
        };
        if let Some(s) = serving {
            assert_eq!(decode_check_response(&encode_response(s)), Ok(status));
        }
    }
    let text = String::from_utf8_lossy(data);
    round_trip(&text);
    let encoded = percent_encode(&text);
    assert!(
        http::HeaderValue::from_str(&encoded).is_ok(),
        "grpc-message {encoded:?} is not a header value"
    );
    assert_eq!(percent_decode(encoded.as_bytes()), text);
});

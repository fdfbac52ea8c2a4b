//! What meshlet does itself around the gRPC health protobuf (which prost, through tonic-health,
//! encodes and decodes): the app probe client's reading of an answer frame
//! (`health::probes::decode_check_response`: the 5-byte gRPC frame header, then the message),
//! its request framing (`encode_check_request`) and the `grpc-message` percent-decoding.
//!
//! Input: one gRPC-framed answer for the decoder; the same bytes as text for the others.
//!
//! Invariants checked besides "no panic":
//! - a request frame's length header is the length of the message that follows;
//! - percent-decoding leaves text without `%` as it is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlet::ops::health::probes::{decode_check_response, encode_check_request, percent_decode};

fuzz_target!(|data: &[u8]| {
    let _ = decode_check_response(data);
    let text = String::from_utf8_lossy(data);
    let frame = encode_check_request(&text).expect("a name shorter than 4 GiB encodes");
    assert_eq!(frame[0], 0, "uncompressed");
    let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
    assert_eq!(len, frame.len() - 5, "the frame header gives the message's length");
    let decoded = percent_decode(data);
    if !data.contains(&b'%') {
        assert_eq!(decoded, text, "no escape, nothing changed");
    }
});

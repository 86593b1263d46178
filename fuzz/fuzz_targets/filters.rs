//! REQ filters: arbitrary bytes as one filter through `orly::message::parse_filter`, and what
//! parses re-serialized and parsed again (`fuzz/harness/messages.rs`).
#![no_main]

#[allow(dead_code)]
#[path = "../harness/messages.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::filters(data));

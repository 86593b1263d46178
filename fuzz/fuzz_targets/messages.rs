//! Client WebSocket frames: arbitrary bytes through `orly::message::parse`, and every filter of
//! what parses through `parse_filter` (`fuzz/harness/messages.rs`).
#![no_main]

#[allow(dead_code)]
#[path = "../harness/messages.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::messages(data));

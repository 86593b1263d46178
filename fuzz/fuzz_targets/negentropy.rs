//! NIP-77 sessions: arbitrary bytes as a filter, a NEG-OPEN message and NEG-MSG messages
//! through the in-process negentropy engine (`fuzz/harness/negentropy.rs`).
#![no_main]

#[allow(dead_code)]
#[path = "../harness/negentropy.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::negentropy(data));

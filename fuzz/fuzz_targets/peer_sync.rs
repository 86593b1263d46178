//! Peer-sync answers: arbitrary bytes as a peer's NIP-11, latest-serial, listing and fetch
//! answers to the distributed or the cluster sync (`fuzz/harness/peer_sync.rs`).
#![no_main]

#[allow(dead_code)]
#[path = "../harness/peer_sync.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::peer_sync(data));

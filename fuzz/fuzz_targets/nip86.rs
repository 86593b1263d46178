//! NIP-86 JSON-RPC bodies: arbitrary bytes through the body handler and through the whole
//! handler with a valid owner's NIP-98 header (`orly_acl::fuzz::nip86`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| orly_acl::fuzz::nip86(data));

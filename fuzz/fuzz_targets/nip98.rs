//! NIP-98 `Authorization` headers: arbitrary bytes as a header and body, and as the event
//! JSON inside a header in both base64 alphabets (`orly_acl::fuzz::nip98`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| orly_acl::fuzz::nip98(data));

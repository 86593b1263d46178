//! Wall-clock time as Nostr and the stores count it: Unix seconds and milliseconds. One helper
//! instead of a copy per crate; a clock before 1970 reads as 0.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix seconds as SQL stores them (signed).
pub fn now_secs_i64() -> i64 {
    i64::try_from(now_secs()).unwrap_or(i64::MAX)
}

/// Unix milliseconds, signed.
pub fn now_ms_i64() -> i64 {
    i64::try_from(now_ms()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn clocks_agree() {
        let (s, ms) = (super::now_secs(), super::now_ms());
        assert!(s > 1_700_000_000);
        assert!(ms / 1000 >= s && ms / 1000 - s <= 1);
    }
}

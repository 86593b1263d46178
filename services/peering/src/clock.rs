//! The local wall clock as a value, so that tests can skew it. Leases never read it: their
//! times are the database's ([`orly_db::EventStore::clock_ms`]) and a holder's own deadline runs
//! on the monotonic clock. It is read only to report how far this process's clock is from the
//! database's ([`crate::Shard::clock_skew_ms`]).

use std::sync::Arc;

/// A source of wall-clock time (Unix milliseconds).
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// A clock shared between tasks.
pub type SharedClock = Arc<dyn Clock>;

/// The machine's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        orly_common::time::now_ms_i64()
    }
}

/// The machine's clock moved by a fixed offset: a process on a host whose clock is off.
#[derive(Debug, Clone, Copy)]
pub struct SkewedClock {
    pub offset_ms: i64,
}

impl Clock for SkewedClock {
    fn now_ms(&self) -> i64 {
        orly_common::time::now_ms_i64().saturating_add(self.offset_ms)
    }
}

/// The machine's clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_clock_is_off_by_its_offset() {
        let skewed = SkewedClock { offset_ms: 30_000 };
        let d = skewed.now_ms() - SystemClock.now_ms();
        assert!((29_000..=30_000).contains(&d), "{d}");
    }
}

//! Giving memory freed after a burst of work back to the operating system.
//!
//! glibc's allocator keeps what its per-thread arenas freed for reuse. After an ingest burst
//! (hundreds of EVENTs in flight per connection, each parsed, queued for the store and, in
//! split mode, an HTTP/2 stream to orly-db) the relay and orly-db each stayed 50-70 MB above
//! their size before it, though nothing held that memory any more (`malloc_trim` from a
//! debugger took orly-db from 122 to 50 MB). [`burst_ended`] returns the free pages, at most
//! once per [`TRIM_EVERY`]; an end that comes sooner gets one trim when the interval is up.
//! Callers go through [`Bursts`], which trims only after work in flight (or in one batch)
//! reached a threshold: a trim holds the allocator's locks while it runs (tens of milliseconds
//! on a large heap), and trimming after every lull of a steady trickle showed as 70-110 ms
//! stalls in the live fan-out's p99.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::time::now_ms;

/// Least time between two trims.
pub const TRIM_EVERY: Duration = Duration::from_secs(2);
/// Bytes of EVENTs in flight at once that make a burst worth a trim (the relay).
pub const BURST_BYTES: usize = 1 << 20;
/// Events in one write batch that make a burst worth a trim (the store writer).
pub const BURST_BATCH: usize = 1024;

/// The largest level of work (bytes in flight, events in a batch) seen since the last trim.
pub struct Bursts {
    threshold: usize,
    peak: AtomicUsize,
}

impl Bursts {
    pub const fn new(threshold: usize) -> Self {
        Self {
            threshold,
            peak: AtomicUsize::new(0),
        }
    }

    /// The work in flight (or in this batch) is `level` now.
    pub fn observe(&self, level: usize) {
        self.peak.fetch_max(level, Ordering::Relaxed);
    }

    /// Nothing is in flight any more: after a burst that reached the threshold, the memory
    /// goes back to the OS ([`burst_ended`]).
    pub fn settled(&self) {
        if self.peak.load(Ordering::Relaxed) >= self.threshold {
            self.peak.store(0, Ordering::Relaxed);
            burst_ended();
        }
    }
}

static LAST_TRIM_MS: AtomicU64 = AtomicU64::new(0);
static TRIM_PENDING: AtomicBool = AtomicBool::new(false);
static TRIMS: AtomicU64 = AtomicU64::new(0);

/// What to do at the end of a burst.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Now,
    /// Trim after this long (the last trim was too recent).
    Later(Duration),
    /// A later trim is already planned.
    Nothing,
}

fn plan(now_ms: u64, last_ms: &AtomicU64, pending: &AtomicBool) -> Plan {
    let every = u64::try_from(TRIM_EVERY.as_millis()).unwrap_or(u64::MAX);
    let last = last_ms.load(Ordering::Relaxed);
    let since = now_ms.saturating_sub(last);
    if since >= every {
        // One caller wins the slot; the others fall through to the planned trim.
        if last_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            return Plan::Now;
        }
    }
    if pending.swap(true, Ordering::Relaxed) {
        Plan::Nothing
    } else {
        Plan::Later(Duration::from_millis(every.saturating_sub(since).max(1)))
    }
}

/// Work that allocated (EVENTs, a write batch) is done and nothing of it is in flight:
/// returns the free memory to the OS now or, if the last trim was too recent, once
/// [`TRIM_EVERY`] is up. Runs on a blocking thread of the current tokio runtime (inline
/// outside one).
pub fn burst_ended() {
    match plan(now_ms(), &LAST_TRIM_MS, &TRIM_PENDING) {
        Plan::Now => trim_in_background(),
        Plan::Later(wait) => match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(wait).await;
                    LAST_TRIM_MS.store(now_ms(), Ordering::Relaxed);
                    TRIM_PENDING.store(false, Ordering::Relaxed);
                    trim_in_background();
                });
            }
            Err(_) => TRIM_PENDING.store(false, Ordering::Relaxed),
        },
        Plan::Nothing => {}
    }
}

fn trim_in_background() {
    TRIMS.fetch_add(1, Ordering::Relaxed);
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(release_free_memory);
        }
        Err(_) => release_free_memory(),
    }
}

/// Trims started in this process.
pub fn trims() -> u64 {
    TRIMS.load(Ordering::Relaxed)
}

/// Returns the allocator's free pages to the operating system (glibc; other allocators
/// return memory on their own).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes no pointers and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trim_per_interval_and_one_planned_for_ends_in_between() {
        let (last, pending) = (AtomicU64::new(0), AtomicBool::new(false));
        assert_eq!(plan(10_000, &last, &pending), Plan::Now);
        // 500 ms later: too soon, one trim is planned for when the interval is up...
        assert_eq!(
            plan(10_500, &last, &pending),
            Plan::Later(Duration::from_millis(1_500))
        );
        // ...and covers every end until then.
        assert_eq!(plan(11_000, &last, &pending), Plan::Nothing);
        // Once it ran (it stores its time and clears the flag), the next end is measured
        // from it.
        last.store(12_000, Ordering::Relaxed);
        pending.store(false, Ordering::Relaxed);
        assert_eq!(
            plan(12_100, &last, &pending),
            Plan::Later(Duration::from_millis(1_900))
        );
        pending.store(false, Ordering::Relaxed);
        assert_eq!(plan(14_000, &last, &pending), Plan::Now);
    }

    #[tokio::test]
    async fn only_a_burst_that_reached_the_threshold_is_trimmed_after() {
        let bursts = Bursts::new(100);
        bursts.observe(40);
        bursts.observe(99);
        bursts.settled();
        assert_eq!(
            bursts.peak.load(Ordering::Relaxed),
            99,
            "a trickle is not a burst"
        );
        bursts.observe(100);
        bursts.observe(10);
        bursts.settled();
        assert_eq!(
            bursts.peak.load(Ordering::Relaxed),
            0,
            "trimmed, measured anew"
        );
    }

    #[tokio::test]
    async fn a_burst_end_trims_in_the_background() {
        let before = trims();
        let v: Vec<Vec<u8>> = (0..1000).map(|_| vec![1u8; 4096]).collect();
        drop(v);
        // Either trims now or plans one within TRIM_EVERY (other tests may have trimmed).
        burst_ended();
        let deadline = std::time::Instant::now() + TRIM_EVERY * 2;
        while trims() == before && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(trims() > before);
    }
}

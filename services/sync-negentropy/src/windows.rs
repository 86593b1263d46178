//! Peer sync in time windows: a store holding more events than one reconciliation may take
//! ([`crate::SyncSettings::max_records`]) is reconciled window by window, each a `created_at`
//! range small enough on both sides. [`WindowPlan`] is the per-peer layout, kept in the store
//! (`negentropy:windows:<url>`) so passes resume it: windows adapt to the data — one over the
//! cap on our side is cut where our newest records reach half the cap, one the peer refuses
//! (`blocked:`) is halved in time, small neighbours are merged back — and each pass reconciles
//! only the windows that are due: never reconciled, failed last time, recent (reaching into
//! the last [`crate::SyncSettings::window_recent`]), or not re-checked for
//! [`crate::SyncSettings::window_recheck`].

use std::time::Duration;

use nostr::{EventId, Filter, JsonUtil, Timestamp};
use serde::{Deserialize, Serialize};

/// Marker kind of the plan (`negentropy:windows:<url>`).
pub const KIND_WINDOWS: &str = "windows";

/// One `created_at` range, inclusive at both ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub since: u64,
    /// `None`: open-ended (now and later); only the newest window is.
    pub until: Option<u64>,
    /// Records of the union of both sides at the last reconciliation.
    #[serde(default)]
    pub records: u64,
    /// Unix seconds of the last successful reconciliation (0: never).
    #[serde(default)]
    pub checked_at: i64,
    /// Why the last attempt failed (empty: it did not).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl Window {
    fn fresh(since: u64, until: Option<u64>) -> Self {
        Self {
            since,
            until,
            records: 0,
            checked_at: 0,
            error: String::new(),
        }
    }

    /// `filter` narrowed to this window.
    pub fn filter(&self, filter: &Filter) -> Filter {
        let mut f = filter.clone().since(Timestamp::from(self.since));
        if let Some(u) = self.until {
            f = f.until(Timestamp::from(u));
        }
        f
    }

    /// Is it reconciled this pass?
    pub fn is_due(&self, now: i64, recent: Duration, recheck: Duration) -> bool {
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        self.checked_at == 0
            || !self.error.is_empty()
            || self.until.is_none_or(|u| {
                i64::try_from(u)
                    .unwrap_or(i64::MAX)
                    .saturating_add(secs(recent))
                    >= now
            })
            || now.saturating_sub(self.checked_at) >= secs(recheck)
    }
}

/// How a window too large for one reconciliation is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// `[since, at]` and `[at + 1, until]`.
    At(u64),
    /// The window is one second long (or all of its records share its last second): it
    /// cannot be cut by `created_at`.
    Impossible,
}

/// The windows of one peer, oldest first, contiguous, covering the filter's time range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowPlan {
    /// The filter the plan was made for (JSON): another filter starts a new plan.
    pub filter: String,
    pub windows: Vec<Window>,
    /// Passes run over this plan.
    #[serde(default)]
    pub passes: u64,
}

impl WindowPlan {
    /// One window over the whole range of `filter`.
    pub fn new(filter: &Filter) -> Self {
        let since = filter.since.map_or(0, |t| t.as_secs());
        let until = filter.until.map(|t| t.as_secs());
        Self {
            filter: filter.as_json(),
            windows: vec![Window::fresh(since, until.map(|u| u.max(since)))],
            passes: 0,
        }
    }

    /// Is this the plan of `filter`?
    pub fn is_for(&self, filter: &Filter) -> bool {
        self.filter == filter.as_json() && self.is_well_formed()
    }

    /// Contiguous, ordered, at least one window, open-ended only at the top (a plan read from
    /// the store that is not is replaced).
    pub fn is_well_formed(&self) -> bool {
        let Some(last) = self.windows.last() else {
            return false;
        };
        let contiguous = self.windows.windows(2).all(|p| {
            p[0].until
                .is_some_and(|u| u >= p[0].since && u.checked_add(1) == Some(p[1].since))
        });
        contiguous && last.until.is_none_or(|u| u >= last.since)
    }

    fn index_of(&self, since: u64) -> Option<usize> {
        self.windows.iter().position(|w| w.since == since)
    }

    pub fn window(&self, since: u64) -> Option<&Window> {
        self.index_of(since).map(|i| &self.windows[i])
    }

    /// The `since` of every window due this pass, newest first (all of them when `all`).
    pub fn due(&self, now: i64, recent: Duration, recheck: Duration, all: bool) -> Vec<u64> {
        self.windows
            .iter()
            .rev()
            .filter(|w| all || w.is_due(now, recent, recheck))
            .map(|w| w.since)
            .collect()
    }

    /// Records a successful reconciliation of the window starting at `since`.
    pub fn reconciled(&mut self, since: u64, records: u64, now: i64) {
        if let Some(i) = self.index_of(since) {
            let w = &mut self.windows[i];
            w.records = records;
            w.checked_at = now;
            w.error.clear();
        }
    }

    /// Records a failed attempt on the window starting at `since`.
    pub fn failed(&mut self, since: u64, error: String) {
        if let Some(i) = self.index_of(since) {
            self.windows[i].error = error;
        }
    }

    /// Cuts the window starting at `since` after second `at`; returns the two new windows'
    /// `since` (older, newer), both to be reconciled. `None` if `at` is not inside it.
    pub fn split(&mut self, since: u64, at: u64) -> Option<(u64, u64)> {
        let i = self.index_of(since)?;
        let w = self.windows[i].clone();
        if at < w.since || w.until.is_some_and(|u| at >= u) || at == u64::MAX {
            return None;
        }
        self.windows[i] = Window::fresh(w.since, Some(at));
        self.windows.insert(i + 1, Window::fresh(at + 1, w.until));
        Some((w.since, at + 1))
    }

    /// Merges neighbours that were both reconciled and together hold at most `max_records`
    /// (a layout cut finely by time-halving over sparse years need not stay that way). The
    /// merged window keeps the older check time.
    pub fn merge_small(&mut self, max_records: u64) {
        let mut i = 0;
        while i + 1 < self.windows.len() {
            let (a, b) = (&self.windows[i], &self.windows[i + 1]);
            let done = |w: &Window| w.checked_at > 0 && w.error.is_empty();
            if done(a) && done(b) && a.records + b.records <= max_records {
                let merged = Window {
                    since: a.since,
                    until: b.until,
                    records: a.records + b.records,
                    checked_at: a.checked_at.min(b.checked_at),
                    error: String::new(),
                };
                self.windows[i] = merged;
                self.windows.remove(i + 1);
            } else {
                i += 1;
            }
        }
    }
}

/// Where to cut the window `since..=until` whose newest records on our side (`items`,
/// ascending, more than the cap) overflow it: so that the newer part holds at most `target` of
/// them. When they all share one second, that second is cut off from what lies above it, then
/// from what lies below it; a window of that one second alone cannot be cut.
pub fn cut_for_our_side(
    items: &[(Timestamp, EventId)],
    target: usize,
    since: u64,
    until: Option<u64>,
) -> Cut {
    let Some(last) = items.last() else {
        return Cut::Impossible;
    };
    let top = last.0.as_secs();
    let below = items.len().saturating_sub(1 + target.min(items.len() - 1));
    let t = items[below].0.as_secs();
    if t < top {
        Cut::At(t.max(since))
    } else if until.is_none_or(|u| u > top) {
        Cut::At(top)
    } else if top > since {
        Cut::At(top - 1)
    } else {
        Cut::Impossible
    }
}

/// Where to cut a window the peer refused as too large: halfway in time (its newest second
/// being `now` when it is open-ended).
pub fn cut_in_half(window: &Window, now: u64) -> Cut {
    let hi = window.until.unwrap_or(now).max(window.since);
    if hi <= window.since {
        return Cut::Impossible;
    }
    Cut::At(window.since + (hi - window.since - 1) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: &[u64]) -> Vec<(Timestamp, EventId)> {
        secs.iter()
            .enumerate()
            .map(|(i, s)| {
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                (Timestamp::from(*s), EventId::from_byte_array(id))
            })
            .collect()
    }

    #[test]
    fn a_plan_splits_and_merges_and_stays_contiguous() {
        let mut plan = WindowPlan::new(&Filter::new());
        assert!(plan.is_well_formed());
        assert_eq!(plan.windows[0], Window::fresh(0, None));
        assert_eq!(plan.split(0, 1000), Some((0, 1001)));
        assert_eq!(plan.split(1001, 2000), Some((1001, 2001)));
        assert!(plan.is_well_formed());
        assert_eq!(
            plan.split(0, 1000),
            None,
            "at the window's end: nothing to cut"
        );
        assert_eq!(plan.split(5, 10), None, "no window starts at 5");
        let ranges: Vec<_> = plan.windows.iter().map(|w| (w.since, w.until)).collect();
        assert_eq!(
            ranges,
            vec![(0, Some(1000)), (1001, Some(2000)), (2001, None)]
        );
        plan.reconciled(0, 10, 50);
        plan.reconciled(1001, 20, 60);
        plan.reconciled(2001, 500, 70);
        plan.merge_small(30);
        let ranges: Vec<_> = plan
            .windows
            .iter()
            .map(|w| (w.since, w.until, w.records, w.checked_at))
            .collect();
        assert_eq!(ranges, vec![(0, Some(2000), 30, 50), (2001, None, 500, 70)]);
        // A failed window is never merged.
        plan.failed(2001, "boom".into());
        plan.merge_small(10_000);
        assert_eq!(plan.windows.len(), 2);

        // A plan for a bounded filter.
        let f = Filter::new()
            .since(Timestamp::from(100))
            .until(Timestamp::from(50));
        let p = WindowPlan::new(&f);
        assert!(p.is_well_formed() && p.is_for(&f));
        assert!(!p.is_for(&Filter::new()));
        let broken = WindowPlan {
            windows: vec![Window::fresh(0, Some(10)), Window::fresh(12, None)],
            ..WindowPlan::new(&Filter::new())
        };
        assert!(!broken.is_well_formed());
    }

    #[test]
    fn only_recent_failed_new_or_stale_windows_are_due() {
        let hour = Duration::from_secs(3600);
        let day = Duration::from_secs(86_400);
        let now = 1_000_000i64;
        let w = |since: u64, until: Option<u64>, checked_at: i64, error: &str| Window {
            since,
            until,
            records: 1,
            checked_at,
            error: error.into(),
        };
        assert!(
            w(0, None, now, "").is_due(now, hour, day),
            "open-ended: always"
        );
        assert!(
            w(0, Some(now as u64 - 100), now, "").is_due(now, hour, day),
            "recent"
        );
        assert!(!w(0, Some(now as u64 - 7200), now - 10, "").is_due(now, hour, day));
        assert!(
            w(0, Some(10), 0, "").is_due(now, hour, day),
            "never reconciled"
        );
        assert!(w(0, Some(10), now, "x").is_due(now, hour, day), "failed");
        assert!(
            w(0, Some(10), now - 86_400, "").is_due(now, hour, day),
            "stale"
        );
        let mut plan = WindowPlan::new(&Filter::new());
        plan.split(0, 100).unwrap();
        plan.reconciled(0, 5, now);
        plan.reconciled(101, 5, now);
        assert_eq!(plan.due(now, hour, day, false), vec![101]);
        assert_eq!(plan.due(now, hour, day, true), vec![101, 0]);
    }

    #[test]
    fn windows_are_cut_where_the_data_is() {
        // Ten records at 100..=109, cap 6: the newer part keeps at most 3 of them.
        let items = ts(&[100, 101, 102, 103, 104, 105, 106, 107, 108, 109]);
        assert_eq!(cut_for_our_side(&items, 3, 100, None), Cut::At(106));
        // Ties: the cut never splits a second; a crowded second is cut off from above first,
        // then from below, and alone it cannot be cut.
        let items = ts(&[100, 100, 105, 105, 105, 105, 105]);
        assert_eq!(cut_for_our_side(&items, 3, 100, None), Cut::At(105));
        assert_eq!(cut_for_our_side(&items, 3, 100, Some(105)), Cut::At(104));
        let items = ts(&[100, 100, 100]);
        assert_eq!(cut_for_our_side(&items, 1, 100, Some(100)), Cut::Impossible);
        assert_eq!(cut_for_our_side(&items, 1, 99, Some(100)), Cut::At(99));
        assert_eq!(cut_for_our_side(&items, 1, 100, Some(200)), Cut::At(100));
        // In time: halves, down to one second.
        assert_eq!(cut_in_half(&Window::fresh(0, Some(9)), 0), Cut::At(4));
        assert_eq!(cut_in_half(&Window::fresh(0, None), 100), Cut::At(49));
        assert_eq!(cut_in_half(&Window::fresh(7, Some(8)), 0), Cut::At(7));
        assert_eq!(cut_in_half(&Window::fresh(7, Some(7)), 0), Cut::Impossible);
        assert_eq!(cut_in_half(&Window::fresh(200, None), 100), Cut::Impossible);
    }
}

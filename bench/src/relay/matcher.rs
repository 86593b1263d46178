//! The client side's own idea of which subscription gets which event: NIP-01 filters over
//! interned pubkeys, tested by brute force (every filter against every event), so the
//! relay's deliveries can be checked pair by pair.

use serde_json::{json, Map, Value};

/// What matching needs of an event; pubkeys are indexes into the dataset's authors.
#[derive(Debug, Clone)]
pub struct EventKey {
    pub author: u32,
    pub kind: u16,
    /// The values of the event's `p` tags.
    pub p: Vec<u32>,
    pub created_at: u64,
}

/// A NIP-01 filter of the fields the benchmark uses; `None` leaves a field open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub authors: Option<Vec<u32>>,
    pub kinds: Option<Vec<u16>>,
    /// `#p`.
    pub p: Option<Vec<u32>>,
    pub since: Option<u64>,
    pub until: Option<u64>,
}

impl Filter {
    /// NIP-01: every field present must match (a list: any of its values).
    pub fn matches(&self, e: &EventKey) -> bool {
        self.authors.as_ref().is_none_or(|a| a.contains(&e.author))
            && self.kinds.as_ref().is_none_or(|k| k.contains(&e.kind))
            && self
                .p
                .as_ref()
                .is_none_or(|p| e.p.iter().any(|v| p.contains(v)))
            && self.since.is_none_or(|s| e.created_at >= s)
            && self.until.is_none_or(|u| e.created_at <= u)
    }

    /// The filter as sent, live only (`limit: 0`: no stored events before EOSE).
    pub fn to_json(&self, authors: &[String]) -> Value {
        let hex = |v: &[u32]| -> Vec<Value> {
            v.iter()
                .map(|&i| Value::String(authors[i as usize].clone()))
                .collect()
        };
        let mut m = Map::new();
        if let Some(a) = &self.authors {
            m.insert("authors".into(), Value::Array(hex(a)));
        }
        if let Some(k) = &self.kinds {
            m.insert("kinds".into(), json!(k));
        }
        if let Some(p) = &self.p {
            m.insert("#p".into(), Value::Array(hex(p)));
        }
        if let Some(s) = self.since {
            m.insert("since".into(), json!(s));
        }
        if let Some(u) = self.until {
            m.insert("until".into(), json!(u));
        }
        m.insert("limit".into(), json!(0));
        Value::Object(m)
    }
}

/// For each event, the subscriptions (indexes into `filters`) it must reach, ascending:
/// every filter tested against every event, split over the cores.
pub fn expected(filters: &[Filter], events: &[EventKey]) -> Vec<Vec<u32>> {
    crate::dataset::par_map(events, |_, e| {
        filters
            .iter()
            .enumerate()
            .filter(|(_, f)| f.matches(e))
            .map(|(i, _)| i as u32)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(author: u32, kind: u16, p: &[u32], t: u64) -> EventKey {
        EventKey {
            author,
            kind,
            p: p.to_vec(),
            created_at: t,
        }
    }

    #[test]
    fn fields_and_their_combination() {
        let e = ev(3, 1, &[5, 6], 100);
        let f = |f: Filter| f.matches(&e);
        assert!(f(Filter::default()));
        assert!(f(Filter {
            authors: Some(vec![1, 3]),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            authors: Some(vec![1]),
            ..Filter::default()
        }));
        assert!(f(Filter {
            p: Some(vec![6]),
            kinds: Some(vec![1, 7]),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            p: Some(vec![6]),
            kinds: Some(vec![7]),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            p: Some(vec![3]),
            ..Filter::default()
        }));
        assert!(f(Filter {
            since: Some(100),
            until: Some(100),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            since: Some(101),
            ..Filter::default()
        }));
    }

    #[test]
    fn expected_pairs_and_json() {
        let filters = vec![
            Filter {
                authors: Some(vec![0]),
                ..Filter::default()
            },
            Filter {
                p: Some(vec![0]),
                ..Filter::default()
            },
            Filter {
                kinds: Some(vec![7]),
                ..Filter::default()
            },
        ];
        let events = vec![ev(0, 1, &[1], 1), ev(1, 7, &[0], 2), ev(2, 1, &[], 3)];
        assert_eq!(
            expected(&filters, &events),
            vec![vec![0], vec![1, 2], vec![]]
        );
        let authors = vec!["aa".to_string(), "bb".to_string()];
        assert_eq!(
            filters[1].to_json(&authors),
            json!({"#p": ["aa"], "limit": 0})
        );
    }
}

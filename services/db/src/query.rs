//! SQL for NIP-01 filters, written once for both SQL backends ([`Dialect`] says how each
//! binds values).
//!
//! A filter with a limit is answered by walking one index in `created_at` order and stopping
//! at the limit. The index is chosen by the filter's most selective field — ids, then authors
//! (with kinds: the authors + kinds index), then one tag, then kinds, then time — and a list of
//! values (authors, kinds, tag values; up to [`MAX_EXPANDED_VALUES`]) becomes one limited
//! index walk per value, merged and cut to the limit: what each costs is the limit, not the
//! size of what matched. (A tag query used to be `serial IN (SELECT … FROM tags …)`, which costs
//! the tag's whole cardinality.) Without a limit (COUNT, negentropy sets) the filter is a plain
//! WHERE clause.

use crate::rules::{clamp_limit, NormFilter};

/// Lists longer than this are one IN-list instead of one index walk per value.
pub const MAX_EXPANDED_VALUES: usize = 64;

/// The columns every event query returns, in [`crate::RawEvent`] order.
pub const EVENT_COLS: &str = "e.serial, e.created_at, e.id, e.pubkey, e.kind, e.json";

/// One bound value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
    /// PostgreSQL arrays.
    Blobs(Vec<Vec<u8>>),
    Ints(Vec<i32>),
    Texts(Vec<String>),
}

/// How a backend writes placeholders and value lists. Binds are collected in the order the
/// SQL text is written (SQLite's `?` are positional).
pub trait Dialect {
    fn bind(&mut self, b: Bind) -> String;
    fn in_blobs(&mut self, col: &str, values: &[[u8; 32]]) -> String;
    fn in_ints(&mut self, col: &str, values: &[i64]) -> String;
    fn in_texts(&mut self, col: &str, values: &[String]) -> String;
    fn binds(&self) -> &[Bind];

    /// The event's author is `author`, written the way the backend's author indexes are
    /// walked.
    fn author_is(&mut self, author: &[u8; 32]) -> String {
        format!("e.pubkey = {}", self.bind(Bind::Blob(author.to_vec())))
    }

    /// The event's author is one of `authors`, likewise.
    fn author_in(&mut self, authors: &[[u8; 32]]) -> String {
        self.in_blobs("e.pubkey", authors)
    }
}

/// SQLite's author indexes hold this prefix of the pubkey (migration 0004): a walk goes down
/// it and compares the whole key on each row.
const SQLITE_AUTHOR_KEY: &str = "substr(e.pubkey, 1, 8)";

/// SQLite: `?` placeholders, `IN (?, …)` lists (or a JSON array for long ones).
#[derive(Debug, Default)]
pub struct Sqlite {
    pub binds: Vec<Bind>,
}

/// SQLite lists longer than this are passed as one JSON array (SQLite caps binds per statement).
const SQLITE_MAX_INLINE: usize = 256;

impl Sqlite {
    /// `col IN (…)` over byte strings: inline blobs, or one JSON array of hex for long lists.
    fn in_bytes<'v>(
        &mut self,
        col: &str,
        values: impl ExactSizeIterator<Item = &'v [u8]>,
    ) -> String {
        if values.len() > SQLITE_MAX_INLINE {
            let hexes: Vec<String> = values.map(hex::encode).collect();
            let p = self.bind(Bind::Text(serde_json::Value::from(hexes).to_string()));
            return format!("{col} IN (SELECT unhex(value) FROM json_each({p}))");
        }
        let ps: Vec<String> = values.map(|v| self.bind(Bind::Blob(v.to_vec()))).collect();
        format!("{col} IN ({})", ps.join(","))
    }
}

impl Dialect for Sqlite {
    fn bind(&mut self, b: Bind) -> String {
        self.binds.push(b);
        "?".into()
    }

    fn in_blobs(&mut self, col: &str, values: &[[u8; 32]]) -> String {
        self.in_bytes(col, values.iter().map(|v| v.as_slice()))
    }

    fn in_ints(&mut self, col: &str, values: &[i64]) -> String {
        if values.len() > SQLITE_MAX_INLINE {
            let p = self.bind(Bind::Text(
                serde_json::Value::from(values.to_vec()).to_string(),
            ));
            return format!("{col} IN (SELECT value FROM json_each({p}))");
        }
        let ps: Vec<String> = values.iter().map(|v| self.bind(Bind::Int(*v))).collect();
        format!("{col} IN ({})", ps.join(","))
    }

    fn in_texts(&mut self, col: &str, values: &[String]) -> String {
        if values.len() > SQLITE_MAX_INLINE {
            let p = self.bind(Bind::Text(
                serde_json::Value::from(values.to_vec()).to_string(),
            ));
            return format!("{col} IN (SELECT value FROM json_each({p}))");
        }
        let ps: Vec<String> = values
            .iter()
            .map(|v| self.bind(Bind::Text(v.clone())))
            .collect();
        format!("{col} IN ({})", ps.join(","))
    }

    fn binds(&self) -> &[Bind] {
        &self.binds
    }

    fn author_is(&mut self, author: &[u8; 32]) -> String {
        let prefix = self.bind(Bind::Blob(author[..8].to_vec()));
        let whole = self.bind(Bind::Blob(author.to_vec()));
        format!("{SQLITE_AUTHOR_KEY} = {prefix} AND e.pubkey = {whole}")
    }

    fn author_in(&mut self, authors: &[[u8; 32]]) -> String {
        let prefixes = self.in_bytes(SQLITE_AUTHOR_KEY, authors.iter().map(|a| &a[..8]));
        format!("{prefixes} AND {}", self.in_blobs("e.pubkey", authors))
    }
}

/// PostgreSQL: numbered placeholders, `= ANY($n)` over one array.
#[derive(Debug, Default)]
pub struct Postgres {
    pub binds: Vec<Bind>,
}

impl Dialect for Postgres {
    fn bind(&mut self, b: Bind) -> String {
        self.binds.push(b);
        format!("${}", self.binds.len())
    }

    fn in_blobs(&mut self, col: &str, values: &[[u8; 32]]) -> String {
        let p = self.bind(Bind::Blobs(values.iter().map(|v| v.to_vec()).collect()));
        format!("{col} = ANY({p})")
    }

    fn in_ints(&mut self, col: &str, values: &[i64]) -> String {
        let ints = values
            .iter()
            .map(|k| i32::try_from(*k).unwrap_or(-1))
            .collect();
        let p = self.bind(Bind::Ints(ints));
        format!("{col} = ANY({p})")
    }

    fn in_texts(&mut self, col: &str, values: &[String]) -> String {
        let p = self.bind(Bind::Texts(values.to_vec()));
        format!("{col} = ANY({p})")
    }

    fn binds(&self) -> &[Bind] {
        &self.binds
    }
}

/// The index a limited filter walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Ids,
    /// `events_author_created` (SQLite; `events_pubkey_created` on PostgreSQL), one walk
    /// per author.
    Authors,
    /// `events_author_kind_created` (SQLite; `events_pubkey_kind_created` on PostgreSQL),
    /// one walk per (author, kind).
    AuthorsKinds,
    /// The tags table's primary key, one walk per value of the tag at this index.
    Tag(usize),
    /// `events_kind_created`, one walk per kind.
    Kinds,
    /// `events_created`.
    Time,
}

/// The most selective field of a filter (see the module docs).
pub fn driver(f: &NormFilter) -> Driver {
    if !f.ids.is_empty() {
        Driver::Ids
    } else if !f.authors.is_empty() {
        if !f.kinds.is_empty() && f.authors.len() * f.kinds.len() <= MAX_EXPANDED_VALUES {
            Driver::AuthorsKinds
        } else {
            Driver::Authors
        }
    } else if !f.tags.is_empty() {
        let (i, _) = f
            .tags
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, values))| values.len())
            .unwrap_or((0, &f.tags[0]));
        Driver::Tag(i)
    } else if !f.kinds.is_empty() {
        Driver::Kinds
    } else {
        Driver::Time
    }
}

/// What the conditions leave out because the driving walk enforces it.
#[derive(Clone, Copy, Default)]
struct Skip {
    ids: bool,
    authors: bool,
    kinds: bool,
    tag: Option<usize>,
    /// since/until are on the walked tag rows.
    time: bool,
}

/// The conditions on `events e` a filter adds to its driving walk.
fn conditions(f: &NormFilter, skip: Skip, now: i64, d: &mut dyn Dialect) -> Vec<String> {
    let mut w = Vec::new();
    if !skip.ids && !f.ids.is_empty() {
        w.push(d.in_blobs("e.id", &f.ids));
    }
    if !skip.authors && !f.authors.is_empty() {
        w.push(d.author_in(&f.authors));
    }
    if !skip.kinds && !f.kinds.is_empty() {
        w.push(d.in_ints("e.kind", &f.kinds));
    }
    if !skip.time {
        if let Some(s) = f.since {
            w.push(format!("e.created_at >= {}", d.bind(Bind::Int(s))));
        }
        if let Some(u) = f.until {
            w.push(format!("e.created_at <= {}", d.bind(Bind::Int(u))));
        }
    }
    for (i, (name, values)) in f.tags.iter().enumerate() {
        if skip.tag == Some(i) {
            continue;
        }
        let alias = format!("t{i}");
        let n = d.bind(Bind::Text(name.clone()));
        let vals = d.in_texts(&format!("{alias}.value"), values);
        w.push(format!(
            "EXISTS (SELECT 1 FROM tags {alias} WHERE {alias}.serial = e.serial \
             AND {alias}.name = {n} AND {vals})"
        ));
    }
    w.push(format!(
        "(e.expires_at IS NULL OR e.expires_at > {})",
        d.bind(Bind::Int(now))
    ));
    w
}

/// `SELECT cols FROM events e WHERE …` of a filter, without order or limit: COUNT and
/// unlimited negentropy sets.
pub fn unlimited(f: &NormFilter, cols: &str, now: i64, d: &mut dyn Dialect) -> String {
    let w = conditions(f, Skip::default(), now, d);
    format!("SELECT {cols} FROM events e WHERE {}", w.join(" AND "))
}

fn walk_events(
    cols: &str,
    first: Vec<String>,
    rest: Vec<String>,
    limit: i64,
    d: &mut dyn Dialect,
) -> String {
    let w: Vec<String> = first.into_iter().chain(rest).collect();
    format!(
        "SELECT {cols} FROM events e WHERE {} ORDER BY e.created_at DESC, e.id ASC LIMIT {}",
        w.join(" AND "),
        d.bind(Bind::Int(limit))
    )
}

/// Joins limited walks into one ordered, limited result.
fn merge(parts: Vec<String>, limit: i64, d: &mut dyn Dialect) -> String {
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    let arms: Vec<String> = parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| format!("SELECT * FROM ({p}) AS w{i}"))
        .collect();
    format!(
        "SELECT * FROM ({}) AS m ORDER BY created_at DESC, id ASC LIMIT {}",
        arms.join(" UNION ALL "),
        d.bind(Bind::Int(limit))
    )
}

/// The newest `limit` events of a filter (see the module docs), columns `cols` from
/// `events e` (and `tags t` for a tag walk), ordered by `created_at DESC, id ASC`.
pub fn limited(f: &NormFilter, cols: &str, limit: u64, now: i64, d: &mut dyn Dialect) -> String {
    let limit = clamp_limit(limit);
    match driver(f) {
        Driver::Ids => {
            let first = vec![d.in_blobs("e.id", &f.ids)];
            let rest = conditions(
                f,
                Skip {
                    ids: true,
                    ..Skip::default()
                },
                now,
                d,
            );
            walk_events(cols, first, rest, limit, d)
        }
        Driver::Authors if f.authors.len() > MAX_EXPANDED_VALUES => {
            let first = vec![d.author_in(&f.authors)];
            let rest = conditions(
                f,
                Skip {
                    authors: true,
                    ..Skip::default()
                },
                now,
                d,
            );
            walk_events(cols, first, rest, limit, d)
        }
        Driver::Authors => {
            let mut parts = Vec::new();
            for a in &f.authors {
                let first = vec![d.author_is(a)];
                let rest = conditions(
                    f,
                    Skip {
                        authors: true,
                        ..Skip::default()
                    },
                    now,
                    d,
                );
                parts.push(walk_events(cols, first, rest, limit, d));
            }
            merge(parts, limit, d)
        }
        Driver::AuthorsKinds => {
            let mut parts = Vec::new();
            for a in &f.authors {
                for k in &f.kinds {
                    let first = vec![
                        d.author_is(a),
                        format!("e.kind = {}", d.bind(Bind::Int(*k))),
                    ];
                    let skip = Skip {
                        authors: true,
                        kinds: true,
                        ..Skip::default()
                    };
                    let rest = conditions(f, skip, now, d);
                    parts.push(walk_events(cols, first, rest, limit, d));
                }
            }
            merge(parts, limit, d)
        }
        Driver::Kinds if f.kinds.len() > MAX_EXPANDED_VALUES => {
            let first = vec![d.in_ints("e.kind", &f.kinds)];
            let rest = conditions(
                f,
                Skip {
                    kinds: true,
                    ..Skip::default()
                },
                now,
                d,
            );
            walk_events(cols, first, rest, limit, d)
        }
        Driver::Kinds => {
            let mut parts = Vec::new();
            for k in &f.kinds {
                let first = vec![format!("e.kind = {}", d.bind(Bind::Int(*k)))];
                let rest = conditions(
                    f,
                    Skip {
                        kinds: true,
                        ..Skip::default()
                    },
                    now,
                    d,
                );
                parts.push(walk_events(cols, first, rest, limit, d));
            }
            merge(parts, limit, d)
        }
        Driver::Time => {
            let rest = conditions(f, Skip::default(), now, d);
            walk_events(cols, Vec::new(), rest, limit, d)
        }
        Driver::Tag(i) => {
            let (name, values) = &f.tags[i];
            let skip = Skip {
                tag: Some(i),
                time: true,
                ..Skip::default()
            };
            // Binds go in text order (SQLite's `?` are positional): name, then value(s).
            let walk = |d: &mut dyn Dialect, values: &[String]| {
                let n = d.bind(Bind::Text(name.clone()));
                let value_cond = match values {
                    [one] => format!("t.value = {}", d.bind(Bind::Text(one.clone()))),
                    many => d.in_texts("t.value", many),
                };
                let mut w = vec![
                    format!("t.name = {n}"),
                    value_cond,
                    "e.serial = t.serial".into(),
                ];
                if let Some(s) = f.since {
                    w.push(format!("t.created_at >= {}", d.bind(Bind::Int(s))));
                }
                if let Some(u) = f.until {
                    w.push(format!("t.created_at <= {}", d.bind(Bind::Int(u))));
                }
                w.extend(conditions(f, skip, now, d));
                // CROSS JOIN keeps the tag rows the outer loop (SQLite reads it as a join
                // order), so the walk goes down the tag index and stops at the limit.
                format!(
                    "SELECT {cols} FROM tags t CROSS JOIN events e \
                     WHERE {} ORDER BY t.created_at DESC, e.id ASC LIMIT {}",
                    w.join(" AND "),
                    d.bind(Bind::Int(limit))
                )
            };
            if values.len() > MAX_EXPANDED_VALUES {
                return walk(d, values);
            }
            let mut parts = Vec::new();
            for v in values {
                parts.push(walk(d, std::slice::from_ref(v)));
            }
            merge(parts, limit, d)
        }
    }
}

/// Every filter of a query, each with its limit, as one statement ordered by
/// `created_at DESC, id ASC` (duplicates across filters are dropped by the caller).
pub fn union(arms: Vec<String>) -> Option<String> {
    match arms.len() {
        0 => None,
        1 => arms.into_iter().next(),
        _ => {
            let arms: Vec<String> = arms
                .into_iter()
                .enumerate()
                .map(|(i, a)| format!("SELECT * FROM ({a}) AS q{i}"))
                .collect();
            Some(format!(
                "{} ORDER BY created_at DESC, id ASC",
                arms.join(" UNION ALL ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f() -> NormFilter {
        NormFilter {
            limit: Some(10),
            ..NormFilter::default()
        }
    }

    #[test]
    fn the_driver_is_the_most_selective_field() {
        let mut x = f();
        assert_eq!(driver(&x), Driver::Time);
        x.kinds = vec![1];
        assert_eq!(driver(&x), Driver::Kinds);
        x.tags = vec![
            ("p".into(), vec!["a".into(), "b".into()]),
            ("e".into(), vec!["c".into()]),
        ];
        assert_eq!(driver(&x), Driver::Tag(1));
        x.authors = vec![[1; 32]];
        assert_eq!(driver(&x), Driver::AuthorsKinds);
        x.kinds = (0..65).collect();
        assert_eq!(driver(&x), Driver::Authors);
        x.ids = vec![[2; 32]];
        assert_eq!(driver(&x), Driver::Ids);
    }

    #[test]
    fn sqlite_binds_follow_the_text_and_postgres_numbers_them() {
        let mut x = f();
        x.authors = vec![[1; 32], [2; 32]];
        x.since = Some(5);
        let mut s = Sqlite::default();
        let sql = limited(&x, EVENT_COLS, 10, 100, &mut s);
        assert_eq!(sql.matches('?').count(), s.binds.len());
        assert!(sql.contains("UNION ALL"), "{sql}");
        let mut p = Postgres::default();
        let sql = limited(&x, EVENT_COLS, 10, 100, &mut p);
        assert!(sql.contains(&format!("${}", p.binds.len())), "{sql}");
        assert!(!sql.contains('?'));
    }
}

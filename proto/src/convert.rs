//! Conversions between nostr types and their protobuf shapes (`orlydb.v1` and
//! `orlysync.common.v1` carry the same Event/Filter fields, so one macro serves both).

use std::collections::BTreeSet;

use nostr::secp256k1::schnorr::Signature;
use nostr::{Event, EventId, Filter, Kind, PublicKey, SingleLetterTag, Tag, Tags, Timestamp};

/// A protobuf message that does not describe a valid nostr value.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl ToString) -> ConvertError {
    ConvertError::Invalid {
        field,
        reason: reason.to_string(),
    }
}

fn utf8(field: &'static str, bytes: Vec<u8>) -> Result<String, ConvertError> {
    String::from_utf8(bytes).map_err(|e| invalid(field, e))
}

macro_rules! event_conversions {
    ($m:path) => {
        use $m as pb;

        impl From<&Event> for pb::Event {
            fn from(e: &Event) -> Self {
                pb::Event {
                    id: e.id.as_bytes().to_vec(),
                    pubkey: e.pubkey.to_bytes().to_vec(),
                    created_at: e.created_at.as_secs() as i64,
                    kind: u32::from(e.kind.as_u16()),
                    tags: e
                        .tags
                        .iter()
                        .map(|t| pb::Tag {
                            values: t.as_slice().iter().map(|v| v.as_bytes().to_vec()).collect(),
                        })
                        .collect(),
                    content: e.content.as_bytes().to_vec(),
                    sig: e.sig.as_ref().to_vec(),
                }
            }
        }

        impl TryFrom<pb::Event> for Event {
            type Error = ConvertError;

            /// Rebuilds the event as it was signed; verification is the caller's choice.
            fn try_from(p: pb::Event) -> Result<Self, ConvertError> {
                let id = EventId::from_slice(&p.id).map_err(|e| invalid("id", e))?;
                let pubkey = PublicKey::from_slice(&p.pubkey).map_err(|e| invalid("pubkey", e))?;
                let kind = u16::try_from(p.kind).map_err(|e| invalid("kind", e))?;
                let created_at =
                    u64::try_from(p.created_at).map_err(|e| invalid("created_at", e))?;
                let sig = Signature::from_slice(&p.sig).map_err(|e| invalid("sig", e))?;
                let mut tags = Vec::with_capacity(p.tags.len());
                for t in p.tags {
                    let values = t
                        .values
                        .into_iter()
                        .map(|v| utf8("tag", v))
                        .collect::<Result<Vec<_>, _>>()?;
                    tags.push(Tag::parse(values).map_err(|e| invalid("tag", e))?);
                }
                Ok(Event::new(
                    id,
                    pubkey,
                    Timestamp::from(created_at),
                    Kind::from(kind),
                    Tags::from_list(tags),
                    utf8("content", p.content)?,
                    sig,
                ))
            }
        }

        impl From<&Filter> for pb::Filter {
            fn from(f: &Filter) -> Self {
                pb::Filter {
                    ids: f
                        .ids
                        .iter()
                        .flatten()
                        .map(|i| i.as_bytes().to_vec())
                        .collect(),
                    kinds: f
                        .kinds
                        .iter()
                        .flatten()
                        .map(|k| u32::from(k.as_u16()))
                        .collect(),
                    authors: f
                        .authors
                        .iter()
                        .flatten()
                        .map(|a| a.to_bytes().to_vec())
                        .collect(),
                    tags: f
                        .generic_tags
                        .iter()
                        .map(|(k, vals)| {
                            (
                                k.as_char().to_string(),
                                pb::TagSet {
                                    values: vals.iter().map(|v| v.as_bytes().to_vec()).collect(),
                                },
                            )
                        })
                        .collect(),
                    since: f.since.map(|t| t.as_secs() as i64),
                    until: f.until.map(|t| t.as_secs() as i64),
                    search: f.search.as_ref().map(|s| s.as_bytes().to_vec()),
                    limit: f.limit.map(|l| u32::try_from(l).unwrap_or(u32::MAX)),
                }
            }
        }

        impl TryFrom<pb::Filter> for Filter {
            type Error = ConvertError;

            // An empty repeated field means "no constraint", as an absent JSON key does.
            fn try_from(p: pb::Filter) -> Result<Self, ConvertError> {
                let mut f = Filter::new();
                if !p.ids.is_empty() {
                    f.ids = Some(
                        p.ids
                            .iter()
                            .map(|i| EventId::from_slice(i).map_err(|e| invalid("ids", e)))
                            .collect::<Result<BTreeSet<_>, _>>()?,
                    );
                }
                if !p.authors.is_empty() {
                    f.authors = Some(
                        p.authors
                            .iter()
                            .map(|a| PublicKey::from_slice(a).map_err(|e| invalid("authors", e)))
                            .collect::<Result<BTreeSet<_>, _>>()?,
                    );
                }
                if !p.kinds.is_empty() {
                    f.kinds = Some(
                        p.kinds
                            .iter()
                            .map(|k| {
                                u16::try_from(*k)
                                    .map(Kind::from)
                                    .map_err(|e| invalid("kinds", e))
                            })
                            .collect::<Result<BTreeSet<_>, _>>()?,
                    );
                }
                for (name, set) in p.tags {
                    let mut chars = name.chars();
                    let (Some(c), None) = (chars.next(), chars.next()) else {
                        return Err(invalid(
                            "tags",
                            format!("tag name {name:?} is not one letter"),
                        ));
                    };
                    let letter = SingleLetterTag::from_char(c).map_err(|e| invalid("tags", e))?;
                    let values = set
                        .values
                        .into_iter()
                        .map(|v| utf8("tags", v))
                        .collect::<Result<BTreeSet<_>, _>>()?;
                    f.generic_tags.insert(letter, values);
                }
                f.since = p
                    .since
                    .map(|s| u64::try_from(s).map(Timestamp::from))
                    .transpose()
                    .map_err(|e| invalid("since", e))?;
                f.until = p
                    .until
                    .map(|s| u64::try_from(s).map(Timestamp::from))
                    .transpose()
                    .map_err(|e| invalid("until", e))?;
                f.search = p.search.map(|s| utf8("search", s)).transpose()?;
                f.limit = p.limit.map(|l| l as usize);
                Ok(f)
            }
        }
    };
}

mod db {
    use super::*;
    event_conversions!(crate::orlydb::v1);
}

mod sync {
    use super::*;
    event_conversions!(crate::orlysync::common::v1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orlydb::v1 as pb;
    use nostr::{EventBuilder, JsonUtil, Keys};

    #[test]
    fn event_round_trips_through_protobuf() {
        let keys = Keys::generate();
        let event = EventBuilder::text_note("hello")
            .tags([
                Tag::parse(["t", "nostr"]).unwrap(),
                Tag::parse(["p", &keys.public_key().to_hex()]).unwrap(),
            ])
            .sign_with_keys(&keys)
            .unwrap();
        let back = Event::try_from(pb::Event::from(&event)).unwrap();
        assert_eq!(back.as_json(), event.as_json());
        back.verify().unwrap();
    }

    #[test]
    fn filter_round_trips_through_protobuf() {
        let keys = Keys::generate();
        let filter = Filter::new()
            .author(keys.public_key())
            .kinds([Kind::TextNote, Kind::Metadata])
            .hashtag("nostr")
            .since(Timestamp::from(10))
            .until(Timestamp::from(20))
            .limit(5);
        let back = Filter::try_from(pb::Filter::from(&filter)).unwrap();
        assert_eq!(back, filter);
    }

    #[test]
    fn malformed_protobuf_is_refused() {
        let bad = pb::Event {
            id: vec![1, 2, 3],
            ..Default::default()
        };
        assert!(Event::try_from(bad).is_err());
        let mut tags = std::collections::HashMap::new();
        tags.insert("xy".to_string(), pb::TagSet::default());
        let bad = pb::Filter {
            tags,
            ..Default::default()
        };
        assert!(Filter::try_from(bad).is_err());
    }
}

//! NIP-01 wire messages: parsing what clients send, formatting what the relay sends.

use nostr::Filter;
use serde_json::value::RawValue;

/// A client message after its outer shape has been checked.
#[derive(Debug)]
pub enum ClientMessage<'a> {
    Event(&'a RawValue),
    Req {
        sub_id: String,
        filters: Vec<&'a RawValue>,
    },
    Count {
        sub_id: String,
        filters: Vec<&'a RawValue>,
    },
    Close(String),
    Auth(&'a RawValue),
    /// NIP-77: `["NEG-OPEN", sub, filter, hex]`.
    NegOpen {
        sub_id: String,
        filter: &'a RawValue,
        message: String,
    },
    /// NIP-77: `["NEG-MSG", sub, hex]`.
    NegMsg {
        sub_id: String,
        message: String,
    },
    /// NIP-77: `["NEG-CLOSE", sub]`.
    NegClose(String),
}

/// Why a message could not be understood; sent back as `NOTICE "invalid: ..."`, or as a
/// CLOSED when the subscription id is known.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError {
    pub sub_id: Option<String>,
    pub message: String,
    /// The error answers a NIP-77 message: reply NEG-ERR, not CLOSED.
    pub negentropy: bool,
}

fn err(sub_id: Option<String>, message: impl Into<String>) -> ParseError {
    ParseError {
        sub_id,
        message: message.into(),
        negentropy: false,
    }
}

fn neg_err(sub_id: String, message: impl Into<String>) -> ParseError {
    ParseError {
        sub_id: Some(sub_id),
        message: message.into(),
        negentropy: true,
    }
}

/// A hex payload of a NEG-OPEN or NEG-MSG (decoded later, so its error names the session).
fn neg_payload(sub_id: &str, raw: Option<&&RawValue>) -> Result<String, ParseError> {
    let raw = raw.ok_or_else(|| neg_err(sub_id.into(), "invalid: missing negentropy message"))?;
    serde_json::from_str(raw.get()).map_err(|_| {
        neg_err(
            sub_id.into(),
            "invalid: negentropy message must be a hex string",
        )
    })
}

/// Longest subscription id NIP-01 allows.
pub const MAX_SUB_ID_LEN: usize = 64;

fn sub_id(raw: Option<&&RawValue>) -> Result<String, ParseError> {
    let raw = raw.ok_or_else(|| err(None, "invalid: missing subscription id"))?;
    let id: String = serde_json::from_str(raw.get())
        .map_err(|_| err(None, "invalid: subscription id must be a string"))?;
    if id.is_empty() || id.chars().count() > MAX_SUB_ID_LEN {
        return Err(err(
            None,
            format!("invalid: subscription id must be 1 to {MAX_SUB_ID_LEN} characters"),
        ));
    }
    Ok(id)
}

/// Splits a text frame into a [`ClientMessage`] without parsing events or filters yet.
pub fn parse(text: &str) -> Result<ClientMessage<'_>, ParseError> {
    let parts: Vec<&RawValue> = serde_json::from_str(text)
        .map_err(|e| err(None, format!("invalid: malformed JSON message: {e}")))?;
    let Some(first) = parts.first() else {
        return Err(err(None, "invalid: empty message"));
    };
    let kind: String = serde_json::from_str(first.get())
        .map_err(|_| err(None, "invalid: message type must be a string"))?;
    match kind.as_str() {
        "EVENT" => match parts.as_slice() {
            [_, ev] => Ok(ClientMessage::Event(ev)),
            _ => Err(err(None, "invalid: EVENT takes exactly one event")),
        },
        "REQ" | "COUNT" => {
            let id = sub_id(parts.get(1))?;
            let filters = parts[2..].to_vec();
            if filters.is_empty() {
                return Err(err(
                    Some(id),
                    format!("invalid: {kind} needs at least one filter"),
                ));
            }
            Ok(if kind == "REQ" {
                ClientMessage::Req {
                    sub_id: id,
                    filters,
                }
            } else {
                ClientMessage::Count {
                    sub_id: id,
                    filters,
                }
            })
        }
        "CLOSE" => match parts.as_slice() {
            [_, _] => Ok(ClientMessage::Close(sub_id(parts.get(1))?)),
            _ => Err(err(
                None,
                "invalid: CLOSE takes exactly one subscription id",
            )),
        },
        "AUTH" => match parts.as_slice() {
            [_, ev] => Ok(ClientMessage::Auth(ev)),
            _ => Err(err(None, "invalid: AUTH takes exactly one event")),
        },
        "NEG-OPEN" => {
            let id = sub_id(parts.get(1))?;
            match parts.as_slice() {
                [_, _, filter, _] => Ok(ClientMessage::NegOpen {
                    message: neg_payload(&id, parts.get(3))?,
                    filter,
                    sub_id: id,
                }),
                _ => Err(neg_err(
                    id,
                    "invalid: NEG-OPEN takes a subscription id, a filter and a message",
                )),
            }
        }
        "NEG-MSG" => {
            let id = sub_id(parts.get(1))?;
            match parts.as_slice() {
                [_, _, _] => Ok(ClientMessage::NegMsg {
                    message: neg_payload(&id, parts.get(2))?,
                    sub_id: id,
                }),
                _ => Err(neg_err(
                    id,
                    "invalid: NEG-MSG takes a subscription id and a message",
                )),
            }
        }
        "NEG-CLOSE" => Ok(ClientMessage::NegClose(sub_id(parts.get(1))?)),
        other => Err(err(
            None,
            format!("invalid: unknown message type {:?}", truncate(other, 32)),
        )),
    }
}

/// Parses one filter object; a filter must be a JSON object.
pub fn parse_filter(raw: &RawValue) -> Result<Filter, String> {
    if !raw.get().trim_start().starts_with('{') {
        return Err("invalid: a filter must be a JSON object".into());
    }
    serde_json::from_str::<Filter>(raw.get()).map_err(|e| format!("invalid: bad filter: {e}"))
}

/// Finds the `"id"` of an EVENT that could not be parsed whole, so the OK can name it.
pub fn sniff_event_id(text: &str) -> Option<String> {
    let at = text.find("\"id\"")?;
    let rest = text[at + 4..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let id = rest.get(..64)?;
    (id.bytes().all(|b| b.is_ascii_hexdigit()) && rest[64..].starts_with('"'))
        .then(|| id.to_ascii_lowercase())
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `["EVENT",<sub>,<json>]`, allocated at its exact size: these frames wait in the outboxes
/// of slow readers, and `format!` would leave up to half of each allocation unused (the
/// closing `]` doubles the buffer), twice the memory the byte budgets account for.
pub fn event_message(sub_id: &str, event_json: &str) -> String {
    let sub = quote(sub_id);
    let mut out = String::with_capacity(10 + sub.len() + event_json.len() + 1);
    out.push_str("[\"EVENT\",");
    out.push_str(&sub);
    out.push(',');
    out.push_str(event_json);
    out.push(']');
    out
}

pub fn ok_message(event_id: &str, accepted: bool, message: &str) -> String {
    format!(
        "[\"OK\",{},{},{}]",
        quote(event_id),
        accepted,
        quote(message)
    )
}

pub fn eose_message(sub_id: &str) -> String {
    format!("[\"EOSE\",{}]", quote(sub_id))
}

pub fn closed_message(sub_id: &str, message: &str) -> String {
    format!("[\"CLOSED\",{},{}]", quote(sub_id), quote(message))
}

pub fn notice_message(message: &str) -> String {
    format!("[\"NOTICE\",{}]", quote(message))
}

pub fn count_message(sub_id: &str, count: u64) -> String {
    format!("[\"COUNT\",{},{{\"count\":{count}}}]", quote(sub_id))
}

pub fn neg_msg_message(sub_id: &str, hex_message: &str) -> String {
    format!("[\"NEG-MSG\",{},{}]", quote(sub_id), quote(hex_message))
}

pub fn neg_err_message(sub_id: &str, reason: &str) -> String {
    format!("[\"NEG-ERR\",{},{}]", quote(sub_id), quote(reason))
}

pub fn auth_message(challenge: &str) -> String {
    format!("[\"AUTH\",{}]", quote(challenge))
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_frames_are_allocated_at_their_size() {
        let json = format!(r#"{{"content":"{}"}}"#, "x".repeat(600));
        let frame = event_message("sub \"1\"", &json);
        assert_eq!(frame, format!(r#"["EVENT","sub \"1\"",{json}]"#));
        assert_eq!(frame.capacity(), frame.len());
    }

    use super::*;

    #[test]
    fn parses_each_message_type() {
        assert!(matches!(
            parse(r#"["EVENT",{}]"#),
            Ok(ClientMessage::Event(_))
        ));
        match parse(r#"["REQ","s",{"kinds":[1]},{"limit":2}]"#).unwrap() {
            ClientMessage::Req { sub_id, filters } => {
                assert_eq!(sub_id, "s");
                assert_eq!(filters.len(), 2);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse(r#"["COUNT","c",{}]"#),
            Ok(ClientMessage::Count { .. })
        ));
        assert!(matches!(parse(r#"["CLOSE","s"]"#), Ok(ClientMessage::Close(s)) if s == "s"));
        assert!(matches!(
            parse(r#"["AUTH",{}]"#),
            Ok(ClientMessage::Auth(_))
        ));
    }

    #[test]
    fn refuses_bad_shapes_with_invalid_prefix() {
        for bad in [
            "not json",
            "{}",
            "[]",
            "[1,2]",
            r#"["EVENT"]"#,
            r#"["EVENT",{},{}]"#,
            r#"["REQ"]"#,
            r#"["REQ",5,{}]"#,
            r#"["CLOSE"]"#,
            r#"["HELLO"]"#,
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.message.starts_with("invalid: "), "{bad}: {}", e.message);
        }
        let long = "x".repeat(65);
        assert!(parse(&format!(r#"["REQ","{long}",{{}}]"#)).is_err());
        let e = parse(r#"["REQ","s"]"#).unwrap_err();
        assert_eq!(e.sub_id.as_deref(), Some("s"));
    }

    #[test]
    fn filters_must_be_objects() {
        let raw: Box<RawValue> = serde_json::from_str("[1]").unwrap();
        assert!(parse_filter(&raw).is_err());
        let raw: Box<RawValue> = serde_json::from_str(r#"{"limit":-1}"#).unwrap();
        assert!(parse_filter(&raw).is_err());
        let raw: Box<RawValue> = serde_json::from_str(r##"{"kinds":[1],"#p":["ab"]}"##).unwrap();
        assert!(parse_filter(&raw).is_ok());
    }

    #[test]
    fn sniffs_event_ids_from_broken_events() {
        let id = "a".repeat(64);
        assert_eq!(
            sniff_event_id(&format!(r#"["EVENT",{{"id" : "{id}","sig":5}}]"#)),
            Some(id)
        );
        assert_eq!(sniff_event_id(r#"["EVENT",{"id":"zz"}]"#), None);
    }

    #[test]
    fn formats_relay_messages() {
        assert_eq!(
            ok_message("ab", false, "invalid: x"),
            r#"["OK","ab",false,"invalid: x"]"#
        );
        assert_eq!(count_message("c", 3), r#"["COUNT","c",{"count":3}]"#);
        assert_eq!(closed_message("s\"", "m"), r#"["CLOSED","s\"","m"]"#);
    }
}

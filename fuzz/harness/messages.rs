//! Client messages and filters (`orly::message`): the promises checked by the property tests
//! (`services/relay/tests/fuzz_messages.rs`) and the cargo-fuzz targets `messages` and
//! `filters`, which include this file. Each function panics only when a promise is broken.

use nostr::Filter;
use orly::message::{self, ClientMessage, ParseError, MAX_SUB_ID_LEN};
use serde_json::value::RawValue;
use serde_json::Value;

/// Arbitrary bytes as a WebSocket text frame (text frames are UTF-8: others never reach the
/// parser).
pub fn messages(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = check_message(text);
    }
}

/// Arbitrary bytes as one filter of a REQ.
pub fn filters(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(raw) = serde_json::from_str::<&RawValue>(text) {
        let _ = check_filter(raw);
    }
}

/// Parses `text` as a client message and checks what the relay would answer: every refusal
/// starts with `invalid: `, names a valid subscription id or none, and formats into a reply
/// that reads back as the same strings; every filter of a REQ, COUNT or NEG-OPEN holds to
/// [`check_filter`]. Returns the parse for further checks.
pub fn check_message(text: &str) -> Result<ClientMessage<'_>, ParseError> {
    if let Some(id) = message::sniff_event_id(text) {
        assert!(
            id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "sniffed event id {id:?} from {text:?}"
        );
    }
    let parsed = message::parse(text);
    match &parsed {
        Err(e) => {
            assert!(
                e.message.starts_with("invalid: "),
                "refusal without the invalid: prefix: {:?} for {text:?}",
                e.message
            );
            if let Some(sub) = &e.sub_id {
                assert_sub_id(sub, text);
            }
            assert!(
                !e.negentropy || e.sub_id.is_some(),
                "NEG-ERR without a subscription id for {text:?}"
            );
            let reply = match &e.sub_id {
                Some(sub) if e.negentropy => message::neg_err_message(sub, &e.message),
                Some(sub) => message::closed_message(sub, &e.message),
                None => message::notice_message(&e.message),
            };
            let mut want = vec![match (&e.sub_id, e.negentropy) {
                (Some(_), true) => "NEG-ERR",
                (Some(_), false) => "CLOSED",
                (None, _) => "NOTICE",
            }
            .to_string()];
            want.extend(e.sub_id.clone());
            want.push(e.message.clone());
            assert_eq!(reads_as_strings(&reply), Some(want), "reply {reply}");
        }
        Ok(ClientMessage::Req { sub_id, filters } | ClientMessage::Count { sub_id, filters }) => {
            assert_sub_id(sub_id, text);
            assert!(!filters.is_empty(), "REQ/COUNT without filters: {text:?}");
            for f in filters {
                let _ = check_filter(f);
            }
            let eose = message::eose_message(sub_id);
            assert_eq!(
                reads_as_strings(&eose),
                Some(vec!["EOSE".to_string(), sub_id.clone()])
            );
        }
        Ok(ClientMessage::Close(sub_id) | ClientMessage::NegClose(sub_id)) => {
            assert_sub_id(sub_id, text);
        }
        Ok(ClientMessage::NegOpen {
            sub_id,
            filter,
            message: hex,
        }) => {
            assert_sub_id(sub_id, text);
            let _ = check_filter(filter);
            let _ = hex::decode(hex);
        }
        Ok(ClientMessage::NegMsg {
            sub_id,
            message: hex,
        }) => {
            assert_sub_id(sub_id, text);
            let _ = hex::decode(hex);
        }
        Ok(ClientMessage::Event(raw) | ClientMessage::Auth(raw)) => {
            assert!(serde_json::from_str::<Value>(raw.get()).is_ok());
        }
    }
    parsed
}

/// Parses one filter: a refusal starts with `invalid: `; a filter that parses serializes to
/// JSON that parses back to the same filter.
pub fn check_filter(raw: &RawValue) -> Result<Filter, String> {
    let parsed = message::parse_filter(raw);
    match &parsed {
        Err(e) => assert!(
            e.starts_with("invalid: "),
            "filter refusal without the invalid: prefix: {e:?} for {}",
            raw.get()
        ),
        Ok(filter) => {
            let json = serde_json::to_string(filter).expect("a filter serializes");
            let again: Box<RawValue> = serde_json::from_str(&json).expect("serialized JSON");
            assert_eq!(
                message::parse_filter(&again).as_ref(),
                Ok(filter),
                "filter {} re-serialized as {json}",
                raw.get()
            );
        }
    }
    parsed
}

fn assert_sub_id(sub: &str, text: &str) {
    let n = sub.chars().count();
    assert!(
        (1..=MAX_SUB_ID_LEN).contains(&n),
        "subscription id of {n} characters accepted from {text:?}"
    );
}

/// A relay message read back as a list of strings (`None` if it is anything else).
fn reads_as_strings(reply: &str) -> Option<Vec<String>> {
    serde_json::from_str(reply).ok()
}

//! Privileged kinds: direct messages, seals, gift wraps and the like, served only to the
//! parties (author or a `p`-tagged recipient) once authenticated, and to admins.

use nostr::{Event, Kind, PublicKey};

/// ORLY's `kind.Privileged`: 4, 13, 14, 15, 1059, 1060, 443, 10051, 13004, 30078, 40–44.
pub const PRIVILEGED_KINDS: &[u16] = &[
    4, 13, 14, 15, 40, 41, 42, 43, 44, 443, 1059, 1060, 10051, 13004, 30078,
];

pub fn is_privileged(kind: Kind) -> bool {
    PRIVILEGED_KINDS.contains(&kind.as_u16())
}

/// May a connection authenticated as `authed` see `event`? Non-privileged events: always.
/// Privileged ones: when an authenticated key is the author, a `p`-tagged recipient, or one
/// of `readers` (owners and admins).
pub fn may_see(event: &Event, authed: &[PublicKey], readers: &[PublicKey]) -> bool {
    if !is_privileged(event.kind) {
        return true;
    }
    authed.iter().any(|pk| {
        *pk == event.pubkey || readers.contains(pk) || event.tags.public_keys().any(|p| p == pk)
    })
}

/// The kind of an `["EVENT", sub, {…}]` message as the relay serializes it, without parsing
/// the whole message: the first `"kind":` key (ids and pubkeys before it are hex, and quotes
/// inside strings are escaped, so no string can contain it).
pub fn sniff_kind(message: &str) -> Option<u16> {
    let at = message.find("\"kind\":")? + 7;
    let digits: String = message[at..]
        .chars()
        .skip_while(|c| *c == ' ')
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, JsonUtil, Keys, Tag};

    #[test]
    fn only_parties_see_privileged_events() {
        let (alice, bob, eve, admin) = (
            Keys::generate(),
            Keys::generate(),
            Keys::generate(),
            Keys::generate(),
        );
        let dm = EventBuilder::new(Kind::EncryptedDirectMessage, "x")
            .tags([Tag::public_key(bob.public_key())])
            .sign_with_keys(&alice)
            .unwrap();
        let readers = [admin.public_key()];
        assert!(may_see(&dm, &[alice.public_key()], &readers));
        assert!(may_see(&dm, &[bob.public_key()], &readers));
        assert!(may_see(&dm, &[admin.public_key()], &readers));
        assert!(!may_see(&dm, &[eve.public_key()], &readers));
        assert!(!may_see(&dm, &[], &readers));
        let note = EventBuilder::text_note("\"kind\":4")
            .sign_with_keys(&eve)
            .unwrap();
        assert!(may_see(&note, &[], &readers));

        let msg = format!(r#"["EVENT","s\"kind\":4",{}]"#, note.as_json());
        assert_eq!(sniff_kind(&msg), Some(1));
        let msg = format!(r#"["EVENT","s",{}]"#, dm.as_json());
        assert_eq!(sniff_kind(&msg), Some(4));
    }
}

//! Parsers for configuration values shared by every binary's flags and env vars.

use std::time::Duration;

use nostr::{FromBech32, PublicKey};

/// Parses "30s", "5m", "1h30m", or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Parses a public key given as 64 hex characters or as an npub.
pub fn parse_pubkey(s: &str) -> Result<PublicKey, String> {
    let s = s.trim();
    if s.starts_with("npub1") {
        PublicKey::from_bech32(s).map_err(|e| format!("invalid npub {s:?}: {e}"))
    } else {
        PublicKey::from_hex(s).map_err(|e| format!("invalid pubkey {s:?}: {e}"))
    }
}

/// Parses a comma-separated list of public keys (hex or npub); empty entries are skipped.
pub fn parse_pubkey_list(s: &str) -> Result<Vec<PublicKey>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(parse_pubkey)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn pubkeys_accept_hex_and_npub() {
        let keys = nostr::Keys::generate();
        let hex = keys.public_key().to_hex();
        let npub = nostr::ToBech32::to_bech32(&keys.public_key()).unwrap();
        let list = parse_pubkey_list(&format!("{hex}, {npub},")).unwrap();
        assert_eq!(list, vec![keys.public_key(), keys.public_key()]);
        assert!(parse_pubkey("nope").is_err());
    }
}

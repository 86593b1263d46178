//! Access decisions: the relay asks an [`Acl`] before every write and read. The default,
//! mode `none`, allows everything; the orly-acl service supplies the other modes.

use std::net::IpAddr;

use async_trait::async_trait;
use nostr::{Event, Filter, PublicKey};

/// Who is asking: the connection's NIP-42 identities and its address.
#[derive(Debug, Clone, Copy)]
pub struct AccessContext<'a> {
    pub authed: &'a [PublicKey],
    pub ip: IpAddr,
}

/// An access decision; a refusal carries its NIP-01 prefix (`blocked:`, `restricted:`,
/// `auth-required:`, `error:`), ready for an OK or CLOSED message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

#[async_trait]
pub trait Acl: Send + Sync + 'static {
    /// The configured mode, as listed in NIP-11 and logs.
    fn mode(&self) -> &str;
    /// May this connection publish this (verified) event?
    async fn check_write(&self, ctx: &AccessContext<'_>, event: &Event) -> Decision;
    /// May this connection read with these filters?
    async fn check_read(&self, ctx: &AccessContext<'_>, filters: &[Filter]) -> Decision;
    /// Called after an event was stored, so the ACL can follow changes it cares about (an
    /// admin's new follow list). Must return quickly; the default does nothing.
    async fn on_event_stored(&self, _event: &Event) {}
}

/// Mode `none`: an open relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct OpenAcl;

#[async_trait]
impl Acl for OpenAcl {
    fn mode(&self) -> &str {
        "none"
    }

    async fn check_write(&self, _ctx: &AccessContext<'_>, _event: &Event) -> Decision {
        Decision::Allow
    }

    async fn check_read(&self, _ctx: &AccessContext<'_>, _filters: &[Filter]) -> Decision {
        Decision::Allow
    }
}

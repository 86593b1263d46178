//! TEMPORARY (removed before commit): lets the crate compile while backends are written.
#[macro_export]
macro_rules! unbuilt_store {
    ($t:ident) => {
        pub struct $t;
        #[async_trait::async_trait]
        impl $crate::EventStore for $t {
            async fn ping(&self) -> $crate::Result<()> { Err(e()) }
            async fn save_event(&self, _: &nostr::Event) -> $crate::Result<$crate::SaveOutcome> { Err(e()) }
            async fn query(&self, _: &[nostr::Filter]) -> $crate::Result<Vec<nostr::Event>> { Err(e()) }
            async fn count(&self, _: &[nostr::Filter]) -> $crate::Result<u64> { Err(e()) }
            async fn fetch_by_ids(&self, _: &[nostr::EventId]) -> $crate::Result<Vec<nostr::Event>> { Err(e()) }
            async fn negentropy_items(&self, _: &[nostr::Filter]) -> $crate::Result<Vec<(nostr::Timestamp, nostr::EventId)>> { Err(e()) }
            async fn delete_event(&self, _: &nostr::EventId) -> $crate::Result<bool> { Err(e()) }
            async fn delete_expired(&self) -> $crate::Result<u64> { Err(e()) }
            async fn latest_serial(&self) -> $crate::Result<u64> { Err(e()) }
            async fn ids_by_serial_range(&self, _: u64, _: u64, _: u32) -> $crate::Result<Vec<$crate::SerialEntry>> { Err(e()) }
            async fn fetch_by_serials(&self, _: &[u64]) -> $crate::Result<Vec<(u64, nostr::Event)>> { Err(e()) }
            async fn serial_by_id(&self, _: &nostr::EventId) -> $crate::Result<Option<u64>> { Err(e()) }
            async fn relay_identity_secret(&self) -> $crate::Result<[u8; 32]> { Err(e()) }
            async fn set_marker(&self, _: &str, _: &[u8]) -> $crate::Result<()> { Err(e()) }
            async fn get_marker(&self, _: &str) -> $crate::Result<Option<Vec<u8>>> { Err(e()) }
            async fn delete_marker(&self, _: &str) -> $crate::Result<()> { Err(e()) }
            async fn list_markers(&self, _: &str) -> $crate::Result<Vec<(String, Vec<u8>)>> { Err(e()) }
            async fn acquire_lease(&self, _: &str, _: &str, _: i64) -> $crate::Result<$crate::LeaseState> { Err(e()) }
            async fn release_lease(&self, _: &str, _: &str) -> $crate::Result<()> { Err(e()) }
        }
        fn e() -> $crate::StoreError { $crate::StoreError::Unavailable("backend not built yet".into()) }
    };
}

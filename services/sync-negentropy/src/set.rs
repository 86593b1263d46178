//! The set negentropy reconciles: the `(created_at, id)` records of a filter, read from the
//! store without loading whole events and refused past a cap, and the sealed negentropy
//! storage built from them. Client sessions ([`crate::engine`]), the client side
//! ([`crate::handler::reconcile_as_client`]) and the peer sync ([`crate::peer_sync`]) all build
//! their sets here.

use negentropy::{Id, NegentropyStorageVector};
use nostr::{EventId, Filter, Timestamp};
use orly_db::SharedStore;

/// Why the set for a filter could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the filter matches more than {0} events")]
    TooMany(usize),
    #[error("storage: {0}")]
    Store(#[from] orly_db::StoreError),
}

/// The `(created_at, id)` set of `filter`, refusing more than `max_records` (0: no cap) without
/// reading past the cap: a filter with no limit, or one above the cap, is asked for cap + 1.
pub async fn load_items(
    store: &SharedStore,
    filter: &Filter,
    max_records: usize,
) -> Result<Vec<(Timestamp, EventId)>, LoadError> {
    let mut f = filter.clone();
    if max_records > 0 && f.limit.is_none_or(|l| l > max_records) {
        f.limit = Some(max_records.saturating_add(1));
    }
    let items = store.negentropy_items(std::slice::from_ref(&f)).await?;
    if max_records > 0 && items.len() > max_records {
        return Err(LoadError::TooMany(max_records));
    }
    Ok(items)
}

/// A sealed negentropy storage holding `items`.
pub fn build_storage(
    items: &[(Timestamp, EventId)],
) -> Result<NegentropyStorageVector, negentropy::Error> {
    let mut storage = NegentropyStorageVector::with_capacity(items.len());
    for (ts, id) in items {
        storage.insert(ts.as_secs(), Id::from_byte_array(id.to_bytes()))?;
    }
    storage.seal()?;
    Ok(storage)
}

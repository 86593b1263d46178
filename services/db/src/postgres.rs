//! TEMPORARY stub: the PostgreSQL backend replaces this file.
crate::unbuilt_store!(PostgresStore);
impl PostgresStore {
    pub async fn connect(_url: &str, _max_connections: u32) -> crate::Result<Self> { Err(e()) }
}

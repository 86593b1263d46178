//! TEMPORARY stub: the SQLite backend replaces this file.
crate::unbuilt_store!(SqliteStore);
impl SqliteStore {
    pub async fn open(_path: &std::path::Path) -> crate::Result<Self> { Err(e()) }
}

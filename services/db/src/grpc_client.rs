//! TEMPORARY stub: the gRPC client replaces this file.
crate::unbuilt_store!(GrpcStore);
impl GrpcStore {
    pub fn connect_lazy(_addr: &str, _timeout: std::time::Duration) -> crate::Result<Self> { Err(e()) }
}

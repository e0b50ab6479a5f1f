//! PLACEHOLDER until the SMTP module lands.
pub enum EnqueueError {
    Temporary(String),
    Permanent(String),
}
pub trait Enqueuer: Send + Sync + 'static {
    fn next_id(&self) -> String;
    fn enqueue(
        &self,
        id: String,
        envelope: crate::envelope::Envelope,
        body: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), EnqueueError>> + Send;
}
pub struct SmtpConfig {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub command_timeout: std::time::Duration,
    pub data_timeout: std::time::Duration,
    pub max_errors: u32,
    pub max_connections: usize,
    pub relay: RelayPolicy,
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}
pub struct RelayPolicy {
    pub local_domains: Vec<String>,
    pub relay_domains: Vec<String>,
    pub relay_networks: Vec<ipnet::IpNet>,
}
pub async fn serve<E: Enqueuer>(
    _listener: tokio::net::TcpListener,
    _config: std::sync::Arc<SmtpConfig>,
    _enqueuer: std::sync::Arc<E>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let _ = shutdown.wait_for(|s| *s).await;
    Ok(())
}

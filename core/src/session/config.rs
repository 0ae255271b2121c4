//! The settings a session is created with ([`SessionConfig`]) and the
//! backend TLS policy among them.

use std::time::Duration;

use bytes::Bytes;

use super::protect::ProtectConfig;
use crate::flags::{CapabilityFlags, MariaDbCapabilities};
use crate::proxy_protocol::ProxyHeader;

/// When the proxy uses TLS towards backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendTls {
    /// Never.
    #[default]
    Off,
    /// When the client used TLS and the backend offers it (TiProxy's default).
    MatchClient,
    /// Always; a backend without TLS is an error (`require-backend-tls`).
    Required,
}

/// Settings of one session, fixed at creation.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Connection id shown to the client (allocated by the proxy).
    pub connection_id: u32,
    /// Server version announced to the client; taken from a backend.
    pub server_version: Bytes,
    /// Capabilities announced to the client. Intersected with
    /// [`CapabilityFlags::PROXY_SUPPORTED`]; the driver removes what the
    /// backends lack (learned from their greetings) and `SSL` when no server
    /// certificate is configured.
    pub capabilities: CapabilityFlags,
    /// MariaDB extended capabilities announced to the client (the backends'
    /// offer), within [`MariaDbCapabilities::PROXY_SUPPORTED`]; when any
    /// remain the greeting clears `CLIENT_MYSQL`. Empty for TiDB and MySQL.
    pub mariadb_capabilities: MariaDbCapabilities,
    /// Collation announced in the greeting.
    pub charset: u8,
    /// Whether the client may upgrade to TLS.
    pub server_tls: bool,
    /// TLS towards backends.
    pub backend_tls: BackendTls,
    /// PROXY v2 header written before every backend handshake (boxed: most
    /// deployments have none, and every session carries this config).
    pub proxy_header: Option<Box<ProxyHeader>>,
    /// Largest handshake packet accepted from a client.
    pub max_handshake_len: usize,
    /// Time allowed from accept to an authenticated session.
    pub handshake_timeout: Duration,
    /// Time allowed for one move.
    pub migration_timeout: Duration,
    /// Use zlib compression towards backends that support it.
    pub compress_backend: bool,
    /// Read budget: a leg is not read while the session holds this many
    /// bytes towards the other side (`proxy.conn-buffer-size`).
    pub buffer_limit: usize,
    /// Crash protection ([`super::protect`]).
    pub protect: ProtectConfig,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            connection_id: 1,
            server_version: Bytes::from_static(b"8.0.11-TiDB-v8.5.0"),
            capabilities: CapabilityFlags::PROXY_SUPPORTED - CapabilityFlags::SSL,
            mariadb_capabilities: MariaDbCapabilities::empty(),
            charset: 46,
            server_tls: false,
            backend_tls: BackendTls::Off,
            proxy_header: None,
            max_handshake_len: 64 * 1024,
            handshake_timeout: Duration::from_secs(15),
            migration_timeout: Duration::from_secs(10),
            compress_backend: false,
            buffer_limit: 32 * 1024,
            protect: ProtectConfig::default(),
        }
    }
}

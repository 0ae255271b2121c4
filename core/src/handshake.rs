//! Connection-phase packets: the server's initial handshake (v10), the
//! client's handshake response (4.1), the SSL request, auth switch request
//! and auth more data. Each is parsed in exactly one function and built in
//! exactly one function. MariaDB extended capabilities ride in the
//! greeting's reserved area and the response's filler (see
//! [`MariaDbCapabilities`]) and are typed fields here.

use bytes::{BufMut, Bytes, BytesMut};

use crate::flags::{CapabilityFlags, MariaDbCapabilities, StatusFlags};
use crate::wire::{Reader, WireError, put_lenenc_bytes, put_nul_bytes};

/// Auth plugin names the proxy knows by name.
pub mod plugin {
    /// mysql_native_password.
    pub const NATIVE_PASSWORD: &str = "mysql_native_password";
    /// caching_sha2_password.
    pub const CACHING_SHA2: &str = "caching_sha2_password";
    /// mysql_clear_password.
    pub const CLEAR_PASSWORD: &str = "mysql_clear_password";
    /// TiDB's session token plugin, used to re-authenticate a migrated session.
    pub const TIDB_SESSION_TOKEN: &str = "tidb_session_token";
    /// A plugin name no server implements. The proxy names it in the
    /// handshake response it relays, so the backend answers with an auth
    /// switch request carrying its own salt and the client re-computes its
    /// auth data for that salt: the proxy never needs the password.
    pub const FORCE_SWITCH: &str = "auth_unknown_plugin";
}

/// The server's initial handshake packet, protocol version 10.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialHandshake {
    /// Server version string (e.g. `8.0.11-TiDB-v8.5.0`).
    pub server_version: Bytes,
    /// Connection id.
    pub connection_id: u32,
    /// Auth plugin data (the salt), usually 20 bytes.
    pub auth_data: Bytes,
    /// Server capabilities.
    pub capabilities: CapabilityFlags,
    /// Default collation id.
    pub charset: u8,
    /// Status flags.
    pub status: StatusFlags,
    /// The 10 reserved bytes after the auth data length, as sent. When
    /// `CLIENT_MYSQL` is clear the last four are MariaDB's extended
    /// capabilities: they live in `mariadb_capabilities` and are zero here.
    pub reserved: [u8; 10],
    /// MariaDB extended capabilities (empty when `CLIENT_MYSQL` is set,
    /// i.e. from MySQL, TiDB, or a MariaDB server that does not offer any).
    pub mariadb_capabilities: MariaDbCapabilities,
    /// Default auth plugin name.
    pub auth_plugin: Bytes,
}

/// Where MariaDB's extended capabilities sit in a greeting's reserved area.
const GREETING_MARIADB_CAPS: std::ops::Range<usize> = 6..10;
/// Where they sit in a handshake response's (or SSL request's) filler.
const RESPONSE_MARIADB_CAPS: std::ops::Range<usize> = 19..23;

/// Takes MariaDB's capabilities out of a reserved/filler area when
/// `caps` says they are there (`CLIENT_MYSQL` clear), zeroing those bytes.
fn take_mariadb_caps(
    caps: CapabilityFlags,
    area: &mut [u8],
    at: std::ops::Range<usize>,
) -> MariaDbCapabilities {
    if !caps.has_mariadb_extension() {
        return MariaDbCapabilities::empty();
    }
    let word = &mut area[at];
    let mut b = [0u8; 4];
    b.copy_from_slice(word);
    word.fill(0);
    MariaDbCapabilities::from_le_bytes(b)
}

/// Writes a reserved/filler area with MariaDB's capabilities in place when
/// `caps` has `CLIENT_MYSQL` clear (a peer then reads them from there).
fn put_area_with_mariadb_caps(
    out: &mut BytesMut,
    area: &[u8],
    at: std::ops::Range<usize>,
    caps: CapabilityFlags,
    mariadb: MariaDbCapabilities,
) {
    if caps.has_mariadb_extension() {
        out.put_slice(&area[..at.start]);
        out.put_slice(&mariadb.to_le_bytes());
        out.put_slice(&area[at.end..]);
    } else {
        out.put_slice(area);
    }
}

impl InitialHandshake {
    /// Parses a handshake payload.
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let protocol = r.u8("protocol version")?;
        if protocol != 10 {
            return Err(WireError::Invalid {
                field: "protocol version",
                detail: "only handshake v10 is supported",
            });
        }
        let server_version = Bytes::copy_from_slice(r.nul_bytes("server version")?);
        let connection_id = r.u32("connection id")?;
        let salt1 = r.take(8, "auth plugin data part 1")?;
        let _filler = r.u8("filler")?;
        let cap_lo = r.u16("capability flags")?;
        let mut h = Self {
            server_version,
            connection_id,
            auth_data: Bytes::copy_from_slice(salt1),
            capabilities: CapabilityFlags::from_bits_retain(u32::from(cap_lo)),
            charset: 0,
            status: StatusFlags::empty(),
            reserved: [0; 10],
            mariadb_capabilities: MariaDbCapabilities::empty(),
            auth_plugin: Bytes::new(),
        };
        if r.is_empty() {
            return Ok(h);
        }
        h.charset = r.u8("character set")?;
        h.status = StatusFlags::from_bits_retain(r.u16("status flags")?);
        let cap_hi = r.u16("capability flags")?;
        h.capabilities =
            CapabilityFlags::from_bits_retain(u32::from(cap_lo) | u32::from(cap_hi) << 16);
        let auth_len = r.u8("auth plugin data length")?;
        h.reserved.copy_from_slice(r.take(10, "reserved")?);
        h.mariadb_capabilities =
            take_mariadb_caps(h.capabilities, &mut h.reserved, GREETING_MARIADB_CAPS);
        if h.capabilities.contains(CapabilityFlags::SECURE_CONNECTION) {
            // The second part is max(13, len - 8) bytes and ends with a NUL
            // that is not part of the salt.
            let n = usize::from(auth_len).saturating_sub(8).max(13);
            let part2 = r.take(n.min(r.remaining()), "auth plugin data part 2")?;
            let part2 = part2.strip_suffix(&[0]).unwrap_or(part2);
            let mut salt = BytesMut::with_capacity(8 + part2.len());
            salt.put_slice(salt1);
            salt.put_slice(part2);
            h.auth_data = salt.freeze();
        }
        if h.capabilities.contains(CapabilityFlags::PLUGIN_AUTH) {
            h.auth_plugin = Bytes::copy_from_slice(r.nul_or_rest());
        }
        Ok(h)
    }

    /// Builds the payload.
    pub fn write(&self, out: &mut BytesMut) {
        out.put_u8(10);
        put_nul_bytes(out, &self.server_version);
        out.put_u32_le(self.connection_id);
        let salt = &self.auth_data;
        let (p1, p2) = salt.split_at(salt.len().min(8));
        out.put_slice(p1);
        out.put_bytes(0, 8 - p1.len());
        out.put_u8(0);
        let caps = self.capabilities.bits();
        out.put_u16_le(caps as u16);
        out.put_u8(self.charset);
        out.put_u16_le(self.status.bits());
        out.put_u16_le((caps >> 16) as u16);
        if self.capabilities.contains(CapabilityFlags::PLUGIN_AUTH) {
            out.put_u8((salt.len() + 1) as u8);
        } else {
            out.put_u8(0);
        }
        put_area_with_mariadb_caps(
            out,
            &self.reserved,
            GREETING_MARIADB_CAPS,
            self.capabilities,
            self.mariadb_capabilities,
        );
        if self
            .capabilities
            .contains(CapabilityFlags::SECURE_CONNECTION)
        {
            out.put_slice(p2);
            out.put_bytes(0, 13usize.saturating_sub(p2.len()).max(1));
        }
        if self.capabilities.contains(CapabilityFlags::PLUGIN_AUTH) {
            put_nul_bytes(out, &self.auth_plugin);
        }
    }
}

/// The client's handshake response (protocol 4.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    /// Client capabilities.
    pub capabilities: CapabilityFlags,
    /// Max packet size the client accepts.
    pub max_packet_size: u32,
    /// Collation id.
    pub charset: u8,
    /// The 23 filler bytes, as sent. When `CLIENT_MYSQL` is clear the last
    /// four are MariaDB's extended capabilities: they live in
    /// `mariadb_capabilities` and are zero here.
    pub filler: [u8; 23],
    /// MariaDB extended capabilities the client asks for (empty when
    /// `CLIENT_MYSQL` is set).
    pub mariadb_capabilities: MariaDbCapabilities,
    /// User name.
    pub username: Bytes,
    /// Auth response computed from the salt.
    pub auth_response: Bytes,
    /// Initial database, if `CONNECT_WITH_DB`.
    pub database: Option<Bytes>,
    /// Auth plugin the client used, if `PLUGIN_AUTH`.
    pub auth_plugin: Option<Bytes>,
    /// Connection attributes, if `CONNECT_ATTRS`.
    pub attributes: ConnectAttributes,
    /// zstd compression level, if `ZSTD_COMPRESSION_ALGORITHM`.
    pub zstd_level: Option<u8>,
}

/// Connection attributes as sent: a block of length-encoded name/value
/// pairs (without the block's own length). Kept raw: the proxy forwards them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectAttributes(pub Bytes);

impl ConnectAttributes {
    /// Encodes name/value pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut b = BytesMut::new();
        for (k, v) in pairs {
            put_lenenc_bytes(&mut b, k);
            put_lenenc_bytes(&mut b, v);
        }
        Self(b.freeze())
    }

    /// The name/value pairs (the block was validated when parsed).
    pub fn pairs(&self) -> Vec<(&[u8], &[u8])> {
        let mut r = Reader::new(&self.0);
        let mut v = Vec::new();
        while let (Ok(k), Ok(val)) = (r.lenenc_bytes("name"), r.lenenc_bytes("value")) {
            v.push((k, val));
        }
        v
    }
}

/// The SSL request: the first 32 bytes of a handshake response with
/// `CLIENT_SSL` set; TLS starts right after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SslRequest {
    /// Client capabilities.
    pub capabilities: CapabilityFlags,
    /// Max packet size.
    pub max_packet_size: u32,
    /// Collation id.
    pub charset: u8,
    /// MariaDB extended capabilities (empty when `CLIENT_MYSQL` is set); a
    /// MariaDB server reads them here already, so they must match the
    /// handshake response that follows over TLS.
    pub mariadb_capabilities: MariaDbCapabilities,
}

impl SslRequest {
    /// Length of an SSL request payload.
    pub const LEN: usize = 32;

    /// Builds the payload.
    pub fn write(&self, out: &mut BytesMut) {
        out.put_u32_le((self.capabilities | CapabilityFlags::SSL).bits());
        out.put_u32_le(self.max_packet_size);
        out.put_u8(self.charset);
        put_area_with_mariadb_caps(
            out,
            &[0; 23],
            RESPONSE_MARIADB_CAPS,
            self.capabilities,
            self.mariadb_capabilities,
        );
    }
}

/// What a client sent as the first packet after the server greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHello {
    /// Start TLS, then the real handshake response follows.
    Ssl(SslRequest),
    /// The handshake response itself.
    Response(HandshakeResponse),
}

/// Reads the capability word that opens every client reply to the greeting.
/// Pre-4.1 clients send only two bytes of capabilities; the caller rejects
/// them before calling [`ClientHello::parse`].
pub fn client_capabilities(payload: &[u8]) -> Result<CapabilityFlags, WireError> {
    let mut r = Reader::new(payload);
    let lo = r.u16("capability flags")?;
    let caps = CapabilityFlags::from_bits_retain(u32::from(lo));
    if !caps.contains(CapabilityFlags::PROTOCOL_41) {
        return Ok(caps);
    }
    let hi = r.u16("capability flags")?;
    Ok(CapabilityFlags::from_bits_retain(
        u32::from(lo) | u32::from(hi) << 16,
    ))
}

impl ClientHello {
    /// Parses a 4.1 client reply: an SSL request or a handshake response.
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        // One copy of the payload; every field is a view into it, so a kept
        // handshake response costs one allocation.
        let owned = Bytes::copy_from_slice(payload);
        let mut r = Reader::new(&owned);
        let capabilities = CapabilityFlags::from_bits_retain(r.u32("capability flags")?);
        let max_packet_size = r.u32("max packet size")?;
        let charset = r.u8("character set")?;
        let mut filler = [0u8; 23];
        filler.copy_from_slice(r.take(23, "filler")?);
        let mariadb_capabilities =
            take_mariadb_caps(capabilities, &mut filler, RESPONSE_MARIADB_CAPS);
        if r.is_empty() && capabilities.contains(CapabilityFlags::SSL) {
            return Ok(Self::Ssl(SslRequest {
                capabilities,
                max_packet_size,
                charset,
                mariadb_capabilities,
            }));
        }
        let username = owned.slice_ref(r.nul_bytes("user name")?);
        let auth_response =
            if capabilities.contains(CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA) {
                r.lenenc_bytes("auth response")?
            } else if capabilities.contains(CapabilityFlags::SECURE_CONNECTION) {
                let n = r.u8("auth response length")?;
                r.take(usize::from(n), "auth response")?
            } else {
                r.nul_bytes("auth response")?
            };
        let auth_response = owned.slice_ref(auth_response);
        let database = if capabilities.contains(CapabilityFlags::CONNECT_WITH_DB) && !r.is_empty() {
            Some(owned.slice_ref(r.nul_or_rest()))
        } else {
            None
        };
        let auth_plugin = if capabilities.contains(CapabilityFlags::PLUGIN_AUTH) && !r.is_empty() {
            Some(owned.slice_ref(r.nul_or_rest()))
        } else {
            None
        };
        let mut attributes = ConnectAttributes::default();
        if capabilities.contains(CapabilityFlags::CONNECT_ATTRS) && !r.is_empty() {
            let attrs = r.lenenc_bytes("connection attributes")?;
            // Validate once; kept raw, as they are forwarded raw.
            let mut a = Reader::new(attrs);
            while !a.is_empty() {
                a.lenenc_bytes("attribute name")?;
                a.lenenc_bytes("attribute value")?;
            }
            attributes = ConnectAttributes(owned.slice_ref(attrs));
        }
        let zstd_level = if capabilities.contains(CapabilityFlags::ZSTD_COMPRESSION_ALGORITHM)
            && !r.is_empty()
        {
            Some(r.u8("zstd compression level")?)
        } else {
            None
        };
        Ok(Self::Response(HandshakeResponse {
            capabilities,
            max_packet_size,
            charset,
            filler,
            mariadb_capabilities,
            username,
            auth_response,
            database,
            auth_plugin,
            attributes,
            zstd_level,
        }))
    }
}

impl HandshakeResponse {
    /// Builds the payload. Optional parts follow `capabilities`: a database
    /// is written only with `CONNECT_WITH_DB`, and so on.
    pub fn write(&self, out: &mut BytesMut) {
        let caps = self.capabilities;
        out.put_u32_le(caps.bits());
        out.put_u32_le(self.max_packet_size);
        out.put_u8(self.charset);
        put_area_with_mariadb_caps(
            out,
            &self.filler,
            RESPONSE_MARIADB_CAPS,
            caps,
            self.mariadb_capabilities,
        );
        put_nul_bytes(out, &self.username);
        if caps.contains(CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA) {
            put_lenenc_bytes(out, &self.auth_response);
        } else if caps.contains(CapabilityFlags::SECURE_CONNECTION) {
            let n = self.auth_response.len().min(255);
            out.put_u8(n as u8);
            out.put_slice(&self.auth_response[..n]);
        } else {
            put_nul_bytes(out, &self.auth_response);
        }
        if caps.contains(CapabilityFlags::CONNECT_WITH_DB) {
            put_nul_bytes(out, self.database.as_deref().unwrap_or_default());
        }
        if caps.contains(CapabilityFlags::PLUGIN_AUTH) {
            put_nul_bytes(out, self.auth_plugin.as_deref().unwrap_or_default());
        }
        if caps.contains(CapabilityFlags::CONNECT_ATTRS) {
            put_lenenc_bytes(out, &self.attributes.0);
        }
        if caps.contains(CapabilityFlags::ZSTD_COMPRESSION_ALGORITHM) {
            out.put_u8(self.zstd_level.unwrap_or(3));
        }
    }
}

/// Auth switch request (0xFE): the server asks the client to authenticate
/// again with another plugin and salt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSwitchRequest {
    /// Plugin name.
    pub plugin: Bytes,
    /// Plugin data (the new salt), without the trailing NUL.
    pub data: Bytes,
}

impl AuthSwitchRequest {
    /// Parses the payload (first byte 0xFE).
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        if r.u8("auth switch header")? != 0xfe {
            return Err(WireError::Invalid {
                field: "auth switch header",
                detail: "expected 0xFE",
            });
        }
        let plugin = Bytes::copy_from_slice(r.nul_or_rest());
        let data = r.rest();
        let data = data.strip_suffix(&[0]).unwrap_or(data);
        Ok(Self {
            plugin,
            data: Bytes::copy_from_slice(data),
        })
    }

    /// Builds the payload.
    pub fn write(&self, out: &mut BytesMut) {
        out.put_u8(0xfe);
        put_nul_bytes(out, &self.plugin);
        put_nul_bytes(out, &self.data);
    }
}

/// Auth more data (0x01): plugin-specific continuation, such as
/// caching_sha2_password's fast-auth success (0x03) or full-auth request (0x04).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthMoreData {
    /// The data after the 0x01 marker.
    pub data: Bytes,
}

impl AuthMoreData {
    /// caching_sha2_password: the scramble matched the server's cache.
    pub const FAST_AUTH_SUCCESS: u8 = 0x03;
    /// caching_sha2_password: the server needs the full password (TLS or RSA).
    pub const PERFORM_FULL_AUTH: u8 = 0x04;

    /// Parses the payload (first byte 0x01).
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        if r.u8("auth more data header")? != 0x01 {
            return Err(WireError::Invalid {
                field: "auth more data header",
                detail: "expected 0x01",
            });
        }
        Ok(Self {
            data: Bytes::copy_from_slice(r.rest()),
        })
    }

    /// Builds the payload.
    pub fn write(&self, out: &mut BytesMut) {
        out.put_u8(0x01);
        out.put_slice(&self.data);
    }
}

/// COM_CHANGE_USER's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeUser {
    /// New user.
    pub username: Bytes,
    /// Auth response computed from the connection's original salt.
    pub auth_response: Bytes,
    /// New default database.
    pub database: Bytes,
    /// Collation id (present with `PROTOCOL_41` clients).
    pub charset: Option<u16>,
    /// Auth plugin (present with `PLUGIN_AUTH`).
    pub auth_plugin: Option<Bytes>,
    /// Connection attributes, raw (length-encoded block), with `CONNECT_ATTRS`.
    pub attributes: Option<Bytes>,
}

impl ChangeUser {
    /// Parses the payload (first byte 0x11) given the session's capabilities.
    pub fn parse(payload: &[u8], caps: CapabilityFlags) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        if r.u8("command")? != 0x11 {
            return Err(WireError::Invalid {
                field: "command",
                detail: "expected COM_CHANGE_USER",
            });
        }
        let username = Bytes::copy_from_slice(r.nul_bytes("user name")?);
        let auth_response = if caps.contains(CapabilityFlags::SECURE_CONNECTION) {
            let n = r.u8("auth response length")?;
            r.take(usize::from(n), "auth response")?
        } else {
            r.nul_bytes("auth response")?
        };
        let auth_response = Bytes::copy_from_slice(auth_response);
        let database = Bytes::copy_from_slice(r.nul_or_rest());
        let charset = if r.remaining() >= 2 {
            Some(r.u16("character set")?)
        } else {
            None
        };
        let auth_plugin = if caps.contains(CapabilityFlags::PLUGIN_AUTH) && !r.is_empty() {
            Some(Bytes::copy_from_slice(r.nul_or_rest()))
        } else {
            None
        };
        let attributes = if caps.contains(CapabilityFlags::CONNECT_ATTRS) && !r.is_empty() {
            Some(Bytes::copy_from_slice(r.rest()))
        } else {
            None
        };
        Ok(Self {
            username,
            auth_response,
            database,
            charset,
            auth_plugin,
            attributes,
        })
    }

    /// Builds the payload.
    pub fn write(&self, out: &mut BytesMut, caps: CapabilityFlags) {
        out.put_u8(0x11);
        put_nul_bytes(out, &self.username);
        if caps.contains(CapabilityFlags::SECURE_CONNECTION) {
            let n = self.auth_response.len().min(255);
            out.put_u8(n as u8);
            out.put_slice(&self.auth_response[..n]);
        } else {
            put_nul_bytes(out, &self.auth_response);
        }
        put_nul_bytes(out, &self.database);
        if let Some(cs) = self.charset {
            out.put_u16_le(cs);
            if let Some(p) = &self.auth_plugin {
                put_nul_bytes(out, p);
            }
            if let Some(a) = &self.attributes {
                out.put_slice(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_handshake() -> InitialHandshake {
        InitialHandshake {
            server_version: Bytes::from_static(b"8.0.11-TiDB-v8.5.0"),
            connection_id: 42,
            auth_data: Bytes::from_static(b"abcdefghijklmnopqrst"),
            capabilities: CapabilityFlags::PROXY_SUPPORTED,
            charset: 46,
            status: StatusFlags::AUTOCOMMIT,
            reserved: [0; 10],
            mariadb_capabilities: MariaDbCapabilities::empty(),
            auth_plugin: Bytes::from_static(b"mysql_native_password"),
        }
    }

    #[test]
    fn initial_handshake_round_trips() {
        let h = sample_handshake();
        let mut out = BytesMut::new();
        h.write(&mut out);
        assert_eq!(InitialHandshake::parse(&out).unwrap(), h);
    }

    #[test]
    fn handshake_response_round_trips() {
        let resp = HandshakeResponse {
            capabilities: CapabilityFlags::PROXY_SUPPORTED - CapabilityFlags::SSL,
            max_packet_size: 1 << 24,
            charset: 45,
            filler: [0; 23],
            mariadb_capabilities: MariaDbCapabilities::empty(),
            username: Bytes::from_static(b"root"),
            auth_response: Bytes::from(vec![7u8; 20]),
            database: Some(Bytes::from_static(b"test")),
            auth_plugin: Some(Bytes::from_static(b"mysql_native_password")),
            attributes: ConnectAttributes::from_pairs([(&b"_client_name"[..], &b"x"[..])]),
            zstd_level: Some(3),
        };
        let mut out = BytesMut::new();
        resp.write(&mut out);
        assert_eq!(
            ClientHello::parse(&out).unwrap(),
            ClientHello::Response(resp)
        );
    }

    #[test]
    fn ssl_request_is_recognised() {
        let req = SslRequest {
            capabilities: CapabilityFlags::PROTOCOL_41 | CapabilityFlags::SSL,
            max_packet_size: 16 << 20,
            charset: 33,
            mariadb_capabilities: MariaDbCapabilities::empty(),
        };
        let mut out = BytesMut::new();
        req.write(&mut out);
        assert_eq!(out.len(), SslRequest::LEN);
        assert_eq!(ClientHello::parse(&out).unwrap(), ClientHello::Ssl(req));
    }

    #[test]
    fn auth_switch_and_more_data_round_trip() {
        let sw = AuthSwitchRequest {
            plugin: Bytes::from_static(b"mysql_native_password"),
            data: Bytes::from_static(b"01234567890123456789"),
        };
        let mut out = BytesMut::new();
        sw.write(&mut out);
        assert_eq!(AuthSwitchRequest::parse(&out).unwrap(), sw);
        let md = AuthMoreData {
            data: Bytes::from_static(&[AuthMoreData::FAST_AUTH_SUCCESS]),
        };
        let mut out = BytesMut::new();
        md.write(&mut out);
        assert_eq!(AuthMoreData::parse(&out).unwrap(), md);
    }

    #[test]
    fn change_user_round_trips() {
        let caps = CapabilityFlags::PROXY_SUPPORTED;
        let cu = ChangeUser {
            username: Bytes::from_static(b"app"),
            auth_response: Bytes::from(vec![1u8; 20]),
            database: Bytes::from_static(b"db1"),
            charset: Some(45),
            auth_plugin: Some(Bytes::from_static(b"mysql_native_password")),
            attributes: Some(Bytes::from_static(&[3, 1, b'k', 0])),
        };
        let mut out = BytesMut::new();
        cu.write(&mut out, caps);
        assert_eq!(ChangeUser::parse(&out, caps).unwrap(), cu);
    }

    /// A greeting shaped like MariaDB 10.11's: CLIENT_MYSQL clear, extended
    /// capabilities PROGRESS | STMT_BULK_OPERATIONS | EXTENDED_METADATA |
    /// CACHE_METADATA (0x1d, what `mariadbd` 10.11 offers; see
    /// conformance/tests/mariadb_ext.rs) in the last 4 reserved bytes.
    #[test]
    fn mariadb_greeting_carries_extended_capabilities() {
        let mut h = sample_handshake();
        h.capabilities -= CapabilityFlags::CLIENT_MYSQL;
        h.mariadb_capabilities = MariaDbCapabilities::from_bits_retain(0x1d);
        let mut out = BytesMut::new();
        h.write(&mut out);
        // protocol, version + NUL, id, salt1, filler, caps lo, charset,
        // status, caps hi, auth len: then the 10 reserved bytes.
        let at = 1 + h.server_version.len() + 1 + 4 + 8 + 1 + 2 + 1 + 2 + 2 + 1;
        assert_eq!(&out[at..at + 10], &[0, 0, 0, 0, 0, 0, 0x1d, 0, 0, 0]);
        let back = InitialHandshake::parse(&out).unwrap();
        assert_eq!(back, h);
        assert!(
            back.mariadb_capabilities
                .contains(MariaDbCapabilities::CACHE_METADATA)
        );
        // The same bytes with CLIENT_MYSQL set mean nothing: a MySQL server.
        let mut mysql = out.to_vec();
        mysql[1 + h.server_version.len() + 1 + 4 + 8 + 1] |= 1;
        let back = InitialHandshake::parse(&mysql).unwrap();
        assert!(back.mariadb_capabilities.is_empty());
        assert_eq!(back.reserved[6], 0x1d, "kept raw, not interpreted");
    }

    #[test]
    fn mariadb_client_answers_in_the_filler() {
        let caps = (CapabilityFlags::PROXY_SUPPORTED - CapabilityFlags::CLIENT_MYSQL)
            | CapabilityFlags::SSL;
        let ext = MariaDbCapabilities::EXTENDED_METADATA | MariaDbCapabilities::PROGRESS;
        let req = SslRequest {
            capabilities: caps,
            max_packet_size: 1 << 24,
            charset: 45,
            mariadb_capabilities: ext,
        };
        let mut out = BytesMut::new();
        req.write(&mut out);
        assert_eq!(&out[28..32], &[0x09, 0, 0, 0]);
        assert_eq!(ClientHello::parse(&out).unwrap(), ClientHello::Ssl(req));
    }

    fn mariadb_caps() -> impl proptest::strategy::Strategy<Value = MariaDbCapabilities> {
        use proptest::strategy::Strategy;
        proptest::prelude::any::<u32>().prop_map(MariaDbCapabilities::from_bits_retain)
    }

    proptest::proptest! {
        /// Any greeting round-trips; the MariaDB word is only there when
        /// CLIENT_MYSQL is clear.
        #[test]
        fn greeting_round_trips_with_mariadb_caps(
            caps in proptest::prelude::any::<u32>(),
            ext in mariadb_caps(),
            reserved in proptest::prelude::any::<[u8; 6]>(),
            tail in proptest::prelude::any::<[u8; 4]>(),
        ) {
            use proptest::prelude::*;
            let caps = CapabilityFlags::from_bits_retain(caps)
                | CapabilityFlags::SECURE_CONNECTION
                | CapabilityFlags::PLUGIN_AUTH;
            let mut h = sample_handshake();
            h.capabilities = caps;
            h.reserved[..6].copy_from_slice(&reserved);
            if caps.has_mariadb_extension() {
                h.mariadb_capabilities = ext;
            } else {
                h.reserved[6..].copy_from_slice(&tail);
            }
            let mut out = BytesMut::new();
            h.write(&mut out);
            prop_assert_eq!(InitialHandshake::parse(&out).unwrap(), h);
        }

        /// Any handshake response round-trips with its MariaDB word.
        #[test]
        fn response_round_trips_with_mariadb_caps(
            mysql in proptest::prelude::any::<bool>(),
            ext in mariadb_caps(),
            filler in proptest::prelude::any::<[u8; 19]>(),
        ) {
            use proptest::prelude::*;
            let mut caps = CapabilityFlags::PROXY_SUPPORTED - CapabilityFlags::SSL;
            caps.set(CapabilityFlags::CLIENT_MYSQL, mysql);
            let mut resp = HandshakeResponse {
                capabilities: caps,
                max_packet_size: 1 << 24,
                charset: 45,
                filler: [0; 23],
                mariadb_capabilities: if mysql { MariaDbCapabilities::empty() } else { ext },
                username: Bytes::from_static(b"app"),
                auth_response: Bytes::from(vec![9u8; 20]),
                database: Some(Bytes::from_static(b"db")),
                auth_plugin: Some(Bytes::from_static(b"mysql_native_password")),
                attributes: ConnectAttributes::default(),
                zstd_level: Some(3),
            };
            resp.filler[..19].copy_from_slice(&filler);
            let mut out = BytesMut::new();
            resp.write(&mut out);
            prop_assert_eq!(ClientHello::parse(&out).unwrap(), ClientHello::Response(resp));
        }
    }

    #[test]
    fn pre_41_client_is_detected() {
        // A 3.23-style reply: 2 bytes of capabilities without PROTOCOL_41.
        let caps = client_capabilities(&[0x85, 0x00, 0, 0, 0]).unwrap();
        assert!(!caps.contains(CapabilityFlags::PROTOCOL_41));
    }
}

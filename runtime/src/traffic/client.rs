//! The replay's MySQL client: logs in with a user and password, then sends
//! captured command payloads as they are and reads each response to its
//! end. Where a response ends is the core's `CommandTracker`'s decision
//! (one place for response shapes); this file only moves bytes.
//!
//! Logins: `mysql_native_password` and `caching_sha2_password` (its fast
//! path); a server that asks for caching_sha2's full authentication (which
//! needs TLS or RSA) gets a clear error.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tiproxy_core::digest::{DigestBuilder, ResultDigest};
use tiproxy_core::handshake::{AuthSwitchRequest, HandshakeResponse, InitialHandshake, plugin};
use tiproxy_core::packet::{MAX_PAYLOAD as MAX_PACKET, PacketDecoder, Payload, write_packet};
use tiproxy_core::response::{ErrPacket, OkPacket, PrepareOk};
use tiproxy_core::tracker::{BackendPacket, ClientPacket, CommandTracker, TrackerOptions};
use tiproxy_core::{CapabilityFlags, MariaDbCapabilities, StatusFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response payload accepted (MySQL's largest packet).
const MAX_PAYLOAD: usize = 1 << 30;
/// How long a login may take.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a command could not be replayed on this connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection broke (or could not be made).
    #[error("{0}")]
    Disconnected(String),
    /// The server sent what the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A statement command whose statement is not prepared (the command's
    /// failure, not the connection's).
    #[error("{0}")]
    Prepare(String),
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Disconnected(e.to_string())
    }
}

/// What a replayed command got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded; `prepared` is the statement id of a COM_STMT_PREPARE.
    Ok {
        /// The new statement id, for COM_STMT_PREPARE.
        prepared: Option<u32>,
    },
    /// The server answered ERR.
    Err {
        /// MySQL error code.
        code: u16,
        /// The message.
        message: String,
    },
}

/// A logged-in replay connection.
#[derive(Debug)]
pub struct ReplayConn {
    stream: TcpStream,
    dec: PacketDecoder,
    caps: CapabilityFlags,
    tracker: CommandTracker,
    out: BytesMut,
    /// With result comparison: the digest of the running command's answer.
    digest: Option<DigestBuilder>,
    /// The digest of the last command that had an answer.
    last_digest: Option<ResultDigest>,
}

fn native_scramble(password: &[u8], salt: &[u8]) -> Vec<u8> {
    let stage1: [u8; 20] = Sha1::digest(password).into();
    let stage2: [u8; 20] = Sha1::digest(stage1).into();
    let mix: [u8; 20] = Sha1::new()
        .chain_update(salt)
        .chain_update(stage2)
        .finalize()
        .into();
    stage1.iter().zip(mix).map(|(a, b)| a ^ b).collect()
}

fn sha2_scramble(password: &[u8], salt: &[u8]) -> Vec<u8> {
    let stage1: [u8; 32] = Sha256::digest(password).into();
    let stage2: [u8; 32] = Sha256::digest(stage1).into();
    let mix: [u8; 32] = Sha256::new()
        .chain_update(stage2)
        .chain_update(salt)
        .finalize()
        .into();
    stage1.iter().zip(mix).map(|(a, b)| a ^ b).collect()
}

fn scramble(plugin_name: &str, password: &str, salt: &[u8]) -> Result<Vec<u8>, ClientError> {
    // Both plugins scramble with a 20-byte salt; an auth switch's data
    // carries a NUL after it.
    let salt = &salt[..salt.len().min(20)];
    if password.is_empty() {
        return Ok(Vec::new());
    }
    match plugin_name {
        plugin::NATIVE_PASSWORD => Ok(native_scramble(password.as_bytes(), salt)),
        plugin::CACHING_SHA2 => Ok(sha2_scramble(password.as_bytes(), salt)),
        other => Err(ClientError::Protocol(format!(
            "the server asks for auth plugin {other}; replay logs in with \
             mysql_native_password or caching_sha2_password"
        ))),
    }
}

fn server_error(payload: &[u8]) -> Outcome {
    match ErrPacket::parse(payload) {
        Ok(e) => Outcome::Err {
            code: e.code,
            message: e.message_text(),
        },
        Err(e) => Outcome::Err {
            code: 0,
            message: format!("malformed ERR packet: {e}"),
        },
    }
}

impl ReplayConn {
    /// Connects to `addr` and logs in as `user`.
    pub async fn connect(addr: &str, user: &str, password: &str) -> Result<Self, ClientError> {
        match tokio::time::timeout(LOGIN_TIMEOUT, Self::login(addr, user, password)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Disconnected(format!(
                "login to {addr} took over {LOGIN_TIMEOUT:?}"
            ))),
        }
    }

    async fn login(addr: &str, user: &str, password: &str) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::Disconnected(format!("cannot connect to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let mut c = Self {
            stream,
            dec: PacketDecoder::with_limit(MAX_PAYLOAD),
            caps: CapabilityFlags::empty(),
            tracker: CommandTracker::new(false, StatusFlags::empty()),
            out: BytesMut::new(),
            digest: None,
            last_digest: None,
        };
        let greeting = c.read().await?;
        if greeting.data.first() == Some(&0xff) {
            return Err(login_refused(&greeting.data));
        }
        let hs = InitialHandshake::parse(&greeting.data)
            .map_err(|e| ClientError::Protocol(format!("bad greeting: {e}")))?;
        let mut caps = CapabilityFlags::LONG_PASSWORD
            | CapabilityFlags::LONG_FLAG
            | CapabilityFlags::PROTOCOL_41
            | CapabilityFlags::TRANSACTIONS
            | CapabilityFlags::SECURE_CONNECTION
            | CapabilityFlags::PLUGIN_AUTH
            | CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA
            | CapabilityFlags::MULTI_STATEMENTS
            | CapabilityFlags::MULTI_RESULTS
            | CapabilityFlags::PS_MULTI_RESULTS
            | CapabilityFlags::LOCAL_FILES;
        caps &= hs.capabilities | CapabilityFlags::LOCAL_FILES;
        if hs.capabilities.contains(CapabilityFlags::DEPRECATE_EOF) {
            caps |= CapabilityFlags::DEPRECATE_EOF;
        }
        c.caps = caps;
        let mut plugin_name = String::from_utf8_lossy(&hs.auth_plugin).into_owned();
        if plugin_name.is_empty() {
            plugin_name = plugin::NATIVE_PASSWORD.into();
        }
        let auth = match scramble(&plugin_name, password, &hs.auth_data) {
            Ok(a) => a,
            // Name the plugin we can do; the server switches us to its own.
            Err(_) => {
                plugin_name = plugin::NATIVE_PASSWORD.into();
                scramble(&plugin_name, password, &hs.auth_data)?
            }
        };
        let resp = HandshakeResponse {
            capabilities: caps,
            max_packet_size: 1 << 30,
            charset: 46,
            filler: [0; 23],
            mariadb_capabilities: Default::default(),
            username: Bytes::copy_from_slice(user.as_bytes()),
            auth_response: Bytes::from(auth),
            database: None,
            auth_plugin: Some(Bytes::copy_from_slice(plugin_name.as_bytes())),
            attributes: Default::default(),
            zstd_level: None,
        };
        let mut p = BytesMut::new();
        resp.write(&mut p);
        c.write(greeting.last_seq.wrapping_add(1), &p).await?;
        loop {
            let p = c.read().await?;
            let next = p.last_seq.wrapping_add(1);
            match p.data.first() {
                Some(0x00) => {
                    let ok = OkPacket::parse(&p.data, caps)
                        .map_err(|e| ClientError::Protocol(format!("bad OK: {e}")))?;
                    let opts = TrackerOptions::negotiated(caps, MariaDbCapabilities::empty());
                    c.tracker = CommandTracker::with_options(opts, ok.status);
                    return Ok(c);
                }
                Some(0xff) => return Err(login_refused(&p.data)),
                Some(0xfe) => {
                    let sw = AuthSwitchRequest::parse(&p.data)
                        .map_err(|e| ClientError::Protocol(format!("bad auth switch: {e}")))?;
                    plugin_name = String::from_utf8_lossy(&sw.plugin).into_owned();
                    let auth = scramble(&plugin_name, password, &sw.data)?;
                    c.write(next, &auth).await?;
                }
                Some(0x01) => match p.data.get(1) {
                    Some(0x03) => {}
                    _ => {
                        return Err(ClientError::Protocol(format!(
                            "user {user} needs caching_sha2_password's full authentication \
                             (TLS or RSA), which replay does not do: give the replay user \
                             mysql_native_password or log it in once through a TLS client"
                        )));
                    }
                },
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected packet {other:?} during login ({plugin_name})"
                    )));
                }
            }
        }
    }

    async fn read(&mut self) -> Result<Payload, ClientError> {
        loop {
            if let Some(p) = self
                .dec
                .next_payload()
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                return Ok(p);
            }
            let mut buf = [0u8; 16 * 1024];
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(ClientError::Disconnected(
                    "the server closed the connection".into(),
                ));
            }
            self.dec.extend(&buf[..n]);
        }
    }

    async fn write(&mut self, seq: u8, payload: &[u8]) -> Result<u8, ClientError> {
        self.out.clear();
        let next = write_packet(&mut self.out, seq, payload);
        self.stream.write_all(&self.out).await?;
        Ok(next)
    }

    /// Digests every answer from now on ([`Self::last_digest`]), as the
    /// capture's `--compare` did.
    pub fn set_compare(&mut self) {
        self.digest.get_or_insert_with(DigestBuilder::default);
    }

    /// The digest of the answer to the last command that had one.
    pub fn last_digest(&self) -> Option<ResultDigest> {
        self.last_digest
    }

    /// Sends one command payload (command byte first) and reads its whole
    /// response. `Ok(None)`: the command has no response (COM_STMT_CLOSE,
    /// COM_STMT_SEND_LONG_DATA, COM_QUIT).
    pub async fn execute(&mut self, payload: &[u8]) -> Result<Option<Outcome>, ClientError> {
        if payload.is_empty() {
            return Err(ClientError::Protocol("an empty command".into()));
        }
        // Feed the tracker packet by packet, as the payload goes out; the
        // first packet says what the command is.
        let mut verdict = None;
        let mut rest = payload;
        loop {
            let n = rest.len().min(MAX_PACKET);
            let need = self.tracker.client_prefix_needed(n);
            let v = self.tracker.on_client_packet(n, &rest[..need]);
            verdict.get_or_insert(v);
            rest = &rest[n..];
            if n < MAX_PACKET {
                break;
            }
        }
        let verdict = verdict.expect("the loop runs at least once");
        match verdict {
            ClientPacket::Unsupported(c) => {
                return Ok(Some(Outcome::Err {
                    code: 1047,
                    message: format!("{c:?} cannot be replayed"),
                }));
            }
            ClientPacket::ChangeUser => {
                return Ok(Some(Outcome::Err {
                    code: 1047,
                    message: "COM_CHANGE_USER cannot be replayed (it holds credentials)".into(),
                }));
            }
            _ => {}
        }
        self.write(0, payload).await?;
        if matches!(
            verdict,
            ClientPacket::ForwardNoResponse | ClientPacket::Quit
        ) {
            return Ok(None);
        }
        let mut prepared = None;
        let mut first = true;
        self.last_digest = None;
        loop {
            let p = self.read().await?;
            if first && payload[0] == 0x16 && p.data.first() == Some(&0x00) {
                prepared = PrepareOk::parse(&p.data).ok().map(|ok| ok.statement_id);
            }
            first = false;
            if let Some(d) = &mut self.digest {
                d.packet(&self.tracker, p.data.len(), &p.data);
                d.feed(&p.data);
            }
            let done = self.tracker.on_backend_packet(p.data.len(), &p.data);
            if let (Ok(BackendPacket::Done { .. }), Some(d)) = (&done, &mut self.digest) {
                self.last_digest = Some(d.finish());
            }
            match done {
                Ok(BackendPacket::Progress) => {}
                // LOCAL INFILE: the captured file is not in the capture;
                // send an empty one (the statement then loads nothing).
                Ok(BackendPacket::AwaitClient) => {
                    self.write(p.last_seq.wrapping_add(1), &[]).await?;
                    let _ = self.tracker.on_client_packet(0, &[]);
                }
                Ok(BackendPacket::Done { ok: true }) => return Ok(Some(Outcome::Ok { prepared })),
                Ok(BackendPacket::Done { ok: false }) => return Ok(Some(server_error(&p.data))),
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        }
    }

    /// Sends COM_QUIT (best effort).
    pub async fn quit(mut self) {
        let _ = self.write(0, &[0x01]).await;
        let _ = self.stream.shutdown().await;
    }
}

fn login_refused(payload: &[u8]) -> ClientError {
    match server_error(payload) {
        Outcome::Err { code, message } => {
            ClientError::Disconnected(format!("login refused: ERROR {code}: {message}"))
        }
        Outcome::Ok { .. } => unreachable!("server_error only builds Err"),
    }
}

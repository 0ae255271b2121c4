//! The backend handshake (the proxy as client), one for both uses: the
//! session's first backend, with credentials relayed from the client (the
//! auth switch trick: the proxy names a plugin no server has, the backend
//! answers with its own salt and the client's answer is relayed), and a
//! move target, with the session token the old backend handed out. The TLS
//! decision and the HandshakeResponse exist here once.

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::migration::MigrationFailure;
use super::relay::Disposition;
use super::{BackendTls, Event, Leg, Phase, Session};
use crate::compress::Algorithm;
use crate::error::{ProxyError, SessionError, UnexpectedPacket};
use crate::flags::{CapabilityFlags, MariaDbCapabilities, StatusFlags};
use crate::handshake::{HandshakeResponse, InitialHandshake, SslRequest, plugin};
use crate::packet::PacketHeader;
use crate::response::{ERR_HEADER, ErrPacket, OK_HEADER, OkPacket};
use crate::tracker::{CommandTracker, TrackerOptions};

/// What a backend leg's handshake expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expect {
    /// The driver to connect the leg.
    Connect,
    /// The backend's greeting.
    Greeting,
    /// The driver to finish the TLS upgrade.
    Tls,
    /// The backend's verdict (OK or ERR); on the first backend also auth
    /// switch and more-data packets, relayed with the client's answers.
    AuthResult,
}

/// How the proxy authenticates on a backend.
enum Credentials {
    /// As the client, relaying its auth exchange (the first backend).
    Relay,
    /// With a session token (a move target).
    Token(Bytes),
}

impl<T: Clone> Session<T> {
    /// MariaDB extended capabilities agreed with the client.
    pub fn client_mariadb_capabilities(&self) -> MariaDbCapabilities {
        self.client_mariadb
    }

    /// MariaDB extended capabilities in effect with the backend (those the
    /// command tracker follows).
    pub fn backend_mariadb_capabilities(&self) -> MariaDbCapabilities {
        self.backend_mariadb
    }

    /// The handshake state of `leg`, while it handshakes.
    pub(super) fn backend_handshake(&mut self, leg: Leg) -> Option<&mut Expect> {
        match leg {
            Leg::Client => None,
            Leg::Backend => match &mut self.phase {
                Phase::Backend(e) => Some(e),
                _ => None,
            },
            Leg::NewBackend => self.migration.handshake_mut(),
        }
    }

    fn credentials(&self, leg: Leg) -> Credentials {
        match (leg, self.migration.token()) {
            (Leg::NewBackend, Some(token)) => Credentials::Token(token.clone()),
            _ => Credentials::Relay,
        }
    }

    /// A handshake step failed: the first backend refuses the client, a
    /// move target fails the move.
    fn handshake_failed(&mut self, now: Instant, leg: Leg, err: ProxyError) {
        match leg {
            Leg::NewBackend => {
                self.fail_migration(now, MigrationFailure::Handshake(err.to_string()))
            }
            _ => self.refuse(err),
        }
    }

    /// A packet from a handshaking backend leg.
    pub(super) fn on_handshake_packet(
        &mut self,
        now: Instant,
        leg: Leg,
        payload: &[u8],
    ) -> Disposition {
        let Some(expect) = self.backend_handshake(leg).copied() else {
            return Disposition::Consumed;
        };
        match expect {
            Expect::Greeting => {
                self.on_greeting(now, leg, payload);
                Disposition::Consumed
            }
            Expect::AuthResult => self.on_auth_result(now, leg, payload),
            Expect::Connect | Expect::Tls => {
                let e = UnexpectedPacket::new(leg, "nothing before the TLS handshake", payload);
                self.handshake_failed(now, leg, ProxyError::BackendProtocol(e.to_string()));
                Disposition::Consumed
            }
        }
    }

    /// A packet from the move target.
    pub(super) fn on_new_backend_packet(
        &mut self,
        now: Instant,
        header: PacketHeader,
        payload: &[u8],
    ) {
        if !self.check_seq(Leg::NewBackend, header) {
            return self.fail_migration(
                now,
                MigrationFailure::Handshake("packet out of order".into()),
            );
        }
        if self.importing() {
            self.on_import_reply(now, payload);
        } else {
            let _ = self.on_handshake_packet(now, Leg::NewBackend, payload);
        }
    }

    fn on_greeting(&mut self, now: Instant, leg: Leg, payload: &[u8]) {
        if payload.first() == Some(&ERR_HEADER) {
            // The backend refused the connection (too many connections,
            // host blocked): relay its error.
            let msg = ErrPacket::parse(payload)
                .map(|e| e.message_text())
                .unwrap_or_default();
            let e = ProxyError::NoBackend(format!("backend refused the connection: {msg}"));
            return self.handshake_failed(now, leg, e);
        }
        let greeting = match InitialHandshake::parse(payload) {
            Ok(g) => g,
            Err(e) => {
                let e = ProxyError::BackendProtocol(format!("bad greeting: {e}"));
                return self.handshake_failed(now, leg, e);
            }
        };
        if leg == Leg::Backend {
            self.events.push_back(Event::BackendGreeting {
                server_version: greeting.server_version.clone(),
                capabilities: greeting.capabilities,
                mariadb_capabilities: greeting.mariadb_capabilities,
                charset: greeting.charset,
            });
        }
        let missing = (self.client_caps & CapabilityFlags::SHAPE) - greeting.capabilities;
        if !missing.is_empty() {
            let e = ProxyError::Incompatible(format!(
                "the backend lacks capabilities the client negotiated: {missing:?}"
            ));
            return self.handshake_failed(now, leg, e);
        }
        // The same for MariaDB's extended word: responses are forwarded as
        // the backend writes them, so one without the client's layout
        // (extended metadata, cached metadata) cannot serve it.
        let missing_mariadb =
            (self.client_mariadb & MariaDbCapabilities::SHAPE) - greeting.mariadb_capabilities;
        if !missing_mariadb.is_empty() {
            let e = ProxyError::Incompatible(format!(
                "the backend lacks MariaDB capabilities the client negotiated: {missing_mariadb:?}"
            ));
            return self.handshake_failed(now, leg, e);
        }
        let offers_tls = greeting.capabilities.contains(CapabilityFlags::SSL);
        let use_tls = match self.cfg.backend_tls {
            BackendTls::Off => false,
            BackendTls::MatchClient => self.relay.legs[0].tls && offers_tls,
            BackendTls::Required if !offers_tls => {
                let e = ProxyError::BackendTlsRequired(
                    String::from_utf8_lossy(&greeting.server_version).into_owned(),
                );
                return self.handshake_failed(now, leg, e);
            }
            BackendTls::Required => true,
        };
        let offers_compress = greeting.capabilities.contains(CapabilityFlags::COMPRESS);
        if leg == Leg::Backend {
            self.negotiate_first_backend(greeting.capabilities);
            self.backend_mariadb = self.client_mariadb & greeting.mariadb_capabilities;
        } else {
            self.target_mariadb = greeting.mariadb_capabilities;
            if self.relay.legs[1].compression.is_some() && offers_compress {
                // A move keeps the session's compression where the target has it.
                self.relay.legs[2].compression = Some(Algorithm::Zlib);
            }
        }
        if use_tls {
            self.send_ssl_request(leg);
            if let Some(e) = self.backend_handshake(leg) {
                *e = Expect::Tls;
            }
            self.tls_request = Some(leg);
        } else {
            self.send_backend_response(leg);
        }
    }

    /// The capabilities the session uses towards backends, fixed by the
    /// first backend's greeting, and compression on both legs.
    fn negotiate_first_backend(&mut self, offered: CapabilityFlags) {
        let mut caps = (self.client_caps - CapabilityFlags::PER_LEG) & offered;
        // TiDB reads length-encoded auth data without announcing it; keep
        // what the client used.
        caps |= self.client_caps & CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA;
        if self.cfg.compress_backend && offered.contains(CapabilityFlags::COMPRESS) {
            caps |= CapabilityFlags::COMPRESS;
            self.relay.legs[1].compression = Some(Algorithm::Zlib);
        }
        if self.client_caps.contains(CapabilityFlags::COMPRESS) {
            self.relay.legs[0].compression = Some(Algorithm::Zlib);
        } else if self
            .client_caps
            .contains(CapabilityFlags::ZSTD_COMPRESSION_ALGORITHM)
        {
            let level = self.hello.zstd_level.unwrap_or(3);
            self.relay.legs[0].compression = Some(Algorithm::Zstd(level));
        }
        self.backend_caps = caps;
    }

    /// The MariaDB extended capabilities asked of `leg`: the session's,
    /// within what a move target offers (it has every SHAPE flag of them,
    /// checked at its greeting; it may lack progress reports or bulk
    /// operations, which only let a side send or ask for more).
    fn mariadb_towards(&self, leg: Leg) -> MariaDbCapabilities {
        match leg {
            Leg::NewBackend => self.backend_mariadb & self.target_mariadb,
            _ => self.backend_mariadb,
        }
    }

    fn send_ssl_request(&mut self, leg: Leg) {
        let req = SslRequest {
            capabilities: self.backend_caps | CapabilityFlags::SSL,
            max_packet_size: self.hello.max_packet_size,
            charset: self.hello.charset,
            mariadb_capabilities: self.mariadb_towards(leg),
        };
        let mut b = BytesMut::with_capacity(SslRequest::LEN);
        req.write(&mut b);
        self.send(leg, &b);
    }

    /// The handshake response: the client's, with the auth switch trick, or
    /// the session token's.
    pub(super) fn send_backend_response(&mut self, leg: Leg) {
        let hello = &self.hello;
        let (mut caps, username, auth_response, database, auth_plugin) = match self.credentials(leg)
        {
            Credentials::Relay => (
                self.backend_caps,
                hello.username.clone(),
                Bytes::new(),
                hello.database.clone(),
                plugin::FORCE_SWITCH,
            ),
            Credentials::Token(token) => (
                (self.backend_caps
                    | CapabilityFlags::PLUGIN_AUTH
                    | CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA)
                    - CapabilityFlags::CONNECT_WITH_DB,
                self.user.clone(),
                token,
                None,
                plugin::TIDB_SESSION_TOKEN,
            ),
        };
        let l = &self.relay.legs[leg.idx()];
        caps.set(CapabilityFlags::COMPRESS, l.compression.is_some());
        caps.set(CapabilityFlags::SSL, l.tls);
        let resp = HandshakeResponse {
            capabilities: caps,
            max_packet_size: hello.max_packet_size,
            charset: hello.charset,
            filler: [0; 23],
            mariadb_capabilities: self.mariadb_towards(leg),
            username,
            auth_response,
            database,
            auth_plugin: Some(Bytes::from_static(auth_plugin.as_bytes())),
            attributes: hello.attributes.clone(),
            zstd_level: None,
        };
        let mut b = BytesMut::with_capacity(256 + resp.auth_response.len());
        resp.write(&mut b);
        self.send(leg, &b);
        if let Some(e) = self.backend_handshake(leg) {
            *e = Expect::AuthResult;
        }
    }

    fn on_auth_result(&mut self, now: Instant, leg: Leg, payload: &[u8]) -> Disposition {
        if leg == Leg::NewBackend {
            match payload.first().copied() {
                Some(OK_HEADER) => self.start_import(payload),
                _ => {
                    let why = describe_failure(payload);
                    self.fail_migration(now, MigrationFailure::Handshake(why));
                }
            }
            return Disposition::Consumed;
        }
        match payload.first().copied() {
            Some(OK_HEADER) => {
                let status = OkPacket::status_of(payload).unwrap_or(StatusFlags::AUTOCOMMIT);
                self.tracker = CommandTracker::with_options(
                    TrackerOptions::negotiated(self.client_caps, self.backend_mariadb),
                    status,
                );
                self.phase = Phase::Command;
                self.handshake_deadline = None;
                self.events.push_back(Event::Authenticated {
                    user: self.user.clone(),
                });
                // The OK itself goes out uncompressed; compression starts after.
                self.send(Leg::Client, payload);
                self.switch_on_compression(Leg::Client);
                self.switch_on_compression(Leg::Backend);
                // The quiet period before the first state copy runs from
                // the login, as from the end of a command.
                self.command_started = Some(now);
                self.at_boundary(now);
                Disposition::Consumed
            }
            Some(ERR_HEADER) => {
                let (code, message) = ErrPacket::parse(payload)
                    .map(|e| (e.code, e.message_text()))
                    .unwrap_or((0, String::new()));
                self.send(Leg::Client, payload);
                self.close(SessionError::AuthFailed { code, message });
                Disposition::Consumed
            }
            Some(0xfe) | Some(0x01) => Disposition::Forward(Leg::Client),
            _ => {
                let e = UnexpectedPacket::new(leg, "OK, ERR or an auth exchange", payload);
                self.backend_protocol_error(e.to_string());
                Disposition::Consumed
            }
        }
    }
}

/// Describes a non-OK reply during the token handshake.
fn describe_failure(payload: &[u8]) -> String {
    match payload.first().copied() {
        Some(ERR_HEADER) => match ErrPacket::parse(payload) {
            Ok(e) => format!("{} {}", e.code, e.message_text()),
            Err(e) => e.to_string(),
        },
        Some(0xfe) => {
            "the backend asked for another auth method (does it support tidb_session_token?)".into()
        }
        _ => UnexpectedPacket::new(Leg::NewBackend, "OK to the session token", payload).to_string(),
    }
}

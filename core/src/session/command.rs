//! The command phase: the client's commands (the tracker decides what
//! each expects back; COM_CHANGE_USER, COM_QUIT and the BEGIN trick are
//! the proxy's own business) and the backend's responses to them.

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::backend::Expect;
use super::capture::TapBegin;
use super::relay::Disposition;
use super::{Action, Leg, Phase, PlantedBug, Session};
use crate::command::Command;
use crate::error::{ProxyError, SessionError};
use crate::flags::CapabilityFlags;
use crate::handshake::{ChangeUser, ClientHello, plugin};
use crate::packet::PacketHeader;
use crate::tracker::{BackendPacket, ClientPacket};

impl<T: Clone> Session<T> {
    // ----------------------------------------------------------------
    // Client packets
    // ----------------------------------------------------------------

    pub(super) fn on_client_packet(
        &mut self,
        now: Instant,
        header: PacketHeader,
        payload: &[u8],
    ) -> Disposition {
        if self.phase == Phase::Command && self.tracker.is_idle() {
            // A new command: both legs restart their sequences.
            self.relay.legs[0].seq = 0;
            self.relay.legs[1].seq = 0;
            self.relay.legs[1].reset_out_seq = true;
            self.response_started = false;
            self.command_started = Some(now);
        }
        let expected = self.relay.legs[0].seq;
        if !self.check_seq(Leg::Client, header) {
            self.refuse(ProxyError::OutOfOrder(
                crate::packet::FramingError::OutOfOrder {
                    expected,
                    got: header.seq,
                },
            ));
            return Disposition::Consumed;
        }
        match self.phase {
            Phase::ClientHello => {
                self.on_client_hello(payload);
                Disposition::Consumed
            }
            Phase::Backend(Expect::AuthResult) => Disposition::Forward(Leg::Backend),
            Phase::Command => self.on_client_command(now, header, payload),
            _ => Disposition::Consumed,
        }
    }

    fn on_client_hello(&mut self, payload: &[u8]) {
        let caps = match crate::handshake::client_capabilities(payload) {
            Ok(c) => c,
            Err(e) => return self.refuse(e.into()),
        };
        if !caps.contains(CapabilityFlags::PROTOCOL_41) {
            return self.refuse(ProxyError::ClientTooOld);
        }
        match ClientHello::parse(payload) {
            Err(e) => self.refuse(e.into()),
            Ok(ClientHello::Ssl(_)) => {
                if !self.cfg.server_tls || self.relay.legs[0].tls {
                    return self.refuse(ProxyError::TlsNotConfigured);
                }
                self.phase = Phase::ClientTls;
                self.tls_request = Some(Leg::Client);
            }
            Ok(ClientHello::Response(resp)) => {
                if !resp.capabilities.contains(CapabilityFlags::PLUGIN_AUTH) {
                    return self.refuse(ProxyError::Incompatible(
                        "the client does not support pluggable authentication (CLIENT_PLUGIN_AUTH)"
                            .into(),
                    ));
                }
                self.client_caps = resp.capabilities & self.cfg.capabilities;
                // The hello carries the extended word only with CLIENT_MYSQL
                // clear; a MySQL client's is empty.
                self.client_mariadb = resp.mariadb_capabilities & self.cfg.mariadb_capabilities;
                self.user = resp.username.clone();
                self.database = resp.database.clone().filter(|d| !d.is_empty());
                self.hello = resp;
                self.phase = Phase::Backend(Expect::Connect);
                self.actions.push_back(Action::ConnectBackend);
            }
        }
    }

    fn on_client_command(
        &mut self,
        now: Instant,
        header: PacketHeader,
        payload: &[u8],
    ) -> Disposition {
        let starting = self.tracker.is_idle();
        if self.begin_trick_applies()
            && payload.len() == header.len
            && (is_begin(payload) || self.planted(PlantedBug::MoveInsideTransaction))
        {
            self.start_hidden_commit(now, payload);
            return Disposition::Consumed;
        }
        if starting {
            let whole = payload.len() == header.len && header.len < 0xff_ffff;
            match self.tap_begin(whole, payload.first() == Some(&0x01)) {
                TapBegin::Capture => self.tap_command(payload, whole),
                TapBegin::Skip => self.tap_command(payload, false),
                TapBegin::Hold => {
                    self.tap_hold(now, payload);
                    return Disposition::Consumed;
                }
            }
        }
        if starting && self.cfg.protect.enabled {
            self.protect.on_command(payload, header.len);
            #[cfg(feature = "sim-mutations")]
            if self.planted(PlantedBug::ResendInFlight) && payload.len() == header.len {
                self.in_flight = Some(Bytes::copy_from_slice(payload));
            }
        }
        match self.tracker.on_client_packet(header.len, payload) {
            ClientPacket::Forward => Disposition::Forward(Leg::Backend),
            ClientPacket::ForwardNoResponse => {
                // The tracker keeps the last command with a response; a
                // command without one (COM_STMT_CLOSE) is reported as itself.
                let command = match payload.first() {
                    Some(&b) if starting => Some(Command::from_byte(b)),
                    _ => self.tracker.command(),
                };
                self.command_done_as(now, true, command);
                Disposition::Forward(Leg::Backend)
            }
            ClientPacket::Quit => {
                self.tap_quit();
                self.close(SessionError::ClientQuit);
                Disposition::Consumed
            }
            ClientPacket::Unsupported(cmd) => {
                self.send_error(Leg::Client, &ProxyError::UnsupportedCommand(cmd.name()));
                Disposition::Consumed
            }
            ClientPacket::ChangeUser => {
                debug_assert!(starting);
                if header.len > self.cfg.max_handshake_len {
                    self.close_client_with(ProxyError::HandshakeTooLarge {
                        len: header.len,
                        limit: self.cfg.max_handshake_len,
                    });
                    return Disposition::Consumed;
                }
                match ChangeUser::parse(payload, self.client_caps) {
                    Ok(mut cu) => {
                        // Same trick as the first handshake: the client computed
                        // its auth data from the proxy's salt, so name a plugin the
                        // backend does not have; it answers with an auth switch
                        // carrying its own salt, which the client answers.
                        self.pending_user =
                            Some(Box::new((cu.username.clone(), cu.database.clone())));
                        cu.auth_response = Bytes::new();
                        if self.client_caps.contains(CapabilityFlags::PLUGIN_AUTH) {
                            cu.auth_plugin =
                                Some(Bytes::from_static(plugin::FORCE_SWITCH.as_bytes()));
                        }
                        let mut b = BytesMut::new();
                        cu.write(&mut b, self.backend_caps);
                        self.send(Leg::Backend, &b);
                        Disposition::Consumed
                    }
                    Err(e) => {
                        self.close_client_with(ProxyError::BadHandshake(e));
                        Disposition::Consumed
                    }
                }
            }
        }
    }

    // ----------------------------------------------------------------
    // Backend packets
    // ----------------------------------------------------------------

    pub(super) fn on_backend_packet(
        &mut self,
        now: Instant,
        header: PacketHeader,
        payload: &[u8],
    ) -> Disposition {
        if !self.check_seq(Leg::Backend, header) {
            self.backend_protocol_error(format!("packet sequence id {} out of order", header.seq));
            return Disposition::Consumed;
        }
        match self.phase {
            Phase::Backend(_) => self.on_handshake_packet(now, Leg::Backend, payload),
            Phase::Command => {
                if self.migration.on_old_backend() {
                    self.on_old_backend_packet(now, payload);
                    return Disposition::Consumed;
                }
                if self.migration.active() && self.tracker.is_idle() {
                    // The old backend is quiet during a move; anything it says
                    // now is unexpected but harmless to drop.
                    return Disposition::Consumed;
                }
                self.on_backend_response(now, header, payload)
            }
            _ => Disposition::Consumed,
        }
    }

    fn on_backend_response(
        &mut self,
        now: Instant,
        header: PacketHeader,
        prefix: &[u8],
    ) -> Disposition {
        self.tap_response(header.len, prefix);
        match self.tracker.on_backend_packet(header.len, prefix) {
            Err(e) => {
                self.backend_protocol_error(e.to_string());
                Disposition::Consumed
            }
            Ok(BackendPacket::Progress) | Ok(BackendPacket::AwaitClient) => {
                self.response_started = true;
                Disposition::Forward(Leg::Client)
            }
            Ok(BackendPacket::Done { ok }) => {
                if let Some(pending) = self.pending_user.take()
                    && ok
                {
                    let (user, db) = *pending;
                    self.user = user;
                    self.database = Some(db).filter(|d| !d.is_empty());
                }
                self.command_done(now, ok);
                // Act on the boundary once this packet is fully forwarded.
                self.boundary_pending = true;
                Disposition::Forward(Leg::Client)
            }
        }
    }
}

/// Longest COM_QUERY inspected for the BEGIN trick.
pub(super) const BEGIN_PREFIX: usize = 64;

/// Whether a COM_QUERY payload is `BEGIN` or `START TRANSACTION` (any case,
/// surrounding blanks and a trailing `;` allowed). Variants such as
/// `START TRANSACTION READ ONLY` or `WITH CONSISTENT SNAPSHOT` are left
/// alone: moving them would change what they mean.
pub(super) fn is_begin(payload: &[u8]) -> bool {
    let Some(sql) = payload.get(1..) else {
        return false;
    };
    let text = String::from_utf8_lossy(sql);
    let norm: Vec<String> = text
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    matches!(
        norm.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["BEGIN"] | ["BEGIN", "WORK"] | ["START", "TRANSACTION"]
    )
}

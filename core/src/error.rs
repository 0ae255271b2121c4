//! Errors: what went wrong inside a session ([`SessionError`]) and the MySQL
//! error packet the proxy sends a client about it ([`ProxyError`]). Every
//! error the proxy itself originates has a real MySQL error code and a
//! message that says what happened and what to check.

use bytes::{Bytes, BytesMut};

use crate::packet::FramingError;
use crate::response::ErrPacket;
use crate::session::Leg;
use crate::wire::WireError;

/// An error the proxy reports to a client as a MySQL ERR packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The client does not speak the 4.1 protocol.
    #[error("client does not support the MySQL 4.1 protocol (CLIENT_PROTOCOL_41)")]
    ClientTooOld,
    /// The client's handshake packet was larger than the limit.
    #[error("handshake packet of {len} bytes exceeds the limit of {limit} bytes")]
    HandshakeTooLarge {
        /// Announced size.
        len: usize,
        /// Limit.
        limit: usize,
    },
    /// The client's handshake could not be decoded.
    #[error("malformed handshake from client: {0}")]
    BadHandshake(WireError),
    /// Packets arrived out of order.
    #[error("{0}")]
    OutOfOrder(FramingError),
    /// The client asked for TLS but the proxy has no server certificate.
    #[error("client requested TLS but the proxy has no server TLS configured")]
    TlsNotConfigured,
    /// No backend could be reached for a new connection.
    #[error("no TiDB backend is available: {0}")]
    NoBackend(String),
    /// The backend requires something the client cannot provide.
    #[error("backend is incompatible with this client: {0}")]
    Incompatible(String),
    /// Backend TLS is required but the backend does not support it.
    #[error("backend {0} does not support TLS but security.require-backend-tls is set")]
    BackendTlsRequired(String),
    /// A command the proxy held (a move was under way) cannot run: the
    /// backend was lost or stopped answering. A command that reached the
    /// backend never gets this: its client connection closes as the
    /// backend's did.
    #[error("lost connection to the TiDB backend during the query: {0}")]
    BackendLost(String),
    /// Like [`ProxyError::BackendLost`], but the held command certainly
    /// never reached a server: no backend is left to run it on.
    #[error("lost connection to the TiDB backend before the query was sent: {0}")]
    HeldNotRun(String),
    /// The backend sent bytes the proxy cannot follow.
    #[error("TiDB backend sent an invalid packet: {0}")]
    BackendProtocol(String),
    /// The client used a command the proxy cannot relay.
    #[error("command {0} is not supported through tiproxy")]
    UnsupportedCommand(&'static str),
    /// The proxy is at `max-connections`.
    #[error("too many connections: tiproxy is at max-connections ({0})")]
    TooManyConnections(u64),
    /// The client did not finish its handshake in time.
    #[error("handshake timed out after {0} ms")]
    HandshakeTimeout(u64),
    /// The proxy is shutting down.
    #[error("tiproxy is shutting down")]
    ShuttingDown,
    /// The proxy itself is out of file descriptors or socket memory (an
    /// accept or a backend dial failed with EMFILE, ENFILE, ENOBUFS, ENOMEM).
    #[error("{0}")]
    LocalExhaustion(crate::health::LocalExhaustion),
}

impl ProxyError {
    /// The MySQL error code.
    pub fn code(&self) -> u16 {
        match self {
            // ER_NOT_SUPPORTED_AUTH_MODE
            Self::ClientTooOld => 1251,
            // ER_NET_PACKET_TOO_LARGE
            Self::HandshakeTooLarge { .. } => 1153,
            // ER_HANDSHAKE_ERROR
            Self::BadHandshake(_) | Self::HandshakeTimeout(_) => 1043,
            // ER_NET_PACKETS_OUT_OF_ORDER
            Self::OutOfOrder(_) => 1156,
            // ER_SECURE_TRANSPORT_REQUIRED
            Self::TlsNotConfigured | Self::BackendTlsRequired(_) => 3159,
            // ER_CONNECT_TO_FOREIGN_DATA_SOURCE: the proxy could not reach
            // the server that holds the data.
            Self::NoBackend(_) => 1429,
            // ER_NOT_SUPPORTED_YET
            Self::Incompatible(_) | Self::UnsupportedCommand(_) => 1235,
            // ER_NET_READ_ERROR: the proxy lost its read side to the backend.
            Self::BackendLost(_) | Self::HeldNotRun(_) => 1158,
            // ER_MALFORMED_PACKET
            Self::BackendProtocol(_) => 1835,
            // ER_OUT_OF_RESOURCES: as a server out of memory answers.
            Self::LocalExhaustion(crate::health::LocalExhaustion::MemoryThreshold { .. }) => 1041,
            // ER_CON_COUNT_ERROR: as a server out of descriptors answers.
            Self::TooManyConnections(_) | Self::LocalExhaustion(_) => 1040,
            // ER_SERVER_SHUTDOWN
            Self::ShuttingDown => 1053,
        }
    }

    /// The SQL state.
    pub fn sql_state(&self) -> [u8; 5] {
        match self {
            Self::ClientTooOld | Self::HandshakeTooLarge { .. } | Self::Incompatible(_) => {
                *b"08004"
            }
            Self::BadHandshake(_) | Self::HandshakeTimeout(_) => *b"08S01",
            Self::OutOfOrder(_) | Self::BackendLost(_) | Self::HeldNotRun(_) => *b"08S01",
            Self::NoBackend(_) => *b"08S01",
            Self::LocalExhaustion(crate::health::LocalExhaustion::MemoryThreshold { .. }) => {
                *b"HY000"
            }
            Self::TooManyConnections(_) | Self::LocalExhaustion(_) => *b"08004",
            Self::ShuttingDown => *b"08S01",
            _ => *b"HY000",
        }
    }

    /// What the operator or user should check, appended to the message.
    fn hint(&self) -> &'static str {
        match self {
            Self::ClientTooOld => "upgrade the client to a MySQL 4.1+ compatible driver",
            Self::HandshakeTooLarge { .. } => {
                "check the client's connection attributes and user name length"
            }
            Self::BadHandshake(_) | Self::OutOfOrder(_) => {
                "check that the client speaks the MySQL protocol to this port"
            }
            Self::TlsNotConfigured => {
                "configure security.server-tls on tiproxy or connect without TLS"
            }
            Self::NoBackend(_) => {
                "check that the TiDB servers are up and reachable from tiproxy (GET /api/debug/health)"
            }
            Self::Incompatible(_) => "check the client and TiDB versions",
            Self::BackendTlsRequired(_) => {
                "enable TLS on TiDB or unset security.require-backend-tls"
            }
            Self::BackendLost(_) => {
                "the statement may or may not have been applied; check the TiDB server log"
            }
            Self::HeldNotRun(_) => "the statement was not run; reconnect and run it again",
            Self::BackendProtocol(_) => {
                "check the TiDB server log; this is a bug in TiDB or tiproxy"
            }
            Self::UnsupportedCommand(_) => "connect to TiDB directly for replication commands",
            Self::TooManyConnections(_) => "raise proxy.max-connections or close idle connections",
            Self::HandshakeTimeout(_) => "check the network between the client and tiproxy",
            Self::ShuttingDown => "reconnect; another tiproxy instance will serve you",
            Self::LocalExhaustion(e) => e.hint(),
        }
    }

    /// The ERR packet for this error.
    pub fn to_err_packet(&self) -> ErrPacket {
        ErrPacket {
            code: self.code(),
            sql_state: self.sql_state(),
            message: Bytes::from(format!("tiproxy: {self}; {}", self.hint())),
        }
    }

    /// Writes the ERR payload.
    pub fn write(&self, out: &mut BytesMut) {
        self.to_err_packet().write(out);
    }

    /// Writes the ERR payload sent instead of a greeting (no SQL state:
    /// see [`ErrPacket::write_pre_handshake`]).
    pub fn write_pre_handshake(&self, out: &mut BytesMut) {
        self.to_err_packet().write_pre_handshake(out);
    }
}

/// Why a session ended or an exchange failed. Reported to the driver in
/// [`crate::session::Event::Closed`] for logging and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The client sent bytes that are not the MySQL protocol.
    #[error("client protocol error: {0}")]
    ClientProtocol(String),
    /// The backend sent bytes the proxy cannot follow.
    #[error("backend protocol error: {0}")]
    BackendProtocol(String),
    /// The proxy refused the client with a MySQL error.
    #[error("refused client: {0}")]
    Refused(ProxyError),
    /// Authentication failed at the backend (its ERR was relayed).
    #[error("authentication failed: {code} {message}")]
    AuthFailed {
        /// MySQL error code from the backend.
        code: u16,
        /// Message from the backend.
        message: String,
    },
    /// The backend connection closed or failed.
    #[error("backend connection lost: {0}")]
    BackendLost(String),
    /// The client closed its connection.
    #[error("client closed the connection")]
    ClientClosed,
    /// The client sent COM_QUIT.
    #[error("client quit")]
    ClientQuit,
    /// The session was closed by the proxy (shutdown, operator).
    #[error("closed by tiproxy: {0}")]
    Closed(String),
}

/// A packet the proxy did not expect at this point of the protocol. Built
/// by [`UnexpectedPacket::new`] wherever a state machine meets one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected packet from the {leg}: expected {expected}, got {}", describe_first_byte(*.got))]
pub struct UnexpectedPacket {
    /// The leg it came from.
    pub leg: Leg,
    /// What the state machine expected, in words.
    pub expected: &'static str,
    /// The packet's first payload byte (`None`: an empty packet).
    pub got: Option<u8>,
}

impl UnexpectedPacket {
    /// The error for `payload`, read from `leg` when `expected` was due.
    pub fn new(leg: Leg, expected: &'static str, payload: &[u8]) -> Self {
        Self {
            leg,
            expected,
            got: payload.first().copied(),
        }
    }
}

fn describe_first_byte(b: Option<u8>) -> String {
    match b {
        None => "an empty packet".into(),
        Some(0x00) => "OK (0x00)".into(),
        Some(0xff) => "ERR (0xff)".into(),
        Some(0xfe) => "EOF or auth switch (0xfe)".into(),
        Some(b) => format!("a packet starting with 0x{b:02x}"),
    }
}

impl From<WireError> for ProxyError {
    fn from(e: WireError) -> Self {
        Self::BadHandshake(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_problem_and_what_to_check() {
        let e = ProxyError::ClientTooOld.to_err_packet();
        assert_eq!(e.code, 1251);
        let msg = e.message_text();
        assert!(msg.contains("CLIENT_PROTOCOL_41"), "{msg}");
        assert!(msg.contains("upgrade"), "{msg}");
        let e = ProxyError::HandshakeTooLarge {
            len: 70000,
            limit: 65536,
        }
        .to_err_packet();
        assert_eq!(e.code, 1153);
        assert!(!e.message_text().to_lowercase().contains("unknown error"));
        let e = ProxyError::LocalExhaustion(crate::health::LocalExhaustion::MemoryThreshold {
            used: 950 << 20,
            limit: 1000 << 20,
            threshold_pct: 90,
        })
        .to_err_packet();
        assert_eq!((e.code, &e.sql_state), (1041, b"HY000"));
        // Sent instead of a greeting: no SQL state for the client to show
        // as part of the message.
        let mut b = bytes::BytesMut::new();
        ProxyError::TooManyConnections(5).write_pre_handshake(&mut b);
        assert_eq!(&b[..3], &[0xff, 0x10, 0x04]);
        assert!(b[3..].starts_with(b"tiproxy: "), "{b:?}");
        let msg = e.message_text();
        assert!(
            msg.contains("950 MiB of 1000 MiB (95%)")
                && msg.contains("high-memory-usage-reject-threshold (90%)"),
            "{msg}"
        );
    }

    #[test]
    fn unexpected_packet_names_leg_expectation_and_packet() {
        let e = UnexpectedPacket::new(Leg::NewBackend, "the reply to SET SESSION_STATES", &[0x05]);
        assert_eq!(
            e.to_string(),
            "unexpected packet from the new backend: expected the reply to SET SESSION_STATES, got a packet starting with 0x05"
        );
        let e = UnexpectedPacket::new(Leg::Backend, "OK", &[]);
        assert!(e.to_string().ends_with("got an empty packet"), "{e}");
    }
}

//! Hostile bytes from either peer: every parser returns a typed error or a
//! value, never panics. The case count comes from `PROPTEST_CASES` (CI runs
//! a larger bounded budget than the default test run).

#![allow(clippy::disallowed_methods)] // tests and benches play the driver: they own the clock

use std::time::Instant;

use bytes::BytesMut;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tiproxy_core::CapabilityFlags;
use tiproxy_core::compress::{Algorithm, CompressedFraming};
use tiproxy_core::flags::MariaDbCapabilities;
use tiproxy_core::handshake::{
    AuthMoreData, AuthSwitchRequest, ChangeUser, ClientHello, HandshakeResponse, InitialHandshake,
    client_capabilities,
};
use tiproxy_core::migration::StatesReader;
use tiproxy_core::packet::{PacketDecoder, write_packet};
use tiproxy_core::proxy_protocol::ProxyHeader;
use tiproxy_core::response::{
    ColumnCount, EofPacket, ErrPacket, OkPacket, PrepareOk, parse_column_count,
};
use tiproxy_core::session::{Leg, Session, SessionConfig};
use tiproxy_core::tracker::{CommandTracker, TrackerOptions};

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..512)
}

proptest! {
    #[test]
    fn packet_parsers(b in bytes(), caps in any::<u32>()) {
        let caps = CapabilityFlags::from_bits_retain(caps);
        let _ = InitialHandshake::parse(&b);
        let _ = ClientHello::parse(&b);
        let _ = client_capabilities(&b);
        let _ = AuthSwitchRequest::parse(&b);
        let _ = AuthMoreData::parse(&b);
        let _ = ChangeUser::parse(&b, caps);
        let _ = OkPacket::parse(&b, caps);
        let _ = ErrPacket::parse(&b);
        let _ = EofPacket::parse(&b);
        let _ = PrepareOk::parse(&b);
        let _ = parse_column_count(&b);
        let _ = ColumnCount::parse(&b, true);
        let _ = ProxyHeader::parse(&b);
    }

    /// TiDB's `/metrics` text, as read by the balancer: arbitrary bytes and
    /// byte soup shaped like exposition lines.
    #[test]
    fn metrics_text(b in bytes(), lines in proptest::collection::vec("[a-z_{}\"\\= .0-9eE+#-]{0,40}", 0..20)) {
        let names = ["process_cpu_seconds_total", "a", "tidb_server_maxprocs"];
        let _ = tiproxy_core::prom::first_values(&b, &names);
        let text = lines.join("\n");
        let _ = tiproxy_core::prom::first_values(text.as_bytes(), &names);
    }

    #[test]
    fn framing_and_compression(b in bytes(), limit in 0usize..1000) {
        let mut d = PacketDecoder::with_limit(limit);
        d.extend(&b);
        while let Ok(Some(_)) = d.next_payload() {}
        for alg in [Algorithm::Zlib, Algorithm::Zstd(1)] {
            let mut f = CompressedFraming::new(alg);
            f.set_seq(b.get(3).copied().unwrap_or(0));
            let _ = f.decode(&b, &mut BytesMut::new());
        }
    }

    /// Exported sub-machine state read back from hostile bytes (a corrupt
    /// hand-over from another process): a typed error or a usable value,
    /// and an accepted encoding is the one export writes.
    #[test]
    fn exported_state(b in bytes()) {
        // As is, and shaped like a version-1 export (known flags, a small
        // prepared-statement count) so decoding gets past the header.
        let mut shaped = b.clone();
        if shaped.len() >= 16 {
            shaped[0] = 1;
            shaped[1] &= 7;
            shaped[12] %= 4;
            shaped[13..16].fill(0);
        }
        for b in [&b, &shaped] {
            let mut input = &b[..];
            if let Ok(t) = CommandTracker::import(&mut input) {
                let mut out = BytesMut::new();
                t.export(&mut out).expect("an imported tracker is idle");
                prop_assert_eq!(&out[..], &b[..b.len() - input.len()]);
            }
        }
        let mut input = &b[..];
        if let Ok(f) = CompressedFraming::import(&mut input) {
            let mut out = BytesMut::new();
            f.export(&mut out).expect("imported framing holds no partial frame");
        }
    }

    #[test]
    fn tracker_and_states_reader(
        packets in proptest::collection::vec(bytes(), 0..12),
        deprecate in any::<bool>(),
        mariadb in any::<u32>(),
    ) {
        let options = TrackerOptions {
            deprecate_eof: deprecate,
            mariadb: MariaDbCapabilities::from_bits_retain(mariadb),
            multi_statements: false,
        };
        let mut t = CommandTracker::with_options(options, Default::default());
        let mut r = StatesReader::new(deprecate);
        for p in &packets {
            let _ = r.feed(p);
            if t.accepts_client_packet() {
                let n = t.client_prefix_needed(p.len()).min(p.len());
                let _ = t.on_client_packet(p.len(), &p[..n]);
            } else {
                let _ = t.on_backend_packet(p.len(), p);
            }
        }
    }

    /// Whole sessions fed hostile packets on every leg at every stage.
    #[test]
    fn sessions(packets in proptest::collection::vec((0u8..3, bytes()), 1..16), seed in any::<u64>()) {
        let now = Instant::now();
        let mut s: Session = Session::new(SessionConfig::default(), now, &mut StdRng::seed_from_u64(seed));
        for (i, (leg, p)) in packets.iter().enumerate() {
            let leg = [Leg::Client, Leg::Backend, Leg::NewBackend][*leg as usize];
            if i == 1 {
                s.handle_connected(now, Leg::Backend);
            }
            if i == 3 {
                let _ = s.handle_redirect(now, "other:4000");
                s.handle_connected(now, Leg::NewBackend);
            }
            // Half the time frame the bytes as packets so they get deeper.
            if seed % 2 == 0 {
                let mut w = BytesMut::new();
                write_packet(&mut w, (i % 4) as u8, p);
                s.handle_data(now, leg, &w);
            } else {
                s.handle_data(now, leg, p);
            }
            while s.poll_action().is_some() {}
            while s.poll_event().is_some() {}
            for l in [Leg::Client, Leg::Backend, Leg::NewBackend] {
                let n = s.transmit(l).len();
                s.advance_transmit(l, n);
            }
        }
        if let Some(t) = s.poll_timeout() {
            s.handle_timeout(t);
        }
    }

    /// A session announcing MariaDB's extended capabilities (CLIENT_MYSQL
    /// clear in its greeting) fed hostile client bytes: raw, and after a
    /// well-formed MariaDB handshake response (CLIENT_MYSQL clear, any
    /// extended capabilities, even unknown ones) and a MariaDB backend's
    /// greeting and OK, so they reach the command phase.
    #[test]
    fn mariadb_sessions(
        packets in proptest::collection::vec((any::<bool>(), bytes()), 1..16),
        caps in any::<u32>(),
        mariadb in any::<u32>(),
        offered in any::<u32>(),
        seed in any::<u64>(),
    ) {
        let now = Instant::now();
        let cfg = SessionConfig {
            server_version: bytes::Bytes::from_static(b"5.5.5-10.11.6-MariaDB"),
            capabilities: CapabilityFlags::PROXY_SUPPORTED,
            mariadb_capabilities: MariaDbCapabilities::from_bits_retain(offered)
                & MariaDbCapabilities::PROXY_SUPPORTED,
            ..SessionConfig::default()
        };
        let mut s: Session = Session::new(cfg, now, &mut StdRng::seed_from_u64(seed));
        if seed % 2 == 0 {
            let resp = HandshakeResponse {
                capabilities: (CapabilityFlags::from_bits_retain(caps)
                    | CapabilityFlags::PROTOCOL_41)
                    - CapabilityFlags::CLIENT_MYSQL
                    - CapabilityFlags::SSL,
                max_packet_size: 1 << 24,
                charset: 45,
                filler: [0; 23],
                mariadb_capabilities: MariaDbCapabilities::from_bits_retain(mariadb),
                username: bytes::Bytes::from_static(b"app"),
                auth_response: bytes::Bytes::from(vec![9u8; 20]),
                database: None,
                auth_plugin: Some(bytes::Bytes::from_static(b"mysql_native_password")),
                attributes: Default::default(),
                zstd_level: None,
            };
            let mut b = BytesMut::new();
            resp.write(&mut b);
            let mut w = BytesMut::new();
            write_packet(&mut w, 1, &b);
            s.handle_data(now, Leg::Client, &w);
            s.handle_connected(now, Leg::Backend);
            // A MariaDB backend greeting and its OK: the client's bytes
            // then reach the command phase.
            let g = InitialHandshake {
                server_version: bytes::Bytes::from_static(b"5.5.5-10.11.6-MariaDB"),
                connection_id: 1000,
                auth_data: bytes::Bytes::from_static(b"BACKENDSALT123456789"),
                capabilities: CapabilityFlags::from_bits_truncate(0x051B_A6AF)
                    - CapabilityFlags::CLIENT_MYSQL,
                charset: 46,
                status: tiproxy_core::StatusFlags::AUTOCOMMIT,
                reserved: [0; 10],
                mariadb_capabilities: MariaDbCapabilities::from_bits_retain(offered),
                auth_plugin: bytes::Bytes::from_static(b"mysql_native_password"),
            };
            let mut b = BytesMut::new();
            g.write(&mut b);
            let mut w = BytesMut::new();
            write_packet(&mut w, 0, &b);
            write_packet(&mut w, 2, &[0, 0, 0, 2, 0, 0, 0]);
            s.handle_data(now, Leg::Backend, &w);
        }
        for (i, (framed, p)) in packets.iter().enumerate() {
            if *framed {
                let mut w = BytesMut::new();
                write_packet(&mut w, (i % 2) as u8, p);
                s.handle_data(now, Leg::Client, &w);
            } else {
                s.handle_data(now, Leg::Client, p);
            }
            while s.poll_action().is_some() {}
            while s.poll_event().is_some() {}
            for l in [Leg::Client, Leg::Backend, Leg::NewBackend] {
                let n = s.transmit(l).len();
                s.advance_transmit(l, n);
            }
        }
        if let Some(t) = s.poll_timeout() {
            s.handle_timeout(t);
        }
    }
}

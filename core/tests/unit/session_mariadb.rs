//! MariaDB's extended capabilities through the session: the greeting
//! announces them (with CLIENT_MYSQL clear), the client's choice is relayed
//! to every backend within what that backend offered, the tracker follows
//! what is in effect, and a backend lacking a flag that changes the layout
//! of responses cannot serve the client.

use super::*;

type M = MariaDbCapabilities;

/// What MariaDB 10.11 offers (measured: 0x1d).
const MARIADB_10_11: M = M::PROGRESS
    .union(M::STMT_BULK_OPERATIONS)
    .union(M::EXTENDED_METADATA)
    .union(M::CACHE_METADATA);

/// A MariaDB client: CLIENT_MYSQL clear.
const MARIADB_CLIENT: CapabilityFlags = CLIENT_CAPS.difference(CapabilityFlags::CLIENT_MYSQL);

/// A MariaDB server's standard word: CLIENT_MYSQL clear.
const MARIADB_CAPS: CapabilityFlags = TIDB_CAPS.difference(CapabilityFlags::CLIENT_MYSQL);

fn mariadb_cfg(offered: M) -> SessionConfig {
    SessionConfig {
        server_version: Bytes::from_static(b"5.5.5-10.11.6-MariaDB"),
        mariadb_capabilities: offered,
        ..cfg()
    }
}

impl Harness {
    fn mariadb_response(&mut self, seq: u8, caps: CapabilityFlags, mariadb: M) {
        let resp = HandshakeResponse {
            capabilities: caps,
            max_packet_size: 1 << 24,
            charset: 45,
            filler: [0; 23],
            mariadb_capabilities: mariadb,
            username: Bytes::from_static(b"app"),
            auth_response: Bytes::from(vec![9u8; 20]),
            database: None,
            auth_plugin: Some(Bytes::from_static(b"mysql_native_password")),
            attributes: Default::default(),
            zstd_level: None,
        };
        let mut b = BytesMut::new();
        resp.write(&mut b);
        self.send(Leg::Client, seq, &b);
    }

    fn mariadb_greeting(&mut self, leg: Leg, caps: CapabilityFlags, mariadb: M) {
        let g = InitialHandshake {
            server_version: Bytes::from_static(b"5.5.5-10.11.6-MariaDB"),
            connection_id: 1000,
            auth_data: Bytes::from_static(b"BACKENDSALT123456789"),
            capabilities: caps,
            charset: 46,
            status: StatusFlags::AUTOCOMMIT,
            reserved: [0; 10],
            mariadb_capabilities: mariadb,
            auth_plugin: Bytes::from_static(b"mysql_native_password"),
        };
        let mut b = BytesMut::new();
        g.write(&mut b);
        self.send(leg, 0, &b);
    }

    /// The handshake up to the response the backend receives, which is
    /// returned (parsed).
    fn mariadb_to_backend(
        cfg: SessionConfig,
        client: (CapabilityFlags, M),
        backend: M,
    ) -> (Self, HandshakeResponse) {
        let mut h = Self::new(cfg);
        h.greeting();
        h.mariadb_response(1, client.0, client.1);
        h.s.handle_connected(h.now, Leg::Backend);
        h.pump();
        h.mariadb_greeting(Leg::Backend, MARIADB_CAPS, backend);
        let p = h.recv_one(Leg::Backend);
        let ClientHello::Response(r) = ClientHello::parse(&p.data).unwrap() else {
            panic!("expected a handshake response, got {p:?}")
        };
        (h, r)
    }

    /// A whole MariaDB handshake; returns the session established.
    fn mariadb_established(client: (CapabilityFlags, M), backend: M) -> Self {
        let (mut h, _) = Self::mariadb_to_backend(mariadb_cfg(backend), client, backend);
        h.send(Leg::Backend, 2, &switch_request());
        assert_eq!(h.recv_one(Leg::Client).seq, 2);
        h.send(Leg::Client, 3, &[5u8; 20]);
        assert_eq!(h.recv_one(Leg::Backend).seq, 3);
        h.send(Leg::Backend, 4, &ok(StatusFlags::AUTOCOMMIT));
        assert_eq!(h.recv_one(Leg::Client).seq, 4);
        assert!(h.s.is_established());
        h.take_events();
        h
    }
}

#[test]
fn greeting_announces_what_the_proxy_can_relay_with_client_mysql_clear() {
    // Unknown bits and COM_MULTI (not relayed) are dropped.
    let offered = M::all() | M::from_bits_retain(1 << 20);
    let mut h = Harness::new(mariadb_cfg(offered));
    let g = h.greeting();
    assert!(!g.capabilities.contains(CapabilityFlags::CLIENT_MYSQL));
    assert_eq!(g.mariadb_capabilities, M::PROXY_SUPPORTED);
    assert!(!g.mariadb_capabilities.contains(M::COM_MULTI));

    // TiDB (and MySQL) keep CLIENT_MYSQL: the greeting is as before.
    let mut h = Harness::new(cfg());
    let g = h.greeting();
    assert!(g.capabilities.contains(CapabilityFlags::CLIENT_MYSQL));
    assert_eq!(g.mariadb_capabilities, M::empty());
}

#[test]
fn the_clients_choice_goes_to_the_backend_within_its_offer() {
    let asked = M::PROGRESS | M::EXTENDED_METADATA | M::CACHE_METADATA | M::COM_MULTI;
    let cfg = mariadb_cfg(MARIADB_10_11);
    let (h, r) = Harness::mariadb_to_backend(cfg, (MARIADB_CLIENT, asked), MARIADB_10_11);
    assert!(!r.capabilities.contains(CapabilityFlags::CLIENT_MYSQL));
    let want = M::PROGRESS | M::EXTENDED_METADATA | M::CACHE_METADATA;
    assert_eq!(r.mariadb_capabilities, want);
    assert_eq!(h.s.client_mariadb_capabilities(), want);
    assert_eq!(h.s.backend_mariadb_capabilities(), want);
}

#[test]
fn a_mysql_client_gets_no_extended_capabilities() {
    // CLIENT_MYSQL set: the client did not read the extended word.
    let cfg = mariadb_cfg(MARIADB_10_11);
    let (h, r) = Harness::mariadb_to_backend(cfg, (CLIENT_CAPS, M::empty()), MARIADB_10_11);
    assert_eq!(r.mariadb_capabilities, M::empty());
    assert_eq!(h.s.backend_mariadb_capabilities(), M::empty());
}

#[test]
fn the_ssl_request_carries_the_extended_word_too() {
    let cfg = SessionConfig {
        backend_tls: BackendTls::Required,
        ..mariadb_cfg(MARIADB_10_11)
    };
    let mut h = Harness::new(cfg);
    h.greeting();
    let asked = M::EXTENDED_METADATA | M::PROGRESS;
    h.mariadb_response(1, MARIADB_CLIENT, asked);
    h.s.handle_connected(h.now, Leg::Backend);
    h.pump();
    h.mariadb_greeting(Leg::Backend, MARIADB_CAPS, MARIADB_10_11);
    let p = h.recv_one(Leg::Backend);
    let ClientHello::Ssl(ssl) = ClientHello::parse(&p.data).unwrap() else {
        panic!("expected an SSL request, got {p:?}")
    };
    assert_eq!(ssl.mariadb_capabilities, asked);
    h.s.handle_tls_established(h.now, Leg::Backend);
    h.pump();
    let ClientHello::Response(r) = ClientHello::parse(&h.recv_one(Leg::Backend).data).unwrap()
    else {
        panic!()
    };
    assert_eq!(r.mariadb_capabilities, asked);
}

#[test]
fn a_backend_without_a_layout_flag_the_client_uses_is_refused() {
    let mut h = Harness::new(mariadb_cfg(MARIADB_10_11));
    h.greeting();
    h.mariadb_response(1, MARIADB_CLIENT, M::CACHE_METADATA | M::PROGRESS);
    h.s.handle_connected(h.now, Leg::Backend);
    h.pump();
    h.mariadb_greeting(Leg::Backend, MARIADB_CAPS, M::PROGRESS);
    let e = ErrPacket::parse(&h.recv_one(Leg::Client).data).unwrap();
    assert_eq!(e.code, 1235);
    assert!(e.message_text().contains("CACHE_METADATA"), "{e:?}");
    assert!(h.s.is_closed());
}

#[test]
fn a_backend_without_progress_reports_still_serves() {
    // PROGRESS only lets the server send more: not a layout flag.
    let cfg = mariadb_cfg(MARIADB_10_11);
    let client = (MARIADB_CLIENT, M::CACHE_METADATA | M::PROGRESS);
    let (_, r) = Harness::mariadb_to_backend(cfg, client, M::CACHE_METADATA);
    assert_eq!(r.mariadb_capabilities, M::CACHE_METADATA);
}

#[test]
fn the_tracker_follows_the_negotiated_extended_capabilities() {
    let asked = M::EXTENDED_METADATA | M::CACHE_METADATA | M::PROGRESS;
    let mut h = Harness::mariadb_established((MARIADB_CLIENT, asked), MARIADB_10_11);
    let opts = h.s.tracker().options();
    assert_eq!(opts.mariadb, asked);
    assert_eq!(
        opts,
        crate::tracker::TrackerOptions::negotiated(MARIADB_CLIENT, asked)
    );

    // A prepared statement, executed twice: the second result skips the
    // column definitions (metadata follows = 0). The session must end the
    // answer where the server did.
    h.send(Leg::Client, 0, b"\x16select a, b from t");
    h.recv_one(Leg::Backend);
    let mut p = BytesMut::new();
    PrepareOk {
        statement_id: 1,
        columns: 2,
        params: 0,
        warnings: 0,
    }
    .write(&mut p);
    let def =
        b"\x03def\x04test\x01t\x01t\x01a\x01a\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00";
    let answer = [&p[..], def, def, &eof(StatusFlags::AUTOCOMMIT)];
    for (i, a) in answer.iter().enumerate() {
        h.send(Leg::Backend, i as u8 + 1, a);
    }
    assert_eq!(h.recv(Leg::Client).len(), 4);
    let execute = b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00";
    for metadata_follows in [1u8, 0] {
        h.send(Leg::Client, 0, execute);
        h.recv_one(Leg::Backend);
        let mut answer: Vec<Vec<u8>> = vec![vec![2, metadata_follows]];
        if metadata_follows == 1 {
            answer.push(def.to_vec());
            answer.push(def.to_vec());
        }
        answer.push(eof(StatusFlags::AUTOCOMMIT));
        answer.push(vec![0, 0, 1, b'x', 1, b'y']);
        answer.push(eof(StatusFlags::AUTOCOMMIT));
        for (i, a) in answer.iter().enumerate() {
            h.send(Leg::Backend, i as u8 + 1, a);
        }
        let got = h.recv(Leg::Client);
        assert_eq!(
            got.len(),
            answer.len(),
            "metadata follows {metadata_follows}"
        );
        assert!(
            h.s.tracker().is_idle(),
            "metadata follows {metadata_follows}"
        );
    }
    h.query_ok("select 1", StatusFlags::AUTOCOMMIT);
}

#[test]
fn progress_reports_reach_the_client_before_the_answer() {
    let asked = M::PROGRESS;
    let mut h = Harness::mariadb_established((MARIADB_CLIENT, asked), MARIADB_10_11);
    h.send(Leg::Client, 0, b"\x03alter table t force");
    h.recv_one(Leg::Backend);
    // ERR header, code 0xFFFF, then stage data (as MariaDB writes it).
    let progress = b"\xff\xff\xff\x01\x01\x03\x10\x27\x00\x0ccopy to tmp ";
    h.send(Leg::Backend, 1, progress);
    h.send(Leg::Backend, 2, progress);
    assert!(!h.s.tracker().is_idle(), "a progress report is no answer");
    h.send(Leg::Backend, 3, &ok(StatusFlags::AUTOCOMMIT));
    let got = h.recv(Leg::Client);
    assert_eq!(got.len(), 3);
    assert_eq!(&got[0].data[..], &progress[..]);
    assert_eq!(got[2].data[0], 0x00);
    assert!(h.s.tracker().is_idle());
}

#[test]
fn change_user_keeps_the_extended_capabilities() {
    // MariaDB's COM_CHANGE_USER carries no capability word (user, auth,
    // database, charset, plugin, attributes): what the handshake agreed
    // stays in effect.
    let asked = M::EXTENDED_METADATA | M::CACHE_METADATA;
    let mut h = Harness::mariadb_established((MARIADB_CLIENT, asked), MARIADB_10_11);
    let mut cu = BytesMut::new();
    ChangeUser {
        username: Bytes::from_static(b"other"),
        auth_response: Bytes::from(vec![3u8; 20]),
        database: Bytes::new(),
        charset: Some(45),
        auth_plugin: Some(Bytes::from_static(b"mysql_native_password")),
        attributes: None,
    }
    .write(&mut cu, MARIADB_CLIENT);
    h.send(Leg::Client, 0, &cu);
    h.recv_one(Leg::Backend);
    h.send(Leg::Backend, 1, &switch_request());
    h.recv_one(Leg::Client);
    h.send(Leg::Client, 2, &[4u8; 20]);
    h.recv_one(Leg::Backend);
    h.send(Leg::Backend, 3, &ok(StatusFlags::AUTOCOMMIT));
    h.recv_one(Leg::Client);
    assert_eq!(h.s.user(), b"other");
    assert_eq!(h.s.backend_mariadb_capabilities(), asked);
    assert_eq!(h.s.tracker().options().mariadb, asked);
}

/// Starts a move of an established session and runs it to the target's
/// greeting, which offers `target`.
fn move_to(h: &mut Harness, target: M) {
    assert!(h.s.handle_redirect(h.now, "tidb-2:4000"));
    h.pump();
    export(h);
    h.take_actions();
    h.s.handle_connected(h.now, Leg::NewBackend);
    h.pump();
    h.mariadb_greeting(Leg::NewBackend, MARIADB_CAPS, target);
}

#[test]
fn a_move_target_gets_the_sessions_extended_capabilities_within_its_offer() {
    let asked = M::EXTENDED_METADATA | M::CACHE_METADATA | M::PROGRESS;
    let mut h = Harness::mariadb_established((MARIADB_CLIENT, asked), MARIADB_10_11);
    move_to(&mut h, M::EXTENDED_METADATA | M::CACHE_METADATA);
    let p = h.recv_one(Leg::NewBackend);
    let ClientHello::Response(r) = ClientHello::parse(&p.data).unwrap() else {
        panic!()
    };
    assert_eq!(
        r.auth_plugin.as_deref(),
        Some(plugin::TIDB_SESSION_TOKEN.as_bytes())
    );
    assert!(!r.capabilities.contains(CapabilityFlags::CLIENT_MYSQL));
    assert_eq!(
        r.mariadb_capabilities,
        M::EXTENDED_METADATA | M::CACHE_METADATA
    );
}

#[test]
fn a_move_target_without_a_layout_flag_fails_the_move_and_the_session_stays() {
    let asked = M::EXTENDED_METADATA | M::CACHE_METADATA;
    let mut h = Harness::mariadb_established((MARIADB_CLIENT, asked), MARIADB_10_11);
    move_to(&mut h, M::CACHE_METADATA | M::PROGRESS);
    assert!(
        h.recv(Leg::NewBackend).is_empty(),
        "no response to the target"
    );
    assert!(
        h.take_actions()
            .contains(&Action::CloseLeg(Leg::NewBackend))
    );
    let reason = h
        .take_events()
        .into_iter()
        .find_map(|e| match e {
            Event::MigrationFailed { reason, .. } => Some(reason),
            _ => None,
        })
        .expect("the move fails");
    let MigrationFailure::Handshake(why) = reason else {
        panic!("{reason:?}")
    };
    assert!(why.contains("EXTENDED_METADATA"), "{why}");
    h.query_ok("select 1", StatusFlags::AUTOCOMMIT);
}

//! The export/import property of [`super::an_imported_session_continues_byte_for_byte`]
//! on the legs it leaves out: a client leg compressed with zlib or zstd, a
//! client that upgraded to TLS (the SSL flag and the shifted handshake
//! sequence), and MariaDB's extended capabilities negotiated (a client
//! that clears CLIENT_MYSQL). An imported session must write exactly what
//! the original wrote from the export on, compressed bytes included, and
//! keep what was negotiated.

use super::*;

type M = MariaDbCapabilities;

/// What a session's client negotiated.
#[derive(Debug, Clone, Copy)]
struct Shape {
    compression: Option<Algorithm>,
    tls: bool,
    mariadb: bool,
}

/// Extended capabilities the MariaDB client and backend share: they do not
/// change the layout of the scripted answers of [`run_step_on`] (no
/// CACHE_METADATA: it reshapes the column count).
const MARIADB_SHARED: M = M::PROGRESS
    .union(M::STMT_BULK_OPERATIONS)
    .union(M::EXTENDED_METADATA);

fn shape_cfg(shape: Shape) -> SessionConfig {
    SessionConfig {
        capabilities: CapabilityFlags::PROXY_SUPPORTED,
        server_tls: shape.tls,
        server_version: if shape.mariadb {
            Bytes::from_static(b"5.5.5-10.11.6-MariaDB")
        } else {
            Bytes::from_static(b"8.0.11-TiDB-v8.5.0")
        },
        mariadb_capabilities: if shape.mariadb {
            MARIADB_SHARED | M::CACHE_METADATA
        } else {
            M::empty()
        },
        ..cfg()
    }
}

/// A session established with `shape`: greeting, (SSL request and TLS),
/// handshake response, backend greeting and OK.
fn established_as(shape: Shape) -> Harness {
    let mut h = Harness::new(shape_cfg(shape));
    let g = h.greeting();
    assert_eq!(g.capabilities.contains(CapabilityFlags::SSL), shape.tls);
    let mut caps = CLIENT_CAPS;
    match shape.compression {
        Some(Algorithm::Zlib) => caps |= CapabilityFlags::COMPRESS,
        Some(Algorithm::Zstd(_)) => caps |= CapabilityFlags::ZSTD_COMPRESSION_ALGORITHM,
        None => {}
    }
    let mariadb = if shape.mariadb {
        caps -= CapabilityFlags::CLIENT_MYSQL;
        MARIADB_SHARED
    } else {
        M::empty()
    };
    let mut seq = 1;
    if shape.tls {
        caps |= CapabilityFlags::SSL;
        let mut ssl = BytesMut::new();
        SslRequest {
            capabilities: caps,
            max_packet_size: 1 << 24,
            charset: 45,
            mariadb_capabilities: mariadb,
        }
        .write(&mut ssl);
        h.send(Leg::Client, seq, &ssl);
        assert!(
            h.take_actions().iter().any(|a| matches!(
                a,
                Action::StartTls {
                    leg: Leg::Client,
                    ..
                }
            )),
            "TLS with the client"
        );
        h.s.handle_tls_established(h.now, Leg::Client);
        seq += 1;
    }
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
        zstd_level: match shape.compression {
            Some(Algorithm::Zstd(level)) => Some(level),
            _ => None,
        },
    };
    let mut b = BytesMut::new();
    resp.write(&mut b);
    h.send(Leg::Client, seq, &b);
    h.s.handle_connected(h.now, Leg::Backend);
    h.pump();
    let mut backend_caps = TIDB_CAPS | CapabilityFlags::ZSTD_COMPRESSION_ALGORITHM;
    if shape.mariadb {
        backend_caps -= CapabilityFlags::CLIENT_MYSQL;
    }
    let g = InitialHandshake {
        server_version: Bytes::from_static(b"5.5.5-10.11.6-MariaDB"),
        connection_id: 1000,
        auth_data: Bytes::from_static(b"BACKENDSALT123456789"),
        capabilities: backend_caps,
        charset: 46,
        status: StatusFlags::AUTOCOMMIT,
        reserved: [0; 10],
        mariadb_capabilities: if shape.mariadb {
            MARIADB_SHARED | M::CACHE_METADATA
        } else {
            M::empty()
        },
        auth_plugin: Bytes::from_static(b"mysql_native_password"),
    };
    let mut b = BytesMut::new();
    g.write(&mut b);
    h.send(Leg::Backend, 0, &b);
    assert_eq!(h.recv_one(Leg::Backend).seq, 1);
    h.send(Leg::Backend, 2, &ok(StatusFlags::AUTOCOMMIT));
    // The client's OK: compressed or not, the harness need not read it.
    h.client = PacketDecoder::default();
    assert!(h.s.is_established(), "{shape:?}: {:?}", h.take_events());
    assert_eq!(h.s.client_mariadb_capabilities(), mariadb);
    h
}

/// What export must keep: the negotiated words.
fn negotiated(s: &Session) -> (CapabilityFlags, M, M) {
    (
        s.client_capabilities(),
        s.client_mariadb_capabilities(),
        s.backend_mariadb_capabilities(),
    )
}

fn any_shape() -> impl Strategy<Value = Shape> {
    (
        prop_oneof![
            Just(None),
            Just(Some(Algorithm::Zlib)),
            (1u8..=19).prop_map(|l| Some(Algorithm::Zstd(l))),
        ],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(compression, tls, mariadb)| Shape {
            compression,
            tls,
            mariadb,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Export at every safe point of a random command stream on a
    /// compressed, TLS or MariaDB session; import into a fresh session:
    /// from there on it writes exactly what the original wrote (the
    /// compressed frames and their sequence included), exports the same
    /// bytes and keeps what was negotiated.
    #[test]
    fn an_imported_session_continues_byte_for_byte_on_any_leg(
        shape in any_shape(),
        steps in proptest::collection::vec(any_step(), 1..24),
    ) {
        let mut h = established_as(shape);
        let now = h.now;
        let mut peers = Peers::default();
        let mut outputs = Vec::new();
        let mut exports = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            if let Ok(e) = h.s.export() {
                exports.push((i, e, peers.clone()));
            } else {
                prop_assert!(peers.in_txn, "idle outside a transaction but not exportable");
            }
            outputs.push(run_step_on(&mut h.s, now, &mut peers, step, shape.compression));
        }
        prop_assert!(!exports.is_empty());
        for (at, bytes, peers_then) in exports {
            let mut b: Session = Session::import(shape_cfg(shape), &bytes, now).unwrap();
            prop_assert_eq!(negotiated(&b), negotiated(&h.s));
            prop_assert_eq!(b.export().unwrap(), bytes.clone());
            let mut peers = peers_then;
            for (i, step) in steps.iter().enumerate().skip(at) {
                let out = run_step_on(&mut b, now, &mut peers, step, shape.compression);
                prop_assert_eq!(&out, &outputs[i], "{:?}: step {} ({:?}) after import at {}", shape, i, step, at);
            }
        }
    }
}

/// The property above would pass vacuously if the client leg were not
/// compressed: the answers it compares are compressed frames.
#[test]
fn the_compressed_shapes_compress_the_client_leg() {
    for alg in [Algorithm::Zlib, Algorithm::Zstd(3)] {
        let shape = Shape {
            compression: Some(alg),
            tls: true,
            mariadb: true,
        };
        let mut h = established_as(shape);
        let now = h.now;
        let mut plain = BytesMut::new();
        write_packet(&mut plain, 0, b"\x03select a from t");
        let mut wire = BytesMut::new();
        CompressedFraming::new(alg).encode(&plain, &mut wire);
        feed(&mut h.s, now, Leg::Client, &wire);
        h.s.handle_data(now, Leg::Backend, &result_set_wire(3, 1));
        let frame = h.s.transmit(Leg::Client).to_vec();
        // A 7-byte compressed header whose sequence is 1 and whose
        // uncompressed length is not zero (the frame was deflated).
        assert_eq!(frame[3], 1, "{alg:?}: compressed sequence");
        assert_ne!(&frame[4..7], &[0, 0, 0], "{alg:?}: deflated");
        let mut plain = BytesMut::new();
        let mut dec = CompressedFraming::new(alg);
        dec.set_seq(1);
        let len = 7 + u32::from_le_bytes([frame[0], frame[1], frame[2], 0]) as usize;
        dec.decode(&frame[..len], &mut plain).unwrap();
        assert!(
            plain.windows(6).any(|w| w == b"\x05row-2"),
            "{alg:?}: the row inside the frame"
        );
    }
}

/// With crash protection on, the state copy and its age travel next to the
/// export: the imported session is protected at once and a plain read
/// costs it nothing more, where without the copy it is unprotected until
/// its next command, after which a `SHOW SESSION_STATES` runs. A copy too
/// old for its token, or one offered to a session without protection, is
/// not taken.
#[test]
fn a_protection_copy_handed_over_spares_the_imported_session_an_export() {
    let protected = || SessionConfig {
        protect: crate::session::protect::ProtectConfig {
            enabled: true,
            // Export as soon as a command ends (no quiet period), so the
            // backend traffic shows at once.
            delay_ms: 0,
            ..Default::default()
        },
        ..cfg()
    };
    let mut h = Harness::established(protected(), CLIENT_CAPS);
    let q = h.recv_one(Leg::Backend);
    assert_eq!(&q.data[..], b"\x03SHOW SESSION_STATES");
    for (i, p) in states_result(STATES, TOKEN).iter().enumerate() {
        h.send(Leg::Backend, (i + 1) as u8, p);
    }
    assert!(h.s.is_protected(h.now));
    let later = h.now + Duration::from_secs(10);
    let copy = h.s.protection_copy(later).expect("a clean copy");
    assert_eq!(
        (&copy.states[..], &copy.token[..], copy.age),
        (STATES, TOKEN, Duration::from_secs(10))
    );
    let bytes = h.s.export().unwrap();

    // The imported session's backend traffic for one plain read.
    let read_once = |copy: Option<ProtectionCopy>| {
        let mut b = Harness::new(protected());
        b.now = later;
        b.s = Session::import(protected(), &bytes, later).unwrap();
        let with = copy.is_some();
        if let Some(c) = copy {
            assert!(b.s.adopt_protection_copy(c, later));
        }
        assert_eq!(b.s.is_protected(later), with);
        b.pump();
        b.send(Leg::Client, 0, b"\x03select 1");
        let mut sent = b.recv(Leg::Backend);
        let mut answer = vec![vec![1], b"\x03def\x00\x00\x00\x011\x00".to_vec()];
        answer.extend([eof(StatusFlags::AUTOCOMMIT), b"\x011".to_vec()]);
        answer.push(eof(StatusFlags::AUTOCOMMIT));
        for (i, p) in answer.iter().enumerate() {
            b.send(Leg::Backend, (i + 1) as u8, p);
        }
        sent.extend(b.recv(Leg::Backend));
        sent.into_iter()
            .map(|p| p.data.to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        read_once(Some(copy.clone())),
        vec![b"\x03select 1".to_vec()]
    );
    assert_eq!(
        read_once(None),
        vec![
            b"\x03select 1".to_vec(),
            b"\x03SHOW SESSION_STATES".to_vec()
        ]
    );

    let mut b: Session = Session::import(protected(), &bytes, later).unwrap();
    let stale = ProtectionCopy {
        age: Duration::from_secs(50),
        ..copy.clone()
    };
    assert!(!b.adopt_protection_copy(stale, later));
    assert!(!b.is_protected(later));
    let mut b: Session = Session::import(cfg(), &bytes, later).unwrap();
    assert!(!b.adopt_protection_copy(copy, later));
    assert!(b.protection_copy(later).is_none());
}

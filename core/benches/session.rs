//! Hot-path benchmarks of the session state machine.
//!
//! `query_one_row`: one COM_QUERY client->backend and a one-row result set
//! backend->client, through an established session (both directions, the
//! tracker, the event queue). `result_10k_rows`: a 10,000-row result set
//! streamed to the client; throughput is payload bytes per second.
//! `memcpy_baseline` copies the same bytes once, the floor any relay pays.

#![allow(clippy::disallowed_methods)] // tests and benches play the driver: they own the clock

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tiproxy_core::flags::{CapabilityFlags, StatusFlags};
use tiproxy_core::handshake::{HandshakeResponse, InitialHandshake};
use tiproxy_core::packet::write_packet;
use tiproxy_core::response::{EofPacket, OkPacket};
use tiproxy_core::session::{Leg, Session, SessionConfig};

fn drain(s: &mut Session) {
    while s.poll_action().is_some() {}
    while s.poll_event().is_some() {}
    for leg in [Leg::Client, Leg::Backend] {
        let n = s.transmit(leg).len();
        s.advance_transmit(leg, n);
    }
}

fn packet(seq: u8, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    write_packet(&mut b, seq, payload);
    b
}

fn establish(deprecate_eof: bool) -> (Session, Instant) {
    let now = Instant::now();
    let mut s: Session = Session::new(SessionConfig::default(), now, &mut StdRng::seed_from_u64(1));
    drain(&mut s);
    let mut caps = CapabilityFlags::PROTOCOL_41
        | CapabilityFlags::SECURE_CONNECTION
        | CapabilityFlags::PLUGIN_AUTH
        | CapabilityFlags::TRANSACTIONS
        | CapabilityFlags::MULTI_RESULTS;
    if deprecate_eof {
        caps |= CapabilityFlags::DEPRECATE_EOF;
    }
    let mut resp = BytesMut::new();
    HandshakeResponse {
        capabilities: caps,
        max_packet_size: 1 << 24,
        charset: 45,
        filler: [0; 23],
        mariadb_capabilities: Default::default(),
        username: Bytes::from_static(b"root"),
        auth_response: Bytes::new(),
        database: None,
        auth_plugin: Some(Bytes::from_static(b"mysql_native_password")),
        attributes: Default::default(),
        zstd_level: None,
    }
    .write(&mut resp);
    s.handle_data(now, Leg::Client, &packet(1, &resp));
    s.handle_connected(now, Leg::Backend);
    let mut g = BytesMut::new();
    InitialHandshake {
        server_version: Bytes::from_static(b"8.0.11-TiDB-v8.5.0"),
        connection_id: 1,
        auth_data: Bytes::from_static(b"01234567890123456789"),
        capabilities: CapabilityFlags::PROXY_SUPPORTED,
        charset: 46,
        status: StatusFlags::AUTOCOMMIT,
        reserved: [0; 10],
        mariadb_capabilities: Default::default(),
        auth_plugin: Bytes::from_static(b"mysql_native_password"),
    }
    .write(&mut g);
    s.handle_data(now, Leg::Backend, &packet(0, &g));
    let mut ok = BytesMut::new();
    OkPacket {
        status: StatusFlags::AUTOCOMMIT,
        ..Default::default()
    }
    .write(&mut ok, CapabilityFlags::PROTOCOL_41);
    s.handle_data(now, Leg::Backend, &packet(2, &ok));
    drain(&mut s);
    assert!(s.is_established());
    (s, now)
}

fn result_set(rows: usize, row_len: usize) -> (BytesMut, usize) {
    let mut b = BytesMut::new();
    let mut seq = 1;
    let mut eof = BytesMut::new();
    EofPacket {
        warnings: 0,
        status: StatusFlags::AUTOCOMMIT,
    }
    .write(&mut eof);
    seq = write_packet(&mut b, seq, &[1]);
    seq = write_packet(
        &mut b,
        seq,
        b"\x03def\x04test\x01t\x01t\x01a\x01a\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00",
    );
    seq = write_packet(&mut b, seq, &eof);
    let row: Vec<u8> = std::iter::once((row_len - 1) as u8)
        .chain(std::iter::repeat_n(b'x', row_len - 1))
        .collect();
    let mut payload = 0;
    for _ in 0..rows {
        seq = write_packet(&mut b, seq, &row);
        payload += row.len();
    }
    write_packet(&mut b, seq, &eof);
    (b, payload)
}

fn bench(c: &mut Criterion) {
    let query = packet(0, b"\x03SELECT c FROM sbtest1 WHERE id=1");
    let (one_row, _) = result_set(1, 120);

    let (mut s, now) = establish(false);
    c.bench_function("query_one_row", |b| {
        b.iter(|| {
            s.handle_data(now, Leg::Client, black_box(&query));
            let n = s.transmit(Leg::Backend).len();
            s.advance_transmit(Leg::Backend, n);
            s.handle_data(now, Leg::Backend, black_box(&one_row));
            let n = s.transmit(Leg::Client).len();
            s.advance_transmit(Leg::Client, n);
            while let Some(e) = s.poll_event() {
                black_box(e);
            }
        })
    });

    let (big, payload) = result_set(10_000, 100);
    let mut g = c.benchmark_group("result_10k_rows");
    g.throughput(Throughput::Bytes(payload as u64));
    let (mut s, now) = establish(false);
    g.bench_function("session", |b| {
        b.iter(|| {
            s.handle_data(now, Leg::Client, &query);
            let n = s.transmit(Leg::Backend).len();
            s.advance_transmit(Leg::Backend, n);
            // Delivered in 16 KiB reads, as a socket would.
            for chunk in big.chunks(16 * 1024) {
                s.handle_data(now, Leg::Backend, black_box(chunk));
                let n = s.transmit(Leg::Client).len();
                s.advance_transmit(Leg::Client, n);
            }
            while let Some(e) = s.poll_event() {
                black_box(e);
            }
        })
    });
    let mut out = BytesMut::with_capacity(32 * 1024);
    g.bench_function("memcpy_baseline", |b| {
        b.iter(|| {
            for chunk in big.chunks(16 * 1024) {
                out.extend_from_slice(black_box(chunk));
                black_box(&out);
                out.clear();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

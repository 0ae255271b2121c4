//! Golden sessions recorded from a real MariaDB 10.11 (see
//! `fixtures/README.md` for how they were captured) replayed through the
//! session state machine.
//!
//! After the client's handshake response, a proxy must be invisible: every
//! packet one peer sent must reach the other byte for byte (sequence ids
//! included), with two exceptions the proxy makes on purpose: COM_CHANGE_USER
//! is rewritten so the backend re-salts the authentication, and COM_QUIT ends
//! the session at the proxy. If the command tracker misjudged where any
//! response ends, the next command would be held or misrouted and the
//! replay would fail.

#![allow(clippy::disallowed_methods)] // tests and benches play the driver: they own the clock

use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::BytesMut;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tiproxy_core::compress::{Algorithm, CompressedFraming};
use tiproxy_core::handshake::{ChangeUser, ClientHello, InitialHandshake, plugin};
use tiproxy_core::packet::{PacketDecoder, PacketHeader};
use tiproxy_core::response::{EofPacket, ErrPacket, OkPacket};
use tiproxy_core::session::{Action, Leg, Session, SessionConfig};
use tiproxy_core::{CapabilityFlags, Command};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToServer,
    ToClient,
}

#[derive(Debug)]
struct Record {
    dir: Dir,
    /// Wire bytes as recorded (a whole packet, or a compressed frame).
    bytes: Vec<u8>,
    compressed: bool,
    step: String,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mariadb-10.11")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn load(name: &str) -> Vec<Record> {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("fixture");
    let mut out = Vec::new();
    let mut compressed = false;
    let mut step = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(c) = line.strip_prefix('#') {
            if c.contains("compression starts") {
                compressed = true;
            }
            if let Some(s) = c.trim().strip_prefix("step:") {
                step = s.trim().to_string();
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (dir, rest) = match line.split_at(1) {
            (">", r) => (Dir::ToServer, r.trim()),
            ("<", r) => (Dir::ToClient, r.trim()),
            _ => panic!("bad fixture line in {name}: {line}"),
        };
        let bytes = if rest.starts_with("len=") {
            // An elided large packet: len=N seq=S first=HEX fill=HEX.
            let mut len = 0;
            let mut seq = 0;
            let mut first = Vec::new();
            let mut fill = 0;
            for kv in rest.split_whitespace() {
                let (k, v) = kv.split_once('=').expect("key=value");
                match k {
                    "len" => len = v.parse().expect("len"),
                    "seq" => seq = v.parse().expect("seq"),
                    "first" => first = hex(v),
                    "fill" => fill = hex(v)[0],
                    _ => {}
                }
            }
            let mut p = PacketHeader { len, seq }.to_bytes().to_vec();
            p.extend_from_slice(&first);
            p.resize(4 + len, fill);
            p
        } else {
            hex(rest)
        };
        out.push(Record {
            dir,
            bytes,
            compressed,
            step: step.clone(),
        });
    }
    out
}

/// Plain packets inside a recorded compressed frame.
fn inflate(frame: &[u8]) -> Vec<u8> {
    let mut f = CompressedFraming::new(Algorithm::Zlib);
    f.set_seq(frame[3]);
    let mut out = BytesMut::new();
    f.decode(frame, &mut out).expect("recorded frame decodes");
    assert_eq!(f.buffered(), 0, "one whole frame per record");
    out.to_vec()
}

struct Replay {
    s: Session,
    now: Instant,
    client_framing: Option<CompressedFraming>,
    closed: bool,
}

impl Replay {
    fn take(&mut self, leg: Leg) -> Vec<u8> {
        while let Some(a) = self.s.poll_action() {
            if a == Action::Close {
                self.closed = true;
            }
        }
        while self.s.poll_event().is_some() {}
        let out = self.s.transmit(leg).to_vec();
        self.s.advance_transmit(leg, out.len());
        if leg == Leg::Client
            && let Some(f) = self.client_framing.as_mut()
        {
            let mut plain = BytesMut::new();
            f.decode(&out, &mut plain).expect("proxy's frames decode");
            return plain.to_vec();
        }
        out
    }

    fn feed(&mut self, leg: Leg, bytes: &[u8], chunk: usize) {
        for c in bytes.chunks(chunk) {
            self.s.handle_data(self.now, leg, c);
        }
    }
}

/// Replays `name`, feeding every record in pieces of `chunk` bytes.
fn replay(name: &str, chunk: usize) -> Replay {
    let records = load(name);
    assert!(records.len() >= 3, "{name}: too few records");
    let now = Instant::now();
    let mut r = Replay {
        s: Session::new(SessionConfig::default(), now, &mut StdRng::seed_from_u64(3)),
        now,
        client_framing: None,
        closed: false,
    };
    let greeting_rec = &records[0];
    assert_eq!(greeting_rec.dir, Dir::ToClient);
    let greeting = InitialHandshake::parse(&greeting_rec.bytes[4..]).expect("greeting parses");
    r.take(Leg::Client); // the proxy's own greeting

    // The client's handshake response.
    let resp_rec = &records[1];
    assert_eq!(resp_rec.dir, Dir::ToServer);
    let ClientHello::Response(client_resp) =
        ClientHello::parse(&resp_rec.bytes[4..]).expect("response parses")
    else {
        panic!("{name}: expected a handshake response")
    };
    r.feed(Leg::Client, &resp_rec.bytes, chunk);
    r.take(Leg::Client);
    r.s.handle_connected(now, Leg::Backend);
    r.feed(Leg::Backend, &greeting_rec.bytes, chunk);
    let sent = r.take(Leg::Backend);
    let mut d = PacketDecoder::default();
    d.extend(&sent);
    let p = d
        .next_payload()
        .unwrap()
        .expect("proxy sent a handshake response");
    assert_eq!(p.seq, 1);
    let ClientHello::Response(proxy_resp) = ClientHello::parse(&p.data).unwrap() else {
        panic!("{name}: proxy sent an SSL request")
    };
    assert_eq!(proxy_resp.username, client_resp.username);
    assert_eq!(proxy_resp.database, client_resp.database);
    assert_eq!(proxy_resp.attributes, client_resp.attributes);
    assert_eq!(
        proxy_resp.auth_plugin.as_deref(),
        Some(plugin::FORCE_SWITCH.as_bytes())
    );
    let shape = CapabilityFlags::SHAPE;
    assert_eq!(
        proxy_resp.capabilities & shape,
        client_resp.capabilities & greeting.capabilities & shape,
        "{name}: the backend leg agrees on every shape capability"
    );

    for (i, rec) in records.iter().enumerate().skip(2) {
        let ctx = format!("{name} record {i} ({})", rec.step);
        if rec.compressed && r.client_framing.is_none() {
            r.client_framing = Some(CompressedFraming::new(Algorithm::Zlib));
        }
        assert!(!r.closed, "{ctx}: session closed early");
        match rec.dir {
            Dir::ToServer => {
                let plain = if rec.compressed {
                    inflate(&rec.bytes)
                } else {
                    rec.bytes.clone()
                };
                if rec.compressed {
                    // Our decoder of the proxy's frames follows the shared
                    // compressed sequence the client just used.
                    r.client_framing
                        .as_mut()
                        .expect("set above")
                        .set_seq(rec.bytes[3].wrapping_add(1));
                }
                r.feed(Leg::Client, &rec.bytes, chunk);
                let got = r.take(Leg::Backend);
                let cmd = plain.get(4).copied().map(Command::from_byte);
                match cmd {
                    Some(Command::Quit) if plain.len() == 5 => {
                        assert!(
                            got.is_empty(),
                            "{ctx}: COM_QUIT ends the session at the proxy"
                        );
                        r.take(Leg::Client);
                        assert!(r.closed, "{ctx}: session closes on COM_QUIT");
                    }
                    Some(Command::ChangeUser)
                        if r.s.tracker().command() == Some(Command::ChangeUser) =>
                    {
                        let cu = ChangeUser::parse(&got[4..], r.s.client_capabilities())
                            .expect("rewritten");
                        assert_eq!(
                            cu.auth_plugin.as_deref(),
                            Some(plugin::FORCE_SWITCH.as_bytes()),
                            "{ctx}"
                        );
                    }
                    _ => assert_eq!(
                        hexs(&got),
                        hexs(&plain),
                        "{ctx}: backend must receive the client's bytes"
                    ),
                }
            }
            Dir::ToClient => {
                let plain = if rec.compressed {
                    inflate(&rec.bytes)
                } else {
                    rec.bytes.clone()
                };
                r.feed(Leg::Backend, &plain, chunk);
                let got = r.take(Leg::Client);
                if rec.compressed && chunk != usize::MAX {
                    // Each delivery becomes its own frame, and the first packet
                    // of a frame takes the frame's sequence id (as servers
                    // do): the packets are the same, their ids may differ.
                    assert_eq!(
                        payloads(&got),
                        payloads(&plain),
                        "{ctx}: client must receive the server's packets"
                    );
                } else {
                    assert_eq!(
                        hexs(&got),
                        hexs(&plain),
                        "{ctx}: client must receive the server's bytes"
                    );
                }
            }
        }
    }
    r
}

/// The payloads of the whole packets in `b`, ignoring sequence ids.
fn payloads(b: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = b;
    while let Some(h) = PacketHeader::parse(rest) {
        out.push(hexs(&rest[4..4 + h.len]));
        rest = &rest[4 + h.len..];
    }
    assert!(rest.is_empty(), "a partial packet was left");
    out
}

fn hexs(b: &[u8]) -> String {
    if b.len() > 256 {
        return format!(
            "{} bytes, crc {:08x}",
            b.len(),
            b.iter().fold(0u32, |a, &x| a.rotate_left(5) ^ u32::from(x))
        );
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn all_fixtures() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures())
        .expect("fixtures dir")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".txt"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_fixture_replays_byte_for_byte() {
    let names = all_fixtures();
    assert!(names.len() >= 8, "fixtures missing: {names:?}");
    for name in &names {
        let r = replay(name, usize::MAX);
        if name == "wrong_password.txt" {
            assert!(
                r.closed || r.s.is_closed(),
                "a failed login closes the session"
            );
        } else {
            assert!(r.s.is_established() || r.s.is_closed(), "{name}");
        }
    }
}

#[test]
fn every_fixture_replays_in_small_pieces() {
    for name in all_fixtures() {
        replay(&name, 7);
    }
}

#[test]
fn recorded_packets_parse_and_round_trip() {
    for name in all_fixtures() {
        let records = load(&name);
        let greeting = &records[0].bytes[4..];
        let g = InitialHandshake::parse(greeting).unwrap();
        let mut again = BytesMut::new();
        g.write(&mut again);
        assert_eq!(hexs(&again), hexs(greeting), "{name}: greeting round trip");
        assert!(g.server_version.starts_with(b"5.5.5-10.11"), "{name}");
        let resp = &records[1].bytes[4..];
        if let ClientHello::Response(r) = ClientHello::parse(resp).unwrap() {
            let mut again = BytesMut::new();
            r.write(&mut again);
            assert_eq!(
                hexs(&again),
                hexs(resp),
                "{name}: handshake response round trip"
            );
        }
        let negotiated = match ClientHello::parse(resp) {
            Ok(ClientHello::Response(r)) => r.capabilities & g.capabilities,
            _ => CapabilityFlags::PROTOCOL_41,
        };
        for (i, rec) in records.iter().enumerate().skip(1) {
            if rec.dir != Dir::ToClient || rec.compressed {
                continue;
            }
            // A 0x00 packet is an OK only as the first answer to a command
            // other than COM_STMT_PREPARE (binary rows start with 0x00 too).
            let prev = &records[i - 1];
            let answers_command = prev.dir == Dir::ToServer && prev.bytes.get(4) != Some(&0x16);
            let p = &rec.bytes[4..];
            match p.first() {
                Some(0xff) => {
                    let e = ErrPacket::parse(p).unwrap();
                    let mut again = BytesMut::new();
                    e.write(&mut again);
                    assert_eq!(hexs(&again), hexs(p), "{name}: ERR round trip");
                }
                Some(0xfe) if p.len() == 5 => {
                    let e = EofPacket::parse(p).unwrap();
                    let mut again = BytesMut::new();
                    e.write(&mut again);
                    assert_eq!(again.to_vec(), p, "{name}: EOF round trip");
                }
                Some(0x00) if answers_command => {
                    let ok = OkPacket::parse(p, negotiated).unwrap();
                    let mut again = BytesMut::new();
                    ok.write(&mut again, negotiated);
                    assert_eq!(again.to_vec(), p, "{name}: OK round trip");
                }
                _ => {}
            }
        }
    }
}

#[test]
fn wrong_password_error_reaches_the_client() {
    let records = load("wrong_password.txt");
    let err = records
        .iter()
        .rev()
        .find(|r| r.dir == Dir::ToClient)
        .unwrap();
    let e = ErrPacket::parse(&err.bytes[4..]).unwrap();
    assert_eq!(e.code, 1045);
}

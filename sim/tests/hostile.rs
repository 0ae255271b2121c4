//! Garbage from a client never panics the double: random command packets
//! and random SQL after login, with a panic hook watching every task.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{fleet, raw, sql_addr};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tiproxy_core::packet::write_packet;
use tiproxy_sim::tidb::TidbOptions;
use tiproxy_sim::tidb::client::ConnectOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static PANICS: AtomicUsize = AtomicUsize::new(0);

const WORDS: &[&str] = &[
    "SELECT",
    "*",
    "FROM",
    "t",
    "WHERE",
    "id",
    "=",
    "1",
    "?",
    "(",
    ")",
    "'x'",
    "'a\\'b'",
    "@a",
    "@@autocommit",
    "@@session.wait_timeout",
    ",",
    "INSERT",
    "INTO",
    "VALUES",
    "UPDATE",
    "SET",
    "DELETE",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SHOW",
    "SESSION_STATES",
    "PROCESSLIST",
    "ORDER",
    "BY",
    "LIMIT",
    "OFFSET",
    "-",
    "+",
    "/",
    "%",
    "DIV",
    "NULL",
    "BETWEEN",
    "AND",
    "OR",
    "NOT",
    "IN",
    "LIKE",
    ";",
    "PREPARE",
    "s",
    "EXECUTE",
    "USING",
    "DEALLOCATE",
    "CREATE",
    "DROP",
    "TABLE",
    "DATABASE",
    "INT",
    "VARCHAR(3)",
    "PRIMARY",
    "KEY",
    "AUTO_INCREMENT",
    "`q`",
    "1e400",
    "99999999999999999999",
    "-9223372036854775808",
    "COUNT(*)",
    "SUM(id)",
    "CONCAT",
    "USE",
    "test",
    "IS",
    "<=>",
    ">=",
    "<",
    "2.5",
    "\"s\"",
    "/*c*/",
    "--",
    "#",
    "@@",
    "@",
    "'",
    "`",
];

fn random_sql(rng: &mut StdRng) -> String {
    let n = rng.random_range(1..14);
    (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn random_commands_and_sql_never_panic() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        eprintln!("PANIC: {info}");
    }));
    let f = fleet(1, TidbOptions::default()).await;
    let addr = sql_addr(&f, 0);
    let root = ConnectOptions::password("root", "");
    let mut setup = raw(&addr, &root).await;
    setup
        .query("CREATE TABLE test.t (id INT PRIMARY KEY, v VARCHAR(3))")
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(0x7d0b1e);
    let commands: &[u8] = &[
        0x01, 0x02, 0x03, 0x03, 0x03, 0x03, 0x04, 0x09, 0x0e, 0x11, 0x16, 0x16, 0x17, 0x17, 0x17,
        0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1f, 0x42,
    ];
    let mut stream = None;
    for _ in 0..400 {
        let s = match stream.as_mut() {
            Some(s) => s,
            None => {
                let mut opts = root.clone();
                opts.database = Some("test".into());
                stream.insert(raw(&addr, &opts).await.into_inner())
            }
        };
        let cmd = commands[rng.random_range(0..commands.len())];
        let mut payload = vec![cmd];
        match cmd {
            0x03 | 0x16 => payload.extend_from_slice(random_sql(&mut rng).as_bytes()),
            0x17..=0x1a => {
                // A plausible statement id, then noise.
                payload.extend_from_slice(&rng.random_range(0u32..4).to_le_bytes());
                let n = rng.random_range(0..24);
                payload.extend((0..n).map(|_| rng.random::<u8>()));
            }
            _ => {
                let n = rng.random_range(0..32);
                payload.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
        let mut out = bytes::BytesMut::new();
        write_packet(&mut out, 0, &payload);
        if s.write_all(&out).await.is_err() {
            stream = None;
            continue;
        }
        let mut buf = [0u8; 65536];
        match tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => stream = None,
            _ => {}
        }
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "the double panicked");
    let mut after = raw(&addr, &root).await;
    assert_eq!(
        after
            .query("SELECT COUNT(*) >= 0 FROM test.t")
            .await
            .unwrap()
            .scalar()
            .as_deref(),
        Some("1")
    );
}

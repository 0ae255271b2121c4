//! Differential scenarios: every test runs the same mysql_async workload
//! directly against MariaDB and through the proxy and fails on the first
//! observable difference (rows, column definitions, OK fields, warnings,
//! errors, status flags).
//!
//! One MariaDB serves the whole binary; each scenario works in its own
//! database, recreated empty before each of its two runs.

use std::sync::OnceLock;

use mysql_async::prelude::Queryable;
use mysql_async::{Compression, OptsBuilder, Params, Value, WhiteListFsHandler};
use tiproxy_conformance::differential::recreate_database;
use tiproxy_conformance::mariadb::{
    APP_PASSWORD, APP_USER, OTHER_PASSWORD, OTHER_USER, client_binary,
};
use tiproxy_conformance::outcome::Cell;
use tiproxy_conformance::proxy::REAL_PROXY;
use tiproxy_conformance::{
    MariaDb, Proxy, ProxyOptions, Scenario, Session, Side, Target, Transcript, compare,
};

const MIB: usize = 1024 * 1024;

fn mariadb() -> &'static MariaDb {
    static SERVER: OnceLock<Result<MariaDb, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| MariaDb::start().map_err(|err| err.to_string()))
        .as_ref()
        .unwrap_or_else(|err| panic!("starting the test MariaDB: {err}"))
}

/// A byte pattern that compresses badly and catches reordering.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed) | 1;
    (0..len)
        .map(|_| {
            // xorshift32
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------- types

const TYPES_TABLE: &str = "CREATE TABLE types (
    id INT AUTO_INCREMENT PRIMARY KEY,
    t TINYINT, tu TINYINT UNSIGNED, s SMALLINT, su SMALLINT UNSIGNED,
    m MEDIUMINT, mu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED,
    b BIGINT, bu BIGINT UNSIGNED, d DECIMAL(20,6), f FLOAT, db DOUBLE,
    bit1 BIT(1), bit64 BIT(64), dt DATE, tm TIME, tm6 TIME(6), dtm DATETIME(6),
    ts TIMESTAMP NULL, y YEAR, c CHAR(10), vc VARCHAR(100), bn BINARY(4),
    vb VARBINARY(16), tx TEXT, bl BLOB, e ENUM('small','medium','large'),
    st SET('a','b','c'), j JSON, z INT UNSIGNED ZEROFILL
) ENGINE=InnoDB";

const TYPES_COLUMNS: &str = "t, tu, s, su, m, mu, i, iu, b, bu, d, f, db, bit1, bit64, dt, tm, tm6, dtm, ts, y, c, vc, bn, vb, tx, bl, e, st, j, z";

async fn column_types(t: Target) -> Transcript {
    let mut s = t.session("main").await;
    s.query("SET time_zone = '+00:00'").await;
    s.query(TYPES_TABLE).await;
    s.query(&format!(
        "INSERT INTO types ({TYPES_COLUMNS}) VALUES
        (-128, 0, -32768, 0, -8388608, 0, -2147483648, 0, -9223372036854775808, 0,
         -99999999999999.999999, -3.40282e38, -1.7976931348623157e308, b'0', b'0',
         '1000-01-01', '-838:59:59', '-838:59:59.000000', '1000-01-01 00:00:00.000000',
         '1970-01-01 00:00:01', 1901, '', '', x'00000000', x'', '', x'', 'small', '', '[]', 0),
        (127, 255, 32767, 65535, 8388607, 16777215, 2147483647, 4294967295,
         9223372036854775807, 18446744073709551615, 99999999999999.999999, 3.40282e38,
         1.7976931348623157e308, b'1', b'1111111111111111111111111111111111111111111111111111111111111111',
         '9999-12-31', '838:59:59', '838:59:59.999999', '9999-12-31 23:59:59.999999',
         '2038-01-19 03:14:07', 2155, 'abcdefghij', 'ünïcødé ✓ 😀', x'DEADBEEF', x'00FF00FF',
         REPEAT('text ', 100), x'000102030405FFFE', 'large', 'a,b,c',
         '{{\"k\": [1, 2.5, \"x\", null, true]}}', 4294967295),
        (7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 3.14, 1.5, 2.25, b'1', b'101', '2024-02-29',
         '12:34:56', '-00:00:01.5', '2024-02-29 23:59:59.123456', '2024-02-29 12:00:00',
         2024, 'x', 'tab\\there', x'01', x'02', 'line\\nbreak', x'00', 'medium', 'b',
         '{{}}', 42)"
    ))
    .await;
    s.query("INSERT INTO types (id) VALUES (NULL)").await;

    s.query("SELECT * FROM types ORDER BY id").await;
    s.exec("SELECT * FROM types WHERE id >= ? ORDER BY id", (0,))
        .await;
    s.exec("SELECT * FROM types WHERE id = ?", (Value::NULL,))
        .await;

    let expressions = "SELECT 1 AS one, -1, 18446744073709551615, 1.5, 1e300, 'str', NULL,
        X'00FF', _binary 'b', CAST(1 AS UNSIGNED), DATE '2024-01-02',
        TIME '12:34:56.789', TIMESTAMP '2024-01-02 03:04:05.678901',
        CAST('2024-01-02' AS DATETIME(3)), JSON_OBJECT('a', 1), CONVERT('x' USING latin1),
        1 = 1, 0.1 + 0.2, CAST(0.1 AS DOUBLE) + 0.2, b'1010', 'ü' COLLATE utf8mb4_bin";
    s.query(expressions).await;
    s.exec(expressions, ()).await;

    // Every binary-protocol parameter type, inserted and read back.
    let statement = s
        .prepare(&format!(
            "INSERT INTO types ({TYPES_COLUMNS}) VALUES ({})",
            vec!["?"; 31].join(", ")
        ))
        .await;
    if let Some(statement) = statement {
        let params = Params::Positional(vec![
            Value::Int(-5),
            Value::UInt(200),
            Value::Int(-300),
            Value::UInt(60000),
            Value::Int(-70000),
            Value::UInt(70000),
            Value::Int(i64::from(i32::MIN)),
            Value::UInt(u64::from(u32::MAX)),
            Value::Int(i64::MIN),
            Value::UInt(u64::MAX),
            Value::Bytes(b"-12345.678901".to_vec()),
            Value::Float(1.25),
            Value::Double(-0.000001),
            Value::Bytes(vec![1]),
            Value::UInt(0x8000_0000_0000_0001),
            Value::Date(2000, 1, 2, 0, 0, 0, 0),
            Value::Time(true, 1, 2, 3, 4, 5),
            Value::Time(false, 0, 23, 59, 59, 999_999),
            Value::Date(1999, 12, 31, 23, 59, 58, 123_456),
            Value::Date(2001, 9, 9, 1, 46, 40, 0),
            Value::Int(1999),
            Value::Bytes("ça".as_bytes().to_vec()),
            Value::Bytes("日本語".as_bytes().to_vec()),
            Value::Bytes(vec![0xff, 0, 0xff]),
            Value::Bytes(vec![0, 0, 0]),
            Value::NULL,
            Value::Bytes(pattern(300, 3)),
            Value::Bytes(b"small".to_vec()),
            Value::Bytes(b"a,c".to_vec()),
            Value::Bytes(br#"{"nested": {"a": [1, 2]}}"#.to_vec()),
            Value::UInt(5),
        ]);
        s.execute(&statement, "all parameter types", params).await;
        s.close_statement(statement).await;
    }
    s.query("SELECT * FROM types WHERE id = LAST_INSERT_ID()")
        .await;
    s.exec("SELECT * FROM types WHERE id = LAST_INSERT_ID()", ())
        .await;
    s.exec(
        "SELECT ?, ?, ?, ?, ?, ?",
        (
            Value::NULL,
            1i64,
            u64::MAX,
            "text",
            2.5f64,
            Value::Date(2020, 2, 2, 2, 2, 2, 2),
        ),
    )
    .await;
    s.finish_session().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_types_text_and_binary() {
    compare(mariadb(), Scenario::new("types"), column_types).await;
}

// ------------------------------------------------------ warnings, errors

async fn warnings_and_errors(t: Target) -> Transcript {
    let mut s = t.session("main").await;
    s.query("SELECT CAST('12abc' AS SIGNED) AS n").await;
    s.query("SELECT @@warning_count, @@error_count").await;
    s.query("CREATE TABLE w (id INT PRIMARY KEY, small TINYINT, name VARCHAR(3))")
        .await;
    s.query("SET SESSION sql_mode = ''").await;
    s.query("INSERT INTO w VALUES (1, 1000, 'abcdef'), (2, -1000, 'ok'), (3, 3, 'xyz')")
        .await;
    s.query("UPDATE w SET small = small + 100").await;
    s.query("INSERT IGNORE INTO w VALUES (1, 1, 'dup')").await;
    s.query("SET SESSION sql_mode = DEFAULT").await;
    s.query_any("INSERT INTO w VALUES (4, 1000, 'x')").await;
    s.query_any("INSERT INTO w VALUES (1, 1, 'dup')").await;
    s.query_any("SELECT * FROM no_such_table").await;
    s.query("SHOW WARNINGS").await;
    s.query_any("SELEKT 1").await;
    s.query_any("SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'custom failure', MYSQL_ERRNO = 5001")
        .await;
    s.query_any("SELECT 1 / 0, CAST('x' AS DATE)").await;
    s.prepare_any("SELECT no_such_column FROM w").await;
    s.exec("SELECT * FROM w ORDER BY id", ()).await;
    s.query("SELECT * FROM w ORDER BY id").await;
    s.finish_session().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_and_errors_pass_through() {
    compare(mariadb(), Scenario::new("warnings"), warnings_and_errors).await;
}

// ------------------------------------------------------ prepared statements

async fn prepared_statements(t: Target) -> Transcript {
    let mut s = t.session("main").await;
    s.query(
        "CREATE TABLE ps (id INT PRIMARY KEY, a INT NULL, b VARCHAR(20) NULL,
         c LONGBLOB NULL, d LONGBLOB NULL)",
    )
    .await;
    if let Some(insert) = s.prepare("INSERT INTO ps VALUES (?, ?, ?, ?, ?)").await {
        let null = || Value::NULL;
        s.execute(
            &insert,
            "(1, NULL, 'x', NULL, NULL)",
            (1, null(), "x", null(), null()).into(),
        )
        .await;
        s.execute(
            &insert,
            "(2, 5, NULL, 'small', NULL)",
            (2, 5, null(), "small", null()).into(),
        )
        .await;
        // Parameters over 16 MiB in total go as COM_STMT_SEND_LONG_DATA.
        s.execute(
            &insert,
            "(3, NULL, NULL, 10 MiB, 7 MiB) as long data",
            (3, null(), null(), pattern(10 * MIB, 1), pattern(7 * MIB, 2)).into(),
        )
        .await;
        // One 20 MiB parameter: two long-data packets, the first exactly
        // at the 16 MiB - 1 packet limit.
        s.execute(
            &insert,
            "(4, 1, 'big', 20 MiB, '') as long data",
            (4, 1, "big", pattern(20 * MIB, 4), "").into(),
        )
        .await;
        s.execute_any(
            &insert,
            "(1, ...) duplicate",
            (1, 1, "dup", null(), null()).into(),
        )
        .await;
        s.close_statement(insert).await;
    }
    s.query("SELECT id, a, b, LENGTH(c), MD5(c), LENGTH(d), MD5(d) FROM ps ORDER BY id")
        .await;
    s.exec(
        "SELECT id, a, b, LENGTH(c), MD5(c), LENGTH(d), MD5(d) FROM ps WHERE id > ? ORDER BY id",
        (0,),
    )
    .await;
    s.exec("SELECT c FROM ps WHERE id = ?", (4,)).await;
    s.exec("SELECT c, d FROM ps WHERE id = ?", (3,)).await;
    // Reuse one statement many times, with and without NULLs.
    if let Some(select) = s
        .prepare("SELECT ? IS NULL, COALESCE(?, 'dflt'), ? + 1")
        .await
    {
        for i in 0..5i64 {
            let value = if i % 2 == 0 {
                Value::NULL
            } else {
                Value::Int(i)
            };
            s.execute(
                &select,
                &format!("round {i}"),
                (value.clone(), value.clone(), value).into(),
            )
            .await;
        }
    }
    s.finish_session().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_with_nulls_and_long_data() {
    compare(mariadb(), Scenario::new("prepared"), prepared_statements).await;
}

// ------------------------------------ multi-statements and procedures

async fn multi_results(t: Target) -> Transcript {
    let mut s = t.session("main").await;
    s.query(
        "SELECT 1 AS one; SELECT 'a' AS a, 'b' AS b;
         CREATE TABLE m (id INT AUTO_INCREMENT PRIMARY KEY, v INT);
         INSERT INTO m (v) VALUES (1), (2), (3);
         UPDATE m SET v = v + 1 WHERE id > 1; SELECT * FROM m ORDER BY id",
    )
    .await;
    s.query_any("SELECT 1; SELECT no_such_column; SELECT 3")
        .await;
    s.query("SELECT 4").await;
    s.query(
        "CREATE PROCEDURE p(IN n INT, OUT total INT)
         BEGIN
           SELECT n AS n;
           SELECT id, v FROM m ORDER BY id;
           UPDATE m SET v = v * n;
           SELECT COUNT(*) AS c, SUM(v) AS s FROM m;
           SET total = n * 10;
         END",
    )
    .await;
    s.query("CALL p(2, @t)").await;
    s.query("SELECT @t").await;
    s.exec("CALL p(?, @t)", (3,)).await;
    s.query("SELECT @t").await;
    s.exec("CALL p(?, ?)", (4, Value::NULL)).await;
    s.query(
        "CREATE PROCEDURE perr()
         BEGIN
           SELECT 'before' AS x;
           SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'boom', MYSQL_ERRNO = 5002;
         END",
    )
    .await;
    s.query_any("CALL perr()").await;
    s.query("SELECT 'still usable'").await;
    s.query("CREATE PROCEDURE empty_result() BEGIN SELECT * FROM m WHERE 1 = 0; END")
        .await;
    s.query("CALL empty_result(); SELECT 'after'").await;
    s.finish_session().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_statements_and_stored_procedures() {
    compare(mariadb(), Scenario::new("multi"), multi_results).await;
}

// ---------------------------------------------------------- big rows

async fn big_rows(t: Target) -> Transcript {
    let mut s = t.session("main").await;
    s.query("SELECT REPEAT('a', 17 * 1024 * 1024) AS big").await;
    s.exec("SELECT REPEAT('a', 17 * 1024 * 1024) AS big", ())
        .await;
    // Text rows whose payload is 16 MiB - 2, 16 MiB - 1 (followed by an
    // empty continuation packet) and 16 MiB.
    for len in [16_777_210, 16_777_211, 16_777_212] {
        s.query(&format!("SELECT REPEAT('b', {len}) AS edge")).await;
    }
    // The same edges for binary rows (header byte and NULL bitmap).
    for len in [16_777_208, 16_777_209, 16_777_210] {
        s.exec(&format!("SELECT REPEAT('c', {len}) AS edge"), ())
            .await;
    }
    s.query("CREATE TABLE big (id INT PRIMARY KEY, v LONGBLOB)")
        .await;
    s.query("INSERT INTO big VALUES (1, REPEAT('c', 17825792))")
        .await;
    // A COM_QUERY that itself spans two packets.
    let literal = String::from_utf8(
        pattern(17 * MIB, 9)
            .into_iter()
            .map(|b| b'a' + b % 26)
            .collect(),
    )
    .expect("ascii letters");
    s.query(&format!("INSERT INTO big VALUES (2, '{literal}')"))
        .await;
    s.query("SELECT id, LENGTH(v), MD5(v) FROM big ORDER BY id")
        .await;
    s.query("SELECT v FROM big WHERE id = 2").await;
    s.exec("SELECT id, v FROM big ORDER BY id", ()).await;
    s.query("SELECT REPEAT('x', 65 * 1024 * 1024) AS too_big")
        .await;
    s.finish_session().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_over_16_mib() {
    compare(mariadb(), Scenario::new("big"), big_rows).await;
}

// ------------------------------------------------------- LOCAL INFILE

async fn local_infile(t: Target) -> Transcript {
    let dir = mariadb().dir();
    let small = dir.join("local-infile-small.csv");
    let large = dir.join("local-infile-large.csv");
    let handler = WhiteListFsHandler::new([small.clone(), large.clone()]);
    let mut s = Session::connect("main", t.opts().local_infile_handler(Some(handler))).await;
    s.query("CREATE TABLE li (id INT PRIMARY KEY, name VARCHAR(8), amount DECIMAL(8,2))")
        .await;
    s.query(&format!(
        "LOAD DATA LOCAL INFILE '{}' INTO TABLE li FIELDS TERMINATED BY ','",
        small.display()
    ))
    .await;
    s.query("SELECT * FROM li ORDER BY id").await;
    s.query(&format!(
        "LOAD DATA LOCAL INFILE '{}' IGNORE INTO TABLE li FIELDS TERMINATED BY ','",
        large.display()
    ))
    .await;
    s.query("SELECT COUNT(*), SUM(amount), MAX(name) FROM li")
        .await;
    s.query_any("LOAD DATA LOCAL INFILE '/no/such/file.csv' INTO TABLE li")
        .await;
    s.query_any("SELECT 'after a refused upload'").await;
    s.finish_session().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_data_local_infile() {
    let dir = mariadb().dir();
    std::fs::write(
        dir.join("local-infile-small.csv"),
        "1,alpha,1.50\n2,beta,2.25\n3,gamma-too-long,3\n4,delta,not-a-number\n5,,0\n",
    )
    .expect("writing the small infile");
    // About 3 MB: the upload spans many packets.
    let large: String = (10..100_010)
        .map(|i| format!("{i},n{},{}.{:02}\n", i % 997, i % 1000, i % 100))
        .collect();
    std::fs::write(dir.join("local-infile-large.csv"), large).expect("writing the large infile");
    compare(mariadb(), Scenario::new("infile"), local_infile).await;
}

// ------------------------------------------------------- transactions

async fn transactions(t: Target) -> Transcript {
    let mut a = t.session("a").await;
    a.query("CREATE TABLE tx (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
        .await;
    a.query("INSERT INTO tx VALUES (1, 10), (2, 20)").await;
    a.query("SELECT @@in_transaction, @@autocommit").await;
    a.query("BEGIN").await;
    a.query("INSERT INTO tx VALUES (3, 30)").await;
    a.query("SELECT @@in_transaction").await;
    a.query("ROLLBACK").await;
    a.query("SELECT COUNT(*), @@in_transaction FROM tx").await;
    a.query("START TRANSACTION").await;
    a.query("INSERT INTO tx VALUES (3, 30)").await;
    a.query("UPDATE tx SET v = v + 1").await;
    a.query("COMMIT").await;
    a.query("SELECT * FROM tx ORDER BY id").await;
    a.query("SET autocommit = 0").await;
    a.query("INSERT INTO tx VALUES (4, 40)").await;
    a.query("SELECT @@in_transaction").await;
    a.query("COMMIT").await;
    a.query("SET autocommit = 1").await;
    a.query("BEGIN; INSERT INTO tx VALUES (5, 50); SAVEPOINT s1; INSERT INTO tx VALUES (6, 60)")
        .await;
    a.query("ROLLBACK TO SAVEPOINT s1").await;
    a.query("COMMIT").await;
    a.query("START TRANSACTION READ ONLY").await;
    a.query_any("INSERT INTO tx VALUES (7, 70)").await;
    a.query("ROLLBACK").await;
    a.exec("SELECT * FROM tx WHERE id > ? ORDER BY id", (0,))
        .await;

    // Isolation between two connections.
    let mut b = t.session("b").await;
    a.query("BEGIN").await;
    a.query("UPDATE tx SET v = 100 WHERE id = 1").await;
    b.query("SELECT v FROM tx WHERE id = 1").await;
    a.query("COMMIT").await;
    b.query("SELECT v FROM tx WHERE id = 1").await;
    b.query("BEGIN").await;
    b.query("SELECT v FROM tx WHERE id = 2 FOR UPDATE").await;
    b.query_any("SET innodb_lock_wait_timeout = 1").await;
    a.query("SET innodb_lock_wait_timeout = 1").await;
    a.query_any("UPDATE tx SET v = 0 WHERE id = 2").await;
    b.query("ROLLBACK").await;

    let mut transcript = a.finish_session().await;
    transcript.extend(b.finish_session().await);
    transcript
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_and_rollback() {
    compare(mariadb(), Scenario::new("transactions"), transactions).await;
}

// -------------------------------------- COM_CHANGE_USER, COM_RESET_CONNECTION

async fn change_user_and_reset(t: Target) -> Transcript {
    let mut s = t.session("main").await;
    s.query("SET @v = 42").await;
    s.query("CREATE TEMPORARY TABLE tmp (x INT)").await;
    s.query("BEGIN").await;
    s.query("SELECT @v, CURRENT_USER(), USER(), DATABASE(), @@in_transaction")
        .await;
    s.prepare("SELECT ? + 1").await;
    s.reset().await;
    s.query("SELECT @v, CURRENT_USER(), DATABASE(), @@in_transaction")
        .await;
    s.query_any("SELECT * FROM tmp").await;
    // mysql_async forgets its statements on reset and prepares anew.
    s.exec("SELECT ? + 1", (1,)).await;
    s.query("SET @v = 43").await;
    s.change_user(OTHER_USER, OTHER_PASSWORD, Some(&t.database), true)
        .await;
    s.query("SELECT @v, CURRENT_USER(), USER(), DATABASE()")
        .await;
    s.change_user(APP_USER, APP_PASSWORD, None, true).await;
    s.query("SELECT CURRENT_USER(), DATABASE()").await;
    s.exec("SELECT ? * 2", (21,)).await;
    s.change_user(OTHER_USER, "wrong-password", None, false)
        .await;
    s.query_any("SELECT 'after a failed change user'").await;
    s.finish_session().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_user_and_reset_connection() {
    compare(
        mariadb(),
        Scenario::new("change_user"),
        change_user_and_reset,
    )
    .await;
}

// --------------------------------------------- compression, TLS: one workload

/// Text that compresses well but is not one repeated byte.
fn compressible(len: usize) -> String {
    let mut text: String = (0..len / 9 + 1).map(|i| format!("{i:08} ")).collect();
    text.truncate(len);
    text
}

/// An everyday mix: DDL, DML, text and binary results, a multi-statement,
/// an 18 MB row, incompressible rows, a transaction, an error and a warning.
///
/// What the client sends is compressible on purpose: mysql_common 0.37's
/// zlib writer loses data when a packet compresses to more than its own
/// size (MariaDB then logs "Couldn't uncompress communication packet").
/// Incompressible data flows server to client instead.
async fn everyday(opts: OptsBuilder) -> Transcript {
    let mut s = Session::connect("main", opts).await;
    s.query(
        "CREATE TABLE g (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(50), payload MEDIUMBLOB)",
    )
    .await;
    s.query("INSERT INTO g (name, payload) VALUES ('a', REPEAT('x', 1000)), ('b', NULL)")
        .await;
    s.exec(
        "INSERT INTO g (name, payload) VALUES (?, ?)",
        ("c", compressible(300_000)),
    )
    .await;
    s.query("SELECT id, name, LENGTH(payload), payload FROM g ORDER BY id")
        .await;
    s.exec(
        "SELECT id, name, payload FROM g WHERE id > ? ORDER BY id",
        (0,),
    )
    .await;
    s.query("SELECT 1; SELECT 2, 'two'; UPDATE g SET name = 'z' WHERE id = 1")
        .await;
    s.query("SELECT REPEAT('abc', 6000000) AS big").await;
    s.exec("SELECT ? AS echo", (compressible(3 * MIB),)).await;
    s.query("SELECT seq, UNHEX(SHA2(seq, 256)) FROM seq_1_to_20000")
        .await;
    s.query("SET SESSION group_concat_max_len = 67108864").await;
    s.exec(
        "SELECT GROUP_CONCAT(UNHEX(SHA2(seq, 256)) SEPARATOR '') FROM seq_1_to_100000 WHERE seq > ?",
        (0,),
    )
    .await;
    s.query("BEGIN").await;
    s.query("INSERT INTO g (name) VALUES ('in tx')").await;
    s.query("SELECT @@in_transaction").await;
    s.query("COMMIT").await;
    s.query_any("SELECT * FROM no_such_table").await;
    s.query("SELECT CAST('1x' AS SIGNED)").await;
    s.query("SELECT COUNT(*) FROM g").await;
    s.finish_session().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_protocol() {
    compare(
        mariadb(),
        Scenario::new("compression"),
        |t: Target| async move {
            let opts = t.opts().compression(Compression::fast());
            everyday(opts).await
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_from_client_to_proxy() {
    compare(
        mariadb(),
        Scenario::new("client_tls").with_client_tls(),
        |t: Target| async move { everyday(t.opts()).await },
    )
    .await;
}

/// `Ssl_cipher` of the session the server sees (empty when not TLS).
async fn server_side_cipher(t: &Target) -> Result<String, mysql_async::Error> {
    let mut conn = mysql_async::Conn::new(t.opts()).await?;
    let row: Option<(String, String)> = conn
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .await?;
    conn.disconnect().await?;
    Ok(row.map(|(_, cipher)| cipher).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_from_proxy_to_backend() {
    compare(
        mariadb(),
        Scenario::new("backend_tls").with_backend_tls(),
        |t: Target| async move {
            if t.side == Side::Proxied && REAL_PROXY {
                match server_side_cipher(&t).await {
                    Ok(cipher) => assert!(
                        !cipher.is_empty(),
                        "require-backend-tls is on but MariaDB sees a plain connection"
                    ),
                    Err(err) => panic!("connecting through a backend-TLS proxy: {err}"),
                }
            }
            everyday(t.opts()).await
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_legs_with_compression() {
    compare(
        mariadb(),
        Scenario::new("tls_both")
            .with_client_tls()
            .with_backend_tls(),
        |t: Target| async move {
            let opts = t.opts().compression(Compression::default());
            everyday(opts).await
        },
    )
    .await;
}

// ------------------------------------------------------ authentication

async fn authentication_failures(t: Target) -> Transcript {
    let mut transcript = Transcript::default();
    let attempts = [
        ("wrong password", t.opts_as(APP_USER, "wrong-password")),
        ("empty password", t.opts_as(APP_USER, "")),
        ("unknown user", t.opts_as("nobody", "whatever")),
        (
            "unknown database",
            t.opts().db_name(Some("cf_no_such_database")),
        ),
    ];
    for (name, opts) in attempts {
        transcript.extend(
            Session::connect_any(name, opts)
                .await
                .finish_session()
                .await,
        );
    }
    let mut ok = t.session("correct password").await;
    ok.query("SELECT CURRENT_USER()").await;
    transcript.extend(ok.finish_session().await);
    transcript
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_error_passes_through() {
    let [direct, _] = compare(mariadb(), Scenario::new("auth"), authentication_failures).await;
    // The comparison already proved both sides equal; make sure the error
    // compared is the real one.
    let first = &direct.steps[0].outcome;
    let message = format!("{:?}", first.error);
    assert!(
        message.contains("1045") && message.contains("'app'@'127.0.0.1'"),
        "unexpected direct error: {message}"
    );
}

// --------------------------------------------------- many connections

async fn many_connections(t: Target) -> Transcript {
    const CONNECTIONS: i64 = 200;
    let mut setup = t.session("setup").await;
    setup
        .query("CREATE TABLE c (id INT PRIMARY KEY, doubled INT)")
        .await;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let t = t.clone();
        tasks.spawn(async move {
            let mut s = t.session(&format!("conn {i}")).await;
            s.exec("SELECT ? + 1 AS next", (i,)).await;
            s.query(&format!("INSERT INTO c VALUES ({i}, {})", i * 2))
                .await;
            s.query(&format!("SELECT * FROM c WHERE id = {i}")).await;
            s.query("SELECT @@in_transaction, DATABASE(), CURRENT_USER()")
                .await;
            (i, s.finish_session().await)
        });
    }
    let mut results: Vec<(i64, Transcript)> = tasks.join_all().await.into_iter().collect();
    results.sort_by_key(|(i, _)| *i);

    setup.query("SELECT COUNT(*), SUM(doubled) FROM c").await;
    let mut transcript = setup.finish_session().await;
    for (_, t) in results {
        transcript.extend(t);
    }
    transcript
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections() {
    let [direct, _] = compare(mariadb(), Scenario::new("many"), many_connections).await;
    let count = direct.steps.iter().find(|s| s.action.contains("COUNT(*)"));
    assert_eq!(
        count.and_then(|s| s.outcome.scalar()),
        Some(&Cell::Text("200".into())),
        "every connection inserted its row"
    );
}

// ------------------------------------------------- the mariadb CLI client

/// Output of the `mariadb` client: exit status, stdout, stderr.
async fn mariadb_cli(port: u16, database: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(client_binary())
        .arg("--no-defaults")
        .arg("-h127.0.0.1")
        .arg(format!("-P{port}"))
        .arg(format!("-D{database}"))
        .args(args)
        .output()
        .await
        .expect("running the mariadb client");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_command_line_client() {
    let db = mariadb();
    let database = "cf_cli";
    let password = format!("-p{APP_PASSWORD}");
    let user = format!("-u{APP_USER}");
    let runs: Vec<Vec<&str>> = vec![
        vec![
            &user,
            &password,
            "-e",
            "CREATE TABLE t (id INT PRIMARY KEY, name VARCHAR(20), d DECIMAL(5,2));
             INSERT INTO t VALUES (1, 'one', 1.5), (2, NULL, -2);
             SELECT 1 AS one, 'x' AS s, NULL AS n; SELECT * FROM t ORDER BY id;
             SELECT CAST('3z' AS SIGNED); SHOW WARNINGS",
        ],
        vec![
            &user,
            &password,
            "--table",
            "-e",
            "SELECT * FROM t ORDER BY id",
        ],
        vec![
            &user,
            &password,
            "--compress",
            "-e",
            "SELECT id, name FROM t; SELECT REPEAT('q', 100000)",
        ],
        vec![
            &user,
            &password,
            "--batch",
            "--column-type-info",
            "-e",
            "SELECT * FROM t",
        ],
        vec![&user, &password, "-e", "SELECT * FROM no_such_table"],
        vec![&user, "-pwrong-password", "-e", "SELECT 1"],
    ];

    recreate_database(db, database).await;
    let mut direct = Vec::new();
    for args in &runs {
        direct.push(mariadb_cli(db.port(), database, args).await);
    }
    assert_eq!(
        direct[0].0,
        Some(0),
        "direct CLI run failed: {:?}",
        direct[0]
    );

    recreate_database(db, database).await;
    let proxy = Proxy::start(db.addr(), ProxyOptions::default())
        .await
        .expect("starting the proxy");
    let mut proxied = Vec::new();
    for args in &runs {
        proxied.push(mariadb_cli(proxy.sql_addr().port(), database, args).await);
    }
    proxy.shutdown().await;

    for (i, (direct, proxied)) in direct.iter().zip(&proxied).enumerate() {
        assert_eq!(
            direct, proxied,
            "mariadb client run {i} ({:?}) differs: left direct, right proxied",
            runs[i]
        );
    }
}

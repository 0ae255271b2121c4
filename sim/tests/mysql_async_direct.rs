//! mysql_async 0.37 against the TiDB double on real TCP: logins, DML,
//! transactions, prepared statements, variables and SHOW PROCESSLIST behave
//! as a client of TiDB expects.

mod common;

use std::time::Duration;

use common::{code, conn, fleet, sql_addr};
use mysql_async::TxOpts;
use mysql_async::prelude::*;
use tiproxy_sim::tidb::TidbOptions;

/// A row of the `p` table.
type PRow = (
    i64,
    Option<String>,
    Option<i32>,
    Option<f64>,
    Option<String>,
);

#[tokio::test]
async fn logins_with_native_and_caching_sha2_passwords() {
    let f = fleet(1, TidbOptions::default()).await;
    let addr = sql_addr(&f, 0);

    let mut root = conn(&addr, "root", "", None).await.unwrap();
    assert_eq!(
        root.query_first::<i64, _>("SELECT 1").await.unwrap(),
        Some(1)
    );
    assert_eq!(
        root.query_first::<String, _>("select @@version_comment limit 1")
            .await
            .unwrap()
            .unwrap(),
        "TiDB Server (Apache License 2.0) Community Edition, MySQL 8.0 compatible"
    );
    assert_eq!(
        root.query_first::<String, _>("SELECT VERSION()")
            .await
            .unwrap()
            .unwrap(),
        "8.0.11-TiDB-v8.5.0"
    );
    assert_eq!(root.server_version(), (8, 0, 11));
    let id: u64 = root
        .query_first("SELECT CONNECTION_ID()")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, u64::from(root.id()));

    let mut app = conn(&addr, "app", "app-Pa55word", Some("test"))
        .await
        .unwrap();
    assert_eq!(
        app.query_first::<String, _>("SELECT CURRENT_USER()")
            .await
            .unwrap()
            .unwrap(),
        "app@%"
    );
    // mysql_async cannot do caching_sha2 full auth without TLS: this login
    // works only through the fast path (0x01 0x03).
    let mut sha2 = conn(&addr, "sha2user", "sha2-Pa55word", None)
        .await
        .unwrap();
    assert_eq!(
        sha2.query_first::<i64, _>("SELECT 2").await.unwrap(),
        Some(2)
    );

    for (user, pass) in [("app", "wrong"), ("sha2user", "wrong"), ("nobody", "x")] {
        let e = conn(&addr, user, pass, None).await.unwrap_err();
        assert_eq!(code(&e), Some(1045), "{user}: {e}");
        assert!(
            e.to_string().contains(&format!(
                "Access denied for user '{user}'@'127.0.0.1' (using password: YES)"
            )),
            "{e}"
        );
    }
    let e = conn(&addr, "app", "", None).await.unwrap_err();
    assert!(e.to_string().contains("(using password: NO)"), "{e}");
    let e = conn(&addr, "root", "", Some("nope")).await.unwrap_err();
    assert_eq!(code(&e), Some(1049), "{e}");
}

#[tokio::test]
async fn autocommit_dml_round_trips() {
    let f = fleet(1, TidbOptions::default()).await;
    let mut c = conn(&sql_addr(&f, 0), "root", "", None).await.unwrap();
    c.query_drop("CREATE DATABASE IF NOT EXISTS shop")
        .await
        .unwrap();
    c.query_drop("USE shop").await.unwrap();
    assert_eq!(
        c.query_first::<String, _>("SELECT DATABASE()")
            .await
            .unwrap()
            .unwrap(),
        "shop"
    );
    c.query_drop(
        "CREATE TABLE items (id BIGINT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(32), qty INT)",
    )
    .await
    .unwrap();
    c.query_drop("INSERT INTO items (name, qty) VALUES ('apple', 3), ('pear', 5)")
        .await
        .unwrap();
    assert_eq!(c.affected_rows(), 2);
    assert_eq!(c.last_insert_id(), Some(1));
    assert_eq!(
        c.query_first::<u64, _>("SELECT LAST_INSERT_ID()")
            .await
            .unwrap(),
        Some(1)
    );
    c.query_drop("INSERT INTO items VALUES (10, 'fig', NULL)")
        .await
        .unwrap();
    c.query_drop("INSERT INTO items (name, qty) VALUES ('kiwi', 1)")
        .await
        .unwrap();
    assert_eq!(c.last_insert_id(), Some(11));

    let rows: Vec<(i64, String, Option<i64>)> = c
        .query("SELECT id, name, qty FROM items ORDER BY id")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            (1, "apple".into(), Some(3)),
            (2, "pear".into(), Some(5)),
            (10, "fig".into(), None),
            (11, "kiwi".into(), Some(1)),
        ]
    );
    c.query_drop("UPDATE items SET qty = qty + 10 WHERE id = 2")
        .await
        .unwrap();
    assert_eq!(c.affected_rows(), 1);
    assert_eq!(
        c.query_first::<i64, _>("SELECT qty FROM items WHERE id = 2")
            .await
            .unwrap(),
        Some(15)
    );
    c.query_drop("DELETE FROM items WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        c.query_first::<i64, _>("SELECT COUNT(*) FROM items")
            .await
            .unwrap(),
        Some(3)
    );
    let ids: Vec<i64> = c
        .query("SELECT id FROM items WHERE id BETWEEN 2 AND 10 ORDER BY id DESC LIMIT 5")
        .await
        .unwrap();
    assert_eq!(ids, vec![10, 2]);
    let e = c
        .query_drop("INSERT INTO items VALUES (2, 'dup', 0)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(1062), "{e}");
    let e = c.query_drop("SELECT nope FROM items").await.unwrap_err();
    assert_eq!(code(&e), Some(1054), "{e}");
    let e = c
        .query_drop(
            "SELECT * FROM items JOIN items b ON items.id = b.id JOIN items c ON c.id = b.id",
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(1105));
    assert!(
        e.to_string().contains("unsupported in the TiDB double"),
        "{e}"
    );
    let dbs: Vec<String> = c.query("SHOW DATABASES").await.unwrap();
    assert!(
        dbs.contains(&"shop".to_string()) && dbs.contains(&"test".to_string()),
        "{dbs:?}"
    );
    let tables: Vec<String> = c.query("SHOW TABLES").await.unwrap();
    assert_eq!(tables, vec!["items".to_string()]);
}

#[tokio::test]
async fn transactions_commit_roll_back_and_conflict() {
    let f = fleet(2, TidbOptions::default()).await;
    let mut a = conn(&sql_addr(&f, 0), "root", "", Some("test"))
        .await
        .unwrap();
    // Another instance of the same cluster sees the same store.
    let mut b = conn(&sql_addr(&f, 1), "root", "", Some("test"))
        .await
        .unwrap();
    a.query_drop("CREATE TABLE acct (id INT PRIMARY KEY, bal INT)")
        .await
        .unwrap();
    a.query_drop("INSERT INTO acct VALUES (1, 100), (2, 100)")
        .await
        .unwrap();

    let mut tx = a.start_transaction(TxOpts::default()).await.unwrap();
    assert_eq!(
        tx.query_first::<i64, _>("SELECT @@in_transaction")
            .await
            .unwrap(),
        Some(1)
    );
    tx.query_drop("UPDATE acct SET bal = bal - 30 WHERE id = 1")
        .await
        .unwrap();
    tx.query_drop("UPDATE acct SET bal = bal + 30 WHERE id = 2")
        .await
        .unwrap();
    // Not visible elsewhere before COMMIT.
    assert_eq!(
        b.query_first::<i64, _>("SELECT bal FROM acct WHERE id = 1")
            .await
            .unwrap(),
        Some(100)
    );
    tx.commit().await.unwrap();
    assert_eq!(
        a.query_first::<i64, _>("SELECT @@in_transaction")
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        b.query_first::<i64, _>("SELECT SUM(bal) FROM acct")
            .await
            .unwrap(),
        Some(200)
    );
    assert_eq!(
        b.query_first::<i64, _>("SELECT bal FROM acct WHERE id = 1")
            .await
            .unwrap(),
        Some(70)
    );

    let mut tx = a.start_transaction(TxOpts::default()).await.unwrap();
    tx.query_drop("DELETE FROM acct WHERE id = 2")
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        a.query_first::<i64, _>("SELECT COUNT(*) FROM acct")
            .await
            .unwrap(),
        Some(2)
    );

    // Optimistic transactions (TiDB's default is pessimistic: b's UPDATE
    // would wait for a's row lock instead).
    for c in [&mut a, &mut b] {
        c.query_drop("SET tidb_txn_mode = 'optimistic'")
            .await
            .unwrap();
    }
    // First committer wins.
    a.query_drop("BEGIN").await.unwrap();
    b.query_drop("BEGIN").await.unwrap();
    a.query_drop("UPDATE acct SET bal = 1 WHERE id = 1")
        .await
        .unwrap();
    b.query_drop("UPDATE acct SET bal = 2 WHERE id = 1")
        .await
        .unwrap();
    a.query_drop("COMMIT").await.unwrap();
    let e = b.query_drop("COMMIT").await.unwrap_err();
    assert_eq!(code(&e), Some(9007), "{e}");
    assert_eq!(
        b.query_first::<i64, _>("SELECT @@in_transaction")
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        b.query_first::<i64, _>("SELECT bal FROM acct WHERE id = 1")
            .await
            .unwrap(),
        Some(1)
    );

    // autocommit = 0: the first read opens a transaction.
    a.query_drop("SET autocommit = 0").await.unwrap();
    assert_eq!(
        a.query_first::<i64, _>("SELECT @@autocommit")
            .await
            .unwrap(),
        Some(0)
    );
    a.query_drop("UPDATE acct SET bal = 5 WHERE id = 2")
        .await
        .unwrap();
    assert_eq!(
        a.query_first::<i64, _>("SELECT @@in_transaction")
            .await
            .unwrap(),
        Some(1)
    );
    a.query_drop("ROLLBACK").await.unwrap();
    a.query_drop("SET autocommit = 1").await.unwrap();
    assert_eq!(
        a.query_first::<i64, _>("SELECT bal FROM acct WHERE id = 2")
            .await
            .unwrap(),
        Some(130)
    );
}

#[tokio::test]
async fn prepared_statements_with_null_params() {
    let f = fleet(1, TidbOptions::default()).await;
    let mut c = conn(&sql_addr(&f, 0), "app", "app-Pa55word", Some("test"))
        .await
        .unwrap();
    c.query_drop("CREATE TABLE p (id BIGINT PRIMARY KEY, s VARCHAR(20), n INT, d DOUBLE, t TEXT)")
        .await
        .unwrap();
    let ins = c
        .prep("INSERT INTO p (id, s, n, d, t) VALUES (?, ?, ?, ?, ?)")
        .await
        .unwrap();
    c.exec_drop(&ins, (1, "one", 10, 1.5, "long text"))
        .await
        .unwrap();
    c.exec_drop(
        &ins,
        (2, None::<String>, None::<i64>, None::<f64>, None::<String>),
    )
    .await
    .unwrap();
    let rows: Vec<PRow> = c
        .exec(
            "SELECT id, s, n, d, t FROM p WHERE id >= ? ORDER BY id",
            (1,),
        )
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                1,
                Some("one".into()),
                Some(10),
                Some(1.5),
                Some("long text".into())
            ),
            (2, None, None, None, None),
        ]
    );
    let n: Option<i64> = c
        .exec_first("SELECT COUNT(*) FROM p WHERE s IS NULL", ())
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    let v: Option<(i64, Option<String>)> = c
        .exec_first("SELECT ? + 1, ?", (41, None::<String>))
        .await
        .unwrap();
    assert_eq!(v, Some((42, None)));
    c.exec_drop("UPDATE p SET n = n + ? WHERE id = ?", (5, 1))
        .await
        .unwrap();
    assert_eq!(c.affected_rows(), 1);
    assert_eq!(
        c.exec_first::<i64, _, _>("SELECT n FROM p WHERE id = ?", (1,))
            .await
            .unwrap(),
        Some(15)
    );
    c.close(ins).await.unwrap();

    // Text-protocol PREPARE / EXECUTE / DEALLOCATE.
    c.query_drop("PREPARE q FROM 'SELECT s FROM p WHERE id = ?'")
        .await
        .unwrap();
    c.query_drop("SET @k = 1").await.unwrap();
    assert_eq!(
        c.query_first::<String, _>("EXECUTE q USING @k")
            .await
            .unwrap()
            .unwrap(),
        "one"
    );
    c.query_drop("DEALLOCATE PREPARE q").await.unwrap();
    let e = c.query_drop("EXECUTE q USING @k").await.unwrap_err();
    assert_eq!(code(&e), Some(1243), "{e}");
}

#[tokio::test]
async fn variables_databases_and_processlist() {
    let f = fleet(1, TidbOptions::default()).await;
    let addr = sql_addr(&f, 0);
    let mut c = conn(&addr, "root", "", None).await.unwrap();
    c.query_drop("SET @a = 42, @b = 'foo'").await.unwrap();
    let v: Option<(i64, String)> = c.query_first("SELECT @a, @b").await.unwrap();
    assert_eq!(v, Some((42, "foo".into())));
    c.query_drop("SET SESSION wait_timeout = 1234, @@sql_select_limit = 99")
        .await
        .unwrap();
    let v: Option<(i64, i64)> = c
        .query_first("SELECT @@wait_timeout, @@session.sql_select_limit")
        .await
        .unwrap();
    assert_eq!(v, Some((1234, 99)));
    c.query_drop("SET NAMES utf8mb4").await.unwrap();
    let e = c.query_drop("SET @@nope = 1").await.unwrap_err();
    assert_eq!(code(&e), Some(1193), "{e}");
    let e = c.query_drop("SET version = 'x'").await.unwrap_err();
    assert_eq!(code(&e), Some(1238), "{e}");
    let like: Vec<(String, String)> = c.query("SHOW VARIABLES LIKE 'wait_timeout'").await.unwrap();
    assert_eq!(like, vec![("wait_timeout".into(), "1234".into())]);

    c.query_drop("CREATE DATABASE d1").await.unwrap();
    c.query_drop("USE d1").await.unwrap();
    assert_eq!(
        c.query_first::<String, _>("SELECT DATABASE()")
            .await
            .unwrap()
            .unwrap(),
        "d1"
    );
    let e = c.query_drop("USE nope").await.unwrap_err();
    assert_eq!(code(&e), Some(1049));

    let mut other = conn(&addr, "app", "app-Pa55word", Some("test"))
        .await
        .unwrap();
    let rows: Vec<mysql_async::Row> = c.query("SHOW PROCESSLIST").await.unwrap();
    let mine = rows
        .iter()
        .find(|r| r.get::<u64, _>("Id") == Some(u64::from(c.id())))
        .expect("the session is listed");
    assert_eq!(mine.get::<String, _>("User").unwrap(), "root");
    assert_eq!(mine.get::<String, _>("db").unwrap(), "d1");
    assert_eq!(mine.get::<String, _>("Command").unwrap(), "Query");
    assert_eq!(mine.get::<String, _>("Info").unwrap(), "SHOW PROCESSLIST");
    let theirs = rows
        .iter()
        .find(|r| r.get::<u64, _>("Id") == Some(u64::from(other.id())))
        .expect("the other session is listed");
    assert_eq!(theirs.get::<String, _>("Command").unwrap(), "Sleep");
    assert!(
        theirs
            .get::<String, _>("Host")
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    other.ping().await.unwrap();

    // A pool resets connections with COM_RESET_CONNECTION.
    let (host, port) = addr.rsplit_once(':').unwrap();
    let pool = mysql_async::Pool::new(
        mysql_async::OptsBuilder::default()
            .ip_or_hostname(host.to_string())
            .tcp_port(port.parse().unwrap())
            .user(Some("root"))
            .prefer_socket(false),
    );
    let mut pc = pool.get_conn().await.unwrap();
    pc.query_drop("SET @x = 1").await.unwrap();
    drop(pc);
    let mut pc = pool.get_conn().await.unwrap();
    assert_eq!(
        pc.query_first::<Option<i64>, _>("SELECT @x").await.unwrap(),
        Some(None)
    );
    drop(pc);
    pool.disconnect().await.unwrap();
}

/// What sysbench's `oltp_read_write` prepares and runs, with prepared
/// statements as sysbench sends them.
#[tokio::test]
async fn sysbench_oltp_statements() {
    let f = fleet(1, TidbOptions::default()).await;
    let mut c = conn(&sql_addr(&f, 0), "root", "", Some("test"))
        .await
        .unwrap();
    c.query_drop(
        "CREATE TABLE sbtest1(id INTEGER NOT NULL AUTO_INCREMENT, k INTEGER DEFAULT '0' NOT NULL, \
         c CHAR(120) DEFAULT '' NOT NULL, pad CHAR(60) DEFAULT '' NOT NULL, PRIMARY KEY (id)) \
         /*! ENGINE = innodb */",
    )
    .await
    .unwrap();
    c.query_drop("INSERT INTO sbtest1(k, c, pad) VALUES(5, 'b', 'x'),(7, 'a', 'y'),(5, 'b', 'z')")
        .await
        .unwrap();
    c.query_drop("CREATE INDEX k_1 ON sbtest1(k)")
        .await
        .unwrap();
    let dup = c
        .query_drop("CREATE INDEX k_1 ON sbtest1(c)")
        .await
        .unwrap_err();
    assert_eq!(code(&dup), Some(1061), "{dup}");
    let bad = c
        .query_drop("CREATE INDEX k_2 ON sbtest1(nope)")
        .await
        .unwrap_err();
    assert_eq!(code(&bad), Some(1072), "{bad}");
    let missing = c
        .query_drop("CREATE INDEX k_2 ON nope(k)")
        .await
        .unwrap_err();
    assert_eq!(code(&missing), Some(1146), "{missing}");

    let distinct: Vec<String> = c
        .exec(
            "SELECT DISTINCT c FROM sbtest1 WHERE id BETWEEN ? AND ? ORDER BY c",
            (1, 3),
        )
        .await
        .unwrap();
    assert_eq!(distinct, ["a", "b"]);
    let limited: Vec<i64> = c
        .query("SELECT DISTINCT k FROM sbtest1 ORDER BY k DESC LIMIT 1 OFFSET 1")
        .await
        .unwrap();
    assert_eq!(limited, [5], "DISTINCT applies before LIMIT/OFFSET");
    let sum: Option<i64> = c
        .exec_first(
            "SELECT SUM(k) FROM sbtest1 WHERE id BETWEEN ? AND ?",
            (1, 2),
        )
        .await
        .unwrap();
    assert_eq!(sum, Some(12));
    c.query_drop("BEGIN").await.unwrap();
    c.exec_drop("UPDATE sbtest1 SET k=k+1 WHERE id=?", (1,))
        .await
        .unwrap();
    c.exec_drop("DELETE FROM sbtest1 WHERE id=?", (2,))
        .await
        .unwrap();
    c.exec_drop(
        "INSERT INTO sbtest1 (id, k, c, pad) VALUES (?, ?, ?, ?)",
        (2, 9, "c", "w"),
    )
    .await
    .unwrap();
    c.query_drop("COMMIT").await.unwrap();
    let ks: Vec<(i64, i64)> = c
        .query("SELECT id, k FROM sbtest1 ORDER BY id")
        .await
        .unwrap();
    assert_eq!(ks, [(1, 6), (2, 9), (3, 5)]);
}

/// GROUP BY / HAVING and subqueries as MySQL answers them, with its errors.
#[tokio::test]
async fn grouping_and_subqueries() {
    let f = fleet(1, TidbOptions::default()).await;
    let mut c = conn(&sql_addr(&f, 0), "root", "", Some("test"))
        .await
        .unwrap();
    c.query_drop("CREATE TABLE g (id INT PRIMARY KEY, v VARCHAR(8), n INT)")
        .await
        .unwrap();
    let empty: Vec<(String, i64)> = c
        .query("SELECT v, COUNT(*) FROM g GROUP BY v")
        .await
        .unwrap();
    assert!(empty.is_empty(), "no groups without rows");
    let total: Option<i64> = c.query_first("SELECT COUNT(*) FROM g").await.unwrap();
    assert_eq!(total, Some(0), "one row without GROUP BY");
    c.query_drop("INSERT INTO g VALUES (1, 'x', 1), (2, 'y', 2), (3, 'x', NULL), (4, 'z', 4)")
        .await
        .unwrap();
    let groups: Vec<(String, i64, i64, Option<i64>)> = c
        .exec(
            "SELECT v, COUNT(*) AS rows_, COUNT(n), SUM(n) FROM g WHERE id > ? GROUP BY v HAVING rows_ >= 1 ORDER BY 2 DESC, v",
            (0,),
        )
        .await
        .unwrap();
    assert_eq!(
        groups,
        [
            ("x".into(), 2, 1, Some(1)),
            ("y".into(), 1, 1, Some(2)),
            ("z".into(), 1, 1, Some(4))
        ]
    );
    let above: Vec<i64> = c
        .query("SELECT id FROM g WHERE n > (SELECT AVG(n) FROM g) ORDER BY id")
        .await
        .unwrap();
    assert_eq!(above, [4]);
    let not_in: Vec<i64> = c
        .query("SELECT id FROM g WHERE id NOT IN (SELECT id FROM g WHERE v = 'x') ORDER BY id")
        .await
        .unwrap();
    assert_eq!(not_in, [2, 4]);
    let many = c.query_drop("SELECT (SELECT id FROM g)").await.unwrap_err();
    assert_eq!(code(&many), Some(1242), "{many}");
    let wide = c
        .query_drop("SELECT 1 FROM g WHERE id IN (SELECT id, v FROM g)")
        .await
        .unwrap_err();
    assert_eq!(code(&wide), Some(1241), "{wide}");
    let tables: Vec<(String, String)> = c
        .query(
            "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.tables WHERE table_schema = 'test'",
        )
        .await
        .unwrap();
    assert_eq!(tables, [("g".to_string(), "BASE TABLE".to_string())]);
    let cols: Vec<(String, String, String)> = c
        .query("SELECT COLUMN_NAME, DATA_TYPE, COLUMN_KEY FROM information_schema.COLUMNS WHERE TABLE_NAME = 'g' ORDER BY ORDINAL_POSITION DESC")
        .await
        .unwrap();
    assert_eq!(
        cols,
        [
            ("n".into(), "int".into(), String::new()),
            ("v".into(), "varchar".into(), String::new()),
            ("id".into(), "int".into(), "PRI".into())
        ]
    );
    let nope = c
        .query_drop("SELECT * FROM information_schema.nope")
        .await
        .unwrap_err();
    assert_eq!(code(&nope), Some(1146), "{nope}");
}

/// Two-table joins as MySQL answers them: INNER / LEFT / comma, aliases,
/// `t.*`, WHERE, GROUP BY, ORDER BY, LIMIT, prepared, and its errors.
#[tokio::test]
async fn two_table_joins() {
    let f = fleet(1, TidbOptions::default()).await;
    let mut c = conn(&sql_addr(&f, 0), "root", "", Some("test"))
        .await
        .unwrap();
    c.query_drop("CREATE TABLE u (id INT PRIMARY KEY, name VARCHAR(16))")
        .await
        .unwrap();
    c.query_drop("CREATE TABLE o (id INT PRIMARY KEY, uid INT, amt INT)")
        .await
        .unwrap();
    c.query_drop("INSERT INTO u VALUES (1, 'ann'), (2, 'bob'), (3, 'cy')")
        .await
        .unwrap();
    c.query_drop("INSERT INTO o VALUES (10, 1, 5), (11, 1, 7), (12, 2, 3), (13, 9, 1)")
        .await
        .unwrap();
    let top: Vec<(String, i64)> = c
        .query("SELECT u.name, o.amt FROM u JOIN o ON o.uid = u.id ORDER BY o.amt DESC LIMIT 2")
        .await
        .unwrap();
    assert_eq!(top, [("ann".into(), 7), ("ann".into(), 5)]);
    let per_user: Vec<(String, i64, Option<i64>)> = c
        .query(
            "SELECT x.name, COUNT(y.id), SUM(y.amt) FROM u AS x LEFT JOIN o y ON y.uid = x.id \
             GROUP BY x.name ORDER BY x.name",
        )
        .await
        .unwrap();
    assert_eq!(
        per_user,
        [
            ("ann".into(), 2, Some(12)),
            ("bob".into(), 1, Some(3)),
            ("cy".into(), 0, None)
        ]
    );
    let without: Vec<i64> = c
        .query("SELECT u.id FROM u LEFT OUTER JOIN o ON o.uid = u.id WHERE o.id IS NULL")
        .await
        .unwrap();
    assert_eq!(without, [3]);
    let over: Vec<(String, i64)> = c
        .exec(
            "SELECT name, amt FROM u, o WHERE uid = u.id AND amt > ? ORDER BY amt",
            (4,),
        )
        .await
        .unwrap();
    assert_eq!(over, [("ann".into(), 5), ("ann".into(), 7)]);
    let star: Option<(i64, i64, i64, String)> = c
        .query_first("SELECT o.*, u.name FROM o INNER JOIN u ON u.id = o.uid WHERE o.id = 12")
        .await
        .unwrap();
    assert_eq!(star, Some((12, 2, 3, "bob".into())));
    let e = c
        .query_drop("SELECT id FROM u JOIN o ON o.uid = u.id")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(1052), "{e}");
    let e = c
        .query_drop("SELECT * FROM u JOIN u ON 1")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(1066), "{e}");
    let e = c
        .query_drop("SELECT w.* FROM u JOIN o ON o.uid = u.id")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(1051), "{e}");
}

/// TiDB's default pessimistic transactions: a writer waits for another's
/// row lock instead of failing at commit (no lost update); a cycle of
/// waits is a deadlock (1213, that transaction rolled back); a wait ends
/// after `innodb_lock_wait_timeout` (1205, only the statement fails).
#[tokio::test]
async fn pessimistic_writers_wait_for_row_locks() {
    let f = fleet(2, TidbOptions::default()).await;
    let mut a = conn(&sql_addr(&f, 0), "root", "", Some("test"))
        .await
        .unwrap();
    let mut b = conn(&sql_addr(&f, 1), "root", "", Some("test"))
        .await
        .unwrap();
    a.query_drop("CREATE TABLE acct (id INT PRIMARY KEY, bal INT)")
        .await
        .unwrap();
    a.query_drop("INSERT INTO acct VALUES (1, 100), (2, 100)")
        .await
        .unwrap();
    let mode: Option<String> = a.query_first("SELECT @@tidb_txn_mode").await.unwrap();
    assert_eq!(mode.as_deref(), Some("pessimistic"));

    // b waits for a's lock, then updates what a committed.
    a.query_drop("BEGIN").await.unwrap();
    a.query_drop("UPDATE acct SET bal = bal + 1 WHERE id = 1")
        .await
        .unwrap();
    b.query_drop("BEGIN").await.unwrap();
    let waiting = tiproxy_runtime::task::spawn(async move {
        b.query_drop("UPDATE acct SET bal = bal + 10 WHERE id = 1")
            .await
            .map(|()| b)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "b waits for a's row lock");
    a.query_drop("COMMIT").await.unwrap();
    let mut b = waiting.await.unwrap().unwrap();
    b.query_drop("COMMIT").await.unwrap();
    let bal: Option<i64> = a
        .query_first("SELECT bal FROM acct WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(bal, Some(111), "no lost update");

    // a waits for b on id 2; b then wants id 1: a deadlock, b rolled back.
    a.query_drop("BEGIN").await.unwrap();
    b.query_drop("BEGIN").await.unwrap();
    a.query_drop("UPDATE acct SET bal = 0 WHERE id = 1")
        .await
        .unwrap();
    b.query_drop("UPDATE acct SET bal = 0 WHERE id = 2")
        .await
        .unwrap();
    let waiting = tiproxy_runtime::task::spawn(async move {
        a.query_drop("UPDATE acct SET bal = 5 WHERE id = 2")
            .await
            .map(|()| a)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = b
        .query_drop("UPDATE acct SET bal = 7 WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(1213), "{e}");
    let in_txn: Option<i64> = b.query_first("SELECT @@in_transaction").await.unwrap();
    assert_eq!(in_txn, Some(0), "the deadlocked transaction is rolled back");
    let mut a = waiting.await.unwrap().unwrap();
    a.query_drop("COMMIT").await.unwrap();
    let bals: Vec<i64> = b.query("SELECT bal FROM acct ORDER BY id").await.unwrap();
    assert_eq!(bals, [0, 5]);

    // innodb_lock_wait_timeout: the statement fails, the transaction stays.
    b.query_drop("SET innodb_lock_wait_timeout = 1")
        .await
        .unwrap();
    a.query_drop("BEGIN").await.unwrap();
    a.query_drop("UPDATE acct SET bal = 1 WHERE id = 1")
        .await
        .unwrap();
    b.query_drop("BEGIN").await.unwrap();
    b.query_drop("UPDATE acct SET bal = 2 WHERE id = 2")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let e = b
        .query_drop("UPDATE acct SET bal = 2 WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(1205), "{e}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    b.query_drop("COMMIT").await.unwrap();
    a.query_drop("ROLLBACK").await.unwrap();
    let bals: Vec<i64> = a.query("SELECT bal FROM acct ORDER BY id").await.unwrap();
    assert_eq!(bals, [0, 2]);
}

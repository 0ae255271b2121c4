//! The session-migration protocol against two instances of one cluster,
//! spoken by a raw client as the proxy speaks it: SHOW SESSION_STATES on
//! instance A, a `tidb_session_token` login on instance B, SET
//! SESSION_STATES there; the session is then the same on B.

mod common;

use std::time::Duration;

use common::{fleet, raw, set_session_states, sql_addr};
use tiproxy_core::StatusFlags;
use tiproxy_sim::tidb::client::{ConnectOptions, RawClient};
use tiproxy_sim::tidb::{TidbOptions, Value};
use tokio::net::TcpStream;

async fn try_token(addr: &str, user: &str, token: &[u8]) -> Result<RawClient<TcpStream>, u16> {
    let s = TcpStream::connect(addr).await.unwrap();
    RawClient::connect(s, &ConnectOptions::token(user, token))
        .await
        .map_err(|e| e.code().unwrap_or(0))
}

fn states_json(r: &tiproxy_sim::tidb::client::QueryResult) -> (serde_json::Value, String, String) {
    assert_eq!(r.columns, vec!["Session_states", "Session_token"]);
    assert_eq!(r.column_types, vec![0xf5, 0xf5], "both columns are JSON");
    let states = r.rows[0][0].clone().unwrap();
    let token = r.rows[0][1].clone().unwrap();
    (serde_json::from_str(&states).unwrap(), states, token)
}

#[tokio::test]
async fn a_session_moves_with_its_variables_database_and_statements() {
    let f = fleet(2, TidbOptions::default()).await;
    let (a_addr, b_addr) = (sql_addr(&f, 0), sql_addr(&f, 1));
    let mut a = raw(&a_addr, &ConnectOptions::password("app", "app-Pa55word")).await;
    a.query("CREATE DATABASE mig").await.unwrap();
    a.query("USE mig").await.unwrap();
    a.query("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))")
        .await
        .unwrap();
    a.query("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        .await
        .unwrap();
    a.query("SET @u = 'it''s \\\\ \"quoted\"', @n = 7, @f = 2.5, @z = NULL")
        .await
        .unwrap();
    a.query("SET SESSION wait_timeout = 777, sql_select_limit = 50")
        .await
        .unwrap();
    a.query("SET NAMES latin1").await.unwrap();
    a.query("PREPARE byid FROM 'SELECT v FROM t WHERE id = ?'")
        .await
        .unwrap();
    let sel = a
        .prepare("SELECT v, ? + 1 FROM t WHERE id = ?")
        .await
        .unwrap();
    let ins = a.prepare("INSERT INTO t VALUES (?, ?)").await.unwrap();
    a.close_statement(ins.id).await.unwrap();
    let upd = a.prepare("UPDATE t SET v = ? WHERE id = ?").await.unwrap();
    assert_eq!(
        (sel.id, ins.id, upd.id),
        (2, 3, 4),
        "ids count from 1, PREPARE took 1"
    );
    let before = a
        .execute(sel.id, &[Value::Int(41), Value::Int(1)])
        .await
        .unwrap();
    assert_eq!(
        before.rows,
        vec![vec![Some("one".into()), Some("42".into())]]
    );

    let probe = "SELECT @u, @n, @f, @z, @@wait_timeout, @@sql_select_limit, @@character_set_client, DATABASE(), LAST_INSERT_ID()";
    let on_a = a.query(probe).await.unwrap();

    let r = a.query("SHOW SESSION_STATES").await.unwrap();
    let (states, raw_states, token) = states_json(&r);
    assert_eq!(states["current-db"], "mig");
    assert_eq!(states["prepared-stmt-id"], 4);
    assert_eq!(states["prepared-stmts"]["1"]["name"], "byid");
    assert_eq!(
        states["prepared-stmts"]["2"]["text"],
        "SELECT v, ? + 1 FROM t WHERE id = ?"
    );
    assert_eq!(states["sys-vars"]["wait_timeout"], "777");
    let tok: serde_json::Value = serde_json::from_str(&token).unwrap();
    assert_eq!(tok["username"], "app");
    assert!(tok["signature"].as_str().is_some_and(|s| !s.is_empty()));

    // The proxy's login on B: plugin tidb_session_token, the token as
    // (length-encoded) auth data, the current database.
    let mut opts = ConnectOptions::token("app", token.as_bytes());
    opts.database = Some("mig".into());
    let s = TcpStream::connect(&b_addr).await.unwrap();
    let mut b = RawClient::connect(s, &opts).await.unwrap();
    assert_ne!(b.connection_id, a.connection_id);
    b.query(&set_session_states(&raw_states)).await.unwrap();

    let on_b = b.query(probe).await.unwrap();
    assert_eq!(on_b.rows, on_a.rows);
    assert_eq!(on_b.rows[0][0].as_deref(), Some("it's \\ \"quoted\""));
    // B exports the session A exported.
    let (b_states, _, _) = states_json(&b.query("SHOW SESSION_STATES").await.unwrap());
    for key in [
        "prepared-stmts",
        "prepared-stmt-id",
        "sys-vars",
        "user-var-values",
        "current-db",
    ] {
        assert_eq!(b_states[key], states[key], "{key}");
    }
    // Same statement ids, same results, on B.
    let after = b
        .execute(sel.id, &[Value::Int(41), Value::Int(1)])
        .await
        .unwrap();
    assert_eq!(after.rows, before.rows);
    // Re-using the bound types (new-params-bound = 0) works: they moved too.
    let mut values = Vec::new();
    values.extend_from_slice(&9i64.to_le_bytes());
    values.extend_from_slice(&2i64.to_le_bytes());
    let again = b
        .execute_with_bound_types(sel.id, &[false, false], &values)
        .await
        .unwrap();
    assert_eq!(
        again.rows,
        vec![vec![Some("two".into()), Some("10".into())]]
    );
    b.execute(upd.id, &[Value::Str("uno".into()), Value::Int(1)])
        .await
        .unwrap();
    let e = b
        .execute(ins.id, &[Value::Int(3), Value::Null])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(1243), "a closed statement stays closed: {e}");
    b.query("SET @k = 1").await.unwrap();
    let r = b.query("EXECUTE byid USING @k").await.unwrap();
    assert_eq!(r.scalar().as_deref(), Some("uno"));
    // A new statement on B does not reuse an id.
    let next = b.prepare("SELECT 1").await.unwrap();
    assert_eq!(next.id, 5);
}

#[tokio::test]
async fn bad_tokens_are_refused_with_access_denied() {
    let f = fleet(2, TidbOptions::default()).await;
    let (a_addr, b_addr) = (sql_addr(&f, 0), sql_addr(&f, 1));
    let mut a = raw(&a_addr, &ConnectOptions::password("app", "app-Pa55word")).await;
    let r = a.query("SHOW SESSION_STATES").await.unwrap();
    let token = r.rows[0][1].clone().unwrap();

    assert!(try_token(&b_addr, "app", token.as_bytes()).await.is_ok());
    // Issued for app, presented by root.
    assert_eq!(
        try_token(&b_addr, "root", token.as_bytes()).await.err(),
        Some(1045)
    );
    // Edited to say root: the signature no longer matches.
    let forged = token.replace("\"app\"", "\"root\"");
    assert_eq!(
        try_token(&b_addr, "root", forged.as_bytes()).await.err(),
        Some(1045)
    );
    // Signed by another cluster's key.
    let other = fleet(1, TidbOptions::default()).await;
    let mut o = raw(
        &sql_addr(&other, 0),
        &ConnectOptions::password("app", "app-Pa55word"),
    )
    .await;
    let foreign = o.query("SHOW SESSION_STATES").await.unwrap().rows[0][1]
        .clone()
        .unwrap();
    assert_eq!(
        try_token(&b_addr, "app", foreign.as_bytes()).await.err(),
        Some(1045)
    );
    assert_eq!(try_token(&b_addr, "app", b"{}").await.err(), Some(1045));
    assert_eq!(try_token(&b_addr, "app", b"").await.err(), Some(1045));
    // Expired: the cluster's clock moves past the one-minute lifetime.
    f.cluster().advance_clock(Duration::from_secs(61));
    assert_eq!(
        try_token(&b_addr, "app", token.as_bytes()).await.err(),
        Some(1045)
    );
    let s = TcpStream::connect(&b_addr).await.unwrap();
    let e = RawClient::connect(s, &ConnectOptions::token("app", token.as_bytes()))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Access denied for user 'app'@'127.0.0.1' (using password: YES)"),
        "{e}"
    );
}

#[tokio::test]
async fn show_session_states_is_refused_where_tidb_refuses_it() {
    let f = fleet(1, TidbOptions::default()).await;
    let mut c = raw(&sql_addr(&f, 0), &ConnectOptions::password("root", "")).await;
    c.query("CREATE TABLE test.t (id INT PRIMARY KEY)")
        .await
        .unwrap();
    let r = c.query("BEGIN").await.unwrap();
    assert!(r.status.contains(StatusFlags::IN_TRANS));
    let r = c.query("INSERT INTO test.t VALUES (1)").await.unwrap();
    assert!(r.status.contains(StatusFlags::IN_TRANS));
    let e = c.query("SHOW SESSION_STATES").await.unwrap_err();
    assert_eq!(e.code(), Some(8146));
    assert!(
        e.to_string()
            .contains("cannot migrate the current session: session has an active transaction"),
        "{e}"
    );
    let r = c.query("COMMIT").await.unwrap();
    assert!(!r.status.contains(StatusFlags::IN_TRANS));
    assert!(r.status.contains(StatusFlags::AUTOCOMMIT));
    c.query("SHOW SESSION_STATES").await.unwrap();

    // autocommit = 0: the first table access opens a transaction.
    c.query("SET autocommit = 0").await.unwrap();
    let r = c.query("SELECT 1").await.unwrap();
    assert!(
        !r.status.contains(StatusFlags::IN_TRANS) && !r.status.contains(StatusFlags::AUTOCOMMIT)
    );
    let r = c.query("SELECT * FROM test.t").await.unwrap();
    assert!(r.status.contains(StatusFlags::IN_TRANS), "{:?}", r.status);
    assert_eq!(
        c.query("SHOW SESSION_STATES").await.unwrap_err().code(),
        Some(8146)
    );
    c.query("SET autocommit = 1").await.unwrap();
    assert!(!c.status.contains(StatusFlags::IN_TRANS));

    // Long data waiting for an execute.
    let st = c.prepare("SELECT ?").await.unwrap();
    c.send_long_data(st.id, 0, b"chunk").await.unwrap();
    let e = c.query("SHOW SESSION_STATES").await.unwrap_err();
    assert!(
        e.to_string()
            .contains("prepared statements have bound params"),
        "{e}"
    );
    let r = c
        .execute(st.id, &[Value::Str("ignored".into())])
        .await
        .unwrap();
    assert_eq!(r.scalar().as_deref(), Some("chunk"));
    c.query("SHOW SESSION_STATES").await.unwrap();

    // Without a signing cert (old TiDB) there is no token.
    let plain = fleet(
        1,
        TidbOptions {
            session_token_signing: false,
            ..TidbOptions::default()
        },
    )
    .await;
    let mut p = raw(&sql_addr(&plain, 0), &ConnectOptions::password("root", "")).await;
    assert_eq!(
        p.query("SHOW SESSION_STATES").await.unwrap_err().code(),
        Some(8146)
    );
}

#[tokio::test]
async fn the_proxys_forced_auth_switch_works_for_every_plugin() {
    let f = fleet(1, TidbOptions::default()).await;
    let addr = sql_addr(&f, 0);
    for (user, pass) in [
        ("root", ""),
        ("app", "app-Pa55word"),
        ("sha2user", "sha2-Pa55word"),
    ] {
        for deprecate_eof in [true, false] {
            let mut o = ConnectOptions::password(user, pass);
            o.plugin = Some("auth_unknown_plugin".into());
            o.deprecate_eof = deprecate_eof;
            let mut c = raw(&addr, &o).await;
            let r = c.query("SELECT CURRENT_USER(), 1 + 1").await.unwrap();
            assert_eq!(
                r.rows,
                vec![vec![Some(format!("{user}@%")), Some("2".into())]]
            );
            assert!(r.status.contains(StatusFlags::AUTOCOMMIT));
        }
    }
    let mut o = ConnectOptions::password("app", "nope");
    o.plugin = Some("auth_unknown_plugin".into());
    let s = TcpStream::connect(&addr).await.unwrap();
    let e = RawClient::connect(s, &o).await.unwrap_err();
    assert_eq!(e.code(), Some(1045), "{e}");
    assert!(e.to_string().contains("(using password: YES)"), "{e}");

    // TiDB's own caching_sha2 behaviour: always full authentication.
    let g = fleet(
        1,
        TidbOptions {
            caching_sha2_fast_path: false,
            ..TidbOptions::default()
        },
    )
    .await;
    let mut c = raw(
        &sql_addr(&g, 0),
        &ConnectOptions::password("sha2user", "sha2-Pa55word"),
    )
    .await;
    c.ping().await.unwrap();

    // COM_CHANGE_USER, then a reset connection keeps the database.
    let mut c = raw(&addr, &ConnectOptions::password("root", "")).await;
    c.query("SET @v = 1").await.unwrap();
    c.change_user("app", "app-Pa55word", "test").await.unwrap();
    let r = c
        .query("SELECT CURRENT_USER(), DATABASE(), @v")
        .await
        .unwrap();
    assert_eq!(
        r.rows,
        vec![vec![Some("app@%".into()), Some("test".into()), None]]
    );
    // As the proxy rewrites it: auth_unknown_plugin, empty auth data.
    for (user, pass) in [("sha2user", "sha2-Pa55word"), ("app", "app-Pa55word")] {
        c.change_user_with_plugin(user, pass, "test", "auth_unknown_plugin")
            .await
            .unwrap();
        let r = c.query("SELECT CURRENT_USER()").await.unwrap();
        assert_eq!(r.scalar(), Some(format!("{user}@%")));
    }
    c.query("SET @v = 2").await.unwrap();
    c.reset_connection().await.unwrap();
    let r = c.query("SELECT DATABASE(), @v").await.unwrap();
    assert_eq!(r.rows, vec![vec![Some("test".into()), None]]);
}

#[tokio::test]
async fn multi_statements_report_more_results() {
    let f = fleet(1, TidbOptions::default()).await;
    let mut c = raw(&sql_addr(&f, 0), &ConnectOptions::password("root", "")).await;
    let all = c
        .query_multi("BEGIN; SELECT 1; SELECT @@in_transaction; COMMIT")
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
    assert!(all[..3].iter().all(|r| {
        r.status
            .contains(StatusFlags::MORE_RESULTS_EXISTS | StatusFlags::IN_TRANS)
    }));
    assert_eq!(all[2].scalar().as_deref(), Some("1"));
    assert!(!all[3].status.contains(StatusFlags::MORE_RESULTS_EXISTS));
    assert!(!all[3].status.contains(StatusFlags::IN_TRANS));
}

#[tokio::test]
async fn a_proxy_protocol_header_names_the_client() {
    use tiproxy_core::proxy_protocol::ProxyHeader;
    use tokio::io::AsyncWriteExt;

    async fn with_header(
        addr: &str,
        opts: &ConnectOptions,
    ) -> Result<RawClient<TcpStream>, tiproxy_sim::tidb::client::ClientError> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut h = bytes::BytesMut::new();
        ProxyHeader::Proxy {
            source: "10.1.2.3:4567".parse().unwrap(),
            destination: addr.parse().unwrap(),
        }
        .write(&mut h);
        s.write_all(&h).await.unwrap();
        RawClient::connect(s, opts).await
    }
    let on = fleet(
        1,
        TidbOptions {
            proxy_protocol: true,
            ..TidbOptions::default()
        },
    )
    .await;
    let addr = sql_addr(&on, 0);
    let mut c = with_header(&addr, &ConnectOptions::password("app", "app-Pa55word"))
        .await
        .unwrap();
    let r = c.query("SHOW PROCESSLIST").await.unwrap();
    assert_eq!(r.rows[0][2].as_deref(), Some("10.1.2.3:4567"));
    let e = with_header(&addr, &ConnectOptions::password("app", "bad"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("'app'@'10.1.2.3'"), "{e}");
    // Without a header it still works (the double's listener falls back).
    raw(&addr, &ConnectOptions::password("root", ""))
        .await
        .ping()
        .await
        .unwrap();

    let off = fleet(1, TidbOptions::default()).await;
    let e = with_header(&sql_addr(&off, 0), &ConnectOptions::password("root", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(8052), "{e}");
}

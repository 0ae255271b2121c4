//! One client connection: TiDB's handshake and authentication, then the
//! command loop, reading and writing MySQL packets with the core's codecs.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tiproxy_core::handshake::{
    AuthMoreData, AuthSwitchRequest, ChangeUser, ClientHello, InitialHandshake, client_capabilities,
};
use tiproxy_core::packet::{PacketDecoder, Payload, write_packet};
use tiproxy_core::proxy_protocol::{ProxyHeader, ProxyHeaderError};
use tiproxy_core::response::{EofPacket, ErrPacket, OkPacket, PrepareOk};
use tiproxy_core::wire::{Reader, put_lenenc_bytes, put_lenenc_int};
use tiproxy_core::{CapabilityFlags, Command, StatusFlags};
use tiproxy_runtime::net::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::auth::{check_scramble, plugin};
use super::error::SqlError;
use super::server::{ConnGuard, Instance, Phase, ProcessEntry};
use super::session::{Column, Output, ResultSet, Session};
use super::value::{Value, column_type};

/// TiDB's `defaultCapability` (no SSL: the double has no TLS).
pub const SERVER_CAPABILITIES: CapabilityFlags = CapabilityFlags::from_bits_retain(0x051B_A6AF);

/// TiDB's default collation in the greeting: utf8mb4_bin.
const GREETING_COLLATION: u8 = 46;

/// Largest packet the double accepts (TiDB's default max_allowed_packet).
const MAX_PACKET: usize = 64 << 20;

pub(crate) async fn serve<S: Stream>(
    stream: S,
    peer: SocketAddr,
    inst: Arc<Instance>,
    guard: ConnGuard,
) {
    let id = guard.id();
    let mut conn = Conn {
        stream,
        dec: PacketDecoder::with_limit(MAX_PACKET),
        out: BytesMut::new(),
        seq: 0,
        caps: CapabilityFlags::empty(),
        conn_id: guard.id(),
        salt: inst.cluster.salt(),
        peer,
        inst: Arc::clone(&inst),
        session: None,
        multi_statements: false,
    };
    // Biased (here and below): a fixed polling order keeps simulated runs
    // replayable.
    tokio::select! {
        biased;
        _ = inst.reached(Phase::Stopped) => {}
        r = conn.run() => {
            if let Err(e) = r {
                tracing::debug!(conn = id, "connection ended: {e}");
            }
        }
    }
    // Drop the socket before the guard, so a waiter sees it closed.
    drop(conn);
    drop(guard);
}

struct Conn<S> {
    stream: S,
    dec: PacketDecoder,
    out: BytesMut,
    /// Sequence id of the next packet written.
    seq: u8,
    /// Negotiated capabilities.
    caps: CapabilityFlags,
    conn_id: u64,
    salt: [u8; 20],
    peer: SocketAddr,
    inst: Arc<Instance>,
    session: Option<Session>,
    multi_statements: bool,
}

fn proto(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// How a login proved who it is.
enum Verdict {
    Ok,
    Denied(SqlError),
}

impl<S: Stream> Conn<S> {
    async fn read_packet(&mut self) -> io::Result<Option<Payload>> {
        loop {
            match self.dec.next_payload() {
                Ok(Some(p)) => {
                    self.seq = p.last_seq.wrapping_add(1);
                    return Ok(Some(p));
                }
                Ok(None) => {}
                Err(e) => return Err(proto(&e.to_string())),
            }
            let mut buf = [0u8; 16 * 1024];
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.dec.extend(&buf[..n]);
        }
    }

    async fn must_read(&mut self) -> io::Result<Payload> {
        self.read_packet()
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "client closed"))
    }

    fn push(&mut self, payload: &[u8]) {
        self.seq = write_packet(&mut self.out, self.seq, payload);
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        self.stream.flush().await
    }

    fn status(&self) -> StatusFlags {
        match &self.session {
            Some(s) => s.status(),
            None => StatusFlags::AUTOCOMMIT,
        }
    }

    /// An OK packet. The info text is a `string<lenenc>`, as MySQL and
    /// TiDB write it (and mysql_common reads it) with or without
    /// CLIENT_SESSION_TRACK.
    fn push_ok(
        &mut self,
        affected_rows: u64,
        last_insert_id: u64,
        info: &str,
        status: StatusFlags,
    ) {
        let mut p = BytesMut::new();
        p.put_u8(0);
        put_lenenc_int(&mut p, affected_rows);
        put_lenenc_int(&mut p, last_insert_id);
        p.put_u16_le(status.bits());
        p.put_u16_le(0);
        if !info.is_empty() {
            put_lenenc_bytes(&mut p, info.as_bytes());
        }
        self.push(&p);
    }

    fn push_err(&mut self, e: &SqlError) {
        let mut p = BytesMut::new();
        let mut state = [b'H', b'Y', b'0', b'0', b'0'];
        if e.state.len() == 5 {
            state.copy_from_slice(e.state.as_bytes());
        }
        ErrPacket {
            code: e.code,
            sql_state: state,
            message: Bytes::copy_from_slice(e.message.as_bytes()),
        }
        .write(&mut p);
        self.push(&p);
    }

    /// The end of a row stream (or of a column list without DEPRECATE_EOF).
    fn push_terminator(&mut self, status: StatusFlags) {
        let mut p = BytesMut::new();
        if self.caps.contains(CapabilityFlags::DEPRECATE_EOF) {
            OkPacket {
                header: 0xfe,
                status,
                ..OkPacket::default()
            }
            .write(&mut p, self.caps);
        } else {
            EofPacket {
                warnings: 0,
                status,
            }
            .write(&mut p);
        }
        self.push(&p);
    }

    fn push_eof(&mut self, status: StatusFlags) {
        let mut p = BytesMut::new();
        EofPacket {
            warnings: 0,
            status,
        }
        .write(&mut p);
        self.push(&p);
    }

    fn push_column(&mut self, c: &Column, default: Option<&[u8]>) {
        let mut p = BytesMut::new();
        put_lenenc_bytes(&mut p, b"def");
        put_lenenc_bytes(&mut p, c.db.as_bytes());
        put_lenenc_bytes(&mut p, c.table.as_bytes());
        put_lenenc_bytes(&mut p, c.org_table.as_bytes());
        put_lenenc_bytes(&mut p, c.name.as_bytes());
        put_lenenc_bytes(&mut p, c.org_name.as_bytes());
        p.put_u8(0x0c);
        p.put_u16_le(c.charset);
        p.put_u32_le(c.length);
        p.put_u8(c.ty);
        p.put_u16_le(c.flags);
        p.put_u8(c.decimals);
        p.put_u16_le(0);
        if let Some(d) = default {
            put_lenenc_bytes(&mut p, d);
        }
        self.push(&p);
    }

    fn push_result_set(&mut self, rs: &ResultSet, binary: bool, status: StatusFlags) {
        let mut p = BytesMut::new();
        put_lenenc_int(&mut p, rs.columns.len() as u64);
        self.push(&p);
        for c in &rs.columns {
            self.push_column(c, None);
        }
        if !self.caps.contains(CapabilityFlags::DEPRECATE_EOF) {
            self.push_eof(status);
        }
        for row in &rs.rows {
            let mut p = BytesMut::new();
            if binary {
                encode_binary_row(&mut p, &rs.columns, row);
            } else {
                for v in row {
                    match v.to_text() {
                        Some(t) => put_lenenc_bytes(&mut p, t.as_bytes()),
                        None => p.put_u8(0xfb),
                    }
                }
            }
            self.push(&p);
        }
        self.push_terminator(status);
    }

    fn push_output(&mut self, out: &Output, binary: bool, status: StatusFlags) {
        match out {
            Output::Ok {
                affected_rows,
                last_insert_id,
                info,
            } => self.push_ok(*affected_rows, *last_insert_id, info, status),
            Output::Rows(rs) => self.push_result_set(rs, binary, status),
        }
    }

    async fn run(&mut self) -> io::Result<()> {
        let inst = Arc::clone(&self.inst);
        if !self.handshake().await? {
            return Ok(());
        }
        loop {
            let in_txn = self.session.as_ref().is_some_and(Session::in_txn);
            if inst.phase() >= Phase::Closing && !in_txn {
                tracing::debug!(
                    conn = self.conn_id,
                    "closing an idle connection for shutdown"
                );
                return Ok(());
            }
            self.dec.expect_seq(0);
            let pkt = tokio::select! {
                biased;
                r = self.read_packet() => r?,
                // Only an idle connection outside a transaction is closed here.
                _ = inst.reached(Phase::Closing), if !in_txn => return Ok(()),
            };
            let Some(pkt) = pkt else { return Ok(()) };
            if !self.command(pkt.data.freeze()).await? {
                return Ok(());
            }
        }
    }

    // ----- connection phase -----

    /// Greets, authenticates, and answers OK or ERR. False if the
    /// connection should close.
    async fn handshake(&mut self) -> io::Result<bool> {
        let opts = &self.inst.opts;
        let mut p = BytesMut::new();
        InitialHandshake {
            server_version: Bytes::copy_from_slice(opts.server_version.as_bytes()),
            connection_id: self.conn_id as u32,
            auth_data: Bytes::copy_from_slice(&self.salt),
            capabilities: SERVER_CAPABILITIES,
            charset: GREETING_COLLATION,
            status: StatusFlags::AUTOCOMMIT,
            reserved: [0; 10],
            mariadb_capabilities: Default::default(),
            auth_plugin: Bytes::from_static(opts.default_auth_plugin.as_bytes()),
        }
        .write(&mut p);
        self.seq = 0;
        self.push(&p);
        self.flush().await?;
        if !self.read_proxy_header().await? {
            return Ok(false);
        }
        let Some(first) = self.read_packet().await? else {
            return Ok(false);
        };
        let client_caps = client_capabilities(&first.data).map_err(|e| proto(&e.to_string()))?;
        if !client_caps.contains(CapabilityFlags::PROTOCOL_41) {
            self.push_err(&SqlError::new(
                1251,
                "08004",
                "Client does not support authentication protocol requested by server; consider upgrading MySQL client",
            ));
            self.flush().await?;
            return Ok(false);
        }
        let resp = match ClientHello::parse(&first.data).map_err(|e| proto(&e.to_string()))? {
            ClientHello::Response(r) => r,
            // SSL was not offered; a client asking anyway gets nothing.
            ClientHello::Ssl(_) => return Err(proto("SSL requested but the double has no TLS")),
        };
        self.caps = resp.capabilities & SERVER_CAPABILITIES;
        self.multi_statements = self.caps.contains(CapabilityFlags::MULTI_STATEMENTS);
        let user = String::from_utf8_lossy(&resp.username).into_owned();
        let plugin_name = resp
            .auth_plugin
            .as_ref()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let has_plugin_auth = resp.capabilities.contains(CapabilityFlags::PLUGIN_AUTH);
        let verdict = self
            .authenticate(
                &user,
                plugin_name,
                resp.auth_response.to_vec(),
                has_plugin_auth,
                false,
            )
            .await?;
        if let Verdict::Denied(e) = verdict {
            tracing::debug!(conn = self.conn_id, "login refused: {e}");
            self.push_err(&e);
            self.flush().await?;
            return Ok(false);
        }
        let mut session = Session::new(
            Arc::clone(&self.inst),
            self.conn_id,
            &user,
            &self.peer.ip().to_string(),
        );
        session.found_rows_flag = self.caps.contains(CapabilityFlags::FOUND_ROWS);
        if let Some(db) = resp.database.as_ref().filter(|d| !d.is_empty())
            && let Err(e) = session.use_db(&String::from_utf8_lossy(db))
        {
            self.push_err(&e);
            self.flush().await?;
            return Ok(false);
        }
        self.inst.register(ProcessEntry {
            id: self.conn_id,
            user: user.clone(),
            host: self.peer.to_string(),
            db: session.db.clone(),
            command: "Sleep",
            since: Instant::now(),
            info: None,
            in_txn: false,
        });
        self.session = Some(session);
        self.push_ok(0, 0, "", StatusFlags::AUTOCOMMIT);
        self.flush().await?;
        Ok(true)
    }

    /// Handles a PROXY v2 header in front of the handshake response. False
    /// if the connection should close.
    async fn read_proxy_header(&mut self) -> io::Result<bool> {
        let mut raw = Vec::new();
        loop {
            match ProxyHeader::parse(&raw) {
                Ok(None) => {}
                Ok(Some((header, n))) => {
                    if !self.inst.opts.proxy_protocol {
                        // The header read as a MySQL packet has sequence 10.
                        self.push_err(&SqlError::new(8052, "HY000", "invalid sequence 10 != 1"));
                        self.flush().await?;
                        return Ok(false);
                    }
                    if let ProxyHeader::Proxy { source, .. } = header {
                        self.peer = source;
                    }
                    self.dec.extend(&raw[n..]);
                    return Ok(true);
                }
                Err(ProxyHeaderError::NoSignature) => {
                    self.dec.extend(&raw);
                    return Ok(true);
                }
                Err(e) => return Err(proto(&e.to_string())),
            }
            let mut buf = [0u8; 4096];
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            raw.extend_from_slice(&buf[..n]);
        }
    }

    /// TiDB's checks, in TiDB's order: the session token plugin skips the
    /// user's plugin; an unknown user is refused at once; a plugin other
    /// than the user's (or the greeting's) gets an auth switch carrying the
    /// connection's salt; caching_sha2_password then takes its fast or full
    /// path (not in COM_CHANGE_USER, as in TiDB).
    async fn authenticate(
        &mut self,
        user: &str,
        plugin_name: Option<String>,
        mut auth: Vec<u8>,
        plugin_auth: bool,
        change_user: bool,
    ) -> io::Result<Verdict> {
        let host = self.peer.ip().to_string();
        let denied =
            |auth: &[u8]| Verdict::Denied(SqlError::access_denied(user, &host, !auth.is_empty()));
        if plugin_name.as_deref() == Some(plugin::TIDB_SESSION_TOKEN) {
            let ok = self.inst.opts.session_token_signing
                && self.inst.cluster.user(user).is_some()
                && match self.inst.cluster.validate_token(&auth, user) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!(conn = self.conn_id, "session token refused: {e}");
                        false
                    }
                };
            return Ok(if ok { Verdict::Ok } else { denied(&auth) });
        }
        let Some(account) = self.inst.cluster.user(user) else {
            return Ok(denied(&auth));
        };
        let named_plugin = plugin_name.is_some();
        if let Some(named) = plugin_name.as_deref() {
            let server_plugin = self.inst.opts.default_auth_plugin;
            if server_plugin != account.plugin || server_plugin != named {
                if plugin_auth {
                    let mut p = BytesMut::new();
                    AuthSwitchRequest {
                        plugin: Bytes::from_static(account.plugin.as_bytes()),
                        data: Bytes::copy_from_slice(&self.salt),
                    }
                    .write(&mut p);
                    self.push(&p);
                    self.flush().await?;
                    auth = self.must_read().await?.data.to_vec();
                } else if account.plugin != plugin::NATIVE_PASSWORD {
                    return Ok(Verdict::Denied(SqlError::new(
                        1251,
                        "08004",
                        "Client does not support authentication protocol requested by server; consider upgrading MySQL client",
                    )));
                }
            }
        }
        let plugin_used = account.plugin;
        if plugin_used == plugin::CACHING_SHA2 && named_plugin && !change_user && !auth.is_empty() {
            if self.inst.opts.caching_sha2_fast_path
                && check_scramble(&account, plugin::CACHING_SHA2, &self.salt, &auth)
            {
                self.push_more_data(AuthMoreData::FAST_AUTH_SUCCESS);
                return Ok(Verdict::Ok);
            }
            self.push_more_data(AuthMoreData::PERFORM_FULL_AUTH);
            self.flush().await?;
            let reply = self.must_read().await?.data.to_vec();
            // 0x02 asks for the RSA public key, which TiDB does not serve.
            if reply == [0x02] {
                return Ok(denied(&auth));
            }
            let clear: Vec<u8> = reply.iter().copied().filter(|&b| b != 0).collect();
            return Ok(if clear == account.password.as_bytes() {
                Verdict::Ok
            } else {
                denied(&auth)
            });
        }
        Ok(
            if check_scramble(&account, plugin_used, &self.salt, &auth) {
                Verdict::Ok
            } else {
                denied(&auth)
            },
        )
    }

    fn push_more_data(&mut self, code: u8) {
        let mut p = BytesMut::new();
        AuthMoreData {
            data: Bytes::copy_from_slice(&[code]),
        }
        .write(&mut p);
        self.push(&p);
    }

    // ----- command phase -----

    fn session(&mut self) -> &mut Session {
        // The command loop runs only after the handshake installed one.
        self.session
            .as_mut()
            .expect("a session exists after the handshake")
    }

    fn mark(&self, command: &'static str, info: Option<String>) {
        let (db, in_txn) = self
            .session
            .as_ref()
            .map_or((String::new(), false), |s| (s.db.clone(), s.in_txn()));
        self.inst.update(self.conn_id, |e| {
            e.command = command;
            e.info = info;
            e.since = Instant::now();
            e.db = db;
            e.in_txn = in_txn;
        });
    }

    /// Handles one command. False if the connection should close.
    async fn command(&mut self, data: Bytes) -> io::Result<bool> {
        let Some(&code) = data.first() else {
            return Err(proto("empty command packet"));
        };
        let body = data.slice(1..);
        let cmd = Command::from_byte(code);
        let keep = match cmd {
            Command::Quit => return Ok(false),
            Command::Query => {
                let sql = String::from_utf8_lossy(&body).into_owned();
                self.mark("Query", Some(sql.clone()));
                self.query(&sql).await?;
                true
            }
            Command::Ping => {
                let st = self.status();
                self.push_ok(0, 0, "", st);
                true
            }
            Command::InitDb => {
                let db = String::from_utf8_lossy(&body).into_owned();
                match self.session().use_db(&db) {
                    Ok(()) => {
                        let st = self.status();
                        self.push_ok(0, 0, "", st);
                    }
                    Err(e) => self.push_err(&e),
                }
                true
            }
            Command::FieldList => {
                self.field_list(&body);
                true
            }
            Command::Statistics => {
                let n = self.inst.connection_count();
                self.push(format!("Uptime: 1  Threads: {n}  Questions: 0  Slow queries: 0  Opens: 0  Flush tables: 0  Open tables: 0  Queries per second avg: 0.000").as_bytes());
                true
            }
            Command::StmtPrepare => {
                let sql = String::from_utf8_lossy(&body).into_owned();
                self.mark("Query", Some(sql.clone()));
                self.stmt_prepare(&sql);
                true
            }
            Command::StmtExecute => {
                self.mark("Execute", None);
                self.stmt_execute(&body).await?;
                true
            }
            Command::StmtClose => {
                if let Ok(id) = Reader::new(&body).u32("statement id") {
                    self.session().close_prepared(id);
                }
                // No response.
                self.mark("Sleep", None);
                return Ok(true);
            }
            Command::StmtSendLongData => {
                let mut r = Reader::new(&body);
                if let (Ok(id), Ok(param)) = (r.u32("statement id"), r.u16("parameter")) {
                    let rest = r.rest();
                    self.session().send_long_data(id, param, rest);
                }
                return Ok(true);
            }
            Command::StmtReset => {
                let id = Reader::new(&body).u32("statement id").unwrap_or(0);
                if self.session().reset_prepared(id) {
                    let st = self.status();
                    self.push_ok(0, 0, "", st);
                } else {
                    self.push_err(&SqlError::unknown_stmt(
                        &id.to_string(),
                        "mysqld_stmt_reset",
                    ));
                }
                true
            }
            Command::StmtFetch => {
                self.push_err(&SqlError::unsupported(
                    "COM_STMT_FETCH (the double opens no cursors)",
                ));
                true
            }
            Command::ResetConnection => {
                self.session().reset();
                let st = self.status();
                self.push_ok(0, 0, "", st);
                true
            }
            Command::SetOption => {
                match Reader::new(&body).u16("option") {
                    Ok(0) => self.multi_statements = true,
                    Ok(1) => self.multi_statements = false,
                    _ => {}
                }
                let st = self.status();
                self.push_terminator(st);
                true
            }
            Command::ChangeUser => self.change_user(&data).await?,
            other => {
                self.push_err(&SqlError::other(format!(
                    "command {} not supported now",
                    other.to_byte()
                )));
                true
            }
        };
        if self.inst.crash_armed() && self.autocommit_write(cmd, &body) && self.inst.take_crash() {
            // Applied, never answered: the instance is killed now.
            std::future::pending::<()>().await;
        }
        self.flush().await?;
        self.mark("Sleep", None);
        Ok(keep)
    }

    /// Whether the command just run changed something that running it
    /// twice would show (a write outside a transaction, or a prepare):
    /// what an armed crash waits for.
    fn autocommit_write(&self, cmd: Command, body: &[u8]) -> bool {
        if self.session.as_ref().is_none_or(Session::in_txn) {
            return false;
        }
        match cmd {
            Command::StmtPrepare => true,
            Command::Query => {
                let text = String::from_utf8_lossy(body);
                let verb = text.split_whitespace().next().unwrap_or("");
                ["INSERT", "UPDATE", "DELETE", "REPLACE", "PREPARE"]
                    .iter()
                    .any(|v| verb.eq_ignore_ascii_case(v))
            }
            _ => false,
        }
    }

    async fn query(&mut self, sql: &str) -> io::Result<()> {
        let stmts = match self.session().parse(sql) {
            Ok(v) => v,
            Err(e) => {
                self.push_err(&e);
                return Ok(());
            }
        };
        if stmts.len() > 1 && !self.multi_statements {
            self.push_err(&SqlError::syntax(&stmts[1].text));
            return Ok(());
        }
        let n = stmts.len();
        for (i, st) in stmts.iter().enumerate() {
            let started = tokio::time::Instant::now();
            let res = loop {
                let res = self.session().execute(st);
                if !self.wait_for_lock(started).await {
                    break res;
                }
            };
            let sleep = std::mem::take(&mut self.session().sleep);
            if !sleep.is_zero() {
                // Answer what is done so far, then wait as SLEEP() does.
                self.flush().await?;
                tokio::time::sleep(sleep).await;
            }
            let mut status = self.status();
            if i + 1 < n {
                status |= StatusFlags::MORE_RESULTS_EXISTS;
            }
            match res {
                Ok(out) => self.push_output(&out, false, status),
                Err(e) => {
                    self.push_err(&e);
                    break;
                }
            }
        }
        Ok(())
    }

    /// After a statement: if it met a lock, waits until some lock is
    /// released (true: run it again) or until `innodb_lock_wait_timeout`
    /// after `started` (false: its 1205 stands).
    async fn wait_for_lock(&mut self, started: tokio::time::Instant) -> bool {
        let Some(mut wait) = self.session().lock_wait.take() else {
            return false;
        };
        let deadline = started + self.session().lock_wait_timeout();
        match tokio::time::timeout_at(deadline, wait.rx.changed()).await {
            Ok(()) => true,
            // The wait timed out: the statement fails with its 1205.
            Err(_) => {
                self.session().stop_waiting(wait.txn_id);
                false
            }
        }
    }

    fn field_list(&mut self, body: &[u8]) {
        let mut r = Reader::new(body);
        let table = String::from_utf8_lossy(r.nul_or_rest()).into_owned();
        let db = self.session().db.clone();
        if db.is_empty() {
            self.push_err(&SqlError::no_db());
            return;
        }
        match self.inst.cluster.store().schema(&db, &table) {
            Ok(schema) => {
                for i in 0..schema.columns.len() {
                    let c = Column::of_table(&schema, i, None);
                    let d = schema.columns[i].default.to_text();
                    self.push_column(&c, Some(d.as_deref().unwrap_or("").as_bytes()));
                }
                let st = self.status();
                self.push_terminator(st);
            }
            Err(e) => self.push_err(&e),
        }
    }

    fn stmt_prepare(&mut self, sql: &str) {
        match self.session().prepare(sql) {
            Ok((id, params, columns)) => {
                let mut p = BytesMut::new();
                PrepareOk {
                    statement_id: id,
                    columns: columns.len() as u16,
                    params: params as u16,
                    warnings: 0,
                }
                .write(&mut p);
                self.push(&p);
                let st = self.status();
                let deprecate_eof = self.caps.contains(CapabilityFlags::DEPRECATE_EOF);
                if params > 0 {
                    let param = Column::expr("?", &Value::Str(String::new()));
                    for _ in 0..params {
                        self.push_column(&param, None);
                    }
                    if !deprecate_eof {
                        self.push_eof(st);
                    }
                }
                if !columns.is_empty() {
                    for c in &columns {
                        self.push_column(c, None);
                    }
                    if !deprecate_eof {
                        self.push_eof(st);
                    }
                }
            }
            Err(e) => self.push_err(&e),
        }
    }

    async fn stmt_execute(&mut self, body: &[u8]) -> io::Result<()> {
        let (id, params) = match self.decode_execute(body) {
            Ok(v) => v,
            Err(e) => {
                self.push_err(&e);
                return Ok(());
            }
        };
        let text = self
            .session
            .as_ref()
            .and_then(|s| s.prepared(id))
            .map(|p| p.parsed.text.clone());
        self.mark("Execute", text);
        let started = tokio::time::Instant::now();
        let res = loop {
            let res = self.session().execute_prepared(id, &params);
            if !self.wait_for_lock(started).await {
                break res;
            }
        };
        let sleep = std::mem::take(&mut self.session().sleep);
        if !sleep.is_zero() {
            tokio::time::sleep(sleep).await;
        }
        let status = self.status();
        match res {
            Ok(out) => self.push_output(&out, true, status),
            Err(e) => self.push_err(&e),
        }
        Ok(())
    }

    /// COM_STMT_EXECUTE's body: id, flags, iteration count, then the NULL
    /// bitmap, the new-params-bound flag, types and values.
    fn decode_execute(&mut self, body: &[u8]) -> Result<(u32, Vec<Value>), SqlError> {
        let malformed = || SqlError::new(1835, "HY000", "Malformed communication packet.");
        let mut r = Reader::new(body);
        let id = r.u32("statement id").map_err(|_| malformed())?;
        let _flags = r.u8("flags").map_err(|_| malformed())?;
        let _iterations = r.u32("iteration count").map_err(|_| malformed())?;
        let (n, stored_types) = match self.session().prepared(id) {
            Some(p) => (p.parsed.params, p.param_types.clone()),
            None => {
                return Err(SqlError::unknown_stmt(
                    &id.to_string(),
                    "mysqld_stmt_execute",
                ));
            }
        };
        if n == 0 {
            self.session().begin_execute(id, None);
            return Ok((id, Vec::new()));
        }
        let bitmap = r
            .take(n.div_ceil(8), "null bitmap")
            .map_err(|_| malformed())?
            .to_vec();
        let bound = r.u8("new params bound flag").map_err(|_| malformed())?;
        let new_types = if bound == 1 {
            Some(
                r.take(2 * n, "parameter types")
                    .map_err(|_| malformed())?
                    .to_vec(),
            )
        } else {
            None
        };
        let long_data: BTreeMap<u16, Vec<u8>> = self.session().begin_execute(id, new_types.clone());
        let types = new_types.unwrap_or(stored_types);
        if types.len() < 2 * n {
            return Err(SqlError::new(
                1210,
                "HY000",
                "Incorrect arguments to mysqld_stmt_execute",
            ));
        }
        let mut params = Vec::with_capacity(n);
        for i in 0..n {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                params.push(Value::Null);
                continue;
            }
            if let Some(d) = long_data.get(&(i as u16)) {
                params.push(Value::Str(String::from_utf8_lossy(d).into_owned()));
                continue;
            }
            let (ty, unsigned) = (types[2 * i], types[2 * i + 1] & 0x80 != 0);
            params.push(decode_param(&mut r, ty, unsigned).ok_or_else(malformed)?);
        }
        Ok((id, params))
    }

    async fn change_user(&mut self, data: &[u8]) -> io::Result<bool> {
        let Ok(cu) = ChangeUser::parse(data, self.caps) else {
            self.push_err(&SqlError::new(
                1835,
                "HY000",
                "Malformed communication packet.",
            ));
            return Ok(false);
        };
        let user = String::from_utf8_lossy(&cu.username).into_owned();
        let plugin_name = cu
            .auth_plugin
            .as_ref()
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let plugin_auth = self.caps.contains(CapabilityFlags::PLUGIN_AUTH);
        let verdict = self
            .authenticate(
                &user,
                plugin_name,
                cu.auth_response.to_vec(),
                plugin_auth,
                true,
            )
            .await?;
        if let Verdict::Denied(e) = verdict {
            // MySQL closes the connection after a failed COM_CHANGE_USER.
            self.push_err(&e);
            return Ok(false);
        }
        let mut session = Session::new(
            Arc::clone(&self.inst),
            self.conn_id,
            &user,
            &self.peer.ip().to_string(),
        );
        session.found_rows_flag = self.caps.contains(CapabilityFlags::FOUND_ROWS);
        let db = String::from_utf8_lossy(&cu.database).into_owned();
        if !db.is_empty()
            && let Err(e) = session.use_db(&db)
        {
            self.push_err(&e);
            return Ok(false);
        }
        self.session = Some(session);
        self.inst.update(self.conn_id, |e| e.user = user);
        let st = self.status();
        self.push_ok(0, 0, "", st);
        Ok(true)
    }
}

/// Decodes one binary-protocol parameter value.
fn decode_param(r: &mut Reader<'_>, ty: u8, unsigned: bool) -> Option<Value> {
    Some(match ty {
        column_type::NULL => Value::Null,
        column_type::TINY => {
            let b = r.u8("tiny").ok()?;
            if unsigned {
                Value::Int(i64::from(b))
            } else {
                Value::Int(i64::from(b as i8))
            }
        }
        column_type::SHORT | column_type::YEAR => {
            let v = r.u16("short").ok()?;
            if unsigned {
                Value::Int(i64::from(v))
            } else {
                Value::Int(i64::from(v as i16))
            }
        }
        column_type::LONG | column_type::INT24 => {
            let v = r.u32("long").ok()?;
            if unsigned {
                Value::Int(i64::from(v))
            } else {
                Value::Int(i64::from(v as i32))
            }
        }
        column_type::LONGLONG => {
            let b = r.take(8, "longlong").ok()?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            if unsigned {
                let u = u64::from_le_bytes(a);
                i64::try_from(u).map_or(Value::UInt(u), Value::Int)
            } else {
                Value::Int(i64::from_le_bytes(a))
            }
        }
        column_type::FLOAT => {
            let v = r.u32("float").ok()?;
            Value::Double(f64::from(f32::from_bits(v)))
        }
        column_type::DOUBLE => {
            let b = r.take(8, "double").ok()?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Value::Double(f64::from_le_bytes(a))
        }
        column_type::DATE | column_type::DATETIME | column_type::TIMESTAMP => {
            let len = r.u8("datetime length").ok()?;
            let b = r.take(usize::from(len), "datetime").ok()?;
            // Short forms leave the rest zero; a malformed length never panics.
            let g = |i: usize| b.get(i).copied().map_or(0, u32::from);
            let g32 = |i: usize| g(i) | g(i + 1) << 8 | g(i + 2) << 16 | g(i + 3) << 24;
            let year = g(0) | g(1) << 8;
            let mut s = format!("{year:04}-{:02}-{:02}", g(2), g(3));
            if len > 4 {
                s.push_str(&format!(" {:02}:{:02}:{:02}", g(4), g(5), g(6)));
            }
            if len > 7 {
                s.push_str(&format!(".{:06}", g32(7)));
            }
            Value::Str(s)
        }
        column_type::TIME => {
            let len = r.u8("time length").ok()?;
            let b = r.take(usize::from(len), "time").ok()?;
            let g = |i: usize| b.get(i).copied().map_or(0, u32::from);
            let g32 = |i: usize| g(i) | g(i + 1) << 8 | g(i + 2) << 16 | g(i + 3) << 24;
            let neg = g(0) == 1;
            let h = g32(1).saturating_mul(24).saturating_add(g(5));
            let mut s = format!(
                "{}{h:02}:{:02}:{:02}",
                if neg { "-" } else { "" },
                g(6),
                g(7)
            );
            if len > 8 {
                s.push_str(&format!(".{:06}", g32(8)));
            }
            Value::Str(s)
        }
        // Strings, blobs, decimals, JSON, enums, sets, bits.
        _ => Value::Str(String::from_utf8_lossy(r.lenenc_bytes("string").ok()?).into_owned()),
    })
}

/// One binary-protocol result row: header, NULL bitmap (offset 2), values
/// encoded by their column's type.
fn encode_binary_row(p: &mut BytesMut, columns: &[Column], row: &[Value]) {
    p.put_u8(0);
    let mut bitmap = vec![0u8; (columns.len() + 7 + 2) / 8];
    for (i, v) in row.iter().enumerate() {
        if v.is_null() {
            bitmap[(i + 2) / 8] |= 1 << ((i + 2) % 8);
        }
    }
    p.put_slice(&bitmap);
    for (c, v) in columns.iter().zip(row) {
        if v.is_null() {
            continue;
        }
        match c.ty {
            column_type::TINY => p.put_i8(v.as_i64().unwrap_or(0) as i8),
            column_type::SHORT | column_type::YEAR => p.put_i16_le(v.as_i64().unwrap_or(0) as i16),
            column_type::LONG | column_type::INT24 => p.put_i32_le(v.as_i64().unwrap_or(0) as i32),
            column_type::LONGLONG => match v {
                Value::UInt(u) => p.put_u64_le(*u),
                other => p.put_i64_le(other.as_i64().unwrap_or(0)),
            },
            column_type::FLOAT => p.put_f32_le(v.as_f64().unwrap_or(0.0) as f32),
            column_type::DOUBLE => p.put_f64_le(v.as_f64().unwrap_or(0.0)),
            _ => put_lenenc_bytes(p, v.to_text().unwrap_or_default().as_bytes()),
        }
    }
}

//! A minimal MySQL client over any byte stream: enough to drive the double
//! (and the proxy in front of it) from tests and simulated clients, where
//! mysql_async cannot run (turmoil). It speaks the text and binary
//! protocols, password and session-token logins, and keeps the server's
//! status flags so callers can check IN_TRANS.

use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use tiproxy_core::handshake::{
    AuthSwitchRequest, ChangeUser, HandshakeResponse, InitialHandshake, plugin,
};
use tiproxy_core::packet::{PacketDecoder, Payload, write_packet};
use tiproxy_core::response::{
    ErrPacket, OkPacket, PrepareOk, is_eof, is_row_terminator, terminator_status,
};
use tiproxy_core::wire::{Reader, put_lenenc_bytes};
use tiproxy_core::{CapabilityFlags, Command, StatusFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::auth::{native_scramble, sha2_scramble};
use super::value::{Value, column_type};

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The server answered with an ERR packet.
    #[error("ERROR {code} ({state}): {message}")]
    Server {
        /// Error code.
        code: u16,
        /// SQLSTATE.
        state: String,
        /// Message.
        message: String,
    },
    /// The server sent something the client did not expect.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The MySQL error code, if the server sent one.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn from_err(payload: &[u8]) -> Self {
        match ErrPacket::parse(payload) {
            Ok(e) => ClientError::Server {
                code: e.code,
                state: String::from_utf8_lossy(&e.sql_state).into_owned(),
                message: e.message_text(),
            },
            Err(e) => ClientError::Protocol(format!("bad ERR packet: {e}")),
        }
    }
}

/// How to log in.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A password, scrambled for whatever plugin the server asks for.
    Password(String),
    /// A session token from SHOW SESSION_STATES, sent with the
    /// `tidb_session_token` plugin as the proxy sends it.
    Token(Vec<u8>),
}

/// Login options.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// User.
    pub user: String,
    /// Password or token.
    pub credential: Credential,
    /// Database to start in.
    pub database: Option<String>,
    /// Negotiate CLIENT_DEPRECATE_EOF.
    pub deprecate_eof: bool,
    /// Negotiate CLIENT_MULTI_STATEMENTS.
    pub multi_statements: bool,
    /// The plugin named in the handshake response; `None` uses the
    /// greeting's (or `tidb_session_token` for a token). The proxy names
    /// `auth_unknown_plugin` with empty auth data to force a switch.
    pub plugin: Option<String>,
}

impl ConnectOptions {
    /// A password login.
    pub fn password(user: &str, password: &str) -> Self {
        Self {
            user: user.to_string(),
            credential: Credential::Password(password.to_string()),
            database: None,
            deprecate_eof: true,
            multi_statements: true,
            plugin: None,
        }
    }

    /// A session-token login.
    pub fn token(user: &str, token: &[u8]) -> Self {
        Self {
            credential: Credential::Token(token.to_vec()),
            ..Self::password(user, "")
        }
    }
}

/// A result: an OK or a result set (rows as text; NULL is `None`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueryResult {
    /// Column names (empty for an OK).
    pub columns: Vec<String>,
    /// Column types.
    pub column_types: Vec<u8>,
    /// Rows.
    pub rows: Vec<Vec<Option<String>>>,
    /// Affected rows (OK).
    pub affected_rows: u64,
    /// Last insert id (OK).
    pub last_insert_id: u64,
    /// Status flags of the final OK/EOF.
    pub status: StatusFlags,
    /// Info text (OK).
    pub info: String,
}

impl QueryResult {
    /// The single value of a one-row, one-column result.
    pub fn scalar(&self) -> Option<String> {
        self.rows.first().and_then(|r| r.first()).cloned().flatten()
    }
}

/// A statement prepared with COM_STMT_PREPARE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedStatement {
    /// Statement id.
    pub id: u32,
    /// Parameter count.
    pub params: u16,
    /// Result column names.
    pub columns: Vec<String>,
}

/// A logged-in connection.
#[derive(Debug)]
pub struct RawClient<S> {
    stream: S,
    dec: PacketDecoder,
    seq: u8,
    /// Capabilities sent in the handshake response.
    pub caps: CapabilityFlags,
    /// Status flags of the last OK/EOF.
    pub status: StatusFlags,
    /// Connection id from the greeting.
    pub connection_id: u32,
    /// Server version from the greeting.
    pub server_version: String,
    salt: Vec<u8>,
    password: String,
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

fn scramble(plugin_name: &str, password: &str, salt: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    match plugin_name {
        plugin::CACHING_SHA2 => sha2_scramble(password.as_bytes(), salt).to_vec(),
        plugin::CLEAR_PASSWORD => {
            let mut v = password.as_bytes().to_vec();
            v.push(0);
            v
        }
        _ => native_scramble(password.as_bytes(), salt).to_vec(),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// Reads the greeting and logs in.
    pub async fn connect(stream: S, opts: &ConnectOptions) -> Result<Self, ClientError> {
        let mut c = Self {
            stream,
            dec: PacketDecoder::default(),
            seq: 0,
            caps: CapabilityFlags::empty(),
            status: StatusFlags::empty(),
            connection_id: 0,
            server_version: String::new(),
            salt: Vec::new(),
            password: String::new(),
        };
        let greeting = c.read().await?;
        if greeting.data.first() == Some(&0xff) {
            return Err(ClientError::from_err(&greeting.data));
        }
        let hs = InitialHandshake::parse(&greeting.data).map_err(|e| protocol(e.to_string()))?;
        c.connection_id = hs.connection_id;
        c.server_version = String::from_utf8_lossy(&hs.server_version).into_owned();
        c.salt = hs.auth_data.to_vec();
        let mut caps = CapabilityFlags::LONG_PASSWORD
            | CapabilityFlags::LONG_FLAG
            | CapabilityFlags::PROTOCOL_41
            | CapabilityFlags::TRANSACTIONS
            | CapabilityFlags::SECURE_CONNECTION
            | CapabilityFlags::PLUGIN_AUTH
            | CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA
            | CapabilityFlags::MULTI_RESULTS;
        // Options that change the wire format only if the server has them,
        // as real connectors do (the proxy greets without DEPRECATE_EOF
        // until a backend has greeted it).
        if opts.deprecate_eof && hs.capabilities.contains(CapabilityFlags::DEPRECATE_EOF) {
            caps |= CapabilityFlags::DEPRECATE_EOF;
        }
        if opts.multi_statements {
            caps |= CapabilityFlags::MULTI_STATEMENTS;
        }
        if opts.database.is_some() {
            caps |= CapabilityFlags::CONNECT_WITH_DB;
        }
        let greeting_plugin = String::from_utf8_lossy(&hs.auth_plugin).into_owned();
        let (plugin_name, auth) = match &opts.credential {
            Credential::Token(t) => (
                opts.plugin
                    .clone()
                    .unwrap_or_else(|| plugin::TIDB_SESSION_TOKEN.into()),
                t.clone(),
            ),
            Credential::Password(p) => {
                c.password = p.clone();
                let name = opts.plugin.clone().unwrap_or(greeting_plugin);
                let auth = if name == plugin::FORCE_SWITCH {
                    Vec::new()
                } else {
                    scramble(&name, p, &c.salt)
                };
                (name, auth)
            }
        };
        c.caps = caps;
        let resp = HandshakeResponse {
            capabilities: caps,
            max_packet_size: 0,
            charset: 46,
            filler: [0; 23],
            mariadb_capabilities: Default::default(),
            username: Bytes::copy_from_slice(opts.user.as_bytes()),
            auth_response: Bytes::from(auth),
            database: opts
                .database
                .as_ref()
                .map(|d| Bytes::copy_from_slice(d.as_bytes())),
            auth_plugin: Some(Bytes::copy_from_slice(plugin_name.as_bytes())),
            attributes: Default::default(),
            zstd_level: None,
        };
        let mut p = BytesMut::new();
        resp.write(&mut p);
        c.write(&p).await?;
        c.finish_auth(plugin_name).await?;
        Ok(c)
    }

    /// Answers auth switches and more-data requests until OK or ERR.
    async fn finish_auth(&mut self, mut plugin_name: String) -> Result<(), ClientError> {
        loop {
            let p = self.read().await?;
            match p.data.first() {
                Some(0x00) => {
                    let ok =
                        OkPacket::parse(&p.data, self.caps).map_err(|e| protocol(e.to_string()))?;
                    self.status = ok.status;
                    return Ok(());
                }
                Some(0xff) => return Err(ClientError::from_err(&p.data)),
                Some(0xfe) => {
                    let sw =
                        AuthSwitchRequest::parse(&p.data).map_err(|e| protocol(e.to_string()))?;
                    plugin_name = String::from_utf8_lossy(&sw.plugin).into_owned();
                    let auth = scramble(&plugin_name, &self.password, &sw.data);
                    self.write(&auth).await?;
                }
                Some(0x01) => match p.data.get(1) {
                    Some(0x03) => {}
                    Some(0x04) => {
                        // Full authentication: the cleartext password (the
                        // double accepts it without TLS).
                        let mut pw = self.password.as_bytes().to_vec();
                        pw.push(0);
                        self.write(&pw).await?;
                    }
                    other => return Err(protocol(format!("unexpected auth more data {other:?}"))),
                },
                other => {
                    return Err(protocol(format!(
                        "unexpected auth packet {other:?} ({plugin_name})"
                    )));
                }
            }
        }
    }

    async fn read(&mut self) -> Result<Payload, ClientError> {
        loop {
            if let Some(p) = self
                .dec
                .next_payload()
                .map_err(|e| protocol(e.to_string()))?
            {
                self.seq = p.last_seq.wrapping_add(1);
                return Ok(p);
            }
            let mut buf = [0u8; 16 * 1024];
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
            self.dec.extend(&buf[..n]);
        }
    }

    async fn write(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        self.seq = write_packet(&mut out, self.seq, payload);
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn command(&mut self, cmd: Command, body: &[u8]) -> Result<(), ClientError> {
        self.seq = 0;
        let mut p = Vec::with_capacity(1 + body.len());
        p.push(cmd.to_byte());
        p.extend_from_slice(body);
        self.write(&p).await
    }

    fn deprecate_eof(&self) -> bool {
        self.caps.contains(CapabilityFlags::DEPRECATE_EOF)
    }

    /// Runs a query; with several statements, the last result (an error in
    /// any of them is returned).
    pub async fn query(&mut self, sql: &str) -> Result<QueryResult, ClientError> {
        let mut all = self.query_multi(sql).await?;
        all.pop().ok_or_else(|| protocol("no result"))
    }

    /// Runs a query and returns every result.
    pub async fn query_multi(&mut self, sql: &str) -> Result<Vec<QueryResult>, ClientError> {
        self.command(Command::Query, sql.as_bytes()).await?;
        let mut out = Vec::new();
        loop {
            let r = self.read_result(false).await?;
            let more = r.status.contains(StatusFlags::MORE_RESULTS_EXISTS);
            out.push(r);
            if !more {
                return Ok(out);
            }
        }
    }

    async fn read_result(&mut self, binary: bool) -> Result<QueryResult, ClientError> {
        let first = self.read().await?;
        match first.data.first() {
            Some(0x00) => {
                let ok =
                    OkPacket::parse(&first.data, self.caps).map_err(|e| protocol(e.to_string()))?;
                self.status = ok.status;
                return Ok(QueryResult {
                    affected_rows: ok.affected_rows,
                    last_insert_id: ok.last_insert_id,
                    status: ok.status,
                    info: ok_info(&ok.info),
                    ..QueryResult::default()
                });
            }
            Some(0xff) => return Err(ClientError::from_err(&first.data)),
            Some(0xfb) => return Err(protocol("LOCAL INFILE is not supported by this client")),
            _ => {}
        }
        let n = Reader::new(&first.data)
            .lenenc_int("column count")
            .map_err(|e| protocol(e.to_string()))?;
        let mut res = QueryResult::default();
        for _ in 0..n {
            let p = self.read().await?;
            let (name, ty) = parse_column(&p.data).map_err(protocol)?;
            res.columns.push(name);
            res.column_types.push(ty);
        }
        if !self.deprecate_eof() {
            let p = self.read().await?;
            if !is_eof(p.data.first().copied().unwrap_or(0), p.data.len()) {
                return Err(protocol("missing EOF after column definitions"));
            }
        }
        loop {
            let p = self.read().await?;
            let first = p.data.first().copied().unwrap_or(0);
            if first == 0xff {
                return Err(ClientError::from_err(&p.data));
            }
            if is_row_terminator(first, p.data.len(), self.deprecate_eof()) {
                res.status = terminator_status(&p.data).map_err(|e| protocol(e.to_string()))?;
                self.status = res.status;
                return Ok(res);
            }
            let row = if binary {
                decode_binary_row(&p.data, &res.column_types)
            } else {
                decode_text_row(&p.data, res.columns.len())
            }
            .map_err(protocol)?;
            res.rows.push(row);
        }
    }

    /// COM_STMT_PREPARE.
    pub async fn prepare(&mut self, sql: &str) -> Result<PreparedStatement, ClientError> {
        self.command(Command::StmtPrepare, sql.as_bytes()).await?;
        let first = self.read().await?;
        if first.data.first() == Some(&0xff) {
            return Err(ClientError::from_err(&first.data));
        }
        let ok = PrepareOk::parse(&first.data).map_err(|e| protocol(e.to_string()))?;
        for _ in 0..ok.params {
            self.read().await?;
        }
        if ok.params > 0 && !self.deprecate_eof() {
            self.read().await?;
        }
        let mut columns = Vec::new();
        for _ in 0..ok.columns {
            let p = self.read().await?;
            columns.push(parse_column(&p.data).map_err(protocol)?.0);
        }
        if ok.columns > 0 && !self.deprecate_eof() {
            self.read().await?;
        }
        Ok(PreparedStatement {
            id: ok.statement_id,
            params: ok.params,
            columns,
        })
    }

    /// COM_STMT_EXECUTE with typed parameters (always binding types).
    pub async fn execute(&mut self, id: u32, params: &[Value]) -> Result<QueryResult, ClientError> {
        let mut b = BytesMut::new();
        b.put_u32_le(id);
        b.put_u8(0);
        b.put_u32_le(1);
        if !params.is_empty() {
            let mut bitmap = vec![0u8; params.len().div_ceil(8)];
            for (i, v) in params.iter().enumerate() {
                if v.is_null() {
                    bitmap[i / 8] |= 1 << (i % 8);
                }
            }
            b.put_slice(&bitmap);
            b.put_u8(1);
            for v in params {
                let (ty, flag) = match v {
                    Value::Null => (column_type::NULL, 0u8),
                    Value::Int(_) => (column_type::LONGLONG, 0),
                    Value::UInt(_) => (column_type::LONGLONG, 0x80),
                    Value::Double(_) => (column_type::DOUBLE, 0),
                    Value::Str(_) => (column_type::VAR_STRING, 0),
                };
                b.put_u8(ty);
                b.put_u8(flag);
            }
            for v in params {
                match v {
                    Value::Null => {}
                    Value::Int(i) => b.put_i64_le(*i),
                    Value::UInt(u) => b.put_u64_le(*u),
                    Value::Double(d) => b.put_f64_le(*d),
                    Value::Str(s) => put_lenenc_bytes(&mut b, s.as_bytes()),
                }
            }
        }
        self.command(Command::StmtExecute, &b).await?;
        self.read_result(true).await
    }

    /// COM_STMT_EXECUTE of a statement without parameters, re-using the
    /// types bound before (new-params-bound flag 0).
    pub async fn execute_with_bound_types(
        &mut self,
        id: u32,
        nulls: &[bool],
        values: &[u8],
    ) -> Result<QueryResult, ClientError> {
        let mut b = BytesMut::new();
        b.put_u32_le(id);
        b.put_u8(0);
        b.put_u32_le(1);
        let mut bitmap = vec![0u8; nulls.len().div_ceil(8)];
        for (i, n) in nulls.iter().enumerate() {
            if *n {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        b.put_slice(&bitmap);
        b.put_u8(0);
        b.put_slice(values);
        self.command(Command::StmtExecute, &b).await?;
        self.read_result(true).await
    }

    /// COM_STMT_SEND_LONG_DATA (no response).
    pub async fn send_long_data(
        &mut self,
        id: u32,
        param: u16,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        b.put_u32_le(id);
        b.put_u16_le(param);
        b.put_slice(data);
        self.command(Command::StmtSendLongData, &b).await
    }

    /// COM_STMT_CLOSE (no response).
    pub async fn close_statement(&mut self, id: u32) -> Result<(), ClientError> {
        self.command(Command::StmtClose, &id.to_le_bytes()).await
    }

    /// COM_STMT_RESET.
    pub async fn reset_statement(&mut self, id: u32) -> Result<(), ClientError> {
        self.command(Command::StmtReset, &id.to_le_bytes()).await?;
        self.read_ok().await.map(|_| ())
    }

    /// COM_PING.
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        self.command(Command::Ping, &[]).await?;
        self.read_ok().await.map(|_| ())
    }

    /// COM_INIT_DB.
    pub async fn init_db(&mut self, db: &str) -> Result<(), ClientError> {
        self.command(Command::InitDb, db.as_bytes()).await?;
        self.read_ok().await.map(|_| ())
    }

    /// COM_RESET_CONNECTION.
    pub async fn reset_connection(&mut self) -> Result<(), ClientError> {
        self.command(Command::ResetConnection, &[]).await?;
        self.read_ok().await.map(|_| ())
    }

    /// COM_CHANGE_USER with a native-password scramble of the greeting salt
    /// (answering an auth switch if the server sends one).
    pub async fn change_user(
        &mut self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<(), ClientError> {
        self.change_user_with_plugin(user, password, db, plugin::NATIVE_PASSWORD)
            .await
    }

    /// COM_CHANGE_USER naming `plugin_name`; with `auth_unknown_plugin`
    /// the auth data is empty, as the proxy rewrites the command, and the
    /// server's auth switch is answered.
    pub async fn change_user_with_plugin(
        &mut self,
        user: &str,
        password: &str,
        db: &str,
        plugin_name: &str,
    ) -> Result<(), ClientError> {
        self.password = password.to_string();
        let auth = if plugin_name == plugin::FORCE_SWITCH {
            Vec::new()
        } else {
            scramble(plugin_name, password, &self.salt)
        };
        let cu = ChangeUser {
            username: Bytes::copy_from_slice(user.as_bytes()),
            auth_response: Bytes::from(auth),
            database: Bytes::copy_from_slice(db.as_bytes()),
            charset: Some(46),
            auth_plugin: Some(Bytes::copy_from_slice(plugin_name.as_bytes())),
            attributes: None,
        };
        let mut p = BytesMut::new();
        cu.write(&mut p, self.caps);
        self.seq = 0;
        self.write(&p).await?;
        self.finish_auth(plugin_name.to_string()).await
    }

    /// COM_QUIT.
    pub async fn quit(mut self) -> Result<(), ClientError> {
        self.command(Command::Quit, &[]).await
    }

    async fn read_ok(&mut self) -> Result<OkPacket, ClientError> {
        let p = self.read().await?;
        match p.data.first() {
            Some(0x00) => {
                let ok =
                    OkPacket::parse(&p.data, self.caps).map_err(|e| protocol(e.to_string()))?;
                self.status = ok.status;
                Ok(ok)
            }
            Some(0xff) => Err(ClientError::from_err(&p.data)),
            other => Err(protocol(format!("expected OK, got {other:?}"))),
        }
    }

    /// The stream, e.g. to drop it abruptly.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

/// The OK packet's info: a `string<lenenc>` (TiDB and MySQL write it so).
fn ok_info(raw: &[u8]) -> String {
    let mut r = Reader::new(raw);
    match r.lenenc_bytes("info") {
        Ok(b) => String::from_utf8_lossy(b).into_owned(),
        Err(_) => String::from_utf8_lossy(raw).into_owned(),
    }
}

/// The name and type of a column definition (protocol 41).
fn parse_column(p: &[u8]) -> Result<(String, u8), String> {
    let mut r = Reader::new(p);
    for f in ["catalog", "schema", "table", "org_table"] {
        r.lenenc_bytes(f).map_err(|e| e.to_string())?;
    }
    let name =
        String::from_utf8_lossy(r.lenenc_bytes("name").map_err(|e| e.to_string())?).into_owned();
    r.lenenc_bytes("org_name").map_err(|e| e.to_string())?;
    r.lenenc_int("fixed length").map_err(|e| e.to_string())?;
    r.u16("charset").map_err(|e| e.to_string())?;
    r.u32("length").map_err(|e| e.to_string())?;
    let ty = r.u8("type").map_err(|e| e.to_string())?;
    Ok((name, ty))
}

fn decode_text_row(p: &[u8], n: usize) -> Result<Vec<Option<String>>, String> {
    let mut r = Reader::new(p);
    (0..n)
        .map(|_| {
            r.lenenc_nullable("value")
                .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn decode_binary_row(p: &[u8], types: &[u8]) -> Result<Vec<Option<String>>, String> {
    let mut r = Reader::new(p);
    let e = |e: tiproxy_core::wire::WireError| e.to_string();
    if r.u8("row header").map_err(e)? != 0 {
        return Err("binary row without a 0x00 header".into());
    }
    let bitmap = r
        .take((types.len() + 7 + 2) / 8, "null bitmap")
        .map_err(e)?
        .to_vec();
    let mut out = Vec::with_capacity(types.len());
    for (i, ty) in types.iter().enumerate() {
        let bit = i + 2;
        if bitmap[bit / 8] & (1 << (bit % 8)) != 0 {
            out.push(None);
            continue;
        }
        let v = match *ty {
            column_type::TINY => (r.u8("tiny").map_err(e)? as i8).to_string(),
            column_type::SHORT | column_type::YEAR => {
                (r.u16("short").map_err(e)? as i16).to_string()
            }
            column_type::LONG | column_type::INT24 => {
                (r.u32("long").map_err(e)? as i32).to_string()
            }
            column_type::LONGLONG => {
                let b = r.take(8, "longlong").map_err(e)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                i64::from_le_bytes(a).to_string()
            }
            column_type::FLOAT => f32::from_bits(r.u32("float").map_err(e)?).to_string(),
            column_type::DOUBLE => {
                let b = r.take(8, "double").map_err(e)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                super::value::format_double(f64::from_le_bytes(a))
            }
            column_type::NULL => String::new(),
            _ => String::from_utf8_lossy(r.lenenc_bytes("string").map_err(e)?).into_owned(),
        };
        out.push(Some(v));
    }
    Ok(out)
}

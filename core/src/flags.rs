//! Capability and server status flags.

bitflags::bitflags! {
    /// Client/server capability flags (`CLIENT_*`), as exchanged in the
    /// initial handshake and the handshake response.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CapabilityFlags: u32 {
        /// CLIENT_LONG_PASSWORD (also MariaDB's CLIENT_MYSQL marker).
        const LONG_PASSWORD = 1;
        /// CLIENT_FOUND_ROWS: affected rows means found rows.
        const FOUND_ROWS = 1 << 1;
        /// CLIENT_LONG_FLAG.
        const LONG_FLAG = 1 << 2;
        /// CLIENT_CONNECT_WITH_DB: the handshake response names a database.
        const CONNECT_WITH_DB = 1 << 3;
        /// CLIENT_NO_SCHEMA.
        const NO_SCHEMA = 1 << 4;
        /// CLIENT_COMPRESS: zlib compressed protocol after authentication.
        const COMPRESS = 1 << 5;
        /// CLIENT_ODBC.
        const ODBC = 1 << 6;
        /// CLIENT_LOCAL_FILES: LOAD DATA LOCAL INFILE allowed.
        const LOCAL_FILES = 1 << 7;
        /// CLIENT_IGNORE_SPACE.
        const IGNORE_SPACE = 1 << 8;
        /// CLIENT_PROTOCOL_41: the 4.1 protocol. Required by the proxy.
        const PROTOCOL_41 = 1 << 9;
        /// CLIENT_INTERACTIVE.
        const INTERACTIVE = 1 << 10;
        /// CLIENT_SSL: TLS upgrade after the SSL request.
        const SSL = 1 << 11;
        /// CLIENT_IGNORE_SIGPIPE.
        const IGNORE_SIGPIPE = 1 << 12;
        /// CLIENT_TRANSACTIONS: status flags in OK/EOF.
        const TRANSACTIONS = 1 << 13;
        /// CLIENT_RESERVED.
        const RESERVED = 1 << 14;
        /// CLIENT_SECURE_CONNECTION (RESERVED2): 1-byte length-prefixed auth data.
        const SECURE_CONNECTION = 1 << 15;
        /// CLIENT_MULTI_STATEMENTS.
        const MULTI_STATEMENTS = 1 << 16;
        /// CLIENT_MULTI_RESULTS.
        const MULTI_RESULTS = 1 << 17;
        /// CLIENT_PS_MULTI_RESULTS.
        const PS_MULTI_RESULTS = 1 << 18;
        /// CLIENT_PLUGIN_AUTH: auth plugin names in the handshake.
        const PLUGIN_AUTH = 1 << 19;
        /// CLIENT_CONNECT_ATTRS: connection attributes in the handshake response.
        const CONNECT_ATTRS = 1 << 20;
        /// CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA.
        const PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21;
        /// CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS.
        const CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22;
        /// CLIENT_SESSION_TRACK: session state info in OK packets.
        const SESSION_TRACK = 1 << 23;
        /// CLIENT_DEPRECATE_EOF: OK packets (0xFE header) replace EOF packets.
        const DEPRECATE_EOF = 1 << 24;
        /// CLIENT_OPTIONAL_RESULTSET_METADATA.
        const OPTIONAL_RESULTSET_METADATA = 1 << 25;
        /// CLIENT_ZSTD_COMPRESSION_ALGORITHM: zstd compressed protocol.
        const ZSTD_COMPRESSION_ALGORITHM = 1 << 26;
        /// CLIENT_QUERY_ATTRIBUTES.
        const QUERY_ATTRIBUTES = 1 << 27;
        /// MULTI_FACTOR_AUTHENTICATION.
        const MULTI_FACTOR_AUTHENTICATION = 1 << 28;
        /// CLIENT_CAPABILITY_EXTENSION.
        const CAPABILITY_EXTENSION = 1 << 29;
        /// CLIENT_SSL_VERIFY_SERVER_CERT.
        const SSL_VERIFY_SERVER_CERT = 1 << 30;
        /// CLIENT_REMEMBER_OPTIONS.
        const REMEMBER_OPTIONS = 1 << 31;
    }
}

impl CapabilityFlags {
    /// What the proxy itself can carry. Anything outside this set changes
    /// the shape of responses in ways the command tracker does not model
    /// (optional result set metadata, query attributes, multi-factor auth),
    /// so it is never advertised to clients nor requested from backends.
    pub const PROXY_SUPPORTED: CapabilityFlags = CapabilityFlags::LONG_PASSWORD
        .union(CapabilityFlags::FOUND_ROWS)
        .union(CapabilityFlags::LONG_FLAG)
        .union(CapabilityFlags::CONNECT_WITH_DB)
        .union(CapabilityFlags::NO_SCHEMA)
        .union(CapabilityFlags::COMPRESS)
        .union(CapabilityFlags::ODBC)
        .union(CapabilityFlags::LOCAL_FILES)
        .union(CapabilityFlags::IGNORE_SPACE)
        .union(CapabilityFlags::PROTOCOL_41)
        .union(CapabilityFlags::INTERACTIVE)
        .union(CapabilityFlags::SSL)
        .union(CapabilityFlags::IGNORE_SIGPIPE)
        .union(CapabilityFlags::TRANSACTIONS)
        .union(CapabilityFlags::RESERVED)
        .union(CapabilityFlags::SECURE_CONNECTION)
        .union(CapabilityFlags::MULTI_STATEMENTS)
        .union(CapabilityFlags::MULTI_RESULTS)
        .union(CapabilityFlags::PS_MULTI_RESULTS)
        .union(CapabilityFlags::PLUGIN_AUTH)
        .union(CapabilityFlags::CONNECT_ATTRS)
        .union(CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA)
        .union(CapabilityFlags::CAN_HANDLE_EXPIRED_PASSWORDS)
        .union(CapabilityFlags::SESSION_TRACK)
        .union(CapabilityFlags::DEPRECATE_EOF)
        .union(CapabilityFlags::ZSTD_COMPRESSION_ALGORITHM);

    /// Capabilities that change the shape of packets on the wire in a way
    /// the client cannot cope with if the backend lacks them: a client and
    /// the backend serving it must agree on these, because the proxy
    /// forwards responses as they are. (Others, such as SESSION_TRACK or
    /// PS_MULTI_RESULTS, only let a server send more; a backend without them
    /// sends what any client of that protocol reads.)
    pub const SHAPE: CapabilityFlags = CapabilityFlags::PROTOCOL_41
        .union(CapabilityFlags::DEPRECATE_EOF)
        .union(CapabilityFlags::SECURE_CONNECTION)
        .union(CapabilityFlags::PLUGIN_AUTH);

    /// Capabilities that are negotiated separately on each leg: the proxy
    /// terminates them.
    pub const PER_LEG: CapabilityFlags = CapabilityFlags::SSL
        .union(CapabilityFlags::COMPRESS)
        .union(CapabilityFlags::ZSTD_COMPRESSION_ALGORITHM);
}

bitflags::bitflags! {
    /// Server status flags (`SERVER_STATUS_*`) carried by OK and EOF packets.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct StatusFlags: u16 {
        /// A transaction is active.
        const IN_TRANS = 1;
        /// Autocommit mode is on.
        const AUTOCOMMIT = 1 << 1;
        /// Another result set follows.
        const MORE_RESULTS_EXISTS = 1 << 3;
        /// SERVER_QUERY_NO_GOOD_INDEX_USED.
        const NO_GOOD_INDEX_USED = 1 << 4;
        /// SERVER_QUERY_NO_INDEX_USED.
        const NO_INDEX_USED = 1 << 5;
        /// A read-only cursor was opened by COM_STMT_EXECUTE.
        const CURSOR_EXISTS = 1 << 6;
        /// The last row of a cursor was sent.
        const LAST_ROW_SENT = 1 << 7;
        /// The current database was dropped.
        const DB_DROPPED = 1 << 8;
        /// NO_BACKSLASH_ESCAPES sql mode is on.
        const NO_BACKSLASH_ESCAPES = 1 << 9;
        /// Prepared statement metadata changed.
        const METADATA_CHANGED = 1 << 10;
        /// The query was slow.
        const QUERY_WAS_SLOW = 1 << 11;
        /// The result holds OUT parameters.
        const PS_OUT_PARAMS = 1 << 12;
        /// A read-only transaction is active.
        const IN_TRANS_READONLY = 1 << 13;
        /// Session state changed (session tracking info follows).
        const SESSION_STATE_CHANGED = 1 << 14;
    }
}

bitflags::bitflags! {
    /// MariaDB's extended capability flags: the upper 32 bits of MariaDB's
    /// 64-bit capability word (`MARIADB_CLIENT_*` in `mysql_com.h`; bit `n`
    /// here is bit `32 + n` there). A MariaDB server that has them clears
    /// `CLIENT_MYSQL` (`CapabilityFlags::LONG_PASSWORD`) in its greeting and
    /// writes them into the last 4 bytes of the greeting's reserved area; a
    /// client that understands them clears `CLIENT_MYSQL` too and answers in
    /// the last 4 bytes of the handshake response's (and SSL request's)
    /// filler.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MariaDbCapabilities: u32 {
        /// MARIADB_CLIENT_PROGRESS: the server may send progress reports
        /// (ERR packets with code 0xFFFF) while a statement runs.
        const PROGRESS = 1;
        /// MARIADB_CLIENT_COM_MULTI: several commands in one packet
        /// (COM_MULTI, 0xFE). Removed from servers since 10.6.
        const COM_MULTI = 1 << 1;
        /// MARIADB_CLIENT_STMT_BULK_OPERATIONS: COM_STMT_BULK_EXECUTE (0xFA),
        /// array binding of prepared statement parameters.
        const STMT_BULK_OPERATIONS = 1 << 2;
        /// MARIADB_CLIENT_EXTENDED_METADATA (EXTENDED_TYPE_INFO): column
        /// definitions carry an extra length-encoded string of type and
        /// format information (`format=json`, `type=point`).
        const EXTENDED_METADATA = 1 << 3;
        /// MARIADB_CLIENT_CACHE_METADATA: a column count packet carries a
        /// "metadata follows" byte; COM_STMT_EXECUTE results skip the
        /// column definitions the client already has.
        const CACHE_METADATA = 1 << 4;
        /// MARIADB_CLIENT_BULK_UNIT_RESULTS: COM_STMT_BULK_EXECUTE may
        /// answer with a result set holding one row per parameter set.
        const BULK_UNIT_RESULTS = 1 << 5;
    }
}

impl MariaDbCapabilities {
    /// What a proxy that forwards result sets raw can relay, decided per
    /// flag (the command tracker follows each through `TrackerOptions`):
    /// - PROGRESS: a progress report is one ERR-headed packet the tracker
    ///   recognises by its code (0xFFFF) and forwards without ending the
    ///   command.
    /// - STMT_BULK_OPERATIONS: COM_STMT_BULK_EXECUTE answers like
    ///   COM_STMT_EXECUTE (OK, ERR or a result set); the request is
    ///   forwarded raw.
    /// - EXTENDED_METADATA: only column definitions grow, and those are
    ///   forwarded without being parsed.
    /// - CACHE_METADATA: the tracker reads the "metadata follows" byte and
    ///   follows a result set with or without column definitions.
    /// - BULK_UNIT_RESULTS: a result set where an OK was expected, which
    ///   the tracker already accepts after COM_STMT_BULK_EXECUTE.
    ///
    /// Not COM_MULTI: one packet carries several commands and the answer
    /// is several responses, which the tracker does not model (and servers
    /// since 10.6 no longer offer it).
    pub const PROXY_SUPPORTED: MariaDbCapabilities = MariaDbCapabilities::PROGRESS
        .union(MariaDbCapabilities::STMT_BULK_OPERATIONS)
        .union(MariaDbCapabilities::EXTENDED_METADATA)
        .union(MariaDbCapabilities::CACHE_METADATA)
        .union(MariaDbCapabilities::BULK_UNIT_RESULTS);

    /// Flags a client and the backend serving it must agree on, because
    /// they change the layout of what the proxy forwards raw: column
    /// definitions (EXTENDED_METADATA), column count packets and skipped
    /// definitions (CACHE_METADATA), the answer to a bulk request
    /// (BULK_UNIT_RESULTS). The others only let one side send or ask for
    /// more, which a peer without them never does.
    pub const SHAPE: MariaDbCapabilities = MariaDbCapabilities::EXTENDED_METADATA
        .union(MariaDbCapabilities::CACHE_METADATA)
        .union(MariaDbCapabilities::BULK_UNIT_RESULTS);

    /// The 4 bytes as they sit on the wire (little-endian).
    pub fn to_le_bytes(self) -> [u8; 4] {
        self.bits().to_le_bytes()
    }

    /// Reads the 4 wire bytes; unknown bits are kept (a proxy intersects
    /// with [`Self::PROXY_SUPPORTED`] before it relays anything).
    pub fn from_le_bytes(b: [u8; 4]) -> Self {
        Self::from_bits_retain(u32::from_le_bytes(b))
    }
}

impl CapabilityFlags {
    /// MariaDB's name for bit 0 (`LONG_PASSWORD`): set by MySQL peers and
    /// by MariaDB peers that do not use extended capabilities. When it is
    /// clear, the 4 bytes of MariaDB capabilities are meaningful.
    pub const CLIENT_MYSQL: CapabilityFlags = CapabilityFlags::LONG_PASSWORD;

    /// Whether this capability word says MariaDB extended capabilities
    /// follow (`CLIENT_MYSQL` clear).
    pub fn has_mariadb_extension(self) -> bool {
        !self.contains(Self::CLIENT_MYSQL)
    }
}

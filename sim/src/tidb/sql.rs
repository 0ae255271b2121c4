//! The double's SQL: a lexer and a recursive-descent parser for the subset
//! listed in the module doc of [`crate::tidb`]. Anything else is an error
//! that says so; nothing is silently ignored except table options and
//! `SET TRANSACTION` characteristics.

use super::error::SqlError;
use super::value::Value;

/// One parsed statement with its source text and `?` count.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The statement.
    pub stmt: Stmt,
    /// Its text, without the separating `;`.
    pub text: String,
    /// Number of `?` placeholders.
    pub params: usize,
}

/// A table name, optionally qualified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    /// Database, if given.
    pub db: Option<String>,
    /// Table.
    pub name: String,
}

/// A statement of the subset.
#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    /// SELECT.
    Select(Select),
    /// SHOW [FULL] PROCESSLIST.
    ShowProcessList {
        /// FULL: the whole Info text.
        full: bool,
    },
    /// SHOW DATABASES.
    ShowDatabases,
    /// SHOW [FULL] TABLES [FROM db].
    ShowTables {
        /// The database, or the current one.
        db: Option<String>,
        /// FULL: add Table_type.
        full: bool,
    },
    /// SHOW [GLOBAL|SESSION] VARIABLES [LIKE 'pattern'].
    ShowVariables {
        /// GLOBAL.
        global: bool,
        /// The LIKE pattern.
        like: Option<String>,
    },
    /// SHOW CREATE TABLE t.
    ShowCreateTable(TableName),
    /// SHOW WARNINGS / SHOW ERRORS (always empty).
    ShowWarnings,
    /// SHOW SESSION_STATES.
    ShowSessionStates,
    /// USE db.
    Use(String),
    /// CREATE DATABASE.
    CreateDatabase {
        /// Name.
        name: String,
        /// IF NOT EXISTS.
        if_not_exists: bool,
    },
    /// DROP DATABASE.
    DropDatabase {
        /// Name.
        name: String,
        /// IF EXISTS.
        if_exists: bool,
    },
    /// CREATE TABLE.
    CreateTable(CreateTable),
    /// CREATE [UNIQUE] INDEX name ON t (cols).
    CreateIndex {
        /// The table.
        table: TableName,
        /// The index.
        index: IndexDef,
    },
    /// DROP TABLE.
    DropTable {
        /// Tables.
        tables: Vec<TableName>,
        /// IF EXISTS.
        if_exists: bool,
    },
    /// INSERT.
    Insert(Insert),
    /// UPDATE.
    Update(Update),
    /// DELETE.
    Delete(Delete),
    /// BEGIN / START TRANSACTION.
    Begin,
    /// COMMIT.
    Commit,
    /// ROLLBACK.
    Rollback,
    /// SET of variables.
    Set(Vec<SetItem>),
    /// SET TRANSACTION ...: accepted, no effect (the double has one
    /// isolation level: snapshot isolation).
    SetTransaction,
    /// SET SESSION_STATES 'json'.
    SetSessionStates(String),
    /// PREPARE name FROM ...
    Prepare {
        /// Statement name.
        name: String,
        /// Its text or the user variable holding it.
        source: PrepareSource,
    },
    /// EXECUTE name [USING @a, ...].
    Execute {
        /// Statement name.
        name: String,
        /// User variables bound to the placeholders.
        using: Vec<String>,
    },
    /// DEALLOCATE PREPARE name.
    Deallocate {
        /// Statement name.
        name: String,
    },
}

/// Where PREPARE takes its text from.
#[derive(Debug, Clone, PartialEq)]
pub enum PrepareSource {
    /// A string literal.
    Text(String),
    /// A user variable.
    UserVar(String),
}

/// SELECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Select {
    /// SELECT DISTINCT.
    pub distinct: bool,
    /// Select list.
    pub items: Vec<SelectItem>,
    /// FROM table (DUAL is `None`).
    pub from: Option<TableName>,
    /// The FROM table's alias.
    pub alias: Option<String>,
    /// A second table joined to the first (boxed: most SELECTs have none).
    pub join: Option<Box<Join>>,
    /// WHERE.
    pub filter: Option<Expr>,
    /// GROUP BY.
    pub group_by: Vec<Expr>,
    /// HAVING.
    pub having: Option<Expr>,
    /// ORDER BY (expression, descending).
    pub order_by: Vec<(Expr, bool)>,
    /// LIMIT count.
    pub limit: Option<Expr>,
    /// OFFSET.
    pub offset: Option<Expr>,
}

/// A two-table join: `[INNER | LEFT [OUTER]] JOIN t [AS a] ON ...`, or a
/// comma (an inner join whose condition is in WHERE).
#[derive(Debug, Clone, PartialEq)]
pub struct Join {
    /// LEFT JOIN: every row of the first table, NULLs where nothing matches.
    pub left: bool,
    /// The joined table.
    pub table: TableName,
    /// Its alias.
    pub alias: Option<String>,
    /// ON (`None`: every pair).
    pub on: Option<Expr>,
}

/// One item of a select list.
#[derive(Debug, Clone, PartialEq)]
pub enum SelectItem {
    /// `*`.
    Star,
    /// `t.*`: the columns of the table (or alias) `t`.
    TableStar(String),
    /// An expression and its column name (alias or source text).
    Expr {
        /// The expression.
        expr: Expr,
        /// The column name.
        name: String,
    },
}

/// INSERT.
#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    /// Target.
    pub table: TableName,
    /// Column list, if given.
    pub columns: Option<Vec<String>>,
    /// Rows of values.
    pub rows: Vec<Vec<Expr>>,
}

/// UPDATE.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Target.
    pub table: TableName,
    /// Assignments.
    pub sets: Vec<(String, Expr)>,
    /// WHERE.
    pub filter: Option<Expr>,
    /// LIMIT.
    pub limit: Option<Expr>,
}

/// DELETE.
#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    /// Target.
    pub table: TableName,
    /// WHERE.
    pub filter: Option<Expr>,
    /// LIMIT.
    pub limit: Option<Expr>,
}

/// CREATE TABLE.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateTable {
    /// Name.
    pub table: TableName,
    /// IF NOT EXISTS.
    pub if_not_exists: bool,
    /// Columns.
    pub columns: Vec<ColumnDef>,
    /// A `PRIMARY KEY (col)` table constraint.
    pub primary_key: Option<String>,
    /// Secondary indexes (`KEY`, `INDEX`, `UNIQUE KEY` clauses).
    pub indexes: Vec<IndexDef>,
}

/// A secondary index. The double scans instead of using it (sysbench's
/// `CREATE INDEX k_1` must succeed; its plans do not matter here) and keeps
/// it for `SHOW CREATE TABLE`; uniqueness is not enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexDef {
    /// Name.
    pub name: String,
    /// Columns, in order.
    pub columns: Vec<String>,
    /// UNIQUE.
    pub unique: bool,
}

/// A column definition.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnDef {
    /// Name.
    pub name: String,
    /// Type.
    pub ty: ColType,
    /// PRIMARY KEY on the column.
    pub primary_key: bool,
    /// AUTO_INCREMENT.
    pub auto_increment: bool,
    /// NOT NULL.
    pub not_null: bool,
    /// DEFAULT.
    pub default: Option<Value>,
}

/// Column types of the subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    /// TINYINT / SMALLINT / INT / MEDIUMINT, with their bit width.
    Int(u8),
    /// BIGINT.
    BigInt,
    /// DOUBLE / FLOAT / DECIMAL (kept as a double).
    Double,
    /// VARCHAR(n) / CHAR(n).
    Varchar(u32),
    /// TEXT.
    Text,
}

/// One assignment of SET.
#[derive(Debug, Clone, PartialEq)]
pub enum SetItem {
    /// A system variable.
    SysVar {
        /// GLOBAL scope.
        global: bool,
        /// Name, lowercase.
        name: String,
        /// Value; `None` is DEFAULT.
        value: Option<Expr>,
    },
    /// A user variable.
    UserVar {
        /// Name, lowercase.
        name: String,
        /// Value.
        value: Expr,
    },
    /// SET NAMES charset [COLLATE collation] / SET CHARACTER SET charset.
    Names {
        /// Charset.
        charset: String,
        /// Collation.
        collation: Option<String>,
        /// SET CHARACTER SET (sets character_set_connection from the database).
        character_set: bool,
    },
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// +
    Add,
    /// -
    Sub,
    /// *
    Mul,
    /// /
    Div,
    /// DIV
    IntDiv,
    /// % / MOD
    Mod,
    /// =
    Eq,
    /// <=>
    NullSafeEq,
    /// <> / !=
    Ne,
    /// <
    Lt,
    /// <=
    Le,
    /// >
    Gt,
    /// >=
    Ge,
    /// AND
    And,
    /// OR
    Or,
}

/// Expressions.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal.
    Lit(Value),
    /// The n-th `?`.
    Param(usize),
    /// `@name`.
    UserVar(String),
    /// `@@[global.|session.]name`.
    SysVar {
        /// GLOBAL scope.
        global: bool,
        /// Name, lowercase.
        name: String,
    },
    /// A column, as `c` or `t.c` (a database qualifier is dropped); see
    /// [`bare_column`].
    Column(String),
    /// A function call; name uppercase.
    Func(String, Vec<Expr>),
    /// COUNT(*).
    CountStar,
    /// Unary minus.
    Neg(Box<Expr>),
    /// NOT.
    Not(Box<Expr>),
    /// A binary operation.
    Bin(BinOp, Box<Expr>, Box<Expr>),
    /// IS [NOT] NULL (true = NOT).
    IsNull(Box<Expr>, bool),
    /// [NOT] BETWEEN.
    Between(Box<Expr>, Box<Expr>, Box<Expr>, bool),
    /// [NOT] IN (list).
    InList(Box<Expr>, Vec<Expr>, bool),
    /// [NOT] LIKE.
    Like(Box<Expr>, Box<Expr>, bool),
    /// `(SELECT ...)` as a value: replaced by its result before the outer
    /// query runs (no correlated subqueries).
    Subquery(Box<Select>),
    /// `e [NOT] IN (SELECT ...)`: replaced by an IN list likewise.
    InSubquery(Box<Expr>, Box<Select>, bool),
}

impl Expr {
    /// Whether the expression contains an aggregate function.
    pub fn has_aggregate(&self) -> bool {
        match self {
            Expr::CountStar => true,
            Expr::Func(name, args) => is_aggregate(name) || args.iter().any(Expr::has_aggregate),
            Expr::Neg(e) | Expr::Not(e) | Expr::IsNull(e, _) => e.has_aggregate(),
            Expr::Bin(_, a, b) | Expr::Like(a, b, _) => a.has_aggregate() || b.has_aggregate(),
            Expr::Between(a, b, c, _) => {
                a.has_aggregate() || b.has_aggregate() || c.has_aggregate()
            }
            Expr::InList(a, l, _) => a.has_aggregate() || l.iter().any(Expr::has_aggregate),
            // A subquery's aggregates are its own.
            Expr::InSubquery(a, _, _) => a.has_aggregate(),
            Expr::Subquery(_)
            | Expr::Lit(_)
            | Expr::Param(_)
            | Expr::UserVar(_)
            | Expr::SysVar { .. }
            | Expr::Column(_) => false,
        }
    }
}

/// Whether a function name is an aggregate.
pub fn is_aggregate(name: &str) -> bool {
    matches!(name, "COUNT" | "SUM" | "MIN" | "MAX" | "AVG")
}

/// Parses `sql` into statements (several when separated by `;`).
pub fn parse(sql: &str, no_backslash_escapes: bool) -> Result<Vec<Parsed>, SqlError> {
    let toks = lex(sql, no_backslash_escapes)?;
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..=toks.len() {
        let at_end = i == toks.len();
        if at_end || toks[i].tok == Tok::Op(";") {
            if i > start {
                let slice = &toks[start..i];
                let text = sql[slice[0].start..slice[slice.len() - 1].end].to_string();
                let mut p = Parser {
                    toks: slice,
                    pos: 0,
                    sql,
                    params: 0,
                };
                let stmt = p.statement().map_err(|e| e.into_sql_error(&text))?;
                out.push(Parsed {
                    stmt,
                    text,
                    params: p.params,
                });
            }
            start = i + 1;
        }
    }
    if out.is_empty() {
        return Err(SqlError::new(1065, "42000", "Query was empty"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// An unquoted word: identifier or keyword.
    Word(String),
    /// A `backquoted` identifier.
    Quoted(String),
    /// A string literal.
    Str(String),
    /// A numeric literal.
    Num(String),
    /// `@name`.
    UserVar(String),
    /// `@@...`, the text after `@@`.
    SysVar(String),
    /// `?`.
    Param,
    /// Punctuation and operators.
    Op(&'static str),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    start: usize,
    end: usize,
}

const OPS: &[&str] = &[
    "<=>", "<=", ">=", "<>", "!=", ":=", "||", "&&", "=", "<", ">", "(", ")", ",", ";", "*", "+",
    "-", "/", ".", "%", "!",
];

fn lex(sql: &str, no_backslash_escapes: bool) -> Result<Vec<Token>, SqlError> {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        // Comments: `-- ` to end of line, `#` to end of line, `/* */`.
        if c == b'-'
            && b.get(i + 1) == Some(&b'-')
            && b.get(i + 2).is_none_or(|c| c.is_ascii_whitespace())
        {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            match sql[i + 2..].find("*/") {
                Some(n) => i += n + 4,
                None => return Err(SqlError::syntax(&sql[i..])),
            }
            continue;
        }
        let start = i;
        let tok = match c {
            b'\'' | b'"' => {
                let (s, n) = lex_string(&sql[i..], c, no_backslash_escapes)?;
                i += n;
                Tok::Str(s)
            }
            b'`' => {
                let mut s = String::new();
                let mut j = i + 1;
                loop {
                    match sql[j..].find('`') {
                        None => return Err(SqlError::syntax(&sql[i..])),
                        Some(n) => {
                            s.push_str(&sql[j..j + n]);
                            j += n + 1;
                            if b.get(j) == Some(&b'`') {
                                s.push('`');
                                j += 1;
                            } else {
                                break;
                            }
                        }
                    }
                }
                i = j;
                Tok::Quoted(s)
            }
            b'0'..=b'9' => {
                let mut j = i;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                if j < b.len() && b[j] == b'.' {
                    j += 1;
                    while j < b.len() && b[j].is_ascii_digit() {
                        j += 1;
                    }
                }
                if j < b.len() && (b[j] == b'e' || b[j] == b'E') {
                    let mut k = j + 1;
                    if k < b.len() && (b[k] == b'+' || b[k] == b'-') {
                        k += 1;
                    }
                    if k < b.len() && b[k].is_ascii_digit() {
                        while k < b.len() && b[k].is_ascii_digit() {
                            k += 1;
                        }
                        j = k;
                    }
                }
                if j < b.len() && is_word_byte(b[j]) {
                    // `1abc` is an identifier in MySQL.
                    while j < b.len() && is_word_byte(b[j]) {
                        j += 1;
                    }
                    i = j;
                    out.push(Token {
                        tok: Tok::Word(sql[start..j].to_string()),
                        start,
                        end: j,
                    });
                    continue;
                }
                i = j;
                Tok::Num(sql[start..j].to_string())
            }
            b'@' if b.get(i + 1) == Some(&b'@') => {
                let mut j = i + 2;
                while j < b.len() && (is_word_byte(b[j]) || b[j] == b'.') {
                    j += 1;
                }
                if j == i + 2 {
                    return Err(SqlError::syntax(&sql[i..]));
                }
                let name = sql[i + 2..j].to_string();
                i = j;
                Tok::SysVar(name)
            }
            b'@' => {
                let j = i + 1;
                match b.get(j) {
                    Some(&q @ (b'\'' | b'"')) => {
                        let (s, n) = lex_string(&sql[j..], q, no_backslash_escapes)?;
                        i = j + n;
                        Tok::UserVar(s.to_lowercase())
                    }
                    Some(b'`') => match sql[j + 1..].find('`') {
                        Some(n) => {
                            let s = sql[j + 1..j + 1 + n].to_lowercase();
                            i = j + n + 2;
                            Tok::UserVar(s)
                        }
                        None => return Err(SqlError::syntax(&sql[i..])),
                    },
                    _ => {
                        let mut k = j;
                        while k < b.len() && (is_word_byte(b[k]) || b[k] == b'.') {
                            k += 1;
                        }
                        if k == j {
                            return Err(SqlError::syntax(&sql[i..]));
                        }
                        i = k;
                        Tok::UserVar(sql[j..k].to_lowercase())
                    }
                }
            }
            b'?' => {
                i += 1;
                Tok::Param
            }
            c if is_word_byte(c) || c >= 0x80 => {
                let mut j = i;
                while j < b.len() && (is_word_byte(b[j]) || b[j] >= 0x80) {
                    j += 1;
                }
                i = j;
                Tok::Word(sql[start..j].to_string())
            }
            _ => {
                let Some(op) = OPS.iter().find(|op| sql[i..].starts_with(**op)) else {
                    return Err(SqlError::syntax(&sql[i..]));
                };
                i += op.len();
                Tok::Op(op)
            }
        };
        out.push(Token { tok, start, end: i });
    }
    Ok(out)
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$'
}

/// Reads a quoted string starting at `s[0] == quote`; returns the value
/// and the bytes consumed.
fn lex_string(s: &str, quote: u8, no_backslash_escapes: bool) -> Result<(String, usize), SqlError> {
    let b = s.as_bytes();
    let mut out: Vec<u8> = Vec::new();
    let mut i = 1;
    while i < b.len() {
        let c = b[i];
        if c == quote {
            if b.get(i + 1) == Some(&quote) {
                out.push(quote);
                i += 2;
                continue;
            }
            return Ok((String::from_utf8_lossy(&out).into_owned(), i + 1));
        }
        if c == b'\\' && !no_backslash_escapes && i + 1 < b.len() {
            let e = b[i + 1];
            match e {
                b'0' => out.push(0),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'b' => out.push(8),
                b'Z' => out.push(26),
                // MySQL keeps the backslash before % and _ (LIKE escapes).
                b'%' | b'_' => out.extend_from_slice(&[b'\\', e]),
                other => out.push(other),
            }
            i += 2;
            continue;
        }
        out.push(c);
        i += 1;
    }
    Err(SqlError::syntax(s))
}

// ---------------------------------------------------------------------------
// Parser

/// A parse failure, turned into a [`SqlError`] with the statement text.
#[derive(Debug)]
enum ParseError {
    /// Valid SQL the double does not implement.
    Unsupported(String),
    /// Not valid SQL.
    Syntax,
}

impl ParseError {
    fn into_sql_error(self, text: &str) -> SqlError {
        let short: String = text.chars().take(200).collect();
        match self {
            ParseError::Unsupported(what) if what.is_empty() => SqlError::unsupported(short),
            ParseError::Unsupported(what) => SqlError::unsupported(format!("{what} in `{short}`")),
            ParseError::Syntax => SqlError::unsupported(format!("cannot parse `{short}`")),
        }
    }
}

type PResult<T> = Result<T, ParseError>;

struct Parser<'a> {
    toks: &'a [Token],
    pos: usize,
    sql: &'a str,
    params: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }

    fn peek_at(&self, n: usize) -> Option<&'a Tok> {
        self.toks.get(self.pos + n).map(|t| &t.tok)
    }

    fn bump(&mut self) -> Option<&'a Tok> {
        let t = self.toks.get(self.pos).map(|t| &t.tok);
        self.pos += 1;
        t
    }

    fn err<T>(&self) -> PResult<T> {
        Err(ParseError::Syntax)
    }

    fn unsupported<T>(&self, what: &str) -> PResult<T> {
        Err(ParseError::Unsupported(what.to_string()))
    }

    fn at_end(&self) -> bool {
        self.pos >= self.toks.len()
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn is_kw_at(&self, n: usize, kw: &str) -> bool {
        matches!(self.peek_at(n), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.is_kw(kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_kw(&mut self, kw: &str) -> PResult<()> {
        if self.eat_kw(kw) { Ok(()) } else { self.err() }
    }

    fn is_op(&self, op: &str) -> bool {
        matches!(self.peek(), Some(Tok::Op(o)) if *o == op)
    }

    fn eat_op(&mut self, op: &str) -> bool {
        if self.is_op(op) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_op(&mut self, op: &str) -> PResult<()> {
        if self.eat_op(op) { Ok(()) } else { self.err() }
    }

    fn expect_end(&self) -> PResult<()> {
        if self.at_end() {
            Ok(())
        } else {
            let t = &self.toks[self.pos];
            Err(ParseError::Unsupported(format!(
                "`{}`",
                &self.sql[t.start..self.toks[self.toks.len() - 1].end]
            )))
        }
    }

    fn ident(&mut self) -> PResult<String> {
        match self.bump() {
            Some(Tok::Word(w)) => Ok(w.clone()),
            Some(Tok::Quoted(w)) => Ok(w.clone()),
            _ => self.err(),
        }
    }

    fn table_name(&mut self) -> PResult<TableName> {
        let first = self.ident()?;
        if self.eat_op(".") {
            let name = self.ident()?;
            Ok(TableName {
                db: Some(first),
                name,
            })
        } else {
            Ok(TableName {
                db: None,
                name: first,
            })
        }
    }

    fn string_lit(&mut self) -> PResult<String> {
        match self.bump() {
            Some(Tok::Str(s)) => Ok(s.clone()),
            _ => self.err(),
        }
    }

    fn statement(&mut self) -> PResult<Stmt> {
        let Some(Tok::Word(first)) = self.peek() else {
            return self.err();
        };
        let first = first.to_ascii_uppercase();
        let stmt = match first.as_str() {
            "SELECT" => Stmt::Select(self.select()?),
            "SHOW" => self.show()?,
            "USE" => {
                self.pos += 1;
                Stmt::Use(self.ident()?)
            }
            "CREATE" => self.create()?,
            "DROP" => self.drop_stmt()?,
            "INSERT" => Stmt::Insert(self.insert()?),
            "UPDATE" => Stmt::Update(self.update()?),
            "DELETE" => Stmt::Delete(self.delete()?),
            "BEGIN" => {
                self.pos += 1;
                let _ = self.eat_kw("PESSIMISTIC") || self.eat_kw("OPTIMISTIC");
                self.eat_kw("WORK");
                Stmt::Begin
            }
            "START" => {
                self.pos += 1;
                self.expect_kw("TRANSACTION")?;
                // WITH CONSISTENT SNAPSHOT / READ ONLY / READ WRITE: the
                // double's transactions are always snapshots.
                while !self.at_end() {
                    self.bump();
                }
                Stmt::Begin
            }
            "COMMIT" => {
                self.pos += 1;
                self.eat_kw("WORK");
                Stmt::Commit
            }
            "ROLLBACK" => {
                self.pos += 1;
                self.eat_kw("WORK");
                Stmt::Rollback
            }
            "SET" => self.set()?,
            "PREPARE" => {
                self.pos += 1;
                let name = self.ident()?.to_lowercase();
                self.expect_kw("FROM")?;
                let source = match self.bump() {
                    Some(Tok::Str(s)) => PrepareSource::Text(s.clone()),
                    Some(Tok::UserVar(v)) => PrepareSource::UserVar(v.clone()),
                    _ => return self.err(),
                };
                Stmt::Prepare { name, source }
            }
            "EXECUTE" => {
                self.pos += 1;
                let name = self.ident()?.to_lowercase();
                let mut using = Vec::new();
                if self.eat_kw("USING") {
                    loop {
                        match self.bump() {
                            Some(Tok::UserVar(v)) => using.push(v.clone()),
                            _ => return self.err(),
                        }
                        if !self.eat_op(",") {
                            break;
                        }
                    }
                }
                Stmt::Execute { name, using }
            }
            "DEALLOCATE" => {
                self.pos += 1;
                self.expect_kw("PREPARE")?;
                Stmt::Deallocate {
                    name: self.ident()?.to_lowercase(),
                }
            }
            _ => {
                return Err(ParseError::Unsupported(String::new()));
            }
        };
        self.expect_end()?;
        Ok(stmt)
    }

    fn show(&mut self) -> PResult<Stmt> {
        self.expect_kw("SHOW")?;
        let full = self.eat_kw("FULL");
        if self.eat_kw("PROCESSLIST") {
            return Ok(Stmt::ShowProcessList { full });
        }
        if self.eat_kw("DATABASES") || self.eat_kw("SCHEMAS") {
            return Ok(Stmt::ShowDatabases);
        }
        if self.eat_kw("TABLES") {
            let db = if self.eat_kw("FROM") || self.eat_kw("IN") {
                Some(self.ident()?)
            } else {
                None
            };
            return Ok(Stmt::ShowTables { db, full });
        }
        if self.eat_kw("SESSION_STATES") {
            return Ok(Stmt::ShowSessionStates);
        }
        if !full && self.eat_kw("CREATE") {
            self.expect_kw("TABLE")?;
            let t = self.table_name()?;
            return Ok(Stmt::ShowCreateTable(t));
        }
        if self.eat_kw("WARNINGS") || self.eat_kw("ERRORS") {
            return Ok(Stmt::ShowWarnings);
        }
        let global = if self.eat_kw("GLOBAL") {
            true
        } else {
            let _ = self.eat_kw("SESSION") || self.eat_kw("LOCAL");
            false
        };
        if self.eat_kw("VARIABLES") {
            let like = if self.eat_kw("LIKE") {
                Some(self.string_lit()?)
            } else {
                None
            };
            return Ok(Stmt::ShowVariables { global, like });
        }
        self.unsupported("")
    }

    fn create(&mut self) -> PResult<Stmt> {
        self.expect_kw("CREATE")?;
        if self.eat_kw("DATABASE") || self.eat_kw("SCHEMA") {
            let if_not_exists = self.if_not_exists()?;
            let name = self.ident()?;
            self.skip_options();
            return Ok(Stmt::CreateDatabase {
                name,
                if_not_exists,
            });
        }
        let unique = self.eat_kw("UNIQUE");
        if self.eat_kw("INDEX") || self.eat_kw("KEY") {
            let name = self.ident()?;
            self.expect_kw("ON")?;
            let table = self.table_name()?;
            let columns = self.index_columns()?;
            self.skip_options();
            return Ok(Stmt::CreateIndex {
                table,
                index: IndexDef {
                    name,
                    columns,
                    unique,
                },
            });
        }
        if unique || !self.eat_kw("TABLE") {
            return self.unsupported("");
        }
        let if_not_exists = self.if_not_exists()?;
        let table = self.table_name()?;
        self.expect_op("(")?;
        let mut columns = Vec::new();
        let mut primary_key = None;
        let mut indexes = Vec::new();
        loop {
            if self.eat_kw("PRIMARY") {
                self.expect_kw("KEY")?;
                self.expect_op("(")?;
                let col = self.ident()?;
                if !self.is_op(")") {
                    return self.unsupported("a composite primary key");
                }
                self.expect_op(")")?;
                primary_key = Some(col);
            } else if self.is_kw("KEY") || self.is_kw("INDEX") || self.is_kw("UNIQUE") {
                let unique = self.eat_kw("UNIQUE");
                if !self.eat_kw("KEY") {
                    self.eat_kw("INDEX");
                }
                let name = match self.peek() {
                    Some(Tok::Op("(")) => String::new(),
                    _ => self.ident()?,
                };
                let columns = self.index_columns()?;
                let name = if name.is_empty() {
                    columns[0].clone()
                } else {
                    name
                };
                indexes.push(IndexDef {
                    name,
                    columns,
                    unique,
                });
            } else {
                columns.push(self.column_def()?);
            }
            if self.eat_op(")") {
                break;
            }
            self.expect_op(",")?;
        }
        self.skip_options();
        Ok(Stmt::CreateTable(CreateTable {
            table,
            if_not_exists,
            columns,
            primary_key,
            indexes,
        }))
    }

    /// `(col [(len)] [ASC|DESC], ...)` of an index.
    fn index_columns(&mut self) -> PResult<Vec<String>> {
        self.expect_op("(")?;
        let mut cols = Vec::new();
        loop {
            cols.push(self.ident()?);
            if self.eat_op("(") {
                self.bump();
                self.expect_op(")")?;
            }
            if !self.eat_kw("ASC") {
                self.eat_kw("DESC");
            }
            if !self.eat_op(",") {
                break;
            }
        }
        self.expect_op(")")?;
        Ok(cols)
    }

    /// Table and database options (`ENGINE=...`, `DEFAULT CHARSET=...`) have
    /// no effect in the double.
    fn skip_options(&mut self) {
        while !self.at_end() {
            self.bump();
        }
    }

    fn if_not_exists(&mut self) -> PResult<bool> {
        if self.eat_kw("IF") {
            self.expect_kw("NOT")?;
            self.expect_kw("EXISTS")?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn if_exists(&mut self) -> PResult<bool> {
        if self.eat_kw("IF") {
            self.expect_kw("EXISTS")?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn column_def(&mut self) -> PResult<ColumnDef> {
        let name = self.ident()?;
        let ty_name = match self.bump() {
            Some(Tok::Word(w)) => w.to_ascii_uppercase(),
            _ => return self.err(),
        };
        let len = if self.eat_op("(") {
            let n = match self.bump() {
                Some(Tok::Num(n)) => n.parse::<u32>().ok(),
                _ => None,
            };
            // DECIMAL(10, 2)
            if self.eat_op(",") {
                self.bump();
            }
            self.expect_op(")")?;
            n
        } else {
            None
        };
        let ty = match ty_name.as_str() {
            "TINYINT" | "BOOL" | "BOOLEAN" => ColType::Int(8),
            "SMALLINT" => ColType::Int(16),
            "MEDIUMINT" => ColType::Int(24),
            "INT" | "INTEGER" => ColType::Int(32),
            "BIGINT" => ColType::BigInt,
            "DOUBLE" | "FLOAT" | "REAL" | "DECIMAL" | "NUMERIC" => ColType::Double,
            "VARCHAR" | "CHAR" | "VARBINARY" | "BINARY" => ColType::Varchar(len.unwrap_or(1)),
            "TEXT" | "MEDIUMTEXT" | "LONGTEXT" | "TINYTEXT" | "BLOB" | "MEDIUMBLOB"
            | "LONGBLOB" => ColType::Text,
            other => return self.unsupported(&format!("column type {other}")),
        };
        let mut def = ColumnDef {
            name,
            ty,
            primary_key: false,
            auto_increment: false,
            not_null: false,
            default: None,
        };
        loop {
            if self.eat_kw("UNSIGNED") || self.eat_kw("SIGNED") || self.eat_kw("ZEROFILL") {
                continue;
            }
            if self.eat_kw("PRIMARY") {
                self.expect_kw("KEY")?;
                def.primary_key = true;
            } else if self.eat_kw("KEY") {
                def.primary_key = true;
            } else if self.eat_kw("AUTO_INCREMENT") || self.eat_kw("AUTO_RANDOM") {
                def.auto_increment = true;
            } else if self.eat_kw("NOT") {
                self.expect_kw("NULL")?;
                def.not_null = true;
            } else if self.eat_kw("NULL") {
            } else if self.eat_kw("DEFAULT") {
                let e = self.primary()?;
                match e {
                    Expr::Lit(v) => def.default = Some(v),
                    Expr::Neg(inner) => match *inner {
                        Expr::Lit(Value::Int(i)) => def.default = Some(Value::Int(-i)),
                        Expr::Lit(Value::Double(d)) => def.default = Some(Value::Double(-d)),
                        _ => return self.unsupported("a non-literal DEFAULT"),
                    },
                    _ => return self.unsupported("a non-literal DEFAULT"),
                }
            } else if self.eat_kw("COMMENT") {
                self.string_lit()?;
            } else if self.eat_kw("CHARACTER") {
                self.expect_kw("SET")?;
                self.ident()?;
            } else if self.eat_kw("CHARSET") || self.eat_kw("COLLATE") {
                self.ident()?;
            } else if self.eat_kw("UNIQUE") {
                return self.unsupported("unique keys");
            } else {
                break;
            }
        }
        Ok(def)
    }

    fn drop_stmt(&mut self) -> PResult<Stmt> {
        self.expect_kw("DROP")?;
        if self.eat_kw("DATABASE") || self.eat_kw("SCHEMA") {
            let if_exists = self.if_exists()?;
            let name = self.ident()?;
            return Ok(Stmt::DropDatabase { name, if_exists });
        }
        if self.eat_kw("PREPARE") {
            return Ok(Stmt::Deallocate {
                name: self.ident()?.to_lowercase(),
            });
        }
        if !self.eat_kw("TABLE") {
            return self.unsupported("");
        }
        let if_exists = self.if_exists()?;
        let mut tables = vec![self.table_name()?];
        while self.eat_op(",") {
            tables.push(self.table_name()?);
        }
        Ok(Stmt::DropTable { tables, if_exists })
    }

    fn insert(&mut self) -> PResult<Insert> {
        self.expect_kw("INSERT")?;
        if self.is_kw("IGNORE") {
            return self.unsupported("INSERT IGNORE");
        }
        self.eat_kw("INTO");
        let table = self.table_name()?;
        let columns = if self.eat_op("(") {
            let mut cols = vec![self.ident()?];
            while self.eat_op(",") {
                cols.push(self.ident()?);
            }
            self.expect_op(")")?;
            Some(cols)
        } else {
            None
        };
        if !(self.eat_kw("VALUES") || self.eat_kw("VALUE")) {
            return self.unsupported("INSERT without VALUES");
        }
        let mut rows = Vec::new();
        loop {
            self.expect_op("(")?;
            let mut row = Vec::new();
            if !self.is_op(")") {
                row.push(self.expr()?);
                while self.eat_op(",") {
                    row.push(self.expr()?);
                }
            }
            self.expect_op(")")?;
            rows.push(row);
            if !self.eat_op(",") {
                break;
            }
        }
        if self.is_kw("ON") {
            return self.unsupported("ON DUPLICATE KEY UPDATE");
        }
        Ok(Insert {
            table,
            columns,
            rows,
        })
    }

    fn update(&mut self) -> PResult<Update> {
        self.expect_kw("UPDATE")?;
        let table = self.table_name()?;
        self.expect_kw("SET")?;
        let mut sets = Vec::new();
        loop {
            let mut col = self.ident()?;
            if self.eat_op(".") {
                col = self.ident()?;
            }
            self.expect_op("=")?;
            sets.push((col, self.expr()?));
            if !self.eat_op(",") {
                break;
            }
        }
        let filter = if self.eat_kw("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        let limit = if self.eat_kw("LIMIT") {
            Some(self.primary()?)
        } else {
            None
        };
        Ok(Update {
            table,
            sets,
            filter,
            limit,
        })
    }

    fn delete(&mut self) -> PResult<Delete> {
        self.expect_kw("DELETE")?;
        self.expect_kw("FROM")?;
        let table = self.table_name()?;
        let filter = if self.eat_kw("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        let limit = if self.eat_kw("LIMIT") {
            Some(self.primary()?)
        } else {
            None
        };
        Ok(Delete {
            table,
            filter,
            limit,
        })
    }

    fn select(&mut self) -> PResult<Select> {
        self.expect_kw("SELECT")?;
        let distinct = self.eat_kw("DISTINCT");
        if !distinct {
            self.eat_kw("ALL");
        }
        self.eat_kw("SQL_NO_CACHE");
        let mut items = Vec::new();
        loop {
            let qualified_star = matches!(self.peek(), Some(Tok::Word(_) | Tok::Quoted(_)))
                && matches!(self.peek_at(1), Some(Tok::Op(".")))
                && matches!(self.peek_at(2), Some(Tok::Op("*")));
            if qualified_star {
                let t = self.ident()?;
                self.pos += 2;
                items.push(SelectItem::TableStar(t));
            } else if self.eat_op("*") {
                items.push(SelectItem::Star);
            } else {
                let start = self.pos;
                let expr = self.expr()?;
                let end = self.pos;
                let name = if self.eat_kw("AS") {
                    match self.bump() {
                        Some(Tok::Word(w) | Tok::Quoted(w) | Tok::Str(w)) => w.clone(),
                        _ => return self.err(),
                    }
                } else {
                    match self.peek() {
                        Some(Tok::Quoted(w) | Tok::Str(w)) => {
                            let w = w.clone();
                            self.pos += 1;
                            w
                        }
                        Some(Tok::Word(w)) if !is_reserved(w) => {
                            let w = w.clone();
                            self.pos += 1;
                            w
                        }
                        _ => {
                            let text = &self.sql[self.toks[start].start..self.toks[end - 1].end];
                            match &expr {
                                // A column's name is the column, not `t.c`.
                                Expr::Column(c) => bare_column(c).to_string(),
                                // MySQL names a string literal column by its value.
                                Expr::Lit(Value::Str(s)) => s.clone(),
                                _ => text.to_string(),
                            }
                        }
                    }
                };
                items.push(SelectItem::Expr { expr, name });
            }
            if !self.eat_op(",") {
                break;
            }
        }
        let (mut alias, mut join) = (None, None);
        let from = if self.eat_kw("FROM") {
            if self.eat_kw("DUAL") {
                None
            } else {
                let t = self.table_name()?;
                alias = self.alias()?;
                join = self.join()?.map(Box::new);
                if self.is_op(",")
                    || self.is_kw("JOIN")
                    || self.is_kw("LEFT")
                    || self.is_kw("INNER")
                    || self.is_kw("RIGHT")
                    || self.is_kw("CROSS")
                {
                    return self.unsupported("joins of more than two tables");
                }
                Some(t)
            }
        } else {
            None
        };
        let filter = if self.eat_kw("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        let mut group_by = Vec::new();
        if self.eat_kw("GROUP") {
            self.expect_kw("BY")?;
            loop {
                group_by.push(self.expr()?);
                if !self.eat_op(",") {
                    break;
                }
            }
        }
        let having = if self.eat_kw("HAVING") {
            Some(self.expr()?)
        } else {
            None
        };
        let mut order_by = Vec::new();
        if self.eat_kw("ORDER") {
            self.expect_kw("BY")?;
            loop {
                let e = self.expr()?;
                let desc = if self.eat_kw("DESC") {
                    true
                } else {
                    self.eat_kw("ASC");
                    false
                };
                order_by.push((e, desc));
                if !self.eat_op(",") {
                    break;
                }
            }
        }
        let (mut limit, mut offset) = (None, None);
        if self.eat_kw("LIMIT") {
            let a = self.primary()?;
            if self.eat_op(",") {
                offset = Some(a);
                limit = Some(self.primary()?);
            } else if self.eat_kw("OFFSET") {
                limit = Some(a);
                offset = Some(self.primary()?);
            } else {
                limit = Some(a);
            }
        }
        if self.eat_kw("FOR") {
            // FOR UPDATE: snapshot reads, writes conflict at commit.
            self.expect_kw("UPDATE")?;
        } else if self.is_kw("LOCK") {
            return self.unsupported("LOCK IN SHARE MODE");
        }
        Ok(Select {
            distinct,
            items,
            from,
            alias,
            join,
            filter,
            group_by,
            having,
            order_by,
            limit,
            offset,
        })
    }

    /// A table alias: `AS x` or a bare word that is not a keyword.
    fn alias(&mut self) -> PResult<Option<String>> {
        if self.eat_kw("AS") {
            return self.ident().map(Some);
        }
        match self.peek() {
            Some(Tok::Word(w)) if !is_reserved(w) => {
                let w = w.clone();
                self.pos += 1;
                Ok(Some(w))
            }
            Some(Tok::Quoted(w)) => {
                let w = w.clone();
                self.pos += 1;
                Ok(Some(w))
            }
            _ => Ok(None),
        }
    }

    /// The join after the FROM table, if any.
    fn join(&mut self) -> PResult<Option<Join>> {
        let left = if self.eat_op(",") {
            let table = self.table_name()?;
            let alias = self.alias()?;
            return Ok(Some(Join {
                left: false,
                table,
                alias,
                on: None,
            }));
        } else if self.eat_kw("LEFT") {
            self.eat_kw("OUTER");
            true
        } else {
            if self.is_kw("RIGHT") || self.is_kw("NATURAL") || self.is_kw("STRAIGHT_JOIN") {
                return self.unsupported("RIGHT, NATURAL and STRAIGHT joins");
            }
            if !self.eat_kw("INNER") {
                self.eat_kw("CROSS");
            }
            if !self.is_kw("JOIN") {
                return Ok(None);
            }
            false
        };
        self.expect_kw("JOIN")?;
        let table = self.table_name()?;
        let alias = self.alias()?;
        let on = if self.eat_kw("ON") {
            Some(self.expr()?)
        } else if self.is_kw("USING") {
            return self.unsupported("JOIN ... USING");
        } else if left {
            // LEFT JOIN needs a condition, as MySQL says.
            return self.err();
        } else {
            None
        };
        Ok(Some(Join {
            left,
            table,
            alias,
            on,
        }))
    }

    fn set(&mut self) -> PResult<Stmt> {
        self.expect_kw("SET")?;
        if self.eat_kw("SESSION_STATES") {
            let s = self.string_lit()?;
            return Ok(Stmt::SetSessionStates(s));
        }
        // SET [GLOBAL|SESSION] TRANSACTION ...
        let tx_at =
            usize::from(self.is_kw("GLOBAL") || self.is_kw("SESSION") || self.is_kw("LOCAL"));
        if self.is_kw_at(tx_at, "TRANSACTION") {
            self.skip_options();
            return Ok(Stmt::SetTransaction);
        }
        let mut items = Vec::new();
        loop {
            items.push(self.set_item()?);
            if !self.eat_op(",") {
                break;
            }
        }
        Ok(Stmt::Set(items))
    }

    fn set_item(&mut self) -> PResult<SetItem> {
        if self.eat_kw("NAMES") {
            let charset = self.set_word()?;
            let collation = if self.eat_kw("COLLATE") {
                Some(self.set_word()?)
            } else {
                None
            };
            return Ok(SetItem::Names {
                charset,
                collation,
                character_set: false,
            });
        }
        if self.is_kw("CHARACTER") && self.is_kw_at(1, "SET") {
            self.pos += 2;
            let charset = self.set_word()?;
            return Ok(SetItem::Names {
                charset,
                collation: None,
                character_set: true,
            });
        }
        if self.is_kw("CHARSET") {
            self.pos += 1;
            let charset = self.set_word()?;
            return Ok(SetItem::Names {
                charset,
                collation: None,
                character_set: true,
            });
        }
        if let Some(Tok::UserVar(name)) = self.peek() {
            self.pos += 1;
            if !(self.eat_op("=") || self.eat_op(":=")) {
                return self.err();
            }
            return Ok(SetItem::UserVar {
                name: name.clone(),
                value: self.expr()?,
            });
        }
        let (global, name) = match self.peek() {
            Some(Tok::SysVar(v)) => {
                self.pos += 1;
                split_sysvar(v)
            }
            Some(Tok::Word(w)) => {
                let upper = w.to_ascii_uppercase();
                let global = match upper.as_str() {
                    "GLOBAL" => {
                        self.pos += 1;
                        true
                    }
                    "SESSION" | "LOCAL" => {
                        self.pos += 1;
                        false
                    }
                    _ => false,
                };
                let mut name = self.ident()?.to_lowercase();
                // `SET SESSION x.y`? Only plain names.
                if self.eat_op(".") {
                    name = self.ident()?.to_lowercase();
                }
                (global, name)
            }
            Some(Tok::Quoted(_)) => (false, self.ident()?.to_lowercase()),
            _ => return self.err(),
        };
        if !(self.eat_op("=") || self.eat_op(":=")) {
            return self.err();
        }
        let value = if self.is_kw("DEFAULT") && self.peek_at(1).is_none_or(|t| *t == Tok::Op(",")) {
            self.pos += 1;
            None
        } else if let Some(Tok::Word(w)) = self.peek()
            && self.peek_at(1).is_none_or(|t| *t == Tok::Op(","))
            && !matches!(w.to_ascii_uppercase().as_str(), "NULL" | "TRUE" | "FALSE")
        {
            // `SET autocommit = ON`, `SET sql_mode = ANSI`: a bare word is a value.
            let w = w.clone();
            self.pos += 1;
            Some(Expr::Lit(Value::Str(w)))
        } else {
            Some(self.expr()?)
        };
        Ok(SetItem::SysVar {
            global,
            name,
            value,
        })
    }

    fn set_word(&mut self) -> PResult<String> {
        match self.bump() {
            Some(Tok::Word(w) | Tok::Quoted(w) | Tok::Str(w)) => Ok(w.to_lowercase()),
            _ => self.err(),
        }
    }

    // Expressions, lowest precedence first.

    fn expr(&mut self) -> PResult<Expr> {
        let mut left = self.and_expr()?;
        while self.eat_kw("OR") || self.eat_op("||") {
            let right = self.and_expr()?;
            left = Expr::Bin(BinOp::Or, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_expr(&mut self) -> PResult<Expr> {
        let mut left = self.not_expr()?;
        while self.eat_kw("AND") || self.eat_op("&&") {
            let right = self.not_expr()?;
            left = Expr::Bin(BinOp::And, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not_expr(&mut self) -> PResult<Expr> {
        if self.eat_kw("NOT") {
            return Ok(Expr::Not(Box::new(self.not_expr()?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> PResult<Expr> {
        let left = self.additive()?;
        let op = match self.peek() {
            Some(Tok::Op("=")) => Some(BinOp::Eq),
            Some(Tok::Op("<=>")) => Some(BinOp::NullSafeEq),
            Some(Tok::Op("<>" | "!=")) => Some(BinOp::Ne),
            Some(Tok::Op("<")) => Some(BinOp::Lt),
            Some(Tok::Op("<=")) => Some(BinOp::Le),
            Some(Tok::Op(">")) => Some(BinOp::Gt),
            Some(Tok::Op(">=")) => Some(BinOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            self.pos += 1;
            let right = self.additive()?;
            return Ok(Expr::Bin(op, Box::new(left), Box::new(right)));
        }
        if self.eat_kw("IS") {
            let not = self.eat_kw("NOT");
            self.expect_kw("NULL")?;
            return Ok(Expr::IsNull(Box::new(left), not));
        }
        let not = if self.is_kw("NOT")
            && (self.is_kw_at(1, "BETWEEN") || self.is_kw_at(1, "IN") || self.is_kw_at(1, "LIKE"))
        {
            self.pos += 1;
            true
        } else {
            false
        };
        if self.eat_kw("BETWEEN") {
            let lo = self.additive()?;
            self.expect_kw("AND")?;
            let hi = self.additive()?;
            return Ok(Expr::Between(
                Box::new(left),
                Box::new(lo),
                Box::new(hi),
                not,
            ));
        }
        if self.eat_kw("IN") {
            self.expect_op("(")?;
            if self.is_kw("SELECT") {
                let sub = self.select()?;
                self.expect_op(")")?;
                return Ok(Expr::InSubquery(Box::new(left), Box::new(sub), not));
            }
            let mut list = vec![self.expr()?];
            while self.eat_op(",") {
                list.push(self.expr()?);
            }
            self.expect_op(")")?;
            return Ok(Expr::InList(Box::new(left), list, not));
        }
        if self.eat_kw("LIKE") {
            let pat = self.additive()?;
            return Ok(Expr::Like(Box::new(left), Box::new(pat), not));
        }
        if not {
            return self.err();
        }
        Ok(left)
    }

    fn additive(&mut self) -> PResult<Expr> {
        let mut left = self.multiplicative()?;
        loop {
            let op = if self.eat_op("+") {
                BinOp::Add
            } else if self.eat_op("-") {
                BinOp::Sub
            } else {
                break;
            };
            let right = self.multiplicative()?;
            left = Expr::Bin(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn multiplicative(&mut self) -> PResult<Expr> {
        let mut left = self.unary()?;
        loop {
            let op = if self.eat_op("*") {
                BinOp::Mul
            } else if self.eat_op("/") {
                BinOp::Div
            } else if self.eat_op("%") || self.eat_kw("MOD") {
                BinOp::Mod
            } else if self.eat_kw("DIV") {
                BinOp::IntDiv
            } else {
                break;
            };
            let right = self.unary()?;
            left = Expr::Bin(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> PResult<Expr> {
        if self.eat_op("-") {
            return Ok(match self.unary()? {
                Expr::Lit(Value::Int(i)) => Expr::Lit(Value::Int(-i)),
                Expr::Lit(Value::UInt(u)) if u == 1 << 63 => Expr::Lit(Value::Int(i64::MIN)),
                Expr::Lit(Value::Double(d)) => Expr::Lit(Value::Double(-d)),
                e => Expr::Neg(Box::new(e)),
            });
        }
        if self.eat_op("+") {
            return self.unary();
        }
        if self.eat_op("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> PResult<Expr> {
        let Some(tok) = self.bump() else {
            return self.err();
        };
        Ok(match tok {
            Tok::Num(n) => Expr::Lit(parse_num(n)),
            Tok::Str(s) => Expr::Lit(Value::Str(s.clone())),
            Tok::Param => {
                let i = self.params;
                self.params += 1;
                Expr::Param(i)
            }
            Tok::UserVar(v) => Expr::UserVar(v.clone()),
            Tok::SysVar(v) => {
                let (global, name) = split_sysvar(v);
                Expr::SysVar { global, name }
            }
            Tok::Op("(") if self.is_kw("SELECT") => {
                let sub = self.select()?;
                self.expect_op(")")?;
                Expr::Subquery(Box::new(sub))
            }
            Tok::Op("(") => {
                let e = self.expr()?;
                self.expect_op(")")?;
                e
            }
            Tok::Quoted(w) => self.column_ref(w.clone())?,
            Tok::Word(w) => {
                let upper = w.to_ascii_uppercase();
                match upper.as_str() {
                    "NULL" => return Ok(Expr::Lit(Value::Null)),
                    "TRUE" => return Ok(Expr::Lit(Value::Int(1))),
                    "FALSE" => return Ok(Expr::Lit(Value::Int(0))),
                    "CURRENT_USER" | "CURRENT_TIMESTAMP" | "LOCALTIME" | "LOCALTIMESTAMP"
                        if !self.is_op("(") =>
                    {
                        return Ok(Expr::Func(upper, Vec::new()));
                    }
                    _ => {}
                }
                if self.eat_op("(") {
                    if upper == "COUNT" && self.eat_op("*") {
                        self.expect_op(")")?;
                        return Ok(Expr::CountStar);
                    }
                    let mut args = Vec::new();
                    if !self.is_op(")") {
                        args.push(self.expr()?);
                        while self.eat_op(",") {
                            args.push(self.expr()?);
                        }
                    }
                    self.expect_op(")")?;
                    return Ok(Expr::Func(upper, args));
                }
                if is_reserved(w) {
                    self.pos -= 1;
                    return self.err();
                }
                self.column_ref(w.clone())?
            }
            _ => {
                self.pos -= 1;
                return self.err();
            }
        })
    }

    fn column_ref(&mut self, first: String) -> PResult<Expr> {
        // `c`, `t.c` or `db.t.c`: the table qualifier names a join's side;
        // the database adds nothing (the two tables differ by name or alias).
        let mut parts = vec![first];
        while self.eat_op(".") {
            parts.push(self.ident()?);
        }
        let n = parts.len();
        Ok(Expr::Column(if n == 1 {
            parts.remove(0)
        } else {
            format!("{}.{}", parts[n - 2], parts[n - 1])
        }))
    }
}

fn split_sysvar(v: &str) -> (bool, String) {
    let lower = v.to_lowercase();
    if let Some(rest) = lower.strip_prefix("global.") {
        (true, rest.to_string())
    } else if let Some(rest) = lower
        .strip_prefix("session.")
        .or_else(|| lower.strip_prefix("local."))
    {
        (false, rest.to_string())
    } else {
        (false, lower)
    }
}

fn parse_num(n: &str) -> Value {
    if n.contains(['.', 'e', 'E']) {
        return Value::Double(n.parse().unwrap_or(0.0));
    }
    match n.parse::<i64>() {
        Ok(i) => Value::Int(i),
        Err(_) => match n.parse::<u64>() {
            Ok(u) => Value::UInt(u),
            Err(_) => Value::Double(n.parse().unwrap_or(0.0)),
        },
    }
}

/// A column reference without its table qualifier: `c` of `t.c`.
pub fn bare_column(c: &str) -> &str {
    c.rsplit('.').next().unwrap_or(c)
}

/// Words that end an expression or a select item (so are not aliases).
fn is_reserved(w: &str) -> bool {
    const RESERVED: &[&str] = &[
        "FROM",
        "WHERE",
        "ORDER",
        "LIMIT",
        "GROUP",
        "HAVING",
        "FOR",
        "LOCK",
        "AND",
        "OR",
        "NOT",
        "AS",
        "ON",
        "JOIN",
        "LEFT",
        "RIGHT",
        "INNER",
        "UNION",
        "BY",
        "ASC",
        "DESC",
        "OFFSET",
        "IS",
        "IN",
        "BETWEEN",
        "LIKE",
        "SET",
        "VALUES",
        "INTO",
        "SELECT",
        "DIV",
        "MOD",
        "USING",
        "INTERVAL",
        "OUTER",
        "CROSS",
        "NATURAL",
        "STRAIGHT_JOIN",
    ];
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Parsed {
        let mut v = parse(sql, false).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    #[test]
    fn selects_name_their_columns_by_source_text() {
        let p = one("select @@version_comment limit 1");
        let Stmt::Select(s) = p.stmt else { panic!() };
        assert_eq!(
            s.items,
            vec![SelectItem::Expr {
                expr: Expr::SysVar {
                    global: false,
                    name: "version_comment".into()
                },
                name: "@@version_comment".into()
            }]
        );
        assert_eq!(s.limit, Some(Expr::Lit(Value::Int(1))));
        let p = one("SELECT @@max_allowed_packet,@@wait_timeout");
        let Stmt::Select(s) = p.stmt else { panic!() };
        assert_eq!(s.items.len(), 2);
        let p = one("SELECT 1 + 2 AS three, 'x' y");
        let Stmt::Select(s) = p.stmt else { panic!() };
        let names: Vec<_> = s
            .items
            .iter()
            .map(|i| match i {
                SelectItem::Expr { name, .. } => name.clone(),
                SelectItem::Star | SelectItem::TableStar(_) => "*".into(),
            })
            .collect();
        assert_eq!(names, vec!["three", "y"]);
    }

    #[test]
    fn placeholders_are_counted_in_order() {
        let p = one("UPDATE t SET c = c + ? WHERE id = ?");
        assert_eq!(p.params, 2);
        let Stmt::Update(u) = p.stmt else { panic!() };
        assert_eq!(
            u.sets[0].1,
            Expr::Bin(
                BinOp::Add,
                Box::new(Expr::Column("c".into())),
                Box::new(Expr::Param(0))
            )
        );
    }

    #[test]
    fn strings_unescape_both_ways() {
        let p = one(r#"SET SESSION_STATES '{"a":"it\'s \\ ok"}'"#);
        assert_eq!(
            p.stmt,
            Stmt::SetSessionStates(r#"{"a":"it's \ ok"}"#.into())
        );
        let p = parse(r"SET @a = 'x\y''z'", true).unwrap().remove(0);
        assert_eq!(
            p.stmt,
            Stmt::Set(vec![SetItem::UserVar {
                name: "a".into(),
                value: Expr::Lit(Value::Str(r"x\y'z".into()))
            }])
        );
    }

    #[test]
    fn multi_statements_split_on_semicolons() {
        let v = parse("BEGIN; INSERT INTO t VALUES (1, 'a;b'); COMMIT;", false).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].text, "INSERT INTO t VALUES (1, 'a;b')");
        assert_eq!(parse(" ; ", false).unwrap_err().code, 1065);
    }

    #[test]
    fn create_table_and_set_forms() {
        let p = one(
            "CREATE TABLE IF NOT EXISTS d.t (id BIGINT NOT NULL AUTO_INCREMENT, v VARCHAR(32) DEFAULT 'x', n INT, PRIMARY KEY (id)) ENGINE=InnoDB",
        );
        let Stmt::CreateTable(c) = p.stmt else {
            panic!()
        };
        assert_eq!(c.primary_key.as_deref(), Some("id"));
        assert_eq!(c.columns[1].ty, ColType::Varchar(32));
        let p = one(
            "SET NAMES utf8mb4 COLLATE utf8mb4_general_ci, autocommit = ON, @@session.sql_mode = DEFAULT",
        );
        let Stmt::Set(items) = p.stmt else { panic!() };
        assert_eq!(items.len(), 3);
        assert_eq!(
            items[1],
            SetItem::SysVar {
                global: false,
                name: "autocommit".into(),
                value: Some(Expr::Lit(Value::Str("ON".into())))
            }
        );
        assert_eq!(
            items[2],
            SetItem::SysVar {
                global: false,
                name: "sql_mode".into(),
                value: None
            }
        );
    }

    #[test]
    fn sysbench_prepare_and_run_shapes_parse() {
        // oltp_common.lua's prepare, as sysbench 1.0.20 sends it.
        let p = one(
            "CREATE TABLE sbtest1(\n  id INTEGER NOT NULL AUTO_INCREMENT,\n  k INTEGER DEFAULT '0' NOT NULL,\n  c CHAR(120) DEFAULT '' NOT NULL,\n  pad CHAR(60) DEFAULT '' NOT NULL,\n  PRIMARY KEY (id)\n) /*! ENGINE = innodb */ ",
        );
        let Stmt::CreateTable(c) = p.stmt else {
            panic!()
        };
        assert_eq!(c.columns.len(), 4);
        let p = one("CREATE INDEX k_1 ON sbtest1(k)");
        assert_eq!(
            p.stmt,
            Stmt::CreateIndex {
                table: TableName {
                    db: None,
                    name: "sbtest1".into()
                },
                index: IndexDef {
                    name: "k_1".into(),
                    columns: vec!["k".into()],
                    unique: false
                }
            }
        );
        let p = one(
            "CREATE TABLE t (id INT PRIMARY KEY, a INT, b INT, KEY (a), UNIQUE KEY ab (a, b DESC))",
        );
        let Stmt::CreateTable(c) = p.stmt else {
            panic!()
        };
        assert_eq!(c.indexes.len(), 2);
        assert_eq!(c.indexes[0].name, "a");
        assert!(c.indexes[1].unique);
        assert_eq!(c.indexes[1].columns, ["a", "b"]);
        let p = one("SELECT DISTINCT c FROM sbtest1 WHERE id BETWEEN ? AND ? ORDER BY c");
        let Stmt::Select(s) = p.stmt else { panic!() };
        assert!(s.distinct);
        assert_eq!(p.params, 2);
        assert!(parse("CREATE UNIQUE TABLE t (id INT)", false).is_err());
    }

    #[test]
    fn unsupported_statements_say_so() {
        let e = parse("SELECT a FROM t, u, v", false).unwrap_err();
        assert_eq!(e.code, 1105);
        assert!(e.message.contains("unsupported in the TiDB double"), "{e}");
        let e = parse("ALTER TABLE t ADD c INT", false).unwrap_err();
        assert!(e.message.contains("ALTER TABLE t ADD c INT"), "{e}");
    }
}

//! What replay reads from a statement's text: the statement a command
//! runs, TiProxy's read-only rule, whether row order counts (`ORDER BY`)
//! for result comparison, and the statement digest failures are grouped by.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::format::{self, Record};

/// The statement a command runs: its text, or its prepared statement's.
pub(super) fn statement(rec: &Record) -> String {
    match rec.payload[0] {
        format::COM_QUERY | 0x16 => String::from_utf8_lossy(&rec.payload[1..]).into_owned(),
        _ => rec.prepared_stmt.clone(),
    }
}

/// Whether a statement fixes the order of its rows: `ORDER BY` anywhere
/// (in any statement of a multi-statement query).
pub(super) fn has_order_by(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    let words = lower
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty());
    let mut prev = "";
    for w in words {
        if prev == "order" && w == "by" {
            return true;
        }
        prev = w;
    }
    false
}

/// TiProxy's `IsReadOnly` (`pkg/util/lex/filter.go`) by the first words,
/// and its rule for statement commands: read-only when the statement was
/// prepared (a writing one never is).
pub(super) fn is_read_only(rec: &Record, ps: &HashMap<u32, u32>) -> bool {
    match rec.payload[0] {
        format::COM_QUERY | 0x16 => is_read_only_sql(&rec.payload[1..]),
        0x17..=0x1a | 0x1c => {
            ps.contains_key(&rec.ps_id)
                || (!rec.prepared_stmt.is_empty() && is_read_only_sql(rec.prepared_stmt.as_bytes()))
        }
        // COM_CREATE_DB, COM_DROP_DB, COM_DELAYED_INSERT.
        0x05 | 0x06 | 0x10 => false,
        _ => true,
    }
}

fn is_read_only_sql(sql: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&sql[..sql.len().min(4096)]).to_ascii_lowercase();
    let words: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '@' || c == '.'))
        .filter(|w| !w.is_empty())
        .collect();
    match words.first().copied().unwrap_or("") {
        "select" => !words.windows(2).any(|w| w == ["for", "update"]),
        "show" | "with" | "use" | "desc" | "describe" | "table" | "do" | "begin" | "commit"
        | "rollback" => true,
        "start" => words.get(1) == Some(&"transaction"),
        "set" => match words.get(1).copied().unwrap_or("") {
            "session_states" | "session" | "names" | "char" | "charset" | "character"
            | "transaction" => true,
            w if w.starts_with("@@global.") => false,
            w => w.starts_with('@'),
        },
        _ => false,
    }
}

/// A statement's digest: SHA-256 of its text with literals replaced by
/// `?`, white space collapsed and keywords lower-cased (TiDB's digest
/// normalizes the same way with its full parser).
pub fn digest(sql: &str) -> String {
    let mut norm = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut space = false;
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let mut esc = false;
                for d in chars.by_ref() {
                    if esc {
                        esc = false;
                    } else if d == '\\' {
                        esc = true;
                    } else if d == c {
                        break;
                    }
                }
                norm.push('?');
            }
            c if c.is_ascii_digit()
                && !norm
                    .chars()
                    .last()
                    .is_some_and(|p| p.is_ascii_alphanumeric() || p == '_') =>
            {
                while chars
                    .peek()
                    .is_some_and(|d| d.is_ascii_alphanumeric() || *d == '.')
                {
                    chars.next();
                }
                norm.push('?');
            }
            c if c.is_whitespace() => {
                space = true;
                continue;
            }
            c => {
                if space && !norm.is_empty() {
                    norm.push(' ');
                }
                norm.push(c.to_ascii_lowercase());
            }
        }
        space = false;
    }
    let h = Sha256::digest(norm.as_bytes());
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_statements_as_tiproxy_sees_them() {
        assert!(is_read_only_sql(b"SELECT * FROM t"));
        assert!(!is_read_only_sql(b"select * from t for update"));
        assert!(is_read_only_sql(b"  begin"));
        assert!(is_read_only_sql(b"start transaction"));
        assert!(is_read_only_sql(b"set @a = 1"));
        assert!(is_read_only_sql(b"SET NAMES utf8mb4"));
        assert!(!is_read_only_sql(b"set @@global.x = 1"));
        assert!(!is_read_only_sql(b"set global x = 1"));
        assert!(!is_read_only_sql(b"insert into t values (1)"));
        assert!(!is_read_only_sql(b"update t set a = 1"));
    }

    #[test]
    fn digests_ignore_literals_and_spacing() {
        assert_eq!(
            digest("select * from t where id = 1 and s = 'a'"),
            digest("SELECT *  FROM t WHERE id = 42 and s = 'b\\'c'")
        );
        assert_ne!(digest("select a from t1"), digest("select a from t2"));
        assert_eq!(digest("select 1").len(), 64);
    }

    #[test]
    fn order_by_decides_whether_row_order_counts() {
        assert!(has_order_by("select a from t ORDER  BY a"));
        assert!(has_order_by("select 1; select a from t order\nby a desc"));
        assert!(!has_order_by(
            "select a from t where b = 'order' group by a"
        ));
        assert!(!has_order_by("select border, bypass from t"));
    }
}

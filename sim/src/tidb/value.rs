//! SQL values and the MySQL column types the double reports for them.

use std::cmp::Ordering;
use std::fmt::Write as _;

/// MySQL column type codes (`enum_field_types`) the double sends or reads.
pub mod column_type {
    /// DECIMAL (old).
    pub const DECIMAL: u8 = 0x00;
    /// TINYINT.
    pub const TINY: u8 = 0x01;
    /// SMALLINT.
    pub const SHORT: u8 = 0x02;
    /// INT.
    pub const LONG: u8 = 0x03;
    /// FLOAT.
    pub const FLOAT: u8 = 0x04;
    /// DOUBLE.
    pub const DOUBLE: u8 = 0x05;
    /// NULL.
    pub const NULL: u8 = 0x06;
    /// TIMESTAMP.
    pub const TIMESTAMP: u8 = 0x07;
    /// BIGINT.
    pub const LONGLONG: u8 = 0x08;
    /// MEDIUMINT.
    pub const INT24: u8 = 0x09;
    /// DATE.
    pub const DATE: u8 = 0x0a;
    /// TIME.
    pub const TIME: u8 = 0x0b;
    /// DATETIME.
    pub const DATETIME: u8 = 0x0c;
    /// YEAR.
    pub const YEAR: u8 = 0x0d;
    /// VARCHAR (internal).
    pub const VARCHAR: u8 = 0x0f;
    /// JSON.
    pub const JSON: u8 = 0xf5;
    /// DECIMAL.
    pub const NEWDECIMAL: u8 = 0xf6;
    /// BLOB / TEXT.
    pub const BLOB: u8 = 0xfc;
    /// VARCHAR as sent in result sets.
    pub const VAR_STRING: u8 = 0xfd;
    /// CHAR.
    pub const STRING: u8 = 0xfe;
}

/// Column definition flags.
pub mod column_flag {
    /// NOT NULL.
    pub const NOT_NULL: u16 = 1;
    /// PRIMARY KEY.
    pub const PRI_KEY: u16 = 2;
    /// BLOB or TEXT.
    pub const BLOB: u16 = 0x10;
    /// UNSIGNED.
    pub const UNSIGNED: u16 = 0x20;
    /// BINARY.
    pub const BINARY: u16 = 0x80;
    /// AUTO_INCREMENT.
    pub const AUTO_INCREMENT: u16 = 0x200;
    /// Numeric.
    pub const NUM: u16 = 0x8000;
}

/// utf8mb4_bin, TiDB's default collation.
pub const UTF8MB4_BIN: u16 = 46;
/// binary.
pub const BINARY_COLLATION: u16 = 63;

/// A SQL value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// NULL.
    Null,
    /// A signed integer.
    Int(i64),
    /// An unsigned integer too big for `Int`, or from an unsigned source.
    UInt(u64),
    /// A floating point number.
    Double(f64),
    /// A string (the double keeps text as UTF-8; invalid bytes are replaced).
    Str(String),
}

impl Value {
    /// Whether this is NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The text-protocol form, `None` for NULL.
    pub fn to_text(&self) -> Option<String> {
        match self {
            Value::Null => None,
            Value::Int(i) => Some(i.to_string()),
            Value::UInt(u) => Some(u.to_string()),
            Value::Double(d) => Some(format_double(*d)),
            Value::Str(s) => Some(s.clone()),
        }
    }

    /// The value as a signed integer, as MySQL converts it in arithmetic.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Null => None,
            Value::Int(i) => Some(*i),
            Value::UInt(u) => Some(*u as i64),
            Value::Double(d) => Some(d.round() as i64),
            Value::Str(s) => Some(parse_number_prefix(s).round() as i64),
        }
    }

    /// The value as a float, as MySQL converts it in arithmetic.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Null => None,
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Double(d) => Some(*d),
            Value::Str(s) => Some(parse_number_prefix(s)),
        }
    }

    /// Truthiness in a WHERE clause: NULL and zero are false.
    pub fn is_true(&self) -> bool {
        match self {
            Value::Null => false,
            Value::Int(i) => *i != 0,
            Value::UInt(u) => *u != 0,
            Value::Double(d) => *d != 0.0,
            Value::Str(s) => parse_number_prefix(s) != 0.0,
        }
    }

    /// SQL comparison: `None` when either side is NULL. Numbers compare
    /// numerically, two strings compare as strings (utf8mb4_bin), a string
    /// and a number compare as numbers.
    pub fn sql_cmp(&self, other: &Value) -> Option<Ordering> {
        match (self, other) {
            (Value::Null, _) | (_, Value::Null) => None,
            (Value::Str(a), Value::Str(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            (Value::Int(a), Value::Int(b)) => Some(a.cmp(b)),
            (Value::UInt(a), Value::UInt(b)) => Some(a.cmp(b)),
            (Value::Int(a), Value::UInt(b)) => Some(i128::from(*a).cmp(&i128::from(*b))),
            (Value::UInt(a), Value::Int(b)) => Some(i128::from(*a).cmp(&i128::from(*b))),
            (a, b) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        }
    }

    /// The column type and flags a result column gets for this value.
    pub fn column_type(&self) -> (u8, u16) {
        match self {
            Value::Null => (column_type::NULL, column_flag::BINARY),
            Value::Int(_) => (
                column_type::LONGLONG,
                column_flag::NUM | column_flag::BINARY,
            ),
            Value::UInt(_) => (
                column_type::LONGLONG,
                column_flag::NUM | column_flag::BINARY | column_flag::UNSIGNED,
            ),
            Value::Double(_) => (column_type::DOUBLE, column_flag::NUM | column_flag::BINARY),
            Value::Str(_) => (column_type::VAR_STRING, 0),
        }
    }
}

/// SELECT DISTINCT: the first of each group of equal rows, in order, then
/// `offset` and `limit` (DISTINCT applies before them). Rows are compared
/// by value and type, NULL equal to NULL, as MySQL groups them.
pub fn distinct_rows(rows: Vec<Vec<Value>>, offset: usize, limit: usize) -> Vec<Vec<Value>> {
    let mut seen = std::collections::HashSet::new();
    rows.into_iter()
        .filter(|r| seen.insert(format!("{r:?}")))
        .skip(offset)
        .take(limit)
        .collect()
}

/// Formats a double the way MySQL prints it in the text protocol (shortest
/// round-trip form, no trailing `.0`).
pub fn format_double(d: f64) -> String {
    if d.is_finite() && d == d.trunc() && d.abs() < 1e15 {
        return format!("{}", d as i64);
    }
    let mut s = String::new();
    let _ = write!(s, "{d}");
    s
}

/// MySQL's string-to-number conversion: the longest numeric prefix, 0 if none.
pub fn parse_number_prefix(s: &str) -> f64 {
    let t = s.trim_start();
    let b = t.as_bytes();
    let mut end = 0;
    if end < b.len() && (b[end] == b'-' || b[end] == b'+') {
        end += 1;
    }
    let digits_start = end;
    while end < b.len() && b[end].is_ascii_digit() {
        end += 1;
    }
    if end < b.len() && b[end] == b'.' {
        end += 1;
        while end < b.len() && b[end].is_ascii_digit() {
            end += 1;
        }
    }
    if end == digits_start {
        return 0.0;
    }
    if end < b.len() && (b[end] == b'e' || b[end] == b'E') {
        let mut e = end + 1;
        if e < b.len() && (b[e] == b'-' || b[e] == b'+') {
            e += 1;
        }
        let exp_digits = e;
        while e < b.len() && b[e].is_ascii_digit() {
            e += 1;
        }
        if e > exp_digits {
            end = e;
        }
    }
    t[..end].parse().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_follow_mysql() {
        assert_eq!(
            Value::Int(2).sql_cmp(&Value::Str("10".into())),
            Some(Ordering::Less)
        );
        assert_eq!(
            Value::Str("b".into()).sql_cmp(&Value::Str("a".into())),
            Some(Ordering::Greater)
        );
        assert_eq!(Value::Null.sql_cmp(&Value::Int(1)), None);
        assert_eq!(
            Value::UInt(u64::MAX).sql_cmp(&Value::Int(-1)),
            Some(Ordering::Greater)
        );
    }

    #[test]
    fn number_prefixes() {
        assert_eq!(parse_number_prefix(" 12abc"), 12.0);
        assert_eq!(parse_number_prefix("-1.5e2x"), -150.0);
        assert_eq!(parse_number_prefix("abc"), 0.0);
        assert_eq!(format_double(1.5), "1.5");
        assert_eq!(format_double(3.0), "3");
    }
}

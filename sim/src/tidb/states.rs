//! `SHOW SESSION_STATES` and `SET SESSION_STATES`: a session exported as
//! JSON with TiDB's keys, and imported on another instance so that its
//! variables, current database and prepared statements (same ids) are the
//! same there. The proxy treats the document as opaque except `current-db`.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use super::error::SqlError;
use super::session::{Column, Prepared, ResultSet, Session};
use super::sysvar;
use super::value::Value;

/// TiDB's `SessionStates`, the keys the double carries (all omitted when
/// empty, as TiDB's `omitempty`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct SessionStates {
    #[serde(
        rename = "user-var-values",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    user_var_values: BTreeMap<String, Datum>,
    #[serde(
        rename = "user-var-types",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    user_var_types: BTreeMap<String, FieldType>,
    #[serde(
        rename = "sys-vars",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    sys_vars: BTreeMap<String, String>,
    #[serde(
        rename = "prepared-stmts",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    prepared_stmts: BTreeMap<u32, PreparedStmtInfo>,
    #[serde(
        rename = "prepared-stmt-id",
        default,
        skip_serializing_if = "is_zero_u32"
    )]
    prepared_stmt_id: u32,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    status: u32,
    #[serde(
        rename = "current-db",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    current_db: String,
    #[serde(rename = "found-rows", default, skip_serializing_if = "is_zero_u64")]
    found_rows: u64,
    #[serde(rename = "affected-rows", default, skip_serializing_if = "is_zero_i64")]
    affected_rows: i64,
    #[serde(
        rename = "last-insert-id",
        default,
        skip_serializing_if = "is_zero_u64"
    )]
    last_insert_id: u64,
}

/// TiDB's `PreparedStmtInfo`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PreparedStmtInfo {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
    text: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    db: String,
    /// Base64 of the parameter types (2 bytes each), binary protocol only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    types: String,
}

/// The parts of TiDB's datum JSON the double uses.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Datum {
    k: u8,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    i: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    collation: String,
    /// Base64 bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    b: String,
}

/// The parts of TiDB's FieldType JSON the double writes (ignored on import).
#[derive(Debug, Default, Serialize, Deserialize)]
struct FieldType {
    #[serde(rename = "Tp", default)]
    tp: u8,
    #[serde(rename = "Flag", default)]
    flag: u32,
    #[serde(rename = "Charset", default)]
    charset: String,
    #[serde(rename = "Collate", default)]
    collate: String,
}

const KIND_NULL: u8 = 0;
const KIND_INT64: u8 = 1;
const KIND_UINT64: u8 = 2;
const KIND_FLOAT64: u8 = 4;
const KIND_STRING: u8 = 5;
const KIND_BYTES: u8 = 6;

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

fn to_datum(v: &Value) -> (Datum, FieldType) {
    let (tp, flag) = v.column_type();
    let binary = |d: Datum| {
        (
            d,
            FieldType {
                tp,
                flag: u32::from(flag),
                charset: "binary".into(),
                collate: "binary".into(),
            },
        )
    };
    match v {
        Value::Null => binary(Datum::default()),
        Value::Int(i) => binary(Datum {
            k: KIND_INT64,
            i: *i,
            ..Datum::default()
        }),
        Value::UInt(u) => binary(Datum {
            k: KIND_UINT64,
            i: *u as i64,
            ..Datum::default()
        }),
        Value::Double(d) => binary(Datum {
            k: KIND_FLOAT64,
            i: d.to_bits() as i64,
            ..Datum::default()
        }),
        Value::Str(s) => (
            Datum {
                k: KIND_STRING,
                collation: "utf8mb4_bin".into(),
                b: BASE64.encode(s.as_bytes()),
                ..Datum::default()
            },
            FieldType {
                tp,
                flag: u32::from(flag),
                charset: "utf8mb4".into(),
                collate: "utf8mb4_bin".into(),
            },
        ),
    }
}

fn from_datum(d: &Datum) -> Result<Value, SqlError> {
    Ok(match d.k {
        KIND_NULL => Value::Null,
        KIND_INT64 => Value::Int(d.i),
        KIND_UINT64 => Value::UInt(d.i as u64),
        KIND_FLOAT64 => Value::Double(f64::from_bits(d.i as u64)),
        KIND_STRING | KIND_BYTES => {
            let b = BASE64
                .decode(&d.b)
                .map_err(|e| bad_states(&format!("user variable bytes: {e}")))?;
            Value::Str(String::from_utf8_lossy(&b).into_owned())
        }
        k => return Err(bad_states(&format!("user variable of datum kind {k}"))),
    })
}

fn bad_states(what: &str) -> SqlError {
    SqlError::other(format!("invalid session states: {what}"))
}

impl Session {
    /// SHOW SESSION_STATES, refused (8146) where TiDB refuses it.
    pub(super) fn show_session_states(&mut self) -> Result<ResultSet, SqlError> {
        if self.txn.is_some() {
            return Err(SqlError::cannot_migrate(
                "session has an active transaction",
            ));
        }
        if self.prepared.values().any(|p| !p.long_data.is_empty()) {
            return Err(SqlError::cannot_migrate(
                "prepared statements have bound params",
            ));
        }
        if !self.instance.opts.session_token_signing {
            return Err(SqlError::cannot_migrate(
                "no certificate or key file to sign the data",
            ));
        }
        let states = self.export_states();
        let token = self.cluster.sign_token(&self.user);
        Ok(ResultSet {
            columns: vec![
                Column::json("Session_states"),
                Column::json("Session_token"),
            ],
            rows: vec![vec![Value::Str(states), Value::Str(token)]],
        })
    }

    /// The session as JSON.
    pub fn export_states(&self) -> String {
        let mut st = SessionStates::default();
        for (name, v) in &self.user_vars {
            let (d, t) = to_datum(v);
            st.user_var_values.insert(name.clone(), d);
            st.user_var_types.insert(name.clone(), t);
        }
        for var in sysvar::SYSVARS.iter().filter(|v| v.session_settable()) {
            if let Some(val) = self.sys_var(var.name) {
                st.sys_vars.insert(var.name.to_string(), val);
            }
        }
        for p in self.prepared.values() {
            st.prepared_stmts.insert(
                p.id,
                PreparedStmtInfo {
                    name: p.name.clone().unwrap_or_default(),
                    text: p.parsed.text.clone(),
                    db: p.db.clone(),
                    types: if p.name.is_none() && !p.param_types.is_empty() {
                        BASE64.encode(&p.param_types)
                    } else {
                        String::new()
                    },
                },
            );
        }
        st.prepared_stmt_id = self.last_stmt_id;
        st.status = u32::from(self.status().bits());
        st.current_db = self.db.clone();
        st.found_rows = self.found_rows;
        st.affected_rows = self.affected_rows;
        st.last_insert_id = self.last_insert_id;
        // Serializing maps of strings and numbers cannot fail.
        serde_json::to_string(&st).unwrap_or_default()
    }

    /// SET SESSION_STATES: restores an exported session. Prepared statements
    /// first (same ids), then variables, then the rest, as TiDB orders it.
    pub fn import_states(&mut self, json: &str) -> Result<(), SqlError> {
        let st: SessionStates =
            serde_json::from_str(json).map_err(|e| bad_states(&e.to_string()))?;
        let mut prepared = Vec::new();
        for (id, info) in &st.prepared_stmts {
            let mut parsed = self.parse(&info.text)?;
            if parsed.len() != 1 {
                return Err(bad_states("a prepared statement with several statements"));
            }
            let types = BASE64
                .decode(&info.types)
                .map_err(|e| bad_states(&format!("prepared statement types: {e}")))?;
            prepared.push(Prepared {
                id: *id,
                name: (!info.name.is_empty()).then(|| info.name.to_lowercase()),
                db: info.db.clone(),
                parsed: Arc::new(parsed.remove(0)),
                param_types: types,
                long_data: BTreeMap::new(),
            });
        }
        let mut user_vars = BTreeMap::new();
        for (name, d) in &st.user_var_values {
            user_vars.insert(name.to_lowercase(), from_datum(d)?);
        }
        for p in prepared {
            self.last_stmt_id = self.last_stmt_id.max(p.id);
            self.prepared.insert(p.id, p);
        }
        self.last_stmt_id = self.last_stmt_id.max(st.prepared_stmt_id);
        // TiDB only logs a variable it cannot set; so does the double.
        for (name, value) in &st.sys_vars {
            self.set_session_var(&name.to_lowercase(), value.clone());
        }
        self.user_vars.extend(user_vars);
        if !st.current_db.is_empty() {
            self.db = st.current_db.clone();
        }
        self.found_rows = st.found_rows;
        self.affected_rows = st.affected_rows;
        self.last_insert_id = st.last_insert_id;
        Ok(())
    }
}

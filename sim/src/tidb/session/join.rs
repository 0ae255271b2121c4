//! Two-table joins (`[INNER] JOIN`, `LEFT [OUTER] JOIN`, a comma) for
//! SELECT. The joined rows form a virtual table whose columns are named
//! `q.c` (q: the table's alias, else its name), so WHERE, GROUP BY,
//! ORDER BY and LIMIT run over it with the single-table machinery, and a
//! column reference resolves as `q.c` or, when only one side has it, as `c`
//! ([`TableSchema::column`]). A nested loop over both tables' snapshot rows:
//! the double's tables are small, and a join too large for it says so.

use std::ops::Range;
use std::sync::Arc;

use super::super::error::SqlError;
use super::super::sql::{Join, Select, TableName};
use super::super::store::{ColumnSchema, TableSchema};
use super::super::value::Value;
use super::query::VirtualTable;
use super::{Ctx, Session};

/// The most row pairs a join examines (a cross join of two 2,000-row
/// tables); more is refused rather than left to run for minutes.
const MAX_JOIN_PAIRS: usize = 4_000_000;

/// The virtual table of a join: its schema, and the two tables'.
pub(super) struct Joined {
    /// Columns of both tables, named `q.c`.
    pub schema: Arc<TableSchema>,
    left: Arc<TableSchema>,
    right: Arc<TableSchema>,
}

impl Session {
    /// The schema of `from` joined with `join`.
    pub(super) fn join_schema(
        &self,
        from: &TableName,
        alias: Option<&str>,
        join: &Join,
        ctx: &Ctx<'_>,
    ) -> Result<Joined, SqlError> {
        let left = self.schema_of(from, ctx)?;
        let right = self.schema_of(&join.table, ctx)?;
        let lq = alias.unwrap_or(&from.name);
        let rq = join.alias.as_deref().unwrap_or(&join.table.name);
        if lq.eq_ignore_ascii_case(rq) {
            return Err(SqlError::new(
                1066,
                "42000",
                format!("Not unique table/alias: '{rq}'"),
            ));
        }
        let mut columns: Vec<ColumnSchema> = Vec::new();
        for c in &left.columns {
            columns.push(ColumnSchema {
                name: format!("{lq}.{}", c.name),
                ..c.clone()
            });
        }
        for c in &right.columns {
            columns.push(ColumnSchema {
                name: format!("{rq}.{}", c.name),
                // LEFT JOIN fills a missing right side with NULLs.
                not_null: c.not_null && !join.left,
                ..c.clone()
            });
        }
        let schema = Arc::new(TableSchema {
            id: left.id,
            db: left.db.clone(),
            name: left.name.clone(),
            columns,
            pk: left.pk,
            indexes: Vec::new(),
        });
        Ok(Joined {
            schema,
            left,
            right,
        })
    }

    /// The rows of `s`'s join that pass its WHERE, keyed by position.
    pub(super) fn join_rows(
        &mut self,
        s: &Select,
        from: &TableName,
        join: &Join,
        ctx: &Ctx<'_>,
    ) -> Result<VirtualTable, SqlError> {
        let j = self.join_schema(from, s.alias.as_deref(), join, ctx)?;
        let (lrows, rrows) = self.read(|me, txn| {
            Ok((
                me.matching_rows(txn, &j.left, None, ctx)?,
                me.matching_rows(txn, &j.right, None, ctx)?,
            ))
        })?;
        let pairs = lrows.len().saturating_mul(rrows.len());
        if pairs > MAX_JOIN_PAIRS {
            return Err(SqlError::unsupported(format!(
                "a join of {} x {} rows (the double joins by nested loop, up to {MAX_JOIN_PAIRS} pairs)",
                lrows.len(),
                rrows.len()
            )));
        }
        let schema = Arc::clone(&j.schema);
        let mut out = Vec::new();
        let mut keep = |me: &mut Self, row: Vec<Value>| -> Result<(), SqlError> {
            let pass = match &s.filter {
                Some(f) => me.eval(f, ctx, Some((&schema, &row)))?.is_true(),
                None => true,
            };
            if pass {
                out.push((out.len() as i64, Arc::new(row)));
            }
            Ok(())
        };
        for (_, l) in &lrows {
            let mut matched = false;
            for (_, r) in &rrows {
                let row: Vec<Value> = l.iter().chain(r.iter()).cloned().collect();
                let on = match &join.on {
                    Some(on) => self.eval(on, ctx, Some((&j.schema, &row)))?.is_true(),
                    None => true,
                };
                if on {
                    matched = true;
                    keep(self, row)?;
                }
            }
            if join.left && !matched {
                let mut row: Vec<Value> = l.to_vec();
                row.resize(j.schema.columns.len(), Value::Null);
                keep(self, row)?;
            }
        }
        Ok((j.schema, out))
    }
}

/// The columns `q.*` stands for in `s` (over `schema`: a table's or a
/// join's): 1051 if `q` names neither table.
pub(super) fn table_star(
    s: &Select,
    schema: &TableSchema,
    q: &str,
) -> Result<Range<usize>, SqlError> {
    let unknown = || SqlError::new(1051, "42S02", format!("Unknown table '{q}'"));
    if s.join.is_some() {
        let prefix = format!("{}.", q.to_lowercase());
        let first = schema
            .columns
            .iter()
            .position(|c| c.name.to_lowercase().starts_with(&prefix))
            .ok_or_else(unknown)?;
        let n = schema.columns[first..]
            .iter()
            .take_while(|c| c.name.to_lowercase().starts_with(&prefix))
            .count();
        return Ok(first..first + n);
    }
    let named = s
        .alias
        .as_deref()
        .or(s.from.as_ref().map(|t| t.name.as_str()));
    match named {
        Some(n) if n.eq_ignore_ascii_case(q) => Ok(0..schema.columns.len()),
        _ => Err(unknown()),
    }
}

//! The parts of SELECT past one filtered row set: uncorrelated subqueries
//! (resolved to values before the outer query runs), GROUP BY / HAVING
//! with the aggregates, SHOW CREATE TABLE and the basic `information_schema`
//! tables (SCHEMATA, TABLES, COLUMNS). A child of `session` so it
//! runs on the session's evaluator and snapshot.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use super::super::error::SqlError;
use super::super::sql::{ColType, Expr, Select, SelectItem, TableName};
use super::super::store::{ColumnSchema, Row, TableSchema};
use super::super::value::{Value, distinct_rows};
use super::{Column, Ctx, ResultSet, Session, order_cmp};

/// A table built on the fly: its schema and its rows, keyed by position.
pub(super) type VirtualTable = (Arc<TableSchema>, Vec<(i64, Row)>);

impl Session {
    /// A copy of `s` with every subquery replaced by its result, or `None`
    /// when `s` has none (the common case: no copy).
    pub(super) fn resolve_subqueries(
        &mut self,
        s: &Select,
        ctx: &Ctx<'_>,
    ) -> Result<Option<Select>, SqlError> {
        let mut found = false;
        visit_select(s, &mut |e| {
            found |= matches!(e, Expr::Subquery(_) | Expr::InSubquery(..));
        });
        if !found {
            return Ok(None);
        }
        let mut out = s.clone();
        for item in &mut out.items {
            if let SelectItem::Expr { expr, .. } = item {
                self.resolve_expr(expr, ctx)?;
            }
        }
        for e in out
            .filter
            .iter_mut()
            .chain(out.having.iter_mut())
            .chain(out.group_by.iter_mut())
            .chain(out.order_by.iter_mut().map(|(e, _)| e))
        {
            self.resolve_expr(e, ctx)?;
        }
        Ok(Some(out))
    }

    fn resolve_expr(&mut self, e: &mut Expr, ctx: &Ctx<'_>) -> Result<(), SqlError> {
        match e {
            Expr::Subquery(sub) => {
                let rs = self.run_subquery(sub, ctx)?;
                if rs.rows.len() > 1 {
                    return Err(SqlError::new(
                        1242,
                        "21000",
                        "Subquery returns more than 1 row",
                    ));
                }
                let v = rs
                    .rows
                    .into_iter()
                    .next()
                    .map_or(Value::Null, |mut r| r.swap_remove(0));
                *e = Expr::Lit(v);
            }
            Expr::InSubquery(a, sub, not) => {
                self.resolve_expr(a, ctx)?;
                let rs = self.run_subquery(sub, ctx)?;
                let list = rs
                    .rows
                    .into_iter()
                    .map(|mut r| Expr::Lit(r.swap_remove(0)))
                    .collect();
                let left = std::mem::replace(a.as_mut(), Expr::Lit(Value::Null));
                *e = Expr::InList(Box::new(left), list, *not);
            }
            Expr::Neg(a) | Expr::Not(a) | Expr::IsNull(a, _) => self.resolve_expr(a, ctx)?,
            Expr::Bin(_, a, b) | Expr::Like(a, b, _) => {
                self.resolve_expr(a, ctx)?;
                self.resolve_expr(b, ctx)?;
            }
            Expr::Between(a, b, c, _) => {
                self.resolve_expr(a, ctx)?;
                self.resolve_expr(b, ctx)?;
                self.resolve_expr(c, ctx)?;
            }
            Expr::InList(a, list, _) => {
                self.resolve_expr(a, ctx)?;
                for x in list {
                    self.resolve_expr(x, ctx)?;
                }
            }
            Expr::Func(_, args) => {
                for x in args {
                    self.resolve_expr(x, ctx)?;
                }
            }
            Expr::Lit(_)
            | Expr::Param(_)
            | Expr::UserVar(_)
            | Expr::SysVar { .. }
            | Expr::Column(_)
            | Expr::CountStar => {}
        }
        Ok(())
    }

    /// Runs a subquery that must give one column. It runs alone: a name
    /// meant for the outer query's row is looked up in the subquery's own
    /// table (1054 if it has no such column). No correlated subqueries.
    fn run_subquery(&mut self, sub: &Select, ctx: &Ctx<'_>) -> Result<ResultSet, SqlError> {
        let resolved = self.resolve_subqueries(sub, ctx)?;
        let rs = self.select(resolved.as_ref().unwrap_or(sub), ctx)?;
        if rs.columns.len() != 1 {
            return Err(SqlError::new(
                1241,
                "21000",
                "Operand should contain 1 column(s)",
            ));
        }
        Ok(rs)
    }

    /// The rows of an aggregating SELECT: `rows` (already filtered by
    /// WHERE) grouped by GROUP BY (one group without it), HAVING, ORDER BY,
    /// DISTINCT, OFFSET and LIMIT. `items` and `names` are the select
    /// list; GROUP BY, HAVING and ORDER BY may name its aliases, and GROUP
    /// BY and ORDER BY its positions, as in MySQL. Groups come in the order
    /// their first row has in the table, so results are deterministic.
    pub(super) fn aggregate_rows(
        &mut self,
        s: &Select,
        items: &[Expr],
        names: &[String],
        rows: &[(i64, Row)],
        schema: &TableSchema,
        ctx: &Ctx<'_>,
    ) -> Result<Vec<Vec<Value>>, SqlError> {
        let by_position = |e: &Expr| match e {
            Expr::Lit(Value::Int(n)) if *n >= 1 && (*n as usize) <= items.len() => {
                items[*n as usize - 1].clone()
            }
            e => resolve_alias(e, items, names, schema),
        };
        let keys: Vec<Expr> = s.group_by.iter().map(by_position).collect();
        let mut groups: Vec<Vec<(i64, Row)>> = Vec::new();
        if keys.is_empty() {
            groups.push(rows.to_vec());
        } else {
            let mut index: HashMap<String, usize> = HashMap::new();
            for (k, r) in rows {
                let mut key = Vec::with_capacity(keys.len());
                for e in &keys {
                    key.push(self.eval(e, ctx, Some((schema, r)))?);
                }
                let id = format!("{key:?}");
                match index.get(&id) {
                    Some(&g) => groups[g].push((*k, r.clone())),
                    None => {
                        index.insert(id, groups.len());
                        groups.push(vec![(*k, r.clone())]);
                    }
                }
            }
        }
        let having = s
            .having
            .as_ref()
            .map(|e| resolve_alias(e, items, names, schema));
        let order: Vec<(Expr, bool)> = s
            .order_by
            .iter()
            .map(|(e, desc)| (by_position(e), *desc))
            .collect();
        let mut out: Vec<(Vec<Value>, Vec<Value>)> = Vec::with_capacity(groups.len());
        for g in &groups {
            let first = g.first().map(|(_, r)| (schema, r.as_slice()));
            if let Some(h) = &having {
                let folded = self.fold_aggregates(h, g, schema, ctx)?;
                if !self.eval(&folded, ctx, first)?.is_true() {
                    continue;
                }
            }
            let mut row = Vec::with_capacity(items.len());
            for e in items {
                let folded = self.fold_aggregates(e, g, schema, ctx)?;
                row.push(self.eval(&folded, ctx, first)?);
            }
            let mut sort_keys = Vec::with_capacity(order.len());
            for (e, _) in &order {
                let folded = self.fold_aggregates(e, g, schema, ctx)?;
                sort_keys.push(self.eval(&folded, ctx, first)?);
            }
            out.push((sort_keys, row));
        }
        // A stable sort: equal keys keep the groups' order.
        out.sort_by(|a, b| {
            for (i, (_, desc)) in order.iter().enumerate() {
                let o = order_cmp(&a.0[i], &b.0[i]);
                let o = if *desc { o.reverse() } else { o };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
        let rows: Vec<Vec<Value>> = out.into_iter().map(|(_, r)| r).collect();
        let offset = self.limit_of(s.offset.as_ref(), ctx)?.unwrap_or(0);
        let limit = self.limit_of(s.limit.as_ref(), ctx)?.unwrap_or(usize::MAX);
        Ok(if s.distinct {
            distinct_rows(rows, offset, limit)
        } else {
            rows.into_iter().skip(offset).take(limit).collect()
        })
    }

    /// `information_schema.SCHEMATA | TABLES | COLUMNS` as a table built
    /// from the store's DDL, filtered by `filter`; `None` for any other
    /// database. Other information_schema tables are 1146, as an unknown
    /// table.
    pub(super) fn information_schema(
        &mut self,
        from: &TableName,
        filter: Option<&Expr>,
        ctx: &Ctx<'_>,
    ) -> Result<Option<VirtualTable>, SqlError> {
        if !from
            .db
            .as_deref()
            .is_some_and(|d| d.eq_ignore_ascii_case("information_schema"))
        {
            return Ok(None);
        }
        let store = self.cluster.store();
        let text = |v: &str| Value::Str(v.to_string());
        let (columns, rows): (&[&str], Vec<Vec<Value>>) =
            match from.name.to_ascii_uppercase().as_str() {
                "SCHEMATA" => (
                    &[
                        "CATALOG_NAME",
                        "SCHEMA_NAME",
                        "DEFAULT_CHARACTER_SET_NAME",
                        "DEFAULT_COLLATION_NAME",
                    ],
                    store
                        .databases()
                        .iter()
                        .map(|d| vec![text("def"), text(d), text("utf8mb4"), text("utf8mb4_bin")])
                        .collect(),
                ),
                "TABLES" => {
                    let mut rows = Vec::new();
                    for d in store.databases() {
                        for t in store.tables(&d)? {
                            rows.push(vec![
                                text("def"),
                                text(&d),
                                text(&t),
                                text("BASE TABLE"),
                                text("InnoDB"),
                            ]);
                        }
                    }
                    (
                        &[
                            "TABLE_CATALOG",
                            "TABLE_SCHEMA",
                            "TABLE_NAME",
                            "TABLE_TYPE",
                            "ENGINE",
                        ],
                        rows,
                    )
                }
                "COLUMNS" => {
                    let mut rows = Vec::new();
                    for d in store.databases() {
                        for t in store.tables(&d)? {
                            let sc = store.schema(&d, &t)?;
                            for (i, c) in sc.columns.iter().enumerate() {
                                let key = if i == sc.pk {
                                    "PRI"
                                } else if sc
                                    .indexes
                                    .iter()
                                    .any(|x| x.columns[0].eq_ignore_ascii_case(&c.name))
                                {
                                    "MUL"
                                } else {
                                    ""
                                };
                                let data_type = match c.ty {
                                    ColType::Int(8) => "tinyint",
                                    ColType::Int(16) => "smallint",
                                    ColType::Int(24) => "mediumint",
                                    ColType::Int(_) => "int",
                                    ColType::BigInt => "bigint",
                                    ColType::Double => "double",
                                    ColType::Varchar(_) => "varchar",
                                    ColType::Text => "text",
                                };
                                rows.push(vec![
                                    text(&d),
                                    text(&t),
                                    text(&c.name),
                                    Value::Int(i as i64 + 1),
                                    text(data_type),
                                    text(if c.not_null { "NO" } else { "YES" }),
                                    text(key),
                                ]);
                            }
                        }
                    }
                    (
                        &[
                            "TABLE_SCHEMA",
                            "TABLE_NAME",
                            "COLUMN_NAME",
                            "ORDINAL_POSITION",
                            "DATA_TYPE",
                            "IS_NULLABLE",
                            "COLUMN_KEY",
                        ],
                        rows,
                    )
                }
                _ => return Err(SqlError::no_such_table("information_schema", &from.name)),
            };
        let schema = Arc::new(TableSchema {
            id: 0,
            db: "information_schema".into(),
            name: from.name.to_ascii_uppercase(),
            columns: columns
                .iter()
                .map(|name| ColumnSchema {
                    name: (*name).to_string(),
                    ty: if *name == "ORDINAL_POSITION" {
                        ColType::BigInt
                    } else {
                        ColType::Varchar(64)
                    },
                    not_null: false,
                    default: Value::Null,
                    auto_increment: false,
                })
                .collect(),
            // No key: the rows are numbered in order.
            pk: 0,
            indexes: Vec::new(),
        });
        let mut out = Vec::new();
        for (i, row) in rows.into_iter().enumerate() {
            let keep = match filter {
                Some(f) => self.eval(f, ctx, Some((&schema, &row)))?.is_true(),
                None => true,
            };
            if keep {
                out.push((i as i64, Arc::new(row)));
            }
        }
        Ok(Some((schema, out)))
    }

    /// SHOW CREATE TABLE, in TiDB's layout.
    pub(super) fn show_create_table(
        &mut self,
        t: &TableName,
        ctx: &Ctx<'_>,
    ) -> Result<ResultSet, SqlError> {
        let schema = self.schema_of(t, ctx)?;
        Ok(ResultSet {
            columns: vec![Column::text("Table"), Column::text("Create Table")],
            rows: vec![vec![
                Value::Str(schema.name.clone()),
                Value::Str(create_table_text(&schema)),
            ]],
        })
    }
}

/// The `CREATE TABLE` statement TiDB prints for `schema`.
pub(super) fn create_table_text(schema: &TableSchema) -> String {
    let mut lines = Vec::new();
    for c in &schema.columns {
        let ty = match c.ty {
            ColType::Int(8) => "tinyint(4)".to_string(),
            ColType::Int(16) => "smallint(6)".to_string(),
            ColType::Int(24) => "mediumint(9)".to_string(),
            ColType::Int(_) => "int(11)".to_string(),
            ColType::BigInt => "bigint(20)".to_string(),
            ColType::Double => "double".to_string(),
            ColType::Varchar(n) => format!("varchar({n})"),
            ColType::Text => "text".to_string(),
        };
        let mut line = format!("  `{}` {ty}", c.name);
        if c.not_null {
            line.push_str(" NOT NULL");
        }
        if c.auto_increment {
            line.push_str(" AUTO_INCREMENT");
        } else if let Some(text) = c.default.to_text() {
            line.push_str(&format!(" DEFAULT '{}'", text.replace('\'', "''")));
        } else if !c.not_null {
            line.push_str(" DEFAULT NULL");
        }
        lines.push(line);
    }
    lines.push(format!(
        "  PRIMARY KEY (`{}`) /*T![clustered_index] CLUSTERED */",
        schema.columns[schema.pk].name
    ));
    for idx in &schema.indexes {
        let cols: Vec<String> = idx.columns.iter().map(|c| format!("`{c}`")).collect();
        lines.push(format!(
            "  {}KEY `{}` ({})",
            if idx.unique { "UNIQUE " } else { "" },
            idx.name,
            cols.join(",")
        ));
    }
    format!(
        "CREATE TABLE `{}` (\n{}\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        schema.name,
        lines.join(",\n")
    )
}

/// `e` with select-list aliases replaced by their expressions, where the
/// name is not a column of the table (a column wins, as in MySQL).
fn resolve_alias(e: &Expr, items: &[Expr], names: &[String], schema: &TableSchema) -> Expr {
    let r = |x: &Expr| Box::new(resolve_alias(x, items, names, schema));
    match e {
        Expr::Column(c) if schema.column(c).is_none() => names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(c))
            .map_or_else(|| e.clone(), |i| items[i].clone()),
        Expr::Neg(a) => Expr::Neg(r(a)),
        Expr::Not(a) => Expr::Not(r(a)),
        Expr::IsNull(a, not) => Expr::IsNull(r(a), *not),
        Expr::Bin(op, a, b) => Expr::Bin(*op, r(a), r(b)),
        Expr::Like(a, b, not) => Expr::Like(r(a), r(b), *not),
        Expr::Between(a, b, c, not) => Expr::Between(r(a), r(b), r(c), *not),
        Expr::InList(a, l, not) => Expr::InList(
            r(a),
            l.iter()
                .map(|x| resolve_alias(x, items, names, schema))
                .collect(),
            *not,
        ),
        Expr::Func(name, args) => Expr::Func(
            name.clone(),
            args.iter()
                .map(|x| resolve_alias(x, items, names, schema))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Calls `f` on every expression of `s`, not descending into subqueries.
fn visit_select(s: &Select, f: &mut impl FnMut(&Expr)) {
    for item in &s.items {
        if let SelectItem::Expr { expr, .. } = item {
            visit(expr, f);
        }
    }
    for e in s
        .filter
        .iter()
        .chain(s.having.iter())
        .chain(s.group_by.iter())
        .chain(s.order_by.iter().map(|(e, _)| e))
    {
        visit(e, f);
    }
}

fn visit(e: &Expr, f: &mut impl FnMut(&Expr)) {
    f(e);
    match e {
        Expr::Neg(a) | Expr::Not(a) | Expr::IsNull(a, _) | Expr::InSubquery(a, _, _) => visit(a, f),
        Expr::Bin(_, a, b) | Expr::Like(a, b, _) => {
            visit(a, f);
            visit(b, f);
        }
        Expr::Between(a, b, c, _) => {
            visit(a, f);
            visit(b, f);
            visit(c, f);
        }
        Expr::InList(a, l, _) => {
            visit(a, f);
            l.iter().for_each(|x| visit(x, f));
        }
        Expr::Func(_, args) => args.iter().for_each(|x| visit(x, f)),
        _ => {}
    }
}

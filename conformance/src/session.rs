//! A recording client: every action on a [`Session`] is performed with
//! mysql_async and appended to its [`Transcript`] with what it produced.
//!
//! Actions named plainly (`query`, `exec`, ...) are expected to succeed and
//! the direct run fails if they do not; the `*_any` variants record errors as
//! ordinary outcomes, for scenarios whose point is the error.

use mysql_async::prelude::Queryable;
use mysql_async::{ChangeUserOpts, Conn, Opts, Params, Statement};

use crate::outcome::{ColumnMeta, Outcome, Prepared, Transcript};

/// SQL longer than this is shortened in step names.
const ACTION_SQL_LIMIT: usize = 160;

/// One client connection whose every action is recorded.
#[derive(Debug)]
pub struct Session {
    name: String,
    conn: Option<Conn>,
    transcript: Transcript,
}

impl Session {
    /// Connects with `opts`, recording the connect as the first step.
    pub async fn connect(name: &str, opts: impl Into<Opts>) -> Session {
        Self::connect_inner(name, opts.into(), true).await
    }

    /// Like [`Session::connect`], but a failed connect is an expected outcome.
    pub async fn connect_any(name: &str, opts: impl Into<Opts>) -> Session {
        Self::connect_inner(name, opts.into(), false).await
    }

    async fn connect_inner(name: &str, opts: Opts, expect_ok: bool) -> Session {
        let mut session = Session {
            name: name.to_owned(),
            conn: None,
            transcript: Transcript::default(),
        };
        let outcome = match Conn::new(opts).await {
            Ok(conn) => {
                let mut outcome = Outcome::default();
                outcome.read_final_ok(&conn);
                session.conn = Some(conn);
                outcome
            }
            Err(err) => Outcome::from_error(err),
        };
        session.record("connect".into(), expect_ok, outcome);
        session
    }

    /// True while the connection is usable.
    pub fn is_connected(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|conn| !conn.is_disconnected())
    }

    /// The underlying connection (for actions this type does not wrap).
    pub fn conn(&mut self) -> Option<&mut Conn> {
        self.conn.as_mut()
    }

    /// Runs SQL with the text protocol (COM_QUERY); it must succeed.
    pub async fn query(&mut self, sql: &str) -> &Outcome {
        self.query_inner(sql, true).await
    }

    /// Runs SQL with the text protocol; an error is an expected outcome.
    pub async fn query_any(&mut self, sql: &str) -> &Outcome {
        self.query_inner(sql, false).await
    }

    async fn query_inner(&mut self, sql: &str, expect_ok: bool) -> &Outcome {
        let action = format!("query: {}", shorten(sql));
        let outcome = match self.conn.as_mut() {
            None => not_connected(),
            Some(conn) => {
                let mut outcome = match conn.query_iter(sql).await {
                    Ok(result) => Outcome::read(result).await,
                    Err(err) => Outcome::from_error(err),
                };
                outcome.read_final_ok(conn);
                outcome
            }
        };
        self.finish(action, expect_ok, outcome).await
    }

    /// Prepares `sql` (COM_STMT_PREPARE), recording its metadata; it must
    /// succeed.
    pub async fn prepare(&mut self, sql: &str) -> Option<Statement> {
        self.prepare_inner(sql, true).await
    }

    /// Prepares `sql`; an error is an expected outcome.
    pub async fn prepare_any(&mut self, sql: &str) -> Option<Statement> {
        self.prepare_inner(sql, false).await
    }

    async fn prepare_inner(&mut self, sql: &str, expect_ok: bool) -> Option<Statement> {
        let action = format!("prepare: {}", shorten(sql));
        let (outcome, statement) = match self.conn.as_mut() {
            None => (not_connected(), None),
            Some(conn) => match conn.prep(sql).await {
                Ok(statement) => {
                    let outcome = Outcome {
                        prepared: Some(Prepared {
                            params: statement.params().iter().map(ColumnMeta::from).collect(),
                            columns: statement.columns().iter().map(ColumnMeta::from).collect(),
                        }),
                        ..Outcome::default()
                    };
                    (outcome, Some(statement))
                }
                Err(err) => (Outcome::from_error(err), None),
            },
        };
        self.finish(action, expect_ok, outcome).await;
        statement
    }

    /// Executes a prepared statement (COM_STMT_EXECUTE, binary protocol);
    /// it must succeed. `what` names the parameters in the step.
    pub async fn execute(&mut self, statement: &Statement, what: &str, params: Params) -> &Outcome {
        self.execute_inner(statement, what, params, true).await
    }

    /// Executes a prepared statement; an error is an expected outcome.
    pub async fn execute_any(
        &mut self,
        statement: &Statement,
        what: &str,
        params: Params,
    ) -> &Outcome {
        self.execute_inner(statement, what, params, false).await
    }

    async fn execute_inner(
        &mut self,
        statement: &Statement,
        what: &str,
        params: Params,
        expect_ok: bool,
    ) -> &Outcome {
        // Statement ids are left out: a proxy may renumber them.
        let action = format!("execute {what}");
        let outcome = match self.conn.as_mut() {
            None => not_connected(),
            Some(conn) => {
                let mut outcome = match conn.exec_iter(statement, params).await {
                    Ok(result) => Outcome::read(result).await,
                    Err(err) => Outcome::from_error(err),
                };
                outcome.read_final_ok(conn);
                outcome
            }
        };
        self.finish(action, expect_ok, outcome).await
    }

    /// Prepares `sql` and executes it once with `params`; both must succeed.
    pub async fn exec(&mut self, sql: &str, params: impl Into<Params>) -> &Outcome {
        let params = params.into();
        match self.prepare(sql).await {
            Some(statement) => {
                let what = describe_params(&params);
                self.execute(&statement, &what, params).await
            }
            None => {
                &self
                    .transcript
                    .steps
                    .last()
                    .expect("prepare recorded a step")
                    .outcome
            }
        }
    }

    /// Closes a prepared statement (COM_STMT_CLOSE, no response).
    pub async fn close_statement(&mut self, statement: Statement) {
        let outcome = match self.conn.as_mut() {
            None => not_connected(),
            Some(conn) => match conn.close(statement).await {
                Ok(()) => Outcome::default(),
                Err(err) => Outcome::from_error(err),
            },
        };
        self.finish("close statement".into(), true, outcome).await;
    }

    /// COM_RESET_CONNECTION; it must succeed.
    pub async fn reset(&mut self) -> &Outcome {
        let outcome = match self.conn.as_mut() {
            None => not_connected(),
            Some(conn) => match conn.reset().await {
                Ok(true) => {
                    let mut outcome = Outcome::default();
                    outcome.read_final_ok(conn);
                    outcome
                }
                Ok(false) => Outcome {
                    error: Some(crate::outcome::ClientError::Client(
                        "mysql_async thinks the server lacks COM_RESET_CONNECTION \
                         (it judges by the greeting's server version)"
                            .into(),
                    )),
                    ..Outcome::default()
                },
                Err(err) => Outcome::from_error(err),
            },
        };
        self.finish("reset connection".into(), true, outcome).await
    }

    /// COM_CHANGE_USER to `user`/`password` (and `db` if given).
    pub async fn change_user(
        &mut self,
        user: &str,
        password: &str,
        db: Option<&str>,
        expect_ok: bool,
    ) -> &Outcome {
        let action = format!("change user to {user} (db {db:?})");
        let opts = ChangeUserOpts::default()
            .with_user(Some(user.to_owned()))
            .with_pass(Some(password.to_owned()))
            .with_db_name(db.map(str::to_owned));
        let outcome = match self.conn.as_mut() {
            None => not_connected(),
            Some(conn) => match conn.change_user(opts).await {
                Ok(()) => {
                    let mut outcome = Outcome::default();
                    outcome.read_final_ok(conn);
                    outcome
                }
                Err(err) => Outcome::from_error(err),
            },
        };
        self.finish(action, expect_ok, outcome).await
    }

    /// Records an outcome produced outside this type (e.g. a stream read by
    /// the scenario itself).
    pub fn record(&mut self, action: String, expect_ok: bool, outcome: Outcome) -> &Outcome {
        self.transcript
            .push(format!("[{}] {action}", self.name), expect_ok, outcome);
        &self.transcript.steps.last().expect("just pushed").outcome
    }

    /// Disconnects (COM_QUIT) and returns the transcript.
    pub async fn finish_session(mut self) -> Transcript {
        if let Some(conn) = self.conn.take() {
            let outcome = match conn.disconnect().await {
                Ok(()) => Outcome::default(),
                Err(err) => Outcome::from_error(err),
            };
            self.record("disconnect".into(), true, outcome);
        }
        self.transcript
    }

    /// Records `outcome`, first fetching `SHOW WARNINGS` if it had warnings.
    async fn finish(&mut self, action: String, expect_ok: bool, mut outcome: Outcome) -> &Outcome {
        if outcome.has_warnings()
            && let Some(conn) = self.conn.as_mut()
        {
            match conn.query_iter("SHOW WARNINGS").await {
                Ok(result) => {
                    let warnings = Outcome::read(result).await;
                    outcome.show_warnings =
                        warnings.sets.into_iter().flat_map(|set| set.rows).collect();
                }
                Err(err) => outcome.error = Some(err.into()),
            }
        }
        self.record(action, expect_ok, outcome)
    }
}

fn not_connected() -> Outcome {
    Outcome {
        error: Some(crate::outcome::ClientError::Client("not connected".into())),
        ..Outcome::default()
    }
}

fn shorten(sql: &str) -> String {
    let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if sql.len() <= ACTION_SQL_LIMIT {
        return sql;
    }
    let mut end = ACTION_SQL_LIMIT;
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &sql[..end])
}

/// A short description of parameters for a step name (long values by size).
pub fn describe_params(params: &Params) -> String {
    match params {
        Params::Empty => "()".into(),
        Params::Positional(values) => {
            let parts: Vec<String> = values
                .iter()
                .map(|value| match value {
                    mysql_async::Value::Bytes(bytes) if bytes.len() > 64 => {
                        format!("<{} bytes>", bytes.len())
                    }
                    other => format!("{other:?}"),
                })
                .collect();
            format!("({})", parts.join(", "))
        }
        Params::Named(_) => "(named)".into(),
    }
}

//! sysbench through the playground (`scripts/run.sh`), as a new user runs
//! it: the commands come from the playground's banner. `oltp_read_write`
//! prepares its table through tiproxy, then runs 8 threads for 40 s while a
//! TiDB is added (`tiproxyctl tidb add`: the sessions spread evenly) and the
//! first one is shut down gracefully (its sessions move to the other).
//! sysbench must finish without an error or a reconnect and report queries
//! in every second of the run.
//!
//! Before the load, a scripted `mariadb` CLI session types the everyday
//! statements of a first visit (GROUP BY / HAVING, aliases, `t.*`, scalar
//! and IN subqueries, two-table joins, SHOW CREATE TABLE,
//! information_schema) through the proxy; its output is compared line by
//! line.
//!
//! sysbench runs with its default error handling: it stops at any error
//! but a deadlock or lock wait timeout, which it counts as ignored and
//! retries. The doubles' transactions are pessimistic, as TiDB's default:
//! conflicting writers wait for the row lock instead of failing at commit,
//! so the test wants no ignored error either.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tiproxy_tests::playground::{Playground, start_playground};

const THREADS: usize = 8;
const RUN_SECS: u64 = 40;

/// A child process killed on drop (a failed assertion must not leave
/// sysbench running).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The banner's `sysbench ... prepare` command, without `prepare`.
fn sysbench_base(pg: &Playground) -> Vec<String> {
    let line = pg
        .banner
        .lines()
        .find(|l| l.trim_start().starts_with("sysbench:"))
        .unwrap_or_else(|| panic!("the banner shows how to run sysbench:\n{}", pg.banner));
    let words: Vec<String> = line
        .split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect();
    assert_eq!(
        words.first().map(String::as_str),
        Some("sysbench"),
        "{line}"
    );
    assert_eq!(words.last().map(String::as_str), Some("prepare"), "{line}");
    words[..words.len() - 1].to_vec()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// Sessions on `addr`.
fn on(spread: &[(String, i64)], addr: &str) -> i64 {
    spread
        .iter()
        .filter(|(a, _)| a == addr)
        .map(|(_, n)| n)
        .sum()
}

/// One `[ 5s ] thds: 8 tps: ... qps: 1234.56 ...` report line: (second, qps).
fn report(line: &str) -> Option<(u64, f64)> {
    let rest = line.trim().strip_prefix('[')?;
    let (secs, rest) = rest.split_once("s ]")?;
    let qps = rest.split_once("qps:")?.1.split_whitespace().next()?;
    Some((secs.trim().parse().ok()?, qps.parse().ok()?))
}

/// The prompt session: statements and the `mariadb --batch` output.
const PROMPT: &str = "
CREATE DATABASE d1;
USE d1;
CREATE TABLE t (id INT PRIMARY KEY AUTO_INCREMENT, v VARCHAR(20) NOT NULL, n INT);
CREATE TABLE u (id INT PRIMARY KEY, t_id INT, note VARCHAR(20) DEFAULT 'x', KEY t_id (t_id));
INSERT INTO t (v, n) VALUES ('a', 1), ('b', 2), ('a', 3), ('c', 4), ('b', 5);
INSERT INTO u VALUES (1, 1, 'first'), (2, 3, 'third'), (3, 9, 'none');
SELECT v, COUNT(*) FROM d1.t GROUP BY v;
SELECT v, COUNT(*) AS c, SUM(n) total FROM t GROUP BY v HAVING c > 1 ORDER BY total DESC;
SELECT v, MIN(n), MAX(n) FROM t GROUP BY 1 ORDER BY 1 DESC LIMIT 2;
SELECT t.*, LENGTH(v) FROM d1.t t WHERE id <= 2;
SELECT id, (SELECT MAX(n) FROM t) AS top FROM t WHERE id = 1;
SELECT id, v FROM t WHERE id IN (SELECT t_id FROM u) ORDER BY id;
SELECT v FROM t WHERE n = (SELECT MIN(n) FROM t WHERE v = 'b');
SELECT TABLE_NAME FROM information_schema.tables WHERE table_schema = 'd1' ORDER BY 1;
SELECT COLUMN_NAME, DATA_TYPE, COLUMN_KEY FROM information_schema.columns WHERE table_schema = 'd1' AND table_name = 'u';
";

/// What `mariadb --batch` prints for [`PROMPT`].
const PROMPT_OUT: &str = "v\tCOUNT(*)
a\t2
b\t2
c\t1
v\tc\ttotal
b\t2\t7
a\t2\t4
v\tMIN(n)\tMAX(n)
c\t4\t4
b\t2\t5
id\tv\tn\tLENGTH(v)
1\ta\t1\t1
2\tb\t2\t1
id\ttop
1\t5
id\tv
1\ta
3\ta
v
b
TABLE_NAME
t
u
COLUMN_NAME\tDATA_TYPE\tCOLUMN_KEY
id\tint\tPRI
t_id\tint\tMUL
note\tvarchar\t
";

/// Two-table joins at the prompt, on [`PROMPT`]'s tables.
const JOINS: &str = "
USE d1;
SELECT t.id, t.v, u.note FROM t JOIN u ON u.t_id = t.id ORDER BY t.id;
SELECT t.v, COUNT(u.id) AS notes FROM t LEFT JOIN u ON u.t_id = t.id GROUP BY t.v ORDER BY t.v;
SELECT a.id, b.note FROM t a LEFT OUTER JOIN u b ON b.t_id = a.id WHERE a.n > 2 ORDER BY a.id LIMIT 2;
SELECT COUNT(*) FROM t, u WHERE u.t_id = t.id AND t.v = 'a';
";

/// What `mariadb --batch` prints for [`JOINS`].
const JOINS_OUT: &str = "id\tv\tnote
1\ta\tfirst
3\ta\tthird
v\tnotes
a\t2
b\t0
c\t0
id\tnote
3\tthird
4\tNULL
COUNT(*)
2
";

/// `mariadb --batch` through the proxy, typing `input`: its stdout.
fn at_the_prompt(pg: &Playground, input: &str) -> String {
    let mut child = Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &pg.sql.port().to_string(),
            "-u",
            "root",
            "--batch",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mariadb");
    let mut stdin = child.stdin.take().expect("piped");
    std::io::Write::write_all(&mut stdin, input.as_bytes()).expect("type");
    drop(stdin);
    let out = child.wait_with_output().expect("mariadb");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mariadb: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn prompt_session(pg: &Playground) {
    let mut child = Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &pg.sql.port().to_string(),
            "-u",
            "root",
            "--batch",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mariadb");
    let mut stdin = child.stdin.take().expect("piped");
    std::io::Write::write_all(&mut stdin, PROMPT.as_bytes()).expect("type");
    drop(stdin);
    let out = child.wait_with_output().expect("mariadb");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "mariadb: {}\n{stdout}{stderr}",
        out.status
    );
    assert_eq!(stdout, PROMPT_OUT, "stderr: {stderr}");

    let out = Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &pg.sql.port().to_string(),
            "-u",
            "root",
            "-N",
            "--raw",
            "-e",
        ])
        .arg("SHOW CREATE TABLE d1.u")
        .output()
        .expect("mariadb");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "CREATE TABLE `u` (",
        "  `id` int(11) NOT NULL,",
        "  `t_id` int(11) DEFAULT NULL,",
        "  `note` varchar(20) DEFAULT 'x',",
        "  PRIMARY KEY (`id`) /*T![clustered_index] CLUSTERED */,",
        "  KEY `t_id` (`t_id`)",
        ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }

    assert_eq!(at_the_prompt(pg, JOINS), JOINS_OUT);
}

#[test]
fn prompt_session_then_sysbench_through_scale_out_and_in() {
    tiproxy_tests::install(&["etcd-server"], "etcd");
    tiproxy_tests::install(&["sysbench"], "sysbench");
    let pg = start_playground(1);
    let first = pg.ctl(&["tidb", "list"])[0]["sql"]
        .as_str()
        .expect("sql")
        .to_string();
    wait_for(
        "tiproxy found the TiDB in PD",
        Duration::from_secs(20),
        || pg.spread().iter().any(|(a, _)| *a == first),
    );
    tiproxy_tests::install(&["mariadb-client"], "mariadb");
    prompt_session(&pg);
    let base = sysbench_base(&pg);

    let out = Command::new(&base[0])
        .args(&base[1..])
        .arg("prepare")
        .output()
        .expect("run sysbench prepare");
    assert!(
        out.status.success(),
        "sysbench prepare through the proxy: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = Command::new(&base[0])
        .args(&base[1..])
        .args([
            format!("--threads={THREADS}"),
            format!("--time={RUN_SECS}"),
            "--report-interval=1".into(),
            "run".into(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sysbench run");
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("sysbench| {line}");
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut child = Reaped(child);
    let n = THREADS as i64;

    wait_for(
        "sysbench's sessions on the first TiDB",
        Duration::from_secs(15),
        || on(&pg.spread(), &first) == n,
    );
    std::thread::sleep(Duration::from_secs(8).saturating_sub(started.elapsed()));

    // Scale out: the new TiDB registers in PD; half the sessions move.
    let second = pg.ctl(&["tidb", "add"])["sql"]
        .as_str()
        .expect("sql")
        .to_string();
    let took = wait_for(
        "sessions spread evenly after the scale-out",
        Duration::from_secs(15),
        || {
            let s = pg.spread();
            on(&s, &first) == n / 2 && on(&s, &second) == n / 2
        },
    );
    eprintln!("sessions 4/4 {took:?} after the scale-out");
    std::thread::sleep(Duration::from_secs(22).saturating_sub(started.elapsed()));

    // Scale in: the first TiDB shuts down gracefully; its sessions move.
    pg.ctl(&["tidb", "shutdown", "0"]);
    let took = wait_for(
        "every session on the second TiDB after the scale-in",
        Duration::from_secs(15),
        || on(&pg.spread(), &second) == n,
    );
    eprintln!("sessions 0/8 {took:?} after the scale-in");

    let deadline = started + Duration::from_secs(RUN_SECS + 30);
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait sysbench") {
            break s;
        }
        assert!(Instant::now() < deadline, "sysbench did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    let lines: Vec<String> = rx.iter().collect();
    let text = lines.join("\n");
    assert!(status.success(), "sysbench failed ({status}):\n{text}");
    assert!(!text.contains("FATAL"), "{text}");

    let reports: Vec<(u64, f64)> = lines.iter().filter_map(|l| report(l)).collect();
    assert!(
        reports.len() as u64 >= RUN_SECS - 1,
        "a report every second: {reports:?}"
    );
    let idle: Vec<_> = reports.iter().filter(|(_, qps)| *qps <= 0.0).collect();
    assert!(idle.is_empty(), "seconds without a query: {idle:?}");
    let reconnects = lines
        .iter()
        .find(|l| l.trim_start().starts_with("reconnects:"))
        .unwrap_or_else(|| panic!("no summary:\n{text}"));
    assert!(
        reconnects.split_whitespace().nth(1) == Some("0"),
        "{reconnects}"
    );
    // "ignored errors: 0 (0.00 per sec.)": no deadlock, no lock wait timeout.
    let ignored = lines
        .iter()
        .find(|l| l.trim_start().starts_with("ignored errors:"))
        .unwrap_or_else(|| panic!("no summary:\n{text}"));
    assert!(ignored.split_whitespace().nth(2) == Some("0"), "{ignored}");
    let queries = lines
        .iter()
        .find(|l| l.trim_start().starts_with("queries:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no query count:\n{text}"));
    assert!(queries > 1000, "sysbench ran: {queries} queries");
}

//! The command-line flags TiProxy's scripts and tiup use, on the real
//! binaries: `tiproxy --advertise-addr` (what PD gets) and the deprecated
//! `--log_encoder`/`--log_level` it still accepts; tiproxyctl's default
//! host `localhost`, `config set --input FILE` beside the positional file
//! and standard input, `--indent`, `--log_level` and `--log_encoder`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use tiproxy_tests::{Etcd, ProxyProcess, binary, http_get, mariadb};

/// `tiproxyctl --port <api port> args...` with no `--host`: (exit code,
/// stdout, stderr).
fn ctl(api: SocketAddr, args: &[&str], stdin: Option<&str>) -> (Option<i32>, String, String) {
    let mut child = Command::new(binary("tiproxyctl"))
        .args(["--port", &api.port().to_string()])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tiproxyctl");
    if let Some(text) = stdin {
        let mut w = child.stdin.take().expect("piped");
        w.write_all(text.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("tiproxyctl ends");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `proxy.max-connections` in effect, read with `tiproxyctl config get --json`.
fn max_connections(api: SocketAddr) -> u64 {
    let (code, out, err) = ctl(api, &["config", "get", "--json"], None);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON config");
    v["proxy"]["max-connections"]
        .as_u64()
        .expect("max-connections")
}

#[test]
fn tiproxyctl_reaches_localhost_by_default_and_sets_config_from_input_file_path_or_stdin() {
    let db = mariadb();
    let p = ProxyProcess::start(&[db.addr()], "");
    let (code, help, _) = ctl(p.api, &["--help"], None);
    assert_eq!(code, Some(0));
    assert!(help.contains("[default: localhost]"), "{help}");
    // No --host: `localhost` reaches the API listening on 127.0.0.1.
    assert_eq!(max_connections(p.api), 0);

    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("patch.toml");
    let file = f.to_str().expect("utf-8 path");
    // TiProxy's form.
    std::fs::write(&f, "[proxy]\nmax-connections = 7\n").expect("write");
    let (code, out, err) = ctl(p.api, &["config", "set", "--input", file], None);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(max_connections(p.api), 7);
    // The positional form still works.
    std::fs::write(&f, "[proxy]\nmax-connections = 8\n").expect("write");
    let (code, out, err) = ctl(p.api, &["config", "set", file], None);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(max_connections(p.api), 8);
    // Neither: standard input, as TiProxy reads it.
    let (code, out, err) = ctl(
        p.api,
        &["config", "set"],
        Some("[proxy]\nmax-connections = 9\n"),
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(max_connections(p.api), 9);
    // Both at once is a usage error; a missing file is named.
    let (code, _, err) = ctl(p.api, &["config", "set", "--input", file, file], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--input"), "{err}");
    let missing = dir.path().join("missing.toml");
    let missing = missing.to_str().expect("utf-8 path");
    let (code, _, err) = ctl(p.api, &["config", "set", "--input", missing], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("missing.toml"), "{err}");
    assert_eq!(max_connections(p.api), 9, "nothing applied");
}

#[test]
fn tiproxyctl_indent_and_its_own_log_flags() {
    let db = mariadb();
    let p = ProxyProcess::start(&[db.addr()], "");
    let args = ["config", "get", "--json"];
    // Indented by default, quiet at the default level (warn).
    let (code, out, err) = ctl(p.api, &args, None);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.lines().count() > 10, "{out}");
    assert_eq!(err, "", "nothing logged at warn on success");
    // --indent=false: one line, the same document.
    let (code, flat, err) = ctl(p.api, &["--indent=false", "config", "get", "--json"], None);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(flat.trim_end().lines().count(), 1, "{flat}");
    let a: serde_json::Value = serde_json::from_str(&out).expect("json");
    let b: serde_json::Value = serde_json::from_str(&flat).expect("json");
    assert_eq!(a, b);
    // Global flags may also follow the command, as with TiProxy's cobra.
    let (code, flat2, _) = ctl(p.api, &["config", "get", "--json", "--indent=false"], None);
    assert_eq!((code, flat2), (Some(0), flat));
    // --log_level debug: the request and the answer, in TiDB's format.
    let (code, _, err) = ctl(p.api, &["--log_level", "debug", "config", "get"], None);
    assert_eq!(code, Some(0), "{err}");
    let request = err
        .lines()
        .find(|l| l.contains("[request]"))
        .unwrap_or_else(|| panic!("no request line: {err}"));
    assert!(request.contains("[DEBUG]"), "{request}");
    assert!(request.contains("/api/admin/config"), "{request}");
    assert!(
        err.contains("[answer]") && err.contains("[status=200]"),
        "{err}"
    );
    // --log_encoder json: every line is a JSON object.
    let (code, _, err) = ctl(
        p.api,
        &["--log_level=debug", "--log_encoder=json", "config", "get"],
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.lines().count() >= 2, "{err}");
    for line in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["level"], "DEBUG", "{line}");
    }
    // Bad values are refused before anything is sent.
    let (code, _, err) = ctl(p.api, &["--log_level", "loud", "health"], None);
    assert_eq!(code, Some(2));
    assert!(err.contains("--log_level") && err.contains("loud"), "{err}");
    let (code, _, err) = ctl(p.api, &["--log_encoder", "xml", "health"], None);
    assert_eq!(code, Some(2));
    assert!(err.contains("--log_encoder"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tiproxy_registers_its_advertise_addr_in_pd() {
    let etcd = Etcd::start();
    // The file says one host, the flag another: the flag wins, as in TiProxy.
    let p = ProxyProcess::start_with_config_and_flags(
        &[
            "--advertise-addr",
            "tiproxy-0.tiproxy-peer.example",
            "--log_encoder",
            "json",
            "--log_level",
            "debug",
        ],
        |sql, api| {
            format!(
                "[proxy]\naddr = \"{sql}\"\npd-addrs = \"{}\"\nadvertise-addr = \"from-file.example\"\n\
                 [api]\naddr = \"{api}\"\n",
                etcd.endpoint()
            )
        },
    );
    let (sql, api) = (p.sql, p.api);
    let want = format!(
        "/topology/tiproxy/tiproxy-0.tiproxy-peer.example:{}/info",
        sql.port()
    );
    let mut c = Client::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client");
    let deadline = Instant::now() + Duration::from_secs(10);
    let keys = loop {
        let resp = c
            .get("/topology/tiproxy/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("get");
        let keys: Vec<String> = resp
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect();
        if keys.contains(&want) || Instant::now() > deadline {
            break keys;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        keys.contains(&want),
        "{want} not in {keys:?}\n{}",
        p.log.lock().expect("log")
    );
    assert!(!keys.iter().any(|k| k.contains("from-file")), "{keys:?}");
    let (status, body) = http_get(api, "/api/admin/config?format=json");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        v["proxy"]["advertise-addr"], "tiproxy-0.tiproxy-peer.example",
        "{body}"
    );
    // The deprecated flags are accepted, said to be ignored, and ignored:
    // the log stays in the configured (default, TiDB) format.
    let log = p.log.lock().expect("log").clone();
    assert!(log.contains("--log_encoder is deprecated"), "{log}");
    assert!(log.contains("--log_level is deprecated"), "{log}");
    assert!(log.lines().all(|l| l.starts_with('[')), "{log}");
}

//! The `tidb-double` binary as end-to-end tests use it: start it, read the
//! JSON line, use its instances and control API, stop it with SIGTERM.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{conn, http};
use mysql_async::prelude::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn the_binary_serves_a_cluster_and_obeys_its_control_api() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidb-double"))
        .args([
            "--instances",
            "2",
            "--graceful-wait",
            "1",
            "--graceful-close-timeout",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the ready line within 20 s")
        .unwrap()
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let control = ready["control"].as_str().unwrap().to_string();
    let inst = ready["instances"].as_array().unwrap().clone();
    assert_eq!(inst.len(), 2);
    assert_eq!(inst[0]["state"], "serving");
    let sql0 = inst[0]["sql"].as_str().unwrap().to_string();
    let sql1 = inst[1]["sql"].as_str().unwrap().to_string();

    // Two instances, one store.
    let mut a = conn(&sql0, "app", "app-Pa55word", Some("test"))
        .await
        .unwrap();
    a.query_drop("CREATE TABLE kv (k INT PRIMARY KEY, v VARCHAR(10))")
        .await
        .unwrap();
    a.query_drop("INSERT INTO kv VALUES (1, 'x')")
        .await
        .unwrap();
    let mut b = conn(&sql1, "app", "app-Pa55word", Some("test"))
        .await
        .unwrap();
    assert_eq!(
        b.query_first::<String, _>("SELECT v FROM kv WHERE k = 1")
            .await
            .unwrap()
            .unwrap(),
        "x"
    );

    let (code, body) = http("POST", &control, "/instances", "").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let third: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(third["index"], 2);
    let mut c = conn(third["sql"].as_str().unwrap(), "root", "", None)
        .await
        .unwrap();
    c.ping().await.unwrap();

    let (code, body) = http("POST", &control, "/instances/1/shutdown", "")
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "draining");
    let status1 = inst[1]["status"].as_str().unwrap();
    assert_eq!(http("GET", status1, "/status", "").await.unwrap().0, 500);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(b.ping().await.is_err(), "closed after graceful-wait");

    let (code, body) = http("POST", &control, "/instances/0/kill", "")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(a.ping().await.is_err());
    let (code, body) = http("POST", &control, "/instances/0/restart", "")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let mut a = conn(&sql0, "root", "", Some("test")).await.unwrap();
    assert_eq!(
        a.query_first::<i64, _>("SELECT COUNT(*) FROM kv")
            .await
            .unwrap(),
        Some(1)
    );

    let (code, body) = http("GET", &control, "/instances", "").await.unwrap();
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let states: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["serving", "stopped", "serving"]);
    assert_eq!(
        http("POST", &control, "/instances/9/kill", "")
            .await
            .unwrap()
            .0,
        404
    );

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status}");
}

//! `/api/debug/pprof/profile?seconds=N`: while clients query through the
//! proxy, a CPU profile comes back in pprof's format (gzip-compressed
//! `profile.proto`, what `go tool pprof` reads) with samples in the
//! proxy's own functions; a bad `seconds` gets 400 and a second profile
//! while one is taken gets 409.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mysql_async::Conn;
use mysql_async::prelude::*;
use pprof::protos::{Message, Profile};
use tiproxy_tests::{ProxyProcess, TidbDouble, double_opts, http_exchange, http_get};

/// Decodes what the route returned: gzip, then `profile.proto`.
fn decode(body: &[u8]) -> Profile {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut raw)
        .expect("the profile is gzip-compressed");
    Profile::decode(raw.as_slice()).expect("the profile is a pprof profile.proto")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cpu_profile_of_a_busy_proxy_names_its_functions() {
    let cluster = TidbDouble::start(1, 0, &[]);
    let tidb = cluster.instances()[0].sql;
    let proxy = ProxyProcess::start(&[tidb], "");

    // Bad lengths are refused before anything is profiled.
    for bad in ["0", "121", "abc", "-1", "1.5"] {
        let (status, body) = http_get(
            proxy.api,
            &format!("/api/debug/pprof/profile?seconds={bad}"),
        );
        assert_eq!(status, 400, "seconds={bad}: {body}");
        assert!(body.contains("seconds must be"), "{body}");
    }
    let (status, body) = http_get(proxy.api, "/api/debug/pprof/heap");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("only CPU profiles"), "{body}");

    // Clients keep the proxy busy while it is profiled.
    let stop = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut c = Conn::new(double_opts(proxy.sql))
            .await
            .expect("connect through tiproxy");
        let (stop, queries) = (stop.clone(), queries.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let one: Option<i64> = c.query_first("SELECT 1").await.expect("SELECT 1");
                assert_eq!(one, Some(1));
                queries.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let api = proxy.api;
    let first = std::thread::spawn(move || {
        http_exchange(api, "GET", "/api/debug/pprof/profile?seconds=3", "")
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = http_get(proxy.api, "/api/debug/pprof/profile?seconds=1");
    assert_eq!(status, 409, "a second profile while one is taken: {body}");
    let r = tokio::task::spawn_blocking(move || first.join().expect("request thread"))
        .await
        .expect("join");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("a client saw an error");
    }
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/octet-stream")
    );
    assert!(queries.load(Ordering::Relaxed) > 100, "the workload ran");

    let p = decode(&r.body);
    let s = |i: i64| {
        p.string_table
            .get(i as usize)
            .map(String::as_str)
            .unwrap_or("")
    };
    let types: Vec<(&str, &str)> = p.sample_type.iter().map(|t| (s(t.ty), s(t.unit))).collect();
    assert!(
        types.contains(&("cpu", "nanoseconds")),
        "sample types {types:?}"
    );
    let samples: i64 = p
        .sample
        .iter()
        .map(|x| x.value.first().copied().unwrap_or(0))
        .sum();
    assert!(
        samples >= 10,
        "only {samples} samples in 3 s of a busy proxy"
    );
    assert!(
        (2_500_000_000..=10_000_000_000).contains(&p.duration_nanos),
        "the profile lasted {} ns, not about 3 s",
        p.duration_nanos
    );
    let functions: Vec<&str> = p.function.iter().map(|f| s(f.name)).collect();
    for ours in ["tiproxy_runtime::", "tiproxy_core::"] {
        assert!(
            functions.iter().any(|f| f.contains(ours)),
            "no {ours} function among {} sampled functions: {:?}",
            functions.len(),
            &functions[..functions.len().min(40)]
        );
    }

    // The profiler is free again.
    let (status, body) = http_get(proxy.api, "/api/debug/pprof/profile?seconds=1");
    assert_eq!(status, 200, "{body}");
    let log = proxy.log.lock().expect("log").clone();
    assert!(!log.contains("panicked"), "{log}");
}

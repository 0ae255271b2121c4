use super::*;

fn parse(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
    Config::from_toml(text, Path::new("proxy.toml"))
}

#[test]
fn health_check_durations_and_policy_are_checked() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("3").unwrap_err().contains("no unit"));
    assert!(parse_duration("fast").is_err());
    let (c, _) =
        parse("[health-check]\nstatus-interval = \"200ms\"\nfailure-threshold = 3\n").unwrap();
    assert_eq!(
        c.health_check.durations().status_interval,
        Duration::from_millis(200)
    );
    assert_eq!(c.health_check.durations().interval, Duration::from_secs(3));
    let e = parse("[health-check]\ninterval = \"3\"\n").unwrap_err();
    assert_eq!(e.key, "health-check.interval");
    let e = parse("[health-check]\nmetrics-interval = \"1ms\"\n").unwrap_err();
    assert!(e.message.contains("out of range"), "{e:?}");
    let e = parse("[health-check]\nfailure-threshold = 0\n").unwrap_err();
    assert_eq!(e.key, "health-check.failure-threshold");
    let e = parse("[balance]\npolicy = \"fastest\"\n").unwrap_err();
    assert_eq!(e.key, "balance.policy");
    let (c, _) = parse("[balance]\npolicy = \"location\"\n").unwrap();
    assert_eq!(c.balance.policy, "location");
}

#[test]
fn defaults_match_tiproxy() {
    let (c, w) = parse("").unwrap();
    assert!(w.is_empty());
    assert_eq!(c.proxy.addr, "0.0.0.0:6000");
    assert_eq!(c.api.addr, "0.0.0.0:3080");
    assert_eq!(c.proxy.graceful_close_conn_timeout, 15);
    assert_eq!(
        c.proxy.effective_pd_addrs(),
        vec!["127.0.0.1:2379".to_string()]
    );
    assert_eq!(c.proxy.buffer_limit(), 32 * 1024);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.security.server_tls.min_tls_version, "1.2");
}

#[test]
fn backend_addrs_without_pd_mean_static() {
    let (c, _) = parse("[proxy]\nbackend-addrs = [\"127.0.0.1:4000\"]\n").unwrap();
    assert!(c.proxy.effective_pd_addrs().is_empty());
    let (c, _) = parse("[proxy]\npd-addrs = \"\"\n").unwrap();
    assert!(c.proxy.effective_pd_addrs().is_empty());
}

#[test]
fn backends_with_status_ports() {
    let (c, _) = parse(
        "[proxy]\nbackend-addrs = [\"a:4000\", { addr = \"b:4000\", status-addr = \"b:10080\" }]\n",
    )
    .unwrap();
    assert_eq!(c.proxy.backend_addrs[0].addr(), "a:4000");
    assert_eq!(c.proxy.backend_addrs[1].status_addr(), Some("b:10080"));
    let e = parse("[proxy]\nbackend-addrs = [{ addr = \"b:4000\", status-addr = \"x\" }]\n")
        .unwrap_err();
    assert_eq!(e.key, "proxy.backend-addrs.status-addr");
}

#[test]
fn unknown_keys_warn() {
    let (_, w) = parse("foo = 1\n[proxy]\nadr = \"x\"\n").unwrap();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[1].contains("proxy.adr"), "{w:?}");
}

#[test]
fn bad_values_name_file_and_key() {
    let e = parse("[proxy]\nmax-connections = \"many\"\n").unwrap_err();
    assert!(e.to_string().contains("proxy.toml"), "{e}");
    assert!(e.to_string().contains("max-connections"), "{e}");
    let e = parse("[proxy]\nproxy-protocol = \"v1\"\n").unwrap_err();
    assert_eq!(e.key, "proxy.proxy-protocol");
    let e = parse("[proxy]\nconn-buffer-size = 10\n").unwrap_err();
    assert_eq!(e.key, "proxy.conn-buffer-size");
    let e = parse("[proxy]\nbackend-addrs = [\"nohost\"]\n").unwrap_err();
    assert_eq!(e.key, "proxy.backend-addrs");
    let e =
        parse("[security.server-tls]\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"\n")
            .unwrap_err();
    assert_eq!(e.key, "security.server-tls.cert");
    let e = parse("[log]\nlevel = \"loud\"\n").unwrap_err();
    assert_eq!(e.key, "log.level");
}

#[test]
fn a_patch_replaces_only_the_keys_it_names() {
    let (base, _) = parse("[proxy]\nmax-connections = 3\naddr = \"127.0.0.1:7\"\n").unwrap();
    let (c, _) = base
        .patch("[log]\nlevel = \"debug\"\n", Path::new("p"))
        .unwrap();
    assert_eq!(c.proxy.max_connections, 3);
    assert_eq!(c.proxy.addr, "127.0.0.1:7");
    assert_eq!(c.log.level, "debug");
    let e = base.patch("[proxy\n", Path::new("p")).unwrap_err();
    assert!(e.message.contains("malformed TOML"), "{e}");
    let e = base
        .patch("[proxy]\nconn-buffer-size = 3\n", Path::new("p"))
        .unwrap_err();
    assert_eq!(e.key, "proxy.conn-buffer-size");
}

#[test]
fn shipped_config_loads_without_warnings() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/proxy.toml");
    let (_, w) = Config::load(&path).unwrap();
    assert!(w.is_empty(), "{w:?}");
}

#[test]
fn keepalive_takes_seconds_or_tiproxy_durations_within_the_kernels_limits() {
    let (c, _) = parse(
        "[proxy.backend-healthy-keepalive]\nidle = \"1m\"\nintvl = 2\ntimeout = \"500ms\"\n\
         [proxy.frontend-keepalive]\nenabled = false\n",
    )
    .unwrap();
    let k = &c.proxy.backend_healthy_keepalive;
    assert_eq!((k.idle, k.intvl, k.cnt, k.timeout), (60, 2, 5, 1));
    assert!(!c.proxy.frontend_keepalive.enabled);
    let e = parse("[proxy.backend-unhealthy-keepalive]\nidle = 40000\n").unwrap_err();
    assert_eq!(e.key, "proxy.backend-unhealthy-keepalive.idle");
    let e = parse("[proxy.frontend-keepalive]\ncnt = 128\n").unwrap_err();
    assert_eq!(e.key, "proxy.frontend-keepalive.cnt");
    let e = parse("[proxy.frontend-keepalive]\nidle = \"soon\"\n").unwrap_err();
    assert!(e.message.contains("soon"), "{e:?}");
}

/// TiProxy's reload classes of the keys issue 16 left: `proxy-protocol`
/// and `backend-clusters` are reloadable there (and applied here);
/// `advertise-addr` is not (TiProxy registers it once), so a change says
/// a restart is needed.
#[test]
fn reload_classes_follow_tiproxy() {
    let (old, _) = parse("[proxy]\npd-addrs = \"a:1\"").unwrap();
    let (new, _) = parse(
        "[proxy]\npd-addrs = \"a:1\"\nproxy-protocol = \"v2\"\nadvertise-addr = \"tiproxy-0.svc\"\n\
         [[proxy.backend-clusters]]\nname = \"c\"\npd-addrs = \"b:1\"",
    )
    .unwrap();
    let (live, restart) = super::classify(&old, &new, true);
    assert!(live.iter().any(|k| k == "proxy.proxy-protocol"), "{live:?}");
    assert!(
        live.iter().any(|k| k.starts_with("proxy.backend-clusters")),
        "{live:?}"
    );
    assert_eq!(restart, vec!["proxy.advertise-addr".to_string()]);
}

#[test]
fn session_protection_delay_is_a_duration_up_to_ten_seconds() {
    let (c, _) = parse("").unwrap();
    assert_eq!(c.proxy.protect().delay_ms, 200);
    let (c, _) = parse("[proxy]\nsession-protection-delay = \"1.5s\"\n").unwrap();
    assert_eq!(c.proxy.protect().delay_ms, 1500);
    let (c, _) = parse("[proxy]\nsession-protection-delay = \"0s\"\n").unwrap();
    assert_eq!(c.proxy.protect().delay_ms, 0);
    for bad in ["\"11s\"", "\"soon\"", "200"] {
        let e = parse(&format!("[proxy]\nsession-protection-delay = {bad}\n")).unwrap_err();
        assert!(
            e.to_string().contains("session-protection-delay"),
            "{bad}: {e}"
        );
    }
}

//! Handshakes over a pipe with certificates made by rcgen: what each
//! leg accepts and refuses, and what a refusal says.

use super::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::PathBuf;
use std::time::Duration;

/// A private directory for one test's PEM files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("tiproxy-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA that signs certificates into a directory.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    pem: String,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        Ca {
            issuer,
            dir: dir.to_path_buf(),
            pem: pem.display().to_string(),
        }
    }

    fn pem(&self) -> String {
        self.pem.clone()
    }

    /// (cert, key) files for Common Name `cn`, valid for `names`.
    fn sign(&self, cn: &str, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{cn}.pem")),
            self.dir.join(format!("{cn}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }
}

fn tls(ca: &str, cert: &(String, String), allowed: &[&str]) -> TlsConfig {
    TlsConfig {
        ca: ca.to_string(),
        cert: cert.0.clone(),
        key: cert.1.clone(),
        cert_allowed_cn: allowed.iter().map(|s| s.to_string()).collect(),
        ..TlsConfig::default()
    }
}

/// One handshake over a pipe: (client's result, server's result), and
/// a byte each way so a refusal after the client's last flight shows.
async fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    name: &str,
) -> (Result<(), String>, Result<(), std::io::Error>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, b) = tokio::io::duplex(64 * 1024);
    let name = server_name(&format!("{name}:1"));
    let c = async move {
        let mut s = tokio_rustls::TlsConnector::from(client)
            .connect(name, a)
            .await
            .map_err(|e| handshake_failure(&e).unwrap_or_else(|| e.to_string()))?;
        s.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut one = [0u8; 1];
        s.read_exact(&mut one)
            .await
            .map_err(|e| handshake_failure(&e).unwrap_or_else(|| e.to_string()))?;
        Ok(())
    };
    let s = async move {
        let mut s = tokio_rustls::TlsAcceptor::from(server).accept(b).await?;
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await?;
        s.write_all(b"y").await?;
        s.flush().await
    };
    tokio::join!(c, s)
}

#[tokio::test]
async fn cluster_tls_checks_the_chain_and_the_common_name_not_the_host_name() {
    let scratch = Scratch::new("cluster");
    let dir = &scratch.0;
    let ca = Ca::new(dir, "cluster");
    let rogue = Ca::new(dir, "rogue");
    // The peer's certificate names a host nobody dials.
    let tidb = ca.sign("tidb", &["tidb.invalid"]);
    let server = server_config(&tls("", &tidb, &[]), "status", dir)
        .unwrap()
        .unwrap();

    let ok = cluster_config(&tls(&ca.pem(), &("".into(), "".into()), &["tidb", "pd"]))
        .unwrap()
        .unwrap();
    let (c, s) = handshake(ok, server.clone(), "127.0.0.1").await;
    assert_eq!(c, Ok(()));
    assert!(s.is_ok(), "{s:?}");

    let wrong_ca = cluster_config(&tls(&rogue.pem(), &("".into(), "".into()), &[]))
        .unwrap()
        .unwrap();
    let (c, _) = handshake(wrong_ca, server.clone(), "127.0.0.1").await;
    let e = c.unwrap_err();
    assert!(e.contains("not signed by the trusted CA"), "{e}");

    let wrong_cn = cluster_config(&tls(&ca.pem(), &("".into(), "".into()), &["pd"]))
        .unwrap()
        .unwrap();
    let (c, _) = handshake(wrong_cn, server, "127.0.0.1").await;
    let e = c.unwrap_err();
    assert!(
        e.contains(r#"Common Name ["tidb"] is not in security.cluster-tls.cert-allowed-cn ["pd"]"#),
        "{e}"
    );
}

#[test]
fn cluster_tls_is_on_with_a_ca_or_skip_ca_only() {
    let scratch = Scratch::new("cluster-on");
    let dir = &scratch.0;
    let ca = Ca::new(dir, "on");
    let cert = ca.sign("tiproxy", &["tiproxy"]);
    // A certificate alone turns nothing on (TiProxy's rule).
    assert!(cluster_config(&tls("", &cert, &[])).unwrap().is_none());
    assert!(cluster_config(&TlsConfig::default()).unwrap().is_none());
    let skip = TlsConfig {
        skip_ca: true,
        ..TlsConfig::default()
    };
    assert!(cluster_config(&skip).unwrap().is_some());
    assert!(
        cluster_config(&tls(&ca.pem(), &cert, &[]))
            .unwrap()
            .is_some()
    );
    let e = cluster_config(&tls("/nonexistent/ca.pem", &cert, &[])).unwrap_err();
    assert_eq!(e.key, "cluster-tls.ca");
}

#[tokio::test]
async fn server_side_cert_allowed_cn_refuses_unlisted_clients() {
    let scratch = Scratch::new("server");
    let dir = &scratch.0;
    let ca = Ca::new(dir, "api");
    let server_cert = ca.sign("api", &["127.0.0.1"]);
    let server = server_config(
        &tls(&ca.pem(), &server_cert, &[" prometheus ", "tidb"]),
        "server-http-tls",
        dir,
    )
    .unwrap()
    .unwrap();
    for (cn, allowed) in [("prometheus", true), ("intruder", false)] {
        let client = cluster_config(&tls(&ca.pem(), &ca.sign(cn, &[cn]), &[]))
            .unwrap()
            .unwrap();
        let (c, s) = handshake(client, server.clone(), "127.0.0.1").await;
        if allowed {
            assert_eq!(c, Ok(()), "{cn}");
            assert!(s.is_ok(), "{cn}: {s:?}");
        } else {
            assert!(c.is_err(), "{cn}");
            let e = s.unwrap_err();
            assert!(is_certificate_refusal(&e), "{e}");
            let why = handshake_failure(&e).unwrap();
            assert!(
                why.contains("[\"intruder\"] is not in security.server-http-tls.cert-allowed-cn"),
                "{why}"
            );
        }
    }
    // Without a certificate at all: refused as well.
    let anonymous = cluster_config(&TlsConfig {
        ca: ca.pem(),
        ..TlsConfig::default()
    })
    .unwrap()
    .unwrap();
    let (_, s) = handshake(anonymous, server, "127.0.0.1").await;
    let e = s.unwrap_err();
    assert!(is_certificate_refusal(&e), "{e}");
}

#[test]
fn common_names_are_read_from_the_subject() {
    let scratch = Scratch::new("cn");
    let dir = &scratch.0;
    let ca = Ca::new(dir, "cn");
    let (cert, _) = ca.sign("tidb-0", &["x"]);
    let der = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(common_names(&der), vec!["tidb-0".to_string()]);
    assert!(common_names(&CertificateDer::from(vec![1u8, 2, 3])).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_refusals_is_one_line_a_minute() {
    let log = RefusalLog::default();
    let leg = "security.server-http-tls";
    assert!(log.refused(leg, &"1.2.3.4:5", "no"));
    assert!(!log.refused(leg, &"1.2.3.4:6", "no"));
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(!log.refused(leg, &"1.2.3.4:7", "no"));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(log.refused(leg, &"1.2.3.4:8", "no"));
    assert!(!log.refused(leg, &"1.2.3.4:9", "no"));
}

/// The key algorithm, key bits and lifetime of the auto-cert written to a
/// fresh working directory.
fn auto_cert_facts(rsa_key_size: u32, expire: &str) -> (String, usize, i64) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tiproxy-autocert-{}-{n}", std::process::id()));
    let cfg = TlsConfig {
        auto_certs: true,
        rsa_key_size,
        autocert_expire_duration: expire.into(),
        ..TlsConfig::default()
    };
    server_config(&cfg, "server-tls", &dir)
        .expect("auto-certs")
        .expect("TLS on");
    let pem = std::fs::read(dir.join("server-cert.pem")).expect("written");
    let _ = std::fs::remove_dir_all(&dir);
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
    let cert = pem.parse_x509().expect("x509");
    let spki = cert.public_key();
    let bits = match spki.parsed().expect("public key") {
        x509_parser::public_key::PublicKey::RSA(k) => k.key_size(),
        x509_parser::public_key::PublicKey::EC(p) => p.key_size(),
        other => panic!("unexpected key {other:?}"),
    };
    let v = cert.validity();
    let lifetime = v.not_after.timestamp() - v.not_before.timestamp();
    (
        spki.algorithm.algorithm.to_id_string(),
        bits,
        lifetime - 3600,
    )
}

#[test]
fn auto_certs_honour_rsa_key_size_and_expire_duration() {
    const RSA: &str = "1.2.840.113549.1.1.1";
    const EC: &str = "1.2.840.10045.2.1";
    let (alg, bits, life) = auto_cert_facts(0, "");
    assert_eq!((alg.as_str(), bits), (EC, 256), "ECDSA P-256 by default");
    assert_eq!(life, 90 * 24 * 3600, "TiProxy's 90 days");
    let (alg, bits, life) = auto_cert_facts(2048, "48h");
    assert_eq!((alg.as_str(), bits), (RSA, 2048));
    assert_eq!(life, 48 * 3600);
    let (_, bits, _) = auto_cert_facts(1024, "");
    assert_eq!(bits, 2048, "raised to the floor the TLS library accepts");
}

#[test]
fn auto_certs_are_renewed_a_day_before_expiry_or_at_half_a_short_life() {
    let auto = |expire: &str| TlsConfig {
        auto_certs: true,
        autocert_expire_duration: expire.into(),
        ..TlsConfig::default()
    };
    let h = |n: u64| Duration::from_secs(n * 3600);
    assert_eq!(super::renew_after(&auto("")), Some(h(89 * 24)));
    assert_eq!(super::renew_after(&auto("72h")), Some(h(48)));
    assert_eq!(super::renew_after(&auto("24h")), Some(h(12)));
    assert_eq!(
        super::renew_after(&auto("4s")),
        Some(Duration::from_secs(2))
    );
    let files = TlsConfig {
        cert: "/etc/tiproxy/cert.pem".into(),
        ..auto("")
    };
    assert_eq!(super::renew_after(&files), None, "files are not generated");
    assert_eq!(super::renew_after(&TlsConfig::default()), None);
}

/// The client leg's stream takes the traffic keys out of rustls after the
/// handshake (`conn/tls_stream`); the API's tokio-rustls leg never does.
#[test]
fn only_the_client_leg_config_allows_extracting_keys() {
    let dir = std::env::temp_dir().join(format!("tiproxy-extract-{}", std::process::id()));
    let cfg = TlsConfig {
        auto_certs: true,
        ..TlsConfig::default()
    };
    for (key, extract) in [("server-tls", true), ("server-http-tls", false)] {
        let sc = server_config(&cfg, key, &dir)
            .expect("auto-certs")
            .expect("TLS on");
        assert_eq!(sc.enable_secret_extraction, extract, "{key}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

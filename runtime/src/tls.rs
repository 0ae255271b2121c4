//! rustls configurations for every leg: the certificate the proxy shows
//! clients (from files or generated at start), how it checks backends'
//! SQL ports, and how it checks the cluster (PD, TiDB status ports) with
//! `security.cluster-tls`. Also `cert-allowed-cn` (the peer certificate's
//! Common Name must be listed) and the words for a refused handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::TlsConfig;

mod renew;
#[cfg(test)]
mod tests;
mod verify;

pub use renew::renew_after;
pub(crate) use renew::renew_loop;

use verify::{AllowedClientCn, AllowedCn, ClusterVerifier};
pub use verify::{
    CommonNameRefused, RefusalLog, SkipVerify, common_names, describe, handshake_failure,
    is_certificate_refusal,
};

/// A TLS setup problem, naming the config key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    /// The config key.
    pub key: String,
    /// What went wrong.
    pub message: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn versions(min: &str) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    if min == "1.3" {
        TLS13_ONLY
    } else {
        rustls::ALL_VERSIONS
    }
}

fn read_certs(path: &str, key: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError {
            key: key.into(),
            message: format!("cannot read {path}: {e}"),
        })?
        .collect();
    let certs = certs.map_err(|e| TlsError {
        key: key.into(),
        message: format!("bad PEM in {path}: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError {
            key: key.into(),
            message: format!("no certificate in {path}"),
        });
    }
    Ok(certs)
}

/// Lifetime of auto-certs when `autocert-expire-duration` is empty: 90
/// days, TiProxy's `DefaultCertExpiration`.
pub const AUTO_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// Smallest RSA key auto-certs make: smaller sizes are raised to it.
/// TiProxy's floor is 1024; rustls' ring refuses to sign with RSA keys
/// under 2048 bits.
pub const MIN_RSA_KEY_BITS: u32 = 2048;

/// A self-signed certificate for `tiproxy` and `localhost` with its key:
/// ECDSA P-256 unless `rsa-key-size` asks for RSA, valid from an hour ago
/// (clock skew) for `autocert-expire-duration`.
fn auto_cert(cfg: &TlsConfig) -> Result<(rcgen::Certificate, PrivateKeyDer<'static>), String> {
    let key_pair = if cfg.rsa_key_size == 0 {
        rcgen::KeyPair::generate().map_err(|e| e.to_string())?
    } else {
        use rsa::pkcs8::EncodePrivateKey;
        let bits = cfg.rsa_key_size.max(MIN_RSA_KEY_BITS) as usize;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
            .map_err(|e| format!("cannot make an RSA key of {bits} bits: {e}"))?;
        let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
        rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
            .map_err(|e| e.to_string())?
    };
    let lifetime = match cfg.autocert_expire_duration.as_str() {
        "" => AUTO_CERT_LIFETIME,
        d => crate::config::parse_duration(d)?,
    };
    let mut params =
        rcgen::CertificateParams::new(vec!["tiproxy".to_string(), "localhost".to_string()])
            .map_err(|e| e.to_string())?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now
        + time::Duration::try_from(lifetime).map_err(|e| format!("lifetime {lifetime:?}: {e}"))?;
    let cert = params.self_signed(&key_pair).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::try_from(key_pair.serialize_der()).map_err(|e| e.to_string())?;
    Ok((cert, der))
}

fn read_key(path: &str, key: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError {
        key: key.into(),
        message: format!("cannot read a private key from {path}: {e}"),
    })
}

/// The server-side TLS config for clients (`key` = `server-tls`) or for
/// the HTTP API (`server-http-tls`), or `None` when TLS is off. With
/// `auto-certs`, a self-signed certificate is generated and written to
/// `workdir` as `server-cert.pem` or `server-http-cert.pem` (so operators
/// can hand it to clients).
pub fn server_config(
    cfg: &TlsConfig,
    key: &str,
    workdir: &Path,
) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    if !cfg.server_enabled() {
        return Ok(None);
    }
    let (certs, private) = if cfg.cert.is_empty() {
        let (cert, der) = auto_cert(cfg).map_err(|message| TlsError {
            key: format!("{key}.auto-certs"),
            message,
        })?;
        let _ = std::fs::create_dir_all(workdir);
        let file = if key == "server-http-tls" {
            "server-http-cert.pem"
        } else {
            "server-cert.pem"
        };
        let _ = std::fs::write(workdir.join(file), cert.pem());
        (vec![cert.der().clone()], der)
    } else {
        (
            read_certs(&cfg.cert, &format!("{key}.cert"))?,
            read_key(&cfg.key, &format!("{key}.key"))?,
        )
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(&cfg.min_tls_version))
        .map_err(|e| TlsError {
            key: format!("{key}.min-tls-version"),
            message: e.to_string(),
        })?;
    let builder = if cfg.ca.is_empty() {
        if !cfg.cert_allowed_cn.is_empty() {
            tracing::warn!(
                "security.{key}.cert-allowed-cn has no effect without security.{key}.ca: \
                 client certificates are not requested"
            );
        }
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for c in read_certs(&cfg.ca, &format!("{key}.ca"))? {
            roots.add(c).map_err(|e| TlsError {
                key: format!("{key}.ca"),
                message: e.to_string(),
            })?;
        }
        let allowed = AllowedCn::new(cfg, key);
        let mut v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        );
        // TiProxy: with skip-ca a client may come without a certificate
        // (one it shows is still verified); cert-allowed-cn requires one.
        if cfg.skip_ca && allowed.is_none() {
            v = v.allow_unauthenticated();
        }
        let v = v.build().map_err(|e| TlsError {
            key: format!("{key}.ca"),
            message: e.to_string(),
        })?;
        match allowed {
            Some(allowed) => {
                builder.with_client_cert_verifier(Arc::new(AllowedClientCn { inner: v, allowed }))
            }
            None => builder.with_client_cert_verifier(v),
        }
    };
    let mut sc = builder
        .with_single_cert(certs, private)
        .map_err(|e| TlsError {
            key: format!("{key}.cert"),
            message: e.to_string(),
        })?;
    // The client leg seals and opens records itself after the handshake
    // (conn/tls_stream): it takes the traffic keys out of rustls.
    sc.enable_secret_extraction = key == "server-tls";
    Ok(Some(Arc::new(sc)))
}

/// The client-side TLS config towards backends, or `None` when not configured.
pub fn client_config(cfg: &TlsConfig, key: &str) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    if !cfg.client_enabled() {
        return Ok(None);
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(&cfg.min_tls_version))
        .map_err(|e| TlsError {
            key: format!("{key}.min-tls-version"),
            message: e.to_string(),
        })?;
    let builder = if cfg.skip_ca || cfg.ca.is_empty() {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipVerify))
    } else {
        let mut roots = RootCertStore::empty();
        for c in read_certs(&cfg.ca, &format!("{key}.ca"))? {
            roots.add(c).map_err(|e| TlsError {
                key: format!("{key}.ca"),
                message: e.to_string(),
            })?;
        }
        builder.with_root_certificates(roots)
    };
    let cc = if cfg.cert.is_empty() {
        builder.with_no_client_auth()
    } else {
        builder
            .with_client_auth_cert(
                read_certs(&cfg.cert, &format!("{key}.cert"))?,
                read_key(&cfg.key, &format!("{key}.key"))?,
            )
            .map_err(|e| TlsError {
                key: format!("{key}.cert"),
                message: e.to_string(),
            })?
    };
    Ok(Some(Arc::new(cc)))
}

/// The client-side TLS config towards the cluster (`security.cluster-tls`:
/// PD's etcd, TiDB status and metrics ports), or `None` when TLS is off.
/// As TiProxy builds it: with `ca`, the peer's chain must lead to it (the
/// host name is not checked: a TiDB's certificate need not name the address
/// PD lists) and `skip-ca` is ignored; without `ca`, `skip-ca` turns TLS on
/// unverified, and otherwise TLS is off even with a `cert`. `cert` and
/// `key` are shown to peers that ask (etcd's `--client-cert-auth`). With
/// `cert-allowed-cn`, the peer's Common Name must be listed.
pub fn cluster_config(cfg: &TlsConfig) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    const KEY: &str = "cluster-tls";
    if cfg.ca.is_empty() && !cfg.skip_ca {
        if !cfg.cert.is_empty() {
            tracing::warn!(
                "security.cluster-tls has a cert but neither ca nor skip-ca: PD and TiDB \
                 status ports are reached without TLS (as TiProxy does)"
            );
        }
        return Ok(None);
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(&cfg.min_tls_version))
        .map_err(|e| TlsError {
            key: format!("{KEY}.min-tls-version"),
            message: e.to_string(),
        })?;
    let builder = if cfg.ca.is_empty() {
        if !cfg.cert_allowed_cn.is_empty() {
            tracing::warn!(
                "security.cluster-tls.cert-allowed-cn has no effect with skip-ca and no ca: \
                 peer certificates are not verified"
            );
        }
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipVerify))
    } else {
        let mut roots = RootCertStore::empty();
        for c in read_certs(&cfg.ca, &format!("{KEY}.ca"))? {
            roots.add(c).map_err(|e| TlsError {
                key: format!("{KEY}.ca"),
                message: e.to_string(),
            })?;
        }
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ClusterVerifier {
                roots,
                allowed: AllowedCn::new(cfg, KEY),
            }))
    };
    let cc = if cfg.cert.is_empty() {
        builder.with_no_client_auth()
    } else {
        builder
            .with_client_auth_cert(
                read_certs(&cfg.cert, &format!("{KEY}.cert"))?,
                read_key(&cfg.key, &format!("{KEY}.key"))?,
            )
            .map_err(|e| TlsError {
                key: format!("{KEY}.cert"),
                message: e.to_string(),
            })?
    };
    Ok(Some(Arc::new(cc)))
}

/// The client-side TLS config towards TiDB SQL ports from the whole
/// configuration: `sql-tls`, or, with `require-backend-tls` alone, TLS
/// without verification (skip-ca).
pub fn backend_config(cfg: &crate::config::Config) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    match client_config(&cfg.security.sql_tls, "sql-tls")? {
        Some(c) => Ok(Some(c)),
        None if cfg.security.require_backend_tls => client_config(
            &TlsConfig {
                skip_ca: true,
                ..Default::default()
            },
            "sql-tls",
        ),
        None => Ok(None),
    }
}

/// A TLS setup that a reload may replace: a connection takes the one in
/// effect when its handshake starts, so new handshakes use new certificates
/// and established sessions keep theirs.
pub struct Live<T>(std::sync::RwLock<Option<T>>);

impl<T: Clone> Live<T> {
    /// Holds `v` (`None`: TLS off).
    pub fn new(v: Option<T>) -> Self {
        Self(std::sync::RwLock::new(v))
    }

    /// The setup in effect.
    pub fn get(&self) -> Option<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the setup for new handshakes.
    pub fn set(&self, v: Option<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = v;
    }

    /// Whether TLS is on.
    pub fn is_some(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Whether TLS is off.
    pub fn is_none(&self) -> bool {
        !self.is_some()
    }
}

impl<T> std::fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = self.0.read().map(|g| g.is_some()).unwrap_or(false);
        f.debug_tuple("Live").field(&on).finish()
    }
}

/// The server name to present for `host:port`.
pub fn server_name(addr: &str) -> ServerName<'static> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_matches(['[', ']']);
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("tidb".to_string()).expect("static name"))
}

//! rustls configurations for both legs: the certificate the proxy shows
//! clients (from files or generated at start), and how it checks backends.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::TlsConfig;

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
        let ck = rcgen::generate_simple_self_signed(vec![
            "tiproxy".to_string(),
            "localhost".to_string(),
        ])
        .map_err(|e| TlsError {
            key: format!("{key}.auto-certs"),
            message: e.to_string(),
        })?;
        let _ = std::fs::create_dir_all(workdir);
        let file = if key == "server-http-tls" {
            "server-http-cert.pem"
        } else {
            "server-cert.pem"
        };
        let _ = std::fs::write(workdir.join(file), ck.cert.pem());
        let der =
            PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|e| TlsError {
                key: format!("{key}.auto-certs"),
                message: e.to_string(),
            })?;
        (vec![ck.cert.der().clone()], der)
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
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for c in read_certs(&cfg.ca, &format!("{key}.ca"))? {
            roots.add(c).map_err(|e| TlsError {
                key: format!("{key}.ca"),
                message: e.to_string(),
            })?;
        }
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| TlsError {
            key: format!("{key}.ca"),
            message: e.to_string(),
        })?;
        builder.with_client_cert_verifier(v)
    };
    let sc = builder
        .with_single_cert(certs, private)
        .map_err(|e| TlsError {
            key: format!("{key}.cert"),
            message: e.to_string(),
        })?;
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

/// `skip-ca`: accept any peer certificate (signatures still checked).
/// Also `tiproxyctl --insecure`.
#[derive(Debug)]
pub struct SkipVerify;

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

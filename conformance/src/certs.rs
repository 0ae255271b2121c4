//! The test CA and the server certificate MariaDB serves, generated per run
//! and written as PEM files next to the datadir. Never reused, never trusted
//! outside the test.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// PEM files of one generated CA and the server certificate it signed.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The CA certificate (what a verifying client would trust).
    pub ca_cert: PathBuf,
    /// The server certificate, valid for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// The server certificate's private key (PKCS#8).
    pub server_key: PathBuf,
}

/// Generates a CA and a server certificate signed by it into `dir`.
pub fn generate(dir: &Path) -> Result<CertFiles, CertError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tiproxy-rs conformance CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "tiproxy-rs conformance MariaDB");
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let files = CertFiles {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server-cert.pem"),
        server_key: dir.join("server-key.pem"),
    };
    write(&files.ca_cert, &ca_cert.pem())?;
    write(&files.server_cert, &server_cert.pem())?;
    write(&files.server_key, &server_key.serialize_pem())?;
    Ok(files)
}

fn write(path: &Path, text: &str) -> Result<(), CertError> {
    std::fs::write(path, text).map_err(|source| CertError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Why the test certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters or could not sign.
    #[error("generating test certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

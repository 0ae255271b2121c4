//! How a peer's certificate is checked beyond the chain rustls verifies:
//! `cert-allowed-cn` on either side, `cluster-tls`'s chain-only check (as
//! TiProxy's), `skip-ca`; and what a refused handshake is called in logs,
//! with [`RefusalLog`] keeping a flood of refusals to a line a minute.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use super::provider;
use crate::config::TlsConfig;

/// The Common Names in a certificate's subject (none if it cannot be
/// parsed).
pub fn common_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match x509_parser::parse_x509_certificate(cert.as_ref()) {
        Ok((_, c)) => c
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A peer certificate whose Common Name `cert-allowed-cn` does not list.
#[derive(Debug, thiserror::Error)]
#[error(
    "the peer certificate's Common Name {got:?} is not in security.{key}.cert-allowed-cn {allowed:?}"
)]
pub struct CommonNameRefused {
    /// The TLS object (`server-http-tls`, `cluster-tls`, ...).
    pub key: String,
    /// The certificate's Common Names (empty: it has none).
    pub got: Vec<String>,
    /// The list.
    pub allowed: Vec<String>,
}

/// `cert-allowed-cn` of one TLS object: the peer's end-entity certificate
/// must have one of these Common Names (TiProxy's and TiDB's rule; entries
/// are trimmed).
#[derive(Debug, Clone)]
pub(super) struct AllowedCn {
    key: String,
    names: Vec<String>,
}

impl AllowedCn {
    /// `None` when the list is empty (anyone the CA signed is accepted).
    pub(super) fn new(cfg: &TlsConfig, key: &str) -> Option<Self> {
        let names: Vec<String> = cfg
            .cert_allowed_cn
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        (!names.is_empty()).then(|| Self {
            key: key.to_string(),
            names,
        })
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let got = common_names(end_entity);
        if got.iter().any(|cn| self.names.contains(cn)) {
            return Ok(());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(CommonNameRefused {
                key: self.key.clone(),
                got,
                allowed: self.names.clone(),
            })),
        )))
    }
}

/// A server-side client verifier that also applies `cert-allowed-cn`.
#[derive(Debug)]
pub(super) struct AllowedClientCn {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) allowed: AllowedCn,
}

impl ClientCertVerifier for AllowedClientCn {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.allowed.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `cluster-tls` with a CA: the chain must lead to the CA and, with
/// `cert-allowed-cn`, the Common Name be listed; the host name is not
/// checked (TiProxy's client checks the chain alone).
#[derive(Debug)]
pub(super) struct ClusterVerifier {
    pub(super) roots: RootCertStore,
    pub(super) allowed: Option<AllowedCn>,
}

impl ServerCertVerifier for ClusterVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        if let Some(allowed) = &self.allowed {
            allowed.check(end_entity)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        SkipVerify.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        SkipVerify.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SkipVerify.supported_verify_schemes()
    }
}

/// What went wrong in a TLS handshake, in words an operator can act on,
/// when `e` carries a TLS error (`None` otherwise: a reset, a timeout).
pub fn handshake_failure(e: &std::io::Error) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(describe(tls))
}

/// Whether `e` is this side refusing the peer's certificate (as opposed to
/// a peer that went away or spoke no TLS).
pub fn is_certificate_refusal(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
}

/// [`handshake_failure`] for a TLS error itself.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(CertificateError::Other(o)) => o.to_string(),
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the peer's certificate is not signed by the trusted CA (ca)".into()
        }
        E::InvalidCertificate(
            c @ (CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. }),
        ) => format!("the peer's certificate is outside its validity period: {c}"),
        E::InvalidCertificate(c) => format!("the peer's certificate is refused: {c}"),
        E::NoCertificatesPresented => "the peer sent no certificate".into(),
        E::AlertReceived(alert) => format!(
            "the peer refused the handshake ({alert:?}): it may not trust this side's \
             certificate (cert, key), or want one"
        ),
        other => other.to_string(),
    }
}

/// A refused TLS peer is an attack or a misconfiguration: loud, but a
/// flood of them is one line a minute with how many there were.
#[derive(Debug)]
pub struct RefusalLog {
    flood: crate::flood::Flood,
}

/// How often [`RefusalLog`] logs at most.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

impl Default for RefusalLog {
    fn default() -> Self {
        Self {
            flood: crate::flood::Flood::new(REFUSAL_LOG_EVERY),
        }
    }
}

impl RefusalLog {
    /// Notes one refusal of `peer` on `leg` for `why`; logs it unless a
    /// line was logged less than a minute ago (then it is counted into
    /// the next line). Returns whether it logged.
    pub fn refused(&self, leg: &str, peer: &dyn std::fmt::Display, why: &str) -> bool {
        match self.flood.admit() {
            None => false,
            Some(0) => {
                tracing::warn!(%peer, "{leg}: refused a TLS peer: {why}");
                true
            }
            Some(earlier) => {
                tracing::warn!(%peer, refused_since_last_line = earlier, "{leg}: refused a TLS peer: {why}");
                true
            }
        }
    }
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

//! Session tokens: what `SHOW SESSION_STATES` hands out and the
//! `tidb_session_token` plugin accepts on another instance of the cluster.
//!
//! The JSON layout is TiDB's (`username`, `sign-time`, `expire-time`,
//! `signature`); the signature is made with the cluster's key over the JSON
//! without the signature (256 bytes of HMAC-SHA256 blocks, the size of an
//! RSA-2048 signature), where TiDB signs with the private key of
//! `session-token-signing-cert`. The proxy treats tokens as opaque.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::time::{format_rfc3339, parse_rfc3339};

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token document.
    #[error("malformed session token")]
    Malformed,
    /// The signature does not match the cluster's key.
    #[error("verify signature failed")]
    BadSignature,
    /// `now` is past `expire-time`.
    #[error("token expired")]
    Expired,
    /// `sign-time` plus the lifetime is before `now`.
    #[error("token lifetime is too long")]
    TooOld,
    /// Signed for another user.
    #[error("username does not match")]
    WrongUser,
}

#[derive(Debug, Serialize, Deserialize)]
struct TokenDoc {
    username: String,
    #[serde(rename = "sign-time")]
    sign_time: String,
    #[serde(rename = "expire-time")]
    expire_time: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    signature: Option<String>,
}

/// Length of a signature: that of an RSA-2048 signature, TiDB's usual
/// signing key, so tokens are as long as TiDB's (over 250 bytes: the proxy
/// must send them length-encoded).
const SIGNATURE_LEN: usize = 256;

/// Eight HMAC-SHA256 blocks over `[i] ++ content`.
fn signature(key: &[u8], content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNATURE_LEN);
    for i in 0..(SIGNATURE_LEN / 32) as u8 {
        // HMAC takes keys of any length.
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
        m.update(&[i]);
        m.update(content);
        out.extend_from_slice(&m.finalize().into_bytes());
    }
    out
}

/// Signs a token for `username`, valid for `lifetime` from `now`.
pub fn sign(key: &[u8], username: &str, now: SystemTime, lifetime: Duration) -> String {
    let mut doc = TokenDoc {
        username: username.to_string(),
        sign_time: format_rfc3339(now),
        expire_time: format_rfc3339(now + lifetime),
        signature: None,
    };
    // Serializing strings cannot fail.
    let content = serde_json::to_vec(&doc).unwrap_or_default();
    doc.signature = Some(BASE64.encode(signature(key, &content)));
    serde_json::to_string(&doc).unwrap_or_default()
}

/// Checks a token as TiDB's `ValidateSessionToken` does: signature, expiry,
/// age, then the user name (ignoring case).
pub fn validate(
    key: &[u8],
    token: &[u8],
    username: &str,
    now: SystemTime,
    lifetime: Duration,
) -> Result<(), TokenError> {
    let mut doc: TokenDoc = serde_json::from_slice(token).map_err(|_| TokenError::Malformed)?;
    let sig = doc.signature.take().ok_or(TokenError::BadSignature)?;
    let sig = BASE64.decode(sig).map_err(|_| TokenError::BadSignature)?;
    let content = serde_json::to_vec(&doc).map_err(|_| TokenError::Malformed)?;
    let want = signature(key, &content);
    // Compare without an early exit.
    let diff = want
        .iter()
        .zip(&sig)
        .fold(u8::from(want.len() != sig.len()), |acc, (a, b)| {
            acc | (a ^ b)
        });
    if diff != 0 {
        return Err(TokenError::BadSignature);
    }
    let expire = parse_rfc3339(&doc.expire_time).ok_or(TokenError::Malformed)?;
    let signed = parse_rfc3339(&doc.sign_time).ok_or(TokenError::Malformed)?;
    if now > expire {
        return Err(TokenError::Expired);
    }
    if signed + lifetime < now {
        return Err(TokenError::TooOld);
    }
    if !doc.username.eq_ignore_ascii_case(username) {
        return Err(TokenError::WrongUser);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_token_is_good_for_its_user_until_it_expires() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let t = sign(b"k", "app", now, MIN);
        assert!(
            t.starts_with(r#"{"username":"app","sign-time":"2023-11-14T22:13:20Z","#),
            "{t}"
        );
        assert!(
            t.len() > 250,
            "as long as TiDB's RSA-signed tokens: {}",
            t.len()
        );
        assert_eq!(validate(b"k", t.as_bytes(), "APP", now, MIN), Ok(()));
        assert_eq!(
            validate(b"k", t.as_bytes(), "root", now, MIN),
            Err(TokenError::WrongUser)
        );
        assert_eq!(
            validate(b"other", t.as_bytes(), "app", now, MIN),
            Err(TokenError::BadSignature)
        );
        let later = now + MIN + Duration::from_secs(1);
        assert_eq!(
            validate(b"k", t.as_bytes(), "app", later, MIN),
            Err(TokenError::Expired)
        );
        let forged = t.replace("\"app\"", "\"root\"");
        assert_eq!(
            validate(b"k", forged.as_bytes(), "root", now, MIN),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            validate(b"k", b"not json", "app", now, MIN),
            Err(TokenError::Malformed)
        );
    }
}

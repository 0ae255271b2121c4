//! Auto-cert renewal: a certificate the proxy generated (`auto-certs`) is
//! made again before it expires, and new handshakes get the new one
//! (established connections keep theirs). Only generated certificates:
//! certificate files are re-read by the reload path, not here.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::TlsConfig;
use crate::net::Network;
use crate::state::State;

/// How long before expiry an auto-cert is made again: TiProxy's
/// `recreateAutoCertAdvance` (24 h), or half the lifetime when that is
/// shorter than 48 h (TiProxy renews on a 90-day schedule whatever the
/// lifetime, so a short `autocert-expire-duration` would expire first).
const RENEW_AHEAD: Duration = Duration::from_secs(24 * 3600);

/// After a failed renewal, the next try: TiProxy's cert retry interval.
const RETRY: Duration = Duration::from_secs(5 * 60);

/// Longest sleep: a reload may turn auto-certs on or shorten a lifetime.
const RECHECK: Duration = Duration::from_secs(60);

/// How long after it is made an auto-cert of `cfg` is made again, or
/// `None` when `cfg` does not generate one.
pub fn renew_after(cfg: &TlsConfig) -> Option<Duration> {
    if !cfg.auto_certs || !cfg.cert.is_empty() {
        return None;
    }
    let lifetime = match cfg.autocert_expire_duration.as_str() {
        "" => super::AUTO_CERT_LIFETIME,
        d => crate::config::parse_duration(d).unwrap_or(super::AUTO_CERT_LIFETIME),
    };
    Some(lifetime - RENEW_AHEAD.min(lifetime / 2))
}

/// Keeps the auto-certs of `server-tls` and `server-http-tls` fresh for as
/// long as the proxy runs.
pub(crate) async fn renew_loop<N: Network>(st: Arc<State<N>>) {
    // When each leg's certificate is due; the ones made at start-up count
    // from now.
    let mut due: [Option<Instant>; 2] = [None; 2];
    loop {
        let cfg = st.live_config();
        let now = Instant::now();
        let mut wake = now + RECHECK;
        for (i, (leg, key)) in [
            (&cfg.security.server_tls, "server-tls"),
            (&cfg.security.server_http_tls, "server-http-tls"),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(after) = renew_after(leg) else {
                due[i] = None;
                continue;
            };
            let at = *due[i].get_or_insert(now + after);
            if now >= at {
                due[i] = Some(match super::server_config(leg, key, &cfg.workdir()) {
                    Ok(c) => {
                        let acceptor = c.map(tokio_rustls::TlsAcceptor::from);
                        if key == "server-tls" {
                            st.shared.server_tls.set(acceptor);
                        } else {
                            st.api_tls.set(acceptor);
                        }
                        info!("security.{key}: auto-cert renewed before it expires");
                        now + after
                    }
                    Err(e) => {
                        warn!("security.{e}; the auto-cert in use expires soon, retrying");
                        now + RETRY.min(after)
                    }
                });
            }
            wake = wake.min(due[i].unwrap_or(wake));
        }
        tokio::select! {
            biased;
            _ = st.stopped.notified() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

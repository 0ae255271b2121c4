//! The TLS record layer after the handshake, without rustls' connection.
//!
//! rustls runs the handshake; then
//! `UnbufferedServerConnection::dangerous_into_kernel_connection` hands
//! over the traffic keys, the sequence numbers and (TLS 1.3) a small
//! [`KernelConnection`] that derives the next keys on a key update. Records
//! are sealed and opened here with ring's AEADs, as rustls' ring provider
//! does (`rustls/src/crypto/ring/{tls12,tls13}.rs`):
//! - TLS 1.3 (RFC 8446 section 5.2): type 23, inner plaintext = data ||
//!   content type || zero padding, nonce = iv XOR seq, AAD = the header;
//! - TLS 1.2 AES-GCM (RFC 5288): an 8-byte explicit nonce before the
//!   ciphertext; rustls' extracted iv is its 4-byte salt || the 8 bytes it
//!   XORs the sequence number into, so the nonce is iv XOR seq and its
//!   last 8 bytes go on the wire; received records use salt || explicit;
//! - TLS 1.2 ChaCha20-Poly1305 (RFC 7905): nonce = iv XOR seq;
//! - TLS 1.2 AAD: seq || type || version || plaintext length.
//!
//! After the handshake a client may send application data, alerts, and
//! (TLS 1.3) KeyUpdate; a TLS 1.2 ClientHello (renegotiation) is refused
//! with a warning `no_renegotiation` the first time and a fatal alert the
//! second, as rustls does. Anything else is a fatal alert.

use std::io;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{
    CipherSuite, ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite,
};

const HEADER: usize = 5;
const TAG: usize = 16;
const GCM_EXPLICIT: usize = 8;
/// Largest plaintext in one record.
pub(super) const MAX_FRAGMENT: usize = 1 << 14;
/// Largest ciphertext TLS 1.3 allows (RFC 8446 section 5.2).
const MAX_CIPHERTEXT_13: usize = MAX_FRAGMENT + 256;
/// Largest ciphertext TLS 1.2 allows (RFC 5246 section 6.2.3).
const MAX_CIPHERTEXT_12: usize = MAX_FRAGMENT + 2048;
/// Sequence numbers stop here (rustls' soft limit): never near a wrap.
const SEQ_LIMIT: u64 = 0xffff_ffff_ffff_0000;
/// KeyUpdates in a row without application data before it is abuse
/// (rustls and BoringSSL: 32).
const MAX_KEY_UPDATES: u8 = 32;
/// The most one sealed record adds to its plaintext (TLS 1.2 GCM: header,
/// explicit nonce, tag; TLS 1.3: header, content type, tag).
pub(super) const RECORD_OVERHEAD: usize = HEADER + GCM_EXPLICIT + TAG;
/// A KeyUpdate record (TLS 1.3): header, 5-byte message, type, tag.
pub(super) const KEY_UPDATE_RECORD: usize = HEADER + 5 + 1 + TAG;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const CHANGE_CIPHER_SPEC: u8 = 20;

const CLIENT_HELLO: u8 = 1;
const KEY_UPDATE: u8 = 24;

/// Alert descriptions sent here (RFC 8446 section 6).
pub(super) const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const DECODE_ERROR: u8 = 50;
const INTERNAL_ERROR: u8 = 80;
const NO_RENEGOTIATION: u8 = 100;

/// A failure that ends the connection: the alert to send (if any) and
/// the error for the caller.
#[derive(Debug)]
pub(super) struct Fatal {
    pub(super) alert: Option<u8>,
    pub(super) error: io::Error,
}

impl Fatal {
    fn new(alert: u8, message: impl Into<String>) -> Fatal {
        Fatal {
            alert: Some(alert),
            error: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS: {}", message.into()),
            ),
        }
    }
}

/// What one record held.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Opened {
    /// Application data at this range of the input.
    Data(std::ops::Range<usize>),
    /// Handled here (a key update, a refused renegotiation).
    Nothing,
    /// close_notify.
    Closed,
}

/// One direction's key and sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Keys, Fatal> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(Fatal::new(INTERNAL_ERROR, "unsupported cipher suite")),
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| Fatal::new(INTERNAL_ERROR, "bad traffic key"))?;
        let iv: [u8; aead::NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| Fatal::new(INTERNAL_ERROR, "bad traffic iv"))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// iv XOR seq (the sequence number left-padded to the nonce's length).
    fn nonce(&self) -> [u8; aead::NONCE_LEN] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    fn is_gcm(&self) -> bool {
        self.key.algorithm() != &aead::CHACHA20_POLY1305
    }
}

fn tls12_aad(seq: u64, typ: u8, version: [u8; 2], len: usize) -> [u8; 13] {
    let mut aad = [0; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// The record layer of an established connection.
pub(super) struct Records {
    tls13: bool,
    suite: CipherSuite,
    tx: Keys,
    rx: Keys,
    /// Records sealed under one key before it must change (TLS 1.3: a
    /// KeyUpdate; TLS 1.2: the connection closes).
    tx_limit: u64,
    /// TLS 1.3: derives the next keys on a key update.
    kernel: Option<Box<KernelConnection<ServerConnectionData>>>,
    /// The client asked for our KeyUpdate; sent before the next record.
    key_update_due: bool,
    /// KeyUpdates received since the last application data.
    key_updates: u8,
    /// TLS 1.2: a renegotiation was refused once already.
    renegotiation_refused: bool,
    /// TLS 1.2: the warning refusing it is still to be sent.
    refusal_due: bool,
    /// TLS 1.2: bytes of a refused ClientHello still to come in later
    /// handshake records.
    skip_handshake: usize,
}

impl Records {
    /// The server's record layer from what rustls hands over.
    pub(super) fn new(
        secrets: ExtractedSecrets,
        kernel: KernelConnection<ServerConnectionData>,
    ) -> Result<Records, Fatal> {
        let tls13 = kernel.protocol_version() == ProtocolVersion::TLSv1_3;
        let suite = kernel.negotiated_cipher_suite();
        let kernel = tls13.then(|| Box::new(kernel));
        Records::from_parts(tls13, suite, secrets, kernel)
    }

    /// `secrets` from either side (tests seal as the client).
    pub(super) fn from_parts(
        tls13: bool,
        suite: SupportedCipherSuite,
        secrets: ExtractedSecrets,
        kernel: Option<Box<KernelConnection<ServerConnectionData>>>,
    ) -> Result<Records, Fatal> {
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(Records {
            tls13,
            suite: suite.suite(),
            tx: Keys::new(tx_seq, tx)?,
            rx: Keys::new(rx_seq, rx)?,
            tx_limit: confidentiality_limit(suite).min(SEQ_LIMIT),
            kernel,
            key_update_due: false,
            key_updates: 0,
            renegotiation_refused: false,
            refusal_due: false,
            skip_handshake: 0,
        })
    }

    pub(super) fn protocol_version(&self) -> ProtocolVersion {
        if self.tls13 {
            ProtocolVersion::TLSv1_3
        } else {
            ProtocolVersion::TLSv1_2
        }
    }

    pub(super) fn cipher_suite(&self) -> CipherSuite {
        self.suite
    }

    /// Lowers the record limit per key (tests reach it without sealing 16
    /// million records).
    #[cfg(test)]
    pub(super) fn set_tx_limit(&mut self, limit: u64) {
        self.tx_limit = limit;
    }

    #[cfg(test)]
    pub(super) fn tx_seq(&self) -> u64 {
        self.tx.seq
    }

    /// Seals one record of any type and size as it is (tests build what a
    /// misbehaving peer would send).
    #[cfg(test)]
    pub(super) fn seal_raw(&mut self, typ: u8, data: &[u8], out: &mut Vec<u8>) {
        let at = out.len();
        out.resize(at + data.len() + RECORD_OVERHEAD, 0);
        let n = self.seal_record(typ, data, &mut out[at..]).unwrap();
        out.truncate(at + n);
    }

    /// Whether a record of ours waits to be sealed (see [`Self::seal_due`]).
    pub(super) fn has_due(&self) -> bool {
        self.key_update_due || self.refusal_due
    }

    /// Room [`Self::seal_data`] may need for `len` bytes of data: its
    /// records, what is due before them, and a KeyUpdate at the limit.
    pub(super) const fn sealed_len(len: usize) -> usize {
        let records = if len == 0 {
            1
        } else {
            len.div_ceil(MAX_FRAGMENT)
        };
        len + records * (RECORD_OVERHEAD + KEY_UPDATE_RECORD) + 2 * KEY_UPDATE_RECORD
    }

    /// Seals what is owed to the client before more data (our KeyUpdate,
    /// a renegotiation's refusal) into `out` (at least
    /// [`KEY_UPDATE_RECORD`] long); returns the bytes written.
    pub(super) fn seal_due(&mut self, out: &mut [u8]) -> Result<usize, Fatal> {
        if std::mem::take(&mut self.refusal_due) {
            return self.seal_alert(NO_RENEGOTIATION, out);
        }
        if std::mem::take(&mut self.key_update_due) {
            return self.seal_key_update(out);
        }
        Ok(0)
    }

    /// Seals `data` as application data records into `out` (at least
    /// [`Self::sealed_len`] long); returns the bytes written.
    pub(super) fn seal_data(&mut self, data: &[u8], out: &mut [u8]) -> Result<usize, Fatal> {
        let mut at = self.seal_due(out)?;
        for part in data.chunks(MAX_FRAGMENT) {
            at += self.seal(APPLICATION_DATA, part, &mut out[at..])?;
        }
        Ok(at)
    }

    /// Seals an alert (fatal unless close_notify or no_renegotiation).
    pub(super) fn seal_alert(&mut self, description: u8, out: &mut [u8]) -> Result<usize, Fatal> {
        let level = match description {
            CLOSE_NOTIFY | NO_RENEGOTIATION => 1,
            _ => 2,
        };
        self.seal(ALERT, &[level, description], out)
    }

    fn seal_key_update(&mut self, out: &mut [u8]) -> Result<usize, Fatal> {
        // update_not_requested: it answers the client's, or it is ours.
        let n = self.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
        let Some(kernel) = self.kernel.as_mut() else {
            return Err(Fatal::new(INTERNAL_ERROR, "key update without TLS 1.3"));
        };
        let (seq, secrets) = kernel
            .update_tx_secret()
            .map_err(|e| Fatal::new(INTERNAL_ERROR, format!("key update: {e}")))?;
        self.tx = Keys::new(seq, secrets)?;
        Ok(n)
    }

    /// Seals one record, changing keys first when the current one has
    /// sealed all it may.
    fn seal(&mut self, typ: u8, data: &[u8], out: &mut [u8]) -> Result<usize, Fatal> {
        let mut at = 0;
        if self.tx.seq + 1 >= self.tx_limit {
            if !self.tls13 || self.kernel.is_none() {
                return Err(Fatal {
                    alert: None,
                    error: io::Error::other(
                        "TLS: the cipher suite's record limit is reached; reconnect",
                    ),
                });
            }
            // The KeyUpdate is the old key's last record.
            at = self.seal_key_update(out)?;
        }
        Ok(at + self.seal_record(typ, data, &mut out[at..])?)
    }

    fn seal_record(&mut self, typ: u8, data: &[u8], out: &mut [u8]) -> Result<usize, Fatal> {
        if self.tx.seq >= SEQ_LIMIT {
            return Err(Fatal::new(INTERNAL_ERROR, "sequence numbers exhausted"));
        }
        let nonce = self.tx.nonce();
        let (body_at, body_len, outer, len) = if self.tls13 {
            (
                HEADER,
                data.len() + 1,
                APPLICATION_DATA,
                data.len() + 1 + TAG,
            )
        } else if self.tx.is_gcm() {
            let at = HEADER + GCM_EXPLICIT;
            (at, data.len(), typ, GCM_EXPLICIT + data.len() + TAG)
        } else {
            (HEADER, data.len(), typ, data.len() + TAG)
        };
        let total = HEADER + len;
        let out = &mut out[..total];
        out[..HEADER].copy_from_slice(&[outer, 3, 3, (len >> 8) as u8, len as u8]);
        out[body_at..body_at + data.len()].copy_from_slice(data);
        let aad = if self.tls13 {
            out[body_at + data.len()] = typ;
            let mut a = [0; 13];
            a[..HEADER].copy_from_slice(&out[..HEADER]);
            (a, HEADER)
        } else {
            if self.tx.is_gcm() {
                out[HEADER..body_at].copy_from_slice(&nonce[4..]);
            }
            (tls12_aad(self.tx.seq, typ, [3, 3], data.len()), 13)
        };
        let (body, tag) = out[body_at..].split_at_mut(body_len);
        let t = self
            .tx
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad.0[..aad.1]),
                body,
            )
            .map_err(|_| Fatal::new(INTERNAL_ERROR, "encryption failed"))?;
        tag.copy_from_slice(t.as_ref());
        self.tx.seq += 1;
        Ok(total)
    }

    /// Opens the first record of `input` in place. `None`: the record is
    /// not complete yet (`input` is kept as it is). Otherwise the bytes
    /// the record took and what it held.
    pub(super) fn open(&mut self, input: &mut [u8]) -> Result<Option<(usize, Opened)>, Fatal> {
        let Some(header) = input.get(..HEADER) else {
            return Ok(None);
        };
        let (typ, version) = (header[0], [header[1], header[2]]);
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        let known = if self.tls13 {
            typ == APPLICATION_DATA
        } else {
            matches!(typ, APPLICATION_DATA | ALERT | HANDSHAKE)
        };
        if !known {
            let what = match typ {
                CHANGE_CIPHER_SPEC => "a ChangeCipherSpec".to_string(),
                ALERT => "an unencrypted alert".to_string(),
                HANDSHAKE => "an unencrypted handshake message".to_string(),
                t => format!("a record of type {t}"),
            };
            return Err(Fatal::new(
                UNEXPECTED_MESSAGE,
                format!("the client sent {what} after the handshake"),
            ));
        }
        if version[0] != 3 {
            return Err(Fatal::new(DECODE_ERROR, "a record with a bad version"));
        }
        let max = if self.tls13 {
            MAX_CIPHERTEXT_13
        } else {
            MAX_CIPHERTEXT_12
        };
        if len > max {
            return Err(Fatal::new(
                RECORD_OVERFLOW,
                format!("a record of {len} bytes (at most {max})"),
            ));
        }
        let Some(record) = input.get_mut(..HEADER + len) else {
            return Ok(None);
        };
        if self.rx.seq >= SEQ_LIMIT {
            return Err(Fatal::new(INTERNAL_ERROR, "sequence numbers exhausted"));
        }
        let (typ, data) = if self.tls13 {
            self.open13(record)?
        } else {
            self.open12(typ, version, record)?
        };
        self.rx.seq += 1;
        let opened = self.received(typ, &record[data.clone()], data)?;
        Ok(Some((HEADER + len, opened)))
    }

    /// Decrypts a TLS 1.3 record; the inner content type and the range of
    /// its content.
    fn open13(&mut self, record: &mut [u8]) -> Result<(u8, std::ops::Range<usize>), Fatal> {
        let (header, body) = record.split_at_mut(HEADER);
        if body.len() < TAG + 1 {
            return Err(bad_record_mac());
        }
        let plain = self
            .rx
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(self.rx.nonce()),
                Aad::from(&header[..]),
                body,
            )
            .map_err(|_| bad_record_mac())?;
        // Padding, then the content type: the last non-zero byte.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(Fatal::new(
                UNEXPECTED_MESSAGE,
                "a record without a content type",
            ));
        };
        if end > MAX_FRAGMENT {
            return Err(Fatal::new(RECORD_OVERFLOW, "a record over 16 KiB"));
        }
        Ok((plain[end], HEADER..HEADER + end))
    }

    /// Decrypts a TLS 1.2 record; its content type and the range of its
    /// content.
    fn open12(
        &mut self,
        typ: u8,
        version: [u8; 2],
        record: &mut [u8],
    ) -> Result<(u8, std::ops::Range<usize>), Fatal> {
        let gcm = self.rx.is_gcm();
        let explicit = if gcm { GCM_EXPLICIT } else { 0 };
        let body_len = record.len() - HEADER;
        if body_len < explicit + TAG {
            return Err(bad_record_mac());
        }
        let plain_len = body_len - explicit - TAG;
        let nonce = if gcm {
            let mut n = [0; aead::NONCE_LEN];
            n[..4].copy_from_slice(&self.rx.iv[..4]);
            n[4..].copy_from_slice(&record[HEADER..HEADER + GCM_EXPLICIT]);
            n
        } else {
            self.rx.nonce()
        };
        let aad = tls12_aad(self.rx.seq, typ, version, plain_len);
        let at = HEADER + explicit;
        self.rx
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut record[at..],
            )
            .map_err(|_| bad_record_mac())?;
        if plain_len > MAX_FRAGMENT {
            return Err(Fatal::new(RECORD_OVERFLOW, "a record over 16 KiB"));
        }
        Ok((typ, at..at + plain_len))
    }

    /// What a decrypted record of type `typ` means.
    fn received(
        &mut self,
        typ: u8,
        content: &[u8],
        range: std::ops::Range<usize>,
    ) -> Result<Opened, Fatal> {
        match typ {
            APPLICATION_DATA => {
                self.key_updates = 0;
                Ok(Opened::Data(range))
            }
            ALERT => match content {
                [_, CLOSE_NOTIFY] => Ok(Opened::Closed),
                [level, d] => Err(Fatal {
                    alert: None,
                    error: io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "TLS: the client sent alert {:?} (level {level})",
                            rustls::AlertDescription::from(*d)
                        ),
                    ),
                }),
                _ => Err(Fatal::new(DECODE_ERROR, "a malformed alert")),
            },
            HANDSHAKE if self.tls13 => self.handshake13(content),
            HANDSHAKE => self.handshake12(content),
            t => Err(Fatal::new(
                UNEXPECTED_MESSAGE,
                format!("a record of content type {t} after the handshake"),
            )),
        }
    }

    /// TLS 1.3 post-handshake messages from a client: only KeyUpdate, a
    /// whole message ending the record (RFC 8446 section 5.1: a key change
    /// is at a record boundary).
    fn handshake13(&mut self, content: &[u8]) -> Result<Opened, Fatal> {
        match content {
            [KEY_UPDATE, 0, 0, 1, request] => {
                if *request > 1 {
                    return Err(Fatal::new(DECODE_ERROR, "a malformed KeyUpdate"));
                }
                self.key_updates += 1;
                if self.key_updates > MAX_KEY_UPDATES {
                    return Err(Fatal::new(
                        UNEXPECTED_MESSAGE,
                        "too many KeyUpdates without data",
                    ));
                }
                let Some(kernel) = self.kernel.as_mut() else {
                    return Err(Fatal::new(INTERNAL_ERROR, "key update without TLS 1.3"));
                };
                let (seq, secrets) = kernel
                    .update_rx_secret()
                    .map_err(|e| Fatal::new(INTERNAL_ERROR, format!("key update: {e}")))?;
                self.rx = Keys::new(seq, secrets)?;
                if *request == 1 {
                    self.key_update_due = true;
                }
                Ok(Opened::Nothing)
            }
            [KEY_UPDATE, ..] => Err(Fatal::new(
                UNEXPECTED_MESSAGE,
                "a KeyUpdate not alone at the end of its record",
            )),
            [t, ..] => Err(Fatal::new(
                UNEXPECTED_MESSAGE,
                format!("handshake message {t} after the handshake"),
            )),
            [] => Err(Fatal::new(UNEXPECTED_MESSAGE, "an empty handshake record")),
        }
    }

    /// TLS 1.2: a ClientHello asks for renegotiation; refused once with a
    /// warning (and the rest of that ClientHello skipped), fatal after.
    fn handshake12(&mut self, content: &[u8]) -> Result<Opened, Fatal> {
        if self.skip_handshake > 0 {
            let n = content.len().min(self.skip_handshake);
            self.skip_handshake -= n;
            if n == content.len() {
                return Ok(Opened::Nothing);
            }
            return self.handshake12(&content[n..]);
        }
        match content {
            [CLIENT_HELLO, a, b, c, rest @ ..] if !self.renegotiation_refused => {
                self.renegotiation_refused = true;
                let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
                self.skip_handshake = len.saturating_sub(rest.len());
                if rest.len() > len {
                    return Err(Fatal::new(
                        UNEXPECTED_MESSAGE,
                        "handshake data after a renegotiation attempt",
                    ));
                }
                self.refusal_due = true;
                Ok(Opened::Nothing)
            }
            [CLIENT_HELLO, ..] => Err(Fatal::new(
                UNEXPECTED_MESSAGE,
                "a second renegotiation attempt",
            )),
            [t, ..] => Err(Fatal::new(
                UNEXPECTED_MESSAGE,
                format!("handshake message {t} after the handshake"),
            )),
            [] => Err(Fatal::new(UNEXPECTED_MESSAGE, "an empty handshake record")),
        }
    }
}

/// Records one key may seal (`CipherSuiteCommon::confidentiality_limit`).
fn confidentiality_limit(suite: SupportedCipherSuite) -> u64 {
    match suite {
        SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
    }
}

fn bad_record_mac() -> Fatal {
    Fatal::new(
        BAD_RECORD_MAC,
        "a record that does not decrypt (bad_record_mac)",
    )
}

//! An optional PROXY v2 header in front of a client's first bytes, told
//! apart as TiProxy does: bytes that start like the 12-byte signature are
//! read until they are a whole header or stop matching; a stream that does
//! not start with the signature is a plain client, its bytes untouched.
//! So with `proxy-protocol = "v2"` a load balancer's connections carry the
//! original client address while direct clients still connect.
//!
//! MySQL clients speak only after the greeting, so the SQL port looks at
//! the client's first bytes after greeting (the connection driver feeds
//! [`HeaderSniff`]); HTTP clients speak first ([`read_optional`]). A
//! header is at most [`MAX_HEADER_LEN`] bytes: that is all ever buffered.

use bytes::Bytes;
use tiproxy_core::proxy_protocol::{MAX_HEADER_LEN, ProxyHeader, ProxyHeaderError};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What the first bytes of a stream turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// They still match the signature, or a header not yet whole.
    NeedMore,
    /// No header: every byte seen so far, for the protocol.
    Plain(Bytes),
    /// A header, and the bytes after it.
    Header(ProxyHeader, Bytes),
    /// A header that cannot be used (unsupported version, too long).
    Invalid(ProxyHeaderError),
}

/// Looks for an optional header in the bytes fed to it.
#[derive(Debug, Default)]
pub struct HeaderSniff {
    buf: Vec<u8>,
}

impl HeaderSniff {
    /// At most how many bytes the next read should bring: a header never
    /// needs more, and none of it is read twice.
    pub fn want(&self) -> usize {
        MAX_HEADER_LEN.saturating_sub(self.buf.len()).max(1)
    }

    /// Feeds the next bytes read.
    pub fn feed(&mut self, data: &[u8]) -> Sniffed {
        self.buf.extend_from_slice(data);
        match ProxyHeader::parse(&self.buf) {
            Ok(None) => Sniffed::NeedMore,
            Ok(Some((h, n))) => {
                let rest = Bytes::copy_from_slice(&self.buf[n..]);
                self.buf = Vec::new();
                Sniffed::Header(h, rest)
            }
            Err(ProxyHeaderError::NoSignature) => {
                Sniffed::Plain(Bytes::from(std::mem::take(&mut self.buf)))
            }
            Err(e) => Sniffed::Invalid(e),
        }
    }

    /// The stream ended before a decision: what was read, as plain bytes.
    pub fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.buf))
    }
}

/// Reads a stream's first bytes until it is clear whether a header opens
/// it: the header if there was one, and the bytes read beyond it (put them
/// back in front of the stream). The caller bounds the time.
pub async fn read_optional<S: AsyncRead + Unpin>(
    s: &mut S,
) -> std::io::Result<(Option<ProxyHeader>, Bytes)> {
    let mut sniff = HeaderSniff::default();
    let mut chunk = vec![0u8; 512];
    loop {
        let want = sniff.want().min(chunk.len());
        let n = s.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok((None, sniff.finish()));
        }
        match sniff.feed(&chunk[..n]) {
            Sniffed::NeedMore => {}
            Sniffed::Plain(b) => return Ok((None, b)),
            Sniffed::Header(h, rest) => return Ok((Some(h), rest)),
            Sniffed::Invalid(e) => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn header() -> (ProxyHeader, Vec<u8>) {
        let h = ProxyHeader::Proxy {
            source: "10.1.2.3:4567".parse().unwrap(),
            destination: "10.0.0.1:6000".parse().unwrap(),
        };
        let mut b = BytesMut::new();
        h.write(&mut b);
        (h, b.to_vec())
    }

    #[test]
    fn a_header_fed_byte_by_byte_is_found_and_what_follows_kept() {
        let (h, mut bytes) = header();
        bytes.extend_from_slice(b"\x05\x00\x00\x01hello");
        let mut s = HeaderSniff::default();
        let n = bytes.len() - 9;
        for b in &bytes[..n - 1] {
            assert_eq!(s.feed(std::slice::from_ref(b)), Sniffed::NeedMore);
        }
        assert_eq!(
            s.feed(&bytes[n - 1..]),
            Sniffed::Header(h, Bytes::from_static(b"\x05\x00\x00\x01hello"))
        );
    }

    #[test]
    fn a_plain_client_gets_its_bytes_back_even_after_a_partial_match() {
        let mut s = HeaderSniff::default();
        // A MySQL packet: its first byte already differs.
        assert_eq!(
            s.feed(b"\x20\x00\x00\x01abc"),
            Sniffed::Plain(Bytes::from_static(b"\x20\x00\x00\x01abc"))
        );
        // The first bytes of the signature, then something else.
        let mut s = HeaderSniff::default();
        assert_eq!(s.feed(b"\r\n\r\n"), Sniffed::NeedMore);
        assert_eq!(
            s.feed(b"GET"),
            Sniffed::Plain(Bytes::from_static(b"\r\n\r\nGET"))
        );
        let mut s = HeaderSniff::default();
        assert_eq!(s.feed(b"\r\n"), Sniffed::NeedMore);
        assert_eq!(s.finish(), Bytes::from_static(b"\r\n"));
    }

    #[test]
    fn an_unusable_header_is_refused_not_buffered() {
        let (_, mut bytes) = header();
        bytes[12] = 0x31; // version 3
        let mut s = HeaderSniff::default();
        assert!(matches!(s.feed(&bytes), Sniffed::Invalid(_)));
        let (_, mut long) = header();
        long[14] = 0xff; // announces 65 KiB
        long[15] = 0xff;
        let mut s = HeaderSniff::default();
        assert!(matches!(
            s.feed(&long),
            Sniffed::Invalid(ProxyHeaderError::TooLong(_))
        ));
    }

    #[tokio::test]
    async fn read_optional_puts_back_what_it_read() {
        let (h, mut bytes) = header();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut r: &[u8] = &bytes;
        let (got, rest) = read_optional(&mut r).await.unwrap();
        assert_eq!(got, Some(h));
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n");
        let mut r: &[u8] = b"GET / HTTP/1.1\r\n";
        let (got, rest) = read_optional(&mut r).await.unwrap();
        assert_eq!(got, None);
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n");
    }
}

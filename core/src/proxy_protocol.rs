//! PROXY protocol version 2: the binary header a load balancer puts before
//! the MySQL stream to carry the original client address, and that the proxy
//! writes before its own backend handshakes when configured.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, BytesMut};

/// The 12-byte signature that opens every v2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Largest header accepted (signature + fixed part + 64 KiB of addresses/TLVs
/// is the protocol maximum; real headers are well under 1 KiB).
pub const MAX_HEADER_LEN: usize = 16 + 4096;

/// A decoded PROXY v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A proxied connection: source and destination addresses.
    Proxy {
        /// Original client address.
        source: SocketAddr,
        /// Address the client connected to.
        destination: SocketAddr,
    },
    /// A connection made by the load balancer itself (health checks); use
    /// the real peer address.
    Local,
}

/// Why a PROXY header could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The stream does not start with the v2 signature.
    #[error("missing PROXY protocol v2 signature")]
    NoSignature,
    /// Version or command nibble not understood.
    #[error("unsupported PROXY protocol version/command byte 0x{0:02x}")]
    Unsupported(u8),
    /// The address block is shorter than its family requires.
    #[error("PROXY header address block too short")]
    Truncated,
    /// The header is longer than the proxy accepts.
    #[error("PROXY header of {0} bytes is too long")]
    TooLong(usize),
}

impl ProxyHeader {
    /// Decodes a header from the start of `buf`. Returns `Ok(None)` while more
    /// bytes are needed, or the header and its length.
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, ProxyHeaderError> {
        let n = buf.len().min(SIGNATURE.len());
        if buf[..n] != SIGNATURE[..n] {
            return Err(ProxyHeaderError::NoSignature);
        }
        if buf.len() < 16 {
            return Ok(None);
        }
        let ver_cmd = buf[12];
        if ver_cmd >> 4 != 2 || ver_cmd & 0x0f > 1 {
            return Err(ProxyHeaderError::Unsupported(ver_cmd));
        }
        let fam = buf[13];
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        let total = 16 + len;
        if total > MAX_HEADER_LEN {
            return Err(ProxyHeaderError::TooLong(total));
        }
        if buf.len() < total {
            return Ok(None);
        }
        if ver_cmd & 0x0f == 0 {
            return Ok(Some((Self::Local, total)));
        }
        let a = &buf[16..total];
        let header = match fam >> 4 {
            1 => {
                if a.len() < 12 {
                    return Err(ProxyHeaderError::Truncated);
                }
                let src = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                let dst = Ipv4Addr::new(a[4], a[5], a[6], a[7]);
                Self::Proxy {
                    source: SocketAddr::new(IpAddr::V4(src), u16::from_be_bytes([a[8], a[9]])),
                    destination: SocketAddr::new(
                        IpAddr::V4(dst),
                        u16::from_be_bytes([a[10], a[11]]),
                    ),
                }
            }
            2 => {
                if a.len() < 36 {
                    return Err(ProxyHeaderError::Truncated);
                }
                let mut s = [0u8; 16];
                let mut d = [0u8; 16];
                s.copy_from_slice(&a[..16]);
                d.copy_from_slice(&a[16..32]);
                Self::Proxy {
                    source: SocketAddr::new(
                        IpAddr::V6(Ipv6Addr::from(s)),
                        u16::from_be_bytes([a[32], a[33]]),
                    ),
                    destination: SocketAddr::new(
                        IpAddr::V6(Ipv6Addr::from(d)),
                        u16::from_be_bytes([a[34], a[35]]),
                    ),
                }
            }
            // AF_UNSPEC or AF_UNIX: no usable address; treat as local.
            _ => Self::Local,
        };
        Ok(Some((header, total)))
    }

    /// Writes the header. Mixed address families are written as IPv6 with
    /// the IPv4 address mapped.
    pub fn write(&self, out: &mut BytesMut) {
        out.put_slice(&SIGNATURE);
        match *self {
            Self::Local => {
                out.put_u8(0x20);
                out.put_u8(0x00);
                out.put_u16(0);
            }
            Self::Proxy {
                source,
                destination,
            } => {
                out.put_u8(0x21);
                match (source.ip(), destination.ip()) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        out.put_u8(0x11);
                        out.put_u16(12);
                        out.put_slice(&s.octets());
                        out.put_slice(&d.octets());
                    }
                    (s, d) => {
                        out.put_u8(0x21);
                        out.put_u16(36);
                        out.put_slice(&to_v6(s).octets());
                        out.put_slice(&to_v6(d).octets());
                    }
                }
                out.put_u16(source.port());
                out.put_u16(destination.port());
            }
        }
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn v4_v6_and_local_round_trip() {
        for h in [
            ProxyHeader::Proxy {
                source: "10.0.0.1:5000".parse().unwrap(),
                destination: "10.0.0.2:6000".parse().unwrap(),
            },
            ProxyHeader::Proxy {
                source: "[::1]:5000".parse().unwrap(),
                destination: "[2001:db8::2]:6000".parse().unwrap(),
            },
            ProxyHeader::Local,
        ] {
            let mut out = BytesMut::new();
            h.write(&mut out);
            out.extend_from_slice(b"trailing mysql bytes");
            let (got, n) = ProxyHeader::parse(&out).unwrap().unwrap();
            assert_eq!(got, h);
            assert_eq!(&out[n..], b"trailing mysql bytes");
            // Every strict prefix asks for more bytes.
            for i in 0..n {
                assert_eq!(ProxyHeader::parse(&out[..i]).unwrap(), None);
            }
        }
    }

    #[test]
    fn mysql_greeting_is_not_a_proxy_header() {
        assert_eq!(
            ProxyHeader::parse(&[0x4a, 0, 0, 0, 10]),
            Err(ProxyHeaderError::NoSignature)
        );
    }

    proptest! {
        #[test]
        fn never_panics(tail in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut buf = SIGNATURE.to_vec();
            buf.extend_from_slice(&tail);
            let _ = ProxyHeader::parse(&buf);
            let _ = ProxyHeader::parse(&tail);
        }
    }
}

//! PROXY protocol versions 1 (text) and 2 (binary), as HAProxy specifies
//! them (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>): the
//! header a load balancer sends before the client's bytes, naming the real
//! client address.
//!
//! [`parse`] is pure and total over any input: it says how many more bytes
//! a header needs, or parses it, or names what is wrong. [`read_header`]
//! reads exactly the header's bytes from a socket (never the client's first
//! bytes after it, which may be a TLS ClientHello) and bounds the header's
//! size at [`MAX_HEADER`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// v1 headers are at most 107 bytes including CRLF (spec 2.1).
pub const MAX_V1: usize = 107;
/// Largest v2 header accepted (16-byte preamble plus addresses and TLVs).
pub const MAX_HEADER: usize = 4096;

/// The 12 bytes that open every v2 header.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// What the header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The proxy relays a client: `source` is the client, `destination`
    /// the address the client connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// A connection of the proxy's own (v2 LOCAL, e.g. a health check): the
    /// TCP peer is the real peer.
    Local,
    /// The proxy does not know the addresses (v1 UNKNOWN, v2 UNSPEC/UNIX):
    /// the TCP peer is used.
    Unknown,
}

/// Result of [`parse`] on the bytes received so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The header is complete and took this many bytes.
    Done(ProxyHeader, usize),
    /// At least this many more bytes are needed.
    Incomplete(usize),
}

/// Why a header is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 header longer than 107 bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("unsupported PROXY v2 version or command byte {0:#04x}")]
    V2Command(u8),
    #[error("unsupported PROXY v2 family/protocol byte {0:#04x}")]
    V2Family(u8),
    #[error("PROXY v2 address block of {0} bytes is too short for its family")]
    V2Short(usize),
    #[error("PROXY v2 header of {0} bytes is above the limit")]
    V2TooLong(usize),
    #[error("connection closed inside the PROXY header")]
    Eof,
    #[error("reading the PROXY header: {0}")]
    Io(String),
}

/// Parses a PROXY header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    // Decide the version as soon as the first bytes disagree with one.
    let v2_prefix = buf.len().min(V2_SIGNATURE.len());
    if buf[..v2_prefix] == V2_SIGNATURE[..v2_prefix] && !buf.is_empty() {
        return parse_v2(buf);
    }
    let v1_prefix = buf.len().min(V1_PREFIX.len());
    if buf[..v1_prefix] == V1_PREFIX[..v1_prefix] {
        return parse_v1(buf);
    }
    if buf.is_empty() {
        return Ok(Parsed::Incomplete(1));
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() >= MAX_V1 {
            return Err(ProxyError::V1TooLong);
        }
        return Ok(Parsed::Incomplete(1));
    };
    if lf + 1 > MAX_V1 {
        return Err(ProxyError::V1TooLong);
    }
    let line = buf[..lf].strip_suffix(b"\r").ok_or(ProxyError::V1("no CR before LF"))?;
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1("not ASCII"))?;
    let mut words = line.split(' ');
    if words.next() != Some("PROXY") {
        return Err(ProxyError::V1("no PROXY word"));
    }
    let family = words.next().ok_or(ProxyError::V1("no protocol"))?;
    let header = match family {
        // Whatever follows UNKNOWN is ignored (spec 2.1).
        "UNKNOWN" => ProxyHeader::Unknown,
        "TCP4" | "TCP6" => {
            let fields: Vec<&str> = words.collect();
            let [src, dst, sport, dport] = fields.as_slice() else {
                return Err(ProxyError::V1("expected source, destination and two ports"));
            };
            let ip = |s: &str| -> Result<IpAddr, ProxyError> {
                let ip = if family == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| ProxyError::V1("bad address for the protocol"))
            };
            let port = |s: &str| -> Result<u16, ProxyError> {
                let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
                let leading_zero = s.len() > 1 && s.starts_with('0');
                s.parse::<u16>()
                    .ok()
                    .filter(|_| digits && !leading_zero)
                    .ok_or(ProxyError::V1("bad port"))
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(src)?, port(sport)?),
                destination: SocketAddr::new(ip(dst)?, port(dport)?),
            }
        }
        _ => return Err(ProxyError::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Parsed::Done(header, lf + 1))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete(16 - buf.len()));
    }
    let ver_cmd = buf[12];
    let fam = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + len > MAX_HEADER {
        return Err(ProxyError::V2TooLong(16 + len));
    }
    let local = match ver_cmd {
        0x20 => true,
        0x21 => false,
        other => return Err(ProxyError::V2Command(other)),
    };
    if buf.len() < 16 + len {
        return Ok(Parsed::Incomplete(16 + len - buf.len()));
    }
    let total = 16 + len;
    let addrs = &buf[16..total];
    if local {
        // LOCAL: the address block (if any) is ignored (spec 2.2).
        return Ok(Parsed::Done(ProxyHeader::Local, total));
    }
    let (af, proto) = (fam >> 4, fam & 0x0f);
    // Only stream protocols make sense in front of SMTP.
    if !matches!(proto, 0 | 1) {
        return Err(ProxyError::V2Family(fam));
    }
    let header = match af {
        // UNSPEC and UNIX: keep the connection's own addresses.
        0 | 3 => ProxyHeader::Unknown,
        1 => {
            let a: &[u8; 12] = addrs
                .get(..12)
                .and_then(|s| s.try_into().ok())
                .ok_or(ProxyError::V2Short(len))?;
            let ip4 = |s: &[u8]| IpAddr::V4(Ipv4Addr::new(s[0], s[1], s[2], s[3]));
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip4(&a[0..4]), u16::from_be_bytes([a[8], a[9]])),
                destination: SocketAddr::new(ip4(&a[4..8]), u16::from_be_bytes([a[10], a[11]])),
            }
        }
        2 => {
            let a: &[u8; 36] = addrs
                .get(..36)
                .and_then(|s| s.try_into().ok())
                .ok_or(ProxyError::V2Short(len))?;
            let ip6 = |s: &[u8]| {
                let mut o = [0u8; 16];
                o.copy_from_slice(s);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip6(&a[0..16]), u16::from_be_bytes([a[32], a[33]])),
                destination: SocketAddr::new(ip6(&a[16..32]), u16::from_be_bytes([a[34], a[35]])),
            }
        }
        _ => return Err(ProxyError::V2Family(fam)),
    };
    Ok(Parsed::Done(header, total))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn done(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf).unwrap() {
            Parsed::Done(h, n) => (h, n),
            other => panic!("{other:?}"),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The spec's v1 examples (2.1).
    #[test]
    fn v1_spec_examples() {
        let (h, n) = done(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\nEHLO x\r\n");
        assert_eq!(n, 56);
        assert_eq!(
            h,
            ProxyHeader::Proxied {
                source: sa("255.255.255.255:65535"),
                destination: sa("255.255.255.255:65535")
            }
        );
        let v6 = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(parse(v6), Err(ProxyError::V1("bad address for the protocol")));
        let (h, _) = done(b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 25\r\n");
        assert_eq!(
            h,
            ProxyHeader::Proxied {
                source: sa("[2001:db8::1]:40000"),
                destination: sa("[2001:db8::2]:25")
            }
        );
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (ProxyHeader::Unknown, 15));
        let longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), MAX_V1);
        assert_eq!(done(longest), (ProxyHeader::Unknown, MAX_V1));
    }

    #[test]
    fn v1_incomplete_and_malformed() {
        assert_eq!(parse(b""), Ok(Parsed::Incomplete(1)));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete(1)));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(Parsed::Incomplete(1)));
        assert_eq!(parse(b"EHLO x\r\n"), Err(ProxyError::NotProxy));
        assert_eq!(parse(&[b'P'; 1]), Ok(Parsed::Incomplete(1)));
        assert_eq!(parse(&[b'X'; 200]), Err(ProxyError::NotProxy));
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1, b'a');
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \xff\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    fn v2(ver_cmd: u8, fam: u8, addrs: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(ver_cmd);
        b.push(fam);
        b.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        b.extend_from_slice(addrs);
        b
    }

    #[test]
    fn v2_ipv4_ipv6_local_and_tlvs() {
        let mut a = vec![192, 0, 2, 10, 198, 51, 100, 1];
        a.extend_from_slice(&40000u16.to_be_bytes());
        a.extend_from_slice(&25u16.to_be_bytes());
        let h = v2(0x21, 0x11, &a);
        assert_eq!(
            done(&h),
            (
                ProxyHeader::Proxied {
                    source: sa("192.0.2.10:40000"),
                    destination: sa("198.51.100.1:25")
                },
                28
            )
        );
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::25".parse().unwrap();
        let mut a = src.octets().to_vec();
        a.extend_from_slice(&dst.octets());
        a.extend_from_slice(&51234u16.to_be_bytes());
        a.extend_from_slice(&587u16.to_be_bytes());
        // A TLV after the addresses (PP2_TYPE_AUTHORITY "mx") is skipped.
        a.extend_from_slice(&[0x02, 0x00, 0x02, b'm', b'x']);
        let mut h = v2(0x21, 0x21, &a);
        h.extend_from_slice(b"EHLO");
        assert_eq!(
            done(&h),
            (
                ProxyHeader::Proxied {
                    source: sa("[2001:db8::7]:51234"),
                    destination: sa("[2001:db8::25]:587")
                },
                16 + 36 + 5
            )
        );
        assert_eq!(done(&v2(0x20, 0x00, &[])), (ProxyHeader::Local, 16));
        assert_eq!(done(&v2(0x20, 0x11, &[0; 12])), (ProxyHeader::Local, 28));
        assert_eq!(done(&v2(0x21, 0x00, &[])), (ProxyHeader::Unknown, 16));
        assert_eq!(done(&v2(0x21, 0x31, &[0; 216])), (ProxyHeader::Unknown, 232));
    }

    #[test]
    fn v2_incomplete_and_malformed() {
        let h = v2(0x21, 0x11, &[1; 12]);
        for cut in 1..h.len() {
            match parse(&h[..cut]).unwrap() {
                Parsed::Incomplete(n) => assert!(cut + n <= h.len(), "asked past the header at {cut}"),
                other => panic!("{cut}: {other:?}"),
            }
        }
        assert_eq!(parse(&h[..5]), Ok(Parsed::Incomplete(11)));
        assert_eq!(parse(&h[..20]), Ok(Parsed::Incomplete(8)));
        assert_eq!(parse(&v2(0x11, 0x11, &[1; 12])), Err(ProxyError::V2Command(0x11)));
        assert_eq!(parse(&v2(0x22, 0x11, &[1; 12])), Err(ProxyError::V2Command(0x22)));
        assert_eq!(parse(&v2(0x21, 0x12, &[1; 12])), Err(ProxyError::V2Family(0x12)));
        assert_eq!(parse(&v2(0x21, 0x41, &[1; 12])), Err(ProxyError::V2Family(0x41)));
        assert_eq!(parse(&v2(0x21, 0x11, &[1; 11])), Err(ProxyError::V2Short(11)));
        assert_eq!(parse(&v2(0x21, 0x21, &[1; 12])), Err(ProxyError::V2Short(12)));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(ProxyError::V2TooLong(16 + 0xffff)));
        let mut bad_sig = V2_SIGNATURE.to_vec();
        bad_sig[11] = b'X';
        assert_eq!(parse(&bad_sig), Err(ProxyError::NotProxy));
    }
}

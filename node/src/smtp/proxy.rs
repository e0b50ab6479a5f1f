//! Reading a PROXY protocol header off a socket; the parser is
//! [`tern_smtp::proxy`], re-exported here.

use tokio::io::{AsyncRead, AsyncReadExt};

pub use tern_smtp::proxy::*;

/// Reads one PROXY header from `stream`, byte-exact: the bytes after it are
/// left in the socket. The caller bounds the time.
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<ProxyHeader, ProxyError> {
    let mut buf = Vec::with_capacity(128);
    loop {
        let need = match parse(&buf)? {
            Parsed::Done(header, _) => return Ok(header),
            Parsed::Incomplete(n) => n,
        };
        let start = buf.len();
        // parse() bounds every header at MAX_HEADER, so this stays small.
        buf.resize(start + need, 0);
        match stream.read_exact(&mut buf[start..]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProxyError::Eof),
            Err(e) => return Err(ProxyError::Io(e.to_string())),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn v2(ver_cmd: u8, fam: u8, addrs: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(ver_cmd);
        b.push(fam);
        b.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        b.extend_from_slice(addrs);
        b
    }

    #[tokio::test]
    async fn read_header_leaves_the_rest() {
        let mut a = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 80, 0, 25];
        let mut bytes = v2(0x21, 0x11, &a);
        bytes.extend_from_slice(b"\x16\x03\x01 client hello");
        let mut r = std::io::Cursor::new(bytes);
        let h = read_header(&mut r).await.unwrap();
        assert!(matches!(h, ProxyHeader::Proxied { source, .. } if source == sa("10.0.0.1:80")));
        assert_eq!(r.position(), 28);
        let mut r = std::io::Cursor::new(b"PROXY TCP4 10.0.0.1 10.0.0.2 80 25\r\nEHLO x\r\n".to_vec());
        read_header(&mut r).await.unwrap();
        assert_eq!(r.position(), 36);
        a.truncate(3);
        let mut r = std::io::Cursor::new(v2(0x21, 0x11, &[1; 12])[..20].to_vec());
        assert_eq!(read_header(&mut r).await, Err(ProxyError::Eof));
        let mut r = std::io::Cursor::new(b"EHLO x\r\n".to_vec());
        assert_eq!(read_header(&mut r).await, Err(ProxyError::NotProxy));
    }
}

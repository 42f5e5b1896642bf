//! PROXY protocol v2 (the binary header load balancers put before a connection's first
//! byte): when `net.proxy_protocol` is on, a connection from a trusted proxy must start with
//! one, and the client address it carries replaces the proxy's for limits and logs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Address blocks are at most 216 bytes (two Unix paths); TLVs may follow. Bound what a
/// stranger can make us read.
const MAX_BLOCK: usize = 1024;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol v2 header")]
    Missing,
    #[error("malformed PROXY protocol v2 header: {0}")]
    Malformed(&'static str),
    #[error("connection closed while reading the PROXY header")]
    Closed,
}

/// Read the header; returns the original client address (`None` for a LOCAL command or a
/// family without an address, e.g. health checks from the proxy itself).
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut head = [0u8; 16];
    r.read_exact(&mut head)
        .await
        .map_err(|_| ProxyError::Closed)?;
    if head[..12] != SIGNATURE {
        return Err(ProxyError::Missing);
    }
    if head[12] >> 4 != 2 {
        return Err(ProxyError::Malformed("version"));
    }
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    if len > MAX_BLOCK {
        return Err(ProxyError::Malformed("length"));
    }
    let mut block = vec![0u8; len];
    r.read_exact(&mut block)
        .await
        .map_err(|_| ProxyError::Closed)?;
    match head[12] & 0x0F {
        0 => return Ok(None), // LOCAL
        1 => {}               // PROXY
        _ => return Err(ProxyError::Malformed("command")),
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match head[13] >> 4 {
        1 if len >= 12 => {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(&block[8..10]))))
        }
        2 if len >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[..16]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port(&block[32..34]),
            )))
        }
        1 | 2 => Err(ProxyError::Malformed("address block too short")),
        _ => Ok(None), // AF_UNSPEC or AF_UNIX: no usable address
    }
}

/// A v2 header for `src` → `dst` (what a load balancer sends; used by tests and tools).
pub fn encode_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(s).octets());
            h.extend_from_slice(&v6(d).octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_v4_v6_local_and_refuses_garbage() {
        let src: SocketAddr = "203.0.113.9:5555".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let mut h = encode_header(src, dst);
        h.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut r = &h[..];
        assert_eq!(read_header(&mut r).await, Ok(Some(src)));
        assert_eq!(
            r, b"GET / HTTP/1.1\r\n",
            "the stream continues right after the header"
        );

        let src6: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
        let dst6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(
            read_header(&mut &encode_header(src6, dst6)[..]).await,
            Ok(Some(src6))
        );

        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read_header(&mut &local[..]).await, Ok(None));

        assert_eq!(
            read_header(&mut &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]).await,
            Err(ProxyError::Missing)
        );
        let mut huge = SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(
            read_header(&mut &huge[..]).await,
            Err(ProxyError::Malformed("length"))
        );
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(
            read_header(&mut &short[..]).await,
            Err(ProxyError::Malformed("address block too short"))
        );
        assert_eq!(
            read_header(&mut &SIGNATURE[..5]).await,
            Err(ProxyError::Closed)
        );
    }
}

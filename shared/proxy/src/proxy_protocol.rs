//! The PROXY protocol (HAProxy's, v1 text and v2 binary) on listeners with
//! `proxy_protocol = true`: an L4 load balancer in front (AWS NLB, HAProxy, another Envoy)
//! opens each connection with a header that names the real client, which then stands for the
//! connection's peer everywhere: X-Forwarded-For, the access log, `source_ip` hashing.
//!
//! A connection without a valid header is closed: on such a listener, only the balancer may
//! connect (as with nginx's `proxy_protocol` and Envoy's listener filter). A `LOCAL` header
//! (the balancer's own health check) or one for an unknown protocol keeps the socket's peer.

use std::net::SocketAddr;
use std::time::Duration;

use pingora_core::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, SocketDigest, Stream};
use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use weir_config::ProxyVersion;

/// A v2 header with its TLVs fits in this; a v1 header is at most 107 bytes.
const MAX_HEADER: usize = 16 * 1024;

/// How long the header may take to arrive (Envoy's listener filter timeout).
const HEADER_WAIT: Duration = Duration::from_secs(15);

/// A connection closed for its header: counted, and said at warn the first time (after that at
/// debug: a balancer that sends none would otherwise say it for every connection). It is the
/// usual mistake with this setting, and showed nowhere before.
pub(crate) fn refused(listener: &str, peer: Option<SocketAddr>, why: &str) {
    // Admin `/ready`'s probe sends no header: no client of the balancer's.
    if peer.is_some_and(|p| crate::admin::is_probe(p.port())) {
        return;
    }
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let metrics = weir_telemetry::metrics();
    (metrics.downstream_proxy_protocol_errors)
        .with_label_values(&[listener])
        .inc();
    if SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!(listener, "closing a connection: {why}");
    } else {
        tracing::warn!(listener, "closing a connection: {why} (proxy_protocol = true: only a load balancer that sends the header may connect; counted in weir_downstream_proxy_protocol_errors_total, logged once)");
    }
}

/// The address a connection came from, before any PROXY header names another.
pub(crate) fn peer(stream: &Stream) -> Option<SocketAddr> {
    let digest = stream.get_socket_digest()?;
    digest.peer_addr()?.as_inet().copied()
}

/// Reads the PROXY header off `stream` and makes its source the connection's peer; the bytes
/// after it are read next, as if the header had never been there.
pub(crate) async fn accept(stream: Stream) -> Result<Stream, String> {
    let mut l4 = stream
        .into_any()
        .downcast::<L4Stream>()
        .map_err(|_| "not a TCP connection".to_string())?;
    let read = tokio::time::timeout(HEADER_WAIT, read_header(&mut l4));
    let source = read
        .await
        .map_err(|_| format!("no PROXY header in {HEADER_WAIT:?}"))??;
    if let Some(source) = source {
        let digest = SocketDigest::from_raw_fd(std::os::unix::io::AsRawFd::as_raw_fd(&*l4));
        let _ = digest.peer_addr.set(Some(PeerAddr::Inet(source)));
        l4.set_socket_digest(digest);
    }
    Ok(l4)
}

/// Reads until the header is whole, and puts back what was read past it; the client it
/// names.
async fn read_header(l4: &mut L4Stream) -> Result<Option<SocketAddr>, String> {
    let mut seen = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    loop {
        let n = l4.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before its PROXY header ended".into());
        }
        seen.extend_from_slice(&buf[..n]);
        if let Some((len, source)) = parse(&seen)? {
            l4.rewind(&seen[len..]);
            return Ok(source);
        }
    }
}

/// The header's length and the client it names, once `seen` holds all of it (`None` before).
fn parse(seen: &[u8]) -> Result<Option<(usize, Option<SocketAddr>)>, String> {
    let parsed = HeaderResult::parse(seen);
    // ppp calls a v1 line it cannot parse incomplete; its end, CRLF, says otherwise.
    let v1_ended = seen.starts_with(b"PROXY ") && seen.windows(2).any(|w| w == b"\r\n");
    if parsed.is_incomplete() {
        return match seen.len() > MAX_HEADER || v1_ended {
            true => Err("no valid PROXY header".into()),
            false => Ok(None),
        };
    }
    match parsed {
        HeaderResult::V1(Ok(h)) => Ok(Some((h.header.len(), v1_source(&h.addresses)))),
        HeaderResult::V2(Ok(h)) => Ok(Some((h.len(), v2_source(&h)))),
        HeaderResult::V1(Err(e)) => Err(format!("bad PROXY header: {e}")),
        HeaderResult::V2(Err(e)) => Err(format!("bad PROXY header: {e}")),
    }
}

/// The header that tells an upstream who the client is (`source`) and whom it called
/// (`destination`, this listener). Addresses of two families are both given as IPv6.
pub(crate) fn header(
    version: ProxyVersion,
    source: SocketAddr,
    destination: SocketAddr,
) -> Vec<u8> {
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        v6 => v6,
    };
    let (source, destination) = match source.is_ipv4() == destination.is_ipv4() {
        true => (source, destination),
        false => (v6(source), v6(destination)),
    };
    match version {
        ProxyVersion::V1 => v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes(),
        ProxyVersion::V2 => {
            let command = v2::Version::Two | v2::Command::Proxy;
            let builder =
                v2::Builder::with_addresses(command, v2::Protocol::Stream, (source, destination));
            // Only a TLV could make building fail, and there is none.
            builder.build().unwrap_or_default()
        }
    }
}

fn v1_source(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
        v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(header: &v2::Header) -> Option<SocketAddr> {
    if header.command == v2::Command::Local {
        return None;
    }
    match &header.addresses {
        v2::Addresses::IPv4(a) => Some((a.source_address, a.source_port).into()),
        v2::Addresses::IPv6(a) => Some((a.source_address, a.source_port).into()),
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_ends_where_the_clients_bytes_begin() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n";
        let (len, source) = parse(v1).unwrap().unwrap();
        assert_eq!(&v1[len..], b"GET / HTTP/1.1\r\n");
        assert_eq!(source, Some("203.0.113.7:56324".parse().unwrap()));
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n\x16";
        let (len, source) = parse(v6).unwrap().unwrap();
        assert_eq!(
            (&v6[len..], source),
            (&b"\x16"[..], Some("[2001:db8::7]:4000".parse().unwrap()))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\nx").unwrap(), Some((15, None)));
        // Cut short: more to read.
        assert_eq!(parse(b"PROXY TCP4 203.0.113.7 10.0").unwrap(), None);
        assert!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(parse(b"PROXY TCP4 nonsense\r\nGET / HTTP/1.1\r\n").is_err());
    }

    #[test]
    fn a_v2_header_names_the_client_unless_local() {
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend([0x21, 0x11, 0, 12]); // v2 PROXY, TCP over IPv4, 12 bytes of addresses
        v2.extend([198, 51, 100, 9, 10, 0, 0, 1, 0x1f, 0x90, 1, 187]);
        v2.extend(b"rest");
        let (len, source) = parse(&v2).unwrap().unwrap();
        assert_eq!(
            (&v2[len..], source),
            (&b"rest"[..], Some("198.51.100.9:8080".parse().unwrap()))
        );
        v2[12] = 0x20; // LOCAL: the balancer's own connection
        assert_eq!(parse(&v2).unwrap().map(|(_, s)| s), Some(None));
        assert_eq!(parse(&v2[..20]).unwrap(), None);
    }

    #[test]
    fn a_header_sent_upstream_reads_back_as_it_was_written() {
        let (client, listener) = ("203.0.113.7:56324", "10.0.0.1:443");
        let (client, listener) = (client.parse().unwrap(), listener.parse().unwrap());
        let v1 = header(ProxyVersion::V1, client, listener);
        assert_eq!(v1, b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n");
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            let bytes = header(version, client, listener);
            assert_eq!(parse(&bytes).unwrap(), Some((bytes.len(), Some(client))));
        }
        // Mixed families: both as IPv6.
        let v6 = "[2001:db8::7]:4000".parse().unwrap();
        let bytes = header(ProxyVersion::V2, v6, listener);
        assert_eq!(parse(&bytes).unwrap(), Some((bytes.len(), Some(v6))));
    }
}

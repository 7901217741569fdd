//! Traffic capture: the sidecar behind iptables `REDIRECT` rules, so the app calls other
//! services by their own addresses and takes calls on its own ports, unaware of the sidecar
//! (Istio's and Linkerd's default).
//!
//! - [`rules`] writes the rules for a sidecar's config (`weir-sidecar iptables`).
//! - A connection the rules sent to a listener keeps, in conntrack, the address it was for:
//!   [`original_dst`]. On the outbound listener, a connection to a route's `destinations`
//!   goes to that route's backends, bytes as they come; an HTTP request no route takes goes
//!   to the address (Istio's `PassthroughCluster`), and so does a connection that does not
//!   open like HTTP (TLS to an outside host, a database protocol). On the inbound listener, a
//!   connection to one of the app's `tcp_ports` goes to the app on that port (`stream.rs`).

use std::fmt::Write as _;
use std::net::SocketAddr;

use pingora_core::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora_core::protocols::SocketDigest;
use weir_config::Sidecar;

pub use weir_config::PASSTHROUGH;

/// Where a connection was going before the rules redirected it here; `None` when it was not
/// redirected (the app called the listener itself).
pub(crate) fn original_dst(digest: &SocketDigest) -> Option<SocketAddr> {
    let inet = |a: Option<&PeerAddr>| a.and_then(|a| a.as_inet()).copied();
    let dst = inet(digest.original_dst())?;
    (inet(digest.local_addr()) != Some(dst)).then_some(dst)
}

/// Whether a connection's first byte can start an HTTP/1 request or the HTTP/2 preface: an
/// upper-case method token ("GET", "PRI"). TLS opens with 0x16, and binary protocols (a
/// PostgreSQL startup, a MySQL or Redis client) seldom with a capital letter.
pub(crate) fn opens_like_http(first: u8) -> bool {
    first.is_ascii_uppercase()
}

/// What `weir-sidecar iptables` takes beside the config.
pub struct RuleOptions {
    /// The group the sidecar runs as: its own connections are never captured.
    pub proxy_gid: u32,
    /// Outbound ports left alone (a server-first protocol such as MySQL or SMTP, whose client
    /// waits for the server to speak first).
    pub exclude_outbound_ports: Vec<u16>,
}

/// The `nat` table rules, in `iptables-restore` form, that send inbound TCP connections to the
/// app's ports to the inbound listener, and every outbound one to the outbound listener but the
/// sidecar's own (by group), loopback traffic and the excluded ports.
///
/// Inbound, only the app's ports (`app`'s and the `tcp_ports`): a connection to another port
/// of the pod (ssh, the admin port, a metrics port the app serves apart) stays the app's.
pub fn rules(sidecar: &Sidecar, options: &RuleOptions) -> String {
    let inbound = &sidecar.inbound;
    let outbound = sidecar.outbound.listen.port();
    let mut out = String::from(
        "# weir-sidecar iptables: apply with `iptables-restore --noflush`, in the pod's network\n\
         # namespace, before the app starts.\n\
         *nat\n:WEIR_INBOUND - [0:0]\n:WEIR_OUTBOUND - [0:0]\n\
         -A PREROUTING -p tcp -j WEIR_INBOUND\n-A OUTPUT -p tcp -j WEIR_OUTBOUND\n",
    );
    for port in std::iter::once(&inbound.app.port()).chain(&inbound.tcp_ports) {
        let to = inbound.listen.port();
        let _ = writeln!(
            out,
            "-A WEIR_INBOUND -p tcp --dport {port} -j REDIRECT --to-ports {to}"
        );
    }
    let _ = writeln!(
        out,
        "-A WEIR_OUTBOUND -m owner --gid-owner {} -j RETURN\n-A WEIR_OUTBOUND -o lo -j RETURN",
        options.proxy_gid
    );
    for port in &options.exclude_outbound_ports {
        let _ = writeln!(out, "-A WEIR_OUTBOUND -p tcp --dport {port} -j RETURN");
    }
    let _ = writeln!(
        out,
        "-A WEIR_OUTBOUND -p tcp -j REDIRECT --to-ports {outbound}\nCOMMIT"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_opens_with_a_capital_letter_and_tls_does_not() {
        for request in [&b"GET / HTTP/1.1"[..], b"POST /", b"PRI * HTTP/2.0"] {
            assert!(opens_like_http(request[0]));
        }
        // A TLS ClientHello, a PostgreSQL startup message, a Redis command.
        for other in [&[0x16u8, 3, 1][..], &[0, 0, 0, 8], b"*1\r\n$4\r\nPING"] {
            assert!(!opens_like_http(other[0]));
        }
    }
}

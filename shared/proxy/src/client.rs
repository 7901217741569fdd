//! One request to an upstream on Pingora's HTTP/1 connector, outside a proxied request: health
//! checks.

use std::time::Duration;

use pingora_core::connectors::http::v1::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_http::RequestHeader;

/// Sends `header` (no body) on a connection from the pool, reads the answer to the end and
/// gives the connection back; returns the answer's status.
pub async fn exchange(
    connector: &Connector,
    peer: &HttpPeer,
    header: RequestHeader,
    idle_timeout: Duration,
) -> Result<u16> {
    let (mut session, _reused) = connector.get_http_session(peer).await?;
    session.write_request_header(Box::new(header)).await?;
    session.finish_body().await?;
    session.read_response().await?;
    let status = session.get_status().map_or(0, |s| s.as_u16());
    while session.read_body_ref().await?.is_some() {}
    connector
        .release_http_session(session, peer, Some(idle_timeout))
        .await;
    Ok(status)
}

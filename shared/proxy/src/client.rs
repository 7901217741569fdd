//! One request to an upstream on Pingora's connector, outside a proxied request: mirror
//! copies and health checks.

use std::time::Duration;

use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_http::RequestHeader;

/// Sends `header` and `body`, reads the answer to the end (so the connection can go back to
/// the pool) and returns its status.
pub async fn exchange(
    connector: &Connector,
    peer: &HttpPeer,
    header: RequestHeader,
    body: Bytes,
    idle_timeout: Duration,
) -> Result<u16> {
    let (mut session, _reused) = connector.get_http_session(peer).await?;
    session.write_request_header(Box::new(header)).await?;
    if !body.is_empty() {
        session.write_request_body(body, true).await?;
    }
    session.finish_request_body().await?;
    session.read_response_header().await?;
    let status = session.response_header().map_or(0, |r| r.status.as_u16());
    while session.read_response_body().await?.is_some() {}
    connector
        .release_http_session(session, peer, Some(idle_timeout))
        .await;
    Ok(status)
}

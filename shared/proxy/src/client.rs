//! One request to an upstream on Pingora's HTTP/1 connector, outside a proxied request: mirror
//! copies and health checks.

use std::time::Duration;

use bytes::Bytes;
use pingora_core::connectors::http::v1::Connector;
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_http::RequestHeader;

/// Sends `header` and `body` on `session` and reads the answer to the end (so the connection
/// can carry another request); returns its status.
pub async fn exchange_on(
    session: &mut HttpSession,
    header: RequestHeader,
    body: Bytes,
) -> Result<u16> {
    session.write_request_header(Box::new(header)).await?;
    if !body.is_empty() {
        session.write_body(&body).await?;
    }
    session.finish_body().await?;
    session.read_response().await?;
    let status = session.get_status().map_or(0, |s| s.as_u16());
    while session.read_body_ref().await?.is_some() {}
    Ok(status)
}

/// One exchange on a connection from the pool, which gets it back afterwards.
pub async fn exchange(
    connector: &Connector,
    peer: &HttpPeer,
    header: RequestHeader,
    body: Bytes,
    idle_timeout: Duration,
) -> Result<u16> {
    let (mut session, _reused) = connector.get_http_session(peer).await?;
    let status = exchange_on(&mut session, header, body).await?;
    connector
        .release_http_session(session, peer, Some(idle_timeout))
        .await;
    Ok(status)
}

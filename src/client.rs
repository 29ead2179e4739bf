//! corral's own outgoing HTTP requests (peer messages, webhooks, the generation poll), on
//! Pingora's connector: pooled keep-alive connections, every attempt bounded.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::{RequestHeader, ResponseHeader};

/// The largest answer read.
const MAX_ANSWER_BYTES: usize = 64 << 10;

/// Where a request goes.
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub tls: bool,
    /// The `Host` header (and TLS server name).
    pub host: &'a str,
}

/// An answer: status, head, body (at most 64 KiB).
pub struct Answer {
    pub status: u16,
    pub head: ResponseHeader,
    pub body: Vec<u8>,
}

/// One request, bounded by `timeout` as a whole. A pooled connection that turns out closed
/// is retried once on a new one (a server that restarted is not a failed server).
pub async fn request(
    connector: &Connector,
    to: &Target<'_>,
    method: &str,
    path: &str,
    headers: &[(http::HeaderName, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<Answer, String> {
    match tokio::time::timeout(
        timeout,
        attempt(connector, to, method, path, headers, body, timeout),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn attempt(
    connector: &Connector,
    to: &Target<'_>,
    method: &str,
    path: &str,
    headers: &[(http::HeaderName, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<Answer, String> {
    // the TLS server name is the host without its port
    let sni = match to.host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => to.host,
    };
    let sni = sni.trim_start_matches('[').trim_end_matches(']');
    let mut peer = HttpPeer::new(to.addr, to.tls, sni.to_string());
    peer.options.connection_timeout = Some(timeout);
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    for _ in 0..2 {
        let (mut session, reused) = connector
            .get_http_session(&peer)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut req = RequestHeader::build(method, path.as_bytes(), None).map_err(|e| e.to_string())?;
        let _ = req.insert_header(http::header::HOST, to.host);
        for (name, value) in headers {
            let _ = req.insert_header(name.clone(), value.as_str());
        }
        if method != "GET" || !body.is_empty() {
            let _ = req.insert_header(http::header::CONTENT_LENGTH, body.len());
        }
        let sent = async {
            session.write_request_header(Box::new(req)).await?;
            if !body.is_empty() {
                session.write_request_body(body.clone(), true).await?;
            }
            session.finish_request_body().await?;
            session.read_response_header().await
        }
        .await;
        if let Err(e) = sent {
            if reused {
                continue;
            }
            return Err(e.to_string());
        }
        let head = session
            .response_header()
            .cloned()
            .ok_or_else(|| "no response head".to_string())?;
        let mut answer = Vec::new();
        while let Some(chunk) = session.read_response_body().await.map_err(|e| e.to_string())? {
            answer.extend_from_slice(&chunk);
            if answer.len() > MAX_ANSWER_BYTES {
                return Err("answer too long".into());
            }
        }
        connector
            .release_http_session(session, &peer, Some(Duration::from_secs(60)))
            .await;
        return Ok(Answer {
            status: head.status.as_u16(),
            head,
            body: answer,
        });
    }
    Err("connection closed".into())
}

//! One HTTPS attempt to the pinned address: SNI and certificate verification against the URL's
//! host (rustls, webpki roots plus `SP_FORWARD_CA_FILE`), no redirects, no proxies, connect,
//! read and total timeouts, HTTP/1.1 or h2 by ALPN, at most 1 MiB of the answer read.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use signet_protocol::internal::forward::MAX_RESPONSE_BYTES;

use super::settings::ForwardConfig;

/// The TLS client configuration of every delivery.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("SP_FORWARD_CA_FILE {}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("SP_FORWARD_CA_FILE {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "SP_FORWARD_CA_FILE {}: no certificate",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("SP_FORWARD_CA_FILE {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// What is sent.
pub struct Request<'a> {
    /// Without fragment; its host is the TLS name and the `Host`.
    pub url: &'a url::Url,
    pub pinned: IpAddr,
    pub headers: &'a [(String, String)],
    pub body: &'a str,
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Response {
        status: u16,
        pinned_ip: IpAddr,
        /// Bytes read, at most [`MAX_RESPONSE_BYTES`].
        response_size: u64,
        retry_after: Option<Duration>,
    },
    /// No answer: connect, TLS, timeout or protocol error.
    Failed { error: String },
}

/// Never resolves: every name a delivery connects to is pinned with `resolve_to_addrs`, so a
/// name that is not (which would be a bug) fails instead of reaching the system resolver.
struct NoResolver;

impl reqwest::dns::Resolve for NoResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_owned();
        Box::pin(async move { Err(format!("{name} was not pinned").into()) })
    }
}

/// Sends the delivery and reads the answer, within `config.total_timeout` (or `limit` when
/// shorter: the filter's deadline).
pub async fn send(
    config: &ForwardConfig,
    tls: &rustls::ClientConfig,
    request: Request<'_>,
    limit: Option<Duration>,
) -> Outcome {
    let total = limit.map_or(config.total_timeout, |l| l.min(config.total_timeout));
    match tokio::time::timeout(total, attempt(config, tls, request, total)).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) => Outcome::Failed { error },
        Err(_) => Outcome::Failed {
            error: format!("timeout after {} ms", total.as_millis()),
        },
    }
}

async fn attempt(
    config: &ForwardConfig,
    tls: &rustls::ClientConfig,
    request: Request<'_>,
    total: Duration,
) -> Result<Outcome, String> {
    let host = request.url.host_str().ok_or("the URL has no host")?;
    let port = request.url.port_or_known_default().unwrap_or(443);
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(NoResolver))
        .connect_timeout(config.connect_timeout)
        .read_timeout(config.read_timeout)
        .timeout(total)
        .pool_max_idle_per_host(0)
        .user_agent(concat!("signet-forwarder/", env!("CARGO_PKG_VERSION")));
    if request.url.domain().is_some() {
        // the bracket-less name as reqwest looks it up
        builder = builder.resolve_to_addrs(host, &[SocketAddr::new(request.pinned, port)]);
    }
    let client = builder.build().map_err(|e| format!("client: {e}"))?;
    let mut post = client
        .post(request.url.clone())
        .body(request.body.to_owned());
    for (name, value) in request.headers {
        post = post.header(name.as_str(), value.as_str());
    }
    let mut response = post.send().await.map_err(describe)?;
    let status = response.status().as_u16();
    let pinned_ip = response.remote_addr().map_or(request.pinned, |a| a.ip());
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let mut response_size: u64 = 0;
    // counted as read: Content-Length is the receiver's claim, not a bound
    while let Ok(Some(chunk)) = response.chunk().await {
        response_size = response_size.saturating_add(chunk.len() as u64);
        if response_size >= MAX_RESPONSE_BYTES {
            response_size = MAX_RESPONSE_BYTES;
            break;
        }
    }
    Ok(Outcome::Response {
        status,
        pinned_ip,
        response_size,
        retry_after,
    })
}

/// The error with its causes (reqwest's top-level message alone says little).
fn describe(e: reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timeout".to_owned()
    } else if e.is_connect() {
        "connect".to_owned()
    } else {
        "request".to_owned()
    };
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_both_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let later =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(300));
        let d = parse_retry_after(&later).unwrap();
        assert!(
            d > Duration::from_secs(290) && d <= Duration::from_secs(300),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_refused() {
        assert!(tls_config(None).is_ok());
        assert!(tls_config(Some(Path::new("/nonexistent.pem"))).is_err());
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(tls_config(Some(empty.path())).is_err());
    }
}

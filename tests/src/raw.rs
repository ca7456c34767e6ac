//! Requests with arbitrary header bytes, over HTTP/1.1 (a raw socket) and HTTP/2 (prior
//! knowledge, the `h2` crate): what the ordinary client refuses to send, a hostile one sends.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::http::Response;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// One request: header names and values as raw bytes (repeats allowed, in order).
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub path: String,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
    /// HTTP/1.1 only: the `content-length` to declare instead of the body's length.
    pub declared_length: Option<u64>,
}

impl RawRequest {
    pub fn post(path: &str, body: &[u8]) -> RawRequest {
        RawRequest {
            path: path.to_owned(),
            headers: vec![(b"content-type".to_vec(), b"application/json".to_vec())],
            body: body.to_vec(),
            declared_length: None,
        }
    }

    pub fn header(mut self, name: &str, value: &[u8]) -> RawRequest {
        self.headers
            .push((name.as_bytes().to_vec(), value.to_vec()));
        self
    }

    /// Sends it to `127.0.0.1:port`; `None` when the connection ended without an answer or
    /// none came within `timeout`.
    pub fn send(&self, protocol: Protocol, port: u16, timeout: Duration) -> Option<Response> {
        match protocol {
            Protocol::Http1 => self.send_http1(port, timeout),
            Protocol::Http2 => self.send_http2(port, timeout),
        }
    }

    fn send_http1(&self, port: u16, timeout: Duration) -> Option<Response> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(timeout)).ok()?;
        let length = self.declared_length.unwrap_or(self.body.len() as u64);
        let mut head = format!(
            "POST {} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {length}\r\n",
            self.path
        )
        .into_bytes();
        for (name, value) in &self.headers {
            head.extend_from_slice(name);
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        stream.write_all(&head).ok()?;
        stream.write_all(&self.body).ok()?;
        let mut answer = Vec::new();
        // read until the peer closes (connection: close) or the timeout; keep what came
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
            if parse_http1(&answer).is_some_and(|(_, complete)| complete) {
                break;
            }
        }
        parse_http1(&answer).map(|(response, _)| response)
    }

    fn send_http2(&self, port: u16, timeout: Duration) -> Option<Response> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        runtime.block_on(async {
            tokio::time::timeout(timeout, self.http2_exchange(port))
                .await
                .ok()
                .flatten()
        })
    }

    async fn http2_exchange(&self, port: u16) -> Option<Response> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let (client, connection) = h2::client::handshake(tcp).await.ok()?;
        tokio::spawn(connection);
        let mut client = client.ready().await.ok()?;
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1:{port}{}", self.path));
        for (name, value) in &self.headers {
            let name = http::HeaderName::from_bytes(name).ok()?;
            let value = http::HeaderValue::from_bytes(value).ok()?;
            request = request.header(name, value);
        }
        let request = request.body(()).ok()?;
        let (answer, mut send) = client.send_request(request, self.body.is_empty()).ok()?;
        if !self.body.is_empty() {
            send.send_data(bytes::Bytes::copy_from_slice(&self.body), true)
                .ok()?;
        }
        let answer = answer.await.ok()?;
        let status = answer.status().as_u16();
        let headers = answer
            .headers()
            .iter()
            .map(|(n, v)| {
                let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (n.as_str().to_owned(), value)
            })
            .collect();
        let mut body_stream = answer.into_body();
        let mut body = Vec::new();
        while let Some(chunk) = body_stream.data().await {
            let chunk = chunk.ok()?;
            let _ = body_stream.flow_control().release_capacity(chunk.len());
            body.extend_from_slice(&chunk);
        }
        Some(Response {
            status,
            headers,
            body,
        })
    }
}

/// An HTTP/1.1 answer (status line, headers, a `content-length` or chunked body) and whether it
/// is complete.
fn parse_http1(bytes: &[u8]) -> Option<(Response, bool)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &bytes[end + 4..];
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let (body, complete) = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)
    } else {
        match header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            Some(n) => (rest[..n.min(rest.len())].to_vec(), rest.len() >= n),
            None => (rest.to_vec(), false),
        }
    };
    Some((
        Response {
            status,
            headers,
            body,
        },
        complete,
    ))
}

fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size = std::str::from_utf8(&rest[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size else {
            return (body, false);
        };
        let chunk = &rest[line_end + 2..];
        if size == 0 {
            return (body, true);
        }
        if chunk.len() < size + 2 {
            body.extend_from_slice(&chunk[..chunk.len().min(size)]);
            return (body, false);
        }
        body.extend_from_slice(&chunk[..size]);
        rest = &chunk[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_answers_parse_with_either_framing() {
        let fixed = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\nX-A: b\r\n\r\n{}";
        let (r, complete) = parse_http1(fixed).unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), complete),
            (413, &b"{}"[..], true)
        );
        assert_eq!(r.header("x-a"), Some("b"));
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n";
        let (r, complete) = parse_http1(chunked).unwrap();
        assert_eq!((r.body.as_slice(), complete), (&b"abc"[..], true));
        assert!(
            !parse_http1(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab")
                .unwrap()
                .1
        );
        assert!(parse_http1(b"HTTP/1.1 200").is_none());
    }
}

//! A small blocking HTTP client that keeps every status (errors are what many tests look at).

use std::time::Duration;

use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names in lowercase, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response {} is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }

    /// The SPEC §4 error code of an error response.
    pub fn error_code(&self) -> String {
        let body = self.json();
        assert!(
            body["detail"].is_string(),
            "error body without a detail sentence: {body}"
        );
        body["code"]
            .as_str()
            .unwrap_or_else(|| panic!("error body without a code: {body}"))
            .to_owned()
    }
}

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .max_response_header_size(64 * 1024)
            .build()
            .new_agent();
        Client { agent }
    }

    pub fn get(&self, url: &str, headers: &[(&str, &str)]) -> Response {
        let mut request = self.agent.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Self::read(url, request.call())
    }

    pub fn post(&self, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut request = self.agent.post(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Self::read(url, request.send(body))
    }

    fn read(url: &str, result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Response {
        let mut response = result.unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect();
        let body = response
            .body_mut()
            .with_config()
            .limit(16 * 1024 * 1024)
            .read_to_vec()
            .unwrap_or_else(|e| panic!("reading the response of {url}: {e}"));
        Response {
            status,
            headers,
            body,
        }
    }
}

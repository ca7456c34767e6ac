//! What forwarding tests deliver to, all on loopback: a DNS server that answers from a table
//! (each query of a name takes its next answer, so a test can rebind a name between two
//! lookups), a test CA, and an HTTPS receiver (HTTP/1.1 and h2) with a certificate of that CA
//! that records every request and answers the statuses it is told.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// Per name (fully qualified): the answers still to give, and the current one.
type Table = HashMap<String, (VecDeque<Vec<IpAddr>>, Vec<IpAddr>)>;
/// A status, its headers, and how long to wait before answering.
type Answer = (u16, Vec<(String, String)>, std::time::Duration);

/// A DNS server on 127.0.0.1 (UDP): `answers[name]` is the list of answers of successive
/// A queries (the last repeats); AAAA queries get the IPv6 addresses of the current answer.
/// Names it does not know are NXDOMAIN. Answers have TTL 0: nothing is cached.
pub struct Dns {
    pub addr: SocketAddr,
    answers: Arc<Mutex<Table>>,
    /// A queries per name.
    queries: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    pub async fn start() -> Dns {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let answers: Arc<Mutex<Table>> = Arc::default();
        let queries: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (a, q) = (answers.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let reply = answer(&request, &a, &q);
                let _ = socket.send_to(&reply, from).await;
            }
        });
        Dns {
            addr,
            answers,
            queries,
            task,
        }
    }

    /// `name` answers `rounds` in turn, the last one for ever after.
    pub fn set(&self, name: &str, rounds: &[&[&str]]) {
        let rounds: VecDeque<Vec<IpAddr>> = rounds
            .iter()
            .map(|r| r.iter().map(|ip| ip.parse().unwrap()).collect())
            .collect();
        let first = rounds.front().cloned().unwrap_or_default();
        self.answers
            .lock()
            .unwrap()
            .insert(format!("{}.", name.trim_end_matches('.')), (rounds, first));
    }

    /// A queries of `name` so far.
    pub fn queries(&self, name: &str) -> usize {
        let key = format!("{}.", name.trim_end_matches('.'));
        self.queries.lock().unwrap().get(&key).copied().unwrap_or(0)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(
    request: &Message,
    answers: &Mutex<Table>,
    queries: &Mutex<HashMap<String, usize>>,
) -> Vec<u8> {
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    for query in request.queries() {
        reply.add_query(query.clone());
        let name = query.name().to_ascii().to_ascii_lowercase();
        let mut table = answers.lock().unwrap();
        let Some((rounds, current)) = table.get_mut(&name) else {
            reply.set_response_code(ResponseCode::NXDomain);
            continue;
        };
        if query.query_type() == RecordType::A {
            *queries.lock().unwrap().entry(name.clone()).or_default() += 1;
            if let Some(next) = rounds.pop_front() {
                *current = next;
            }
            if rounds.is_empty() {
                rounds.push_back(current.clone());
            }
        }
        for ip in current.iter() {
            let rdata = match (ip, query.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(query.name().clone(), 0, rdata));
        }
    }
    reply.to_vec().unwrap()
}

/// A CA and a certificate it issued for `*.example.com`.
pub struct TestCa {
    pub ca_pem: String,
    pub leaf_der: Vec<u8>,
    pub leaf_key_der: Vec<u8>,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Signet forwarding test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params = CertificateParams::new(vec!["*.example.com".to_owned()]).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        TestCa {
            ca_pem: ca_cert.pem(),
            leaf_der: leaf.der().to_vec(),
            leaf_key_der: leaf_key.serialize_der(),
        }
    }

    /// The CA certificate in a PEM file (for `SP_FORWARD_CA_FILE`).
    pub fn write_ca(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// `https://<Host><path>?<query>`: the target URI as a receiver rebuilds it.
    pub target_uri: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub local: SocketAddr,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// An HTTPS receiver on `ip`, answering the queued statuses in turn, then 200.
pub struct Receiver {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Received>>>,
    statuses: Arc<Mutex<VecDeque<Answer>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(ca: &TestCa, ip: &str) -> Receiver {
        Self::start_on(ca, SocketAddr::new(ip.parse().unwrap(), 0)).await
    }

    pub async fn start_on(ca: &TestCa, addr: SocketAddr) -> Receiver {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut tls = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![ca.leaf_der.clone().into()],
                tokio_rustls::rustls::pki_types::PrivatePkcs8KeyDer::from(ca.leaf_key_der.clone())
                    .into(),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Received>>> = Arc::default();
        let statuses: Arc<Mutex<VecDeque<Answer>>> = Arc::default();
        let (reqs, stats) = (requests.clone(), statuses.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, reqs, stats) = (acceptor.clone(), reqs.clone(), stats.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (reqs, stats) = (reqs.clone(), stats.clone());
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let host = parts
                                    .headers
                                    .get("host")
                                    .and_then(|h| h.to_str().ok())
                                    .map(str::to_owned)
                                    .or_else(|| parts.uri.authority().map(|a| a.to_string()))
                                    .unwrap_or_default();
                                let path = parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default();
                                reqs.lock().unwrap().push(Received {
                                    method: parts.method.to_string(),
                                    target_uri: format!("https://{host}{path}"),
                                    version: format!("{:?}", parts.version),
                                    headers: parts
                                        .headers
                                        .iter()
                                        .map(|(n, v)| {
                                            (n.to_string(), v.to_str().unwrap_or("").to_owned())
                                        })
                                        .collect(),
                                    body: body.to_vec(),
                                    local: addr,
                                });
                                let next = stats.lock().unwrap().pop_front();
                                let (status, headers, delay) =
                                    next.unwrap_or((200, Vec::new(), std::time::Duration::ZERO));
                                tokio::time::sleep(delay).await;
                                let mut response = hyper::Response::builder().status(status);
                                for (n, v) in headers {
                                    response = response.header(n, v);
                                }
                                Ok::<_, std::convert::Infallible>(
                                    response
                                        .body(Full::new(Bytes::from_static(b"{\"ok\":true}")))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Receiver {
            addr,
            requests,
            statuses,
            task,
        }
    }

    /// The next answers, in order (with their headers, e.g. `Retry-After`).
    pub fn answer(&self, status: u16, headers: &[(&str, &str)]) {
        self.answer_after(status, headers, std::time::Duration::ZERO);
    }

    /// The next answer, after `delay` (the request is recorded when it arrives).
    pub fn answer_after(&self, status: u16, headers: &[(&str, &str)], delay: std::time::Duration) {
        self.statuses.lock().unwrap().push_back((
            status,
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            delay,
        ));
    }

    pub fn received(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plain TCP listener that counts connections: where a rebinding attack would point.
pub struct Victim {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Victim {
    pub async fn start(addr: SocketAddr) -> Victim {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let c = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((_tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
        Victim {
            addr,
            connections,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

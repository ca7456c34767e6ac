//! Resolve once, classify every address, pin one (SPEC §5). The connection goes to the pinned
//! address and nowhere else (`deliver`), so a DNS answer that changes after this lookup
//! (rebinding) cannot redirect it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use signet_protocol::internal::Code;

use super::classify::{NotGlobal, Policy};

/// Why a host gets no delivery: the 403 reason of SPEC §5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotGlobal(NotGlobal, IpAddr),
    NoResolution,
    Failed(String),
}

impl Refusal {
    pub fn code(&self) -> Code {
        match self {
            Refusal::NotGlobal(why, _) => why.code(),
            Refusal::NoResolution => Code::HelNoResolution,
            Refusal::Failed(_) => Code::HelResolutionFailed,
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Refusal::NotGlobal(_, ip) => {
                format!("forward_url host is or resolves to {ip}, which is not globally routable")
            }
            Refusal::NoResolution => "forward_url host has no A or AAAA record".into(),
            Refusal::Failed(e) => format!("forward_url host could not be resolved: {e}"),
        }
    }
}

pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// Asks `servers` (UDP, then TCP for truncated answers), or the system's resolvers when
    /// there are none.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Resolver, String> {
        let mut builder = if servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| format!("system DNS configuration: {e}"))?
        } else {
            let mut group = Vec::with_capacity(servers.len() * 2);
            for addr in servers {
                group.push(NameServerConfig::new(*addr, Protocol::Udp));
                group.push(NameServerConfig::new(*addr, Protocol::Tcp));
            }
            let config =
                ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::from(group));
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        };
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.attempts = 2;
        // every address is classified, A and AAAA alike
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        if !servers.is_empty() {
            opts.use_hosts_file = ResolveHosts::Never;
        }
        *builder.options_mut() = opts;
        Ok(Resolver {
            inner: builder.build(),
        })
    }

    /// Every address of `host` (a DNS name), in the order of the answer.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, Refusal> {
        // a fully qualified name: no search domains appended
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.inner.lookup_ip(fqdn).await {
            Ok(lookup) => {
                let ips: Vec<IpAddr> = lookup.iter().collect();
                if ips.is_empty() {
                    Err(Refusal::NoResolution)
                } else {
                    Ok(ips)
                }
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Err(Refusal::NoResolution),
            Err(e) => Err(Refusal::Failed(e.to_string())),
        }
    }
}

/// The address a delivery connects to: an IP-literal host is classified as it is (the URL
/// parser has turned `0x7f.1`, `2130706433` or `017700000001` into `127.0.0.1` already); a
/// name is resolved once and every address must pass (one that does not refuses the host),
/// then the first is pinned.
pub async fn pin(
    resolver: &Resolver,
    policy: &Policy,
    host: &url::Host<&str>,
) -> Result<IpAddr, Refusal> {
    let ips = match host {
        url::Host::Ipv4(ip) => vec![IpAddr::V4(*ip)],
        url::Host::Ipv6(ip) => vec![IpAddr::V6(*ip)],
        url::Host::Domain(name) => resolver.lookup(name).await?,
    };
    for ip in &ips {
        policy
            .check(*ip)
            .map_err(|why| Refusal::NotGlobal(why, *ip))?;
    }
    ips.first().copied().ok_or(Refusal::NoResolution)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pin_url(url: &str) -> Result<IpAddr, Refusal> {
        let resolver =
            Resolver::new(&["127.0.0.1:9".parse().unwrap()], Duration::from_millis(50)).unwrap();
        let url = url::Url::parse(url).unwrap();
        pin(&resolver, &Policy::default(), &url.host().unwrap()).await
    }

    /// IP literals in any notation the URL parser accepts are classified before any lookup
    /// or connection (the resolver here points at a closed port: it is never asked).
    #[tokio::test]
    async fn ip_literals_in_every_notation_are_classified() {
        let loopback = |r: Result<IpAddr, Refusal>| {
            matches!(r, Err(Refusal::NotGlobal(NotGlobal::Loopback, _)))
        };
        for url in [
            "https://127.0.0.1/",
            "https://0x7f.1/",
            "https://0x7f000001/",
            "https://2130706433/",
            "https://017700000001/",
            "https://0177.0.0.1/",
            "https://127.1/",
            "https://[::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:7f00:1]/",
            "https://[64:ff9b::127.0.0.1]/",
            "https://[2002:7f00:1::]/",
        ] {
            assert!(loopback(pin_url(url).await), "{url}");
        }
        assert_eq!(
            pin_url("https://0xa9.0xfe.0xa9.0xfe/").await,
            Err(Refusal::NotGlobal(
                NotGlobal::LinkLocal,
                "169.254.169.254".parse().unwrap()
            ))
        );
        assert!(matches!(
            pin_url("https://10.1/").await,
            Err(Refusal::NotGlobal(NotGlobal::Private, _))
        ));
        assert!(matches!(
            pin_url("https://[fd00::1]/").await,
            Err(Refusal::NotGlobal(NotGlobal::Private, _))
        ));
        assert!(matches!(
            pin_url("https://0/").await,
            Err(Refusal::NotGlobal(NotGlobal::Reserved, _))
        ));
        // a global literal is pinned as it is, without DNS
        assert_eq!(
            pin_url("https://8.8.8.8/").await,
            Ok("8.8.8.8".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn a_dead_resolver_is_a_resolution_failure() {
        let r = pin_url("https://hooks.example.com/").await;
        assert!(matches!(r, Err(Refusal::Failed(_))), "{r:?}");
        assert_eq!(r.unwrap_err().code(), Code::HelResolutionFailed);
    }
}

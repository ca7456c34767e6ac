//! The forwarder's settings (docs/config.md, "Forwarding"), read with the rest of the
//! configuration.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::classify::Cidr;
use crate::config::{invalid, parse_number, ConfigError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// `SP_DNS_SERVERS`: the resolvers to ask (`ip` or `ip:port`, comma-separated); empty: the
    /// system's (`/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
    /// `SP_FORWARD_CA_FILE`: PEM certificates trusted besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// `SP_FORWARD_ALLOW_CIDRS`: loopback ranges a delivery may reach although they are not
    /// global. For tests only (a receiver on this machine); empty by default.
    pub allow_cidrs: Vec<Cidr>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Of one attempt, DNS to last byte read.
    pub total_timeout: Duration,
    pub max_attempts: u64,
    /// A delivery not through after this long is dead-lettered.
    pub max_age: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How often the outbox worker looks for due deliveries, and how many it takes at once.
    pub poll: Duration,
    pub batch: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            dns_servers: Vec::new(),
            ca_file: None,
            allow_cidrs: Vec::new(),
            connect_timeout: Duration::from_millis(3000),
            read_timeout: Duration::from_millis(5000),
            total_timeout: Duration::from_millis(10_000),
            max_attempts: 8,
            max_age: Duration::from_secs(24 * 3600),
            retry_base: Duration::from_millis(1000),
            retry_max: Duration::from_secs(3600),
            poll: Duration::from_millis(500),
            batch: 16,
        }
    }
}

impl ForwardConfig {
    /// `get` is the configuration's lookup (an empty variable counts as unset).
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let d = ForwardConfig::default();
        let ms = |name: &'static str, default: Duration, min: u64, max: u64| {
            parse_number(name, get(name), default.as_millis() as u64, min, max)
                .map(Duration::from_millis)
        };
        let dns_servers = get("SP_DNS_SERVERS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse::<SocketAddr>()
                            .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                            .map_err(|_| {
                                invalid("SP_DNS_SERVERS", format!("{s:?} is not an ip or ip:port"))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let allow_cidrs = get("SP_FORWARD_ALLOW_CIDRS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        let cidr = Cidr::parse(s).map_err(|e| invalid("SP_FORWARD_ALLOW_CIDRS", e))?;
                        // a test receiver is on this machine: nothing else may be opened, so
                        // that the setting left on in production cannot reach a metadata
                        // service or a private network
                        if !cidr.is_loopback() {
                            return Err(invalid(
                                "SP_FORWARD_ALLOW_CIDRS",
                                format!("{s} is not inside 127.0.0.0/8 or ::1/128; only loopback ranges may be allowed"),
                            ));
                        }
                        Ok(cidr)
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let total_timeout = ms("SP_FORWARD_TIMEOUT_MS", d.total_timeout, 100, 120_000)?;
        Ok(ForwardConfig {
            dns_servers,
            ca_file: get("SP_FORWARD_CA_FILE").map(PathBuf::from),
            allow_cidrs,
            connect_timeout: ms(
                "SP_FORWARD_CONNECT_TIMEOUT_MS",
                d.connect_timeout,
                10,
                60_000,
            )?,
            read_timeout: ms("SP_FORWARD_READ_TIMEOUT_MS", d.read_timeout, 10, 120_000)?,
            total_timeout,
            max_attempts: parse_number(
                "SP_FORWARD_MAX_ATTEMPTS",
                get("SP_FORWARD_MAX_ATTEMPTS"),
                d.max_attempts,
                1,
                100,
            )?,
            max_age: Duration::from_secs(parse_number(
                "SP_FORWARD_MAX_AGE_SECS",
                get("SP_FORWARD_MAX_AGE_SECS"),
                d.max_age.as_secs(),
                1,
                30 * 24 * 3600,
            )?),
            retry_base: ms("SP_FORWARD_RETRY_BASE_MS", d.retry_base, 1, 3_600_000)?,
            retry_max: ms("SP_FORWARD_RETRY_MAX_MS", d.retry_max, 1, 24 * 3_600_000)?,
            poll: ms("SP_FORWARD_POLL_MS", d.poll, 10, 60_000)?,
            batch: parse_number(
                "SP_FORWARD_BATCH",
                get("SP_FORWARD_BATCH"),
                d.batch as u64,
                1,
                256,
            )? as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<ForwardConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ForwardConfig::from_lookup(&|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_and_forms() {
        assert_eq!(parse(&[]).unwrap(), ForwardConfig::default());
        let c = parse(&[
            ("SP_DNS_SERVERS", "127.0.0.1:5353, ::1"),
            ("SP_FORWARD_ALLOW_CIDRS", "127.0.0.0/8,::1/128"),
            ("SP_FORWARD_MAX_ATTEMPTS", "3"),
        ])
        .unwrap();
        assert_eq!(
            c.dns_servers,
            vec![
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(c.allow_cidrs.len(), 2);
        assert_eq!(c.max_attempts, 3);
    }

    #[test]
    fn only_loopback_may_be_allowed() {
        for bad in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "127.0.0.0/7",
            "169.254.169.254/32",
            "::/0",
        ] {
            let e = parse(&[("SP_FORWARD_ALLOW_CIDRS", bad)]).unwrap_err();
            assert_eq!(e.variable, "SP_FORWARD_ALLOW_CIDRS", "{bad}");
        }
        assert!(parse(&[("SP_DNS_SERVERS", "dns.example.com")]).is_err());
        assert!(parse(&[("SP_FORWARD_MAX_ATTEMPTS", "0")]).is_err());
    }
}

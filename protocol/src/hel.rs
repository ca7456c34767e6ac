//! HEL egress policy (SPEC §5), the part decided before any DNS resolution: `forward_url` must be
//! an absolute `https` URL without userinfo whose host, IDNA-normalized (UTS 46, lowercase, no
//! trailing dot), matches the tenant's or the global allowlist. The filter decides it; the
//! control plane decides it again, with its own allowlists, before it delivers.

use url::{Host, Url};

use crate::internal::Code;

/// Why a `forward_url` is refused; the reason is the error `code` of the 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    BadUrl,
    SchemeNotHttps,
    HostNotAllowed,
}

impl Denial {
    pub fn reason(self) -> &'static str {
        match self {
            Denial::BadUrl => "HEL_BAD_URL",
            Denial::SchemeNotHttps => "HEL_SCHEME_NOT_HTTPS",
            Denial::HostNotAllowed => "HEL_HOST_NOT_ALLOWED",
        }
    }

    pub fn code(self) -> Code {
        match self {
            Denial::BadUrl => Code::HelBadUrl,
            Denial::SchemeNotHttps => Code::HelSchemeNotHttps,
            Denial::HostNotAllowed => Code::HelHostNotAllowed,
        }
    }

    pub fn detail(self) -> &'static str {
        match self {
            Denial::BadUrl => "forward_url is not an absolute URL with a host and without userinfo",
            Denial::SchemeNotHttps => "forward_url must use https",
            Denial::HostNotAllowed => "forward_url host is not in the allowlist",
        }
    }
}

/// An allowlist entry: `example.com` (exactly that host) or `*.example.com` (any subdomain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    Subdomain(String),
}

impl HostPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let invalid = || format!("invalid allowlist host {pattern:?}");
        match pattern.strip_prefix("*.") {
            Some(parent) => normalize_host(parent)
                .map(HostPattern::Subdomain)
                .ok_or_else(invalid),
            None => normalize_host(pattern)
                .map(HostPattern::Exact)
                .ok_or_else(invalid),
        }
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Subdomain(parent) => host
                .strip_suffix(parent.as_str())
                .and_then(|label| label.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty()),
        }
    }
}

/// UTS 46 processing (lowercases, maps, punycodes), then the trailing dot removed.
pub fn normalize_host(host: &str) -> Option<String> {
    // strict: STD3 rules (letters, digits, hyphens) and DNS lengths, as a hostname must be
    let ascii = idna::domain_to_ascii_strict(host.strip_suffix('.').unwrap_or(host)).ok()?;
    let ascii = ascii.strip_suffix('.').unwrap_or(&ascii);
    (!ascii.is_empty() && !ascii.contains(['*', '/', '@', ':'])).then(|| ascii.to_owned())
}

/// A `forward_url` the policy allows, with its normalized host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub url: String,
    pub host: String,
}

/// Decides on `forward_url` against the tenant's allowlist (raw strings from the control plane;
/// entries that do not parse never match) and the global one (parsed at configuration load).
pub fn evaluate(
    forward_url: &str,
    tenant_allowlist: &[String],
    global_allowlist: &[HostPattern],
) -> Result<Allowed, Denial> {
    let url = Url::parse(forward_url).map_err(|_| Denial::BadUrl)?;
    if url.scheme() != "https" {
        return Err(Denial::SchemeNotHttps);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Denial::BadUrl);
    }
    let host = match url.host() {
        Some(Host::Domain(domain)) => normalize_host(domain).ok_or(Denial::BadUrl)?,
        Some(Host::Ipv4(ip)) => ip.to_string(),
        Some(Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(Denial::BadUrl),
    };
    let tenant_match = tenant_allowlist
        .iter()
        .filter_map(|p| HostPattern::parse(p).ok())
        .any(|p| p.matches(&host));
    if tenant_match || global_allowlist.iter().any(|p| p.matches(&host)) {
        Ok(Allowed {
            url: url.to_string(),
            host,
        })
    } else {
        Err(Denial::HostNotAllowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, tenant: &[&str]) -> Result<String, &'static str> {
        let tenant: Vec<String> = tenant.iter().map(|s| s.to_string()).collect();
        let global = [HostPattern::parse("global.example.org").unwrap()];
        evaluate(url, &tenant, &global)
            .map(|a| a.host)
            .map_err(Denial::reason)
    }

    #[test]
    fn reasons() {
        assert_eq!(check("not a url", &[]), Err("HEL_BAD_URL"));
        assert_eq!(check("/relative/path", &[]), Err("HEL_BAD_URL"));
        assert_eq!(
            check("http://api.example.com/", &["*.example.com"]),
            Err("HEL_SCHEME_NOT_HTTPS")
        );
        assert_eq!(
            check("ftp://api.example.com/", &["*.example.com"]),
            Err("HEL_SCHEME_NOT_HTTPS")
        );
        assert_eq!(
            check("https://user:pw@api.example.com/", &["*.example.com"]),
            Err("HEL_BAD_URL")
        );
        assert_eq!(
            check("https://user@api.example.com/", &["*.example.com"]),
            Err("HEL_BAD_URL")
        );
        assert_eq!(
            check("https://evil.com/", &["*.example.com"]),
            Err("HEL_HOST_NOT_ALLOWED")
        );
    }

    #[test]
    fn exact_and_wildcard_matching() {
        assert_eq!(
            check("https://api.example.com/x", &["*.example.com"]),
            Ok("api.example.com".into())
        );
        assert_eq!(
            check("https://a.b.example.com/", &["*.example.com"]),
            Ok("a.b.example.com".into())
        );
        assert_eq!(
            check("https://example.com/", &["*.example.com"]),
            Err("HEL_HOST_NOT_ALLOWED")
        );
        assert_eq!(
            check("https://badexample.com/", &["*.example.com"]),
            Err("HEL_HOST_NOT_ALLOWED")
        );
        assert_eq!(
            check("https://example.com/", &["example.com"]),
            Ok("example.com".into())
        );
        assert_eq!(
            check("https://x.example.com/", &["example.com"]),
            Err("HEL_HOST_NOT_ALLOWED")
        );
        assert_eq!(
            check("https://global.example.org/", &[]),
            Ok("global.example.org".into())
        );
    }

    #[test]
    fn hosts_are_idna_normalized_lowercased_and_undotted() {
        assert_eq!(
            check("https://API.Example.COM./", &["*.example.com"]),
            Ok("api.example.com".into())
        );
        // UTS 46 maps fullwidth and uppercase forms and punycodes non-ASCII labels
        assert_eq!(
            check("https://BÜCHER.example/", &["bücher.example"]),
            Ok("xn--bcher-kva.example".into())
        );
        assert_eq!(
            check("https://xn--bcher-kva.example/", &["BÜCHER.EXAMPLE."]),
            Ok("xn--bcher-kva.example".into())
        );
        assert_eq!(
            check("https://ｅｘａｍｐｌｅ.com/", &["example.com"]),
            Ok("example.com".into())
        );
    }

    #[test]
    fn patterns_are_validated() {
        assert!(HostPattern::parse("*.example.com").is_ok());
        assert!(HostPattern::parse("").is_err());
        assert!(HostPattern::parse("*.").is_err());
        assert!(HostPattern::parse("a.*.com").is_err());
        assert!(HostPattern::parse("exa mple.com").is_err());
        // unparsable tenant entries never match
        assert_eq!(
            check("https://a.example.com/", &["*.", "*.example.com"]),
            Ok("a.example.com".into())
        );
    }
}

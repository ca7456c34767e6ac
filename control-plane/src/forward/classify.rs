//! Which addresses a delivery may connect to: only globally routable ones, per the IANA IPv4
//! and IPv6 Special-Purpose Address Registries (RFC 6890 and its updates), the multicast
//! ranges, and, for IPv6, only the global unicast space 2000::/3 that IANA allocates from.
//!
//! IPv4 embedded in IPv6 is judged by the embedded address (IPv4-mapped `::ffff:0:0/96`,
//! NAT64 `64:ff9b::/96`, 6to4 `2002::/16`): `::ffff:127.0.0.1` is loopback. Forms whose
//! embedded address cannot be read without knowing the network (the local-use NAT64 prefix
//! `64:ff9b:1::/48`, Teredo `2001::/32`, the deprecated IPv4-compatible `::/96`) are refused.
//!
//! The table is a deny list inside an allow list: an IPv4 address is global unless a row
//! refuses it; an IPv6 address must be in 2000::/3 and not refused by a row. Rows that the
//! registries mark globally reachable (AS112, AMT, ORCHIDv2, the PCP/TURN anycasts) are not
//! refused, except inside 192.0.0.0/24, refused whole as the issue of this feature asks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use signet_protocol::internal::Code;

/// Why an address is not a delivery target: the `HEL_RESOLVED_*` reason of SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotGlobal {
    Loopback,
    Private,
    LinkLocal,
    Reserved,
}

impl NotGlobal {
    pub fn code(self) -> Code {
        match self {
            NotGlobal::Loopback => Code::HelResolvedLoopback,
            NotGlobal::Private => Code::HelResolvedPrivate,
            NotGlobal::LinkLocal => Code::HelResolvedLinkLocal,
            NotGlobal::Reserved => Code::HelResolvedReserved,
        }
    }
}

use NotGlobal::{LinkLocal, Loopback, Private, Reserved};

/// (network, prefix length, why, registry name): IPv4 ranges that are not globally reachable.
const V4: &[(Ipv4Addr, u8, NotGlobal, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, Reserved, "this network"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, Private, "private-use"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        Private,
        "shared address space (CGNAT)",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, Loopback, "loopback"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, LinkLocal, "link local"),
    (Ipv4Addr::new(172, 16, 0, 0), 12, Private, "private-use"),
    (
        Ipv4Addr::new(192, 0, 0, 0),
        24,
        Reserved,
        "IETF protocol assignments",
    ),
    (
        Ipv4Addr::new(192, 0, 2, 0),
        24,
        Reserved,
        "documentation (TEST-NET-1)",
    ),
    (
        Ipv4Addr::new(192, 88, 99, 0),
        24,
        Reserved,
        "6to4 relay anycast (deprecated)",
    ),
    (Ipv4Addr::new(192, 168, 0, 0), 16, Private, "private-use"),
    (Ipv4Addr::new(198, 18, 0, 0), 15, Reserved, "benchmarking"),
    (
        Ipv4Addr::new(198, 51, 100, 0),
        24,
        Reserved,
        "documentation (TEST-NET-2)",
    ),
    (
        Ipv4Addr::new(203, 0, 113, 0),
        24,
        Reserved,
        "documentation (TEST-NET-3)",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 4, Reserved, "multicast"),
    // includes the limited broadcast 255.255.255.255/32
    (Ipv4Addr::new(240, 0, 0, 0), 4, Reserved, "reserved"),
];

/// IPv6 ranges inside 2000::/3 that are not globally reachable (outside 2000::/3 nothing is,
/// see [`classify_v6`]).
const V6: &[(Ipv6Addr, u8, NotGlobal, &str)] = &[
    // 2001::/23 (IETF protocol assignments) minus its globally reachable rows
    (
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
        32,
        Reserved,
        "Teredo",
    ),
    (
        Ipv6Addr::new(0x2001, 1, 0, 0, 0, 0, 0, 0),
        32,
        Reserved,
        "IETF protocol assignments",
    ),
    (
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0),
        48,
        Reserved,
        "benchmarking",
    ),
    (
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0),
        32,
        Reserved,
        "IETF protocol assignments",
    ),
    (
        Ipv6Addr::new(0x2001, 4, 0, 0, 0, 0, 0, 0),
        32,
        Reserved,
        "IETF protocol assignments",
    ),
    (
        Ipv6Addr::new(0x2001, 6, 0, 0, 0, 0, 0, 0),
        31,
        Reserved,
        "IETF protocol assignments",
    ),
    (
        Ipv6Addr::new(0x2001, 8, 0, 0, 0, 0, 0, 0),
        29,
        Reserved,
        "IETF protocol assignments",
    ),
    (
        Ipv6Addr::new(0x2001, 0x10, 0, 0, 0, 0, 0, 0),
        28,
        Reserved,
        "ORCHID (deprecated)",
    ),
    (
        Ipv6Addr::new(0x2001, 0x40, 0, 0, 0, 0, 0, 0),
        26,
        Reserved,
        "IETF protocol assignments",
    ),
    (
        Ipv6Addr::new(0x2001, 0x80, 0, 0, 0, 0, 0, 0),
        25,
        Reserved,
        "IETF protocol assignments",
    ),
    (
        Ipv6Addr::new(0x2001, 0x100, 0, 0, 0, 0, 0, 0),
        24,
        Reserved,
        "IETF protocol assignments",
    ),
    (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
        32,
        Reserved,
        "documentation",
    ),
    (
        Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0),
        20,
        Reserved,
        "documentation",
    ),
    (
        Ipv6Addr::new(0x5f00, 0, 0, 0, 0, 0, 0, 0),
        16,
        Reserved,
        "segment routing (SRv6) SIDs",
    ),
];

/// Globally reachable rows inside the refused ones above (anycast services, AS112).
const V6_GLOBAL_IN_RESERVED: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::new(0x2001, 1, 0, 0, 0, 0, 0, 1), 128), // PCP anycast
    (Ipv6Addr::new(0x2001, 1, 0, 0, 0, 0, 0, 2), 128), // TURN anycast
    (Ipv6Addr::new(0x2001, 1, 0, 0, 0, 0, 0, 3), 128), // DNS-SD SRP anycast
    (Ipv6Addr::new(0x2001, 4, 0x112, 0, 0, 0, 0, 0), 48), // AS112-v6
];

/// `Ok` when `ip` is globally routable; else why not.
pub fn classify(ip: IpAddr) -> Result<(), NotGlobal> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

pub fn classify_v4(ip: Ipv4Addr) -> Result<(), NotGlobal> {
    let bits = u32::from(ip);
    match V4.iter().find(|(net, len, _, _)| in_v4(bits, *net, *len)) {
        Some((_, _, why, _)) => Err(*why),
        None => Ok(()),
    }
}

pub fn classify_v6(ip: Ipv6Addr) -> Result<(), NotGlobal> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from(bits as u32);
    if ip.is_loopback() {
        return Err(Loopback);
    }
    // IPv4-mapped ::ffff:0:0/96
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    // NAT64 well-known prefix 64:ff9b::/96: the last 32 bits are the IPv4 destination
    if in_v6(bits, Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
        return classify_v4(low32);
    }
    // 6to4 2002::/16: bits 16..48 are the IPv4 address of the site
    if in_v6(bits, Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16) {
        return classify_v4(Ipv4Addr::from((bits >> 80) as u32));
    }
    if in_v6(bits, Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10) {
        return Err(LinkLocal);
    }
    // unique local fc00::/7 and the deprecated site-local fec0::/10
    if in_v6(bits, Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7)
        || in_v6(bits, Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10)
    {
        return Err(Private);
    }
    // Everything else outside 2000::/3 (::/128, IPv4-compatible ::/96, the local-use NAT64
    // 64:ff9b:1::/48, discard-only 100::/64, dummy 100:0:0:1::/64, multicast ff00::/8, the
    // unassigned space) is not a unicast address IANA allocated to anyone.
    if !in_v6(bits, Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3) {
        return Err(Reserved);
    }
    if V6_GLOBAL_IN_RESERVED
        .iter()
        .any(|(net, len)| in_v6(bits, *net, *len))
    {
        return Ok(());
    }
    match V6.iter().find(|(net, len, _, _)| in_v6(bits, *net, *len)) {
        Some((_, _, why, _)) => Err(*why),
        None => Ok(()),
    }
}

fn in_v4(bits: u32, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    bits & mask == u32::from(net) & mask
}

fn in_v6(bits: u128, net: Ipv6Addr, len: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    bits & mask == u128::from(net) & mask
}

/// A CIDR range (`127.0.0.0/8`, `::1/128`): the test-only `SP_FORWARD_ALLOW_CIDRS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let invalid = || format!("{text:?} is not an address/prefix-length range");
        let (net, len) = text.trim().split_once('/').ok_or_else(invalid)?;
        let net: IpAddr = net.parse().map_err(|_| invalid())?;
        let len: u8 = len.parse().map_err(|_| invalid())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(invalid());
        }
        Ok(Cidr { net, len })
    }

    /// Inside 127.0.0.0/8 or ::1/128.
    pub fn is_loopback(&self) -> bool {
        match self.net {
            IpAddr::V4(net) => self.len >= 8 && net.is_loopback(),
            IpAddr::V6(net) => self.len == 128 && net.is_loopback(),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => in_v4(u32::from(ip), net, self.len),
            (IpAddr::V6(net), IpAddr::V6(ip)) => in_v6(u128::from(ip), net, self.len),
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

/// The classifier a delivery uses: [`classify`], except for the ranges of the test-only
/// allow setting (empty in production).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub allow: Vec<Cidr>,
}

impl Policy {
    pub fn check(&self, ip: IpAddr) -> Result<(), NotGlobal> {
        // judged as the address it stands for: ::ffff:127.0.0.1 is 127.0.0.1 for the allow
        // ranges too
        let canonical = ip.to_canonical();
        if self.allow.iter().any(|c| c.contains(canonical)) {
            return Ok(());
        }
        classify(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Result<(), NotGlobal> {
        classify(text.parse().unwrap())
    }

    /// Smokescreen-style: the first and last address of every range are refused with its
    /// reason, and the addresses just outside it are global (when no other range holds them).
    #[test]
    fn ipv4_boundaries() {
        let table: &[(&str, Result<(), NotGlobal>)] = &[
            ("0.0.0.0", Err(Reserved)),
            ("0.255.255.255", Err(Reserved)),
            ("1.0.0.0", Ok(())),
            ("9.255.255.255", Ok(())),
            ("10.0.0.0", Err(Private)),
            ("10.255.255.255", Err(Private)),
            ("11.0.0.0", Ok(())),
            ("100.63.255.255", Ok(())),
            ("100.64.0.0", Err(Private)),
            ("100.127.255.255", Err(Private)),
            ("100.128.0.0", Ok(())),
            ("126.255.255.255", Ok(())),
            ("127.0.0.0", Err(Loopback)),
            ("127.0.0.1", Err(Loopback)),
            ("127.255.255.255", Err(Loopback)),
            ("128.0.0.0", Ok(())),
            ("169.253.255.255", Ok(())),
            ("169.254.0.0", Err(LinkLocal)),
            ("169.254.169.254", Err(LinkLocal)),
            ("169.254.255.255", Err(LinkLocal)),
            ("169.255.0.0", Ok(())),
            ("172.15.255.255", Ok(())),
            ("172.16.0.0", Err(Private)),
            ("172.31.255.255", Err(Private)),
            ("172.32.0.0", Ok(())),
            ("191.255.255.255", Ok(())),
            ("192.0.0.0", Err(Reserved)),
            ("192.0.0.9", Err(Reserved)),
            ("192.0.0.255", Err(Reserved)),
            ("192.0.1.0", Ok(())),
            ("192.0.2.0", Err(Reserved)),
            ("192.0.2.255", Err(Reserved)),
            ("192.0.3.0", Ok(())),
            ("192.31.196.1", Ok(())), // AS112-v4: globally reachable
            ("192.52.193.1", Ok(())), // AMT: globally reachable
            ("192.88.98.255", Ok(())),
            ("192.88.99.0", Err(Reserved)),
            ("192.88.99.255", Err(Reserved)),
            ("192.88.100.0", Ok(())),
            ("192.167.255.255", Ok(())),
            ("192.168.0.0", Err(Private)),
            ("192.168.255.255", Err(Private)),
            ("192.169.0.0", Ok(())),
            ("192.175.48.1", Ok(())), // AS112 direct delegation: globally reachable
            ("198.17.255.255", Ok(())),
            ("198.18.0.0", Err(Reserved)),
            ("198.19.255.255", Err(Reserved)),
            ("198.20.0.0", Ok(())),
            ("198.51.99.255", Ok(())),
            ("198.51.100.0", Err(Reserved)),
            ("198.51.100.255", Err(Reserved)),
            ("198.51.101.0", Ok(())),
            ("203.0.112.255", Ok(())),
            ("203.0.113.0", Err(Reserved)),
            ("203.0.113.255", Err(Reserved)),
            ("203.0.114.0", Ok(())),
            ("223.255.255.255", Ok(())),
            ("224.0.0.0", Err(Reserved)),
            ("239.255.255.255", Err(Reserved)),
            ("240.0.0.0", Err(Reserved)),
            ("255.255.255.254", Err(Reserved)),
            ("255.255.255.255", Err(Reserved)),
            ("8.8.8.8", Ok(())),
            ("1.1.1.1", Ok(())),
        ];
        for (addr, want) in table {
            assert_eq!(v(addr), *want, "{addr}");
        }
    }

    #[test]
    fn ipv6_boundaries() {
        let table: &[(&str, Result<(), NotGlobal>)] = &[
            ("::", Err(Reserved)),
            ("::1", Err(Loopback)),
            ("::2", Err(Reserved)),
            // deprecated IPv4-compatible: refused whatever it embeds
            ("::8.8.8.8", Err(Reserved)),
            // IPv4-mapped: the embedded address decides
            ("::ffff:127.0.0.1", Err(Loopback)),
            ("::ffff:10.1.2.3", Err(Private)),
            ("::ffff:169.254.169.254", Err(LinkLocal)),
            ("::ffff:0.0.0.0", Err(Reserved)),
            ("::ffff:8.8.8.8", Ok(())),
            ("::fffe:8.8.8.8", Err(Reserved)),
            // NAT64 well-known prefix: the embedded address decides
            ("64:ff9b::7f00:1", Err(Loopback)),
            ("64:ff9b::a9fe:a9fe", Err(LinkLocal)),
            ("64:ff9b::808:808", Ok(())),
            ("64:ff9b::1:808:808", Err(Reserved)), // past the /96: not NAT64
            // local-use NAT64: the embedding is the network's choice
            ("64:ff9b:1::", Err(Reserved)),
            ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", Err(Reserved)),
            ("64:ff9b:1::808:808", Err(Reserved)),
            // discard-only and dummy prefixes
            ("100::", Err(Reserved)),
            ("100::ffff:ffff:ffff:ffff", Err(Reserved)),
            ("100:0:0:1::1", Err(Reserved)),
            // 2000::/3 is the only global unicast space
            ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Err(Reserved)),
            ("2000::", Ok(())),
            ("2000:ffff::1", Ok(())),
            // Teredo: refused
            ("2001::", Err(Reserved)),
            ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", Err(Reserved)),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Err(Reserved)),
            ("2001:1::", Err(Reserved)),
            ("2001:1::1", Ok(())), // PCP anycast
            ("2001:1::2", Ok(())), // TURN anycast
            ("2001:1::4", Err(Reserved)),
            ("2001:2::", Err(Reserved)),
            ("2001:2:0:ffff::1", Err(Reserved)),
            ("2001:2:1::", Err(Reserved)),
            ("2001:3::1", Ok(())),     // AMT
            ("2001:4:112::1", Ok(())), // AS112
            ("2001:4:113::1", Err(Reserved)),
            ("2001:5::1", Ok(())), // LISP EID space
            ("2001:10::", Err(Reserved)),
            ("2001:1f:ffff::1", Err(Reserved)),
            ("2001:20::1", Ok(())), // ORCHIDv2
            ("2001:2f:ffff::1", Ok(())),
            ("2001:30::1", Ok(())), // drone remote ID
            ("2001:40::1", Err(Reserved)),
            ("2001:1ff:ffff::1", Err(Reserved)),
            ("2001:200::", Ok(())), // first address after 2001::/23
            ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", Ok(())),
            ("2001:db8::", Err(Reserved)),
            ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", Err(Reserved)),
            ("2001:db9::", Ok(())),
            // 6to4: the embedded address decides
            ("2002:7f00:1::", Err(Loopback)),
            ("2002:c0a8:101::1", Err(Private)),
            ("2002:a9fe:a9fe::", Err(LinkLocal)),
            ("2002:808:808::1", Ok(())),
            ("3ffe:ffff::1", Ok(())),
            ("3fff::", Err(Reserved)),
            ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", Err(Reserved)),
            ("3fff:1000::", Ok(())),
            ("4000::", Err(Reserved)),
            ("5f00::1", Err(Reserved)),
            ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Err(Reserved)),
            ("fc00::", Err(Private)),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Err(Private)),
            ("fe00::", Err(Reserved)),
            ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Err(Reserved)),
            ("fe80::", Err(LinkLocal)),
            ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Err(LinkLocal)),
            ("fec0::", Err(Private)),
            ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Err(Private)),
            ("ff00::", Err(Reserved)),
            ("ff02::1", Err(Reserved)),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Err(Reserved)),
            ("2606:4700:4700::1111", Ok(())),
        ];
        for (addr, want) in table {
            assert_eq!(v(addr), *want, "{addr}");
        }
    }

    #[test]
    fn the_allow_ranges_open_only_what_they_name() {
        let policy = Policy {
            allow: vec![Cidr::parse("127.0.0.2/32").unwrap()],
        };
        assert_eq!(policy.check("127.0.0.2".parse().unwrap()), Ok(()));
        assert_eq!(policy.check("::ffff:127.0.0.2".parse().unwrap()), Ok(()));
        assert_eq!(policy.check("127.0.0.1".parse().unwrap()), Err(Loopback));
        assert_eq!(
            Policy::default().check("127.0.0.2".parse().unwrap()),
            Err(Loopback)
        );
        for bad in ["127.0.0.1", "127.0.0.1/33", "::1/129", "x/8", "10.0.0.0/"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Cidr::parse(" ::1/128 ").unwrap().to_string(), "::1/128");
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
    }
}

//! The exit policy: which resolved target addresses and ports an exit may
//! connect to. Special ranges (loopback, private, link-local, …) are denied
//! first unless `allow_private`; then ordered `allow|deny CIDR[:PORTS]` rules
//! apply, first match wins, and no match denies.

use anyhow::{Result, anyhow, bail};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
struct Rule {
    action: Action,
    net: IpNet,
    ports: (u16, u16),
    text: String,
}

/// A parsed exit policy.
#[derive(Debug, Clone)]
pub struct ExitPolicy {
    allow_private: bool,
    rules: Vec<Rule>,
}

/// Why a target was refused: what the log line and SOCKS reply carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed.
    Allow,
    /// Denied, and the rule or range that denied it.
    Deny(String),
}

impl ExitPolicy {
    /// Parses the rules.
    pub fn parse<S: AsRef<str>>(rules: &[S], allow_private: bool) -> Result<Self> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                parse_rule(r.as_ref()).map_err(|e| anyhow!("rule {i} `{}`: {e}", r.as_ref()))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            allow_private,
            rules,
        })
    }

    /// Decides one resolved target.
    pub fn check(&self, target: SocketAddr) -> Verdict {
        let ip = canonical(target.ip());
        if !self.allow_private
            && let Some(range) = special_range(ip)
        {
            return Verdict::Deny(format!(
                "{range} targets are not allowed (exit.allow_private = false)"
            ));
        }
        for r in &self.rules {
            if r.net.contains(&ip) && (r.ports.0..=r.ports.1).contains(&target.port()) {
                return match r.action {
                    Action::Allow => Verdict::Allow,
                    Action::Deny => Verdict::Deny(format!("exit rule `{}`", r.text)),
                };
            }
        }
        Verdict::Deny("no exit rule allows it".into())
    }
}

fn parse_rule(s: &str) -> Result<Rule> {
    let mut parts = s.split_whitespace();
    let action = match parts.next() {
        Some("allow") => Action::Allow,
        Some("deny") => Action::Deny,
        _ => bail!("must start with allow or deny"),
    };
    let target = parts.next().ok_or_else(|| anyhow!("missing CIDR"))?;
    if parts.next().is_some() {
        bail!("expected `allow|deny CIDR[:PORTS]`");
    }
    // IPv6 CIDRs contain colons: ports follow the last colon only after a '/'.
    let (cidr, ports) = match target.rfind('/') {
        Some(slash) => match target[slash..].find(':') {
            Some(c) => (&target[..slash + c], Some(&target[slash + c + 1..])),
            None => (target, None),
        },
        None => bail!("`{target}` is not a CIDR (like 10.0.0.0/8 or ::/0)"),
    };
    let net: IpNet = cidr.parse().map_err(|e| anyhow!("`{cidr}`: {e}"))?;
    let ports = match ports {
        None | Some("*") => (1, 65535),
        Some(p) => match p.split_once('-') {
            Some((a, b)) => (a.parse()?, b.parse()?),
            None => {
                let n: u16 = p.parse()?;
                (n, n)
            }
        },
    };
    if ports.0 > ports.1 {
        bail!("port range {}-{} is empty", ports.0, ports.1);
    }
    Ok(Rule {
        action,
        net,
        ports,
        text: s.to_string(),
    })
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The name of the special (non-public) range `ip` is in, if any: loopback,
/// private, link-local, CGNAT, ULA and the rest the exit policy denies by
/// default (IPv4-mapped addresses judged as IPv4).
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    special_range(canonical(ip))
}

/// The name of the special range an address is in, if any.
fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => special_v4(a),
        IpAddr::V6(a) => special_v6(a),
    }
}

fn special_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    Some(if a.is_loopback() {
        "loopback"
    } else if a.is_private() {
        "private"
    } else if a.is_link_local() {
        "link-local"
    } else if a.is_unspecified() || o[0] == 0 {
        "unspecified"
    } else if a.is_broadcast() || a.is_multicast() || o[0] >= 240 {
        "multicast/reserved"
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        "shared (CGNAT)"
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        "IETF protocol assignments"
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        "benchmarking"
    } else if a.is_documentation() {
        "documentation"
    } else {
        return None;
    })
}

fn special_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    Some(if a.is_loopback() {
        "loopback"
    } else if a.is_unspecified() {
        "unspecified"
    } else if a.is_multicast() {
        "multicast"
    } else if (s[0] & 0xfe00) == 0xfc00 {
        "private (ULA)"
    } else if (s[0] & 0xffc0) == 0xfe80 {
        "link-local"
    } else if (s[0] & 0xffc0) == 0xfec0 {
        "site-local"
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        "local-use NAT64"
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        // NAT64 (RFC 6052): the IPv4 address it reaches is the low 32 bits.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return special_v4(v4).map(|_| "NAT64 of a special IPv4 address");
    } else if s[0] == 0x2002 {
        // 6to4 (RFC 3056): the relay's IPv4 address is bits 16 to 48.
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return special_v4(v4).map(|_| "6to4 of a special IPv4 address");
    } else if s[0] == 0x2001 && s[1] == 0 {
        "Teredo tunnel"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_ranges_denied_by_default() {
        let p = ExitPolicy::parse(&["allow 0.0.0.0/0", "allow ::/0"], false).unwrap();
        for t in [
            "127.0.0.1:80",
            "10.1.2.3:80",
            "192.168.1.1:443",
            "[::1]:80",
            "[fd00::1]:80",
            "[::ffff:127.0.0.1]:80",
            "100.64.0.1:80",
            "169.254.1.1:80",
            "192.0.0.8:80",
            "198.18.0.1:80",
            "198.19.255.1:80",
            "203.0.113.5:80",
            "[fec0::1]:80",
            "[64:ff9b::7f00:1]:80",
            "[64:ff9b::a00:1]:80",
            "[64:ff9b:1::1]:80",
            "[2002:7f00:1::1]:80",
            "[2002:c0a8:101::1]:80",
            "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:80",
        ] {
            assert!(matches!(p.check(sa(t)), Verdict::Deny(_)), "{t}");
        }
        assert_eq!(p.check(sa("93.184.216.34:443")), Verdict::Allow);
        // NAT64 and 6to4 of a public address are public.
        assert_eq!(p.check(sa("[64:ff9b::5db8:d822]:443")), Verdict::Allow);
        assert_eq!(p.check(sa("[2002:5db8:d822::1]:443")), Verdict::Allow);
        assert_eq!(p.check(sa("[2001:db8::1]:443")), Verdict::Allow);
    }

    #[test]
    fn allow_private_lets_loopback_through() {
        let p = ExitPolicy::parse(&["allow 0.0.0.0/0"], true).unwrap();
        assert_eq!(p.check(sa("127.0.0.1:8080")), Verdict::Allow);
    }

    #[test]
    fn first_match_wins_with_ports() {
        let p = ExitPolicy::parse(
            &[
                "deny 0.0.0.0/0:25",
                "allow 93.0.0.0/8:80-443",
                "allow ::/0:*",
            ],
            false,
        )
        .unwrap();
        assert_eq!(p.check(sa("93.1.1.1:443")), Verdict::Allow);
        assert_eq!(
            p.check(sa("93.1.1.1:25")),
            Verdict::Deny("exit rule `deny 0.0.0.0/0:25`".into())
        );
        assert_eq!(
            p.check(sa("93.1.1.1:8080")),
            Verdict::Deny("no exit rule allows it".into())
        );
        assert_eq!(p.check(sa("[2001:db8::1]:22")), Verdict::Allow);
    }

    #[test]
    fn bad_rules_are_refused() {
        for bad in [
            "permit 0.0.0.0/0",
            "allow 1.2.3.4",
            "allow 0.0.0.0/0:9-1",
            "allow ::/0:x",
            "allow",
        ] {
            assert!(ExitPolicy::parse(&[bad], false).is_err(), "{bad}");
        }
    }
}

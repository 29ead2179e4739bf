//! Who may purge: source networks and, optionally, a bearer token.

use std::net::IpAddr;

use ipnet::IpNet;
use subtle::ConstantTimeEq;

/// Whether `ip` is in one of `nets` (an IPv4 client seen on a dual-stack socket as
/// `::ffff:a.b.c.d` counts as `a.b.c.d`).
pub fn in_networks(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    nets.iter().any(|net| net.contains(&ip))
}

/// Who may purge: source networks and, optionally, a bearer token.
#[derive(Debug, Clone)]
pub struct Access {
    pub allow: Vec<IpNet>,
    pub token: Option<String>,
}

impl Access {
    /// May a request from `ip` with this `Authorization` header purge?
    pub fn permits(&self, ip: Option<IpAddr>, authorization: Option<&str>) -> bool {
        let from_allowed = ip.is_some_and(|ip| in_networks(&self.allow, ip));
        let token_ok = match &self.token {
            None => true,
            Some(t) => authorization
                // RFC 9110 §11.1: the scheme is case-insensitive, one or more spaces follow it
                .and_then(|a| a.trim_start().split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, given)| given)
                .is_some_and(|given| bool::from(given.trim().as_bytes().ct_eq(t.as_bytes()))),
        };
        from_allowed && token_ok
    }
}

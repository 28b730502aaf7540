//! Networks in CIDR notation and the test of whether an address is on the public internet:
//! what `[push]` and `[federation] allowed_networks` and `[rate_limits] trusted_proxies` name,
//! and what the server's outbound HTTP client (`net_filter`) may reach.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// A network in CIDR notation: `10.1.0.0/16`, `fd00::/8`, or a bare address (one host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || format!("{text:?} is not a network: write an address or address/prefix, e.g. \"10.0.0.0/8\"");
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix.parse::<u8>().map_err(|_| invalid())?)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        if prefix > bits {
            return Err(invalid());
        }
        Ok(Self { addr, prefix })
    }
}

impl TryFrom<String> for Network {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => v4_in(ip, net.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => v6_in(ip, net.segments(), self.prefix),
            _ => false,
        }
    }
}

fn v4_in(ip: Ipv4Addr, net: [u8; 4], prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from_be_bytes(net) & mask
}

fn v6_in(ip: Ipv6Addr, net: [u16; 8], prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

/// IPv4 networks that are not the public internet: "this network" and unspecified, private
/// (RFC 1918), shared address space (CGNAT), loopback, link-local, IETF protocol assignments,
/// documentation, 6to4 relay, benchmarking, multicast, reserved and broadcast.
const INTERNAL_V4: [([u8; 4], u8); 15] = [
    ([0, 0, 0, 0], 8),
    ([10, 0, 0, 0], 8),
    ([100, 64, 0, 0], 10),
    ([127, 0, 0, 0], 8),
    ([169, 254, 0, 0], 16),
    ([172, 16, 0, 0], 12),
    ([192, 0, 0, 0], 24),
    ([192, 0, 2, 0], 24),
    ([192, 88, 99, 0], 24),
    ([192, 168, 0, 0], 16),
    ([198, 18, 0, 0], 15),
    ([198, 51, 100, 0], 24),
    ([203, 0, 113, 0], 24),
    ([224, 0, 0, 0], 4),
    ([240, 0, 0, 0], 4),
];

/// IPv6 networks that are not the public internet: IPv4-compatible (which holds unspecified and
/// loopback), local-use NAT64, discard-only, IETF protocol assignments (Teredo among them),
/// documentation, unique local (ULA), site-local, link-local and multicast. IPv4-mapped,
/// NAT64 and 6to4 addresses are judged by the IPv4 address they carry.
const INTERNAL_V6: [([u16; 8], u8); 9] = [
    ([0, 0, 0, 0, 0, 0, 0, 0], 96),
    ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
    ([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
    ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
    ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
];

/// Whether `ip` belongs to a network that is not the public internet.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(ip) => INTERNAL_V4.iter().any(|(net, prefix)| v4_in(ip, *net, *prefix)),
        IpAddr::V6(ip) => {
            let s = ip.segments();
            let embedded = if v6_in(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
                // NAT64 (RFC 6052): the last 32 bits.
                Some(Ipv4Addr::from(u128::from(ip) as u32))
            } else if s[0] == 0x2002 {
                // 6to4 (RFC 3056): bits 16 to 48.
                Some(Ipv4Addr::from((u32::from(s[1]) << 16) | u32::from(s[2])))
            } else {
                None
            };
            embedded.is_some_and(|v4| is_internal(IpAddr::V4(v4))) || INTERNAL_V6.iter().any(|(net, prefix)| v6_in(ip, *net, *prefix))
        }
    }
}

/// Which addresses outbound requests may reach: the public internet, and the internal networks
/// the operator allowed.
#[derive(Clone, Debug, Default)]
pub struct AddressFilter {
    allowed: Vec<Network>,
}

impl AddressFilter {
    pub fn new(allowed: &[Network]) -> Self {
        Self { allowed: allowed.to_vec() }
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.allowed.iter().any(|network| network.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_addresses_in_every_form_are_refused() {
        let filter = AddressFilter::default();
        for internal in [
            "127.0.0.1", "127.8.9.10", "0.0.0.0", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "169.254.169.254",
            "100.64.0.1", "100.127.255.254", "224.0.0.1", "255.255.255.255", "198.18.0.1",
            "::", "::1", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "fec0::1",
            // IPv4-mapped, IPv4-compatible, NAT64 and 6to4 forms of internal IPv4 addresses.
            "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:c0a8:0101::1",
        ] {
            assert!(!filter.permits(ip(internal)), "{internal} must be refused");
        }
        for public in ["1.1.1.1", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700:4700::1111", "::ffff:1.1.1.1", "64:ff9b::808:808", "2002:0808:0808::1"] {
            assert!(filter.permits(ip(public)), "{public} must be permitted");
        }
    }

    #[test]
    fn allowed_networks_open_exactly_themselves() {
        let allowed: Vec<Network> = ["127.0.0.1", "10.20.0.0/16", "fd00:1::/32"].iter().map(|n| n.parse().unwrap()).collect();
        let filter = AddressFilter::new(&allowed);
        for permitted in ["127.0.0.1", "::ffff:127.0.0.1", "10.20.3.4", "fd00:1:2::3"] {
            assert!(filter.permits(ip(permitted)), "{permitted}");
        }
        for refused in ["127.0.0.2", "10.21.0.1", "fd00:2::1", "::1"] {
            assert!(!filter.permits(ip(refused)), "{refused}");
        }
        assert!("10.0.0.0/33".parse::<Network>().is_err() && "example.org/8".parse::<Network>().is_err() && "::/129".parse::<Network>().is_err());
        let everything: Vec<Network> = ["0.0.0.0/0", "::/0"].iter().map(|n| n.parse().unwrap()).collect();
        assert!(AddressFilter::new(&everything).permits(ip("192.168.0.1")) && AddressFilter::new(&everything).permits(ip("::1")));
    }
}

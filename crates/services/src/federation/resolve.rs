//! Server discovery (server-server API, "Resolving server names"): from a server name to where
//! to connect, which name its certificate must carry and which `Host` to send. The decision is a
//! pure function of the name and what the lookups found, so it is tested without a network.

use std::net::{IpAddr, SocketAddr};

/// The default federation port.
pub const DEFAULT_PORT: u16 = 8448;

/// Where to reach a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The name the TLS certificate must be valid for (a hostname or an IP literal).
    pub tls_name: String,
    /// What to connect to: an address, or a hostname to look up.
    pub connect: Connect,
    pub port: u16,
    /// The `Host` header.
    pub host_header: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connect {
    Ip(IpAddr),
    /// A/AAAA lookup of this name.
    Lookup(String),
}

/// A server name split into host and optional port (`[::1]:8448`, `1.2.3.4`, `example.org:80`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name {
    pub host: String,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
}

impl Name {
    pub fn parse(name: &str) -> Option<Self> {
        let (host, port) = if let Some(rest) = name.strip_prefix('[') {
            let (ip, after) = rest.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port.parse().ok()?),
                None if after.is_empty() => None,
                None => return None,
            };
            (ip.to_owned(), port)
        } else {
            match name.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port.parse().ok()?)),
                None => (name.to_owned(), None),
            }
        };
        if host.is_empty() {
            return None;
        }
        let ip = host.parse::<IpAddr>().ok();
        Some(Self { host, ip, port })
    }

    /// As it appears in a URL or `Host` header (IPv6 in brackets).
    fn authority(&self) -> String {
        let host = match self.ip {
            Some(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => self.host.clone(),
        };
        match self.port {
            Some(port) => format!("{host}:{port}"),
            None => host,
        }
    }
}

/// An SRV answer's first target (lowest priority).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Srv {
    pub target: String,
    pub port: u16,
}

/// The steps that need no lookup: IP literals and explicit ports.
pub fn direct(name: &Name) -> Option<Route> {
    if let Some(ip) = name.ip {
        return Some(Route { tls_name: name.host.clone(), connect: Connect::Ip(ip), port: name.port.unwrap_or(DEFAULT_PORT), host_header: name.authority() });
    }
    name.port.map(|port| Route { tls_name: name.host.clone(), connect: Connect::Lookup(name.host.clone()), port, host_header: name.authority() })
}

/// The route of a server name (without IP literal or port) once `.well-known` and SRV were
/// asked: `delegated` is the `m.server` of a valid well-known, `srv` the SRV answer for the
/// name in effect (`_matrix-fed._tcp`, else `_matrix._tcp`).
pub fn after_lookups(name: &Name, delegated: Option<&Name>, srv: Option<&Srv>) -> Route {
    let effective = match delegated {
        Some(delegated) => {
            if let Some(route) = direct(delegated) {
                return route;
            }
            delegated
        }
        None => name,
    };
    match srv {
        Some(srv) => Route {
            tls_name: effective.host.clone(),
            connect: Connect::Lookup(srv.target.trim_end_matches('.').to_owned()),
            port: srv.port,
            host_header: effective.authority(),
        },
        None => Route { tls_name: effective.host.clone(), connect: Connect::Lookup(effective.host.clone()), port: DEFAULT_PORT, host_header: effective.authority() },
    }
}

/// A socket address when the route needs no lookup.
pub fn socket_addr(route: &Route) -> Option<SocketAddr> {
    match route.connect {
        Connect::Ip(ip) => Some(SocketAddr::new(ip, route.port)),
        Connect::Lookup(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    #[test]
    fn names_split_into_host_and_port() {
        assert_eq!(name("example.org"), Name { host: "example.org".into(), ip: None, port: None });
        assert_eq!(name("example.org:80").port, Some(80));
        assert_eq!(name("[::1]:8448").ip, Some("::1".parse().unwrap()));
        assert_eq!(name("1.2.3.4").ip, Some("1.2.3.4".parse().unwrap()));
        assert!(Name::parse("example.org:port").is_none() && Name::parse(":80").is_none() && Name::parse("[::1]x").is_none());
    }

    #[test]
    fn ip_literals_and_explicit_ports_need_no_lookup() {
        let route = direct(&name("127.0.0.1:8449")).unwrap();
        assert_eq!((route.connect, route.port, route.tls_name.as_str(), route.host_header.as_str()), (Connect::Ip("127.0.0.1".parse().unwrap()), 8449, "127.0.0.1", "127.0.0.1:8449"));
        let route = direct(&name("[::1]")).unwrap();
        assert_eq!((route.port, route.host_header.as_str()), (8448, "[::1]"));
        let route = direct(&name("example.org:443")).unwrap();
        assert_eq!((route.connect, route.tls_name.as_str()), (Connect::Lookup("example.org".into()), "example.org"));
        assert!(direct(&name("example.org")).is_none());
    }

    #[test]
    fn well_known_delegation_then_srv_then_the_default_port() {
        let origin = name("example.org");
        // Delegated to an IP literal or an explicit port: used as is.
        let route = after_lookups(&origin, Some(&name("10.0.0.1")), None);
        assert_eq!((route.connect, route.port), (Connect::Ip("10.0.0.1".parse().unwrap()), 8448));
        let route = after_lookups(&origin, Some(&name("matrix.example.org:443")), Some(&Srv { target: "ignored".into(), port: 1 }));
        assert_eq!((route.tls_name.as_str(), route.port, route.host_header.as_str()), ("matrix.example.org", 443, "matrix.example.org:443"));
        // Delegated to a bare hostname: its SRV record, with the certificate of the delegated name.
        let srv = Srv { target: "fed.example.net.".into(), port: 8000 };
        let route = after_lookups(&origin, Some(&name("matrix.example.org")), Some(&srv));
        assert_eq!((route.connect, route.port, route.tls_name.as_str(), route.host_header.as_str()), (Connect::Lookup("fed.example.net".into()), 8000, "matrix.example.org", "matrix.example.org"));
        // No well-known: the server name's SRV record, else port 8448.
        let route = after_lookups(&origin, None, Some(&srv));
        assert_eq!((route.tls_name.as_str(), route.port), ("example.org", 8000));
        let route = after_lookups(&origin, None, None);
        assert_eq!((route.connect, route.port, route.tls_name.as_str()), (Connect::Lookup("example.org".into()), 8448, "example.org"));
    }
}

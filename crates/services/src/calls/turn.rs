//! TURN credentials for clients whose media cannot reach the SFU (or each other) directly:
//! short-lived ones derived from a secret shared with the TURN server, as coturn's
//! `use-auth-secret` ("TURN REST API") checks them and Synapse hands them out. Served by
//! `/voip/turnServer` and carried in LiveKit's join response (`ice_servers`).

use std::sync::Arc;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;

use crate::{
    config::VoipConfig,
    error::Result,
    store::Store,
};

const SECRET_KEY: &[u8] = b"turn_shared_secret";

/// `GET /voip/turnServer`'s answer: what a client may relay through, until `ttl` runs out.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TurnCredentials {
    pub username: String,
    pub password: String,
    pub uris: Vec<String>,
    /// Seconds the credentials stay valid.
    pub ttl: u64,
}

pub struct Turn {
    uris: Vec<String>,
    secret: String,
    lifetime: u64,
    /// The TLS listener's certificate and key files, if configured.
    tls: Option<(String, String)>,
}

impl Turn {
    /// With `turn_shared_secret` empty, the secret is a random one kept in the store (as hex,
    /// since coturn's `static-auth-secret` is text).
    pub fn open(store: &Arc<Store>, config: &VoipConfig) -> Result<Self> {
        let secret = if config.turn_shared_secret.is_empty() { hex::encode(store.secret(SECRET_KEY, "")?) } else { config.turn_shared_secret.clone() };
        let tls = (!config.turn_tls_cert.is_empty()).then(|| (config.turn_tls_cert.clone(), config.turn_tls_key.clone()));
        Ok(Self { uris: config.turn_uris.clone(), secret, lifetime: config.turn_user_lifetime, tls })
    }

    /// Credentials for `user`, valid from now; `None` when no TURN server is configured.
    pub fn credentials(&self, user: &str) -> Option<TurnCredentials> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.credentials_at(user, now)
    }

    /// Credentials for `user`, valid from `now_seconds`. The username is `<expiry>:<user>`, the
    /// password base64(HMAC-SHA1(secret, username)).
    fn credentials_at(&self, user: &str, now_seconds: u64) -> Option<TurnCredentials> {
        if self.uris.is_empty() {
            return None;
        }
        let username = format!("{}:{user}", now_seconds + self.lifetime);
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(self.secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(username.as_bytes());
        let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        Some(TurnCredentials { username, password, uris: self.uris.clone(), ttl: self.lifetime })
    }

    /// coturn's configuration for these URIs and this secret: it listens where the first
    /// `turn:` URI says (and over TLS where the first `turns:` one says, with the configured
    /// certificate), checks the credentials handed out here, and relays only to `sfu` among
    /// private and loopback addresses (so that it cannot be used to reach this host's or
    /// network's other services).
    pub fn coturn_config(&self, realm: &str, sfu: std::net::IpAddr) -> String {
        let port_of_first = |scheme: &str, default: u16| self.uris.iter().filter(|uri| uri.starts_with(scheme)).map(|uri| port_of(uri).unwrap_or(default)).next();
        let port = port_of_first("turn:", 3478).unwrap_or(3478);
        let mut config = format!(
            "# coturn (turnserver -c <this file>) for Limbic: `limbic voip coturn-config`\n\
             listening-port={port}\n\
             use-auth-secret\n\
             static-auth-secret={}\n\
             realm={realm}\n\
             fingerprint\n\
             no-cli\n\
             no-multicast-peers\n",
            self.secret
        );
        for range in ["0.0.0.0-0.255.255.255", "10.0.0.0-10.255.255.255", "100.64.0.0-100.127.255.255", "127.0.0.0-127.255.255.255", "169.254.0.0-169.254.255.255", "172.16.0.0-172.31.255.255", "192.168.0.0-192.168.255.255", "::1", "fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fe80::-febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff"] {
            config.push_str(&format!("denied-peer-ip={range}\n"));
        }
        config.push_str(&format!("allowed-peer-ip={sfu}\n"));
        if sfu.is_loopback() {
            config.push_str("allow-loopback-peers\n");
        }
        // WebRTC clients do not speak TURN over DTLS.
        config.push_str("no-dtls\n");
        match (port_of_first("turns:", 5349), &self.tls) {
            (None, _) => config.push_str("no-tls\n"),
            (Some(tls_port), Some((cert, key))) => config.push_str(&format!("tls-listening-port={tls_port}\ncert={cert}\npkey={key}\n")),
            (Some(tls_port), None) => config.push_str(&format!("tls-listening-port={tls_port}\n# turns: needs a certificate: set [voip] turn_tls_cert and turn_tls_key\n")),
        }
        config
    }
}

/// The port of a `turn:host:port?transport=…` URI.
fn port_of(uri: &str) -> Option<u16> {
    let rest = uri.split_once(':')?.1;
    let authority = rest.split('?').next()?;
    authority.rsplit_once(':')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn_in(dir: &std::path::Path, secret: &str, uris: &[&str]) -> Turn {
        let store = Arc::new(Store::open(dir).unwrap());
        let config = VoipConfig { turn_uris: uris.iter().map(|u| (*u).to_owned()).collect(), turn_shared_secret: secret.to_owned(), turn_user_lifetime: 86400, ..VoipConfig::default() };
        Turn::open(&store, &config).unwrap()
    }

    #[test]
    fn credentials_are_coturns_rest_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let turn = turn_in(dir.path(), "north", &["turn:turn.example:3478?transport=udp"]);
        let credentials = turn.credentials_at("@ana:clinic.example", 1_000).unwrap();
        assert_eq!(credentials.username, "87400:@ana:clinic.example");
        assert_eq!(credentials.ttl, 86400);
        // What coturn computes from the same secret (and `echo -n USER | openssl dgst -sha1
        // -hmac north -binary | base64` does).
        assert_eq!(credentials.password, "KCv+S2O6SKswbcwGfLJ6BcjtW8Y=");
        assert_eq!(credentials.uris, ["turn:turn.example:3478?transport=udp"]);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(turn_in(other.path(), "south", &["turn:turn.example"]).credentials_at("@ana:clinic.example", 1_000).unwrap().password, credentials.password);
    }

    #[test]
    fn no_uris_no_credentials_and_a_kept_random_secret() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(turn_in(dir.path(), "", &[]).credentials_at("@ana:clinic.example", 0), None);
        let turn = turn_in(dir.path(), "", &["turns:turn.example:5349?transport=tcp"]);
        assert_eq!(turn.secret.len(), 128, "64 random bytes as hex");
        assert_eq!(turn_in(dir.path(), "", &["turn:turn.example"]).secret, turn.secret, "the same secret after a restart");
        let config = turn.coturn_config("clinic.example", "203.0.113.10".parse().unwrap());
        assert!(config.contains(&format!("static-auth-secret={}\n", turn.secret)));
        assert!(config.contains("\nlistening-port=3478\n") && config.contains("\ntls-listening-port=5349\n"), "{config}");
        assert!(config.contains("# turns: needs a certificate"), "{config}");
        assert!(config.contains("allowed-peer-ip=203.0.113.10\n") && config.contains("denied-peer-ip=10.0.0.0-10.255.255.255\n"));
        assert!(!config.contains("allow-loopback-peers"));
        assert!(turn.coturn_config("clinic.example", "127.0.0.1".parse().unwrap()).contains("allow-loopback-peers\n"));
    }

    #[test]
    fn coturn_listens_over_tls_for_turns_uris_with_the_configured_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let uris = ["turn:turn.example:3479?transport=udp", "turns:turn.example:5350?transport=tcp"].map(str::to_owned).to_vec();
        let config = VoipConfig { turn_uris: uris, turn_tls_cert: "/etc/turn/cert.pem".into(), turn_tls_key: "/etc/turn/key.pem".into(), ..VoipConfig::default() };
        let printed = Turn::open(&store, &config).unwrap().coturn_config("clinic.example", "203.0.113.10".parse().unwrap());
        for line in ["listening-port=3479", "tls-listening-port=5350", "cert=/etc/turn/cert.pem", "pkey=/etc/turn/key.pem", "no-dtls"] {
            assert!(printed.lines().any(|l| l == line), "{line} in {printed}");
        }
        assert!(!printed.lines().any(|l| l == "no-tls"), "{printed}");
        // Without a turns: URI, no TLS listener.
        let plain = VoipConfig { turn_uris: vec!["turn:turn.example:3479?transport=udp".into()], ..config };
        let printed = Turn::open(&store, &plain).unwrap().coturn_config("clinic.example", "203.0.113.10".parse().unwrap());
        assert!(printed.lines().any(|l| l == "no-tls") && !printed.contains("tls-listening-port"), "{printed}");
    }
}

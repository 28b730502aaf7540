//! Servers federating with each other on loopback, over TLS with a test CA.

use std::path::{Path, PathBuf};

use super::{START_ATTEMPTS, TestServer, free_port};

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`.
pub struct TestCa {
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

pub fn test_ca(dir: &Path) -> TestCa {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Limbic test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap()), SanType::DnsName("localhost".try_into().unwrap())];
    let certificate = params.signed_by(&key, &issuer).unwrap();
    let paths = TestCa { ca: dir.join("ca.pem"), certificate: dir.join("cert.pem"), key: dir.join("key.pem") };
    std::fs::write(&paths.ca, ca_cert.pem()).unwrap();
    std::fs::write(&paths.certificate, certificate.pem()).unwrap();
    std::fs::write(&paths.key, key.serialize_pem()).unwrap();
    paths
}

/// A server federating on its own port, named after it (`127.0.0.1:<port>`).
pub struct Federated {
    pub server: TestServer,
    pub name: String,
}

pub async fn federated(ca: &TestCa, extra: &str) -> Federated {
    federated_with(ca, extra, &[]).await
}

/// The same, with more `LIMBIC_*` overrides.
pub async fn federated_with(ca: &TestCa, extra: &str, env: &[(&str, &str)]) -> Federated {
    start_federated(ca, extra, env, false).await
}

/// The first node of a federating cluster on PostgreSQL (`TestServer::start_cluster`), named
/// after its federation port; its other nodes need their own (`LIMBIC_FEDERATION__PORT`).
pub async fn federated_cluster(ca: &TestCa) -> Federated {
    start_federated(ca, "", &[], true).await
}

async fn start_federated(ca: &TestCa, extra: &str, env: &[(&str, &str)], cluster: bool) -> Federated {
    let mut exited = None;
    // Both ports are fresh on each attempt: another test may take one before the server binds it.
    for _ in 0..START_ATTEMPTS {
        let port = free_port();
        let name = format!("127.0.0.1:{port}");
        let config = format!(
            "[federation]\nenabled = true\naddress = \"127.0.0.1\"\nport = {port}\ntls_certificate = {:?}\ntls_private_key = {:?}\nca_certificates = [{:?}]\ntrust_web_pki = false\n{extra}\n",
            ca.certificate.display().to_string(),
            ca.key.display().to_string(),
            ca.ca.display().to_string(),
        );
        let env = [&[("LIMBIC_SERVER_NAME", name.as_str())], env].concat();
        let started = if cluster { TestServer::try_start_cluster(&config, &env).await } else { TestServer::try_start_with_toml(&config, &env).await };
        match started {
            Ok(server) => return Federated { server, name },
            Err(status) => exited = Some(status),
        }
    }
    panic!("a federating limbic exited during start {START_ATTEMPTS} times, last with {exited:?}");
}

/// An HTTPS client trusting the test CA, for talking to the federation listener directly.
pub fn https(ca: &TestCa) -> reqwest::Client {
    let pem = std::fs::read(&ca.ca).unwrap();
    reqwest::Client::builder().tls_built_in_root_certs(false).add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap()).build().unwrap()
}


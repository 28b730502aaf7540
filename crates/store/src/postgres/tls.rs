//! TLS to PostgreSQL, as libpq's connection parameters ask for it: `sslmode` `require`,
//! `verify-ca` or `verify-full` encrypt every connection and check the server's certificate
//! (always as `verify-full` does: against the roots and the host name), with the roots from
//! `sslrootcert` (a PEM file), or else Mozilla's; `disable`, `allow` and `prefer` (and no
//! `sslmode`) connect without TLS. A server that does not offer TLS, or whose certificate does not
//! check out, is refused under `require`.

use std::sync::Arc;

use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls::{
    self, RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

use crate::{Result, StoreError};

/// The connection parameters of `url` (a `postgresql://` URL or `key=value` pairs), and the
/// TLS every connection is made with when they ask for it.
pub(crate) fn connection(url: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect)> {
    let (rest, params) = take_params(url, &["sslmode", "sslrootcert"]);
    let mut config: tokio_postgres::Config = rest.parse()?;
    // Pairs written in a way this does not take apart (`sslmode = require`) reach
    // tokio-postgres: what it read counts too, so that TLS asked for is never dropped.
    let tls = match params[0].as_deref() {
        None if config.get_ssl_mode() == SslMode::Require => true,
        None | Some("disable" | "allow" | "prefer") => false,
        Some("require" | "verify-ca" | "verify-full") => true,
        Some(other) => return Err(StoreError::Tls(format!("sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"))),
    };
    config.ssl_mode(if tls { SslMode::Require } else { SslMode::Disable });
    let mut roots = RootCertStore::empty();
    match &params[1] {
        Some(path) => {
            let unreadable = |e: &dyn std::fmt::Display| StoreError::Tls(format!("sslrootcert {path}: {e}"));
            for certificate in CertificateDer::pem_file_iter(path).map_err(|e| unreadable(&e))? {
                roots.add(certificate.map_err(|e| unreadable(&e))?).map_err(|e| unreadable(&e))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((config, MakeRustlsConnect::new(client)))
}

/// `url` without the parameters `names` (which tokio-postgres does not know), and their values.
fn take_params(url: &str, names: &[&str]) -> (String, Vec<Option<String>>) {
    let mut values = vec![None; names.len()];
    let mut take = |pair: &str| match pair.split_once('=') {
        Some((key, value)) if let Some(at) = names.iter().position(|name| *name == key) => {
            values[at] = Some(value.to_owned());
            false
        }
        _ => true,
    };
    if let Some((base, query)) = url.split_once('?').filter(|_| url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        let kept: Vec<&str> = query.split('&').filter(|pair| take(pair)).collect();
        let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        values.iter_mut().flatten().for_each(|value| *value = percent_decoded(value));
        return (rest, values);
    }
    let kept: Vec<&str> = url.split_whitespace().filter(|pair| take(pair)).collect();
    (kept.join(" "), values)
}

/// A URL query value with its `%XX` escapes decoded.
fn percent_decoded(value: &str) -> String {
    let mut bytes = Vec::with_capacity(value.len());
    let mut rest = value.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        let escaped = (byte == b'%').then(|| tail.get(..2)).flatten().and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(decoded) => {
                bytes.push(decoded);
                rest = &tail[2..];
            }
            None => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_parameters_are_taken_out_of_urls_and_pairs() {
        let names = ["sslmode", "sslrootcert"];
        let (rest, values) = take_params("postgresql://u@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem", &names);
        assert_eq!((rest.as_str(), values), ("postgresql://u@h:5/db?application_name=x", vec![Some("verify-full".into()), Some("/etc/ca.pem".into())]));
        let (rest, values) = take_params("postgresql://u@h/db?sslmode=require", &names);
        assert_eq!((rest.as_str(), values), ("postgresql://u@h/db", vec![Some("require".into()), None]));
        let (rest, values) = take_params("host=h user=u sslrootcert=/ca.pem dbname=d", &names);
        assert_eq!((rest.as_str(), values), ("host=h user=u dbname=d", vec![None, Some("/ca.pem".into())]));
        assert!(matches!(connection("postgresql://u@h/db?sslmode=sometimes"), Err(StoreError::Tls(_))));
        assert!(matches!(connection("postgresql://u@h/db?sslmode=require&sslrootcert=/nonexistent.pem"), Err(StoreError::Tls(_))));
    }
}

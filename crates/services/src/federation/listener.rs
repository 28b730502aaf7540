//! The TLS listener other servers connect to. Handshakes run in their own tasks, so a slow or
//! silent peer never holds up the others; finished connections are handed to axum.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, rustls, server::TlsStream};

use super::FederationError;
use crate::config::FederationConfig;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn tls_config(config: &FederationConfig) -> Result<rustls::ServerConfig, FederationError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let failed = |what: &std::path::Path, e: &dyn std::fmt::Display| FederationError::Tls(format!("{}: {e}", what.display()));
    let certificates = CertificateDer::pem_file_iter(&config.tls_certificate)
        .map_err(|e| failed(&config.tls_certificate, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(&config.tls_certificate, &e))?;
    if certificates.is_empty() {
        return Err(FederationError::Tls(format!("{}: no certificate", config.tls_certificate.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&config.tls_private_key).map_err(|e| failed(&config.tls_private_key, &e))?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| FederationError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .map_err(|e| FederationError::Tls(e.to_string()))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

/// The peer address of a federation connection, handed on as `ConnectInfo<SocketAddr>`.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// A listener whose connections have finished their TLS handshake.
pub struct TlsListener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accepting task only ends with the process.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Binds the federation listener and starts accepting TLS connections.
pub async fn serve_tls(config: &FederationConfig) -> Result<TlsListener, FederationError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(config)?));
    let tcp = TcpListener::bind((config.address, config.port)).await.map_err(|e| FederationError::Tls(format!("cannot listen on {}:{}: {e}", config.address, config.port)))?;
    let local = tcp.local_addr().map_err(|e| FederationError::Tls(e.to_string()))?;
    let (sender, connections) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match tcp.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "federation listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, sender) = (acceptor.clone(), sender.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = sender.send((tls, peer)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "federation TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "federation TLS handshake timed out"),
                }
            });
        }
    });
    Ok(TlsListener { connections, local })
}

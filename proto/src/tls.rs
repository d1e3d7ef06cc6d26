//! TLS for a shard's gRPC service and data plane (rustls, ring): the server's certificate
//! and key, the certificate authority a client trusts, and optionally client certificates
//! (mutual TLS). PEM files are read and checked once, when the server or client starts, so
//! a wrong file is an error that names it rather than a failed handshake later.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};

/// ALPN name of the data plane (gRPC negotiates `h2` on its own port).
pub const DATA_ALPN: &[u8] = b"parasync-data/1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading the {what} {}: {e}", path.display()))
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| format!("the {what} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("the {what} holds no certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

fn key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("the {what} holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"))
}

fn roots(pem: &[u8], what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in certs(pem, what)? {
        roots.add(c).map_err(|e| format!("the {what} holds a certificate that cannot be a trust anchor: {e}"))?;
    }
    Ok(roots)
}

/// A server's TLS settings: its certificate chain and key, and the authority client
/// certificates must chain to when clients must present one.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("mutual", &self.client_ca_pem.is_some()).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// From PEM bytes: `cert` (the chain, leaf first), `key`, and `client_ca` (mutual TLS).
    pub fn new(cert: Vec<u8>, key: Vec<u8>, client_ca: Option<Vec<u8>>) -> Result<ServerTls, String> {
        let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(|e| e.to_string())?;
        let builder = match &client_ca {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca, "client CA file")?), provider())
                    .build()
                    .map_err(|e| format!("the client CA file: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs(&cert, "certificate file")?, self::key(&key, "key file")?)
            .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
        // A client probes an idle data-plane connection for readability to find closed
        // ones: nothing may arrive unasked, session tickets included.
        config.send_tls13_tickets = 0;
        config.alpn_protocols = vec![DATA_ALPN.to_vec()];
        Ok(ServerTls { cert_pem: cert, key_pem: key, client_ca_pem: client_ca, config: Arc::new(config) })
    }

    /// From PEM files (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls, String> {
        let ca = client_ca.map(|p| read(p, "client CA file")).transpose()?;
        ServerTls::new(read(cert, "certificate file")?, read(key, "key file")?, ca)
            .map_err(|e| format!("{e} ({}, {})", cert.display(), key.display()))
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// The same settings for tonic's gRPC server.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        let tls = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => tls.client_ca_root(tonic::transport::Certificate::from_pem(ca)),
            None => tls,
        }
    }

    /// The rustls configuration (for connections outside tokio).
    pub fn rustls(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config)
    }

    /// An acceptor for the data plane.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }
}

/// A client's TLS settings: the authority the server's certificate must chain to, the name
/// to check it against (default: the host the client dials), and the client's own
/// certificate for servers that ask for one.
#[derive(Clone)]
pub struct ClientTls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("domain", &self.domain).field("identity", &self.identity.is_some()).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// From PEM bytes: `ca` (trusted roots), `identity` (certificate chain and key), and
    /// the name the server's certificate must carry.
    pub fn new(ca: Vec<u8>, identity: Option<(Vec<u8>, Vec<u8>)>, domain: Option<String>) -> Result<ClientTls, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(&ca, "CA file")?);
        let mut config = match &identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(certs(cert, "client certificate file")?, self::key(key, "client key file")?)
                .map_err(|e| format!("the client certificate and key do not go together: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![DATA_ALPN.to_vec()];
        if let Some(d) = &domain {
            ServerName::try_from(d.clone()).map_err(|e| format!("{d:?} is not a valid server name: {e}"))?;
        }
        Ok(ClientTls { ca_pem: ca, identity, domain, config: Arc::new(config) })
    }

    /// From PEM files; `cert` and `key` go together.
    pub fn from_files(ca: &Path, cert: Option<&Path>, key: Option<&Path>, domain: Option<String>) -> Result<ClientTls, String> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c, "client certificate file")?, read(k, "client key file")?)),
            (None, None) => None,
            _ => return Err("a client certificate needs its key, and a key its certificate".into()),
        };
        ClientTls::new(read(ca, "CA file")?, identity, domain)
    }

    /// Whether this client presents a certificate of its own.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// The name the server's certificate is checked against when dialling `host`.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, String> {
        let name = self.domain.clone().unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']').to_string());
        ServerName::try_from(name.clone()).map_err(|e| format!("{name:?} is not a valid server name: {e}"))
    }

    /// The same settings for tonic's gRPC channel to `host`.
    pub fn grpc(&self, host: &str) -> tonic::transport::ClientTlsConfig {
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        let tls = match &self.identity {
            Some((c, k)) => tls.identity(tonic::transport::Identity::from_pem(c, k)),
            None => tls,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        tls.domain_name(self.domain.clone().unwrap_or_else(|| host.to_string()))
    }

    /// The rustls configuration (for connections outside tokio).
    pub fn rustls(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.config)
    }

    /// A connector for the data plane.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_refused_with_what_was_wrong() {
        let e = ServerTls::new(b"not pem".to_vec(), b"not pem".to_vec(), None).unwrap_err();
        assert!(e.contains("certificate file holds no certificate"), "{e}");
        let e = ClientTls::new(b"".to_vec(), None, None).unwrap_err();
        assert!(e.contains("CA file holds no certificate"), "{e}");
        let e = ServerTls::from_files(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem"), None).unwrap_err();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
        let e = ClientTls::from_files(Path::new("/x"), Some(Path::new("/y")), None, None).unwrap_err();
        assert!(e.contains("needs its key"), "{e}");
    }
}

/// A data-plane connection: plain TCP, or TLS over it.
pub enum DataStream {
    /// Plain TCP.
    Plain(tokio::net::TcpStream),
    /// TLS over TCP (either end).
    Tls(Box<tokio_rustls::TlsStream<tokio::net::TcpStream>>),
}

impl DataStream {
    /// The TCP connection underneath (for socket options and peeking at readiness, never
    /// for reading or writing).
    pub fn tcp(&self) -> &tokio::net::TcpStream {
        match self {
            DataStream::Plain(s) => s,
            DataStream::Tls(s) => s.get_ref().0,
        }
    }
}

impl tokio::io::AsyncRead for DataStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            DataStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for DataStream {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            DataStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            DataStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            DataStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            DataStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            DataStream::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            DataStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            DataStream::Plain(s) => s.is_write_vectored(),
            DataStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

//! TLS for the gate's listener (rustls): certificate chain and key from PEM
//! files, and optionally client certificates verified against a CA, in
//! which case the certificate's common name is the device id.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
pub use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{field} ({path}): {message}")]
    File {
        field: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("tls: {0}")]
    Config(String),
}

fn certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::File {
        field,
        path: path.into(),
        message,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// The acceptor for `config`.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs("cert_file", &config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| TlsError::File {
        field: "key_file",
        path: config.key_file.clone(),
        message: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs("client_ca_file", ca)? {
                roots.add(c).map_err(|e| TlsError::File {
                    field: "client_ca_file",
                    path: ca.clone(),
                    message: e.to_string(),
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = if config.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?,
            )
        }
    };
    let server = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("cert_file/key_file: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The device id of a verified client certificate: its subject's common name.
pub fn peer_identity(conn: &ServerConnection) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

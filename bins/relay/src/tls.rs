//! STARTTLS: the server TLS configuration loaded from PEM files
//! (`E2A_SMTP_TLS_CERT`, `E2A_SMTP_TLS_KEY`), rustls with the ring provider,
//! and [`Conn`], a stream that starts in plaintext and can be upgraded in
//! place.

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// Why the TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// Only one of certificate and key was given.
    #[error("set both E2A_SMTP_TLS_CERT and E2A_SMTP_TLS_KEY, or neither")]
    Incomplete,
    /// The certificate file is unreadable or holds no certificate.
    #[error("cannot read certificates from {path}: {reason}")]
    Certificates {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The key file is unreadable or holds no private key.
    #[error("cannot read a private key from {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the pair (e.g. the key does not match).
    #[error("invalid TLS certificate/key pair")]
    Rustls(#[source] rustls::Error),
}

/// The acceptor for STARTTLS, built from PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsConfigError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsConfigError::Certificates {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::Certificates {
            path: cert.display().to_string(),
            reason: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsConfigError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsConfigError::Rustls)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(TlsConfigError::Rustls)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A session's stream: plaintext, upgraded to TLS, or (only transiently,
/// during the handshake) taken.
pub enum Conn<S> {
    /// Before STARTTLS.
    Plain(S),
    /// After a successful STARTTLS.
    Tls(Box<TlsStream<S>>),
    /// Moved out for the handshake; any I/O fails.
    Taken,
}

impl<S> Conn<S> {
    /// True after STARTTLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

fn taken() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream is being upgraded")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut *self {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Taken => Poll::Ready(Err(taken())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut *self {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Taken => Poll::Ready(Err(taken())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *self {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Taken => Poll::Ready(Err(taken())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *self {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Taken => Poll::Ready(Err(taken())),
        }
    }
}

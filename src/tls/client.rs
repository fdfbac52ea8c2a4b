//! A client of `meshlet identity`: one Certify call over TLS 1.3 (HTTP/2), the service verified
//! against the trust anchors by its DNS name.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use crate::proto::identity::v1::identity_client::IdentityClient;
use crate::proto::identity::v1::{CertifyRequest, CertifyResponse};

/// Where the identity service is and how to know it.
#[derive(Clone)]
pub struct Endpoint {
    /// `host:port` to connect to.
    pub address: String,
    /// The DNS name its certificate must carry (usually the host of `address`).
    pub server_name: String,
    /// The trust anchors its certificate must chain to.
    pub anchors: Vec<CertificateDer<'static>>,
    /// The whole call, connection included.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("identity service {address}: {what}")]
    Connect { address: String, what: String },
    /// The service answered with this status.
    #[error("identity service {address}: {} ({:?})", status.message(), status.code())]
    Refused {
        address: String,
        status: tonic::Status,
    },
    #[error("identity service {address}: no answer within {0:?}", timeout)]
    Timeout { address: String, timeout: Duration },
}

impl Endpoint {
    /// Asks for a certificate for the key of `csr_der`, proving who we are with `token`.
    pub async fn certify(&self, token: &str, csr_der: &[u8]) -> Result<CertifyResponse, CallError> {
        let address = self.address.clone();
        let call = async {
            let mut client = self.connect().await?;
            client
                .certify(CertifyRequest {
                    token: token.into(),
                    csr_der: csr_der.to_vec(),
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| CallError::Refused {
                    address: self.address.clone(),
                    status,
                })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(CallError::Timeout {
                address,
                timeout: self.timeout,
            }))
    }

    async fn connect(&self) -> Result<IdentityClient<H2>, CallError> {
        let fail = |what: String| CallError::Connect {
            address: self.address.clone(),
            what,
        };
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|e| fail(format!("{:?} is not a server name: {e}", self.server_name)))?;
        let mut roots = rustls::RootCertStore::empty();
        for a in &self.anchors {
            roots
                .add(a.clone())
                .map_err(|e| fail(format!("trust anchor: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(&self.address)
            .await
            .map_err(|e| fail(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let stream = TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| fail(format!("HTTP/2: {e}")))?;
        tokio::spawn(conn);
        let origin = format!("https://{}", self.server_name)
            .parse()
            .map_err(|e| fail(format!("{e}")))?;
        Ok(IdentityClient::with_origin(H2(sender), origin))
    }
}

/// hyper's HTTP/2 sender as the tower service tonic's client calls.
#[derive(Clone)]
pub struct H2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

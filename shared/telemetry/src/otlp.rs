//! The OTLP exporter behind [`crate::otel`]: HTTP (blocking reqwest, on the SDK's batch
//! thread) or gRPC (tonic, on a small runtime of its own), in plaintext or over TLS.
//!
//! TLS is Weir's own rustls config (ring, as everywhere in Weir), handed to reqwest and to a
//! connector of tonic's channel, so that neither client brings a crypto provider or a trust
//! store of its own. The collector's certificate must chain to `[telemetry.tracing.tls] ca`
//! (default: the system's roots) and name the endpoint's host.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tracing::warn;
use weir_config::{CollectorTls, OtlpProtocol, Tracing as Config};

/// The exporter for `config`'s endpoint, and for gRPC the runtime its channel lives on (the
/// batch thread has none).
pub(crate) fn exporter(config: &Config) -> Result<(SpanExporter, Option<Runtime>), String> {
    match config.protocol {
        OtlpProtocol::HttpProtobuf => Ok((http(config)?, None)),
        OtlpProtocol::Grpc => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("weir-otlp")
                .enable_all()
                .build()
                .map_err(|e| format!("starting the OTLP runtime: {e}"))?;
            let exporter = grpc(config, &rt)?;
            Ok((exporter, Some(rt)))
        }
    }
}

fn http(config: &Config) -> Result<SpanExporter, String> {
    // reqwest is built with TLS but no crypto provider, so it always takes a config of ours:
    // for a plaintext endpoint, one that trusts nothing.
    let mut tls = match &config.tls {
        Some(tls) => client_config(tls)?,
        None => weir_tls::client_config(Arc::new(RootCertStore::empty()), None)?,
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = reqwest::blocking::Client::builder()
        .timeout(export_timeout())
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|e| format!("OTLP HTTP client: {e}"))?;
    SpanExporter::builder()
        .with_http()
        .with_http_client(Explained {
            client,
            cause: Mutex::new(None),
        })
        .with_endpoint(&config.otlp_endpoint)
        .build()
        .map_err(|e| e.to_string())
}

fn grpc(config: &Config, rt: &Runtime) -> Result<SpanExporter, String> {
    let _in = rt.enter();
    let builder = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&config.otlp_endpoint);
    let builder = match &config.tls {
        Some(tls) => {
            let mut tls = client_config(tls)?;
            tls.alpn_protocols = vec![b"h2".to_vec()];
            let channel = tonic::transport::Endpoint::from_shared(config.otlp_endpoint.clone())
                .map_err(|e| e.to_string())?
                .timeout(export_timeout())
                .connect_with_connector_lazy(tls_connector(Arc::new(tls)));
            builder.with_channel(channel)
        }
        None => builder,
    };
    builder.build().map_err(|e| e.to_string())
}

/// reqwest's client, saying why a request could not be sent: the exporter reports any such
/// failure as a bare "network error". Each cause is logged once, when it first shows.
#[derive(Debug)]
struct Explained {
    client: reqwest::blocking::Client,
    cause: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl HttpClient for Explained {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let sent = self.client.send_bytes(request).await;
        let cause = sent.as_ref().err().map(|e| {
            let mut text = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            text
        });
        let mut last = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cause) = cause.as_ref().filter(|&c| last.as_ref() != Some(c)) {
            // reqwest's message names the URL.
            warn!("tracing: cannot send to the collector: {cause}");
        }
        *last = cause;
        sent
    }
}

/// The CA to trust (the system's roots when none is given) and the client certificate.
fn client_config(tls: &CollectorTls) -> Result<ClientConfig, String> {
    let roots = weir_tls::trusted(&tls.roots)?;
    weir_tls::client_config(roots, tls.client.as_ref())
}

/// Connects tonic's channel over TLS: TCP to the endpoint's host and port, then the
/// handshake, verifying the host.
fn tls_connector(
    tls: Arc<ClientConfig>,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |uri: Uri| {
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        async move {
            let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
            let host = uri.host().unwrap_or_default();
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name =
                ServerName::try_from(host.clone()).map_err(|e| invalid(format!("{host}: {e}")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(connector.connect(name, tcp).await?))
        }
    })
}

/// The export timeout the OTel SDK reads: `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, else
/// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), else 10 s. The HTTP client and the TLS
/// channel are ours, so the SDK's reading does not reach them.
fn export_timeout() -> Duration {
    [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|var| std::env::var(var).ok()?.trim().parse().ok())
    .map_or(Duration::from_secs(10), Duration::from_millis)
}

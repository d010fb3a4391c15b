//! `redirector webhook`: the mutating admission webhook, an HTTPS server
//! (hyper, rustls) answering `POST /mutate` with
//! [`redirector_policy::k8s::admission::review`] and `GET /healthz`.
//!
//! The certificate and key are PEM files, read again whenever their bytes
//! change (cert-manager rotates the Secret, the kubelet swaps the mounted
//! files): the new pair is served from the next handshake on; a pair that
//! does not load (a key that is not the certificate's, a half-written
//! file) is logged at WARN and the previous one kept.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, header::CONTENT_TYPE, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use redirector_policy::k8s::admission::{self, Outcome};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// How often the certificate files are looked at.
pub const CERT_POLL: Duration = Duration::from_secs(2);
/// The largest AdmissionReview read (the API server's request limit is
/// 3 MiB; a review carries the object once, twice for an UPDATE).
pub const BODY_LIMIT: usize = 8 << 20;
/// A client that sends no complete request head or handshake within this
/// is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct WebhookOptions {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub settings: admission::Settings,
}

/// The certificate files, and the pair last loaded from them.
#[derive(Debug)]
pub struct CertStore {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' bytes last looked at (loaded or not), so a bad pair is
    /// reported once, not at every poll.
    seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{what} {}", path.display()))
}

/// A certificate chain and its key from PEM bytes; errors name the flag
/// and the file.
fn load(cert_file: &Path, cert: &[u8], key_file: &Path, key: &[u8]) -> Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .with_context(|| format!("--tls-cert-file {}: not PEM certificates", cert_file.display()))?;
    if chain.is_empty() {
        bail!("--tls-cert-file {}: no CERTIFICATE block", cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .with_context(|| format!("--tls-key-file {}: no PEM private key", key_file.display()))?;
    CertifiedKey::from_der(chain, key, &provider()).with_context(|| {
        format!(
            "--tls-key-file {} with --tls-cert-file {}: not a usable key of that certificate",
            key_file.display(),
            cert_file.display()
        )
    })
}

impl CertStore {
    /// Loads the pair; an error if it does not load (the webhook does not
    /// start without a certificate).
    pub fn open(cert_file: &Path, key_file: &Path) -> Result<Self> {
        let (cert, key) = (read(cert_file, "--tls-cert-file")?, read(key_file, "--tls-key-file")?);
        let ck = load(cert_file, &cert, key_file, &key)?;
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new(Arc::new(ck)),
            seen: Mutex::new((cert, key)),
        })
    }

    /// Loads the files again if their bytes changed: Ok(true) when a new
    /// pair is served from now on, Ok(false) when nothing changed, an
    /// error (the previous pair kept) when the new bytes do not load.
    pub fn reload(&self) -> Result<bool> {
        let (cert, key) = (read(&self.cert_file, "--tls-cert-file")?, read(&self.key_file, "--tls-key-file")?);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if (&cert, &key) == (&seen.0, &seen.1) {
            return Ok(false);
        }
        *seen = (cert.clone(), key.clone());
        let ck = load(&self.cert_file, &cert, &self.key_file, &key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ck);
        Ok(true)
    }

    /// The end-entity certificate served now (DER).
    pub fn serving(&self) -> CertificateDer<'static> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).cert[0].clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Polls the files every [`CERT_POLL`]; logs what changed.
async fn watch_certs(store: Arc<CertStore>) {
    let mut tick = tokio::time::interval(CERT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = None;
    loop {
        tick.tick().await;
        let s = store.clone();
        let r = tokio::task::spawn_blocking(move || s.reload()).await;
        match r.unwrap_or_else(|e| Err(anyhow::anyhow!("reload task: {e}"))) {
            Ok(true) => {
                log::info!(
                    "serving the new certificate from {} and {}",
                    store.cert_file.display(),
                    store.key_file.display()
                );
                last_error = None;
            }
            Ok(false) => {}
            Err(e) => {
                let e = format!("{e:#}");
                if last_error.as_ref() != Some(&e) {
                    log::warn!("the certificate files changed but do not load: {e}; keeping the previous certificate");
                    last_error = Some(e);
                }
            }
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, "text/plain; charset=utf-8".parse().expect("a header value"));
    r
}

fn log_outcome(o: &Outcome) {
    match o {
        Outcome::Switched { pod, replaced, tool } => {
            log::info!("pod {pod}: init container {replaced} ({tool}) replaced by the redirector gate")
        }
        Outcome::GateAdded { pod, rule } => {
            log::info!("pod {pod}: the redirector gate added (--meshed-when {rule})")
        }
        Outcome::Unchanged { pod, why, warning: Some(_) } => log::info!("pod {pod} left unchanged: {why}"),
        Outcome::Unchanged { pod, why, warning: None } => log::debug!("pod {pod} left unchanged: {why}"),
        Outcome::Failed { pod, error } => {
            log::warn!("pod {pod} left unchanged (allowed, with a warning): {error}")
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    settings: Arc<admission::Settings>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    Ok(match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (Method::POST, "/mutate") => {
            let ctype = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            if ctype.split(';').next().map(str::trim) != Some("application/json") {
                return Ok(text(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("Content-Type {ctype:?}: an AdmissionReview is application/json\n"),
                ));
            }
            let body = match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    log::warn!("/mutate: reading the request: {e}");
                    return Ok(text(StatusCode::PAYLOAD_TOO_LARGE, format!("reading the request: {e}\n")));
                }
            };
            match admission::review(&body, &settings) {
                Ok((review, outcome)) => {
                    log_outcome(&outcome);
                    let mut r = Response::new(Full::new(Bytes::from(review.to_string())));
                    r.headers_mut().insert(CONTENT_TYPE, "application/json".parse().expect("a header value"));
                    r
                }
                Err(e) => {
                    log::warn!("/mutate: {e:#} (answered 400: the API server applies failurePolicy)");
                    text(StatusCode::BAD_REQUEST, format!("{e:#}\n"))
                }
            }
        }
        (_, "/mutate" | "/healthz") => text(StatusCode::METHOD_NOT_ALLOWED, "POST /mutate, GET /healthz\n".into()),
        _ => text(StatusCode::NOT_FOUND, "POST /mutate, GET /healthz\n".into()),
    })
}

/// Serves until SIGTERM or SIGINT.
pub async fn run(opts: WebhookOptions) -> Result<()> {
    if opts.settings.gate_image.is_empty() {
        bail!("option --gate-image: empty: the gate's image is the redirector image the nodes can pull");
    }
    let store = Arc::new(CertStore::open(&opts.cert_file, &opts.key_file)?);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(store.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = crate::metrics::bind_for("--listen", opts.listen)?;
    log::info!(
        "admission webhook on https://{}/mutate and /healthz; gate image {}, agent socket directory {}{}{}",
        listener.local_addr()?,
        opts.settings.gate_image,
        opts.settings.socket_dir,
        opts.settings.preset.map(|p| format!(", only {} pods", p.name())).unwrap_or_default(),
        if opts.settings.rules.is_empty() {
            String::new()
        } else {
            format!(
                ", gate for --meshed-when {}",
                opts.settings.rules.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            )
        }
    );
    let watcher = tokio::spawn(watch_certs(store));
    let settings = Arc::new(opts.settings);
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, settings) = (acceptor.clone(), settings.clone());
        conns.spawn(async move {
            let tls = match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return log::debug!("TLS handshake with {peer}: {e}"),
                Err(_) => return log::debug!("TLS handshake with {peer}: timed out"),
            };
            let service = hyper::service::service_fn(move |req| handle(req, settings.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                log::debug!("connection from {peer}: {e}");
            }
        });
    }
    log::info!("stopping; letting {} open connection(s) finish (at most 5s)", conns.len());
    watcher.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while conns.join_next().await.is_some() {} }).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair that does not load is refused naming the files, and a
    /// reload of one keeps the previous pair.
    #[test]
    fn certificate_errors_name_the_file_and_keep_the_last_good() {
        let dir = std::env::temp_dir().join(format!("webhook-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let e = format!("{:#}", CertStore::open(&cert, &key).unwrap_err());
        assert!(e.contains("--tls-cert-file") && e.contains("tls.crt"), "{e}");
        let e = format!("{:#}", CertStore::open(&dir.join("absent.crt"), &key).unwrap_err());
        assert!(e.contains("absent.crt"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

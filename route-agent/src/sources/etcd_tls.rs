//! TLS and authentication for the `etcd` source: the files behind `--etcd-cafile`,
//! `--etcd-certfile`, `--etcd-keyfile` and `--etcd-password-file`, checked before they are used
//! so that the common mistakes get a message naming the mistake instead of a TLS alert; one
//! connection per endpoint, tried in turn, so a dead member is skipped and every error names
//! the endpoint it came from; the error counters and reachability behind `/metrics` and
//! `/readyz`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rustls::{AlertDescription, CertificateError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::error::AgentError;

/// TLS and authentication settings of the `etcd` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA bundle the servers' certificates must chain to (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM, leaf first) presented to etcd.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// etcd user.
    pub username: Option<String>,
    /// File holding the user's password (one line).
    pub password_file: Option<PathBuf>,
    /// How often the files are read again to notice a rotation.
    pub reload_every: Duration,
}

impl Default for EtcdTls {
    fn default() -> Self {
        EtcdTls {
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            reload_every: Duration::from_secs(10),
        }
    }
}

/// What went wrong talking to etcd, as counted in
/// `cni_route_agent_etcd_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The server's certificate does not chain to `--etcd-cafile`.
    WrongCa,
    /// A certificate (the server's, or ours) is expired or not valid yet.
    ExpiredCert,
    /// `--etcd-keyfile` is not the key of `--etcd-certfile`.
    KeyMismatch,
    /// etcd refused our client certificate (none given, or from a CA it does not trust).
    CertRejected,
    /// The server's certificate is wrong otherwise (e.g. not valid for the endpoint's host).
    ServerCert,
    /// An `https://` endpoint answering in plain HTTP, or an `http://` one expecting TLS.
    PlainHttp,
    /// Wrong user or password, or the user may not do what the agent needs.
    AuthRefused,
    /// A file could not be read or parsed.
    BadFiles,
    /// Nothing answered (refused, timed out, reset).
    Unreachable,
    /// The lease or the subnets were lost, or no subnet could be claimed.
    Claim,
    /// Anything else.
    Other,
}

const KINDS: [Kind; 11] = [
    Kind::WrongCa,
    Kind::ExpiredCert,
    Kind::KeyMismatch,
    Kind::CertRejected,
    Kind::ServerCert,
    Kind::PlainHttp,
    Kind::AuthRefused,
    Kind::BadFiles,
    Kind::Unreachable,
    Kind::Claim,
    Kind::Other,
];

impl Kind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::WrongCa => "wrong_ca",
            Kind::ExpiredCert => "expired_cert",
            Kind::KeyMismatch => "key_mismatch",
            Kind::CertRejected => "cert_rejected",
            Kind::ServerCert => "server_cert",
            Kind::PlainHttp => "plain_http",
            Kind::AuthRefused => "auth_refused",
            Kind::BadFiles => "bad_files",
            Kind::Unreachable => "unreachable",
            Kind::Claim => "claim",
            Kind::Other => "other",
        }
    }
}

/// Where a failure happened. Kept apart so that the log field is named after what it holds:
/// a credential file is no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum At {
    /// An etcd endpoint (URL).
    Endpoint(String),
    /// A credential file (CA, certificate, key, password).
    File(String),
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Endpoint(url) => write!(f, "etcd {url}"),
            At::File(path) => write!(f, "etcd credential file {path}"),
        }
    }
}

/// One failure, with where it happened (an endpoint, or the files when none was tried).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What kind.
    pub kind: Kind,
    /// The endpoint, or the file concerned.
    pub at: At,
    /// What to tell the operator.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} [{}]", self.at, self.message, self.kind.label())
    }
}

/// The etcd source's state for `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub struct EtcdStatus {
    /// The etcd source runs: only then are these metrics rendered.
    active: AtomicBool,
    errors: [AtomicU64; KINDS.len()],
    /// Set while no endpoint can be used; cleared once a session lists the subnets.
    unreachable: AtomicBool,
    /// Certificate or password changes taken up without a restart.
    reloads: AtomicU64,
    /// The last failure, for `/readyz`.
    last: Mutex<Option<String>>,
}

impl EtcdStatus {
    pub(crate) fn activate(&self) {
        self.active.store(true, Ordering::Relaxed);
    }

    /// Counts `failure`.
    pub fn count(&self, failure: &Failure) {
        let slot = KINDS.iter().position(|k| *k == failure.kind).unwrap_or(KINDS.len() - 1);
        self.errors[slot].fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last.lock() {
            *last = Some(failure.to_string());
        }
    }

    /// The last failure counted.
    pub fn last_error(&self) -> Option<String> {
        self.last.lock().ok().and_then(|l| l.clone())
    }

    /// Errors of `kind` so far.
    pub fn errors(&self, kind: Kind) -> u64 {
        KINDS.iter().position(|k| *k == kind).map_or(0, |i| self.errors[i].load(Ordering::Relaxed))
    }

    /// Whether the source currently cannot reach any endpoint.
    pub fn unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
    }

    /// Sets the reachability.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.unreachable.store(unreachable, Ordering::Relaxed);
    }

    /// Rotations taken up.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    pub(crate) fn reloaded(&self) {
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text for these metrics.
    pub fn render(&self) -> String {
        if !self.active.load(Ordering::Relaxed) {
            return String::new();
        }
        let mut text = String::from(
            "# HELP cni_route_agent_etcd_errors_total Errors of the etcd source by kind.\n\
             # TYPE cni_route_agent_etcd_errors_total counter\n",
        );
        for (kind, count) in KINDS.iter().zip(&self.errors) {
            let count = count.load(Ordering::Relaxed);
            text.push_str(&format!(
                "cni_route_agent_etcd_errors_total{{kind=\"{}\"}} {count}\n",
                kind.label()
            ));
        }
        text.push_str(&format!(
            "# HELP cni_route_agent_etcd_unreachable 1 while the etcd source reaches no endpoint.\n\
             # TYPE cni_route_agent_etcd_unreachable gauge\ncni_route_agent_etcd_unreachable {}\n\
             # HELP cni_route_agent_etcd_credential_reloads_total Certificate or password changes taken up.\n\
             # TYPE cni_route_agent_etcd_credential_reloads_total counter\n\
             cni_route_agent_etcd_credential_reloads_total {}\n",
            self.unreachable() as u8,
            self.reloads()
        ));
        text
    }
}

/// Logs each failure once per change: a retry every few seconds that fails the same way says
/// nothing new. Keyed by where it happened, so one endpoint's recovery is told too.
#[derive(Debug, Default)]
pub struct Reporter {
    last: BTreeMap<At, Failure>,
}

impl Reporter {
    /// Counts `failure` and logs it if it is new for its place.
    pub fn fail(&mut self, status: &EtcdStatus, failure: Failure) {
        status.count(&failure);
        let kind = failure.kind.label();
        if self.last.get(&failure.at) != Some(&failure) {
            match &failure.at {
                At::Endpoint(endpoint) => tracing::error!(%endpoint, kind, "{failure}"),
                At::File(file) => tracing::error!(%file, kind, "{failure}"),
            }
            self.last.insert(failure.at.clone(), failure);
        } else {
            match &failure.at {
                At::Endpoint(endpoint) => tracing::debug!(%endpoint, kind, "{failure}"),
                At::File(file) => tracing::debug!(%file, kind, "{failure}"),
            }
        }
    }

    /// `at` works again.
    pub fn ok(&mut self, at: &At) {
        if self.last.remove(at).is_some() {
            match at {
                At::Endpoint(endpoint) => tracing::info!(%endpoint, "{at}: working again"),
                At::File(file) => tracing::info!(%file, "{at}: working again"),
            }
        }
    }
}

/// The contents of the credential files, as last read. No `Debug`: it holds the password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Material {
    ca: Option<Vec<u8>>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    user: Option<(String, String)>,
}

fn read(path: &Option<PathBuf>) -> Result<Option<Vec<u8>>, Failure> {
    let Some(path) = path else { return Ok(None) };
    std::fs::read(path).map(Some).map_err(|e| Failure {
        kind: Kind::BadFiles,
        at: At::File(path.display().to_string()),
        message: format!("cannot read: {e}"),
    })
}

impl EtcdTls {
    /// The endpoints as URLs (a bare `host:port` gets `https://` when TLS files are given,
    /// else `http://`, as etcd-client does); refuses flag combinations that cannot work.
    pub fn endpoints(&self, given: &[String]) -> Result<Vec<String>, AgentError> {
        let bad = |why: &str| Err(AgentError::Config(format!("etcd source: {why}")));
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad("--etcd-certfile and --etcd-keyfile go together");
        }
        if self.username.is_some() != self.password_file.is_some() {
            return bad("--etcd-username and --etcd-password-file go together");
        }
        let tls = self.ca_file.is_some() || self.cert_file.is_some();
        let mut out = vec![];
        for endpoint in given {
            let url = match endpoint.split_once("://") {
                Some(("http" | "https", _)) => endpoint.clone(),
                Some(_) => return bad(&format!("endpoint {endpoint}: give http:// or https://")),
                None if tls => format!("https://{endpoint}"),
                None => format!("http://{endpoint}"),
            };
            if tls && url.starts_with("http://") {
                return bad(&format!(
                    "endpoint {endpoint}: TLS files given, so the endpoint must be https://"
                ));
            }
            out.push(url);
        }
        if self.username.is_some() && out.iter().any(|endpoint| endpoint.starts_with("http://")) {
            tracing::warn!("etcd source: the password goes unencrypted to http:// endpoints");
        }
        Ok(out)
    }

    /// Reads the files (not checked yet).
    pub fn read(&self) -> Result<Material, Failure> {
        let user = match (&self.username, read(&self.password_file)?) {
            (Some(username), Some(password)) => {
                // A trailing newline is how every editor and `kubectl create secret` leave it.
                let password = String::from_utf8_lossy(&password).trim_end_matches(['\n', '\r']).to_string();
                Some((username.clone(), password))
            }
            _ => None,
        };
        Ok(Material {
            ca: read(&self.ca_file)?,
            cert: read(&self.cert_file)?,
            key: read(&self.key_file)?,
            user,
        })
    }

    fn file(&self, path: &Option<PathBuf>) -> String {
        path.as_ref().map_or_else(String::new, |path| path.display().to_string())
    }

    /// Checks what `read` returned: parseable, the key belongs to the certificate, the
    /// certificate valid now and usable by a client.
    pub fn validate(&self, material: &Material, now: SystemTime) -> Result<(), Failure> {
        let bad = |kind: Kind, path: &Option<PathBuf>, message: String| Failure {
            kind,
            at: At::File(self.file(path)),
            message,
        };
        if let Some(ca) = &material.ca {
            let certificates = CertificateDer::pem_slice_iter(ca).filter(|c| c.is_ok()).count();
            if certificates == 0 {
                return Err(bad(Kind::BadFiles, &self.ca_file, "no PEM certificate in the CA file".into()));
            }
        }
        let (Some(cert), Some(key)) = (&material.cert, &material.key) else { return Ok(()) };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(Kind::BadFiles, &self.cert_file, format!("not a PEM certificate: {e}")))?;
        let Some(leaf) = chain.first().cloned() else {
            return Err(bad(Kind::BadFiles, &self.cert_file, "no PEM certificate in the file".into()));
        };
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| bad(Kind::BadFiles, &self.key_file, format!("not a PEM private key: {e}")))?;
        let provider = rustls::crypto::ring::default_provider();
        if let Err(e) = rustls::sign::CertifiedKey::from_der(chain, key, &provider) {
            let (kind, message) = match e {
                rustls::Error::InconsistentKeys(_) => (
                    Kind::KeyMismatch,
                    format!("the key is not the key of the certificate {}", self.file(&self.cert_file)),
                ),
                e => (Kind::BadFiles, format!("unusable key: {e}")),
            };
            return Err(bad(kind, &self.key_file, message));
        }
        let leaf_cert = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| bad(Kind::BadFiles, &self.cert_file, format!("unparseable certificate: {e}")))?;
        let now = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
        // No trust anchors: the chain to etcd's CA is etcd's to judge. webpki checks validity
        // and usage before it looks for an issuer, so those errors come out first.
        let algs = provider.signature_verification_algorithms.all;
        let usage = webpki::KeyUsage::client_auth();
        match leaf_cert.verify_for_usage(algs, &[], &[], now, usage, None, None) {
            Err(webpki::Error::CertExpired { not_after, .. }) => Err(bad(
                Kind::ExpiredCert,
                &self.cert_file,
                format!("the client certificate expired at {}", date(not_after)),
            )),
            Err(webpki::Error::CertNotValidYet { not_before, .. }) => Err(bad(
                Kind::ExpiredCert,
                &self.cert_file,
                format!("the client certificate is not valid before {}", date(not_before)),
            )),
            Err(webpki::Error::RequiredEkuNotFoundContext(_)) => Err(bad(
                Kind::BadFiles,
                &self.cert_file,
                "the certificate is not for client authentication (extended key usage)".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// `time` as `YYYY-MM-DD HH:MM:SS UTC` (days to civil date: Howard Hinnant's algorithm).
fn date(time: UnixTime) -> String {
    let secs = time.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let days_since_0000 = days + 719_468;
    let era = days_since_0000.div_euclid(146_097);
    let doe = days_since_0000 - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem / 60 % 60, rem % 60)
}

impl Material {
    /// Client options for `endpoint`.
    pub fn options(&self, endpoint: &str) -> ConnectOptions {
        // HTTP/2 pings notice a dead etcd on the long-lived watch and keepalive streams.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if endpoint.starts_with("https://") {
            let mut tls = TlsOptions::new();
            tls = match &self.ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
                None => tls.with_native_roots(),
            };
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        if let Some((username, password)) = &self.user {
            options = options.with_user(username.clone(), password.clone());
        }
        options
    }
}

/// A client of the first endpoint, from `start` on, that answers; its index; the failures of
/// the endpoints tried before it.
pub type Connected = (Client, usize, Vec<Failure>);

/// The first endpoint, from `start` on, that answers; else every endpoint's failure.
pub async fn connect(
    endpoints: &[String],
    start: usize,
    material: &Material,
) -> Result<Connected, Vec<Failure>> {
    let mut failures = vec![];
    for step in 0..endpoints.len() {
        let index = (start + step) % endpoints.len();
        let endpoint = &endpoints[index];
        let attempt = async {
            let mut client = Client::connect([endpoint], Some(material.options(endpoint))).await?;
            // Connecting is lazy: a round trip shows the TLS handshake and the credentials work.
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(client)) => return Ok((client, index, failures)),
            Ok(Err(e)) => failures.push(classify(endpoint, "connect", &e)),
            Err(_) => failures.push(Failure {
                kind: Kind::Unreachable,
                at: At::Endpoint(endpoint.clone()),
                message: "connect: no answer within 10s".into(),
            }),
        }
    }
    Err(failures)
}

/// Every error in `e`'s chain, outermost first; an `io::Error` is looked into (its `source`
/// skips the error it wraps, which is where rustls puts its own).
fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> Vec<&'a (dyn std::error::Error + 'static)> {
    let mut out = vec![];
    let mut cur = Some(e);
    while let Some(e) = cur {
        out.push(e);
        cur = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    out
}

/// Names the mistake behind `e`, met at `endpoint` while doing `what`.
pub fn classify(endpoint: &str, what: &str, e: &etcd_client::Error) -> Failure {
    let root: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::TransportError(transport) => Some(transport),
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::IoError(io) => Some(io),
        _ => None,
    };
    let errs = root.map(chain).unwrap_or_default();
    // Each layer tends to repeat the one below: keep what is new.
    let mut text = String::new();
    for e in &errs {
        let message = match e.downcast_ref::<tonic::Status>() {
            Some(status) => status.message().to_string(),
            None => e.to_string(),
        };
        if !message.is_empty() && message != "transport error" && !text.contains(&message) {
            text = if text.is_empty() { message } else { format!("{text}: {message}") };
        }
    }
    let text = if text.is_empty() { e.to_string() } else { text };
    let (kind, why) = match errs.iter().find_map(|e| e.downcast_ref::<rustls::Error>()) {
        Some(tls_error) => tls_kind(tls_error),
        None => alert_kind(&text).unwrap_or_else(|| other_kind(e, &errs, &text)),
    };
    // The peer went away after the connection was made, in whichever words the layer that
    // noticed first uses (seen: all four).
    let lost = ["broken pipe", "connection reset", "connection closed", "operation was canceled"]
        .iter()
        .any(|words| text.to_lowercase().contains(words));
    let after_connect = matches!(kind, Kind::Other) || (matches!(kind, Kind::Unreachable) && lost);
    let (kind, why) = match kind {
        // In TLS 1.3 the client's handshake ends before the server has checked the client's
        // certificate; etcd's refusal (an alert, then the close) races the client's first
        // request, which then often meets a broken pipe, a reset or a closed connection
        // instead of the alert. Over https:// that is the refusal, not plain HTTP.
        _ if after_connect && lost && what == "connect" && endpoint.starts_with("https://") => (
            Kind::CertRejected,
            "etcd hung up right after the TLS handshake: most likely it refused our client \
             certificate (none given, or not from a CA etcd trusts)",
        ),
        // A TLS etcd answers an http:// client's first bytes with a 400 and hangs up.
        Kind::Other if lost && what == "connect" => {
            (Kind::PlainHttp, "the endpoint hung up at once: does it expect TLS? (then use https://)")
        }
        Kind::Other if lost => (Kind::Unreachable, "the connection was lost"),
        _ => (kind, why),
    };
    Failure { kind, at: At::Endpoint(endpoint.to_string()), message: format!("{what}: {why} ({text})") }
}

fn tls_kind(error: &rustls::Error) -> (Kind, &'static str) {
    use rustls::Error as E;
    match error {
        E::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            (Kind::WrongCa, "the server's certificate is not signed by the CA of --etcd-cafile")
        }
        E::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => (Kind::ExpiredCert, "the server's certificate is expired or not valid yet"),
        E::InvalidCertificate(_) => {
            (Kind::ServerCert, "the server's certificate is not valid for this endpoint")
        }
        E::AlertReceived(AlertDescription::CertificateExpired) => {
            (Kind::ExpiredCert, "etcd refused our client certificate as expired")
        }
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied,
        ) => (
            Kind::CertRejected,
            "etcd refused our client certificate (none given, or not from a CA etcd trusts)",
        ),
        E::InvalidMessage(_) => {
            (Kind::PlainHttp, "the endpoint does not speak TLS: plain HTTP? (then use http://)")
        }
        _ => (Kind::Other, "TLS failed"),
    }
}

/// An alert from the server after the handshake reaches us as text only (TLS 1.3 clients
/// learn of a refused certificate on their first read, and hyper keeps just the message).
fn alert_kind(text: &str) -> Option<(Kind, &'static str)> {
    let alert = text.split("received fatal alert: ").nth(1)?;
    let name = alert.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
    let all = [
        AlertDescription::CertificateExpired,
        AlertDescription::BadCertificate,
        AlertDescription::UnknownCA,
        AlertDescription::CertificateRequired,
        AlertDescription::CertificateUnknown,
        AlertDescription::UnsupportedCertificate,
        AlertDescription::AccessDenied,
    ];
    let alert = all.into_iter().find(|alert| format!("{alert:?}") == name)?;
    Some(tls_kind(&rustls::Error::AlertReceived(alert)))
}

fn other_kind(
    e: &etcd_client::Error,
    errs: &[&(dyn std::error::Error + 'static)],
    text: &str,
) -> (Kind, &'static str) {
    if let etcd_client::Error::GRpcStatus(s) = e {
        let m = s.message();
        if m.contains("authentication failed")
            || m.contains("permission denied")
            || m.contains("user name is empty")
            || matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
        {
            return (Kind::AuthRefused, "etcd refused the user or password, or the user's role");
        }
    }
    // A plain etcd hangs up on a TLS hello.
    if text.contains("tls handshake eof") {
        return (Kind::PlainHttp, "the endpoint hung up on TLS: plain HTTP? (then use http://)");
    }
    use std::io::ErrorKind as K;
    let io_unreachable = errs.iter().filter_map(|e| e.downcast_ref::<std::io::Error>()).any(|io| {
        matches!(
            io.kind(),
            K::ConnectionRefused
                | K::ConnectionReset
                | K::TimedOut
                | K::HostUnreachable
                | K::NetworkUnreachable
        )
    });
    if io_unreachable
        || matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable)
    {
        return (Kind::Unreachable, "unreachable");
    }
    (Kind::Other, "failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_read_like_dates() {
        assert_eq!(date(UnixTime::since_unix_epoch(Duration::ZERO)), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            date(UnixTime::since_unix_epoch(Duration::from_secs(951_782_400))),
            "2000-02-29 00:00:00 UTC"
        );
        assert_eq!(
            date(UnixTime::since_unix_epoch(Duration::from_secs(1_764_466_015))),
            "2025-11-30 01:26:55 UTC"
        );
    }

    #[test]
    fn names_alerts_known_only_as_text() {
        let t = "transport error: connection error: received fatal alert: BadCertificate: x";
        assert_eq!(alert_kind(t).map(|k| k.0), Some(Kind::CertRejected));
        let t = "received fatal alert: CertificateExpired";
        assert_eq!(alert_kind(t).map(|k| k.0), Some(Kind::ExpiredCert));
        assert_eq!(alert_kind("received fatal alert: DecodeError"), None);
        assert_eq!(alert_kind("connection refused"), None);
    }

    #[test]
    fn a_hang_up_at_connect_is_a_refused_certificate_over_tls_and_plain_http_otherwise() {
        let pipe =
            || etcd_client::Error::IoError(std::io::Error::other("stream closed because of a broken pipe"));
        // Seen in CI: TLS 1.3 and no client certificate, the refusal lost to the first write,
        // or to the read of a connection hyper found closed, or reset.
        let closed =
            etcd_client::Error::IoError(std::io::Error::other("operation was canceled: connection closed"));
        let reset = etcd_client::Error::IoError(std::io::Error::from_raw_os_error(104));
        for e in [pipe(), closed, reset] {
            let f = classify("https://127.0.0.1:2379", "connect", &e);
            assert_eq!(f.kind, Kind::CertRejected, "{}", f.message);
            assert!(f.message.contains("refused our client certificate"), "{}", f.message);
        }
        let refused =
            etcd_client::Error::IoError(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify("https://127.0.0.1:2379", "connect", &refused).kind, Kind::Unreachable);
        assert_eq!(classify("http://127.0.0.1:2379", "connect", &pipe()).kind, Kind::PlainHttp);
        assert_eq!(classify("https://127.0.0.1:2379", "watch", &pipe()).kind, Kind::Unreachable);
    }

    #[test]
    fn refuses_flags_that_cannot_work() {
        let eps = |s: &[&str]| s.iter().map(|e| e.to_string()).collect::<Vec<_>>();
        let ca = EtcdTls { ca_file: Some("/ca.pem".into()), ..Default::default() };
        assert_eq!(
            ca.endpoints(&eps(&["https://a:2379", "b:2379"])).unwrap(),
            ["https://a:2379", "https://b:2379"]
        );
        assert!(ca.endpoints(&eps(&["https://a:2379", "http://b:2379"])).is_err());
        assert_eq!(EtcdTls::default().endpoints(&eps(&["a:2379"])).unwrap(), ["http://a:2379"]);
        assert!(EtcdTls::default().endpoints(&eps(&["unix://a"])).is_err());
        let half = EtcdTls { cert_file: Some("/c.pem".into()), ..Default::default() };
        assert!(half.endpoints(&eps(&["https://a:2379"])).is_err());
        let user = EtcdTls { username: Some("u".into()), ..Default::default() };
        assert!(user.endpoints(&eps(&["https://a:2379"])).is_err());
    }

    /// Runs `f` with the log lines it writes captured (no colours).
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn an_expired_client_certificate_is_logged_under_the_file_not_an_endpoint() {
        let dir = std::env::temp_dir().join(format!("etcd-expired-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_file, key_file) = (dir.join("client.crt"), dir.join("client.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let tls =
            EtcdTls { cert_file: Some(cert_file.clone()), key_file: Some(key_file), ..Default::default() };
        let failure = tls.validate(&tls.read().unwrap(), SystemTime::now()).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(failure.kind, Kind::ExpiredCert);
        let text = logged(|| {
            let mut reporter = Reporter::default();
            let at = failure.at.clone();
            reporter.fail(&EtcdStatus::default(), failure);
            // Its recovery is told under the same field.
            reporter.ok(&at);
        });
        let cert_file = cert_file.display().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        for line in lines {
            assert!(line.contains(&format!("file={cert_file}")), "the file named as such: {line}");
            assert!(!line.contains("endpoint="), "a file path is no endpoint: {line}");
        }
        let connect =
            classify("https://127.0.0.1:1", "connect", &etcd_client::Error::InvalidArgs("x".into()));
        let text = logged(|| Reporter::default().fail(&EtcdStatus::default(), connect));
        assert!(text.contains("endpoint=https://127.0.0.1:1") && !text.contains("file="), "{text}");
    }

    #[test]
    fn counts_every_failure_and_renders_them() {
        let s = EtcdStatus::default();
        assert_eq!(s.render(), "");
        s.activate();
        let at = At::Endpoint("https://a:2379".into());
        let f = Failure { kind: Kind::WrongCa, at: at.clone(), message: "x".into() };
        let mut r = Reporter::default();
        r.fail(&s, f.clone());
        r.fail(&s, f);
        s.set_unreachable(true);
        assert_eq!(s.errors(Kind::WrongCa), 2);
        let text = s.render();
        assert!(text.contains("cni_route_agent_etcd_errors_total{kind=\"wrong_ca\"} 2\n"), "{text}");
        assert!(text.contains("cni_route_agent_etcd_unreachable 1\n"), "{text}");
        assert_eq!(r.last.len(), 1);
        r.ok(&at);
        assert!(r.last.is_empty());
    }
}

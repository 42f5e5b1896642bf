//! TLS material: the generated dev certificate (ECDSA P-256, valid less than 14 days,
//! rotated before it expires), configured PEM files (reloaded when they change or on
//! SIGHUP), the `/cert-hash` document, and rustls configs that follow rotations without
//! dropping open sessions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Whole validity of a generated certificate: under Chromium's 14-day limit for
/// `serverCertificateHashes`.
const DEV_VALIDITY: Duration = Duration::from_secs(13 * 86400);
/// Backdating for clients whose clock lags.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Publish the next certificate this long before expiry, switch to it a day later.
const PUBLISH_NEXT: Duration = Duration::from_secs(4 * 86400);
const SWITCH: Duration = Duration::from_secs(3 * 86400);

/// Install aws-lc-rs as rustls' process-wide provider (idempotent).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// A certificate chain with its key.
pub struct CertIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the leaf certificate's DER: what browsers pin.
    pub sha256: [u8; 32],
    certified: Arc<CertifiedKey>,
    generated: bool,
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl CertIdentity {
    fn build(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        key_pem: String,
        generated: bool,
    ) -> anyhow::Result<CertIdentity> {
        let leaf = chain
            .first()
            .ok_or_else(|| anyhow!("no certificate in the chain"))?;
        let sha256: [u8; 32] = Sha256::digest(leaf.as_ref()).into();
        let (not_before, not_after) = validity(leaf)?;
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
            .map_err(|e| anyhow!("unsupported private key: {e}"))?;
        let certified = CertifiedKey::new(chain.clone(), signing);
        // A certificate and a key that do not belong together (a cert manager that wrote one
        // file before the other) would fail every handshake: refuse the pair, keep serving
        // the previous one (review F19).
        certified
            .keys_match()
            .map_err(|e| anyhow!("the private key does not match the certificate: {e}"))?;
        let certified = Arc::new(certified);
        Ok(CertIdentity {
            chain,
            key_pem,
            not_before,
            not_after,
            sha256,
            certified,
            generated,
        })
    }

    /// A self-signed ECDSA P-256 certificate for localhost, valid from an hour ago for 13 days.
    pub fn generate_dev(now: SystemTime) -> anyhow::Result<CertIdentity> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".into(),
            "::1".into(),
        ])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "imgate development");
        let not_before = now - BACKDATE;
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_before + DEV_VALIDITY);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| anyhow!("{e}"))?;
        CertIdentity::build(vec![cert.der().clone()], key_der, key_pem, true)
    }

    /// PEM files (errors name the file).
    pub fn load_pem(cert_path: &str, key_path: &str) -> anyhow::Result<CertIdentity> {
        let cert_pem = std::fs::read(cert_path)
            .with_context(|| format!("cannot read certificate {cert_path}"))?;
        let chain = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{cert_path}: not a PEM certificate chain"))?;
        let key_text = std::fs::read_to_string(key_path)
            .with_context(|| format!("cannot read key {key_path}"))?;
        let key = rustls_pemfile::private_key(&mut key_text.as_bytes())
            .with_context(|| format!("{key_path}: not a PEM private key"))?
            .ok_or_else(|| anyhow!("{key_path}: no private key found"))?;
        CertIdentity::build(chain, key, key_text, false).with_context(|| cert_path.to_string())
    }

    pub fn cert_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| {
                let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
                let lines: Vec<&str> = b64
                    .as_bytes()
                    .chunks(64)
                    .map(|l| std::str::from_utf8(l).unwrap_or(""))
                    .collect();
                format!(
                    "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                    lines.join("\n")
                )
            })
            .collect()
    }

    /// Seconds from `now` until this certificate expires, negative once it has.
    pub fn seconds_left(&self, now: SystemTime) -> f64 {
        match self.not_after.duration_since(now) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }

    /// `generated` for the dev certificate, `file` for configured PEM files.
    pub fn source(&self) -> &'static str {
        if self.generated {
            "generated"
        } else {
            "file"
        }
    }

    fn hash_json(&self) -> serde_json::Value {
        serde_json::json!({
            "sha256_hex": self.sha256.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "sha256_b64": base64::engine::general_purpose::STANDARD.encode(self.sha256),
            "expires_at_ms": ms(self.not_after),
        })
    }
}

/// The validity window of a DER certificate.
fn validity(der: &CertificateDer<'_>) -> anyhow::Result<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow!("bad certificate: {e}"))?;
    let v = cert.validity();
    let to_sys = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok((
        to_sys(v.not_before.timestamp()),
        to_sys(v.not_after.timestamp()),
    ))
}

/// What the maintenance loop does next for a generated identity.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    PublishNext,
    Switch,
}

/// The rotation policy as a pure function of time.
pub fn rotation_step(now: SystemTime, current_not_after: SystemTime, has_next: bool) -> Step {
    let left = current_not_after
        .duration_since(now)
        .unwrap_or(Duration::ZERO);
    if left <= SWITCH && has_next {
        Step::Switch
    } else if left <= PUBLISH_NEXT && !has_next {
        Step::PublishNext
    } else {
        Step::Nothing
    }
}

/// The served identity, swapped atomically on rotation or reload.
pub struct CertStore {
    current: ArcSwap<CertIdentity>,
    next: ArcSwapOption<CertIdentity>,
    files: Option<(String, String)>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

impl CertStore {
    fn with(identity: CertIdentity, files: Option<(String, String)>) -> CertStore {
        CertStore {
            current: ArcSwap::from_pointee(identity),
            next: ArcSwapOption::empty(),
            files,
        }
    }

    pub fn dev() -> anyhow::Result<CertStore> {
        Ok(CertStore::with(
            CertIdentity::generate_dev(SystemTime::now())?,
            None,
        ))
    }

    pub fn from_files(cert: &str, key: &str) -> anyhow::Result<CertStore> {
        Ok(CertStore::with(
            CertIdentity::load_pem(cert, key)?,
            Some((cert.into(), key.into())),
        ))
    }

    pub fn current(&self) -> Arc<CertIdentity> {
        self.current.load_full()
    }

    /// Set `imgate_certificate_expiry_seconds` from the certificate served now.
    pub fn publish_expiry(&self) {
        let current = self.current();
        crate::ops::metrics::certificate_expiry(
            current.source(),
            current.seconds_left(SystemTime::now()),
        );
    }

    /// A server config that always presents the current identity.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        install_crypto_provider();
        let mut cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// SPEC §9's `/cert-hash` document.
    pub fn cert_hash_json(&self) -> serde_json::Value {
        let current = self.current();
        let mut doc = current.hash_json();
        let mut hashes = vec![current.hash_json()];
        if let Some(next) = self.next.load_full() {
            hashes.push(next.hash_json());
        }
        doc["hashes"] = serde_json::Value::Array(hashes);
        doc
    }

    /// Serve a freshly generated identity at once: a forced rotation. Open sessions keep the
    /// certificate they were established with; new handshakes get the new one.
    pub fn rotate_now(&self) -> anyhow::Result<()> {
        self.switch_to(Arc::new(CertIdentity::generate_dev(SystemTime::now())?));
        Ok(())
    }

    fn switch_to(&self, identity: Arc<CertIdentity>) {
        self.current.store(identity);
        self.next.store(None);
    }

    /// One maintenance step at `now`: rotation for generated identities.
    pub fn rotate(&self, now: SystemTime) -> anyhow::Result<Step> {
        let current = self.current();
        if !current.generated {
            return Ok(Step::Nothing);
        }
        let step = rotation_step(now, current.not_after, self.next.load().is_some());
        match step {
            Step::PublishNext => {
                self.next
                    .store(Some(Arc::new(CertIdentity::generate_dev(now)?)));
                info!("next development certificate published on /cert-hash");
            }
            Step::Switch => {
                if let Some(next) = self.next.load_full() {
                    self.switch_to(next);
                    info!("switched to the next development certificate");
                }
            }
            Step::Nothing => {}
        }
        Ok(step)
    }

    /// Reload configured files; a failure keeps the old identity.
    pub fn reload_files(&self) -> anyhow::Result<bool> {
        let Some((cert, key)) = &self.files else {
            return Ok(false);
        };
        let fresh = CertIdentity::load_pem(cert, key)?;
        if fresh.sha256 == self.current().sha256 {
            return Ok(false);
        }
        self.switch_to(Arc::new(fresh));
        info!(cert = %cert, "TLS certificate reloaded");
        Ok(true)
    }

    /// Rotation (generated) or reload on change / SIGHUP (files), until cancelled. The
    /// caller spawns it where the drain can wait for it.
    pub async fn maintain(self: Arc<Self>, cancel: CancellationToken) {
        let store = self;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        let mut last_mtime = store.files_mtime();
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            let forced = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => false,
                _ = hangup => true,
            };
            if let Err(e) = store.rotate(SystemTime::now()) {
                error!(error = %e, "certificate rotation failed; keeping the current one");
            }
            let mtime = store.files_mtime();
            if forced || mtime != last_mtime {
                last_mtime = mtime;
                if let Err(e) = store.reload_files() {
                    error!(error = %format!("{e:#}"), "certificate reload failed; keeping the current one");
                }
            }
        }
    }

    fn files_mtime(&self) -> Option<SystemTime> {
        let (c, k) = self.files.as_ref()?;
        let m = |p: &str| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        m(c).max(m(k))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified.clone())
    }
}

/// `imgate gen-cert --out DIR`: cert.pem and key.pem (mode 0600).
pub fn write_dev_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let id = CertIdentity::generate_dev(SystemTime::now())?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, id.cert_pem())
        .with_context(|| format!("cannot write {}", cert.display()))?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .with_context(|| format!("cannot write {}", key.display()))?;
        f.write_all(id.key_pem.as_bytes())?;
    }
    Ok((cert, key))
}

/// A client config that trusts exactly one certificate, by the SHA-256 of its DER (what
/// browsers do with `serverCertificateHashes`); used by the example client and tests.
pub fn pinned_client_config(sha256: [u8; 32]) -> Arc<rustls::ClientConfig> {
    install_crypto_provider();
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let verifier = Arc::new(Pinned {
        sha256,
        algs: provider.signature_verification_algorithms,
    });
    Arc::new(
        rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    )
}

#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn dev_certificate_shape() {
        let now = SystemTime::now();
        let id = CertIdentity::generate_dev(now).unwrap();
        assert!(id.not_before < now);
        let whole = id.not_after.duration_since(id.not_before).unwrap();
        assert!(whole < Duration::from_secs(14 * 86400), "{whole:?}");
        let (_, cert) = x509_parser::parse_x509_certificate(id.chain[0].as_ref()).unwrap();
        assert_eq!(
            cert.public_key().algorithm.algorithm.to_id_string(),
            "1.2.840.10045.2.1",
            "an EC key"
        );
        let expected: [u8; 32] = Sha256::digest(id.chain[0].as_ref()).into();
        assert_eq!(id.sha256, expected);
    }

    #[test]
    fn rotation_policy() {
        let now = SystemTime::now();
        let day = Duration::from_secs(86400);
        assert_eq!(rotation_step(now, now + 10 * day, false), Step::Nothing);
        assert_eq!(
            rotation_step(now, now + 4 * day - Duration::from_secs(1), false),
            Step::PublishNext
        );
        assert_eq!(
            rotation_step(now, now + 3 * day + Duration::from_secs(60), true),
            Step::Nothing
        );
        assert_eq!(rotation_step(now, now + 3 * day, true), Step::Switch);
        assert_eq!(rotation_step(now, now - day, true), Step::Switch);
    }

    #[test]
    fn cert_hash_lists_current_and_next_during_a_rotation() {
        let store = CertStore::dev().unwrap();
        let first = store.current();
        let doc = store.cert_hash_json();
        assert_eq!(doc["hashes"].as_array().unwrap().len(), 1);
        assert_eq!(doc["sha256_b64"], doc["hashes"][0]["sha256_b64"]);
        let later = first.not_after - Duration::from_secs(3 * 86400 + 3600);
        assert_eq!(store.rotate(later).unwrap(), Step::PublishNext);
        let doc = store.cert_hash_json();
        assert_eq!(doc["hashes"].as_array().unwrap().len(), 2);
        assert_eq!(
            store.current().sha256,
            first.sha256,
            "still serving the current one"
        );
        assert_eq!(
            store
                .rotate(first.not_after - Duration::from_secs(86400))
                .unwrap(),
            Step::Switch
        );
        assert_ne!(store.current().sha256, first.sha256);
        assert_eq!(
            store.cert_hash_json()["hashes"].as_array().unwrap().len(),
            1
        );
    }

    async fn handshake(addr: std::net::SocketAddr, pin: [u8; 32]) -> std::io::Result<Vec<u8>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(pinned_client_config(pin));
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        tls.write_all(b"ping").await?;
        let mut buf = vec![0u8; 4];
        tls.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn real_handshakes_follow_a_rotation() {
        let store = Arc::new(CertStore::dev().unwrap());
        let acceptor = tokio_rustls::TlsAcceptor::from(store.server_config(&[]));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(s).await {
                        let mut buf = [0u8; 4];
                        if tls.read_exact(&mut buf).await.is_ok() {
                            let _ = tls.write_all(&buf).await;
                        }
                    }
                });
            }
        });
        let first = store.current().sha256;
        assert_eq!(handshake(addr, first).await.unwrap(), b"ping");
        let not_after = store.current().not_after;
        store
            .rotate(not_after - Duration::from_secs(3 * 86400 + 3600))
            .unwrap();
        store
            .rotate(not_after - Duration::from_secs(86400))
            .unwrap();
        let second = store.current().sha256;
        assert!(
            handshake(addr, first).await.is_err(),
            "the old pin no longer matches"
        );
        assert_eq!(handshake(addr, second).await.unwrap(), b"ping");
    }

    #[test]
    fn gen_cert_writes_loadable_files() {
        let dir = std::env::temp_dir().join(format!("imgate-cert-{}", rand::random::<u64>()));
        let (c, k) = write_dev_cert(&dir).unwrap();
        let id = CertIdentity::load_pem(c.to_str().unwrap(), k.to_str().unwrap()).unwrap();
        assert!(!id.generated);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let err = CertIdentity::load_pem("/nonexistent/cert.pem", k.to_str().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/cert.pem"));
        // A certificate with another pair's key (a cert manager caught half-way) is refused.
        let other = dir.join("other");
        let (_, other_key) = write_dev_cert(&other).unwrap();
        let err = CertIdentity::load_pem(c.to_str().unwrap(), other_key.to_str().unwrap())
            .err()
            .expect("a mismatched pair is refused");
        let err = format!("{err:#}");
        assert!(err.contains("does not match"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}

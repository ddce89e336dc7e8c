//! Test PKI: a CA, a server certificate for 127.0.0.1/localhost, a client certificate and an
//! unrelated second CA, all as PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use etcd_client::{Certificate, Identity, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::error::{IoContext, Result};

/// Paths of a generated set of PEM files (see [`CertSet::generate`]).
///
/// Cloning is cheap; when the set owns its directory ([`CertSet::generate_temp`]), the
/// directory lives until the last clone is dropped.
#[derive(Debug, Clone)]
pub struct CertSet {
    /// The directory holding the files.
    pub dir: PathBuf,
    /// CA certificate that signed the server and client certificates.
    pub ca: PathBuf,
    /// Server certificate (SANs: IP 127.0.0.1, DNS localhost; EKU server+client auth).
    pub server_cert: PathBuf,
    /// Server private key (PKCS#8).
    pub server_key: PathBuf,
    /// Client certificate, CN `debvisord`, signed by [`CertSet::ca`].
    pub client_cert: PathBuf,
    /// Client private key (PKCS#8).
    pub client_key: PathBuf,
    /// A second, unrelated CA certificate (for "wrong CA" tests).
    pub other_ca: PathBuf,
    /// Keeps an owned temp directory alive.
    _owned: Option<Arc<tempfile::TempDir>>,
}

/// Parameters of a CA certificate with the given common name.
fn ca_params(cn: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// Write `contents` to `dir/name` (mode 0600 for keys) and return the path.
fn write_pem(dir: &Path, name: &str, contents: &str, secret: bool) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, contents).ctx(|| format!("writing {}", path.display()))?;
    if secret {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .ctx(|| format!("chmod 600 {}", path.display()))?;
    }
    Ok(path)
}

impl CertSet {
    /// Generate the CA, server, client and other-CA certificates (ECDSA P-256) into `dir`
    /// (created if missing) as `ca.pem`, `server.pem`, `server-key.pem`, `client.pem`,
    /// `client-key.pem` and `other-ca.pem`.
    pub fn generate(dir: &Path) -> Result<CertSet> {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;

        let ca =
            CertifiedIssuer::self_signed(ca_params("debvisor test CA")?, KeyPair::generate()?)?;

        let server_key = KeyPair::generate()?;
        let mut sp = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        sp.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        sp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // etcd 3.4's gRPC gateway dials the server with the server certificate as a client
        // certificate, so it needs clientAuth too.
        sp.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        sp.use_authority_key_identifier_extension = true;
        let server_cert = sp.signed_by(&server_key, &ca)?;

        let client_key = KeyPair::generate()?;
        let mut cp = CertificateParams::new(Vec::<String>::new())?;
        cp.distinguished_name.push(DnType::CommonName, "debvisord");
        cp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        cp.use_authority_key_identifier_extension = true;
        let client_cert = cp.signed_by(&client_key, &ca)?;

        let other =
            CertifiedIssuer::self_signed(ca_params("unrelated test CA")?, KeyPair::generate()?)?;

        Ok(CertSet {
            dir: dir.to_path_buf(),
            ca: write_pem(dir, "ca.pem", &ca.pem(), false)?,
            server_cert: write_pem(dir, "server.pem", &server_cert.pem(), false)?,
            server_key: write_pem(dir, "server-key.pem", &server_key.serialize_pem(), true)?,
            client_cert: write_pem(dir, "client.pem", &client_cert.pem(), false)?,
            client_key: write_pem(dir, "client-key.pem", &client_key.serialize_pem(), true)?,
            other_ca: write_pem(dir, "other-ca.pem", &other.pem(), false)?,
            _owned: None,
        })
    }

    /// Like [`CertSet::generate`], into a fresh temp directory owned by the returned set (and
    /// its clones); the directory is removed when the last clone is dropped.
    pub fn generate_temp() -> Result<CertSet> {
        let dir = tempfile::Builder::new()
            .prefix("debvisor-certs-")
            .tempdir()
            .ctx(|| "creating a temp dir for certificates".to_owned())?;
        let mut set = CertSet::generate(dir.path())?;
        set._owned = Some(Arc::new(dir));
        Ok(set)
    }

    /// etcd-client TLS options trusting [`CertSet::ca`] and presenting the client certificate.
    pub fn client_tls(&self) -> Result<TlsOptions> {
        self.client_tls_with_ca(&self.ca)
    }

    /// etcd-client TLS options trusting the CA in `ca_pem` (e.g. [`CertSet::other_ca`]) and
    /// presenting the client certificate.
    pub fn client_tls_with_ca(&self, ca_pem: &Path) -> Result<TlsOptions> {
        let read = |p: &Path| std::fs::read(p).ctx(|| format!("reading {}", p.display()));
        let ca = Certificate::from_pem(read(ca_pem)?);
        let identity = Identity::from_pem(read(&self.client_cert)?, read(&self.client_key)?);
        Ok(TlsOptions::new().ca_certificate(ca).identity(identity))
    }
}

/// Write a CA (`<dir>/etcd-ca.pem`) and, for each `(name, ip)` of `members`, a certificate
/// `<dir>/<name>.pem` with key `<dir>/<name>-key.pem` (mode 0600) for serverAuth and
/// clientAuth, with SANs `ip`, `name`, 127.0.0.1 and localhost: the PKI an operator gives the
/// Ansible role `debvisor_etcd` (each member's pair serves its etcd, talks to its peers and is
/// its daemon's client certificate).
pub fn generate_members(dir: &Path, members: &[(&str, &str)]) -> Result<()> {
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let ca =
        CertifiedIssuer::self_signed(ca_params("debvisor test etcd CA")?, KeyPair::generate()?)?;
    write_pem(dir, "etcd-ca.pem", &ca.pem(), false)?;
    for (name, ip) in members {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![
            (*ip).to_owned(),
            (*name).to_owned(),
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])?;
        p.distinguished_name.push(DnType::CommonName, *name);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &ca)?;
        write_pem(dir, &format!("{name}.pem"), &cert.pem(), false)?;
        write_pem(dir, &format!("{name}-key.pem"), &key.serialize_pem(), true)?;
    }
    Ok(())
}

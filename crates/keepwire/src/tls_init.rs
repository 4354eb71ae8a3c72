//! `keepwire admin tls-init DIR --host NAME...`: a private certificate
//! authority and a relay certificate it signs, for self-hosters without a
//! public CA (a certificate made with `openssl req -x509` cannot serve: webpki
//! refuses a CA certificate as a server's own).
//!
//! DIR gets `ca.pem` (give it to clients: `keepwire login --ca-cert`),
//! `ca.key` (keep it secret: whoever holds it can impersonate the relay to
//! those clients), `relay.pem` and `relay.key` (`keepwire serve --tls-cert
//! --tls-key`). Run again on the same DIR to renew the relay's certificate
//! (or change its names): the CA in DIR is kept, so clients need nothing new.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// The CA's name. Fixed: a renewal rebuilds the issuer from it and the key.
const CA_NAME: &str = "keepwire private CA";

/// How long the CA is valid.
const CA_DAYS: i64 = 3650;

/// What `tls-init` wrote.
pub(crate) struct Written {
    /// The CA certificate (for clients).
    pub(crate) ca_pem: PathBuf,
    /// The relay's certificate chain.
    pub(crate) cert: PathBuf,
    /// The relay's private key.
    pub(crate) key: PathBuf,
    /// Whether the CA already existed (a renewal).
    pub(crate) reused_ca: bool,
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// Writes `contents` to `path` with `mode`, replacing it atomically.
fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Checks a host name or IP address for the certificate.
fn check_host(h: &str) -> anyhow::Result<()> {
    if h.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
        });
    if !ok {
        bail!("{h:?} is not a host name or IP address");
    }
    Ok(())
}

/// Makes (or reuses) the CA in `dir` and a relay certificate for `hosts`
/// valid for `days` days, verified as a client will verify it.
pub(crate) fn tls_init(dir: &Path, hosts: &[String], days: u32) -> anyhow::Result<Written> {
    use std::os::unix::fs::PermissionsExt as _;
    if hosts.is_empty() {
        bail!("name the relay's host names or IP addresses with --host (repeat it for several)");
    }
    for h in hosts {
        check_host(h)?;
    }
    if days == 0 || i64::from(days) > CA_DAYS {
        bail!("--days must be between 1 and {CA_DAYS}");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
    let ca_pem = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let now = time::OffsetDateTime::now_utc();
    let (ca_cert_pem, ca_key_pair, reused_ca) = match (ca_pem.exists(), ca_key.exists()) {
        (true, true) => {
            let key = std::fs::read_to_string(&ca_key)
                .with_context(|| format!("cannot read {}", ca_key.display()))?;
            let key = KeyPair::from_pem(&key)
                .with_context(|| format!("{} is not a private key", ca_key.display()))?;
            let pem = std::fs::read_to_string(&ca_pem)
                .with_context(|| format!("cannot read {}", ca_pem.display()))?;
            (pem, key, true)
        }
        (false, false) => {
            let key = KeyPair::generate()?;
            let mut params = ca_params()?;
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + time::Duration::days(CA_DAYS);
            let cert = params.self_signed(&key)?;
            (cert.pem(), key, false)
        }
        _ => bail!(
            "{} has only one of ca.pem and ca.key: restore the other, or use an empty directory",
            dir.display()
        ),
    };
    let issuer = Issuer::new(ca_params()?, &ca_key_pair);

    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(hosts.to_vec())?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, hosts[0].as_str());
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = now + time::Duration::days(i64::from(days));
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    // Verify the new certificate against ca.pem for every name, the way a
    // client does, before replacing anything.
    verify(&ca_cert_pem, leaf_cert.der(), hosts).with_context(|| {
        format!(
            "the new certificate does not verify against {} (was it made by another tool?)",
            ca_pem.display()
        )
    })?;

    if !reused_ca {
        write_file(&ca_key, &ca_key_pair.serialize_pem(), 0o600)?;
        write_file(&ca_pem, &ca_cert_pem, 0o644)?;
    }
    let cert = dir.join("relay.pem");
    let key = dir.join("relay.key");
    write_file(&key, &leaf_key.serialize_pem(), 0o600)?;
    write_file(&cert, &leaf_cert.pem(), 0o644)?;
    Ok(Written {
        ca_pem,
        cert,
        key,
        reused_ca,
    })
}

fn verify(ca_pem: &str, leaf: &CertificateDer<'_>, hosts: &[String]) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for der in keepwire_client::parse_pem_certificates(ca_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("ca.pem: {e}"))?
    {
        roots.add(CertificateDer::from(der))?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()?;
    for h in hosts {
        if h.contains('*') {
            continue;
        }
        let name = ServerName::try_from(h.as_str())?.to_owned();
        verifier
            .verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map_err(|e| anyhow::anyhow!("{h}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kw-tls-init-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_ca_and_a_leaf_are_made_and_the_ca_is_kept_on_renewal() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = dir("renew");
        let hosts = vec!["relay.example".to_string(), "10.0.0.5".to_string()];
        let first = tls_init(&d, &hosts, 825).unwrap();
        assert!(!first.reused_ca);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&first.key), 0o600);
        assert_eq!(mode(&d.join("ca.key")), 0o600);
        let ca = std::fs::read(&first.ca_pem).unwrap();
        // Renewed for other names: same CA, new leaf, which verifies against it.
        let second = tls_init(&d, &["other.example".to_string()], 30).unwrap();
        assert!(second.reused_ca);
        assert_eq!(std::fs::read(&second.ca_pem).unwrap(), ca);
        let leaf = keepwire_client::parse_pem_certificates(&std::fs::read(&second.cert).unwrap())
            .unwrap()
            .remove(0);
        let ca = String::from_utf8(ca).unwrap();
        verify(
            &ca,
            &CertificateDer::from(leaf.clone()),
            &["other.example".into()],
        )
        .unwrap();
        assert!(verify(&ca, &CertificateDer::from(leaf), &["relay.example".into()]).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mistakes_are_refused() {
        let d = dir("bad");
        assert!(tls_init(&d, &[], 825).is_err());
        assert!(tls_init(&d, &["bad host".into()], 825).is_err());
        assert!(tls_init(&d, &["-x.example".into()], 825).is_err());
        assert!(tls_init(&d, &["ok.example".into()], 0).is_err());
        // Half a CA is not silently replaced.
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca.pem"), "x").unwrap();
        let err = tls_init(&d, &["ok.example".into()], 825).err().unwrap();
        assert!(
            err.to_string().contains("only one of ca.pem and ca.key"),
            "{err}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}

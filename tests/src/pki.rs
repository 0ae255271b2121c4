//! Certificates for the TLS scenarios, made with rcgen: a CA that signs
//! server and client certificates into a directory.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A CA whose certificate is `<dir>/<name>-ca.pem` and that signs
/// certificates into `dir`.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA with Common Name `<name> CA`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key"))
            .expect("CA certificate");
        std::fs::write(dir.join(format!("{name}-ca.pem")), issuer.pem()).expect("write CA");
        Ca {
            issuer,
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// The path of its certificate.
    pub fn pem(&self) -> String {
        self.dir
            .join(format!("{}-ca.pem", self.name))
            .display()
            .to_string()
    }

    /// A certificate for `names` (subject alternative names) without a
    /// Common Name: `(<file>.pem, <file>.key)`.
    pub fn sign(&self, file: &str, names: &[&str]) -> (String, String) {
        self.issue(file, None, names)
    }

    /// A certificate with Common Name `cn` for `names`.
    pub fn sign_cn(&self, file: &str, cn: &str, names: &[&str]) -> (String, String) {
        self.issue(file, Some(cn), names)
    }

    /// Both files are written beside and renamed over, as certificate
    /// managers rotate them, so a proxy watching them never reads half.
    fn issue(&self, file: &str, cn: Option<&str>, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        let (tmp_c, tmp_k) = (
            self.dir.join(format!(".{file}.pem.tmp")),
            self.dir.join(format!(".{file}.key.tmp")),
        );
        std::fs::write(&tmp_k, key.serialize_pem()).expect("write key");
        std::fs::write(&tmp_c, cert.pem()).expect("write cert");
        std::fs::rename(&tmp_k, &k).expect("rename key");
        std::fs::rename(&tmp_c, &c).expect("rename cert");
        (c.display().to_string(), k.display().to_string())
    }
}

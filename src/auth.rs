//! Who may call the service, and as whom.
//!
//! Principals live in an auth file (TOML) given with `--auth-file`: a name, a role, and
//! credentials — the SHA-256 of a bearer token (never the token itself) and/or the SHA-256
//! of a TLS client certificate (mTLS). A writer may be bound to the sender ids it may submit
//! communications for. Facts decide every verdict, so recording them is a role of its own
//! (`registrar`), never part of a writer's. `audit-ledger token add` creates principals.
//!
//! ```toml
//! [[principals]]
//! name = "contoso-mail"
//! role = "writer"
//! token_sha256 = "9f86d0…"
//! senders = ["contoso-mail", "contoso-billing"]
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64;
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Messaging systems: append communications, ask CheckSender; read nothing, and record
    /// no facts (a writer bound to its senders could otherwise change who may send for
    /// any other partner).
    Writer,
    /// Systems of record for relationships (billing, partner management): record facts, ask
    /// CheckSender; nothing else.
    Registrar,
    /// Compliance tools: every read, query and proof; no writes.
    Auditor,
    /// Everything, including the access log.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "writer" => Ok(Role::Writer),
            "registrar" => Ok(Role::Registrar),
            "auditor" => Ok(Role::Auditor),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?} (writer, registrar, auditor, admin)"
            )),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Writer => "writer",
            Role::Registrar => "registrar",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        })
    }
}

/// gRPC methods each role may call (full paths). Admin may call every method.
const WRITER_METHODS: &[&str] = &[
    "/audit.ledger.v1.LedgerService/Append",
    "/audit.ledger.v1.LedgerService/AppendBatch",
    "/audit.ledger.v1.ComplianceService/CheckSender",
];
const REGISTRAR_METHODS: &[&str] = &[
    "/audit.ledger.v1.ComplianceService/RecordFact",
    "/audit.ledger.v1.ComplianceService/CheckSender",
];
const AUDITOR_METHODS: &[&str] = &[
    "/audit.ledger.v1.LedgerService/GetEntry",
    "/audit.ledger.v1.LedgerService/ListEntries",
    "/audit.ledger.v1.LedgerService/GetCheckpoint",
    "/audit.ledger.v1.LedgerService/GetInclusionProof",
    "/audit.ledger.v1.LedgerService/GetConsistencyProof",
    "/audit.ledger.v1.ComplianceService/CheckSender",
    "/audit.ledger.v1.ComplianceService/ListViolations",
    "/audit.ledger.v1.ComplianceService/ListCommunications",
];
/// Paths anyone may call: health checks and reflection.
const OPEN_PREFIXES: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection."];

/// Whether a path is open to everyone.
pub fn is_open(path: &str) -> bool {
    OPEN_PREFIXES.iter().any(|prefix| path.starts_with(prefix))
}

impl Role {
    /// Every role, least powerful first.
    pub const ALL: [Role; 4] = [Role::Writer, Role::Registrar, Role::Auditor, Role::Admin];

    pub fn allows(self, path: &str) -> bool {
        match self {
            Role::Admin => true,
            Role::Writer => WRITER_METHODS.contains(&path),
            Role::Registrar => REGISTRAR_METHODS.contains(&path),
            Role::Auditor => AUDITOR_METHODS.contains(&path),
        }
    }

    /// The roles that may call `path`, for a refusal that says what is needed (admin, at
    /// least, may call anything).
    pub fn allowing(path: &str) -> Vec<Role> {
        Role::ALL
            .into_iter()
            .filter(|role| role.allows(path))
            .collect()
    }

    /// Reads and queries by this role go to the access log.
    pub fn is_audited(self) -> bool {
        matches!(self, Role::Auditor | Role::Admin)
    }
}

/// One entry of the auth file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalEntry {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// Hex SHA-256 of the DER client certificate (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_sha256: Option<String>,
    /// Sender ids a writer may submit communications for; empty means any. Writers only:
    /// no other role's rights are bounded by sender, so a binding there would only look
    /// like one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub senders: Vec<String>,
}

/// Why `senders` is refused on a principal of `role`, if it is.
fn senders_refused(role: Role, senders: &[String]) -> Option<String> {
    (role != Role::Writer && !senders.is_empty())
        .then(|| format!("senders binds writers only (a {role} is not bounded by sender)"))
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    principals: Vec<PrincipalEntry>,
}

/// An authenticated caller, attached to each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub senders: Vec<String>,
}

impl Principal {
    /// The name recorded as `LeafRecord.submitted_by`: empty without authentication.
    pub fn name_of(principal: Option<&Principal>) -> &str {
        principal.map_or("", |principal| principal.name.as_str())
    }

    /// Whether this principal may submit communications for `sender_id`.
    pub fn may_send_as(&self, sender_id: &str) -> bool {
        self.senders.is_empty() || self.senders.iter().any(|s| s == sender_id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        /// Said in the message, so not a `source()` (the chain would say it twice).
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Why a request was not authenticated. Deliberately vague towards the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    Missing,
    Malformed,
    Unknown,
}

struct Credential {
    token: Option<[u8; 32]>,
    certificate: Option<[u8; 32]>,
    principal: Principal,
}

/// Checks credentials against the auth file's principals.
pub struct Authenticator {
    credentials: Vec<Credential>,
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a token or certificate, as the auth file stores it.
pub fn digest_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn read_file(path: &Path) -> Result<AuthFile, AuthError> {
    let text = fs::read_to_string(path).map_err(|error| AuthError::Io {
        path: path.to_owned(),
        error,
    })?;
    toml::from_str(&text).map_err(|error| AuthError::Invalid {
        path: path.to_owned(),
        message: error.to_string(),
    })
}

impl Authenticator {
    pub fn load(path: &Path) -> Result<Authenticator, AuthError> {
        let file = read_file(path)?;
        let invalid = |message: String| AuthError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut credentials = Vec::new();
        let mut names = std::collections::HashSet::new();
        for entry in file.principals {
            if entry.name.is_empty() || entry.name.chars().any(char::is_control) {
                return Err(invalid(format!(
                    "principal name {:?} is not valid",
                    entry.name
                )));
            }
            if !names.insert(entry.name.clone()) {
                return Err(invalid(format!("principal {:?} appears twice", entry.name)));
            }
            let digest = |field: &Option<String>, what: &str| match field {
                Some(text) => parse_digest(text)
                    .map(Some)
                    .ok_or_else(|| invalid(format!("{}: {what} is not 64 hex digits", entry.name))),
                None => Ok(None),
            };
            let token = digest(&entry.token_sha256, "token_sha256")?;
            let certificate = digest(&entry.client_cert_sha256, "client_cert_sha256")?;
            if token.is_none() && certificate.is_none() {
                return Err(invalid(format!(
                    "{}: no token_sha256 or client_cert_sha256",
                    entry.name
                )));
            }
            if let Some(reason) = senders_refused(entry.role, &entry.senders) {
                return Err(invalid(format!("{}: {reason}", entry.name)));
            }
            credentials.push(Credential {
                token,
                certificate,
                principal: Principal {
                    name: entry.name,
                    role: entry.role,
                    senders: entry.senders,
                },
            });
        }
        Ok(Authenticator { credentials })
    }

    /// The principal a request speaks for: by bearer token (`authorization: Bearer …`), else
    /// by TLS client certificate. Every known credential is compared, in constant time, so
    /// timing does not tell which one (or whether any) nearly matched.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        client_certificate: Option<&[u8]>,
    ) -> Result<&Principal, Rejection> {
        let (presented, use_token) = match (authorization, client_certificate) {
            (Some(header), _) => {
                let text = std::str::from_utf8(header).map_err(|_| Rejection::Malformed)?;
                let token = text
                    .strip_prefix("Bearer ")
                    .or_else(|| text.strip_prefix("bearer "))
                    .ok_or(Rejection::Malformed)?;
                let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
                (digest, true)
            }
            (None, Some(certificate)) => (Sha256::digest(certificate).into(), false),
            (None, None) => return Err(Rejection::Missing),
        };
        let mut found: Option<&Principal> = None;
        for credential in &self.credentials {
            let expected = if use_token {
                credential.token
            } else {
                credential.certificate
            };
            let matched = expected.map_or(0u8, |expected| expected.ct_eq(&presented).unwrap_u8());
            if matched == 1 && found.is_none() {
                found = Some(&credential.principal);
            }
        }
        found.ok_or(Rejection::Unknown)
    }
}

/// Adds a principal with a new random bearer token to the auth file (created 0600 if
/// missing) and returns the token, which is shown once and never stored.
pub fn add_token(
    path: &Path,
    name: &str,
    role: Role,
    senders: Vec<String>,
) -> Result<String, AuthError> {
    let mut file = if path.exists() {
        read_file(path)?
    } else {
        AuthFile::default()
    };
    let invalid = |message: String| AuthError::Invalid {
        path: path.to_owned(),
        message,
    };
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(invalid(format!("principal name {name:?} is not valid")));
    }
    if file.principals.iter().any(|p| p.name == name) {
        return Err(invalid(format!("principal {name:?} exists already")));
    }
    if let Some(reason) = senders_refused(role, &senders) {
        return Err(invalid(format!("--{reason}")));
    }
    let mut secret = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut secret);
    let token = format!("alt_{}", BASE64.encode(secret));
    file.principals.push(PrincipalEntry {
        name: name.to_owned(),
        role,
        token_sha256: Some(digest_hex(token.as_bytes())),
        client_cert_sha256: None,
        senders,
    });
    let text = toml::to_string(&file).map_err(|error| invalid(error.to_string()))?;
    write_private(
        path,
        &format!("# audit-ledger principals: tokens are kept as SHA-256 only.\n{text}"),
    )
    .map_err(|error| AuthError::Io {
        path: path.to_owned(),
        error,
    })?;
    Ok(token)
}

/// Replaces `path` atomically with a file only its owner can read.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_authenticate_their_principal_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        let writer = add_token(&path, "mail", Role::Writer, vec!["contoso".into()]).unwrap();
        let auditor = add_token(&path, "audit", Role::Auditor, vec![]).unwrap();
        assert!(
            add_token(&path, "mail", Role::Admin, vec![]).is_err(),
            "names are unique"
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&writer) && !text.contains(&auditor),
            "tokens are not stored"
        );

        let auth = Authenticator::load(&path).unwrap();
        let bearer = |token: &str| format!("Bearer {token}");
        let principal = auth
            .authenticate(Some(bearer(&writer).as_bytes()), None)
            .unwrap();
        assert_eq!(principal.name, "mail");
        assert!(principal.may_send_as("contoso") && !principal.may_send_as("fabrikam"));
        assert_eq!(
            auth.authenticate(Some(bearer(&auditor).as_bytes()), None)
                .unwrap()
                .role,
            Role::Auditor
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer alt_nope"), None),
            Err(Rejection::Unknown)
        );
        assert_eq!(
            auth.authenticate(Some(b"Basic abc"), None),
            Err(Rejection::Malformed)
        );
        assert_eq!(auth.authenticate(None, None), Err(Rejection::Missing));
        assert_eq!(
            auth.authenticate(None, Some(b"some certificate")),
            Err(Rejection::Unknown)
        );
    }

    #[test]
    fn roles_allow_their_methods() {
        assert!(Role::Writer.allows("/audit.ledger.v1.LedgerService/Append"));
        assert!(!Role::Writer.allows("/audit.ledger.v1.LedgerService/GetEntry"));
        assert!(Role::Auditor.allows("/audit.ledger.v1.LedgerService/GetInclusionProof"));
        assert!(!Role::Auditor.allows("/audit.ledger.v1.LedgerService/AppendBatch"));
        assert!(!Role::Auditor.allows("/audit.ledger.v1.ComplianceService/RecordFact"));
        assert!(Role::Admin.allows("/audit.ledger.v1.ComplianceService/RecordFact"));
        // Facts decide verdicts: recording them is the registrar's right, not a writer's.
        let record_fact = "/audit.ledger.v1.ComplianceService/RecordFact";
        assert!(!Role::Writer.allows(record_fact));
        assert_eq!(Role::allowing(record_fact), [Role::Registrar, Role::Admin]);
        assert!(Role::Registrar.allows("/audit.ledger.v1.ComplianceService/CheckSender"));
        for path in [
            "/audit.ledger.v1.LedgerService/Append",
            "/audit.ledger.v1.LedgerService/AppendBatch",
            "/audit.ledger.v1.LedgerService/GetEntry",
            "/audit.ledger.v1.ComplianceService/ListViolations",
            "/audit.ledger.v1.AccessLogService/ListAccessLog",
        ] {
            assert!(!Role::Registrar.allows(path), "{path}");
        }
        assert_eq!(
            Role::allowing("/audit.ledger.v1.AccessLogService/ListAccessLog"),
            [Role::Admin]
        );
        assert_eq!("registrar".parse::<Role>(), Ok(Role::Registrar));
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(!is_open("/audit.ledger.v1.LedgerService/Append"));
    }

    #[test]
    fn bad_auth_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        // A binding that would bound nothing is refused rather than trusted.
        let bound_registrar = format!(
            "[[principals]]\nname = \"a\"\nrole = \"registrar\"\ntoken_sha256 = \"{}\"\nsenders = [\"x\"]\n",
            "0".repeat(64)
        );
        for (text, reason) in [
            (
                "[[principals]]\nname = \"a\"\nrole = \"writer\"\n",
                "no token_sha256",
            ),
            (
                "[[principals]]\nname = \"a\"\nrole = \"boss\"\ntoken_sha256 = \"00\"\n",
                "unknown variant",
            ),
            (
                "[[principals]]\nname = \"a\"\nrole = \"writer\"\ntoken_sha256 = \"zz\"\n",
                "64 hex",
            ),
            (bound_registrar.as_str(), "senders binds writers only"),
        ] {
            fs::write(&path, text).unwrap();
            let error = Authenticator::load(&path).err().unwrap().to_string();
            assert!(error.contains(reason), "{error}");
        }
    }
}

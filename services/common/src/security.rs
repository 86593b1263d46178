//! How the parts of orly trust each other over gRPC: a shared token every call carries
//! (`authorization: Bearer <token>`) and every service checks, and optional mutual TLS. Both
//! come from the environment (`ORLY_GRPC_AUTH_TOKEN` or `ORLY_GRPC_AUTH_TOKEN_FILE`,
//! `ORLY_GRPC_TLS_CERT` / `_KEY` / `_CA`), so every binary and every client reads them the same
//! way; in Kubernetes the operator sets them from Secrets.

use std::path::PathBuf;
use std::sync::Arc;

use orly_consts::env;

/// Why the security settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{var}: cannot read {path}: {source}")]
    Read {
        var: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is set but empty")]
    Empty(&'static str),
    #[error(
        "mTLS needs all of ORLY_GRPC_TLS_CERT, ORLY_GRPC_TLS_KEY and ORLY_GRPC_TLS_CA; missing: {0}"
    )]
    PartialTls(String),
}

/// PEM material for mutual TLS.
#[derive(Clone)]
pub struct TlsFiles {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles").finish_non_exhaustive()
    }
}

/// The token and TLS settings of this process.
#[derive(Clone, Default)]
pub struct Security {
    token: Option<Arc<str>>,
    tls: Option<TlsFiles>,
    /// Refuse every call (the settings could not be read).
    refuse: bool,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Security {
    /// No token, no TLS (loopback setups and tests).
    pub fn none() -> Self {
        Self::default()
    }

    /// A shared token, no TLS.
    pub fn with_token(token: &str) -> Self {
        Self {
            token: Some(Arc::from(token.trim())),
            ..Self::default()
        }
    }

    /// Accepts no call at all: what a server falls back to when its settings are broken.
    pub fn refuse_all() -> Self {
        Self {
            refuse: true,
            ..Self::default()
        }
    }

    /// Adds mutual TLS.
    pub fn with_tls(mut self, tls: TlsFiles) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The settings from the environment (see the module docs).
    pub fn from_env() -> Result<Self, SecurityError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`Self::from_env`] over any variable lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, SecurityError> {
        let token = match get(env::GRPC_AUTH_TOKEN) {
            Some(t) if t.trim().is_empty() => {
                return Err(SecurityError::Empty(env::GRPC_AUTH_TOKEN))
            }
            Some(t) => Some(t),
            None => match get(env::GRPC_AUTH_TOKEN_FILE) {
                Some(path) => {
                    let t = read(env::GRPC_AUTH_TOKEN_FILE, &path)?;
                    let t = String::from_utf8_lossy(&t).trim().to_string();
                    if t.is_empty() {
                        return Err(SecurityError::Empty(env::GRPC_AUTH_TOKEN_FILE));
                    }
                    Some(t)
                }
                None => None,
            },
        };
        let files = [env::GRPC_TLS_CERT, env::GRPC_TLS_KEY, env::GRPC_TLS_CA]
            .map(|k| (k, get(k).filter(|v| !v.trim().is_empty())));
        let set = files.iter().filter(|(_, v)| v.is_some()).count();
        let tls = match set {
            0 => None,
            3 => {
                let [(kc, c), (kk, k), (ka, a)] = files;
                let (c, k, a) = (
                    c.unwrap_or_default(),
                    k.unwrap_or_default(),
                    a.unwrap_or_default(),
                );
                Some(TlsFiles {
                    cert: read(kc, &c)?,
                    key: read(kk, &k)?,
                    ca: read(ka, &a)?,
                })
            }
            _ => {
                let missing: Vec<&str> = files
                    .iter()
                    .filter(|(_, v)| v.is_none())
                    .map(|(k, _)| *k)
                    .collect();
                return Err(SecurityError::PartialTls(missing.join(", ")));
            }
        };
        Ok(Self {
            token: token.map(|t| Arc::from(t.trim())),
            tls,
            refuse: false,
        })
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The `authorization` value clients send.
    pub fn bearer(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// Does an incoming `authorization` value carry our token? Always true without a token.
    /// Compared in constant time so a caller cannot learn the token byte by byte.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        if self.refuse {
            return false;
        }
        let Some(token) = &self.token else {
            return true;
        };
        let Some(given) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
            return false;
        };
        constant_time_eq(given.trim().as_bytes(), token.as_bytes())
    }
}

/// This process's settings, read from the environment once.
pub fn process() -> Result<&'static Security, &'static SecurityError> {
    static PROCESS: std::sync::OnceLock<Result<Security, SecurityError>> =
        std::sync::OnceLock::new();
    PROCESS.get_or_init(Security::from_env).as_ref()
}

fn read(var: &'static str, path: &str) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        var,
        path: PathBuf::from(path),
        source,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn tokens_come_from_the_variable_or_a_file() {
        let none = Security::from_lookup(lookup(&[])).unwrap();
        assert!(none.token().is_none() && none.accepts(None));
        let s = Security::from_lookup(lookup(&[(env::GRPC_AUTH_TOKEN, " abc ")])).unwrap();
        assert_eq!(s.bearer().as_deref(), Some("Bearer abc"));
        assert!(s.accepts(Some("Bearer abc")));
        assert!(!s.accepts(Some("Bearer abd")));
        assert!(!s.accepts(Some("abc")));
        assert!(!s.accepts(None));
        let dir = std::env::temp_dir().join(format!("orly-token-{}", std::process::id()));
        std::fs::write(&dir, "from-file\n").unwrap();
        let f = Security::from_lookup(lookup(&[(
            env::GRPC_AUTH_TOKEN_FILE,
            dir.to_str().unwrap(),
        )]))
        .unwrap();
        assert_eq!(f.token(), Some("from-file"));
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(
            Security::from_lookup(lookup(&[(env::GRPC_AUTH_TOKEN, "  ")])),
            Err(SecurityError::Empty(_))
        ));
    }

    #[test]
    fn tls_needs_all_three_files() {
        let e = Security::from_lookup(lookup(&[(env::GRPC_TLS_CERT, "/x")])).unwrap_err();
        assert!(e.to_string().contains("ORLY_GRPC_TLS_KEY"), "{e}");
        let e = Security::from_lookup(lookup(&[
            (env::GRPC_TLS_CERT, "/nonexistent/c"),
            (env::GRPC_TLS_KEY, "/nonexistent/k"),
            (env::GRPC_TLS_CA, "/nonexistent/a"),
        ]))
        .unwrap_err();
        assert!(matches!(e, SecurityError::Read { .. }), "{e}");
    }
}

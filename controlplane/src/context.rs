//! CLI contexts, kubectl style: a YAML file of named contexts (server, trust roots, admin
//! credential) with one current. `$TRELLIS_CONFIG` or `~/.trellis/config` by default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One way to reach and authenticate to a control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Context {
    pub name: String,
    /// `host:port` of a control-plane instance.
    pub server: String,
    pub trust_domain: String,
    /// PEM roots of the federation.
    pub ca: String,
    /// PEM admin certificate chain.
    pub cert: String,
    /// PEM admin private key.
    pub key: String,
}

/// The CLI configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ConfigFile {
    #[serde(default)]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

/// Errors reading or writing contexts.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid trellis config: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error(
        "no current context: start a control plane (it writes <data-dir>/admin/context.yaml), then `trellis config import <file>`, or run `trellis demo`"
    )]
    NoCurrent,
    #[error("context '{0}' does not exist; `trellis config get-contexts` lists them")]
    Unknown(String),
}

/// The default path of the CLI configuration.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TRELLIS_CONFIG") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".trellis").join("config")
}

impl ConfigFile {
    /// Loads a file; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self, ContextError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_saphyr::from_str(&text)
                .map_err(|e| ContextError::Parse { path: path.to_path_buf(), reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ContextError::Read { path: path.to_path_buf(), source }),
        }
    }

    /// Writes the file atomically with owner-only permissions (it holds a private key).
    pub fn save(&self, path: &Path) -> Result<(), ContextError> {
        let text = serde_saphyr::to_string(self)
            .map_err(|e| ContextError::Parse { path: path.to_path_buf(), reason: e.to_string() })?;
        write_private(path, text.as_bytes()).map_err(|source| ContextError::Write { path: path.to_path_buf(), source })
    }

    /// The current context.
    pub fn current(&self) -> Result<&Context, ContextError> {
        let name = self.current_context.as_deref().ok_or(ContextError::NoCurrent)?;
        self.get(name)
    }

    /// A context by name.
    pub fn get(&self, name: &str) -> Result<&Context, ContextError> {
        self.contexts.iter().find(|c| c.name == name).ok_or_else(|| ContextError::Unknown(name.to_string()))
    }

    /// Adds or replaces a context by name.
    pub fn upsert(&mut self, ctx: Context) {
        self.contexts.retain(|c| c.name != ctx.name);
        self.contexts.push(ctx);
    }
}

/// Writes a file atomically (temp + rename), readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_current() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        let mut cfg = ConfigFile::load(&path).unwrap();
        assert!(matches!(cfg.current(), Err(ContextError::NoCurrent)));
        cfg.upsert(Context {
            name: "a".into(),
            server: "127.0.0.1:1".into(),
            trust_domain: "trellis.local".into(),
            ca: "-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n".into(),
            cert: "c".into(),
            key: "k".into(),
        });
        cfg.current_context = Some("a".into());
        cfg.save(&path).unwrap();
        let back = ConfigFile::load(&path).unwrap();
        assert_eq!(back, cfg);
        std::fs::write(&path, "contexts: [1, 2").unwrap();
        assert!(matches!(ConfigFile::load(&path), Err(ContextError::Parse { .. })));
    }
}

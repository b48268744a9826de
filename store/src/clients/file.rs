//! The client registry as a YAML file (the default).
//!
//! `gateway clients ...` writes the file (to a temporary file, then an atomic rename); a
//! running gateway notices the change within a second (it compares the file's modification
//! time and size at most once a second) and reloads it. A file that does not parse is
//! refused: the previous content keeps serving and a warning is logged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{ClientApplication, ClientRegistry, ImmediateRegistry, RegistryError};
use crate::Digest;

const RECHECK: Duration = Duration::from_secs(1);

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileContent {
    #[serde(default)]
    applications: Vec<ClientApplication>,
}

type Apps = HashMap<String, Arc<ClientApplication>>;

type Stamp = Option<(SystemTime, u64)>;

/// The registry as requests read it. A lookup takes no lock and no reference count on the
/// content: it is an [`ArcSwap`] (whose `load` takes none) and the time of the next comparison
/// with the file an atomic that a lookup only reads. Behind a `RwLock` holding an `Arc`, both
/// runtime workers wrote the lock word and the count on every grant, two cache lines passed
/// between the vCPUs per request. (The application returned is an `Arc` clone: its count is the
/// one shared write left.) Reloads and writes go one at a time through `file`.
pub struct FileRegistry {
    path: Option<PathBuf>,
    apps: ArcSwap<Apps>,
    /// When the file is next compared with what was read, in nanoseconds since `epoch`.
    next_check: AtomicU64,
    epoch: Instant,
    /// The stamp of the file as last read or written; its lock orders reloads and writes.
    file: Mutex<Stamp>,
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn read(path: &Path) -> Result<Apps, RegistryError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Apps::new()),
        Err(e) => {
            return Err(RegistryError::Unavailable(format!(
                "{}: {e}",
                path.display()
            )));
        }
    };
    let content: FileContent = if text.trim().is_empty() {
        FileContent::default()
    } else {
        serde_yaml::from_str(&text)
            .map_err(|e| RegistryError::Invalid(format!("{}: {e}", path.display())))?
    };
    let mut apps = Apps::new();
    for a in content.applications {
        if apps.contains_key(&a.client_id) {
            return Err(RegistryError::Invalid(format!(
                "{}: client id {:?} appears twice",
                path.display(),
                a.client_id
            )));
        }
        apps.insert(a.client_id.clone(), Arc::new(a));
    }
    Ok(apps)
}

impl FileRegistry {
    /// Opens the registry at `path`. A missing file is an empty registry (it is created by the
    /// first `gateway clients add`); a file that does not parse is an error.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let apps = read(path)?;
        Ok(Self::new(Some(path.to_owned()), apps, stamp(path)))
    }

    /// A registry with no file behind it (for `gateway check` and tests).
    pub fn in_memory() -> Self {
        Self::new(None, Apps::new(), None)
    }

    fn new(path: Option<PathBuf>, apps: Apps, stamp: Stamp) -> Self {
        let registry = FileRegistry {
            path,
            apps: ArcSwap::from_pointee(apps),
            next_check: AtomicU64::new(0),
            epoch: Instant::now(),
            file: Mutex::new(stamp),
        };
        registry.checked_now();
        registry
    }

    fn since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The file was compared or written just now: the next comparison is [`RECHECK`] away.
    fn checked_now(&self) {
        let next = self.since_epoch().saturating_add(RECHECK.as_nanos() as u64);
        self.next_check.store(next, Ordering::Relaxed);
    }

    /// Whether the file is due to be compared again ([`RECHECK`] since the last time).
    fn recheck_due(&self) -> bool {
        self.since_epoch() >= self.next_check.load(Ordering::Relaxed)
    }

    /// The writers' lock. No code panics while holding it with the registry half-changed (the
    /// content is replaced in one store), so a poisoned lock is taken as it stands.
    fn file(&self) -> MutexGuard<'_, Stamp> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reloads the file if it changed and its recheck is due (at most once per [`RECHECK`]).
    fn refresh(&self) {
        let Some(path) = &self.path else {
            return;
        };
        if !self.recheck_due() {
            return;
        }
        let mut stamp_read = self.file();
        // Another caller may have compared while this one waited for the lock.
        if !self.recheck_due() {
            return;
        }
        self.checked_now();
        let now = stamp(path);
        if now != *stamp_read {
            match read(path) {
                Ok(apps) => {
                    tracing::info!(path = %path.display(), clients = apps.len(), "client registry reloaded");
                    self.apps.store(Arc::new(apps));
                    *stamp_read = now;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "client registry not reloaded; previous content kept")
                }
            }
        }
    }

    fn current(&self) -> arc_swap::Guard<Arc<Apps>> {
        self.refresh();
        self.apps.load()
    }

    /// Makes the next lookup compare the file (tests: as if [`RECHECK`] had passed).
    #[cfg(test)]
    fn make_recheck_due(&self) {
        self.next_check.store(0, Ordering::Relaxed);
    }

    /// Applies `change` to the latest content of the file and writes it back atomically.
    fn modify(
        &self,
        change: impl FnOnce(&mut Vec<ClientApplication>) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut stamp_written = self.file();
        let mut list: Vec<ClientApplication> = match &self.path {
            Some(p) => read(p)?.into_values().map(|a| (*a).clone()).collect(),
            None => self.apps.load().values().map(|a| (**a).clone()).collect(),
        };
        list.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.client_id.cmp(&b.client_id))
        });
        change(&mut list)?;
        if let Some(path) = &self.path {
            let content = FileContent {
                applications: list.clone(),
            };
            let text = format!(
                "# Client application registry, written by `gateway clients`.\n# Secrets are stored as SHA-256 digests only.\n{}",
                serde_yaml::to_string(&content)
                    .map_err(|e| RegistryError::Invalid(e.to_string()))?
            );
            let tmp = path.with_extension("yaml.tmp");
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| RegistryError::Unavailable(format!("{}: {e}", dir.display())))?;
            }
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| RegistryError::Unavailable(format!("{}: {e}", path.display())))?;
            *stamp_written = stamp(path);
        }
        self.apps.store(Arc::new(
            list.into_iter()
                .map(|a| (a.client_id.clone(), Arc::new(a)))
                .collect(),
        ));
        self.checked_now();
        Ok(())
    }
}

#[async_trait]
impl ClientRegistry for FileRegistry {
    async fn get(&self, client_id: &str) -> Result<Option<Arc<ClientApplication>>, RegistryError> {
        self.get_now(client_id)
    }

    async fn list(&self) -> Result<Vec<ClientApplication>, RegistryError> {
        let mut v: Vec<ClientApplication> =
            self.current().values().map(|a| (**a).clone()).collect();
        v.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.client_id.cmp(&b.client_id))
        });
        Ok(v)
    }

    async fn add(&self, app: ClientApplication) -> Result<(), RegistryError> {
        self.modify(|list| {
            if list.iter().any(|a| a.client_id == app.client_id) {
                return Err(RegistryError::Invalid(format!(
                    "client id {:?} exists",
                    app.client_id
                )));
            }
            list.push(app);
            Ok(())
        })
    }

    async fn set_enabled(&self, client_id: &str, enabled: bool) -> Result<(), RegistryError> {
        self.modify(|list| {
            let a = list
                .iter_mut()
                .find(|a| a.client_id == client_id)
                .ok_or_else(|| RegistryError::NotFound(client_id.to_owned()))?;
            a.enabled = enabled;
            Ok(())
        })
    }

    async fn set_secret(&self, client_id: &str, digest: Digest) -> Result<(), RegistryError> {
        self.modify(|list| {
            let a = list
                .iter_mut()
                .find(|a| a.client_id == client_id)
                .ok_or_else(|| RegistryError::NotFound(client_id.to_owned()))?;
            a.secret_digest = digest;
            Ok(())
        })
    }

    fn immediate(&self) -> Option<&dyn ImmediateRegistry> {
        Some(self)
    }
}

impl ImmediateRegistry for FileRegistry {
    fn get_now(&self, client_id: &str) -> Result<Option<Arc<ClientApplication>>, RegistryError> {
        Ok(self.current().get(client_id).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::{generate_client_id, generate_secret};

    fn app(secret: &str) -> ClientApplication {
        ClientApplication {
            client_id: generate_client_id(),
            name: "billing".into(),
            secret_digest: Digest::of(secret),
            enabled: true,
            scopes: vec!["read".into(), "write".into()],
            grant_types: vec!["refresh_token".into()],
            created_at: 1,
        }
    }

    #[tokio::test]
    async fn add_write_reopen_and_see_changes_from_another_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.yaml");
        let gateway = FileRegistry::open(&path).unwrap();
        assert!(gateway.list().await.unwrap().is_empty());

        let secret = generate_secret();
        let a = app(&secret);
        // Another process (the CLI) writes the file.
        let cli = FileRegistry::open(&path).unwrap();
        cli.add(a.clone()).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&secret),
            "the secret itself must never be written"
        );
        assert!(text.contains(&format!("sha256:{}", Digest::of(&secret).to_hex())));

        // The gateway sees it once its recheck interval has passed.
        gateway.make_recheck_due();
        let got = gateway
            .get(&a.client_id)
            .await
            .unwrap()
            .expect("client visible");
        assert!(got.verify_secret(&secret));
        assert!(!got.verify_secret("wrong"));

        cli.set_enabled(&a.client_id, false).await.unwrap();
        gateway.make_recheck_due();
        assert!(!gateway.get(&a.client_id).await.unwrap().unwrap().enabled);

        assert!(matches!(
            cli.set_enabled("nope", true).await,
            Err(RegistryError::NotFound(_))
        ));
        assert!(
            cli.add(a.clone()).await.is_err(),
            "duplicate ids are refused"
        );
    }

    #[tokio::test]
    async fn a_broken_file_keeps_the_previous_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.yaml");
        let r = FileRegistry::open(&path).unwrap();
        let a = app("s");
        r.add(a.clone()).await.unwrap();
        std::fs::write(&path, "applications: [ {client_id: x, unknown_key: 1} ]\n").unwrap();
        r.make_recheck_due();
        assert!(r.get(&a.client_id).await.unwrap().is_some());
        assert!(
            FileRegistry::open(&path).is_err(),
            "opening a broken file is an error"
        );
    }

    #[test]
    fn generated_secrets_are_long_and_distinct() {
        let a = generate_secret();
        let b = generate_secret();
        assert_eq!(a.len(), 48);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}

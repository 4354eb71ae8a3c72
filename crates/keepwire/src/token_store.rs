//! Where a home's token is kept: the desktop keyring (the Secret Service,
//! see [`crate::keyring`]) when one is available, or the home's database
//! (`HOME/client.db`, mode 0600) as before. `keepwire login --token-store`
//! chooses; `keepwire status` says which.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use keepwire_client::store::Store;
use keepwire_client::{BoxFuture, ClientBuilder, TokenProvider};

use crate::keyring::{Keyring, Unavailable};

/// The store key saying the token is in the keyring (absent: in the database).
const WHERE_META: &str = "token_store";

/// `keepwire login --token-store`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// The keyring if the session has one, else the file.
    #[default]
    Auto,
    /// The desktop keyring (Secret Service); an error if there is none.
    Keyring,
    /// The home's database file (mode 0600).
    File,
}

/// Where a home's token is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Location {
    /// The desktop keyring.
    Keyring,
    /// This file (the home's database).
    File(PathBuf),
}

impl Location {
    /// For `status --json`: `keyring` or the file's path.
    pub(crate) fn json(&self) -> String {
        match self {
            Location::Keyring => "keyring".into(),
            Location::File(p) => p.display().to_string(),
        }
    }

    /// In words.
    pub(crate) fn words(&self) -> String {
        match self {
            Location::Keyring => "in the desktop keyring (Secret Service)".into(),
            Location::File(p) => format!("in {} (mode 0600)", p.display()),
        }
    }
}

/// Where `home`'s token is kept.
pub(crate) fn location(store: &Store, home: &Path) -> anyhow::Result<Location> {
    Ok(match store.meta(WHERE_META)?.as_deref() {
        Some("keyring") => Location::Keyring,
        _ => Location::File(keepwire_client::Home::new(home).database()),
    })
}

/// Saves a login's relay URLs and token, the token where `mode` says;
/// returns where it went. `auto` falls back to the file when there is no
/// keyring (quietly) or the keyring fails (saying so on stderr).
pub(crate) async fn save(
    store: &Store,
    home: &Path,
    servers: &[String],
    token: &str,
    mode: Mode,
) -> anyhow::Result<Location> {
    let kept = match mode {
        Mode::File => None,
        Mode::Keyring => {
            Some(keep_in_keyring(home, token).await.map_err(|e| {
                anyhow::anyhow!("cannot keep the token in the desktop keyring: {e:#}")
            })?)
        }
        Mode::Auto => match keep_in_keyring(home, token).await {
            Ok(()) => Some(()),
            Err(e) if e.downcast_ref::<Unavailable>().is_some() => {
                tracing::info!(target: "keepwire::client", reason = %e, "no desktop keyring: the token goes to the home's file");
                None
            }
            Err(e) => {
                eprintln!(
                    "warning: the desktop keyring failed ({e:#}); the token is kept in the home's file instead"
                );
                None
            }
        },
    };
    match kept {
        Some(()) => {
            store.save_urls(servers)?;
            store.forget_token()?;
            store.set_meta(WHERE_META, "keyring")?;
            Ok(Location::Keyring)
        }
        None => {
            let before = location(store, home)?;
            store.save_login(servers, token)?;
            store.set_meta(WHERE_META, "file")?;
            if before == Location::Keyring {
                forget_in_keyring(home).await;
            }
            location(store, home)
        }
    }
}

async fn keep_in_keyring(home: &Path, token: &str) -> anyhow::Result<()> {
    Keyring::open().await?.set(home, token).await
}

/// Removes a token an earlier login kept in the keyring (best effort: a
/// stale item there is harmless, the home no longer points to it).
async fn forget_in_keyring(home: &Path) {
    let r = async { Keyring::open().await?.delete(home).await }.await;
    if let Err(e) = r {
        tracing::info!(target: "keepwire::client", error = %e, "could not remove the token kept in the keyring before");
    }
}

/// Hands `builder` the token from the keyring when `home` keeps it there
/// (and a provider that reads it again when the relay refuses the current
/// one); a home that keeps it in its file needs nothing.
pub(crate) async fn apply(
    builder: ClientBuilder,
    store: &Store,
    home: &Path,
) -> anyhow::Result<ClientBuilder> {
    if location(store, home)? != Location::Keyring {
        return Ok(builder);
    }
    let token = read_keyring(home).await?;
    Ok(builder
        .token(token.clone())
        .token_kept_elsewhere()
        .token_provider(Arc::new(KeyringToken {
            home: home.to_owned(),
            current: Mutex::new(token),
        })))
}

/// The home's token from the keyring, or a message saying what to do.
async fn read_keyring(home: &Path) -> anyhow::Result<String> {
    let fix = "unlock the keyring, or log in again (`keepwire login --token-store file` keeps the token in the home's file)";
    let keyring = Keyring::open().await.map_err(|e| {
        anyhow::anyhow!(
            "the token of {} is in the desktop keyring, which cannot be reached ({e:#}); {fix}",
            home.display()
        )
    })?;
    match keyring.get(home).await {
        Ok(Some(t)) => Ok(t),
        Ok(None) => anyhow::bail!(
            "the desktop keyring holds no token for {}; run `keepwire login --server URL --token-file FILE` again",
            home.display()
        ),
        Err(e) => anyhow::bail!("cannot read the token from the desktop keyring ({e:#}); {fix}"),
    }
}

/// Fresh tokens from the keyring: one saved there since (another login).
struct KeyringToken {
    home: PathBuf,
    current: Mutex<String>,
}

impl TokenProvider for KeyringToken {
    fn refresh(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let saved = Keyring::open().await.ok()?.get(&self.home).await.ok()??;
            let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if *cur == saved {
                return None;
            }
            *cur = saved.clone();
            Some(saved)
        })
    }
}

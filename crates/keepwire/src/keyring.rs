//! The desktop keyring: the small part of the freedesktop Secret Service API
//! (D-Bus `org.freedesktop.secrets` on the session bus, served by
//! gnome-keyring, KeePassXC, KWallet 6...) that keeps one token per home.
//!
//! Spoken directly over zbus: the Secret Service crates (`secret-service`,
//! `oo7`) are built on zbus 5, which would link a second D-Bus stack beside
//! the zbus 6 of desktop notifications. A session uses the `plain`
//! algorithm: the secret crosses the session bus unencrypted, a bus only
//! the user's own processes can connect to (the same trust as the 0600
//! file it replaces).
//!
//! One item per home, found by its attributes (`application` = `keepwire`,
//! `keepwire-home` = the home's absolute path), in the default collection.
//! A locked item or collection is unlocked through the service's prompt
//! (the desktop asks the user for the keyring's password).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use zbus::{ObjectPath, OwnedObjectPath, OwnedVariant, Variant};

const SERVICE: &str = "org.freedesktop.secrets";
const SERVICE_PATH: &str = "/org/freedesktop/secrets";
const SERVICE_IFACE: &str = "org.freedesktop.Secret.Service";
const COLLECTION_IFACE: &str = "org.freedesktop.Secret.Collection";
const ITEM_IFACE: &str = "org.freedesktop.Secret.Item";
const PROMPT_IFACE: &str = "org.freedesktop.Secret.Prompt";

/// How long one exchange with the keyring may take (connecting, a call).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the user has to answer the keyring's unlock prompt.
const PROMPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest token read back from a keyring (a relay token is far shorter).
const MAX_SECRET: usize = 16 * 1024;

/// A secret on the wire: (session, parameters, value, content type).
type Secret = (OwnedObjectPath, Vec<u8>, Vec<u8>, String);

/// An open session with the user's Secret Service.
pub(crate) struct Keyring {
    conn: zbus::Connection,
    session: OwnedObjectPath,
}

/// The keyring could not be reached at all (no session bus, no Secret
/// Service on it), as opposed to a keyring that failed.
#[derive(Debug)]
pub(crate) struct Unavailable(String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Runs one D-Bus exchange with [`CALL_TIMEOUT`].
async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = zbus::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.with_context(|| format!("the keyring's {what} failed")),
        Err(_) => bail!("the keyring did not answer {what} within {CALL_TIMEOUT:?}"),
    }
}

/// The attributes naming a home's item.
fn attributes(home: &Path) -> HashMap<&'static str, String> {
    let home = std::path::absolute(home).unwrap_or_else(|_| home.to_owned());
    HashMap::from([
        ("application", "keepwire".to_owned()),
        ("keepwire-home", home.display().to_string()),
    ])
}

fn is_none(p: &ObjectPath<'_>) -> bool {
    p.as_str() == "/"
}

impl Keyring {
    /// Connects to the session bus's Secret Service and opens a session.
    /// [`Unavailable`] when there is no session bus or no Secret Service.
    pub(crate) async fn open() -> anyhow::Result<Keyring> {
        let conn = match tokio::time::timeout(CALL_TIMEOUT, zbus::Connection::session()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(Unavailable(format!("no session bus ({e})")).into()),
            Err(_) => return Err(Unavailable("the session bus did not answer".into()).into()),
        };
        let service = zbus::fdo::DBusProxy::new(&conn).await?;
        let name = zbus::names::BusName::try_from(SERVICE)?;
        let present = timed("name lookup", async {
            let owned = service.name_has_owner(name.clone()).await?;
            let activatable = service.list_activatable_names().await?;
            Ok(owned || activatable.iter().any(|n| n.as_str() == SERVICE))
        })
        .await?;
        if !present {
            return Err(
                Unavailable(format!("no Secret Service ({SERVICE}) on the session bus")).into(),
            );
        }
        let proxy = proxy(&conn, SERVICE_PATH, SERVICE_IFACE).await?;
        let (_, session): (OwnedVariant, OwnedObjectPath) = timed(
            "OpenSession",
            proxy.call("OpenSession", &("plain", Variant::new(""))),
        )
        .await?;
        Ok(Keyring { conn, session })
    }

    /// The token kept for `home`, if any.
    pub(crate) async fn get(&self, home: &Path) -> anyhow::Result<Option<String>> {
        let Some(item) = self.find(home).await? else {
            return Ok(None);
        };
        let proxy = proxy(&self.conn, item.as_str(), ITEM_IFACE).await?;
        let (secret,): (Secret,) =
            timed("GetSecret", proxy.call("GetSecret", &(&self.session,))).await?;
        if secret.2.len() > MAX_SECRET {
            bail!("the keyring's secret for this home is longer than {MAX_SECRET} bytes");
        }
        let token = String::from_utf8(secret.2).context("the keyring's secret is not text")?;
        Ok(Some(token))
    }

    /// Keeps `token` for `home`, replacing any earlier one.
    pub(crate) async fn set(&self, home: &Path, token: &str) -> anyhow::Result<()> {
        let collection = self.default_collection().await?;
        let props: HashMap<&str, Variant<'_>> = HashMap::from([
            (
                "org.freedesktop.Secret.Item.Label",
                Variant::new(format!("keepwire token for {}", home.display())),
            ),
            (
                "org.freedesktop.Secret.Item.Attributes",
                Variant::from(attributes(home)),
            ),
        ]);
        let secret: Secret = (
            self.session.clone(),
            Vec::new(),
            token.as_bytes().to_vec(),
            "text/plain".into(),
        );
        let proxy = proxy(&self.conn, collection.as_str(), COLLECTION_IFACE).await?;
        let (item, prompt): (OwnedObjectPath, OwnedObjectPath) = timed(
            "CreateItem",
            proxy.call("CreateItem", &(props, secret, true)),
        )
        .await?;
        if is_none(&item) {
            self.prompt(&prompt).await?;
        }
        Ok(())
    }

    /// Removes the token kept for `home` (nothing if there is none).
    pub(crate) async fn delete(&self, home: &Path) -> anyhow::Result<()> {
        let Some(item) = self.find(home).await? else {
            return Ok(());
        };
        let proxy = proxy(&self.conn, item.as_str(), ITEM_IFACE).await?;
        let prompt: OwnedObjectPath = timed("Delete", proxy.call("Delete", &())).await?;
        if !is_none(&prompt) {
            self.prompt(&prompt).await?;
        }
        Ok(())
    }

    /// The home's item, unlocked.
    async fn find(&self, home: &Path) -> anyhow::Result<Option<OwnedObjectPath>> {
        let proxy = proxy(&self.conn, SERVICE_PATH, SERVICE_IFACE).await?;
        let (unlocked, locked): (Vec<OwnedObjectPath>, Vec<OwnedObjectPath>) = timed(
            "SearchItems",
            proxy.call("SearchItems", &(attributes(home),)),
        )
        .await?;
        if let Some(item) = unlocked.into_iter().next() {
            return Ok(Some(item));
        }
        let Some(item) = locked.into_iter().next() else {
            return Ok(None);
        };
        self.unlock(&item).await?;
        Ok(Some(item))
    }

    /// The default collection ("login" on most desktops), unlocked.
    async fn default_collection(&self) -> anyhow::Result<OwnedObjectPath> {
        let service = proxy(&self.conn, SERVICE_PATH, SERVICE_IFACE).await?;
        let path: OwnedObjectPath =
            timed("ReadAlias", service.call("ReadAlias", &("default",))).await?;
        if is_none(&path) {
            bail!(
                "the keyring has no default collection (create one, e.g. by logging in to the desktop)"
            );
        }
        let coll = proxy(&self.conn, path.as_str(), COLLECTION_IFACE).await?;
        let locked: bool = timed("Locked", coll.get_property::<bool>("Locked"))
            .await
            .unwrap_or(false);
        if locked {
            self.unlock(&path).await?;
        }
        Ok(path)
    }

    /// Unlocks an item or collection, prompting the user if the service asks.
    async fn unlock(&self, object: &OwnedObjectPath) -> anyhow::Result<()> {
        let proxy = proxy(&self.conn, SERVICE_PATH, SERVICE_IFACE).await?;
        let (_, prompt): (Vec<OwnedObjectPath>, OwnedObjectPath) =
            timed("Unlock", proxy.call("Unlock", &(vec![object],))).await?;
        if !is_none(&prompt) {
            self.prompt(&prompt).await?;
        }
        Ok(())
    }

    /// Runs a prompt and waits for the user's answer.
    async fn prompt(&self, path: &OwnedObjectPath) -> anyhow::Result<()> {
        let proxy = proxy(&self.conn, path.as_str(), PROMPT_IFACE).await?;
        let mut completed = timed("prompt", proxy.receive_signal("Completed")).await?;
        timed("Prompt", proxy.call::<_, _, ()>("Prompt", &("",))).await?;
        let msg = tokio::time::timeout(PROMPT_TIMEOUT, completed.next())
            .await
            .context("nobody answered the keyring's unlock prompt")?
            .context("the keyring went away during its prompt")?;
        let (dismissed, _): (bool, OwnedVariant) = msg.body().deserialize()?;
        if dismissed {
            bail!("the keyring's unlock prompt was dismissed");
        }
        Ok(())
    }
}

/// An uncached proxy on the Secret Service.
async fn proxy(
    conn: &zbus::Connection,
    path: &str,
    iface: &'static str,
) -> anyhow::Result<zbus::Proxy<'static>> {
    Ok(zbus::proxy::Builder::<zbus::Proxy<'static>>::new(conn)
        .destination(SERVICE)
        .path(path.to_owned())
        .interface(iface)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?)
}

//! The token in the desktop keyring: a mock Secret Service
//! (`org.freedesktop.secrets`, the part keepwire uses) served with zbus on a
//! private session bus, and the 0600 file when there is no keyring.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use keepwire_testkit::{RelayProcess, TempDir};
use serde_json::Value;
use zbus::object_server::ObjectServer;
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use crate::desktop::Bus;
use crate::{FAST, add_user, bin};

const COLLECTION: &str = "/org/freedesktop/secrets/collection/login";
const SESSION: &str = "/org/freedesktop/secrets/session/1";

/// A secret on the wire: (session, parameters, value, content type).
type Secret = (OwnedObjectPath, Vec<u8>, Vec<u8>, String);

#[derive(Clone, Debug)]
struct Item {
    path: String,
    attributes: HashMap<String, String>,
    secret: Vec<u8>,
}

/// What the mock keyring holds, and the algorithms sessions asked for.
#[derive(Default)]
struct Vault {
    items: Vec<Item>,
    next: u32,
    algorithms: Vec<String>,
}

type Shared = Arc<Mutex<Vault>>;

fn path(p: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(p).unwrap()
}

struct MockService(Shared);

#[zbus::interface(name = "org.freedesktop.Secret.Service")]
impl MockService {
    fn open_session(
        &self,
        algorithm: String,
        _input: OwnedVariant,
    ) -> zbus::fdo::Result<(OwnedVariant, OwnedObjectPath)> {
        self.0.lock().unwrap().algorithms.push(algorithm.clone());
        if algorithm != "plain" {
            return Err(zbus::fdo::Error::NotSupported(algorithm));
        }
        Ok((Variant::new("").try_to_owned().unwrap(), path(SESSION)))
    }

    fn search_items(
        &self,
        attributes: HashMap<String, String>,
    ) -> (Vec<OwnedObjectPath>, Vec<OwnedObjectPath>) {
        let v = self.0.lock().unwrap();
        let found = v
            .items
            .iter()
            .filter(|i| {
                attributes
                    .iter()
                    .all(|(k, x)| i.attributes.get(k) == Some(x))
            })
            .map(|i| path(&i.path))
            .collect();
        (found, vec![])
    }

    fn read_alias(&self, name: String) -> OwnedObjectPath {
        path(if name == "default" { COLLECTION } else { "/" })
    }

    fn unlock(&self, objects: Vec<OwnedObjectPath>) -> (Vec<OwnedObjectPath>, OwnedObjectPath) {
        (objects, path("/"))
    }
}

struct MockCollection(Shared);

#[zbus::interface(name = "org.freedesktop.Secret.Collection")]
impl MockCollection {
    async fn create_item(
        &self,
        #[zbus(object_server)] server: &ObjectServer,
        properties: HashMap<String, OwnedVariant>,
        secret: Secret,
        replace: bool,
    ) -> zbus::fdo::Result<(OwnedObjectPath, OwnedObjectPath)> {
        let attributes = properties
            .get("org.freedesktop.Secret.Item.Attributes")
            .ok_or_else(|| zbus::fdo::Error::InvalidArgs("no attributes".into()))?
            .try_clone()
            .map_err(zbus::fdo::Error::from)
            .and_then(|v| HashMap::<String, String>::try_from(v).map_err(zbus::fdo::Error::from))?;
        if secret.0.as_str() != SESSION {
            return Err(zbus::fdo::Error::InvalidArgs("unknown session".into()));
        }
        let item_path = {
            let mut v = self.0.lock().unwrap();
            match v.items.iter_mut().find(|i| i.attributes == attributes) {
                Some(i) if replace => {
                    i.secret = secret.2;
                    return Ok((path(&i.path), path("/")));
                }
                _ => {
                    v.next += 1;
                    let p = format!("{COLLECTION}/{}", v.next);
                    v.items.push(Item {
                        path: p.clone(),
                        attributes,
                        secret: secret.2,
                    });
                    p
                }
            }
        };
        server
            .at(
                item_path.as_str(),
                MockItem(self.0.clone(), item_path.clone()),
            )
            .await?;
        Ok((path(&item_path), path("/")))
    }

    #[zbus(property)]
    fn locked(&self) -> bool {
        false
    }
}

struct MockItem(Shared, String);

#[zbus::interface(name = "org.freedesktop.Secret.Item")]
impl MockItem {
    fn get_secret(&self, session: OwnedObjectPath) -> zbus::fdo::Result<(Secret,)> {
        let v = self.0.lock().unwrap();
        let item = v
            .items
            .iter()
            .find(|i| i.path == self.1)
            .ok_or_else(|| zbus::fdo::Error::UnknownObject(self.1.clone()))?;
        Ok(((session, vec![], item.secret.clone(), "text/plain".into()),))
    }

    fn delete(&self) -> OwnedObjectPath {
        self.0.lock().unwrap().items.retain(|i| i.path != self.1);
        path("/")
    }
}

async fn serve_keyring(bus: &str) -> (zbus::Connection, Shared) {
    let vault = Shared::default();
    let conn = zbus::connection::Builder::address(bus)
        .name("org.freedesktop.secrets")
        .serve_at("/org/freedesktop/secrets", MockService(vault.clone()))
        .serve_at(COLLECTION, MockCollection(vault.clone()))
        .build()
        .await
        .expect("serve the mock Secret Service");
    (conn, vault)
}

/// `keepwire ARGS` on `home` with `bus` as the session bus and the token
/// store left to its default (auto).
fn kw_session(home: &Path, bus: &str, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("KEEPWIRE_HOME", home)
        .env("KEEPWIRE_LOG", "warn")
        .env("DBUS_SESSION_BUS_ADDRESS", bus)
        .env_remove("KEEPWIRE_TOKEN_STORE")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn status(home: &Path, bus: &str) -> Value {
    serde_json::from_str(&ok(&kw_session(home, bus, &["status", "--json"]))).unwrap()
}

/// Whether any file of the home holds `token`.
fn home_holds(home: &Path, token: &str) -> bool {
    std::fs::read_dir(home).unwrap().any(|e| {
        let bytes = std::fs::read(e.unwrap().path()).unwrap_or_default();
        bytes.windows(token.len()).any(|w| w == token.as_bytes())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_to_the_desktop_keyring_when_there_is_one() {
    let bus = Bus::start();
    let (_service, vault) = serve_keyring(&bus.address).await;
    let dir = TempDir::new("keyring");
    let db = dir.join("relay.db");
    let token = add_user(&db, "alice");
    let relay = RelayProcess::start(&bin(), &db, FAST);
    let home = dir.join("alice");
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token).unwrap();
    let login = ["login", "--server", &relay.url, "--token-file"];
    let mut args = login.to_vec();
    args.push(token_file.to_str().unwrap());
    let out = ok(&kw_session(&home, &bus.address, &args));
    assert!(out.contains("logged in as alice"), "{out}");
    assert!(out.contains("token kept in the desktop keyring"), "{out}");
    {
        let v = vault.lock().unwrap();
        assert_eq!(v.algorithms, ["plain"]);
        assert_eq!(v.items.len(), 1);
        assert_eq!(v.items[0].secret, token.as_bytes());
        assert_eq!(v.items[0].attributes["application"], "keepwire");
        assert_eq!(
            v.items[0].attributes["keepwire-home"],
            home.display().to_string()
        );
    }
    assert!(!home_holds(&home, &token), "the token is not in the home");
    assert_eq!(status(&home, &bus.address)["token_store"], "keyring");
    let text = ok(&kw_session(&home, &bus.address, &["status"]));
    assert!(
        text.contains("token:    kept in the desktop keyring"),
        "{text}"
    );
    // Commands read it from there.
    ok(&kw_session(&home, &bus.address, &["sync"]));
    // With the keyring out of reach, they say so and what to do.
    let out = kw_session(&home, "unix:path=/nonexistent/keepwire-bus", &["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is in the desktop keyring, which cannot be reached")
            && err.contains("--token-store file"),
        "{err}"
    );
    // Logging in to the file moves it back, and out of the keyring.
    args.extend(["--token-store", "file"]);
    let out = ok(&kw_session(&home, &bus.address, &args));
    let db_path = home.join("client.db").display().to_string();
    assert!(out.contains(&format!("token kept in {db_path}")), "{out}");
    assert!(vault.lock().unwrap().items.is_empty());
    assert_eq!(status(&home, &bus.address)["token_store"], db_path);
    ok(&kw_session(&home, &bus.address, &["sync"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_keyring_the_token_stays_in_the_home_file() {
    let dir = TempDir::new("nokeyring");
    let db = dir.join("relay.db");
    let token = add_user(&db, "bob");
    let relay = RelayProcess::start(&bin(), &db, FAST);
    let home = dir.join("bob");
    let nobus = "unix:path=/nonexistent/keepwire-bus";
    let login = ["login", "--server", &relay.url, "--token", &token];
    let out = kw_session(&home, nobus, &login);
    let text = ok(&out);
    assert!(text.contains("token kept in"), "{text}");
    assert!(
        out.stderr.is_empty(),
        "no keyring is not a problem: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db_path = home.join("client.db").display().to_string();
    assert_eq!(status(&home, nobus)["token_store"], db_path);
    ok(&kw_session(&home, nobus, &["sync"]));
    // A session bus without a Secret Service is no keyring either.
    let bus = Bus::start();
    let other = dir.join("bob2");
    ok(&kw_session(&other, &bus.address, &login));
    assert_eq!(
        status(&other, &bus.address)["token_store"],
        other.join("client.db").display().to_string()
    );
    // Asking for the keyring when there is none is an error, and saves nothing.
    let third = dir.join("bob3");
    let mut args = login.to_vec();
    args.extend(["--token-store", "keyring"]);
    let out = kw_session(&third, nobus, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot keep the token in the desktop keyring"),
        "{err}"
    );
    assert!(!home_holds(&third, &token));
}

//! Local security of the command: tokens kept off command lines and out of
//! logs (even at trace level), the agent socket bound to its user, hostile
//! message text escaped on the terminal, file modes of a home, and the
//! private CA made by `admin tls-init`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use keepwire_testkit::TempDir;

use crate::{FAST, KillOnDrop, add_user, bin, keepwire, kw_ok};

/// `keepwire serve` on a free port with `KEEPWIRE_LOG=log`, stderr to `err`.
fn relay_logging_to(db: &Path, log: &str, err: &Path, extra: &[&str]) -> (KillOnDrop, String) {
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(db)
        .args(FAST)
        .args(extra)
        .env("KEEPWIRE_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(err).unwrap())
        .spawn()
        .expect("spawn keepwire serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().to_owned();
    assert!(url.starts_with("ws"), "first line {url:?}");
    (KillOnDrop(child), url)
}

/// `keepwire ARGS` on `home` with extra environment and optional stdin.
fn kw_with(home: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env("KEEPWIRE_HOME", home)
        .env("KEEPWIRE_LOG", "warn")
        .env("KEEPWIRE_TOKEN_STORE", "file")
        .env_remove("KEEPWIRE_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run keepwire");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Two devices on a relay: alice and bob log in (token from `KEEPWIRE_TOKEN`,
/// plus `login_args`) to the relay started with `relay_args` in `dir`,
/// reached at `host`, and alice opens a direct conversation with bob.
struct Pair {
    relay: keepwire_testkit::RelayProcess,
    alice: std::path::PathBuf,
    bob: std::path::PathBuf,
    conv: String,
}

fn alice_and_bob(dir: &TempDir, host: &str, relay_args: &[&str], login_args: &[&str]) -> Pair {
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let tb = add_user(&db, "bob");
    let relay = keepwire_testkit::RelayProcess::start(&bin(), &db, relay_args);
    let url = relay.url.replace("127.0.0.1", host);
    let (alice, bob) = (dir.join("alice"), dir.join("bob"));
    for (home, token) in [(&alice, &ta), (&bob, &tb)] {
        let mut args = vec!["login", "--server", &url];
        args.extend_from_slice(login_args);
        let out = kw_with(home, &args, &[("KEEPWIRE_TOKEN", token)], None);
        assert!(text(&out).contains("logged in as"), "{}", text(&out));
    }
    let conv = kw_ok(&alice, &["conv", "create", "bob"]).trim().to_owned();
    Pair {
        relay,
        alice,
        bob,
        conv,
    }
}

#[test]
fn tokens_come_from_a_file_stdin_or_the_environment_and_never_reach_trace_logs() {
    let dir = TempDir::new("trace");
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let tb = add_user(&db, "bob");
    let tc = add_user(&db, "carol");
    let relay_err = dir.join("relay.err");
    let (_relay, url) = relay_logging_to(&db, "trace", &relay_err, &[]);
    let trace = [("KEEPWIRE_LOG", "trace")];
    let body = "a secret message body 4711";
    let mut client_logs = String::new();

    // alice: from a file (0600, no warning); bob: from stdin; carol: from the environment.
    let alice = dir.join("alice");
    let file = dir.join("alice.token");
    std::fs::write(&file, format!("{ta}\n")).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let f = file.to_str().unwrap();
    let out = kw_with(
        &alice,
        &["login", "--server", &url, "--token-file", f],
        &trace,
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("logged in as alice"), "{}", text(&out));
    assert!(!text(&out).contains("warning"), "{}", text(&out));
    client_logs += &text(&out);
    let bob = dir.join("bob");
    let out = kw_with(
        &bob,
        &["login", "--server", &url, "--token", "-"],
        &trace,
        Some(&format!("{tb}\n")),
    );
    assert!(text(&out).contains("logged in as bob"), "{}", text(&out));
    client_logs += &text(&out);
    let carol = dir.join("carol");
    let out = kw_with(
        &carol,
        &["login", "--server", &url],
        &[trace[0], ("KEEPWIRE_TOKEN", &tc)],
        None,
    );
    assert!(text(&out).contains("logged in as carol"), "{}", text(&out));
    client_logs += &text(&out);

    // A message goes from alice to bob, everyone logging at trace level.
    let out = kw_with(&alice, &["conv", "create", "bob"], &trace, None);
    let conv = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    client_logs += &text(&out);
    let out = kw_with(&alice, &["send", &conv, body], &trace, None);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sent",
        "{}",
        text(&out)
    );
    client_logs += &text(&out);
    let out = kw_with(&bob, &["sync"], &trace, None);
    assert!(out.status.success(), "{}", text(&out));
    client_logs += &String::from_utf8_lossy(&out.stderr);
    assert!(kw_ok(&bob, &["log"]).contains(body));

    // Logging was on (the wire libraries still log, at debug at most; before
    // they were capped, the relay's trace log held every hello with its token)...
    let relay_logs = std::fs::read_to_string(&relay_err).unwrap();
    assert!(
        client_logs.contains("DEBUG tungstenite"),
        "the client logged nothing from the WebSocket library"
    );
    assert!(relay_logs.contains("INFO"), "the relay logged nothing");
    for (who, logs) in [("relay", &relay_logs), ("client", &client_logs)] {
        // ... and no token or body reached the logs.
        for secret in [ta.as_str(), tb.as_str(), tc.as_str(), body] {
            assert!(!logs.contains(secret), "{who} logs hold {secret:?}");
        }
    }

    // Mistakes are explained; a loose token file is warned about.
    let out = kw_with(&dir.join("d"), &["login", "--server", &url], &[], None);
    assert!(!out.status.success());
    assert!(text(&out).contains("--token-file FILE"), "{}", text(&out));
    let out = kw_with(
        &dir.join("d"),
        &["login", "--server", &url, "--token", "-"],
        &[],
        Some("kw_a kw_b\n"),
    );
    assert!(
        text(&out).contains("one token, on one line"),
        "{}",
        text(&out)
    );
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = kw_with(
        &dir.join("e"),
        &["login", "--server", &url, "--token-file", f],
        &[],
        None,
    );
    assert!(
        text(&out).contains("can be read by other users"),
        "{}",
        text(&out)
    );

    // `admin token revoke` takes the token the same ways, never needing argv.
    let db = db.to_str().unwrap();
    let revoke = |args: &[&str], env: &[(&str, &str)], stdin: Option<&str>| {
        let mut a = vec!["admin", "--db", db, "token", "revoke"];
        a.extend_from_slice(args);
        text(&kw_with(&dir.join("x"), &a, env, stdin))
    };
    assert!(revoke(&["--token-file", f], &[], None).contains("revoked 1 token"));
    assert!(revoke(&["-"], &[], Some(&tb)).contains("revoked 1 token"));
    assert!(revoke(&[], &[("KEEPWIRE_TOKEN", &tc)], None).contains("revoked 1 token"));
    assert!(revoke(&[], &[], None).contains("name what to revoke"));
}

#[test]
fn a_jwks_url_over_plain_http_is_refused_unless_on_loopback() {
    let dir = TempDir::new("jwks-http");
    let db = dir.join("relay.db");
    let out = keepwire(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
        "--jwks-url",
        "http://auth.example/.well-known/jwks.json",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must come over https"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Loopback is allowed (a sidecar): the relay starts.
    let err = dir.join("relay.err");
    let (_relay, url) = relay_logging_to(
        &db,
        "warn",
        &err,
        &["--jwks-url", "http://127.0.0.1:9/jwks.json"],
    );
    assert!(url.starts_with("ws://"));
}

#[test]
fn hostile_message_text_is_escaped_on_the_terminal_and_exact_in_json() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("escapes");
    let Pair {
        relay: _relay,
        alice,
        bob,
        conv,
    } = alice_and_bob(&dir, "127.0.0.1", FAST, &[]);
    // Clear the screen, retitle the window, fake a second line, flip text.
    let hostile = "\u{1b}[2J\u{1b}]0;pwned\u{7}hi\r\n2030-01-01 conv 1 #9 root: fake \u{9b}31m \u{202E}gnp.exe";
    kw_ok(&alice, &["send", &conv, hostile]);
    // bob's tail prints it as it arrives.
    let mut tail = KillOnDrop(
        Command::new(bin())
            .arg("tail")
            .env("KEEPWIRE_HOME", &bob)
            .env("KEEPWIRE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(tail.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    drop(tail);
    let log = kw_ok(&bob, &["log"]);
    for shown in [&line, &log] {
        assert_eq!(shown.lines().count(), 1, "one line: {shown:?}");
        assert!(
            !shown
                .trim_end_matches('\n')
                .chars()
                .any(|c| c.is_control() || c == '\u{202E}'),
            "no raw control or bidi characters: {shown:?}"
        );
        assert!(
            shown.contains(r"\u{1b}[2J\u{1b}]0;pwned\u{7}hi\r\n2030-01-01 conv 1 #9 root: fake \u{9b}31m \u{202e}gnp.exe"),
            "{shown:?}"
        );
    }
    // JSON output is exact.
    let json: serde_json::Value =
        serde_json::from_str(kw_ok(&bob, &["log", "--json"]).trim()).unwrap();
    assert_eq!(json["body"], hostile);

    // The home and its database are owner-only, and stay so: a loosened mode
    // is tightened by the next command.
    let client_db = bob.join("client.db");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&bob), mode(&client_db)), (0o700, 0o600));
    std::fs::set_permissions(&bob, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&client_db, std::fs::Permissions::from_mode(0o644)).unwrap();
    kw_ok(&bob, &["status"]);
    assert_eq!((mode(&bob), mode(&client_db)), (0o700, 0o600));
}

/// Polls `cond` every 50 ms until it holds; panics after `within`.
fn wait_until(within: std::time::Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends `line` to the agent socket and reads one answer line ("" if the
/// agent closed without one).
fn ask_agent(sock: &Path, line: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // The agent may answer and close before reading everything.
    let _ = s.write_all(line);
    let mut answer = String::new();
    let _ = BufReader::new(&s).read_line(&mut answer);
    answer
}

#[test]
fn the_agent_serves_only_its_own_user_and_bounds_request_lines() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;
    let dir = TempDir::new("agent-peer");
    let Pair {
        relay: _relay,
        alice,
        bob,
        conv,
    } = alice_and_bob(&dir, "127.0.0.1", FAST, &[]);
    let agent_err = dir.join("agent.err");
    let _agent = KillOnDrop(
        Command::new(bin())
            .args(["agent", "--no-desktop"])
            .env("KEEPWIRE_HOME", &alice)
            .env("KEEPWIRE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_err).unwrap())
            .spawn()
            .unwrap(),
    );
    let sock = alice.join("agent.sock");
    wait_until(std::time::Duration::from_secs(10), "the agent", || {
        ask_agent_ok(&sock).contains("Connected")
    });

    // A request line over 256 KiB gets a clear error and the connection closes.
    let mut long = vec![b'x'; 300 * 1024];
    long.push(b'\n');
    let answer = ask_agent(&sock, &long);
    assert!(
        answer.contains("request line longer than 256 KiB"),
        "{answer:?}"
    );
    // The agent is fine.
    assert!(ask_agent_ok(&sock).contains("Connected"));

    // Another local user, with the home and socket modes loosened, is refused.
    if nix_euid() != 0 {
        eprintln!(
            "SKIPPED part of the_agent_serves_only_its_own_user: acting as another uid needs root"
        );
        return;
    }
    std::fs::set_permissions(&alice, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(bin())
        .args(["send", &conv, "sent by another user"])
        .env("KEEPWIRE_HOME", &alice)
        .env("KEEPWIRE_LOG", "warn")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    wait_until(
        std::time::Duration::from_secs(10),
        "the agent's refusal",
        || {
            std::fs::read_to_string(&agent_err)
                .unwrap()
                .contains("refused a connection from another user")
        },
    );
    // alice herself still sends through the agent; bob gets only her message.
    assert_eq!(
        kw_ok(&alice, &["send", &conv, "alice's own"]).trim(),
        "sent"
    );
    kw_ok(&bob, &["sync"]);
    let log = kw_ok(&bob, &["log"]);
    assert!(log.contains("alice's own"), "{log}");
    assert!(!log.contains("another user"), "{log}");
}

fn ask_agent_ok(sock: &Path) -> String {
    if !sock.exists() {
        return String::new();
    }
    ask_agent(sock, b"{\"op\":\"status\"}\n")
}

fn nix_euid() -> u32 {
    // Our effective uid, from /proc (the tests do not link nix).
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap()
}

#[test]
fn tls_init_makes_a_ca_and_a_relay_certificate_that_clients_trust_across_renewals() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("tls-init");
    let pki = dir.join("pki");
    let p = pki.to_str().unwrap();
    let out = keepwire(&[
        "admin",
        "tls-init",
        p,
        "--host",
        "localhost",
        "--host",
        "127.0.0.1",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let (ca, cert, key) = (
        pki.join("ca.pem"),
        pki.join("relay.pem"),
        pki.join("relay.key"),
    );
    let abs = |f: &Path| std::fs::canonicalize(f).unwrap().display().to_string();
    // It prints the lines to use.
    assert!(
        said.contains(&format!(
            "--tls-cert {} --tls-key {}",
            abs(&cert),
            abs(&key)
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "--server wss://localhost:7447 --ca-cert {}",
            abs(&ca)
        )),
        "{said}"
    );
    let mode = |f: &Path| std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&key), mode(&pki.join("ca.key"))), (0o600, 0o600));

    let tls = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let Pair {
        relay,
        alice,
        bob,
        conv,
    } = alice_and_bob(
        &dir,
        "localhost",
        &tls,
        &["--ca-cert", ca.to_str().unwrap()],
    );
    assert!(relay.url.starts_with("wss://"), "{}", relay.url);
    assert_eq!(
        kw_ok(&alice, &["send", &conv, "over tls-init"]).trim(),
        "sent"
    );

    // Renewed on the same directory: the CA stays, the relay restarts with
    // the new certificate, and the clients connect without a new --ca-cert.
    let before = std::fs::read(&cert).unwrap();
    let out = keepwire(&[
        "admin",
        "tls-init",
        p,
        "--host",
        "localhost",
        "--days",
        "30",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("renewed"),
        "{}",
        text(&out)
    );
    assert_ne!(std::fs::read(&cert).unwrap(), before);
    let addr = relay.host_port().to_owned();
    drop(relay);
    let _relay =
        keepwire_testkit::RelayProcess::start_at(&bin(), &dir.join("relay.db"), &addr, &tls);
    kw_ok(&bob, &["sync"]);
    assert!(kw_ok(&bob, &["log"]).contains("over tls-init"));
}

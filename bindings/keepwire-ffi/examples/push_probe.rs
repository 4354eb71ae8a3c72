//! Measures a push wake-up the way an iOS notification service extension
//! runs it: a process linking keepwire-ffi opens a home and calls `on_push`
//! over a backlog of waiting messages; it prints what it did and its peak
//! resident memory (VmHWM). Used by `bindings/bench.sh`.
//!
//! ```text
//! push_probe relay              in-process relay: prints "URL TOKEN", then
//!                               reads "seed N" lines (N messages to the token's
//!                               user) and answers "seeded"; ends at EOF
//! push_probe login HOME URL TOKEN   logs in and syncs once (cursor at the head)
//! push_probe wake HOME [DEADLINE_MS]  on_push; prints one JSON line
//! ```

use std::io::BufRead as _;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["relay"] => relay(),
        ["login", home, url, token] => login(home, url, token),
        ["wake", home] => wake(home, 30_000),
        ["wake", home, ms] => match ms.parse() {
            Ok(ms) => wake(home, ms),
            Err(_) => Err(format!("bad deadline {ms:?}: milliseconds")),
        },
        _ => Err("usage: push_probe relay | login HOME URL TOKEN | wake HOME [DEADLINE_MS]".into()),
    };
    if let Err(e) = result {
        eprintln!("push_probe: {e}");
        std::process::exit(1);
    }
}

fn relay() -> Result<(), String> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let r = keepwire_testkit::relay::TestRelay::start().await;
        let alice = r.user("alice").await;
        let bob = r.user("bob").await;
        let mut b = r.connect(&bob, "bob").await;
        let conv = keepwire_testkit::relay::create_conv(
            &mut b,
            keepwire_proto::ConvKind::Direct,
            &["alice"],
        )
        .await;
        let bob_id = r.user_id(&bob).await;
        println!("{} {alice}", r.url);
        let mut lines = std::io::stdin().lock().lines();
        let mut seeded = 0;
        while let Some(Ok(line)) = lines.next() {
            let n: usize = match line.strip_prefix("seed ").map(str::parse) {
                Some(Ok(n)) => n,
                _ => {
                    println!("unknown command {line:?}");
                    continue;
                }
            };
            r.seed(bob_id, conv.id, n, &format!("s{seeded}-")).await;
            seeded += 1;
            println!("seeded");
        }
        Ok(())
    })
}

fn login(home: &str, url: &str, token: &str) -> Result<(), String> {
    let c = keepwire_ffi::Client::new(home.into()).map_err(|e| e.to_string())?;
    c.set_app_state(keepwire_ffi::AppState::Background);
    c.login(url.into(), token.into())
        .map_err(|e| e.to_string())?;
    let r = c.sync_once(30_000).map_err(|e| e.to_string())?;
    c.close();
    match r.outcome {
        keepwire_ffi::SyncOutcome::CaughtUp => Ok(()),
        other => Err(format!("first sync: {other:?}")),
    }
}

fn wake(home: &str, deadline_ms: u64) -> Result<(), String> {
    let started = Instant::now();
    let c = keepwire_ffi::Client::new(home.into()).map_err(|e| e.to_string())?;
    let r = c
        .on_push(b"probe".to_vec(), deadline_ms)
        .map_err(|e| e.to_string())?;
    let took = started.elapsed();
    c.close();
    println!(
        "{{\"outcome\":\"{:?}\",\"received\":{},\"notifications\":{},\"first_title\":{:?},\"elapsed_ms\":{},\"vm_hwm_kib\":{}}}",
        r.report.outcome,
        r.report.received,
        r.show.len(),
        r.show.first().map(|n| n.title.clone()).unwrap_or_default(),
        took.as_millis(),
        vm_hwm_kib().unwrap_or(0)
    );
    Ok(())
}

/// Peak resident memory of this process, from /proc/self/status.
fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

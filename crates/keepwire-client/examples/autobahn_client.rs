//! Runs the Autobahn|Testsuite cases against keepwire's client WebSocket
//! stack: `cargo run -p keepwire-client --example autobahn_client --
//! ws://127.0.0.1:9001` (a `wstest -m fuzzingserver` must be listening).

use futures_util::StreamExt as _;
use tokio_tungstenite::tungstenite::Message;

const AGENT: &str = "keepwire-client";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:9001".into());
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{base}/getCaseCount")).await?;
    let count: u32 = match ws.next().await {
        Some(Ok(Message::Text(t))) => t.as_str().trim().parse()?,
        other => return Err(format!("no case count: {other:?}").into()),
    };
    drop(ws);
    for case in 1..=count {
        let url = format!("{base}/runCase?case={case}&agent={AGENT}");
        // Failures are the point of many cases; the report judges them.
        let _ = keepwire_client::testing::conformance_echo(&url).await;
    }
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{base}/updateReports?agent={AGENT}")).await?;
    while let Some(Ok(_)) = ws.next().await {}
    eprintln!("ran {count} cases");
    Ok(())
}

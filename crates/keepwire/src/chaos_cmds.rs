//! `keepwire-chaos`: fault injection. `run` drives a chaos run across real
//! processes (the relay is the `keepwire` binary beside this one) and checks
//! exactly-once delivery; `proxy` is a standalone fault proxy switched from
//! standard input; `device` is the process a run starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use keepwire_chaos::run::{RunConfig, Sabotage};
use keepwire_chaos::{Fault, FaultProxy};
use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::Exit;

#[derive(Args)]
pub(crate) struct ChaosArgs {
    #[command(subcommand)]
    command: ChaosCommand,
}

#[derive(Subcommand)]
enum ChaosCommand {
    /// Run seeded chaos (kills, cuts, blackholes, DNS failures...) and check
    /// that no message was lost, duplicated, reordered or notified twice.
    Run(RunArgs),
    /// A TCP fault proxy; type `pass`, `latency 100ms`, `blackhole`, `reset`,
    /// `close-after BYTES`, `idle-cut 5s|off` or `stats` on standard input.
    Proxy(ProxyArgs),
    /// One device of a chaos run (started by `chaos run`).
    #[command(hide = true)]
    Device {
        /// The device's spec (JSON).
        #[arg(long)]
        spec: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many seeds to run, one after another (seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Chaos time per seed before healing (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    duration: Duration,
    /// Users.
    #[arg(long, default_value_t = 3)]
    users: usize,
    /// Devices per user.
    #[arg(long, default_value_t = 2)]
    devices: usize,
    /// Least number of each fault kind per seed.
    #[arg(long, default_value_t = 3)]
    min_faults: u32,
    /// Keep the run's files in this directory (one subdirectory per seed).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Inject a defect to prove the checker reports it (the run must FAIL).
    #[arg(long, value_enum)]
    sabotage: Option<SabotageArg>,
    /// Print the schedule as it runs.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum SabotageArg {
    /// Delete one stored message from one device after the run.
    DeleteStored,
    /// Journal one send as accepted without sending it.
    LoseAck,
}

#[derive(Args)]
struct ProxyArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to forward.
    #[arg(long)]
    upstream: SocketAddr,
}

pub(crate) async fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    match args.command {
        ChaosCommand::Run(a) => run(a).await,
        ChaosCommand::Proxy(a) => proxy(a).await,
        ChaosCommand::Device { spec } => {
            let text =
                std::fs::read(&spec).with_context(|| format!("cannot read {}", spec.display()))?;
            let spec = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a device spec", spec.display()))?;
            keepwire_chaos::device::run(spec).await
        }
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    if a.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    if a.users < 2 {
        bail!("--users must be at least 2");
    }
    let chaos_exe = std::env::current_exe().context("cannot find the keepwire-chaos binary")?;
    // The relay is the shipping binary, installed beside this one.
    let exe = chaos_exe.with_file_name("keepwire");
    if !exe.is_file() {
        bail!(
            "a chaos run starts the relay from the keepwire binary beside keepwire-chaos, and {} does not exist",
            exe.display()
        );
    }
    let (mut passed, mut failed) = (0u64, Vec::new());
    let (mut messages, mut copies, mut faults) = (0u64, 0u64, 0u64);
    for seed in a.seed..a.seed + a.seeds {
        let cfg = RunConfig {
            exe: exe.clone(),
            device_exe: chaos_exe.clone(),
            seed,
            duration: a.duration,
            users: a.users,
            devices_per_user: a.devices,
            min_each: a.min_faults,
            dir: a.dir.as_ref().map(|d| d.join(format!("seed-{seed}"))),
            sabotage: a.sabotage.map(|s| match s {
                SabotageArg::DeleteStored => Sabotage::DeleteStored,
                SabotageArg::LoseAck => Sabotage::LoseAck,
            }),
            verbose: a.verbose,
        };
        let outcome = keepwire_chaos::run::run(&cfg)
            .await
            .with_context(|| format!("seed {seed}"))?;
        print!("{outcome}");
        messages += outcome.report.relayed;
        copies += outcome.report.stored;
        faults += outcome.faults.values().map(|n| u64::from(*n)).sum::<u64>();
        if outcome.ok() {
            passed += 1;
        } else {
            println!("  files kept in {}", outcome.dir.display());
            println!(
                "  replay: keepwire-chaos run --seed {seed} --duration {} --users {} --devices {} -v",
                humantime::format_duration(a.duration),
                a.users,
                a.devices
            );
            failed.push(seed);
        }
    }
    println!(
        "{} seeds: {passed} passed, {} failed; {faults} faults, {messages} messages, {copies} stored copies",
        a.seeds,
        failed.len()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Exit {
            code: 1,
            message: format!("chaos found violations with seeds {failed:?}"),
        }
        .into())
    }
}

async fn proxy(a: ProxyArgs) -> anyhow::Result<()> {
    let proxy = FaultProxy::start(a.listen, a.upstream)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    println!("{}", proxy.addr());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let done = match words.as_slice() {
            [] => continue,
            ["pass"] => {
                proxy.set(Fault::Pass);
                Ok(())
            }
            ["blackhole"] => {
                proxy.set(Fault::Blackhole);
                Ok(())
            }
            ["reset"] => {
                proxy.set(Fault::Reset);
                Ok(())
            }
            ["latency", d] => humantime::parse_duration(d)
                .map(|d| proxy.set(Fault::Latency(d)))
                .map_err(|e| e.to_string()),
            ["close-after", n] => n
                .parse()
                .map(|n| proxy.set(Fault::CloseAfter(n)))
                .map_err(|_| format!("{n:?} is not a byte count")),
            ["idle-cut", "off"] => {
                proxy.set_idle_cut(None);
                Ok(())
            }
            ["idle-cut", d] => humantime::parse_duration(d)
                .map(|d| proxy.set_idle_cut(Some(d)))
                .map_err(|e| e.to_string()),
            ["stats"] => {
                let s = proxy.stats();
                use std::sync::atomic::Ordering::Relaxed;
                println!(
                    "open {} accepted {} forgotten {} resets {} closed {} bytes {}",
                    proxy.open_connections(),
                    s.accepted.load(Relaxed),
                    s.forgotten.load(Relaxed),
                    s.resets.load(Relaxed),
                    s.closed.load(Relaxed),
                    s.bytes.load(Relaxed)
                );
                Ok(())
            }
            _ => Err(format!("unknown command {line:?}")),
        };
        match done {
            Ok(()) => println!("ok"),
            Err(e) => println!("error: {e}"),
        }
    }
    Ok(())
}

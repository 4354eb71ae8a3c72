//! Resident memory and CPU time of processes, from /proc.

use std::time::Duration;

use anyhow::Context as _;

/// Clock ticks per second of /proc/*/stat times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// Peak resident set size in KiB (VmHWM).
pub fn hwm_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")
}

fn ticks_of(stat: &str) -> Option<u64> {
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field overall, stime the 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// User + system CPU ticks of a process so far.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    ticks_of(&stat).context("unreadable /proc stat")
}

/// The share of one core a process used since `ticks0`, over `elapsed`.
pub fn cpu_share(pid: u32, ticks0: u64, elapsed: Duration) -> anyhow::Result<f64> {
    Ok((cpu_ticks(pid)?.saturating_sub(ticks0)) as f64 / TICKS / elapsed.as_secs_f64())
}

/// This process's CPU ticks so far.
pub fn self_cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| ticks_of(&s))
        .unwrap_or(0)
}

/// The share of one core this process used since `ticks0`, over `elapsed`.
pub fn self_cpu_since(ticks0: u64, elapsed: Duration) -> f64 {
    self_cpu_ticks().saturating_sub(ticks0) as f64 / TICKS / elapsed.as_secs_f64()
}

#[cfg(test)]
mod tests {
    #[test]
    fn stat_times_are_read_after_the_command_name() {
        let stat = "123 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1";
        assert_eq!(super::ticks_of(stat), Some(300));
    }
}

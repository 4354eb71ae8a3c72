//! `keepwire serve --config FILE`: a TOML file holding any of `serve`'s
//! flags, by their long name without the dashes (`listen = "0.0.0.0:7447"`,
//! `max-body-bytes = 16384`, `allow-origin = ["https://a", "https://b"]`;
//! `_` works for `-`). Flags on the command line, and environment variables
//! such as `KEEPWIRE_DB`, override the file.
//!
//! The file is turned into flags placed before the command line's own, so
//! clap validates every value exactly as it validates a flag, and a new flag
//! is settable from the file without any change here.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context as _, bail};

/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// `argv` with the settings of `serve --config FILE` inserted after `serve`
/// (unchanged for other commands, or without `--config`).
pub(crate) fn expand(argv: Vec<OsString>, serve: &clap::Command) -> anyhow::Result<Vec<OsString>> {
    if argv.get(1).and_then(|a| a.to_str()) != Some("serve") {
        return Ok(argv);
    }
    let rest: Vec<String> = argv[2..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut path = None;
    for (i, a) in rest.iter().enumerate() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            path = rest.get(i + 1).cloned();
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_owned());
        }
    }
    let Some(path) = path else {
        return Ok(argv);
    };
    let flags = flags_from_file(Path::new(&path), serve, &rest)?;
    let mut out = argv[..2].to_vec();
    out.extend(flags.into_iter().map(OsString::from));
    out.extend_from_slice(&argv[2..]);
    Ok(out)
}

/// The flags a configuration file stands for, leaving out those the command
/// line (`given`) or the environment sets.
fn flags_from_file(
    path: &Path,
    serve: &clap::Command,
    given: &[String],
) -> anyhow::Result<Vec<String>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    if meta.len() > MAX_CONFIG_BYTES {
        bail!(
            "the configuration file {} is larger than {} KiB",
            path.display(),
            MAX_CONFIG_BYTES / 1024
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut flags = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let Some(arg) = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && !a.is_hide_set())
        else {
            bail!(
                "{}: unknown setting {key:?} (settings are `keepwire serve` flags without the dashes; see `keepwire serve --help`)",
                path.display()
            );
        };
        if long == "config" {
            bail!(
                "{}: a configuration file cannot name another one",
                path.display()
            );
        }
        let flag = format!("--{long}");
        let on_command_line = given
            .iter()
            .any(|g| *g == flag || g.starts_with(&format!("{flag}=")));
        let from_env = arg
            .get_env()
            .is_some_and(|name| std::env::var_os(name).is_some());
        if on_command_line || from_env {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        match value {
            toml::Value::Boolean(b) if !takes_value => {
                if b {
                    flags.push(flag);
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    flags.push(flag.clone());
                    flags.push(scalar(path, &key, item)?);
                }
            }
            other => {
                if !takes_value {
                    bail!(
                        "{}: {key} is a switch: write `{key} = true`",
                        path.display()
                    );
                }
                flags.push(flag);
                flags.push(scalar(path, &key, other)?);
            }
        }
    }
    Ok(flags)
}

/// One TOML value as a flag's text (durations as strings: `"30s"`).
fn scalar(path: &Path, key: &str, v: toml::Value) -> anyhow::Result<String> {
    Ok(match v {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "{}: {key} = {other}: give a string, a number or a list of them",
            path.display()
        ),
    })
}

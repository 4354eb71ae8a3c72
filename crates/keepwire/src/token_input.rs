//! Where a command takes a bearer token from without putting it on its
//! command line (which every local user can read in `/proc/PID/cmdline` and
//! `ps`): standard input (`--token -`), a file (`--token-file PATH`) or the
//! `KEEPWIRE_TOKEN` environment variable. `--token VALUE` still works, for
//! scripts on a single-user machine.

use std::io::Read as _;
use std::path::Path;

use anyhow::{Context as _, bail};

/// The environment variable holding a token.
pub(crate) const TOKEN_ENV: &str = "KEEPWIRE_TOKEN";

/// Longest token accepted (PROTOCOL.md: a `hello` token is 1–4096 bytes).
const MAX_TOKEN_BYTES: usize = 4096;

/// How to say where a token may come from, for error messages.
pub(crate) const HOW: &str =
    "--token-file FILE, --token - (standard input) or the KEEPWIRE_TOKEN environment variable";

/// The token from `--token` (`-`: standard input), else `--token-file`, else
/// `KEEPWIRE_TOKEN`; `None` if none of them gives one.
pub(crate) fn token(arg: Option<&str>, file: Option<&Path>) -> anyhow::Result<Option<String>> {
    let raw = match (arg, file) {
        (Some("-"), _) => {
            let mut s = String::new();
            std::io::stdin()
                .take(MAX_TOKEN_BYTES as u64 + 2)
                .read_to_string(&mut s)
                .context("cannot read the token from standard input")?;
            s
        }
        (Some(t), _) => t.to_owned(),
        (None, Some(path)) => read_file(path)?,
        (None, None) => match std::env::var(TOKEN_ENV) {
            Ok(t) if !t.trim().is_empty() => t,
            Ok(_) | Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => bail!("{TOKEN_ENV} is not valid UTF-8"),
        },
    };
    check(raw.trim()).map(Some)
}

/// Like [`token`], but one of the sources must give a token.
pub(crate) fn required(arg: Option<&str>, file: Option<&Path>) -> anyhow::Result<String> {
    token(arg, file)?.with_context(|| format!("give the token with {HOW}"))
}

fn read_file(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    if let Ok(meta) = file.metadata()
        && meta.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "warning: the token file {} can be read by other users (chmod 600 it)",
            path.display()
        );
    }
    let mut s = String::new();
    file.take(MAX_TOKEN_BYTES as u64 + 2)
        .read_to_string(&mut s)
        .with_context(|| format!("the token file {} is not text", path.display()))?;
    Ok(s)
}

fn check(token: &str) -> anyhow::Result<String> {
    if token.is_empty() {
        bail!("the token is empty");
    }
    if token.len() > MAX_TOKEN_BYTES {
        bail!("the token is longer than {MAX_TOKEN_BYTES} bytes");
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("the token contains spaces or control characters: give one token, on one line");
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_one_trimmed_word_of_bounded_size() {
        assert_eq!(check("kw_abc").unwrap(), "kw_abc");
        assert!(check("").is_err());
        assert!(check("kw_a kw_b").is_err());
        assert!(check("kw_a\nkw_b").is_err());
        assert!(check("kw_\u{1b}[2J").is_err());
        assert!(check(&"x".repeat(MAX_TOKEN_BYTES + 1)).is_err());
        assert!(check(&"x".repeat(MAX_TOKEN_BYTES)).is_ok());
    }

    #[test]
    fn a_file_is_read_and_trimmed_and_the_argument_wins() {
        let dir = std::env::temp_dir().join(format!("kw-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        std::fs::write(&f, "kw_from_file\n").unwrap();
        assert_eq!(
            token(None, Some(&f)).unwrap().as_deref(),
            Some("kw_from_file")
        );
        assert_eq!(
            token(Some("kw_arg"), Some(&f)).unwrap().as_deref(),
            Some("kw_arg")
        );
        let err = token(None, Some(&dir.join("missing"))).unwrap_err();
        assert!(format!("{err:#}").contains("cannot read the token file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

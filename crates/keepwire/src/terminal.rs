//! Text from other users on a terminal. Message bodies and conversation names
//! are written by anyone in the conversation; printed verbatim, an escape
//! sequence could rewrite the screen, retitle the window, fake other lines
//! (CR, LF) or reorder what is shown (bidi overrides). Human output escapes
//! them; JSON output stays exact (serde_json escapes control characters, and
//! the reader decides what to do with the rest).

use std::borrow::Cow;

/// Whether `c` must not reach a terminal as is: C0 controls (also TAB, CR
/// and LF), DEL, C1 controls, and the Unicode bidirectional controls and line
/// separators.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'                 // arabic letter mark
            | '\u{200E}' | '\u{200F}'  // left-to-right and right-to-left marks
            | '\u{202A}'..='\u{202E}'  // embeddings and overrides
            | '\u{2066}'..='\u{2069}'  // isolates
            | '\u{2028}' | '\u{2029}' // line and paragraph separators
        )
}

/// `s` with every unsafe character written as a Rust escape (`\n`, `\u{1b}`).
pub(crate) fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `n` and the noun, singular for one: "1 message", "3 messages" (`noun`
/// is singular; the plural adds an `s`).
pub(crate) fn counted(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_and_bidi_characters_are_escaped_and_the_rest_is_untouched() {
        assert!(matches!(
            printable("hello, wörld ✓ 你好"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            printable("\u{1b}[2J\u{1b}]0;pwned\u{7}"),
            "\\u{1b}[2J\\u{1b}]0;pwned\\u{7}"
        );
        assert_eq!(printable("a\r\nfake line"), "a\\r\\nfake line");
        assert_eq!(printable("tab\there"), "tab\\there");
        assert_eq!(printable("c1 \u{9b}31m"), "c1 \\u{9b}31m");
        assert_eq!(printable("del\u{7f}"), "del\\u{7f}");
        assert_eq!(printable("abc\u{202E}fdp.exe"), "abc\\u{202e}fdp.exe");
        assert_eq!(printable("\u{2066}x\u{2069}"), "\\u{2066}x\\u{2069}");
        assert_eq!(printable("line\u{2028}sep"), "line\\u{2028}sep");
    }
}

//! Errors phrased for where the user is. The engine names settings by their CLI flags
//! ("choose another --out", "--lr must be …", "pass --allow-partial to …"); every error a job or a
//! view shows goes through [`phrase`], which names the view's own fields instead, from the view's
//! table of flag → label ([`Fields`]). A [`BadValue`] is phrased by the engine itself
//! ([`BadValue::with_label`]); any other flag in the text becomes its field's label in quotes, and a
//! flag the view has no field for keeps its words without the CLI dashes. A few command-line
//! phrasings ("re-run the same command") become what the app offers instead.

use crossdiff::workflow::BadValue;

/// A field a flag maps to: a value the user types or picks, or a checkbox (then "pass --flag"
/// reads "tick “label”").
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Field {
    Value(&'static str),
    Check(&'static str),
}

impl Field {
    fn label(self) -> &'static str {
        match self {
            Field::Value(l) | Field::Check(l) => l,
        }
    }
}

/// A view's table: CLI flag (without dashes) → its field.
pub type Fields = &'static [(&'static str, Field)];

/// Fields every view has: the top bar's device selector.
const APP_FIELDS: Fields = &[("backend", Field::Value("Device"))];

/// Command-line phrasings and what the app says instead.
const CLI_PHRASES: [(&str, &str); 4] = [
    ("re-run the same command", "start the same job again"),
    ("run `crossdiff analyze` on it first", "analyse it in the Analyze view first"),
    ("re-run that command", "start that job again"),
    ("see `crossdiff --help`", "see the command line's `crossdiff --help`"),
];

fn field(flag: &str, fields: Fields) -> Option<Field> {
    fields.iter().chain(APP_FIELDS).find(|(f, _)| *f == flag).map(|(_, field)| *field)
}

/// A flag's words without the CLI dashes (`val-tokens` → `val tokens`).
fn words(flag: &str) -> String {
    flag.replace('-', " ")
}

/// An error as the view shows it: its whole context chain on one line, the flags in it named by the
/// view's `fields`.
pub fn phrase(err: &anyhow::Error, fields: Fields) -> String {
    let mut text = format!("{err:#}").replace('\n', " ");
    if let Some(bad) = BadValue::find(err) {
        let label = match field(bad.flag, fields) {
            Some(f) => f.label().to_string(),
            None => format!("“{}”", words(bad.flag)),
        };
        text = text.replacen(&bad.to_string(), &bad.with_label(&label), 1);
    }
    phrase_text(&text, fields)
}

/// [`phrase`] for a message that is already text (an error that crossed a thread as a string).
pub fn phrase_text(text: &str, fields: Fields) -> String {
    let mut text = rewrite_flags(text, fields);
    for (cli, app) in CLI_PHRASES {
        text = text.replace(cli, app);
    }
    text
}

/// Every `--flag` outside backticks (commands quoted for the terminal stay as they are) becomes its
/// field's label in quotes, or its words in quotes when the view has no such field.
fn rewrite_flags(text: &str, fields: Fields) -> String {
    let mut out = String::with_capacity(text.len());
    let mut quoted = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '`' {
            quoted = !quoted;
        }
        // A flag starts a word: not inside a path or a name (`/x/--out`, `a_--b`, `v1.--x`).
        let prev_ok =
            out.chars().next_back().is_none_or(|p| !(p.is_alphanumeric() || matches!(p, '-' | '/' | '_' | '.' | '\\')));
        if !quoted && prev_ok && rest.starts_with("--") {
            let name_len =
                rest[2..].find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-')).unwrap_or(rest.len() - 2);
            let flag = rest[2..2 + name_len].trim_end_matches('-');
            if flag.starts_with(|ch: char| ch.is_ascii_lowercase()) {
                match field(flag, fields) {
                    Some(Field::Check(label)) => {
                        if out.ends_with("pass ") {
                            out.truncate(out.len() - "pass ".len());
                            out.push_str("tick ");
                        }
                        out.push_str(&format!("“{label}”"));
                    }
                    Some(Field::Value(label)) => out.push_str(&format!("“{label}”")),
                    None => out.push_str(&format!("“{}”", words(flag))),
                }
                rest = &rest[2 + flag.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRAIN: Fields = &[
        ("out", Field::Value("Run directory")),
        ("lr", Field::Value("Learning rate")),
        ("allow-partial", Field::Check("Use an incomplete cache")),
    ];

    #[test]
    fn flags_become_the_views_labels() {
        let e = crossdiff::workflow::checks::finite_positive(f64::NAN, "lr").unwrap_err().context("training");
        assert_eq!(phrase(&e, TRAIN), "training: Learning rate must be a positive finite number, not NaN");
        let e = anyhow::anyhow!(
            "r/state.json: the run there was started with other settings; re-run the same command to resume it, or choose another --out"
        );
        assert_eq!(
            phrase(&e, TRAIN),
            "r/state.json: the run there was started with other settings; start the same job again to resume it, or choose another “Run directory”"
        );
        let e = anyhow::anyhow!(
            "c: the cache is incomplete: re-run that command to finish it, or pass --allow-partial to use what is there"
        );
        assert!(phrase(&e, TRAIN).ends_with("or tick “Use an incomplete cache” to use what is there"));
        // No field: the words without dashes; a command in backticks stays as it is.
        let e = anyhow::anyhow!(
            "--val-tokens needs a cache; rebuild with `cargo build --features cuda` or use --backend cpu"
        );
        assert_eq!(
            phrase(&e, TRAIN),
            "“val tokens” needs a cache; rebuild with `cargo build --features cuda` or use “Device” cpu"
        );
        let e = crossdiff::workflow::checks::positive(0, "dead-tokens").unwrap_err();
        assert_eq!(phrase(&e, TRAIN), "“dead tokens” must be positive, not 0");
        // Dashes that are no flag stay.
        assert_eq!(phrase_text("a -- b, x--y, --5", TRAIN), "a -- b, x--y, --5");
        // Nor inside a path: a folder named `--out` is a folder.
        assert_eq!(phrase_text("/x/--out: cannot read", TRAIN), "/x/--out: cannot read");
    }
}

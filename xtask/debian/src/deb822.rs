//! deb822, the RFC 822-like format of `Release`, `Packages` and `control` files: paragraphs
//! ("stanzas") separated by blank lines, `Name: value` fields, continuation lines starting with
//! a space or tab. A stanza keeps its own text and the byte spans of its fields, so a 50 MB
//! `Packages` file costs one allocation per stanza rather than one per field.

use crate::{Error, Result};
use std::ops::Range;

/// One paragraph of a deb822 file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza {
    text: String,
    fields: Vec<(Range<u32>, Range<u32>)>,
    line: usize,
}

impl Stanza {
    /// The value of field `name` (matched case-insensitively, as deb822 requires), with leading
    /// and trailing whitespace removed. Multi-line values keep their `\n` and the leading space
    /// of each continuation line.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| self.span(n).eq_ignore_ascii_case(name))
            .map(|(_, v)| self.span(v))
    }

    /// All fields in file order, as `(name, value)`.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.fields
            .iter()
            .map(|(n, v)| (self.span(n), self.span(v)))
    }

    /// 1-based line of the stanza's first field in its source, for error messages.
    pub fn line(&self) -> usize {
        self.line
    }

    /// The stanza exactly as it appeared in the source (comments removed).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn span(&self, r: &Range<u32>) -> &str {
        &self.text[r.start as usize..r.end as usize]
    }
}

/// Parses every stanza of `text`. `source_name` (a URL or path) only labels errors.
pub fn parse(text: &str, source_name: &str) -> Result<Vec<Stanza>> {
    let mut stanzas = Vec::new();
    let mut current: Option<Builder> = None;
    for (index, raw_line) in text.split('\n').enumerate() {
        let line_no = index + 1;
        let line = raw_line.strip_suffix('\r').unwrap_or(raw_line);
        if line.trim().is_empty() {
            if let Some(builder) = current.take() {
                stanzas.push(builder.finish());
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let err = |message: String| Error::Parse {
            source_name: source_name.to_string(),
            line: line_no,
            message,
        };
        if line.starts_with(' ') || line.starts_with('\t') {
            match current.as_mut() {
                Some(builder) if !builder.fields.is_empty() => builder.continuation(line),
                _ => return Err(err("continuation line before any field".into())),
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(err(format!("expected `Name: value`, found {line:?}")));
        };
        if name.is_empty() || name.contains(char::is_whitespace) || name.starts_with('-') {
            return Err(err(format!("invalid field name {name:?}")));
        }
        let builder = current.get_or_insert_with(|| Builder::new(line_no));
        if builder.has(name) {
            return Err(err(format!("field {name} appears twice in one stanza")));
        }
        builder.field(name, value);
    }
    if let Some(builder) = current.take() {
        stanzas.push(builder.finish());
    }
    Ok(stanzas)
}

struct Builder {
    text: String,
    fields: Vec<(Range<u32>, Range<u32>)>,
    line: usize,
}

impl Builder {
    fn new(line: usize) -> Self {
        Builder {
            text: String::new(),
            fields: Vec::new(),
            line,
        }
    }

    fn has(&self, name: &str) -> bool {
        self.fields
            .iter()
            .any(|(n, _)| self.text[n.start as usize..n.end as usize].eq_ignore_ascii_case(name))
    }

    fn field(&mut self, name: &str, value: &str) {
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        let name_start = pos(self.text.len());
        self.text.push_str(name);
        let name_end = pos(self.text.len());
        self.text.push(':');
        let value_start = pos(self.text.len());
        self.fields
            .push((name_start..name_end, value_start..value_start));
        self.append_value(value);
    }

    fn continuation(&mut self, line: &str) {
        self.text.push('\n');
        self.append_value(line);
    }

    /// Appends raw value text to the last field, keeping its span free of surrounding
    /// whitespace. Only the new part is scanned, so long multi-line fields (a Release file's
    /// thousands of hash lines) stay linear.
    fn append_value(&mut self, raw: &str) {
        let before = self.text.len();
        self.text.push_str(raw);
        let Some((_, value)) = self.fields.last_mut() else {
            return;
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return;
        }
        let lead = raw.len() - raw.trim_start().len();
        if value.start == value.end {
            value.start = pos(before + lead);
        }
        value.end = pos(before + lead + trimmed.len());
    }

    fn finish(self) -> Stanza {
        Stanza {
            text: self.text,
            fields: self.fields,
            line: self.line,
        }
    }
}

fn pos(offset: usize) -> u32 {
    // A single stanza over 4 GiB is not a deb822 file anyone produces; saturate rather than wrap.
    u32::try_from(offset).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_stanzas_and_continuations() {
        let text = "Package: foo\nVersion: 1.0-1\nDescription: short\n more text\n .\n last\n\n\n\
                    # a comment\npackage: bar\nDepends: a,\n b (>= 2)\n";
        let stanzas = parse(text, "test").unwrap();
        assert_eq!(stanzas.len(), 2);
        assert_eq!(stanzas[0].get("Package"), Some("foo"));
        assert_eq!(stanzas[0].get("version"), Some("1.0-1"));
        assert_eq!(
            stanzas[0].get("Description"),
            Some("short\n more text\n .\n last")
        );
        assert_eq!(stanzas[1].get("PACKAGE"), Some("bar"));
        assert_eq!(stanzas[1].get("Depends"), Some("a,\n b (>= 2)"));
        assert_eq!(stanzas[1].line(), 10);
        assert_eq!(stanzas[0].get("Missing"), None);
    }

    #[test]
    fn multi_line_field_with_empty_first_line() {
        let text = "SHA256:\n abc 12 main/Packages\n def 34 main/Packages.xz\nDate: x\n";
        let stanzas = parse(text, "Release").unwrap();
        let value = stanzas[0].get("SHA256").unwrap();
        let lines: Vec<&str> = value.lines().map(str::trim).collect();
        assert_eq!(lines, ["abc 12 main/Packages", "def 34 main/Packages.xz"]);
        assert_eq!(stanzas[0].get("Date"), Some("x"));
    }

    #[test]
    fn crlf_and_whitespace_only_separators() {
        let text = "A: 1\r\nB:  two words  \r\n \t \r\nA: 3\r\n";
        let stanzas = parse(text, "t").unwrap();
        assert_eq!(stanzas.len(), 2);
        assert_eq!(stanzas[0].get("B"), Some("two words"));
        assert_eq!(stanzas[1].get("A"), Some("3"));
        let fields: Vec<_> = stanzas[0].fields().collect();
        assert_eq!(fields, [("A", "1"), ("B", "two words")]);
    }

    #[test]
    fn errors_name_source_and_line() {
        let err = parse("A: 1\nnot a field\n", "dists/x/Release").unwrap_err();
        assert_eq!(
            err.to_string(),
            "dists/x/Release:2: expected `Name: value`, found \"not a field\""
        );
        let err = parse(" leading continuation\n", "f").unwrap_err();
        assert!(err.to_string().starts_with("f:1: continuation"), "{err}");
        let err = parse("A: 1\na: 2\n", "f").unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
    }
}

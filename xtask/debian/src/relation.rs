//! Package relationship fields (`Depends`, `Pre-Depends`, `Provides`, …) as Debian Policy §7.1
//! defines them: comma-separated groups of `|`-separated alternatives, each
//! `name[:archqual] [(op version)] [[arch …]] [<profile …>]`.

use debversion::Version;
use std::fmt;

/// A version comparison operator of a relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `<<`
    Lt,
    /// `<=` (and the deprecated `<`)
    Le,
    /// `=`
    Eq,
    /// `>=` (and the deprecated `>`)
    Ge,
    /// `>>`
    Gt,
}

impl Op {
    /// Whether `candidate op reference` holds.
    pub fn holds(self, candidate: &Version, reference: &Version) -> bool {
        let ord = candidate.cmp(reference);
        match self {
            Op::Lt => ord.is_lt(),
            Op::Le => ord.is_le(),
            Op::Eq => ord.is_eq(),
            Op::Ge => ord.is_ge(),
            Op::Gt => ord.is_gt(),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<<",
            Op::Le => "<=",
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Gt => ">>",
        }
    }
}

/// One package relation, e.g. `libc6 (>= 2.36)` or `perl:any`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Package (or virtual package) name.
    pub name: String,
    /// Architecture qualifier after `:` (`any`, `native` or an architecture).
    pub arch_qualifier: Option<String>,
    /// Version constraint.
    pub version: Option<(Op, Version)>,
    /// Architecture restriction list `[amd64 !i386]`: `(negated, arch)`. Empty: all.
    pub arches: Vec<(bool, String)>,
}

impl Relation {
    /// Whether the relation applies when building for `arch` (its `[…]` list admits it).
    pub fn applies_to(&self, arch: &str) -> bool {
        if self.arches.is_empty() {
            return true;
        }
        let matches = |pattern: &str| arch_matches(pattern, arch);
        if self.arches.iter().all(|(negated, _)| *negated) {
            !self.arches.iter().any(|(_, a)| matches(a))
        } else {
            self.arches
                .iter()
                .any(|(negated, a)| !negated && matches(a))
        }
    }

    /// Whether `version` satisfies this relation's constraint (none: always).
    pub fn accepts(&self, version: &Version) -> bool {
        match &self.version {
            None => true,
            Some((op, reference)) => op.holds(version, reference),
        }
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(q) = &self.arch_qualifier {
            write!(f, ":{q}")?;
        }
        if let Some((op, v)) = &self.version {
            write!(f, " ({} {v})", op.as_str())?;
        }
        Ok(())
    }
}

/// One comma-separated group: satisfied by any of its alternatives.
pub type Alternatives = Vec<Relation>;

/// Formats a group of alternatives as Debian writes it (`a | b (>= 1)`).
pub fn display_alternatives(group: &[Relation]) -> String {
    group
        .iter()
        .map(Relation::to_string)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Parses a relationship field into its groups. The error is a one-line description of what
/// is wrong; callers add the package and field.
pub fn parse(field: &str) -> Result<Vec<Alternatives>, String> {
    let mut groups = Vec::new();
    for group in field.split(',') {
        if group.trim().is_empty() {
            // dpkg tolerates a trailing comma; an empty group constrains nothing.
            continue;
        }
        let alternatives = group
            .split('|')
            .map(parse_one)
            .collect::<Result<Vec<_>, _>>()?;
        groups.push(alternatives);
    }
    Ok(groups)
}

/// Parses one relation without alternatives (e.g. a `Provides` entry or a request).
pub fn parse_one(text: &str) -> Result<Relation, String> {
    let mut rest = text.trim();
    let name_end = rest
        .find(|c: char| c.is_whitespace() || matches!(c, '(' | '[' | '<' | ':'))
        .unwrap_or(rest.len());
    let name = &rest[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
    {
        return Err(format!("invalid package name in {:?}", text.trim()));
    }
    rest = rest[name_end..].trim_start();
    let mut relation = Relation {
        name: name.to_string(),
        arch_qualifier: None,
        version: None,
        arches: Vec::new(),
    };
    if let Some(after) = rest.strip_prefix(':') {
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '(' | '[' | '<'))
            .unwrap_or(after.len());
        if end == 0 {
            return Err(format!("empty architecture qualifier in {:?}", text.trim()));
        }
        relation.arch_qualifier = Some(after[..end].to_string());
        rest = after[end..].trim_start();
    }
    if let Some(after) = rest.strip_prefix('(') {
        let (inner, tail) = after
            .split_once(')')
            .ok_or_else(|| format!("unclosed `(` in {:?}", text.trim()))?;
        relation.version = Some(parse_constraint(inner.trim(), text)?);
        rest = tail.trim_start();
    }
    if let Some(after) = rest.strip_prefix('[') {
        let (inner, tail) = after
            .split_once(']')
            .ok_or_else(|| format!("unclosed `[` in {:?}", text.trim()))?;
        for arch in inner.split_whitespace() {
            match arch.strip_prefix('!') {
                Some(a) => relation.arches.push((true, a.to_string())),
                None => relation.arches.push((false, arch.to_string())),
            }
        }
        rest = tail.trim_start();
    }
    // Build profiles (`<!nocheck>`) only restrict source builds; binary indexes never carry
    // them, so they are parsed for validity and otherwise ignored.
    while let Some(after) = rest.strip_prefix('<') {
        let (_, tail) = after
            .split_once('>')
            .ok_or_else(|| format!("unclosed `<` in {:?}", text.trim()))?;
        rest = tail.trim_start();
    }
    if !rest.is_empty() {
        return Err(format!("unexpected {rest:?} in {:?}", text.trim()));
    }
    Ok(relation)
}

fn parse_constraint(inner: &str, text: &str) -> Result<(Op, Version), String> {
    let (op, version) = [
        ("<<", Op::Lt),
        ("<=", Op::Le),
        (">=", Op::Ge),
        (">>", Op::Gt),
        ("=", Op::Eq),
        ("<", Op::Le),
        (">", Op::Ge),
    ]
    .iter()
    .find_map(|(token, op)| inner.strip_prefix(token).map(|v| (*op, v.trim())))
    .ok_or_else(|| {
        format!(
            "missing operator in version constraint of {:?}",
            text.trim()
        )
    })?;
    Ok((op, parse_version(version)?))
}

/// Parses a Debian version, accepting the few non-policy characters real archives contain.
pub fn parse_version(text: &str) -> Result<Version, String> {
    text.parse::<Version>()
        .or_else(|_| Version::parse_lenient(text))
        .map_err(|_| format!("invalid version {text:?}"))
}

/// dpkg architecture wildcard matching for the Linux architectures we deal with.
fn arch_matches(pattern: &str, arch: &str) -> bool {
    match pattern {
        "any" => true,
        "linux-any" => true,
        _ => match pattern.strip_prefix("any-") {
            Some(cpu) => cpu == arch,
            None => pattern == arch || pattern.strip_prefix("linux-") == Some(arch),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn groups_alternatives_versions_and_qualifiers() {
        let groups = parse(
            "libc6 (>= 2.34), debconf (>= 0.5) | debconf-2.0,perl:any,\n \
             libfoo(<<2:1.0~rc1-1) [amd64 !i386] <!nocheck>, python3:native (= 3.11.2-1+b1),",
        )
        .unwrap();
        assert_eq!(groups.len(), 5);
        assert_eq!(groups[0][0].name, "libc6");
        assert_eq!(groups[0][0].version, Some((Op::Ge, v("2.34"))));
        assert_eq!(groups[1].len(), 2);
        assert_eq!(groups[1][1].name, "debconf-2.0");
        assert_eq!(groups[1][1].version, None);
        assert_eq!(groups[2][0].name, "perl");
        assert_eq!(groups[2][0].arch_qualifier.as_deref(), Some("any"));
        let foo = &groups[3][0];
        assert_eq!(foo.name, "libfoo");
        assert_eq!(foo.version, Some((Op::Lt, v("2:1.0~rc1-1"))));
        assert_eq!(
            foo.arches,
            [(false, "amd64".to_string()), (true, "i386".to_string())]
        );
        assert!(foo.applies_to("amd64"));
        assert!(!foo.applies_to("arm64"));
        assert_eq!(groups[4].len(), 1);
        assert_eq!(groups[4][0].arch_qualifier.as_deref(), Some("native"));
        assert_eq!(groups[4][0].version, Some((Op::Eq, v("3.11.2-1+b1"))));
        assert_eq!(
            display_alternatives(&groups[1]),
            "debconf (>= 0.5) | debconf-2.0"
        );
    }

    #[test]
    fn negated_arch_lists_and_deprecated_operators() {
        let r = parse_one("foo [!i386 !armel]").unwrap();
        assert!(r.applies_to("amd64"));
        assert!(!r.applies_to("i386"));
        assert_eq!(parse_one("a (< 1)").unwrap().version.unwrap().0, Op::Le);
        assert_eq!(parse_one("a (> 1)").unwrap().version.unwrap().0, Op::Ge);
        assert_eq!(parse_one("a (>> 1)").unwrap().version.unwrap().0, Op::Gt);
        assert_eq!(parse_one("a (<= 1)").unwrap().version.unwrap().0, Op::Le);
    }

    #[test]
    fn rejects_malformed_relations() {
        assert!(parse("foo (>= 1").unwrap_err().contains("unclosed"));
        assert!(parse("Foo").unwrap_err().contains("invalid package name"));
        assert!(parse("foo (1.0)").unwrap_err().contains("missing operator"));
        assert!(parse("foo bar").unwrap_err().contains("unexpected"));
        assert!(parse("foo:").unwrap_err().contains("empty architecture"));
    }

    /// dpkg's ordering (cases from dpkg's own t/version test and Debian Policy §5.6.12).
    #[test]
    fn debian_version_ordering_table() {
        use std::cmp::Ordering::{Equal as E, Greater as G, Less as L};
        let table = [
            ("1.0", "1.0", E),
            ("1.0", "1.0-0", E),
            ("0:1.0", "1.0", E),
            ("1:0.1", "9.9", G),
            ("2:1.0", "1:9.9", G),
            ("1.0~rc1", "1.0", L),
            ("1.0~~", "1.0~", L),
            ("1.0~", "1.0", L),
            ("1.0", "1.0+b1", L),
            ("1.0-1", "1.0-1+deb12u1", L),
            ("1.0-1+deb12u1", "1.0-1+deb12u2", L),
            ("1.0-1+b1", "1.0-2", L),
            ("1.0-9", "1.0-10", L),
            ("1.9", "1.10", L),
            ("1.01", "1.1", E),
            ("1.0a", "1.0", G),
            ("1.0a", "1.0+", L),
            ("1.0.1", "1.0a", G),
            ("2.36-9+deb12u4", "2.36-9+deb12u10", L),
            ("1.21.1+git20250501-1", "1.21.1+git20250430-3", G),
            ("6.1.0-37", "6.1.0-9", G),
            ("1.2-3-4", "1.2-3-5", L),
        ];
        for (a, b, expected) in table {
            assert_eq!(v(a).cmp(&v(b)), expected, "{a} vs {b}");
            assert_eq!(v(b).cmp(&v(a)), expected.reverse(), "{b} vs {a}");
        }
        let r = parse_version("1.2-3-4").unwrap();
        assert_eq!(r.upstream_version, "1.2-3");
        assert_eq!(r.debian_revision.as_deref(), Some("4"));
        assert!(parse_version("").is_err());
    }

    #[test]
    fn operators_compare_debian_versions() {
        let r = parse_one("x (>= 1.0~rc1)").unwrap();
        assert!(r.accepts(&v("1.0")));
        assert!(r.accepts(&v("1.0~rc1")));
        assert!(!r.accepts(&v("1.0~beta")));
        let r = parse_one("x (<< 1:0)").unwrap();
        assert!(r.accepts(&v("99.9")));
        assert!(!r.accepts(&v("1:0")));
    }
}

//! containerd's filter syntax, for `Walk` (the `List` RPC).
//!
//! ```text
//! selectors := selector ("," selector)*
//! selector  := fieldpath (operator value)
//! fieldpath := field ('.' field)*
//! field     := quoted | [A-Za-z_][A-Za-z0-9_]*
//! operator  := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+
//! ```
//!
//! All selectors of one filter must match; a list of filters matches when
//! any of them does (an empty list matches everything). A selector without
//! operator tests for presence. The fields of a snapshot are `name`,
//! `parent`, `kind` (`view`, `active`, `committed`) and `labels.KEY`.
//! containerd itself sends, after a remote `Prepare`:
//! `labels."containerd.io/snapshot.ref"==sha256:...,parent=="ns/3/sha256:..."`.

use std::collections::BTreeMap;

use regex::Regex;

use crate::Error;

/// The fields of a snapshot that filters look at.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// The snapshot's name (key).
    pub name: &'a str,
    /// The parent's name, empty if none.
    pub parent: &'a str,
    /// `view`, `active` or `committed`.
    pub kind: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
}

impl Fields<'_> {
    fn get(&self, path: &[String]) -> Option<&str> {
        let (first, rest) = path.split_first()?;
        match (first.as_str(), rest.is_empty()) {
            ("name", true) => Some(self.name),
            ("parent", true) => Some(self.parent),
            ("kind", true) => Some(self.kind),
            ("labels", false) => self.labels.get(&rest.join(".")).map(String::as_str),
            _ => None,
        }
    }
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

impl Selector {
    fn matches(&self, fields: &Fields<'_>) -> bool {
        let value = fields.get(&self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value == Some(v.as_str()),
            Op::NotEqual(v) => value.unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.unwrap_or("")),
        }
    }
}

/// A parsed list of filters (any of them may match).
#[derive(Debug, Default)]
pub struct Filters {
    any: Vec<Vec<Selector>>,
}

impl Filters {
    /// Parses containerd filter strings; an empty list matches everything.
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Filters, Error> {
        let mut any = Vec::new();
        for f in filters {
            let f = f.as_ref();
            any.push(
                parse_one(f).map_err(|e| Error::InvalidArgument(format!("filter {f:?}: {e}")))?,
            );
        }
        Ok(Filters { any })
    }

    /// Whether a snapshot with `fields` matches.
    pub fn matches(&self, fields: &Fields<'_>) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(fields)))
    }
}

struct Parser<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        while self.chars.next_if(|c| c.is_whitespace()).is_some() {}
    }

    fn quoted(&mut self, quote: char) -> Result<String, String> {
        let mut out = String::new();
        loop {
            match self.chars.next() {
                None => return Err("unterminated quoted string".into()),
                Some(c) if c == quote => return Ok(out),
                Some('\\') if quote != '`' => match self.chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(c) => out.push(c),
                    None => return Err("unterminated escape".into()),
                },
                Some(c) => out.push(c),
            }
        }
    }

    fn field(&mut self) -> Result<String, String> {
        match self.chars.peek().copied() {
            Some(q @ ('"' | '`')) => {
                self.chars.next();
                self.quoted(q)
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let mut s = String::new();
                while let Some(c) = self
                    .chars
                    .next_if(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    s.push(c);
                }
                Ok(s)
            }
            Some(c) => Err(format!("unexpected {c:?} where a field name belongs")),
            None => Err("a field name is missing".into()),
        }
    }

    fn value(&mut self) -> Result<String, String> {
        match self.chars.peek().copied() {
            Some(q @ ('"' | '`' | '/' | '\'')) => {
                self.chars.next();
                self.quoted(q)
            }
            _ => {
                let mut s = String::new();
                while let Some(c) = self.chars.next_if(|c| *c != ',' && !c.is_whitespace()) {
                    s.push(c);
                }
                if s.is_empty() {
                    return Err("a value is missing".into());
                }
                Ok(s)
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        self.skip_space();
        let mut path = vec![self.field()?];
        while self.chars.next_if_eq(&'.').is_some() {
            path.push(self.field()?);
        }
        self.skip_space();
        let op = match self.chars.peek().copied() {
            None | Some(',') => Op::Present,
            Some(c @ ('=' | '!' | '~')) => {
                self.chars.next();
                if self.chars.next() != Some('=') {
                    return Err(format!("unknown operator starting with {c:?}"));
                }
                self.skip_space();
                let value = self.value()?;
                match c {
                    '=' => Op::Equal(value),
                    '!' => Op::NotEqual(value),
                    _ => Op::Matches(Regex::new(&value).map_err(|e| e.to_string())?),
                }
            }
            Some(c) => return Err(format!("unexpected {c:?} after a field path")),
        };
        self.skip_space();
        Ok(Selector { path, op })
    }
}

fn parse_one(s: &str) -> Result<Vec<Selector>, String> {
    let mut p = Parser {
        chars: s.chars().peekable(),
    };
    let mut all = Vec::new();
    p.skip_space();
    if p.chars.peek().is_none() {
        return Ok(all);
    }
    loop {
        all.push(p.selector()?);
        match p.chars.next() {
            None => return Ok(all),
            Some(',') => continue,
            Some(c) => return Err(format!("unexpected {c:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(labels: &'a BTreeMap<String, String>) -> Fields<'a> {
        Fields {
            name: "default/3/sha256:abc",
            parent: "default/2/sha256:def",
            kind: "committed",
            labels,
        }
    }

    fn check(filters: &[&str], labels: &BTreeMap<String, String>) -> bool {
        match Filters::parse(filters) {
            Ok(f) => f.matches(&fields(labels)),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn containerd_remote_lookup() {
        let labels = BTreeMap::from([(
            "containerd.io/snapshot.ref".to_owned(),
            "sha256:abc".to_owned(),
        )]);
        assert!(check(
            &[r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/2/sha256:def""#],
            &labels
        ));
        assert!(!check(
            &[r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="other""#],
            &labels
        ));
        assert!(check(&[], &labels));
        assert!(check(&[""], &labels));
    }

    #[test]
    fn operators() {
        let labels = BTreeMap::from([("a.b".to_owned(), "x y".to_owned())]);
        assert!(check(&["kind==committed"], &labels));
        assert!(check(&["kind!=view"], &labels));
        assert!(check(&["name~=^default/"], &labels));
        assert!(check(&["labels.a.b"], &labels));
        assert!(!check(&["labels.c"], &labels));
        assert!(check(&[r#"labels."a.b"=="x y""#], &labels));
        assert!(check(&["kind==view", "kind==committed"], &labels));
        assert!(!check(&["kind==view,kind==committed"], &labels));
        assert!(check(&[" kind == committed , name "], &labels));
    }

    #[test]
    fn errors() {
        for bad in [
            "kind=committed",
            "kind==",
            "\"unterminated",
            "name~=(",
            ",",
            "9x",
        ] {
            assert!(Filters::parse(&[bad]).is_err(), "{bad}");
        }
    }
}

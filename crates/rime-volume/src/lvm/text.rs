//! LVM2's text metadata format: the configuration syntax a volume group is described in.
//!
//! ```text
//! rhel {
//!     id = "4nYI8d-..."
//!     seqno = 2
//!     status = ["RESIZEABLE", "READ", "WRITE"]
//!     physical_volumes { pv0 { pe_start = 2048 ... } }
//! }
//! contents = "Text Format Volume Group"
//! ```
//!
//! Sections hold assignments (`name = value`) and nested sections; values are integers,
//! quoted strings (with `\"` and `\\` escapes) or lists of them; `#` starts a comment. The text
//! comes from disk, so the parser is strict and bounded: nesting deeper than [`MAX_DEPTH`], a
//! text longer than [`MAX_TEXT`], an unterminated string or section are errors, never panics.

use anyhow::{bail, Context, Result};

/// LVM keeps metadata areas of about 1 MiB; a volume group description this large is damage.
pub const MAX_TEXT: usize = 16 << 20;
/// Volume groups nest four deep (`vg { logical_volumes { lv { segment1 { ... } } } }`).
const MAX_DEPTH: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Int(i64),
    Str(String),
    List(Vec<Value>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Value(Value),
    Section(Section),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub items: Vec<(String, Item)>,
}

impl Section {
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.items.iter().find_map(|(k, i)| match i {
            Item::Value(v) if k == key => Some(v),
            _ => None,
        })
    }

    pub fn section(&self, key: &str) -> Option<&Section> {
        self.sections().find(|s| s.name == key)
    }

    pub fn sections(&self) -> impl Iterator<Item = &Section> {
        self.items.iter().filter_map(|(_, i)| match i {
            Item::Section(s) => Some(s),
            _ => None,
        })
    }

    pub fn int(&self, key: &str) -> Result<i64> {
        match self.value(key) {
            Some(Value::Int(n)) => Ok(*n),
            Some(_) => bail!("'{key}' in section '{}' is not a number", self.name),
            None => bail!("section '{}' has no '{key}'", self.name),
        }
    }

    /// A non-negative integer.
    pub fn uint(&self, key: &str) -> Result<u64> {
        let n = self.int(key)?;
        u64::try_from(n).with_context(|| format!("'{key}' in section '{}' is negative", self.name))
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        match self.value(key) {
            Some(Value::Str(s)) => Ok(s),
            Some(_) => bail!("'{key}' in section '{}' is not a string", self.name),
            None => bail!("section '{}' has no '{key}'", self.name),
        }
    }

    pub fn list(&self, key: &str) -> Result<&[Value]> {
        match self.value(key) {
            Some(Value::List(l)) => Ok(l),
            Some(_) => bail!("'{key}' in section '{}' is not a list", self.name),
            None => bail!("section '{}' has no '{key}'", self.name),
        }
    }

    /// The strings of a list such as `status = ["READ", "WRITE"]`; absent means empty.
    pub fn flags(&self, key: &str) -> Vec<&str> {
        match self.value(key) {
            Some(Value::List(l)) => l
                .iter()
                .filter_map(|v| match v {
                    Value::Str(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Parses a whole metadata text into an unnamed top-level section.
pub fn parse(text: &str) -> Result<Section> {
    if text.len() > MAX_TEXT {
        bail!("LVM metadata text of {} bytes is larger than any LVM writes", text.len());
    }
    let mut p = Parser { s: text.as_bytes(), pos: 0 };
    let items = p.items(0)?;
    p.skip_blank();
    if p.pos < p.s.len() {
        bail!("unexpected '{}' at byte {} of the LVM metadata", p.s[p.pos] as char, p.pos);
    }
    Ok(Section { name: String::new(), items })
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_blank(&mut self) {
        while let Some(c) = self.peek() {
            if c == b'#' {
                while self.peek().is_some_and(|c| c != b'\n') {
                    self.pos += 1;
                }
            } else if c.is_ascii_whitespace() || c == 0 {
                // LVM pads the metadata text with NULs in some versions.
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        self.skip_blank();
        if self.peek() != Some(c) {
            bail!("expected '{}' at byte {} of the LVM metadata", c as char, self.pos);
        }
        self.pos += 1;
        Ok(())
    }

    /// Items until `}` (inside a section) or the end (at the top).
    fn items(&mut self, depth: usize) -> Result<Vec<(String, Item)>> {
        if depth > MAX_DEPTH {
            bail!("LVM metadata nests deeper than {MAX_DEPTH} sections");
        }
        let mut items = Vec::new();
        loop {
            self.skip_blank();
            match self.peek() {
                None => {
                    if depth > 0 {
                        bail!("LVM metadata ends inside a section");
                    }
                    return Ok(items);
                }
                Some(b'}') if depth > 0 => {
                    self.pos += 1;
                    return Ok(items);
                }
                Some(_) => {}
            }
            let name = self.identifier()?;
            self.skip_blank();
            match self.peek() {
                Some(b'=') => {
                    self.pos += 1;
                    let v = self.value(true)?;
                    items.push((name, Item::Value(v)));
                }
                Some(b'{') => {
                    self.pos += 1;
                    let inner = self.items(depth + 1)?;
                    items.push((name.clone(), Item::Section(Section { name, items: inner })));
                }
                _ => bail!("expected '=' or '{{' after '{name}' at byte {} of the LVM metadata", self.pos),
            }
        }
    }

    fn identifier(&mut self) -> Result<String> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || b"_-+.".contains(&c)) {
            self.pos += 1;
        }
        if start == self.pos {
            bail!("expected a name at byte {} of the LVM metadata", self.pos);
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }

    fn value(&mut self, list_allowed: bool) -> Result<Value> {
        self.skip_blank();
        match self.peek() {
            Some(b'"') => self.string().map(Value::Str),
            Some(b'[') if list_allowed => {
                self.pos += 1;
                let mut list = Vec::new();
                loop {
                    self.skip_blank();
                    if self.peek() == Some(b']') {
                        self.pos += 1;
                        return Ok(Value::List(list));
                    }
                    if !list.is_empty() {
                        self.expect(b',')?;
                    }
                    list.push(self.value(false)?);
                }
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => self.number(),
            Some(c) => bail!("unexpected '{}' at byte {} of the LVM metadata", c as char, self.pos),
            None => bail!("LVM metadata ends where a value was expected"),
        }
    }

    fn string(&mut self) -> Result<String> {
        self.pos += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => bail!("unterminated string in the LVM metadata"),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                Some(b'\\') => {
                    let c = self.s.get(self.pos + 1).copied().context("unterminated string in the LVM metadata")?;
                    out.push(c);
                    self.pos += 2;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// Integers; LVM writes floats only for informational fields, which are kept as their
    /// integer part.
    fn number(&mut self) -> Result<Value> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        let int_end = self.pos;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
        }
        let digits = std::str::from_utf8(&self.s[start..int_end]).expect("ASCII digits");
        let n = digits.parse::<i64>().with_context(|| format!("bad number '{digits}' in the LVM metadata"))?;
        Ok(Value::Int(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_volume_group() {
        let text = "vg {\n id = \"a-b\"\n seqno = 3 # comment\n status = [\"READ\", \"WRITE\"]\n \
                    physical_volumes { pv0 { pe_start = 2048 } }\n}\ncontents = \"Text \\\"Format\\\"\"\nversion = 1\n\0\0";
        let top = parse(text).unwrap();
        let vg = top.section("vg").unwrap();
        assert_eq!(vg.str("id").unwrap(), "a-b");
        assert_eq!(vg.uint("seqno").unwrap(), 3);
        assert_eq!(vg.flags("status"), ["READ", "WRITE"]);
        assert_eq!(vg.section("physical_volumes").unwrap().section("pv0").unwrap().uint("pe_start").unwrap(), 2048);
        assert_eq!(top.str("contents").unwrap(), "Text \"Format\"");
    }

    #[test]
    fn damage_is_an_error() {
        for bad in ["vg {", "vg { a = \"x }", "vg { a = [1, }", "a = = 1", "vg } }", &"a { ".repeat(40)] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}

//! A strict little XML reader for checking netrace's SVG: well-formedness (one root, balanced
//! and properly nested tags, quoted and unique attributes, only the five predefined or
//! numeric entities, no stray `<` or `&`) and an element tree to query. No DTDs, no CDATA
//! (netrace writes neither).

use anyhow::{bail, Result};

/// An element with its attributes, child elements and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Tag name.
    pub name: String,
    /// Attributes in document order, values unescaped.
    pub attrs: Vec<(String, String)>,
    /// Child elements.
    pub children: Vec<Element>,
    /// Text directly inside, unescaped and concatenated.
    pub text: String,
}

impl Element {
    /// The value of attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every element named `name` below this one (depth first, document order).
    pub fn descendants(&self, name: &str) -> Vec<&Element> {
        let mut out = Vec::new();
        for c in &self.children {
            if c.name == name {
                out.push(c);
            }
            out.extend(c.descendants(name));
        }
        out
    }
}

struct Reader<'a> {
    s: &'a [u8],
    i: usize,
}

fn is_name_char(c: u8, first: bool) -> bool {
    c.is_ascii_alphabetic()
        || c == b'_'
        || c == b':'
        || (!first && (c.is_ascii_digit() || c == b'-' || c == b'.'))
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn starts(&self, p: &str) -> bool {
        self.s[self.i..].starts_with(p.as_bytes())
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn skip_past(&mut self, end: &str) -> Result<()> {
        match self.s[self.i..]
            .windows(end.len())
            .position(|w| w == end.as_bytes())
        {
            Some(p) => {
                self.i += p + end.len();
                Ok(())
            }
            None => bail!("unterminated construct at byte {}: no {end}", self.i),
        }
    }
    fn name(&mut self) -> Result<String> {
        let start = self.i;
        while let Some(c) = self.peek() {
            if !is_name_char(c, self.i == start) {
                break;
            }
            self.i += 1;
        }
        if self.i == start {
            bail!("expected a name at byte {start}");
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    /// Skips comments, processing instructions and white space between markup.
    fn misc(&mut self) -> Result<()> {
        loop {
            self.skip_ws();
            if self.starts("<!--") {
                self.skip_past("-->")?;
            } else if self.starts("<?") {
                self.skip_past("?>")?;
            } else {
                return Ok(());
            }
        }
    }
    fn element(&mut self, depth: usize) -> Result<Element> {
        if depth > 64 {
            bail!("nesting deeper than 64");
        }
        if self.peek() != Some(b'<') {
            bail!("expected '<' at byte {}", self.i);
        }
        self.i += 1;
        let name = self.name()?;
        let mut el = Element {
            name,
            attrs: Vec::new(),
            children: Vec::new(),
            text: String::new(),
        };
        loop {
            let before = self.i;
            self.skip_ws();
            match self.peek() {
                Some(b'/') => {
                    if self.s.get(self.i + 1) != Some(&b'>') {
                        bail!("expected '/>' at byte {}", self.i);
                    }
                    self.i += 2;
                    return Ok(el);
                }
                Some(b'>') => {
                    self.i += 1;
                    break;
                }
                Some(_) => {
                    if self.i == before {
                        bail!(
                            "attributes of <{}> not separated by space at byte {}",
                            el.name,
                            self.i
                        );
                    }
                    let k = self.name()?;
                    self.skip_ws();
                    if self.peek() != Some(b'=') {
                        bail!("attribute {k} of <{}> has no value", el.name);
                    }
                    self.i += 1;
                    self.skip_ws();
                    let q = match self.peek() {
                        Some(q @ (b'"' | b'\'')) => q,
                        _ => bail!("attribute {k} of <{}> is not quoted", el.name),
                    };
                    self.i += 1;
                    let start = self.i;
                    while self.peek().is_some_and(|c| c != q) {
                        if self.peek() == Some(b'<') {
                            bail!("'<' inside attribute {k} of <{}>", el.name);
                        }
                        self.i += 1;
                    }
                    if self.peek().is_none() {
                        bail!("unterminated attribute {k}");
                    }
                    let v = unescape(&String::from_utf8_lossy(&self.s[start..self.i]))?;
                    self.i += 1;
                    if el.attrs.iter().any(|(a, _)| *a == k) {
                        bail!("attribute {k} twice on <{}>", el.name);
                    }
                    el.attrs.push((k, v));
                }
                None => bail!("unterminated start tag <{}>", el.name),
            }
        }
        loop {
            let start = self.i;
            while self.peek().is_some_and(|c| c != b'<') {
                self.i += 1;
            }
            el.text
                .push_str(&unescape(&String::from_utf8_lossy(&self.s[start..self.i]))?);
            if self.peek().is_none() {
                bail!("<{}> is never closed", el.name);
            }
            if self.starts("</") {
                self.i += 2;
                let end = self.name()?;
                self.skip_ws();
                if end != el.name || self.peek() != Some(b'>') {
                    bail!("<{}> closed by </{end}> at byte {}", el.name, self.i);
                }
                self.i += 1;
                return Ok(el);
            }
            if self.starts("<!--") {
                self.skip_past("-->")?;
            } else if self.starts("<?") {
                self.skip_past("?>")?;
            } else if self.starts("<!") {
                bail!("unsupported markup at byte {}", self.i);
            } else {
                let child = self.element(depth + 1)?;
                el.children.push(child);
            }
        }
    }
}

fn unescape(s: &str) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        let after = &rest[p + 1..];
        let Some(end) = after.find(';') else {
            bail!("bare '&' in {s:?}");
        };
        let ent = &after[..end];
        let c = match ent {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let n = if let Some(h) = ent.strip_prefix("#x") {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = ent.strip_prefix('#') {
                    d.parse().ok()
                } else {
                    None
                };
                match n.and_then(char::from_u32) {
                    Some(c) => c,
                    None => bail!("unknown entity &{ent}; in {s:?}"),
                }
            }
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses a whole document; fails unless it is well-formed with exactly one root element.
pub fn parse(doc: &str) -> Result<Element> {
    let mut r = Reader {
        s: doc.as_bytes(),
        i: 0,
    };
    r.misc()?;
    let root = r.element(0)?;
    r.misc()?;
    if r.i != r.s.len() {
        bail!("content after the root element at byte {}", r.i);
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_and_rejects_the_rest() {
        let ok = parse(
            "<?xml version=\"1.0\"?>\n<svg a=\"1\" b='x &amp; y'><rect/><g><rect><title>1-2: &lt;3</title></rect></g>text</svg>\n",
        );
        let root = match ok {
            Ok(r) => r,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(root.attr("b"), Some("x & y"));
        assert_eq!(root.descendants("rect").len(), 2);
        assert_eq!(root.descendants("title")[0].text, "1-2: <3");
        for bad in [
            "<a><b></a></b>",
            "<a>",
            "<a x=1/>",
            "<a x=\"1\" x=\"2\"/>",
            "<a>&bogus;</a>",
            "<a>x & y</a>",
            "<a/><b/>",
            "<a x=\"1\"y=\"2\"/>",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad}");
        }
    }
}

//! Generators and checks shared by the property tests.
#![allow(dead_code)]

use farm_proto::prompt::{Character, Diagnostic, CHARACTER_FIELDS, GENERAL_TAG_FIELDS};
use proptest::prelude::*;

/// A field value: how it is written in XML and what it means.
#[derive(Debug, Clone)]
pub struct Val {
    pub raw: String,
    pub decoded: String,
}

pub fn val() -> impl Strategy<Value = Val> {
    let piece = prop_oneof![
        4 => "[a-z0-9_ ,()$\u{e9}\u{732b}]{1,8}".prop_map(|s| (s.clone(), s)),
        1 => Just(("&amp;".to_string(), "&".to_string())),
        1 => Just(("&lt;".to_string(), "<".to_string())),
        1 => Just(("&gt;".to_string(), ">".to_string())),
        1 => Just(("&quot;".to_string(), "\"".to_string())),
        1 => Just(("&apos;".to_string(), "'".to_string())),
        1 => Just(("&#x41;".to_string(), "A".to_string())),
        1 => Just(("&#233;".to_string(), "\u{e9}".to_string())),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|pieces| {
        let mut v = Val { raw: String::new(), decoded: String::new() };
        for (r, d) in pieces {
            v.raw.push_str(&r);
            v.decoded.push_str(&d);
        }
        v
    })
}

/// A generated well-formed prompt, what parsing it must give, and where its tags are.
#[derive(Debug, Clone)]
pub struct GenPrompt {
    pub input: String,
    pub characters: Vec<Character>,
    pub general_tags: Vec<(String, String)>,
    pub caption: Option<String>,
    pub style: Option<String>,
    /// Byte offset and name of every start tag.
    pub starts: Vec<(usize, String)>,
    /// Byte offset and name of every end tag.
    pub ends: Vec<(usize, String)>,
}

#[derive(Debug, Clone)]
struct Desc {
    lead: String,
    trail: String,
    seps: Vec<String>,
    style: Option<Val>,
    image: bool,
    characters: Vec<(u32, Vec<(usize, Val)>)>,
    general: Option<Vec<(usize, Val)>>,
    caption: Option<Val>,
}

struct Builder {
    out: String,
    seps: Vec<String>,
    next_sep: usize,
    starts: Vec<(usize, String)>,
    ends: Vec<(usize, String)>,
}

impl Builder {
    fn sep(&mut self) {
        let s = &self.seps[self.next_sep % self.seps.len()];
        self.out.push_str(s);
        self.next_sep += 1;
    }
    fn open(&mut self, name: &str) {
        self.starts.push((self.out.len(), name.to_string()));
        self.out.push('<');
        self.out.push_str(name);
        self.out.push('>');
    }
    fn close(&mut self, name: &str) {
        self.ends.push((self.out.len(), name.to_string()));
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
    }
    fn leaf(&mut self, name: &str, v: &Val) {
        self.open(name);
        self.out.push_str(&v.raw);
        self.close(name);
    }
}

fn build(d: Desc) -> GenPrompt {
    let mut b =
        Builder { out: d.lead.clone(), seps: d.seps.clone(), next_sep: 0, starts: vec![], ends: vec![] };
    let mut g = GenPrompt {
        input: String::new(),
        characters: vec![],
        general_tags: vec![],
        caption: None,
        style: None,
        starts: vec![],
        ends: vec![],
    };
    if let Some(s) = &d.style {
        b.leaf("style", s);
        b.sep();
        g.style = Some(s.decoded.trim().to_string());
    }
    if d.image {
        b.open("image");
        b.sep();
    }
    for (index, fields) in &d.characters {
        let name = format!("character_{index}");
        b.open(&name);
        b.sep();
        let mut c = Character { index: *index, fields: vec![] };
        for (fi, v) in fields {
            let tag = CHARACTER_FIELDS[*fi];
            b.leaf(tag, v);
            b.sep();
            c.fields.push((tag.to_string(), v.decoded.trim().to_string()));
        }
        b.close(&name);
        b.sep();
        g.characters.push(c);
    }
    if let Some(fields) = &d.general {
        b.open("general_tags");
        b.sep();
        for (fi, v) in fields {
            let tag = GENERAL_TAG_FIELDS[*fi];
            b.leaf(tag, v);
            b.sep();
            g.general_tags.push((tag.to_string(), v.decoded.trim().to_string()));
        }
        b.close("general_tags");
        b.sep();
    }
    if let Some(c) = &d.caption {
        b.leaf("caption", c);
        b.sep();
        g.caption = Some(c.decoded.trim().to_string());
    }
    if d.image {
        b.close("image");
    }
    b.out.push_str(&d.trail);
    g.input = b.out;
    g.starts = b.starts;
    g.ends = b.ends;
    g
}

fn ws() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("\n".to_string()),
        Just("  ".to_string()),
        Just("\n\t ".to_string()),
        Just("\r\n".to_string())
    ]
}

/// Well-formed prompts with up to four characters, optional general tags, caption, style and `<image>` root.
pub fn gen_prompt() -> impl Strategy<Value = GenPrompt> {
    let character = (1u32..30, prop::collection::vec((0..CHARACTER_FIELDS.len(), val()), 0..5));
    let general = prop::option::of(prop::collection::vec((0..GENERAL_TAG_FIELDS.len(), val()), 0..6));
    (
        ws(),
        ws(),
        prop::collection::vec(ws(), 1..8),
        prop::option::of(val()),
        any::<bool>(),
        prop::collection::vec(character, 0..4),
        general,
        prop::option::of(val()),
    )
        .prop_map(|(lead, trail, seps, style, image, characters, general, caption)| {
            let mut d = Desc { lead, trail, seps, style, image, characters, general, caption };
            if d.style.is_none() && d.characters.is_empty() && d.general.is_none() && d.caption.is_none() {
                d.caption = Some(Val { raw: String::new(), decoded: String::new() });
            }
            build(d)
        })
}

/// Plain prompts: never markup.
pub fn gen_plain() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_ ,.()!?&>;:'\"\u{e9}\u{732b}-]{0,60}[a-z]".prop_map(|s| s.trim().to_string())
}

/// 1-based line and column of byte `offset` in `s` (columns in characters), written independently of
/// the library.
pub fn position_of(s: &str, offset: usize) -> (u32, u32) {
    let before = &s[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |p| p + 1);
    let column = before[line_start..].chars().count() + 1;
    (line as u32, column as u32)
}

/// Whether a diagnostic points at a place inside `s` (or just past the end of a line).
pub fn in_bounds(s: &str, d: &Diagnostic) -> bool {
    let lines: Vec<&str> = s.split('\n').collect();
    d.line >= 1
        && (d.line as usize) <= lines.len()
        && d.column >= 1
        && (d.column as usize) <= lines[d.line as usize - 1].chars().count() + 1
}

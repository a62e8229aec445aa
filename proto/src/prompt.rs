//! The NewBie XML prompt language: parse, validate, limits, warnings.
//!
//! NewBie-image-Exp0.1 has no prompt parser in its model path: the prompt text is handed verbatim to both
//! text encoders (`newbie-model.md` §7.4), with a training system prompt in front of it for Gemma (§7.2).
//! This module therefore never rewrites a prompt. [`parse_prompt`] checks it, enforces size limits, and
//! extracts the structure for display and validation; [`ParsedPrompt::text`] is exactly what the encoders
//! receive: the input with surrounding whitespace (and a leading byte-order mark) removed, nothing else.
//!
//! # Prompt kinds
//!
//! A prompt is [`PromptKind::Xml`] when it contains markup, that is a `<` directly followed by a letter,
//! `_`, `:`, `/`, `!` or `?`. Otherwise it is [`PromptKind::Plain`] (Danbooru tags or natural language) and
//! is accepted as it is: `&`, `<3` or `a < b` mean nothing special there. Once a prompt contains markup
//! it must be a well-formed XML fragment: a literal `<` or `&` is then written `&lt;` / `&amp;` (the
//! encoders still see the escaped form, since the text is verbatim).
//!
//! # Structure
//!
//! A fragment is a sequence of top-level items, optionally wrapped in one `<image>` root:
//!
//! * `<character_N>` (N = 1, 2, ..., written without leading zeros) with the children in
//!   [`CHARACTER_FIELDS`]; each child becomes one `(tag, text)` entry of [`Character::fields`], in order.
//! * `<general_tags>` with the children in [`GENERAL_TAG_FIELDS`], collected into
//!   [`ParsedPrompt::general_tags`] (several `<general_tags>` elements are merged, in order).
//! * `<caption>` (natural language) into [`ParsedPrompt::caption`], and `<style>` (the optional leading
//!   style line) into [`ParsedPrompt::style`]; repeated elements are joined with a newline.
//!
//! Field values are the element's character data with references resolved, trimmed.
//!
//! Rules for everything else:
//!
//! * Unknown tags are warnings (`unknown_tag`), never errors. An unknown child of `<character_N>` or
//!   `<general_tags>` is still recorded as a field; an element nested inside a field contributes its text
//!   to that field; an unknown top-level element (and all it contains) is skipped.
//! * Top-level text outside elements ("loose text", e.g. `masterpiece, <character_1>...`) is allowed
//!   without a warning; each non-blank run is kept, trimmed, in [`ParsedPrompt::loose_text`]. Text
//!   directly inside `<character_N>` or `<general_tags>` is recorded as a field named `#text`.
//! * Attributes are allowed (they must be well-formed) and ignored.
//! * Comments and CDATA sections are allowed. References must be the five predefined entities
//!   (`&amp;` `&lt;` `&gt;` `&quot;` `&apos;`) or character references; any other is an `entity` error.
//! * `<!DOCTYPE>` is a `doctype` error, `<!ENTITY>` an `entity` error, and processing instructions
//!   (including an `<?xml ...?>` declaration) are `xml_syntax` errors.
//! * Mismatched, unmatched and unclosed tags are `xml_syntax` errors naming the tag; an unclosed tag is
//!   reported at its opening `<`, a mismatched closing tag at its own `<` (naming where the open one is).
//!
//! # Limits
//!
//! [`PromptLimits`]: `max_bytes` of [`ParsedPrompt::text`] (`too_large`, reported at the first character
//! past the limit), `max_depth` of element nesting (`too_deep`; `<image><character_1><n>` is depth 3),
//! and `max_characters` `<character_N>` elements (`too_many_characters`).
//!
//! # Positions
//!
//! Every [`Diagnostic`] carries a 1-based line and column relative to the string passed to
//! [`parse_prompt`] (after a leading byte-order mark, if any). Lines are separated by `\n`; columns count
//! Unicode scalar values (characters), not bytes.

use std::fmt;

use quick_xml::events::attributes::AttrError;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// Gemma system prompt used in training for XML captions (`newbie-model.md` §7.2). Note the trailing space.
pub const XML_SYSTEM_PROMPT: &str =
    "You are an assistant designed to generate high-quality anime images based on xml format prompts. <Prompt Start> ";

/// Gemma system prompt used in training for all other captions (§7.2). Note the trailing space.
pub const TEXT_SYSTEM_PROMPT: &str = "You are an assistant designed to generate high-quality anime images with the highest degree of image-text alignment based on textual prompts. <Prompt Start> ";

/// Children of `<character_N>` that the format defines.
pub const CHARACTER_FIELDS: &[&str] = &[
    "n",
    "gender",
    "appearance",
    "clothing",
    "expression",
    "action",
    "interaction",
    "position",
    "body_type",
];

/// Children of `<general_tags>` that the format defines.
pub const GENERAL_TAG_FIELDS: &[&str] = &[
    "count",
    "style",
    "background",
    "atmosphere",
    "quality",
    "objects",
    "other",
    "artists",
    "body_type",
    "environment",
    "perspective",
    "lighting",
    "resolution",
    "extra_tags",
];

/// Field name used for text written directly inside `<character_N>` or `<general_tags>`.
pub const MIXED_TEXT_FIELD: &str = "#text";

/// The [`Diagnostic::code`] values.
pub mod codes {
    /// Malformed XML: bad or mismatched tags, bad references, processing instructions.
    pub const XML_SYNTAX: &str = "xml_syntax";
    /// A `<!DOCTYPE>` declaration.
    pub const DOCTYPE: &str = "doctype";
    /// An entity declaration or a reference to an entity other than the five predefined ones.
    pub const ENTITY: &str = "entity";
    /// The prompt is longer than [`super::PromptLimits::max_bytes`].
    pub const TOO_LARGE: &str = "too_large";
    /// Elements nest deeper than [`super::PromptLimits::max_depth`].
    pub const TOO_DEEP: &str = "too_deep";
    /// More `<character_N>` elements than [`super::PromptLimits::max_characters`].
    pub const TOO_MANY_CHARACTERS: &str = "too_many_characters";
    /// A tag the prompt format does not define (warning only).
    pub const UNKNOWN_TAG: &str = "unknown_tag";
    /// The prompt is empty or whitespace only.
    pub const EMPTY: &str = "empty";
    /// A control character other than tab, line feed and carriage return (NUL, escape, ...).
    pub const CONTROL_CHARACTER: &str = "control_character";
}

/// Limits enforced by [`parse_prompt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptLimits {
    /// Most bytes of the trimmed prompt text.
    pub max_bytes: usize,
    /// Deepest element nesting (a top-level element is depth 1).
    pub max_depth: usize,
    /// Most `<character_N>` elements.
    pub max_characters: usize,
}

impl Default for PromptLimits {
    /// 16 KiB, depth 4, 16 characters.
    fn default() -> Self {
        PromptLimits { max_bytes: 16 * 1024, max_depth: 4, max_characters: 16 }
    }
}

/// Whether a prompt is XML markup or plain text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromptKind {
    /// The prompt contains markup and is a well-formed XML fragment.
    Xml,
    /// Plain Danbooru tags or natural language, no markup.
    Plain,
}

/// One `<character_N>` element.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Character {
    /// N of `<character_N>`.
    pub index: u32,
    /// `(tag, text)` of each child element, in document order.
    pub fields: Vec<(String, String)>,
}

impl Character {
    /// Text of the first field with this tag.
    pub fn field(&self, tag: &str) -> Option<&str> {
        self.fields.iter().find(|(t, _)| t == tag).map(|(_, v)| v.as_str())
    }
}

/// A checked prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedPrompt {
    /// Exactly what the encoders receive: the input, trimmed, otherwise unchanged.
    pub text: String,
    /// XML or plain.
    pub kind: PromptKind,
    /// The `<character_N>` elements, in document order.
    pub characters: Vec<Character>,
    /// `(tag, text)` of each child of `<general_tags>`, in document order.
    pub general_tags: Vec<(String, String)>,
    /// Text of `<caption>`.
    pub caption: Option<String>,
    /// Text of the top-level `<style>` element.
    pub style: Option<String>,
    /// Non-blank runs of top-level text outside elements, trimmed.
    pub loose_text: Vec<String>,
    /// Warnings (unknown tags), in document order.
    pub warnings: Vec<Diagnostic>,
}

impl ParsedPrompt {
    /// The training system prompt for this kind of prompt: [`XML_SYSTEM_PROMPT`] or [`TEXT_SYSTEM_PROMPT`].
    pub fn system_prompt(&self) -> &'static str {
        match self.kind {
            PromptKind::Xml => XML_SYSTEM_PROMPT,
            PromptKind::Plain => TEXT_SYSTEM_PROMPT,
        }
    }

    /// The Gemma input: system prompt followed directly by the prompt text. (Jina gets [`Self::text`] alone.)
    pub fn gemma_text(&self) -> String {
        let mut s = String::with_capacity(self.system_prompt().len() + self.text.len());
        s.push_str(self.system_prompt());
        s.push_str(&self.text);
        s
    }

    /// Text of the first general tag with this name.
    pub fn general_tag(&self, tag: &str) -> Option<&str> {
        self.general_tags.iter().find(|(t, _)| t == tag).map(|(_, v)| v.as_str())
    }
}

/// An error or warning at a position in the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
    /// One of [`codes`].
    pub code: &'static str,
    /// Human-readable description.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
    }
}

impl std::error::Error for Diagnostic {}

/// 1-based line and column (in characters) of byte `offset` in `src`. An offset inside a multi-byte
/// character counts as that character; an offset past the end is clamped to the end.
pub(crate) fn line_column(src: &[u8], offset: usize) -> (u32, u32) {
    let offset = offset.min(src.len());
    let head = &src[..offset];
    let (line_start, line) = match head.iter().rposition(|&b| b == b'\n') {
        Some(p) => (p + 1, head.iter().filter(|&&b| b == b'\n').count() + 1),
        None => (0, 1),
    };
    let mut column = head[line_start..].iter().filter(|&&b| (b & 0xC0) != 0x80).count() + 1;
    if src.get(offset).is_some_and(|&b| (b & 0xC0) == 0x80) && column > 1 {
        column -= 1;
    }
    (saturate(line), saturate(column))
}

pub(crate) fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Refuses control characters other than tab, line feed and carriage return (a NUL byte cannot be
/// stored, and the others are never meant as prompt text). The diagnostic points at the first one.
pub fn check_characters(text: &str) -> Result<(), Diagnostic> {
    match text.char_indices().find(|&(_, c)| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        None => Ok(()),
        Some((offset, c)) => {
            let (line, column) = line_column(text.as_bytes(), offset);
            Err(Diagnostic {
                line,
                column,
                code: codes::CONTROL_CHARACTER,
                message: format!(
                    "control character U+{:04X}; only tab, line feed and carriage return are allowed",
                    c as u32
                ),
            })
        }
    }
}

/// Whether the text contains markup (see the module documentation).
pub fn looks_like_xml(text: &str) -> bool {
    let mut rest = text;
    while let Some(p) = rest.find('<') {
        rest = &rest[p + 1..];
        match rest.chars().next() {
            Some(c) if c == '/' || c == '!' || c == '?' || c == '_' || c == ':' || c.is_alphabetic() => {
                return true
            }
            _ => {}
        }
    }
    false
}

/// Whether `name` is a valid XML element name.
fn is_xml_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_alphabetic() || c == '_' || c == ':' => {}
        _ => return false,
    }
    chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '-' | '.' | '\u{B7}'))
}

/// N of `character_N` (no leading zeros, N >= 1).
fn character_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("character_")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n >= 1)
}

/// The replacement text of a predefined entity.
pub(crate) fn predefined_entity(name: &str) -> Option<char> {
    match name {
        "amp" => Some('&'),
        "lt" => Some('<'),
        "gt" => Some('>'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        _ => None,
    }
}

/// Resolves the body of a reference (`amp`, `#38`, `#x26`) to its character. `Err` carries the code
/// (`entity` for an unknown entity, `xml_syntax` for a bad character reference) and a message.
pub(crate) fn resolve_reference(body: &str) -> Result<char, (&'static str, String)> {
    if let Some(num) = body.strip_prefix('#') {
        let value = match num.strip_prefix('x') {
            Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                u32::from_str_radix(hex, 16).ok()
            }
            None if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) => num.parse::<u32>().ok(),
            _ => None,
        };
        return value
            .filter(|&v| v != 0)
            .and_then(char::from_u32)
            .ok_or_else(|| (codes::XML_SYNTAX, format!("invalid character reference `&{body};`")));
    }
    predefined_entity(body).ok_or_else(|| {
        (
            codes::ENTITY,
            format!(
                "unknown entity `&{body};`: only &amp; &lt; &gt; &quot; &apos; and character references are allowed"
            ),
        )
    })
}

/// Maps a quick-xml read error at `pos` (the byte offset of the offending markup) to a code and message.
pub(crate) fn describe_read_error(err: &quick_xml::Error, src_at_pos: &[u8]) -> (&'static str, String) {
    use quick_xml::errors::IllFormedError;
    if src_at_pos.starts_with(b"<!ENTITY") {
        return (codes::ENTITY, "entity declarations (<!ENTITY>) are not allowed".into());
    }
    if src_at_pos.len() >= 9 && src_at_pos[..9].eq_ignore_ascii_case(b"<!DOCTYPE") {
        return (codes::DOCTYPE, "DOCTYPE declarations are not allowed".into());
    }
    match err {
        quick_xml::Error::IllFormed(IllFormedError::UnclosedReference) => (
            codes::XML_SYNTAX,
            "`&` does not start a reference closed by `;` (write a literal `&` as `&amp;`)".into(),
        ),
        quick_xml::Error::IllFormed(IllFormedError::DoubleHyphenInComment) => {
            (codes::XML_SYNTAX, "`--` is not allowed inside a comment".into())
        }
        other => (codes::XML_SYNTAX, other.to_string()),
    }
}

/// Offset of an attribute error inside the tag content (the bytes after `<`).
pub(crate) fn attr_error_offset(err: &AttrError) -> usize {
    match *err {
        AttrError::ExpectedEq(p)
        | AttrError::ExpectedValue(p)
        | AttrError::UnquotedValue(p)
        | AttrError::ExpectedQuote(p, _)
        | AttrError::Duplicated(p, _) => p,
    }
}

/// Describes an attribute error without quick-xml's relative position.
pub(crate) fn describe_attr_error(err: &AttrError) -> String {
    match err {
        AttrError::ExpectedEq(_) => "malformed attribute: expected `=` after the attribute name".into(),
        AttrError::ExpectedValue(_) => "malformed attribute: expected a quoted value after `=`".into(),
        AttrError::UnquotedValue(_) => "malformed attribute: the value must be quoted".into(),
        AttrError::ExpectedQuote(_, q) => {
            format!("malformed attribute: missing closing quote {}", char::from(*q))
        }
        AttrError::Duplicated(_, _) => "duplicate attribute".into(),
    }
}

/// Parses and checks one prompt. See the module documentation for the rules.
pub fn parse_prompt(text: &str, limits: &PromptLimits) -> Result<ParsedPrompt, Diagnostic> {
    let src = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let trimmed = src.trim();
    let lead = src.len() - src.trim_start().len();
    let diag = |offset: usize, code: &'static str, message: String| {
        let (line, column) = line_column(src.as_bytes(), offset);
        Diagnostic { line, column, code, message }
    };
    if trimmed.is_empty() {
        return Err(diag(0, codes::EMPTY, "the prompt is empty".into()));
    }
    if trimmed.len() > limits.max_bytes {
        let mut at = limits.max_bytes;
        while !trimmed.is_char_boundary(at) {
            at -= 1;
        }
        return Err(diag(
            lead + at,
            codes::TOO_LARGE,
            format!("the prompt is {} bytes; the limit is {} bytes", trimmed.len(), limits.max_bytes),
        ));
    }
    check_characters(src)?;
    let mut parsed = ParsedPrompt {
        text: trimmed.to_owned(),
        kind: PromptKind::Plain,
        characters: Vec::new(),
        general_tags: Vec::new(),
        caption: None,
        style: None,
        loose_text: Vec::new(),
        warnings: Vec::new(),
    };
    if !looks_like_xml(trimmed) {
        return Ok(parsed);
    }
    parsed.kind = PromptKind::Xml;
    XmlWalker { src, limits, stack: Vec::new(), loose: String::new(), out: &mut parsed }.run()?;
    Ok(parsed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The `<image>` root: its children are top-level items.
    Image,
    /// `<character_N>`: index into `characters`.
    Character(usize),
    /// `<general_tags>`.
    General,
    /// A field whose text is collected.
    Leaf(Leaf),
    /// An element inside a field: its text goes to the enclosing field.
    InLeaf,
    /// An element that is not interpreted.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    CharacterField(usize),
    GeneralField,
    Caption,
    Style,
}

struct Frame {
    name: String,
    start: usize,
    role: Role,
    text: String,
}

struct XmlWalker<'a> {
    src: &'a str,
    limits: &'a PromptLimits,
    stack: Vec<Frame>,
    /// Top-level text not yet flushed into `loose_text`.
    loose: String,
    out: &'a mut ParsedPrompt,
}

impl XmlWalker<'_> {
    fn diag(&self, offset: usize, code: &'static str, message: String) -> Diagnostic {
        let (line, column) = line_column(self.src.as_bytes(), offset);
        Diagnostic { line, column, code, message }
    }

    fn at(&self, offset: usize) -> String {
        let (line, column) = line_column(self.src.as_bytes(), offset);
        format!("line {line}, column {column}")
    }

    fn run(mut self) -> Result<(), Diagnostic> {
        let mut reader = Reader::from_str(self.src);
        {
            let config = reader.config_mut();
            config.check_end_names = false;
            config.allow_unmatched_ends = true;
            config.check_comments = true;
            config.expand_empty_elements = false;
            config.trim_text(false);
        }
        loop {
            let pos = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
            let event = match reader.read_event() {
                Ok(event) => event,
                Err(err) => {
                    let at = usize::try_from(reader.error_position()).unwrap_or(0).min(self.src.len());
                    let (code, message) = describe_read_error(&err, &self.src.as_bytes()[at..]);
                    return Err(self.diag(at, code, message));
                }
            };
            match event {
                Event::Start(e) => self.open(&e, pos, false)?,
                Event::Empty(e) => self.open(&e, pos, true)?,
                Event::End(e) => {
                    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                    self.close(&name, pos)?;
                }
                Event::Text(t) => {
                    let s = std::str::from_utf8(&t).expect("slices of a str at ASCII boundaries are UTF-8");
                    self.push_text(s);
                }
                Event::CData(t) => {
                    let s = std::str::from_utf8(&t).expect("slices of a str at ASCII boundaries are UTF-8");
                    self.push_text(s);
                }
                Event::GeneralRef(r) => {
                    let body =
                        std::str::from_utf8(&r).expect("slices of a str at ASCII boundaries are UTF-8");
                    match resolve_reference(body) {
                        Ok(c) => self.push_text(c.encode_utf8(&mut [0; 4])),
                        Err((code, message)) => return Err(self.diag(pos, code, message)),
                    }
                }
                Event::Comment(_) => {}
                Event::Decl(_) => {
                    return Err(self.diag(
                        pos,
                        codes::XML_SYNTAX,
                        "an XML declaration (<?xml ...?>) is not allowed in a prompt".into(),
                    ))
                }
                Event::PI(_) => {
                    return Err(self.diag(
                        pos,
                        codes::XML_SYNTAX,
                        "processing instructions (<?...?>) are not allowed in a prompt".into(),
                    ))
                }
                Event::DocType(_) => {
                    return Err(self.diag(pos, codes::DOCTYPE, "DOCTYPE declarations are not allowed".into()))
                }
                Event::Eof => break,
            }
        }
        if let Some(frame) = self.stack.last() {
            return Err(self.diag(
                frame.start,
                codes::XML_SYNTAX,
                format!(
                    "unclosed tag <{}>: </{}> not found before the end of the prompt",
                    frame.name, frame.name
                ),
            ));
        }
        self.flush_loose();
        Ok(())
    }

    /// Appends character data to whatever collects it at the current position.
    fn push_text(&mut self, s: &str) {
        match self.stack.last().map(|f| f.role) {
            None | Some(Role::Image) => self.loose.push_str(s),
            Some(Role::Character(_) | Role::General | Role::Leaf(_)) => {
                self.stack.last_mut().expect("non-empty").text.push_str(s)
            }
            Some(Role::InLeaf) => {
                if let Some(f) = self.stack.iter_mut().rev().find(|f| matches!(f.role, Role::Leaf(_))) {
                    f.text.push_str(s);
                }
            }
            Some(Role::Unknown) => {}
        }
    }

    fn flush_loose(&mut self) {
        let t = self.loose.trim();
        if !t.is_empty() {
            self.out.loose_text.push(t.to_owned());
        }
        self.loose.clear();
    }

    /// Records text written directly inside a container as a `#text` field.
    fn flush_mixed(&mut self) {
        let Some(frame) = self.stack.last_mut() else { return };
        let role = frame.role;
        if !matches!(role, Role::Character(_) | Role::General) {
            return;
        }
        let t = frame.text.trim();
        if !t.is_empty() {
            let entry = (MIXED_TEXT_FIELD.to_owned(), t.to_owned());
            match role {
                Role::Character(ci) => self.out.characters[ci].fields.push(entry),
                _ => self.out.general_tags.push(entry),
            }
        }
        frame.text.clear();
    }

    fn open(&mut self, e: &BytesStart<'_>, start: usize, empty: bool) -> Result<(), Diagnostic> {
        let name = std::str::from_utf8(e.name().as_ref()).unwrap_or("").to_owned();
        if !is_xml_name(&name) {
            return Err(self.diag(start, codes::XML_SYNTAX, format!("invalid tag name `<{name}`")));
        }
        for attr in e.attributes() {
            if let Err(err) = attr {
                let off = start + 1 + attr_error_offset(&err);
                return Err(self.diag(
                    off,
                    codes::XML_SYNTAX,
                    format!("in <{name}>: {}", describe_attr_error(&err)),
                ));
            }
        }
        let depth = self.stack.len() + 1;
        if depth > self.limits.max_depth {
            return Err(self.diag(
                start,
                codes::TOO_DEEP,
                format!("<{name}> is nested {depth} levels deep; the limit is {}", self.limits.max_depth),
            ));
        }
        let parent = self.stack.last().map(|f| (f.role, f.name.clone()));
        let role = match parent {
            None | Some((Role::Image, _)) => {
                self.flush_loose();
                let top = parent.is_none();
                if name == "image" && top {
                    Role::Image
                } else if name == "general_tags" {
                    Role::General
                } else if name == "caption" {
                    Role::Leaf(Leaf::Caption)
                } else if name == "style" {
                    Role::Leaf(Leaf::Style)
                } else if let Some(index) = character_index(&name) {
                    if self.out.characters.len() >= self.limits.max_characters {
                        return Err(self.diag(
                            start,
                            codes::TOO_MANY_CHARACTERS,
                            format!(
                                "<{name}> is character number {}; the limit is {} characters",
                                self.out.characters.len() + 1,
                                self.limits.max_characters
                            ),
                        ));
                    }
                    self.out.characters.push(Character { index, fields: Vec::new() });
                    Role::Character(self.out.characters.len() - 1)
                } else {
                    let place = if top { "at the top level".to_owned() } else { "inside <image>".to_owned() };
                    let w = self.diag(
                        start,
                        codes::UNKNOWN_TAG,
                        format!(
                            "unknown tag <{name}> {place}; it is passed to the encoders but not interpreted"
                        ),
                    );
                    self.out.warnings.push(w);
                    Role::Unknown
                }
            }
            Some((Role::Character(ci), pname)) => {
                self.flush_mixed();
                if !CHARACTER_FIELDS.contains(&name.as_str()) {
                    let w =
                        self.diag(start, codes::UNKNOWN_TAG, format!("unknown tag <{name}> in <{pname}>"));
                    self.out.warnings.push(w);
                }
                Role::Leaf(Leaf::CharacterField(ci))
            }
            Some((Role::General, pname)) => {
                self.flush_mixed();
                if !GENERAL_TAG_FIELDS.contains(&name.as_str()) {
                    let w =
                        self.diag(start, codes::UNKNOWN_TAG, format!("unknown tag <{name}> in <{pname}>"));
                    self.out.warnings.push(w);
                }
                Role::Leaf(Leaf::GeneralField)
            }
            Some((Role::Leaf(_) | Role::InLeaf, pname)) => {
                let field = self
                    .stack
                    .iter()
                    .rev()
                    .find(|f| matches!(f.role, Role::Leaf(_)))
                    .map_or(pname, |f| f.name.clone());
                let w = self.diag(
                    start,
                    codes::UNKNOWN_TAG,
                    format!("tag <{name}> inside <{field}> is not part of the prompt format; its text is kept in <{field}>"),
                );
                self.out.warnings.push(w);
                Role::InLeaf
            }
            Some((Role::Unknown, _)) => Role::Unknown,
        };
        self.stack.push(Frame { name: name.clone(), start, role, text: String::new() });
        if empty {
            self.close(&name, start)?;
        }
        Ok(())
    }

    fn close(&mut self, name: &str, pos: usize) -> Result<(), Diagnostic> {
        match self.stack.last() {
            None => {
                return Err(self.diag(
                    pos,
                    codes::XML_SYNTAX,
                    format!("closing tag </{name}> does not match any open tag"),
                ))
            }
            Some(top) if top.name != name => {
                return Err(self.diag(
                    pos,
                    codes::XML_SYNTAX,
                    format!(
                        "closing tag </{name}> does not match <{}> opened at {}",
                        top.name,
                        self.at(top.start)
                    ),
                ))
            }
            Some(_) => {}
        }
        self.flush_mixed();
        let frame = self.stack.pop().expect("checked above");
        match frame.role {
            Role::Leaf(leaf) => {
                let value = frame.text.trim().to_owned();
                match leaf {
                    Leaf::CharacterField(ci) => self.out.characters[ci].fields.push((frame.name, value)),
                    Leaf::GeneralField => self.out.general_tags.push((frame.name, value)),
                    Leaf::Caption => append_joined(&mut self.out.caption, value),
                    Leaf::Style => append_joined(&mut self.out.style, value),
                }
            }
            Role::Image => self.flush_loose(),
            Role::Character(_) | Role::General | Role::InLeaf | Role::Unknown => {}
        }
        Ok(())
    }
}

fn append_joined(slot: &mut Option<String>, value: String) {
    match slot {
        Some(existing) => {
            existing.push('\n');
            existing.push_str(&value);
        }
        None => *slot = Some(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ParsedPrompt, Diagnostic> {
        parse_prompt(s, &PromptLimits::default())
    }

    fn err(s: &str) -> Diagnostic {
        parse(s).expect_err("expected an error")
    }

    fn fields(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    const CARD: &str = "<character_1>\n<n>$hatsune_miku$</n>\n<gender>1girl</gender>\n<appearance>twintails, aqua_hair</appearance>\n</character_1>\n<general_tags>\n<count>1girl</count>\n<style>anime_style</style>\n<quality>high_quality</quality>\n</general_tags>\n";

    #[test]
    fn default_limits() {
        let l = PromptLimits::default();
        assert_eq!((l.max_bytes, l.max_depth, l.max_characters), (16384, 4, 16));
    }

    #[test]
    fn system_prompts_are_the_training_strings() {
        assert_eq!(
            XML_SYSTEM_PROMPT,
            "You are an assistant designed to generate high-quality anime images based on xml format prompts. <Prompt Start> "
        );
        assert_eq!(
            TEXT_SYSTEM_PROMPT,
            "You are an assistant designed to generate high-quality anime images with the highest degree of image-text alignment based on textual prompts. <Prompt Start> "
        );
        let xml = parse(CARD).unwrap();
        assert_eq!(xml.system_prompt(), XML_SYSTEM_PROMPT);
        assert!(xml.system_prompt().ends_with("<Prompt Start> "));
        let plain = parse("1girl, solo").unwrap();
        assert_eq!(plain.system_prompt(), TEXT_SYSTEM_PROMPT);
        assert_eq!(plain.gemma_text(), format!("{TEXT_SYSTEM_PROMPT}1girl, solo"));
    }

    #[test]
    fn structured_fields_and_verbatim_text() {
        let input = format!("  \n{CARD}\n\t ");
        let p = parse(&input).unwrap();
        assert_eq!(p.text, CARD.trim());
        assert_eq!(p.kind, PromptKind::Xml);
        assert_eq!(p.characters.len(), 1);
        assert_eq!(p.characters[0].index, 1);
        assert_eq!(
            p.characters[0].fields,
            fields(&[("n", "$hatsune_miku$"), ("gender", "1girl"), ("appearance", "twintails, aqua_hair")])
        );
        assert_eq!(p.characters[0].field("gender"), Some("1girl"));
        assert_eq!(
            p.general_tags,
            fields(&[("count", "1girl"), ("style", "anime_style"), ("quality", "high_quality")])
        );
        assert_eq!(p.general_tag("style"), Some("anime_style"));
        assert_eq!(p.caption, None);
        assert_eq!(p.style, None);
        assert!(p.loose_text.is_empty());
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn every_documented_field_is_known() {
        let mut s = String::from("<character_2>");
        for f in CHARACTER_FIELDS {
            s.push_str(&format!("<{f}>v_{f}</{f}>"));
        }
        s.push_str("</character_2><general_tags>");
        for f in GENERAL_TAG_FIELDS {
            s.push_str(&format!("<{f}>g_{f}</{f}>"));
        }
        s.push_str("</general_tags><caption>A girl.</caption>");
        let p = parse(&s).unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.characters[0].index, 2);
        assert_eq!(p.characters[0].fields.len(), CHARACTER_FIELDS.len());
        assert_eq!(p.general_tags.len(), GENERAL_TAG_FIELDS.len());
        assert_eq!(p.general_tags[13], ("extra_tags".to_string(), "g_extra_tags".to_string()));
        assert_eq!(p.caption.as_deref(), Some("A girl."));
    }

    #[test]
    fn image_root_and_leading_style() {
        let s = "<style>watercolor</style>\n<image>\n  <character_1><n>a</n></character_1>\n  <character_2><n>b</n></character_2>\n  <caption>Two friends.</caption>\n</image>";
        let p = parse(s).unwrap();
        assert_eq!(p.style.as_deref(), Some("watercolor"));
        assert_eq!(p.characters.iter().map(|c| c.index).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(p.caption.as_deref(), Some("Two friends."));
        assert!(p.warnings.is_empty());
        assert!(p.loose_text.is_empty());
    }

    #[test]
    fn nested_image_is_unknown() {
        let p = parse("<image><image><n>x</n></image></image>").unwrap();
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].code, codes::UNKNOWN_TAG);
        assert_eq!((p.warnings[0].line, p.warnings[0].column), (1, 8));
    }

    #[test]
    fn plain_prompts() {
        for s in
            ["1girl, solo, masterpiece", "a girl with <3 hearts & stars", "x < y > z", "A cat; &amp; stays"]
        {
            let p = parse(&format!("\n  {s}  \n")).unwrap();
            assert_eq!(p.kind, PromptKind::Plain, "{s}");
            assert_eq!(p.text, s);
            assert!(p.characters.is_empty() && p.general_tags.is_empty() && p.caption.is_none());
            assert!(p.warnings.is_empty());
        }
        assert!(!looks_like_xml("heart <3"));
        assert!(looks_like_xml("a <b"));
        assert!(looks_like_xml("</x>"));
        assert!(looks_like_xml("<!-- c -->"));
        assert!(looks_like_xml("<?pi?>"));
        assert!(looks_like_xml("<名前>"));
    }

    #[test]
    fn loose_text_is_kept_without_warning() {
        let p = parse("masterpiece, best_quality, <character_1><n>a</n></character_1> extra words\n<caption>c</caption>")
            .unwrap();
        assert_eq!(p.loose_text, vec!["masterpiece, best_quality,".to_string(), "extra words".to_string()]);
        assert!(p.warnings.is_empty());
        assert_eq!(p.text, "masterpiece, best_quality, <character_1><n>a</n></character_1> extra words\n<caption>c</caption>");
    }

    #[test]
    fn mixed_text_inside_containers() {
        let p = parse("<character_1>1girl, solo<n>a</n>smile</character_1><general_tags>hd<count>1</count></general_tags>")
            .unwrap();
        assert_eq!(
            p.characters[0].fields,
            fields(&[("#text", "1girl, solo"), ("n", "a"), ("#text", "smile")])
        );
        assert_eq!(p.general_tags, fields(&[("#text", "hd"), ("count", "1")]));
    }

    #[test]
    fn unknown_tags_are_warnings_with_positions() {
        let s = "<character_1>\n  <n>a</n>\n  <hat>red</hat>\n</character_1>\n<general_tags><mood>calm</mood></general_tags>\n<scene>x</scene>\n<caption>a <b>bold</b> cat</caption>";
        let p = parse(s).unwrap();
        let got: Vec<(u32, u32, &str)> = p.warnings.iter().map(|w| (w.line, w.column, w.code)).collect();
        assert_eq!(
            got,
            vec![
                (3, 3, "unknown_tag"),
                (5, 15, "unknown_tag"),
                (6, 1, "unknown_tag"),
                (7, 12, "unknown_tag")
            ]
        );
        assert!(p.warnings[0].message.contains("<hat>"), "{}", p.warnings[0].message);
        assert!(p.warnings[0].message.contains("<character_1>"));
        assert!(p.warnings[2].message.contains("<scene>"));
        assert_eq!(p.characters[0].fields, fields(&[("n", "a"), ("hat", "red")]));
        assert_eq!(p.general_tags, fields(&[("mood", "calm")]));
        assert_eq!(p.caption.as_deref(), Some("a bold cat"));
        assert_eq!(p.warnings[0].to_string(), format!("line 3, column 3: {}", p.warnings[0].message));
    }

    #[test]
    fn character_names_need_a_positive_index_without_leading_zeros() {
        for bad in ["character_0", "character_01", "character_x", "character_", "character"] {
            let p = parse(&format!("<{bad}><n>a</n></{bad}>")).unwrap();
            assert!(p.characters.is_empty(), "{bad}");
            assert_eq!(p.warnings.len(), 1, "{bad}");
        }
        assert_eq!(parse("<character_12><n>a</n></character_12>").unwrap().characters[0].index, 12);
    }

    #[test]
    fn empty_prompts() {
        for s in ["", "   ", "\n\t\n", "\u{FEFF}  "] {
            let d = err(s);
            assert_eq!((d.code, d.line, d.column), (codes::EMPTY, 1, 1), "{s:?}");
        }
    }

    #[test]
    fn control_characters_are_refused_where_they_are() {
        let d = err("1girl, smile\nblue\u{0}hair");
        assert_eq!((d.code, d.line, d.column), (codes::CONTROL_CHARACTER, 2, 5), "{d}");
        assert!(d.message.contains("U+0000"), "{d}");
        let d = err("<caption>a \u{1b}[31m</caption>");
        assert_eq!((d.code, d.line, d.column), (codes::CONTROL_CHARACTER, 1, 12), "{d}");
        // Tab, line feed and carriage return are text.
        assert!(parse("a,\tb\r\nc").is_ok());
        assert!(check_characters("x\u{7f}").is_err());
    }

    #[test]
    fn byte_order_mark_is_dropped() {
        let p = parse("\u{FEFF}<caption>x</caption>").unwrap();
        assert_eq!(p.text, "<caption>x</caption>");
        let d = err("\u{FEFF}<caption>x</captio>");
        assert_eq!((d.line, d.column), (1, 11));
    }

    #[test]
    fn too_large_at_the_first_character_past_the_limit() {
        let limits = PromptLimits { max_bytes: 10, ..PromptLimits::default() };
        assert!(parse_prompt("  0123456789  ", &limits).is_ok());
        let d = parse_prompt("\n  0123456789A", &limits).unwrap_err();
        assert_eq!((d.code, d.line, d.column), (codes::TOO_LARGE, 2, 13));
        assert!(d.message.contains("11 bytes") && d.message.contains("10 bytes"), "{}", d.message);
        // A multi-byte character straddling the limit is reported itself.
        let d = parse_prompt("ééééé\u{3042}", &limits).unwrap_err();
        assert_eq!((d.line, d.column), (1, 6));
    }

    #[test]
    fn too_deep() {
        let ok = "<image><character_1><n><b>x</b></n></character_1></image>";
        assert!(parse(ok).is_ok());
        let s = "<image>\n <character_1>\n  <n>\n   <b>\n    <i>x</i></b></n></character_1></image>";
        let d = err(s);
        assert_eq!((d.code, d.line, d.column), (codes::TOO_DEEP, 5, 5));
        assert!(d.message.contains("<i>") && d.message.contains("5 levels"), "{}", d.message);
        let limits = PromptLimits { max_depth: 1, ..PromptLimits::default() };
        let d = parse_prompt("<caption>a</caption><general_tags><count>1</count></general_tags>", &limits)
            .unwrap_err();
        assert_eq!((d.code, d.line, d.column), (codes::TOO_DEEP, 1, 35));
        // Empty elements count too.
        let d = parse_prompt("<general_tags><count/></general_tags>", &limits).unwrap_err();
        assert_eq!((d.code, d.column), (codes::TOO_DEEP, 15));
    }

    #[test]
    fn too_many_characters() {
        let limits = PromptLimits { max_characters: 2, ..PromptLimits::default() };
        let s = "<character_1/>\n<character_2/>\n<image><character_3/></image>";
        let d = parse_prompt(s, &limits).unwrap_err();
        assert_eq!((d.code, d.line, d.column), (codes::TOO_MANY_CHARACTERS, 3, 8));
        assert!(d.message.contains("<character_3>"), "{}", d.message);
        let p = parse_prompt("<character_1/><character_2/>", &limits).unwrap();
        assert_eq!(p.characters.len(), 2);
        assert!(p.characters.iter().all(|c| c.fields.is_empty()));
    }

    #[test]
    fn doctype_and_entity_declarations_are_refused() {
        let d = err("<caption>a</caption>\n  <!DOCTYPE x [<!ENTITY e \"boom\">]>");
        assert_eq!((d.code, d.line, d.column), (codes::DOCTYPE, 2, 3));
        let d = err("<!doctype html><caption>a</caption>");
        assert_eq!((d.code, d.line, d.column), (codes::DOCTYPE, 1, 1));
        let d = err("<caption>a</caption>\n<!ENTITY e \"boom\">");
        assert_eq!((d.code, d.line, d.column), (codes::ENTITY, 2, 1));
    }

    #[test]
    fn references() {
        let p = parse("<caption>Tom &amp; Jerry &lt;3 &#x41;&#66; &quot;&apos;&gt;</caption>").unwrap();
        assert_eq!(p.caption.as_deref(), Some("Tom & Jerry <3 AB \"'>"));
        assert_eq!(p.text, "<caption>Tom &amp; Jerry &lt;3 &#x41;&#66; &quot;&apos;&gt;</caption>");
        let d = err("<caption>\n  a &nbsp; b</caption>");
        assert_eq!((d.code, d.line, d.column), (codes::ENTITY, 2, 5));
        assert!(d.message.contains("&nbsp;"), "{}", d.message);
        let d = err("<caption>&#0;</caption>");
        assert_eq!((d.code, d.column), (codes::XML_SYNTAX, 10));
        let d = err("<caption>&#xZZ;</caption>");
        assert_eq!((d.code, d.column), (codes::XML_SYNTAX, 10));
        let d = err("<caption>fish & chips</caption>");
        assert_eq!((d.code, d.line, d.column), (codes::XML_SYNTAX, 1, 15));
    }

    #[test]
    fn processing_instructions_are_refused() {
        let d = err("<?xml version=\"1.0\"?>\n<caption>a</caption>");
        assert_eq!((d.code, d.line, d.column), (codes::XML_SYNTAX, 1, 1));
        let d = err("<caption>a</caption>\n\n   <?php echo 1 ?>");
        assert_eq!((d.code, d.line, d.column), (codes::XML_SYNTAX, 3, 4));
        assert!(d.message.contains("processing instruction"), "{}", d.message);
    }

    #[test]
    fn mismatched_closing_tag() {
        let s = "<character_1>\n  <n>miku</gender>\n</character_1>";
        let d = err(s);
        assert_eq!((d.code, d.line, d.column), (codes::XML_SYNTAX, 2, 10));
        assert!(d.message.contains("</gender>"), "{}", d.message);
        assert!(d.message.contains("<n> opened at line 2, column 3"), "{}", d.message);
    }

    #[test]
    fn unclosed_tag_is_reported_where_it_opens() {
        let s = "<character_1>\n  <n>miku</n>\n  <gender>1girl\n</character_1>";
        let d = err(s);
        // </character_1> closes while <gender> is open: mismatched at the closing tag.
        assert_eq!((d.line, d.column), (4, 1));
        assert!(d.message.contains("<gender>") && d.message.contains("line 3, column 3"), "{}", d.message);
        let d = err("<general_tags>\n  <count>1</count>\n");
        assert_eq!((d.code, d.line, d.column), (codes::XML_SYNTAX, 1, 1));
        assert!(d.message.contains("unclosed tag <general_tags>"), "{}", d.message);
    }

    #[test]
    fn unmatched_closing_tag() {
        let d = err("<caption>a</caption>\n</character_1>");
        assert_eq!((d.code, d.line, d.column), (codes::XML_SYNTAX, 2, 1));
        assert!(d.message.contains("</character_1>"), "{}", d.message);
    }

    #[test]
    fn unterminated_markup() {
        let d = err("<caption>a</caption>\n<character_1");
        assert_eq!((d.code, d.line, d.column), (codes::XML_SYNTAX, 2, 1));
        let d = err("<caption>a</caption><!-- never closed");
        assert_eq!((d.code, d.column), (codes::XML_SYNTAX, 21));
        let d = err("<caption>a -- b</caption><!-- a -- b -->");
        assert_eq!((d.code, d.column), (codes::XML_SYNTAX, 33));
    }

    #[test]
    fn bad_names_and_attributes() {
        let d = err("<caption>a</caption> <1girl>");
        assert_eq!((d.code, d.line, d.column), (codes::XML_SYNTAX, 1, 22));
        let d = err("<caption>a</caption>\n< caption>b</caption>");
        assert_eq!((d.code, d.line, d.column), (codes::XML_SYNTAX, 2, 1));
        let p = parse("<character_1 id=\"x\" note='y'><n>a</n></character_1>").unwrap();
        assert_eq!(p.characters[0].fields, fields(&[("n", "a")]));
        let d = err("<character_1 id=x><n>a</n></character_1>");
        assert_eq!((d.code, d.line, d.column), (codes::XML_SYNTAX, 1, 17));
        let d = err("<character_1 id=\"1\" id=\"2\"></character_1>");
        assert_eq!((d.code, d.column), (codes::XML_SYNTAX, 21));
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let s = "<character_1><n>初音ミク</n><appearance>髪</appearance></character_1>\n  <caption>猫と犬</caption><zz/>";
        let p = parse(s).unwrap();
        assert_eq!((p.warnings[0].line, p.warnings[0].column), (2, 25));
        assert_eq!(p.characters[0].field("n"), Some("初音ミク"));
        let d = err("<caption>ü😀é</captio>");
        assert_eq!((d.line, d.column), (1, 13));
        assert_eq!(line_column("ab\ncdé\u{1F600}x".as_bytes(), 10), (2, 4));
    }

    #[test]
    fn crlf_line_endings() {
        let d = err("<character_1>\r\n<n>a</n>\r\n<gender>b</n>\r\n</character_1>");
        assert_eq!((d.line, d.column), (3, 10));
    }

    #[test]
    fn cdata_and_comments() {
        let p = parse("<!-- header --><caption><![CDATA[a <b> & c]]> d</caption>").unwrap();
        assert_eq!(p.caption.as_deref(), Some("a <b> & c d"));
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn repeated_caption_and_style_are_joined() {
        let p = parse("<style>a</style><style>b</style><caption>x</caption><caption>y</caption>").unwrap();
        assert_eq!(p.style.as_deref(), Some("a\nb"));
        assert_eq!(p.caption.as_deref(), Some("x\ny"));
    }

    #[test]
    fn empty_elements_are_empty_fields() {
        let p = parse("<character_1><n/><gender></gender></character_1>").unwrap();
        assert_eq!(p.characters[0].fields, fields(&[("n", ""), ("gender", "")]));
    }

    #[test]
    fn line_column_helper() {
        let s = "a\nbc\n\nd";
        assert_eq!(line_column(s.as_bytes(), 0), (1, 1));
        assert_eq!(line_column(s.as_bytes(), 1), (1, 2));
        assert_eq!(line_column(s.as_bytes(), 2), (2, 1));
        assert_eq!(line_column(s.as_bytes(), 5), (3, 1));
        assert_eq!(line_column(s.as_bytes(), 6), (4, 1));
        assert_eq!(line_column(s.as_bytes(), 99), (4, 2));
    }
}

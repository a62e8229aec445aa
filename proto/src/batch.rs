//! Batch file formats read by the CLI: an XML batch, JSON Lines and plain text.
//!
//! [`BatchReader`] streams prompts one at a time from any [`BufRead`]; it never holds more than one
//! record (a prompt element or a line) in memory, and refuses a record larger than
//! [`DEFAULT_MAX_RECORD_BYTES`] (configurable) before buffering it. A leading UTF-8 byte-order mark is
//! ignored. All positions are 1-based; columns count characters.
//!
//! # XML batch (`.xml`)
//!
//! ```xml
//! <?xml version="1.0" encoding="UTF-8"?>
//! <batch>
//!   <prompt seed="1" width="1024" height="1024" steps="28" cfg="5" negative="lowres">
//!     <character_1><n>...</n></character_1>
//!   </prompt>
//!   <prompt seed="2">1girl, solo, masterpiece</prompt>
//! </batch>
//! ```
//!
//! * The root is `<batch>` (its attributes are ignored); it contains only `<prompt>` elements, comments
//!   and whitespace. An optional `<?xml ...?>` declaration and comments may precede the root; DOCTYPE
//!   declarations and processing instructions are refused anywhere.
//! * `<prompt>` attributes: `seed` (u64), `width`, `height`, `steps` (u32), `cfg` (finite f32) and
//!   `negative` (text, references resolved). Any other attribute, or a value that does not parse, is an
//!   error at the attribute.
//! * Prompt text: when the body contains elements (an XML prompt), the text is the body **verbatim**,
//!   exactly as written between `<prompt ...>` and `</prompt>`, trimmed; this is what the encoders get.
//!   When the body is character data only (plain tags or natural language), the text is that character
//!   data with references and CDATA sections decoded and comments dropped, trimmed: so
//!   `<prompt>cats &amp; dogs</prompt>` yields `cats & dogs`.
//! * [`BatchPrompt::line`] is the line of the first non-blank character of the prompt text.
//!
//! # JSON Lines (`.jsonl`, `.ndjson`)
//!
//! One object per line: `{"prompt": "...", "seed": 1, "width": 1024, "height": 1024, "steps": 28,
//! "cfg": 5.0, "negative": "..."}`. Only `prompt` is required; `null` means absent. Blank lines are
//! skipped; an unknown or duplicate field is an error naming the field. The prompt text is trimmed.
//!
//! # Plain text (`.txt`)
//!
//! One prompt per line, trimmed. Blank lines and lines whose first non-blank character is `#` are skipped.
//!
//! # Validation and errors
//!
//! By default every prompt is also checked with [`parse_prompt`] under [`PromptLimits::default`]
//! ([`BatchReader::with_limits`] changes the limits, [`BatchReader::without_validation`] turns the check
//! off); a failure is reported as a [`BatchError`] at the file position of the problem (prompt start
//! line + the diagnostic's line - 1; on the prompt's first line the column is offset by the prompt's start
//! column). For JSON Lines, where the prompt is an escaped string, the error is reported at the record's
//! line and the message gives the position inside the prompt text. An empty prompt is always an error.
//!
//! After an error in one prompt (a bad attribute or field, an invalid prompt, stray text between
//! prompts) the iterator goes on with the next one. After an error that breaks the file structure (XML
//! syntax, mismatched tags, a record over the size limit in an XML file, an I/O error) it ends; such an
//! error has [`BatchError::fatal`] set. [`BatchError::in_prompt`] tells an error inside one prompt
//! record (the record still counts as a prompt of the batch) from one in the file's own structure.

use std::io::{self, BufRead};
use std::path::Path;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde::{Deserialize, Serialize};

use crate::prompt::{self, parse_prompt, Diagnostic, PromptLimits};

/// Default largest record: one `<prompt>` element (tag and body) or one line.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// A batch file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFormat {
    /// `<batch><prompt ...>...</prompt>...</batch>`.
    Xml,
    /// One JSON object per line.
    Jsonl,
    /// One prompt per line.
    Text,
}

impl BatchFormat {
    /// The format for a file name extension (case-insensitive): `.xml`, `.jsonl` / `.ndjson`, `.txt`.
    pub fn from_path(p: &Path) -> Option<Self> {
        let ext = p.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "xml" => Some(BatchFormat::Xml),
            "jsonl" | "ndjson" => Some(BatchFormat::Jsonl),
            "txt" => Some(BatchFormat::Text),
            _ => None,
        }
    }

    /// Guesses the format from the first bytes of a file: XML when it opens with `<?xml`, `<batch`,
    /// `<!--` or `<!DOCTYPE` (after an optional byte-order mark and whitespace), JSON Lines when it opens
    /// with `{`, plain text otherwise (a text file of one-line XML prompts starts with `<character_1>`
    /// or similar and stays plain text).
    pub fn sniff(first_bytes: &[u8]) -> Self {
        let b = first_bytes.strip_prefix(UTF8_BOM).unwrap_or(first_bytes);
        let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
        let b = &b[start..];
        let starts_ci = |p: &[u8]| b.len() >= p.len() && b[..p.len()].eq_ignore_ascii_case(p);
        if starts_ci(b"<?xml") || starts_ci(b"<batch") || b.starts_with(b"<!--") || starts_ci(b"<!doctype") {
            BatchFormat::Xml
        } else if b.starts_with(b"{") {
            BatchFormat::Jsonl
        } else {
            BatchFormat::Text
        }
    }
}

/// One prompt of a batch with its optional per-prompt settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchPrompt {
    /// The prompt text, trimmed (what [`parse_prompt`] takes and the encoders get).
    pub text: String,
    pub seed: Option<u64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<u32>,
    pub cfg_scale: Option<f32>,
    pub negative_prompt: Option<String>,
    /// 1-based line in the file where the prompt text starts.
    pub line: u32,
}

#[derive(Serialize)]
struct JsonOut<'a> {
    prompt: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    height: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cfg: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    negative: Option<&'a str>,
}

impl BatchPrompt {
    /// This prompt as one JSON Lines record (no trailing newline); [`BatchReader`] reads it back.
    pub fn to_jsonl(&self) -> String {
        let out = JsonOut {
            prompt: &self.text,
            seed: self.seed,
            width: self.width,
            height: self.height,
            steps: self.steps,
            cfg: self.cfg_scale,
            negative: self.negative_prompt.as_deref(),
        };
        serde_json::to_string(&out).expect("serialising plain data cannot fail")
    }

    /// The file line of a [`Diagnostic`] from `parse_prompt(&self.text, ..)` (exact for XML and text
    /// batches; for JSON Lines every prompt is on its record's line).
    pub fn file_line(&self, d: &Diagnostic) -> u32 {
        self.line.saturating_add(d.line.saturating_sub(1))
    }
}

/// An error at a position in a batch file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct BatchError {
    pub line: u32,
    pub column: u32,
    pub message: String,
    /// The error is inside one prompt record (a `<prompt>` element or a line): the batch holds that
    /// prompt, but it could not be read. False for the file's own structure (the root, stray text or
    /// elements between prompts) and for read errors.
    pub in_prompt: bool,
    /// Reading stopped at this error: the rest of the input was not read (the iterator ends).
    pub fatal: bool,
}

/// Streams the prompts of a batch file. See the module documentation.
pub struct BatchReader<R: BufRead> {
    source: Source<R>,
    limits: Option<PromptLimits>,
    max_record_bytes: usize,
    done: bool,
}

enum Source<R: BufRead> {
    Xml(Box<XmlBatch<R>>),
    Lines { lines: LineSource<R>, json: bool },
}

impl<R: BufRead> BatchReader<R> {
    /// A reader of `format` over `reader`, validating prompts under [`PromptLimits::default`].
    pub fn new(reader: R, format: BatchFormat) -> Self {
        let source = match format {
            BatchFormat::Xml => Source::Xml(Box::new(XmlBatch::new(reader))),
            BatchFormat::Jsonl | BatchFormat::Text => Source::Lines {
                lines: LineSource { reader, line_no: 0, buf: Vec::new() },
                json: format == BatchFormat::Jsonl,
            },
        };
        BatchReader {
            source,
            limits: Some(PromptLimits::default()),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            done: false,
        }
        .apply_cap()
    }

    /// Validates each prompt with [`parse_prompt`] under `limits`.
    pub fn with_limits(mut self, limits: PromptLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Does not run [`parse_prompt`] on the prompts (the file syntax is still checked).
    pub fn without_validation(mut self) -> Self {
        self.limits = None;
        self
    }

    /// Sets the largest record (prompt element or line) in bytes.
    pub fn with_max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes.max(1);
        self.apply_cap()
    }

    fn apply_cap(mut self) -> Self {
        if let Source::Xml(x) = &mut self.source {
            x.reader.get_mut().cap = self.max_record_bytes;
        }
        self
    }
}

impl<R: BufRead> Iterator for BatchReader<R> {
    type Item = Result<BatchPrompt, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = match &mut self.source {
            Source::Xml(x) => x.next_prompt(self.limits.as_ref()),
            Source::Lines { lines, json } => {
                lines.next_prompt(*json, self.limits.as_ref(), self.max_record_bytes)
            }
        };
        match item {
            Step::Prompt(p) => Some(Ok(p)),
            Step::Error(e) => Some(Err(e)),
            Step::Fatal(mut e) => {
                self.done = true;
                e.fatal = true;
                Some(Err(e))
            }
            Step::End => {
                self.done = true;
                None
            }
        }
    }
}

enum Step {
    Prompt(BatchPrompt),
    /// An error in one prompt; reading goes on.
    Error(BatchError),
    /// An error after which the file cannot be read further.
    Fatal(BatchError),
    End,
}

impl Step {
    /// Marks an error as one inside a prompt record.
    fn in_prompt(self) -> Step {
        match self {
            Step::Error(mut e) => {
                e.in_prompt = true;
                Step::Error(e)
            }
            Step::Fatal(mut e) => {
                e.in_prompt = true;
                Step::Fatal(e)
            }
            other => other,
        }
    }
}

fn berr(line: u32, column: u32, message: impl Into<String>) -> BatchError {
    BatchError { line, column, message: message.into(), in_prompt: false, fatal: false }
}

/// Checks `text` (starting at file `line`/`column`) with `parse_prompt`, mapping a diagnostic to the file.
fn validate(text: &str, line: u32, column: u32, limits: Option<&PromptLimits>) -> Result<(), BatchError> {
    let Some(limits) = limits else { return Ok(()) };
    parse_prompt(text, limits).map(|_| ()).map_err(|d| {
        let file_line = line.saturating_add(d.line - 1);
        let file_column = if d.line == 1 { column.saturating_add(d.column - 1) } else { d.column };
        berr(file_line, file_column, d.message)
    })
}

// ---------------------------------------------------------------------------------------------------
// Line formats

struct LineSource<R> {
    reader: R,
    /// Number of the last line read.
    line_no: u32,
    buf: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a JSON object with a \"prompt\" field")]
struct JsonRecord {
    prompt: String,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
    #[serde(default)]
    steps: Option<u32>,
    #[serde(default)]
    cfg: Option<f32>,
    #[serde(default)]
    negative: Option<String>,
}

impl<R: BufRead> LineSource<R> {
    /// Reads one line into `self.buf` (without the line break), keeping at most `cap` bytes.
    /// `Ok(None)` at the end of input; `Ok(Some(true))` when the line was longer than `cap`.
    fn read_line(&mut self, cap: usize) -> io::Result<Option<bool>> {
        self.buf.clear();
        let mut any = false;
        let mut overflow = false;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                break;
            }
            any = true;
            let (chunk, used, end) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            let room = cap.saturating_sub(self.buf.len());
            if chunk.len() > room {
                overflow = true;
            }
            self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            self.reader.consume(used);
            if end {
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        if self.line_no == 0 {
            // A byte-order mark is not part of the first line.
            let mut skip = 0;
            while self.buf[skip..].starts_with(UTF8_BOM) {
                skip += UTF8_BOM.len();
            }
            self.buf.drain(..skip);
        }
        self.line_no = self.line_no.saturating_add(1);
        if !overflow && self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        Ok(Some(overflow))
    }

    fn next_prompt(&mut self, json: bool, limits: Option<&PromptLimits>, cap: usize) -> Step {
        match self.next_record(json, limits, cap) {
            // A read error is not about a record; every other error is about the line just read.
            s @ Step::Fatal(_) => s,
            s => s.in_prompt(),
        }
    }

    fn next_record(&mut self, json: bool, limits: Option<&PromptLimits>, cap: usize) -> Step {
        loop {
            let overflow = match self.read_line(cap) {
                Ok(None) => return Step::End,
                Ok(Some(o)) => o,
                Err(e) => {
                    return Step::Fatal(berr(self.line_no.saturating_add(1), 1, format!("read error: {e}")))
                }
            };
            let line = self.line_no;
            if overflow {
                return Step::Error(berr(line, 1, format!("the line is longer than {cap} bytes")));
            }
            let s = match std::str::from_utf8(&self.buf) {
                Ok(s) => s,
                Err(e) => {
                    let (_, column) = prompt::line_column(&self.buf, e.valid_up_to());
                    return Step::Error(berr(line, column, "invalid UTF-8"));
                }
            };
            let trimmed = s.trim();
            if trimmed.is_empty() || (!json && trimmed.starts_with('#')) {
                continue;
            }
            let lead = s.len() - s.trim_start().len();
            let column = prompt::saturate(s[..lead].chars().count() + 1);
            return if json {
                json_prompt(trimmed, line, column, limits)
            } else {
                text_prompt(trimmed, line, column, limits)
            };
        }
    }
}

fn text_prompt(text: &str, line: u32, column: u32, limits: Option<&PromptLimits>) -> Step {
    if let Err(e) = validate(text, line, column, limits) {
        return Step::Error(e);
    }
    Step::Prompt(BatchPrompt { text: text.to_owned(), line, ..BatchPrompt::default() })
}

fn json_prompt(record: &str, line: u32, column: u32, limits: Option<&PromptLimits>) -> Step {
    // serde would also accept a JSON array as a struct in sequence form; a record must be an object.
    if !record.starts_with('{') {
        return Step::Error(berr(line, column, "expected a JSON object with a \"prompt\" field"));
    }
    let rec: JsonRecord = match serde_json::from_str(record) {
        Ok(r) => r,
        Err(e) => {
            let mut message = e.to_string();
            if let Some(p) = message.rfind(" at line ") {
                message.truncate(p);
            }
            // serde_json counts columns in bytes and points at the last byte it read.
            let byte = e.column().saturating_sub(1).min(record.len());
            let (_, col) = prompt::line_column(record.as_bytes(), byte);
            return Step::Error(berr(line, column.saturating_add(col - 1), message));
        }
    };
    let text = rec.prompt.trim();
    if text.is_empty() {
        return Step::Error(berr(line, column, "the prompt is empty"));
    }
    if let Some(limits) = limits {
        if let Err(d) = parse_prompt(text, limits) {
            return Step::Error(berr(
                line,
                column,
                format!("{} (prompt text line {}, column {})", d.message, d.line, d.column),
            ));
        }
    }
    Step::Prompt(BatchPrompt {
        text: text.to_owned(),
        seed: rec.seed,
        width: rec.width,
        height: rec.height,
        steps: rec.steps,
        cfg_scale: rec.cfg,
        negative_prompt: rec.negative,
        line,
    })
}

// ---------------------------------------------------------------------------------------------------
// XML batch

/// A [`BufRead`] adapter that keeps the bytes consumed since a movable mark (the "window"), so that the
/// verbatim text of a prompt body can be sliced out, and tracks the line and column of the mark.
struct Tracker<R> {
    inner: R,
    chunk: Vec<u8>,
    head: usize,
    window: Vec<u8>,
    /// Absolute offset of `window[0]`.
    window_start: u64,
    /// Line and column of `window_start`.
    line: u32,
    column: u32,
    /// Largest window; reading further fails with `overflowed` set.
    cap: usize,
    overflowed: bool,
    /// Whether a leading byte-order mark has been looked for.
    started: bool,
}

impl<R: BufRead> Tracker<R> {
    fn new(inner: R) -> Self {
        Tracker {
            inner,
            chunk: Vec::new(),
            head: 0,
            window: Vec::new(),
            window_start: 0,
            line: 1,
            column: 1,
            cap: DEFAULT_MAX_RECORD_BYTES,
            overflowed: false,
            started: false,
        }
    }

    /// Moves the mark forward to `abs`, dropping the bytes before it.
    fn advance_to(&mut self, abs: u64) {
        let n = usize::try_from(abs.saturating_sub(self.window_start))
            .unwrap_or(usize::MAX)
            .min(self.window.len());
        let (line, column) = self.scan(n);
        self.line = line;
        self.column = column;
        self.window.drain(..n);
        self.window_start += n as u64;
    }

    /// Line and column after the first `n` bytes of the window.
    fn scan(&self, n: usize) -> (u32, u32) {
        let (mut line, mut column) = (self.line, self.column);
        for &b in &self.window[..n.min(self.window.len())] {
            if b == b'\n' {
                line = line.saturating_add(1);
                column = 1;
            } else if (b & 0xC0) != 0x80 {
                column = column.saturating_add(1);
            }
        }
        (line, column)
    }

    /// Line and column of absolute offset `abs` (clamped to the window).
    fn position(&self, abs: u64) -> (u32, u32) {
        let n = usize::try_from(abs.saturating_sub(self.window_start)).unwrap_or(usize::MAX);
        self.scan(n)
    }

    /// Up to `n` bytes from absolute offset `abs`, reading ahead of the consumed input if needed (used
    /// only to describe an error, after which nothing more is read).
    fn lookahead(&mut self, abs: u64, n: usize) -> Vec<u8> {
        let a = usize::try_from(abs.saturating_sub(self.window_start))
            .unwrap_or(usize::MAX)
            .min(self.window.len());
        let mut out = self.window[a..].to_vec();
        loop {
            out.extend_from_slice(&self.chunk[self.head..]);
            self.head = self.chunk.len();
            if out.len() >= n {
                break;
            }
            match self.inner.fill_buf() {
                Ok(data) if !data.is_empty() => {
                    self.chunk.clear();
                    self.head = 0;
                    self.chunk.extend_from_slice(data);
                    let k = data.len();
                    self.inner.consume(k);
                }
                _ => break,
            }
        }
        out.truncate(n);
        out
    }

    /// The window bytes between two absolute offsets.
    fn slice(&self, from: u64, to: u64) -> &[u8] {
        let a = usize::try_from(from.saturating_sub(self.window_start)).unwrap_or(0).min(self.window.len());
        let b = usize::try_from(to.saturating_sub(self.window_start)).unwrap_or(0).min(self.window.len());
        &self.window[a..b.max(a)]
    }
}

impl<R: BufRead> io::Read for Tracker<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Tracker<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.window.len() > self.cap {
            self.overflowed = true;
            return Err(io::Error::other("record too large"));
        }
        if !self.started {
            // Drop leading byte-order marks so that offsets start at the first real character; the
            // inner reader may hand out fewer than three bytes at a time.
            self.started = true;
            loop {
                if self.chunk.len() - self.head >= UTF8_BOM.len() {
                    if !self.chunk[self.head..].starts_with(UTF8_BOM) {
                        break;
                    }
                    self.head += UTF8_BOM.len();
                    continue;
                }
                let data = self.inner.fill_buf()?;
                if data.is_empty() {
                    break;
                }
                self.chunk.extend_from_slice(data);
                let n = data.len();
                self.inner.consume(n);
            }
        }
        if self.head == self.chunk.len() {
            self.chunk.clear();
            self.head = 0;
            let data = self.inner.fill_buf()?;
            self.chunk.extend_from_slice(data);
            let n = data.len();
            self.inner.consume(n);
        }
        Ok(&self.chunk[self.head..])
    }

    fn consume(&mut self, amt: usize) {
        let amt = amt.min(self.chunk.len() - self.head);
        self.window.extend_from_slice(&self.chunk[self.head..self.head + amt]);
        self.head += amt;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XmlState {
    Prolog,
    InBatch,
    AfterBatch,
}

struct XmlBatch<R> {
    reader: Reader<Tracker<R>>,
    buf: Vec<u8>,
    state: XmlState,
    /// Line and column of `<batch>`.
    batch_at: (u32, u32),
}

const PROMPT_ATTRIBUTES: &str = "seed, width, height, steps, cfg, negative";

/// What a body event contributes, owned so that the event buffer can be reused.
enum BodyEvent {
    Open(String),
    Empty,
    Close(String),
    Text(Vec<u8>, u64),
    Ref(String),
    Skip,
    Refused(String),
    Eof,
}

impl<R: BufRead> XmlBatch<R> {
    fn new(inner: R) -> Self {
        let mut reader = Reader::from_reader(Tracker::new(inner));
        let config = reader.config_mut();
        config.check_end_names = false;
        config.allow_unmatched_ends = true;
        config.check_comments = true;
        config.trim_text(false);
        XmlBatch { reader, buf: Vec::new(), state: XmlState::Prolog, batch_at: (1, 1) }
    }

    fn tracker(&self) -> &Tracker<R> {
        self.reader.get_ref()
    }

    fn err_at(&self, abs: u64, message: impl Into<String>) -> BatchError {
        let (line, column) = self.tracker().position(abs);
        berr(line, column, message)
    }

    /// Maps a quick-xml read error (or an I/O or size error) to a fatal step.
    fn read_error(&mut self, err: &quick_xml::Error, record_start: u64) -> Step {
        if self.tracker().overflowed {
            return Step::Fatal(
                self.err_at(
                    record_start,
                    format!("this element is larger than {} bytes", self.tracker().cap),
                ),
            );
        }
        if let quick_xml::Error::Io(e) = err {
            let pos = self.reader.buffer_position();
            return Step::Fatal(self.err_at(pos, format!("read error: {e}")));
        }
        let at = self.reader.error_position();
        let rest = self.reader.get_mut().lookahead(at, 9);
        let (_, message) = prompt::describe_read_error(err, &rest);
        Step::Fatal(self.err_at(at, message))
    }

    fn next_prompt(&mut self, limits: Option<&PromptLimits>) -> Step {
        loop {
            let pos = self.reader.buffer_position();
            self.reader.get_mut().advance_to(pos);
            self.buf.clear();
            let event = match self.reader.read_event_into(&mut self.buf) {
                Ok(e) => e,
                Err(e) => return self.read_error(&e, pos),
            };
            // Summarise the event so that `self` is free again.
            let (kind, name, prompt_attrs) = match &event {
                Event::Start(e) | Event::Empty(e) => {
                    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                    let attrs = (name == "prompt" && self.state == XmlState::InBatch)
                        .then(|| parse_prompt_attributes(e, pos, self.reader.get_ref()));
                    (if matches!(event, Event::Start(_)) { "start" } else { "empty" }, name, attrs)
                }
                Event::End(e) => ("end", String::from_utf8_lossy(e.name().as_ref()).into_owned(), None),
                Event::Text(t) => {
                    if t.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    ("text", String::new(), None)
                }
                Event::Comment(_) => continue,
                Event::CData(_) | Event::GeneralRef(_) => ("text", String::new(), None),
                Event::Decl(_) if self.state == XmlState::Prolog && pos == 0 => continue,
                Event::Decl(_) => ("decl", String::new(), None),
                Event::PI(_) => ("pi", String::new(), None),
                Event::DocType(_) => ("doctype", String::new(), None),
                Event::Eof => ("eof", String::new(), None),
            };
            drop(event);
            match (self.state, kind) {
                (_, "doctype") => {
                    return Step::Fatal(self.err_at(pos, "DOCTYPE declarations are not allowed"))
                }
                (_, "pi") => {
                    return Step::Fatal(self.err_at(pos, "processing instructions (<?...?>) are not allowed"))
                }
                (_, "decl") => {
                    return Step::Fatal(
                        self.err_at(pos, "an XML declaration is only allowed at the very start of the file"),
                    )
                }
                (XmlState::Prolog, "start" | "empty") if name == "batch" => {
                    self.batch_at = self.tracker().position(pos);
                    self.state = if kind == "start" { XmlState::InBatch } else { XmlState::AfterBatch };
                }
                (XmlState::Prolog, "start" | "empty") => {
                    return Step::Fatal(
                        self.err_at(pos, format!("expected the root element <batch>, found <{name}>")),
                    )
                }
                (XmlState::Prolog, "eof") => {
                    return Step::Fatal(self.err_at(pos, "no <batch> root element found"));
                }
                (XmlState::InBatch, "start") if name == "prompt" => {
                    let attrs = prompt_attrs.expect("parsed for <prompt> in <batch>");
                    return self.read_prompt(pos, attrs, limits).in_prompt();
                }
                (XmlState::InBatch, "empty") if name == "prompt" => {
                    return match prompt_attrs.expect("parsed for <prompt> in <batch>") {
                        Err(e) => Step::Error(e),
                        Ok(_) => Step::Error(self.err_at(pos, "the prompt is empty")),
                    }
                    .in_prompt();
                }
                (XmlState::InBatch, "start" | "empty") => {
                    return Step::Fatal(
                        self.err_at(
                            pos,
                            format!("unexpected element <{name}> in <batch>; expected <prompt>"),
                        ),
                    )
                }
                (XmlState::InBatch, "end") if name == "batch" => self.state = XmlState::AfterBatch,
                (XmlState::InBatch, "end") => {
                    return Step::Fatal(
                        self.err_at(pos, format!("closing tag </{name}> does not match <batch>")),
                    )
                }
                (XmlState::InBatch, "text") => {
                    return Step::Error(
                        self.err_at(pos, "text outside <prompt> elements is not allowed in <batch>"),
                    )
                }
                (XmlState::InBatch, "eof") => {
                    let (l, c) = self.batch_at;
                    return Step::Fatal(
                        self.err_at(pos, format!("<batch> opened at line {l}, column {c} is not closed")),
                    );
                }
                (XmlState::AfterBatch, "eof") => return Step::End,
                (XmlState::AfterBatch, _) | (XmlState::Prolog, _) => {
                    return Step::Fatal(
                        self.err_at(pos, "only comments and whitespace may appear outside <batch>"),
                    )
                }
                (XmlState::InBatch, _) => unreachable!("all event kinds handled"),
            }
        }
    }

    /// Reads the body of a `<prompt>` whose start tag began at `tag_start`, up to its `</prompt>`.
    fn read_prompt(
        &mut self,
        tag_start: u64,
        attrs: Result<BatchPrompt, BatchError>,
        limits: Option<&PromptLimits>,
    ) -> Step {
        let body_start = self.reader.buffer_position();
        let mut open: Vec<(String, u64)> = Vec::new();
        let mut has_elements = false;
        let mut decoded: Vec<u8> = Vec::new();
        let mut first_char: Option<u64> = None;
        let mut body_error: Option<BatchError> = None;
        let body_end = loop {
            let pos = self.reader.buffer_position();
            self.buf.clear();
            let ev = match self.reader.read_event_into(&mut self.buf) {
                Ok(Event::Start(e)) => {
                    BodyEvent::Open(String::from_utf8_lossy(e.name().as_ref()).into_owned())
                }
                Ok(Event::Empty(_)) => BodyEvent::Empty,
                Ok(Event::End(e)) => {
                    BodyEvent::Close(String::from_utf8_lossy(e.name().as_ref()).into_owned())
                }
                Ok(Event::Text(t)) => BodyEvent::Text(t.to_vec(), pos),
                Ok(Event::CData(t)) => BodyEvent::Text(t.to_vec(), pos + 9),
                Ok(Event::GeneralRef(r)) => BodyEvent::Ref(String::from_utf8_lossy(&r).into_owned()),
                Ok(Event::Comment(_)) => BodyEvent::Skip,
                Ok(Event::Decl(_) | Event::PI(_)) => {
                    BodyEvent::Refused("processing instructions (<?...?>) are not allowed".into())
                }
                Ok(Event::DocType(_)) => BodyEvent::Refused("DOCTYPE declarations are not allowed".into()),
                Ok(Event::Eof) => BodyEvent::Eof,
                Err(e) => return self.read_error(&e, tag_start),
            };
            match ev {
                BodyEvent::Open(name) => {
                    has_elements = true;
                    first_char.get_or_insert(pos);
                    open.push((name, pos));
                }
                BodyEvent::Empty => {
                    has_elements = true;
                    first_char.get_or_insert(pos);
                }
                BodyEvent::Close(name) => {
                    match open.pop() {
                        None if name == "prompt" => break pos,
                        None => {
                            let (l, c) = self.tracker().position(tag_start);
                            return Step::Fatal(self.err_at(
                            pos,
                            format!("closing tag </{name}> does not match <prompt> opened at line {l}, column {c}"),
                        ));
                        }
                        Some((top, at)) if top != name => {
                            let (l, c) = self.tracker().position(at);
                            return Step::Fatal(self.err_at(
                            pos,
                            format!("closing tag </{name}> does not match <{top}> opened at line {l}, column {c}"),
                        ));
                        }
                        Some(_) => {}
                    }
                }
                BodyEvent::Text(bytes, at) => {
                    match std::str::from_utf8(&bytes) {
                        Ok(s) => {
                            if first_char.is_none() {
                                if let Some((i, _)) = s.char_indices().find(|(_, c)| !c.is_whitespace()) {
                                    first_char = Some(at + i as u64);
                                }
                            }
                        }
                        Err(e) => {
                            if body_error.is_none() {
                                body_error = Some(self.err_at(at + e.valid_up_to() as u64, "invalid UTF-8"));
                            }
                        }
                    }
                    decoded.extend_from_slice(&bytes);
                }
                BodyEvent::Ref(body) => {
                    first_char.get_or_insert(pos);
                    match prompt::resolve_reference(&body) {
                        Ok(c) => decoded.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        Err((_, message)) => {
                            if body_error.is_none() {
                                body_error = Some(self.err_at(pos, message));
                            }
                        }
                    }
                }
                BodyEvent::Skip => {}
                BodyEvent::Refused(message) => {
                    if body_error.is_none() {
                        body_error = Some(self.err_at(pos, message));
                    }
                }
                BodyEvent::Eof => {
                    let (l, c) = self.tracker().position(tag_start);
                    return Step::Fatal(
                        self.err_at(pos, format!("<prompt> opened at line {l}, column {c} is not closed")),
                    );
                }
            }
        };
        let mut prompt = match attrs {
            Ok(p) => p,
            Err(e) => return Step::Error(e),
        };
        if let Some(e) = body_error {
            return Step::Error(e);
        }
        let text = if has_elements {
            match std::str::from_utf8(self.tracker().slice(body_start, body_end)) {
                Ok(s) => s.trim().to_owned(),
                Err(e) => {
                    return Step::Error(self.err_at(body_start + e.valid_up_to() as u64, "invalid UTF-8"))
                }
            }
        } else {
            // Every piece was checked above, and references add whole characters.
            String::from_utf8(decoded).map(|s| s.trim().to_owned()).unwrap_or_default()
        };
        let Some(first) = first_char.filter(|_| !text.is_empty()) else {
            return Step::Error(self.err_at(tag_start, "the prompt is empty"));
        };
        let (line, column) = self.tracker().position(first);
        if let Err(e) = validate(&text, line, column, limits) {
            return Step::Error(e);
        }
        prompt.text = text;
        prompt.line = line;
        Step::Prompt(prompt)
    }
}

/// Parses the attributes of a `<prompt>` start tag that begins at absolute offset `tag_start`.
fn parse_prompt_attributes<R: BufRead>(
    e: &BytesStart<'_>,
    tag_start: u64,
    tracker: &Tracker<R>,
) -> Result<BatchPrompt, BatchError> {
    let at = |rel: usize| {
        let (line, column) = tracker.position(tag_start + 1 + rel as u64);
        (line, column)
    };
    let content: &[u8] = e;
    let mut prompt = BatchPrompt::default();
    // Offset (in `content`) where the next attribute name is searched for.
    let mut cursor = e.name().as_ref().len();
    for attr in e.attributes() {
        let attr = match attr {
            Ok(a) => a,
            Err(err) => {
                let (line, column) = at(prompt::attr_error_offset(&err));
                return Err(berr(
                    line,
                    column,
                    format!("in <prompt>: {}", prompt::describe_attr_error(&err)),
                ));
            }
        };
        let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
        // Attributes come in order and were validated, so the key is the next non-blank run.
        while cursor < content.len() && content[cursor].is_ascii_whitespace() {
            cursor += 1;
        }
        let key_at = cursor;
        cursor = skip_attribute(content, cursor);
        let (line, column) = at(key_at);
        let raw = std::str::from_utf8(&attr.value)
            .map_err(|_| berr(line, column, format!("attribute {key}: invalid UTF-8")))?;
        let value = quick_xml::escape::unescape(raw)
            .map_err(|err| berr(line, column, format!("attribute {key}: {err}")))?
            .into_owned();
        let bad = |what: &str| berr(line, column, format!("attribute {key}=\"{value}\": expected {what}"));
        match key.as_str() {
            "seed" => {
                prompt.seed = Some(value.trim().parse().map_err(|_| bad("an unsigned 64-bit integer"))?)
            }
            "width" => prompt.width = Some(value.trim().parse().map_err(|_| bad("an unsigned integer"))?),
            "height" => prompt.height = Some(value.trim().parse().map_err(|_| bad("an unsigned integer"))?),
            "steps" => prompt.steps = Some(value.trim().parse().map_err(|_| bad("an unsigned integer"))?),
            "cfg" => {
                let v: f32 = value.trim().parse().map_err(|_| bad("a number"))?;
                if !v.is_finite() {
                    return Err(bad("a finite number"));
                }
                prompt.cfg_scale = Some(v);
            }
            "negative" => prompt.negative_prompt = Some(value),
            _ => {
                return Err(berr(
                    line,
                    column,
                    format!("unknown attribute `{key}` on <prompt> (allowed: {PROMPT_ATTRIBUTES})"),
                ))
            }
        }
    }
    Ok(prompt)
}

/// Skips one well-formed `name = "value"` starting at `i`, returning the offset after it.
fn skip_attribute(content: &[u8], mut i: usize) -> usize {
    while i < content.len() && content[i] != b'=' && !content[i].is_ascii_whitespace() {
        i += 1;
    }
    while i < content.len() && (content[i] == b'=' || content[i].is_ascii_whitespace()) {
        i += 1;
    }
    if let Some(&q) = content.get(i) {
        if q == b'"' || q == b'\'' {
            i += 1;
            while i < content.len() && content[i] != q {
                i += 1;
            }
            i += 1;
        }
    }
    i.min(content.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Cursor};

    fn read_all(input: &str, format: BatchFormat) -> Vec<Result<BatchPrompt, BatchError>> {
        BatchReader::new(Cursor::new(input.as_bytes().to_vec()), format).collect()
    }

    /// Reads through a 1-byte buffer as well and checks that the results agree.
    fn read_both(input: &str, format: BatchFormat) -> Vec<Result<BatchPrompt, BatchError>> {
        let a = read_all(input, format);
        let b: Vec<_> = BatchReader::new(BufReader::with_capacity(1, input.as_bytes()), format).collect();
        assert_eq!(a, b, "results differ with a 1-byte buffer");
        a
    }

    fn ok(r: &Result<BatchPrompt, BatchError>) -> &BatchPrompt {
        r.as_ref().unwrap_or_else(|e| panic!("unexpected error: {e}"))
    }

    fn bad(r: &Result<BatchPrompt, BatchError>) -> (u32, u32, &str) {
        match r {
            Err(e) => (e.line, e.column, e.message.as_str()),
            Ok(p) => panic!("expected an error, got {p:?}"),
        }
    }

    #[test]
    fn format_from_path_and_sniff() {
        assert_eq!(BatchFormat::from_path(Path::new("a/b.xml")), Some(BatchFormat::Xml));
        assert_eq!(BatchFormat::from_path(Path::new("b.XML")), Some(BatchFormat::Xml));
        assert_eq!(BatchFormat::from_path(Path::new("b.jsonl")), Some(BatchFormat::Jsonl));
        assert_eq!(BatchFormat::from_path(Path::new("b.ndjson")), Some(BatchFormat::Jsonl));
        assert_eq!(BatchFormat::from_path(Path::new("b.txt")), Some(BatchFormat::Text));
        assert_eq!(BatchFormat::from_path(Path::new("b.json")), None);
        assert_eq!(BatchFormat::from_path(Path::new("noext")), None);
        assert_eq!(BatchFormat::sniff(b"\xEF\xBB\xBF  <?xml version=\"1.0\"?>"), BatchFormat::Xml);
        assert_eq!(BatchFormat::sniff(b"\n<batch>"), BatchFormat::Xml);
        assert_eq!(BatchFormat::sniff(b"<!-- prompts -->\n<batch>"), BatchFormat::Xml);
        assert_eq!(BatchFormat::sniff(b"  {\"prompt\": \"x\"}"), BatchFormat::Jsonl);
        assert_eq!(BatchFormat::sniff(b"1girl, solo\n"), BatchFormat::Text);
        assert_eq!(BatchFormat::sniff(b"<character_1><n>a</n></character_1>\n"), BatchFormat::Text);
        assert_eq!(BatchFormat::sniff(b""), BatchFormat::Text);
    }

    const XML_BATCH: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- two prompts -->\n<batch>\n  <prompt seed=\"1\" width=\"1024\" height=\"768\" steps=\"28\" cfg=\"4.5\" negative=\"lowres, &quot;bad&quot;\">\n    <character_1>\n      <n>miku</n>\n    </character_1>\n    <general_tags><count>1girl</count></general_tags>\n  </prompt>\n  <prompt seed=\"18446744073709551615\">1girl, solo &amp; smile</prompt>\n</batch>\n";

    #[test]
    fn xml_batch_reads_attributes_and_verbatim_bodies() {
        let r = read_both(XML_BATCH, BatchFormat::Xml);
        assert_eq!(r.len(), 2);
        let p = ok(&r[0]);
        assert_eq!(
            p.text,
            "<character_1>\n      <n>miku</n>\n    </character_1>\n    <general_tags><count>1girl</count></general_tags>"
        );
        assert_eq!(p.seed, Some(1));
        assert_eq!((p.width, p.height, p.steps), (Some(1024), Some(768), Some(28)));
        assert_eq!(p.cfg_scale, Some(4.5));
        assert_eq!(p.negative_prompt.as_deref(), Some("lowres, \"bad\""));
        assert_eq!(p.line, 5);
        let q = ok(&r[1]);
        assert_eq!(q.text, "1girl, solo & smile");
        assert_eq!(q.seed, Some(u64::MAX));
        assert_eq!((q.width, q.cfg_scale, q.negative_prompt.as_deref()), (None, None, None));
        assert_eq!(q.line, 10);
    }

    /// (in_prompt, fatal) of each error, in order.
    fn error_kinds(input: &str, format: BatchFormat) -> Vec<(bool, bool)> {
        read_both(input, format)
            .into_iter()
            .filter_map(|r| r.err().map(|e| (e.in_prompt, e.fatal)))
            .collect()
    }

    #[test]
    fn errors_say_whether_they_are_in_a_prompt_and_whether_reading_stopped() {
        // A bad attribute, stray text between prompts, then a mismatched tag inside a prompt.
        let s = "<batch><prompt size=\"1\">a</prompt> x <prompt><n>b</m></prompt><prompt>c</prompt></batch>";
        assert_eq!(error_kinds(s, BatchFormat::Xml), vec![(true, false), (false, false), (true, true)]);
        assert_eq!(error_kinds("<batch><prompt/><prompt>a</prompt>", BatchFormat::Xml), vec![(true, false), (false, true)]);
        assert_eq!(error_kinds("<other/>", BatchFormat::Xml), vec![(false, true)]);
        assert_eq!(error_kinds("{\"prompt\": 1}\n\n[1]\n{\"prompt\": \"a\"}", BatchFormat::Jsonl), vec![(true, false), (true, false)]);
    }

    #[test]
    fn xml_plain_bodies_decode_cdata_and_skip_comments() {
        let s = "<batch><prompt>\n <![CDATA[a <3 & c]]> <!-- x --> d &#x263A;</prompt></batch>";
        let r = read_both(s, BatchFormat::Xml);
        assert_eq!(ok(&r[0]).text, "a <3 & c  d \u{263A}");
        assert_eq!(ok(&r[0]).line, 2);
    }

    #[test]
    fn xml_body_keeps_comments_and_references_verbatim_when_it_has_elements() {
        let s = "<batch><prompt> <!-- c --><caption>Tom &amp; Jerry</caption> </prompt></batch>";
        let r = read_both(s, BatchFormat::Xml);
        assert_eq!(ok(&r[0]).text, "<!-- c --><caption>Tom &amp; Jerry</caption>");
    }

    #[test]
    fn xml_attribute_errors_point_at_the_attribute() {
        let s = "<batch>\n  <prompt width=\"1024\"\n          seed=\"abc\">x</prompt>\n  <prompt cfg=\"inf\">y</prompt>\n  <prompt  color=\"red\">z</prompt>\n  <prompt seed=\"1\" seed=\"2\">w</prompt>\n  <prompt steps=\"-1\">v</prompt>\n  <prompt seed=\"7\">ok</prompt>\n</batch>";
        let r = read_both(s, BatchFormat::Xml);
        assert_eq!(r.len(), 6);
        let (l, c, m) = bad(&r[0]);
        assert_eq!((l, c), (3, 11));
        assert!(m.contains("seed=\"abc\""), "{m}");
        let (l, c, m) = bad(&r[1]);
        assert_eq!((l, c), (4, 11));
        assert!(m.contains("finite"), "{m}");
        let (l, c, m) = bad(&r[2]);
        assert_eq!((l, c), (5, 12));
        assert!(m.contains("unknown attribute `color`"), "{m}");
        let (l, c, m) = bad(&r[3]);
        assert_eq!((l, c), (6, 20));
        assert!(m.contains("duplicate"), "{m}");
        let (l, c, _) = bad(&r[4]);
        assert_eq!((l, c), (7, 11));
        assert_eq!(ok(&r[5]).seed, Some(7));
        assert_eq!(ok(&r[5]).line, 8);
    }

    #[test]
    fn xml_prompt_errors_are_mapped_to_file_positions() {
        // Second line of the prompt: column as in the file.
        let s = "<batch>\n<prompt seed=\"1\">\n  <character_1>\n    <n>a &bogus; b</n>\n  </character_1>\n</prompt>\n<prompt>ok</prompt></batch>";
        let r = read_both(s, BatchFormat::Xml);
        let (l, c, m) = bad(&r[0]);
        assert_eq!((l, c), (4, 10));
        assert!(m.contains("&bogus;"), "{m}");
        assert_eq!(ok(&r[1]).text, "ok");
        // First line of the prompt: offset by the prompt's start column.
        let s = "<batch>\n<prompt seed=\"1\">  <a><b><c><d><e>x</e></d></c></b></a></prompt></batch>";
        let r = read_both(s, BatchFormat::Xml);
        let (l, c, m) = bad(&r[0]);
        assert_eq!((l, c), (2, 32));
        assert!(m.contains("<e>") && m.contains("limit is 4"), "{m}");
        // Limits can be changed, or validation turned off.
        let loose: Vec<_> = BatchReader::new(s.as_bytes(), BatchFormat::Xml)
            .with_limits(PromptLimits { max_depth: 5, ..PromptLimits::default() })
            .collect();
        assert!(loose[0].is_ok(), "{loose:?}");
        let off: Vec<_> = BatchReader::new(s.as_bytes(), BatchFormat::Xml).without_validation().collect();
        assert_eq!(ok(&off[0]).text, "<a><b><c><d><e>x</e></d></c></b></a>");
    }

    #[test]
    fn xml_empty_prompts_are_errors_and_reading_goes_on() {
        let s = "<batch>\n <prompt seed=\"1\"/>\n <prompt>  \n </prompt>\n <prompt><!-- nothing --></prompt>\n <prompt>x</prompt>\n</batch>";
        let r = read_both(s, BatchFormat::Xml);
        assert_eq!(r.len(), 4);
        assert_eq!(bad(&r[0]), (2, 2, "the prompt is empty"));
        assert_eq!(bad(&r[1]), (3, 2, "the prompt is empty"));
        assert_eq!(bad(&r[2]), (5, 2, "the prompt is empty"));
        assert_eq!(ok(&r[3]).text, "x");
    }

    #[test]
    fn xml_doctype_and_processing_instructions_are_refused() {
        let r = read_both(
            "<?xml version=\"1.0\"?>\n<!DOCTYPE batch [<!ENTITY x \"y\">]>\n<batch/>",
            BatchFormat::Xml,
        );
        assert_eq!(r.len(), 1);
        let (l, c, m) = bad(&r[0]);
        assert_eq!((l, c), (2, 1));
        assert!(m.contains("DOCTYPE"), "{m}");
        let r = read_both(
            "<batch>\n<prompt>\n<caption>a</caption><?pi x?></prompt><prompt>b</prompt></batch>",
            BatchFormat::Xml,
        );
        let (l, c, m) = bad(&r[0]);
        assert_eq!((l, c), (3, 21));
        assert!(m.contains("processing instruction"), "{m}");
        assert_eq!(ok(&r[1]).text, "b");
        let r = read_both("<batch><?pi?></batch>", BatchFormat::Xml);
        assert_eq!((bad(&r[0]).0, bad(&r[0]).1), (1, 8));
        let r = read_both("\n<?xml version=\"1.0\"?><batch/>", BatchFormat::Xml);
        assert_eq!((bad(&r[0]).0, bad(&r[0]).1), (2, 1));
        let r = read_both("<batch><prompt><!ENTITY x \"y\"></prompt></batch>", BatchFormat::Xml);
        assert_eq!(bad(&r[0]).0, 1);
        assert_eq!(bad(&r[0]).1, 16);
        assert!(bad(&r[0]).2.contains("entity declarations"), "{}", bad(&r[0]).2);
    }

    #[test]
    fn xml_structure_errors_end_the_stream() {
        let cases: &[(&str, (u32, u32), &str)] = &[
            ("", (1, 1), "no <batch>"),
            ("  \n<!-- only a comment -->\n", (3, 1), "no <batch>"),
            (
                "<prompts><prompt>x</prompt></prompts>",
                (1, 1),
                "expected the root element <batch>, found <prompts>",
            ),
            ("<batch>\n<prompt>a</prompt>\n<item>b</item></batch>", (3, 1), "unexpected element <item>"),
            ("<batch>\n<prompt>a</prompt>\n", (3, 1), "<batch> opened at line 1, column 1 is not closed"),
            (
                "<batch>\n<prompt>\n<n>a</prompt></batch>",
                (3, 5),
                "closing tag </prompt> does not match <n> opened at line 3, column 1",
            ),
            (
                "<batch>\n<prompt>a</n></batch>",
                (2, 10),
                "closing tag </n> does not match <prompt> opened at line 2, column 1",
            ),
            ("<batch>\n <prompt>a", (2, 11), "<prompt> opened at line 2, column 2 is not closed"),
            ("<batch></batch>\n<batch></batch>", (2, 1), "outside <batch>"),
            ("<batch></prompt>", (1, 8), "closing tag </prompt> does not match <batch>"),
            ("<batch>\n<prompt seed=\"1\"", (2, 1), "not found"),
            ("<batch><prompt>fish & chips</prompt></batch>", (1, 21), "&amp;"),
        ];
        for (input, (line, column), needle) in cases {
            let r = read_both(input, BatchFormat::Xml);
            let last = r.last().unwrap_or_else(|| panic!("no result for {input:?}"));
            let (l, c, m) = bad(last);
            assert_eq!((l, c), (*line, *column), "{input:?}: {m}");
            assert!(m.contains(needle), "{input:?}: {m}");
        }
    }

    #[test]
    fn xml_stray_text_is_an_error_but_reading_goes_on() {
        let r = read_both("<batch>\n  oops\n  <prompt>a</prompt>\n</batch>", BatchFormat::Xml);
        assert_eq!(r.len(), 2);
        assert_eq!((bad(&r[0]).0, bad(&r[0]).1), (1, 8));
        assert_eq!(ok(&r[1]).text, "a");
    }

    #[test]
    fn xml_record_size_limit() {
        let big = format!(
            "<batch>\n<prompt>ok</prompt>\n<prompt>{}</prompt><prompt>never</prompt></batch>",
            "x".repeat(5000)
        );
        let r: Vec<_> =
            BatchReader::new(big.as_bytes(), BatchFormat::Xml).with_max_record_bytes(1000).collect();
        assert_eq!(r.len(), 2);
        assert_eq!(ok(&r[0]).text, "ok");
        let (l, c, m) = bad(&r[1]);
        assert_eq!((l, c), (3, 1));
        assert!(m.contains("larger than 1000 bytes"), "{m}");
    }

    #[test]
    fn xml_byte_order_mark_and_multibyte_columns() {
        let s = "\u{FEFF}<batch>\n<prompt negative=\"ぼやけ\">猫と犬、<caption>a &nope; b</caption></prompt></batch>";
        let r = read_both(s, BatchFormat::Xml);
        let (l, c, _) = bad(&r[0]);
        // <prompt ...> is 23 characters, 猫と犬、 4, `<caption>a ` 11: the reference is at column 39.
        assert_eq!((l, c), (2, 39));
        let r = read_both("\u{FEFF}<batch><prompt negative=\"ぼやけ\">猫</prompt></batch>", BatchFormat::Xml);
        assert_eq!(ok(&r[0]).negative_prompt.as_deref(), Some("ぼやけ"));
    }

    #[test]
    fn xml_invalid_utf8() {
        let mut bytes = b"<batch>\n<prompt>ab".to_vec();
        bytes.extend_from_slice(&[0xFF, 0xFE]);
        bytes.extend_from_slice(b"</prompt><prompt>ok</prompt></batch>");
        let r: Vec<_> = BatchReader::new(&bytes[..], BatchFormat::Xml).collect();
        assert_eq!((bad(&r[0]).0, bad(&r[0]).1, bad(&r[0]).2), (2, 11, "invalid UTF-8"));
        assert_eq!(ok(&r[1]).text, "ok");
    }

    /// Generates `n` prompts of an XML batch on the fly, without holding the file.
    struct Generated {
        n: usize,
        i: usize,
        pending: Vec<u8>,
        pos: usize,
        finished: bool,
    }

    impl io::Read for Generated {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.pos == self.pending.len() {
                self.pending.clear();
                self.pos = 0;
                if self.i == 0 && !self.finished {
                    self.pending.extend_from_slice(b"<batch>\n");
                }
                if self.i < self.n {
                    let p = format!(
                        "<prompt seed=\"{}\"><character_1><n>c{}</n></character_1></prompt>\n",
                        self.i, self.i
                    );
                    self.pending.extend_from_slice(p.as_bytes());
                    self.i += 1;
                } else if !self.finished {
                    self.pending.extend_from_slice(b"</batch>\n");
                    self.finished = true;
                }
            }
            let n = (self.pending.len() - self.pos).min(out.len());
            out[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn xml_reader_streams_with_a_bounded_window() {
        let n = 20_000;
        let gen = Generated { n, i: 0, pending: Vec::new(), pos: 0, finished: false };
        let mut reader = BatchReader::new(BufReader::with_capacity(4096, gen), BatchFormat::Xml);
        let mut count = 0u64;
        let mut largest_window = 0;
        while let Some(item) = reader.next() {
            let p = item.unwrap();
            assert_eq!(p.seed, Some(count));
            assert_eq!(p.line as u64, count + 2);
            count += 1;
            if let Source::Xml(x) = &reader.source {
                largest_window = largest_window.max(x.reader.get_ref().window.capacity());
            }
        }
        assert_eq!(count, n as u64);
        assert!(largest_window < 16 * 1024, "window grew to {largest_window} bytes");
    }

    #[test]
    fn jsonl_records() {
        let s = "{\"prompt\": \"  1girl, solo \", \"seed\": 3, \"width\": 832, \"height\": 1216, \"steps\": 30, \"cfg\": 5.5, \"negative\": \"lowres\"}\n\n   \n{\"prompt\": \"<caption>x</caption>\", \"seed\": null}\r\n";
        let r = read_both(s, BatchFormat::Jsonl);
        assert_eq!(r.len(), 2);
        assert_eq!(
            ok(&r[0]),
            &BatchPrompt {
                text: "1girl, solo".into(),
                seed: Some(3),
                width: Some(832),
                height: Some(1216),
                steps: Some(30),
                cfg_scale: Some(5.5),
                negative_prompt: Some("lowres".into()),
                line: 1,
            }
        );
        assert_eq!(ok(&r[1]).text, "<caption>x</caption>");
        assert_eq!(ok(&r[1]).seed, None);
        assert_eq!(ok(&r[1]).line, 4);
    }

    #[test]
    fn jsonl_errors() {
        let s = "{\"prompt\": \"a\", \"sampler\": \"euler\"}\n{\"prompt\": \"b\", \"seed\": \"x\"}\n{\"seed\": 1}\n  {\"prompt\": \"c\",\n{\"prompt\": \"   \"}\n[1]\n{\"prompt\": \"<a><b>\"}\n{\"prompt\": \"é\", \"prompt\": \"f\"}\n{\"prompt\": \"ok\"}";
        let r = read_both(s, BatchFormat::Jsonl);
        assert_eq!(r.len(), 9);
        let (l, c, m) = bad(&r[0]);
        // serde_json points at the last byte of the key.
        assert_eq!((l, c), (1, 25));
        assert!(m.contains("unknown field `sampler`"), "{m}");
        let (l, c, m) = bad(&r[1]);
        assert_eq!((l, c), (2, 27));
        assert!(m.contains("invalid type"), "{m}");
        let (l, _, m) = bad(&r[2]);
        assert_eq!(l, 3);
        assert!(m.contains("missing field `prompt`"), "{m}");
        let (l, _, m) = bad(&r[3]);
        assert_eq!(l, 4);
        assert!(m.contains("EOF"), "{m}");
        assert_eq!(bad(&r[4]), (5, 1, "the prompt is empty"));
        assert_eq!(bad(&r[5]), (6, 1, "expected a JSON object with a \"prompt\" field"));
        let (l, c, m) = bad(&r[6]);
        assert_eq!((l, c), (7, 1));
        assert!(m.contains("unclosed tag <b>") && m.contains("prompt text line 1, column 4"), "{m}");
        let (l, _, m) = bad(&r[7]);
        assert_eq!(l, 8);
        assert!(m.contains("duplicate field `prompt`"), "{m}");
        assert_eq!(ok(&r[8]).text, "ok");
    }

    #[test]
    fn jsonl_round_trip() {
        let p = BatchPrompt {
            text: "<caption>\"quoted\" \\ and\nnewline é</caption>".into(),
            seed: Some(42),
            width: None,
            height: Some(512),
            steps: None,
            cfg_scale: Some(3.3),
            negative_prompt: Some("a\tb".into()),
            line: 1,
        };
        let line = p.to_jsonl();
        assert!(!line.contains('\n'));
        let r = read_all(&format!("\n{line}\n"), BatchFormat::Jsonl);
        assert_eq!(ok(&r[0]), &BatchPrompt { line: 2, ..p });
    }

    #[test]
    fn byte_order_mark_in_line_formats() {
        let r = read_both("\u{FEFF}  x <a\n", BatchFormat::Text);
        assert_eq!((bad(&r[0]).0, bad(&r[0]).1), (1, 5));
        let r = read_both("\u{FEFF}{\"prompt\": \"p\"}\n", BatchFormat::Jsonl);
        assert_eq!(ok(&r[0]).text, "p");
    }

    #[test]
    fn text_lines() {
        let s = "# a comment\n1girl, solo\n\n   # indented comment\n  <character_1><n>a</n></character_1>  \r\nlast line without newline";
        let r = read_both(s, BatchFormat::Text);
        assert_eq!(r.len(), 3);
        assert_eq!((ok(&r[0]).text.as_str(), ok(&r[0]).line), ("1girl, solo", 2));
        assert_eq!((ok(&r[1]).text.as_str(), ok(&r[1]).line), ("<character_1><n>a</n></character_1>", 5));
        assert_eq!((ok(&r[2]).text.as_str(), ok(&r[2]).line), ("last line without newline", 6));
        assert_eq!(ok(&r[0]).seed, None);
    }

    #[test]
    fn text_errors() {
        let mut bytes = b"ok\n   <character_1><n>a</character_1>\n".to_vec();
        bytes.extend_from_slice(&[b'a', b'\xC3', b'\xA9', 0xFF, b'\n']);
        bytes.extend_from_slice(&b"x".repeat(50));
        bytes.extend_from_slice(b"\nend\n");
        let r: Vec<_> = BatchReader::new(&bytes[..], BatchFormat::Text).with_max_record_bytes(40).collect();
        assert_eq!(r.len(), 5);
        assert_eq!(ok(&r[0]).text, "ok");
        let (l, c, m) = bad(&r[1]);
        assert_eq!((l, c), (2, 21));
        assert!(m.contains("</character_1>"), "{m}");
        assert_eq!(bad(&r[2]), (3, 3, "invalid UTF-8"));
        let (l, _, m) = bad(&r[3]);
        assert_eq!(l, 4);
        assert!(m.contains("longer than 40 bytes"), "{m}");
        assert_eq!((ok(&r[4]).text.as_str(), ok(&r[4]).line), ("end", 5));
    }

    #[test]
    fn file_line_maps_prompt_diagnostics() {
        let p = BatchPrompt { line: 10, ..BatchPrompt::default() };
        let d = Diagnostic { line: 3, column: 1, code: prompt::codes::UNKNOWN_TAG, message: String::new() };
        assert_eq!(p.file_line(&d), 12);
    }

    #[test]
    fn batch_error_display() {
        assert_eq!(berr(3, 7, "boom").to_string(), "line 3, column 7: boom");
    }
}

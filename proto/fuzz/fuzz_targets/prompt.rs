//! Fuzz target: `parse_prompt` and the three batch readers on arbitrary bytes.
//!
//! Run from `proto/`: `cargo +nightly fuzz run prompt -- -max_total_time=60`.
//! Besides "does not panic", it checks the invariants the rest of the farm relies on.
#![no_main]

use std::io::BufReader;

use farm_proto::batch::{BatchFormat, BatchReader};
use farm_proto::prompt::{looks_like_xml, parse_prompt, Diagnostic, PromptKind, PromptLimits};
use libfuzzer_sys::fuzz_target;

fn in_bounds(src: &str, d: &Diagnostic) -> bool {
    let lines: Vec<&str> = src.split('\n').collect();
    d.line >= 1
        && (d.line as usize) <= lines.len()
        && d.column >= 1
        && (d.column as usize) <= lines[d.line as usize - 1].chars().count() + 1
}

fn check_prompt(s: &str, limits: &PromptLimits) {
    let src = s.strip_prefix('\u{FEFF}').unwrap_or(s);
    match parse_prompt(s, limits) {
        Ok(p) => {
            assert_eq!(p.text, src.trim());
            assert!(!p.text.is_empty() && p.text.len() <= limits.max_bytes);
            assert_eq!(p.kind == PromptKind::Xml, looks_like_xml(&p.text));
            assert!(p.characters.len() <= limits.max_characters);
            for w in &p.warnings {
                assert!(in_bounds(src, w), "{w}");
            }
        }
        Err(d) => assert!(in_bounds(src, &d), "{d}"),
    }
}

fn check_batch(data: &[u8], format: BatchFormat) {
    let lines = data.iter().filter(|&&b| b == b'\n').count() as u32 + 1;
    let whole: Vec<_> = BatchReader::new(data, format).collect();
    // Reading through a tiny buffer must give the same results as reading from memory.
    let tiny: Vec<_> = BatchReader::new(BufReader::with_capacity(3, data), format).collect();
    assert_eq!(whole, tiny);
    for item in &whole {
        match item {
            Ok(p) => assert!(!p.text.is_empty() && p.line >= 1 && p.line <= lines),
            Err(e) => assert!(e.line >= 1 && e.line <= lines && e.column >= 1, "{e}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check_prompt(&text, &PromptLimits::default());
    check_prompt(&text, &PromptLimits { max_bytes: 64, max_depth: 2, max_characters: 1 });
    for format in [BatchFormat::Xml, BatchFormat::Jsonl, BatchFormat::Text] {
        check_batch(data, format);
    }
});

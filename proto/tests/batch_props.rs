//! Property tests of the batch readers.

mod common;

use std::io::{BufReader, Cursor};

use common::{gen_plain, gen_prompt};
use farm_proto::batch::{BatchError, BatchFormat, BatchPrompt, BatchReader};
use proptest::prelude::*;

/// seed, width, height, steps, cfg, negative.
type Settings = (Option<u64>, Option<u32>, Option<u32>, Option<u32>, Option<f32>, Option<String>);

fn settings() -> impl Strategy<Value = Settings> {
    (
        prop::option::of(any::<u64>()),
        prop::option::of(16u32..4096),
        prop::option::of(16u32..4096),
        prop::option::of(1u32..200),
        prop::option::of((0u32..3000).prop_map(|c| c as f32 / 100.0)),
        prop::option::of("[a-z_, &<>\"'\u{e9}\n]{0,20}"),
    )
}

/// A prompt text: an XML prompt (trimmed) or a plain one.
fn prompt_text() -> impl Strategy<Value = String> {
    prop_oneof![gen_prompt().prop_map(|g| g.input.trim().to_string()), gen_plain()]
        .prop_filter("non-empty", |s| !s.is_empty())
}

fn batch_prompt() -> impl Strategy<Value = BatchPrompt> {
    (prompt_text(), settings()).prop_map(
        |(text, (seed, width, height, steps, cfg_scale, negative_prompt))| BatchPrompt {
            text,
            seed,
            width,
            height,
            steps,
            cfg_scale,
            negative_prompt,
            line: 0,
        },
    )
}

fn read(bytes: &[u8], format: BatchFormat) -> Vec<Result<BatchPrompt, BatchError>> {
    BatchReader::new(Cursor::new(bytes.to_vec()), format).collect()
}

fn escape_attr(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('"', "&quot;").replace('\n', "&#10;")
}

fn escape_text(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// JSON Lines written from generated prompts reads back identical, with the right line numbers.
    #[test]
    fn jsonl_round_trip(prompts in prop::collection::vec((batch_prompt(), 0usize..3), 0..12)) {
        let mut file = String::new();
        let mut expected = Vec::new();
        let mut line = 0;
        for (p, blanks) in prompts {
            for _ in 0..blanks {
                file.push_str("  \n");
                line += 1;
            }
            file.push_str(&p.to_jsonl());
            file.push('\n');
            line += 1;
            expected.push(BatchPrompt { line, ..p });
        }
        let got: Vec<BatchPrompt> = read(file.as_bytes(), BatchFormat::Jsonl)
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, expected);
    }

    /// An XML batch written from generated prompts gives back each body verbatim (XML prompts) or
    /// decoded (plain prompts), its attributes, and the line where the text starts.
    #[test]
    fn xml_batch_round_trip(prompts in prop::collection::vec((batch_prompt(), "[ \n]{0,3}"), 0..10)) {
        let mut file = String::from("<?xml version=\"1.0\"?>\n<batch>\n");
        let mut expected = Vec::new();
        for (p, pad) in prompts {
            file.push_str("  <prompt");
            if let Some(v) = p.seed { file.push_str(&format!(" seed=\"{v}\"")); }
            if let Some(v) = p.width { file.push_str(&format!(" width=\"{v}\"")); }
            if let Some(v) = p.height { file.push_str(&format!(" height=\"{v}\"")); }
            if let Some(v) = p.steps { file.push_str(&format!(" steps=\"{v}\"")); }
            if let Some(v) = p.cfg_scale { file.push_str(&format!(" cfg=\"{v}\"")); }
            if let Some(v) = &p.negative_prompt { file.push_str(&format!(" negative=\"{}\"", escape_attr(v))); }
            file.push('>');
            file.push_str(&pad);
            let line = file.matches('\n').count() as u32 + 1;
            let xml = farm_proto::prompt::looks_like_xml(&p.text);
            file.push_str(&if xml { p.text.clone() } else { escape_text(&p.text) });
            file.push_str(&pad);
            file.push_str("</prompt>\n");
            expected.push(BatchPrompt { line, ..p });
        }
        file.push_str("</batch>\n");
        let got: Vec<BatchPrompt> = read(file.as_bytes(), BatchFormat::Xml)
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| TestCaseError::fail(format!("{e} in\n{file}")))?;
        prop_assert_eq!(got, expected);
    }

    /// A text batch of one-line prompts reads back, skipping blank and comment lines.
    #[test]
    fn text_batch_round_trip(lines in prop::collection::vec((prompt_text(), any::<bool>()), 0..12)) {
        let mut file = String::new();
        let mut expected = Vec::new();
        for (text, comment) in lines {
            let one_line = text.replace(['\n', '\r'], " ");
            if comment {
                file.push_str("# comment\n\n");
            }
            file.push_str(&format!("  {one_line}\n"));
            let line = file.matches('\n').count() as u32;
            expected.push((one_line.trim().to_string(), line));
        }
        let got: Vec<(String, u32)> = BatchReader::new(file.as_bytes(), BatchFormat::Text)
            .map(|r| r.map(|p| (p.text, p.line)))
            .collect::<Result<_, _>>()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, expected);
    }

    /// Arbitrary bytes never panic in any format, every error has a position, and a 1-byte read
    /// buffer gives the same results as reading from memory.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        for format in [BatchFormat::Xml, BatchFormat::Jsonl, BatchFormat::Text] {
            check_format(&bytes, format)?;
        }
    }

    /// Batch-like inputs (valid structure with random damage) never panic and agree across buffer sizes.
    #[test]
    fn batchish_inputs_never_panic(
        s in "(<batch>|</batch>|<prompt|</prompt>|<prompt seed=\"1\">|>|<|/|&|&amp;|;|\"|=|\n| |seed|x|<!--|-->|<!DOCTYPE|<?xml version=\"1.0\"?>|<character_1>|</character_1>|\\{|\\}|\"prompt\"|:|,|#|\u{e9}){0,60}",
    ) {
        for format in [BatchFormat::Xml, BatchFormat::Jsonl, BatchFormat::Text] {
            check_format(s.as_bytes(), format)?;
        }
    }
}

fn check_format(bytes: &[u8], format: BatchFormat) -> Result<(), TestCaseError> {
    let a = read(bytes, format);
    let b: Vec<_> = BatchReader::new(BufReader::with_capacity(1, bytes), format).collect();
    prop_assert_eq!(&a, &b);
    let lines = bytes.iter().filter(|&&c| c == b'\n').count() as u32 + 1;
    for r in &a {
        match r {
            Ok(p) => {
                prop_assert!(!p.text.is_empty());
                prop_assert!(p.line >= 1 && p.line <= lines);
            }
            Err(e) => {
                prop_assert!(e.line >= 1 && e.line <= lines, "{} (file has {} lines)", e, lines);
                prop_assert!(e.column >= 1);
            }
        }
    }
    Ok(())
}

//! `farm show-png`: the render metadata a result PNG carries.
//!
//! Results hold a `parameters` text chunk (A1111-style: prompt, `Negative prompt:`, then
//! `Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …`) and a JSON chunk with keyword
//! `farm` (or `newbie`) holding the full record. Text chunks of any kind (tEXt, zTXt, iTXt) are read,
//! before and after the image data.

use std::io::BufReader;
use std::path::Path;

use serde_json::Value;

use crate::errors::{CliError, CliResult};

/// Keywords of the JSON metadata chunk, in order of preference.
pub const JSON_KEYWORDS: [&str; 2] = ["farm", "newbie"];
/// Keyword of the A1111-style text chunk.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// Every text chunk of a PNG, in file order within each kind: (keyword, text).
pub fn read_text_chunks(path: &Path) -> CliResult<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?;
    let bad =
        |e: png::DecodingError| CliError::invalid(format!("{}: not a readable PNG: {e}", path.display()));
    let mut reader = png::Decoder::new(BufReader::new(file)).read_info().map_err(bad)?;
    // Text chunks may follow the image data: decode the image and read on to the end.
    let mut buf = vec![0u8; reader.output_buffer_size()];
    reader.next_frame(&mut buf).map_err(bad)?;
    reader.finish().map_err(bad)?;
    let info = reader.info();
    let mut out = Vec::new();
    for t in &info.uncompressed_latin1_text {
        out.push((t.keyword.clone(), t.text.clone()));
    }
    for t in &info.compressed_latin1_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    Ok(out)
}

/// The metadata of a result PNG.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PngMetadata {
    pub parameters: Option<String>,
    /// JSON chunks found: (keyword, parsed value or the raw text as a string when it is not JSON).
    pub json: Vec<(String, Value)>,
    /// Other text chunks.
    pub other: Vec<(String, String)>,
}

pub fn metadata(chunks: Vec<(String, String)>) -> PngMetadata {
    let mut m = PngMetadata::default();
    for (k, v) in chunks {
        if k == PARAMETERS_KEYWORD && m.parameters.is_none() {
            m.parameters = Some(v);
        } else if JSON_KEYWORDS.contains(&k.as_str()) {
            let value = serde_json::from_str(&v).unwrap_or(Value::String(v));
            m.json.push((k, value));
        } else {
            m.other.push((k, v));
        }
    }
    m.json
        .sort_by_key(|(k, _)| JSON_KEYWORDS.iter().position(|x| x == k));
    m
}

/// The text printed without --json.
pub fn human(m: &PngMetadata) -> String {
    let mut s = String::new();
    if let Some(p) = &m.parameters {
        s.push_str("parameters:\n");
        s.push_str(p.trim_end());
        s.push_str("\n\n");
    }
    for (k, v) in &m.json {
        s.push_str(&format!(
            "{k}:\n{}\n\n",
            serde_json::to_string_pretty(v).unwrap_or_default()
        ));
    }
    for (k, v) in &m.other {
        s.push_str(&format!("{k}: {v}\n"));
    }
    s.trim_end().to_string() + "\n"
}

/// The object printed with --json: the `farm` (else `newbie`) JSON record; without one, an object with
/// the `parameters` text.
pub fn json(m: &PngMetadata) -> Value {
    match m.json.first() {
        Some((_, v)) => v.clone(),
        None => serde_json::json!({ "parameters": m.parameters }),
    }
}

pub fn run(path: &Path, as_json: bool) -> CliResult<()> {
    let m = metadata(read_text_chunks(path)?);
    if m.parameters.is_none() && m.json.is_empty() && m.other.is_empty() {
        return Err(CliError::invalid(format!(
            "{}: no text metadata in this PNG",
            path.display()
        )));
    }
    if as_json {
        println!("{}", json(&m));
    } else {
        print!("{}", human(&m));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, before: &[(&str, &str)], itxt: &[(&str, &str)]) {
        let f = std::fs::File::create(path).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 2, 2);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in before {
            enc.add_text_chunk(k.to_string(), v.to_string()).unwrap();
        }
        for (k, v) in itxt {
            enc.add_itxt_chunk(k.to_string(), v.to_string()).unwrap();
        }
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0u8; 12]).unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn reads_parameters_and_json_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        write_png(
            &p,
            &[
                ("parameters", "1girl, smile\nSteps: 28, Seed: 7"),
                ("Software", "farm"),
            ],
            &[
                ("newbie", r#"{"seed": 1}"#),
                ("farm", r#"{"seed": 7, "steps": 28}"#),
            ],
        );
        let m = metadata(read_text_chunks(&p).unwrap());
        assert_eq!(m.parameters.as_deref(), Some("1girl, smile\nSteps: 28, Seed: 7"));
        assert_eq!(m.json.len(), 2);
        assert_eq!(m.json[0].0, "farm", "farm is preferred");
        assert_eq!(json(&m)["seed"], 7);
        let h = human(&m);
        assert!(h.starts_with("parameters:\n1girl, smile\nSteps: 28"), "{h}");
        assert!(h.contains("farm:\n{") && h.contains("newbie:\n{"), "{h}");
        assert!(h.contains("Software: farm"));
    }

    #[test]
    fn without_json_chunk_prints_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.png");
        write_png(&p, &[("parameters", "x")], &[]);
        let m = metadata(read_text_chunks(&p).unwrap());
        assert_eq!(json(&m), serde_json::json!({"parameters": "x"}));
        std::fs::write(dir.path().join("c.png"), b"not a png").unwrap();
        assert_eq!(
            read_text_chunks(&dir.path().join("c.png"))
                .unwrap_err()
                .exit_code(),
            3
        );
    }
}

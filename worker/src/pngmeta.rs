//! PNG encoding of results with the metadata needed to reproduce them.
//!
//! Two text chunks: `parameters` (the A1111-style text that image tools already read) and `farm`
//! (JSON with the prompt and every parameter). The pixel data is deterministic: the same image gives
//! the same IDAT bytes; the metadata differs per task (task id, timings).

use serde::{Deserialize, Serialize};

/// Everything a result says about how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMetadata {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: u32,
    pub cfg_scale: f32,
    pub cfg_trunc: f32,
    pub renorm_cfg: f32,
    pub shift: f32,
    pub sampler: String,
    pub width: u32,
    pub height: u32,
    pub precision: String,
    pub model: String,
    pub model_hash: String,
    pub worker: String,
    pub job_id: String,
    pub index: u64,
    pub task_id: String,
    pub attempt: u32,
    /// Milliseconds spent rendering the batch this image was part of.
    pub render_ms: u64,
    /// Images in that batch.
    pub batch_size: u32,
}

/// Keyword of the JSON chunk.
pub const JSON_KEYWORD: &str = "farm";
/// Keyword of the A1111-style chunk.
pub const PARAMETERS_KEYWORD: &str = "parameters";

impl ResultMetadata {
    /// The A1111-style `parameters` text.
    pub fn parameters_text(&self) -> String {
        let mut s = self.prompt.clone();
        s.push('\n');
        if !self.negative_prompt.is_empty() {
            s.push_str("Negative prompt: ");
            s.push_str(&self.negative_prompt);
            s.push('\n');
        }
        s.push_str(&format!(
            "Steps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Model hash: {}, \
             Shift: {}, CFG truncation: {}, CFG renorm: {}, Precision: {}, Worker: {}, Task: {}, Render time: {} ms",
            self.steps,
            self.sampler,
            self.cfg_scale,
            self.seed,
            self.width,
            self.height,
            self.model,
            self.model_hash,
            self.shift,
            self.cfg_trunc,
            self.renorm_cfg,
            self.precision,
            self.worker,
            self.task_id,
            self.render_ms
        ));
        s
    }
}

/// Encodes RGB8 pixels as PNG with both metadata chunks.
pub fn encode_png(width: u32, height: u32, rgb: &[u8], meta: &ResultMetadata) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::with_capacity(rgb.len() / 2 + 4096);
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        enc.add_itxt_chunk(PARAMETERS_KEYWORD.to_string(), meta.parameters_text())?;
        enc.add_itxt_chunk(JSON_KEYWORD.to_string(), serde_json::to_string(meta).expect("serialisable"))?;
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
        w.finish()?;
    }
    Ok(out)
}

/// A decoded PNG: width, height, RGB pixels, the `farm` metadata and the `parameters` text.
pub type DecodedPng = (u32, u32, Vec<u8>, Option<ResultMetadata>, Option<String>);

/// Reads the metadata and the pixels back (for tests and `farm show-png`).
pub fn decode_png(bytes: &[u8]) -> Result<DecodedPng, String> {
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = dec.read_info().map_err(|e| e.to_string())?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    buf.truncate(info.buffer_size());
    let text = reader.info();
    let mut meta = None;
    let mut params = None;
    for c in &text.utf8_text {
        let v = c.get_text().map_err(|e| e.to_string())?;
        if c.keyword == JSON_KEYWORD {
            meta = serde_json::from_str(&v).ok();
        } else if c.keyword == PARAMETERS_KEYWORD {
            params = Some(v);
        }
    }
    Ok((info.width, info.height, buf, meta, params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ResultMetadata {
        ResultMetadata {
            prompt: "<character_1><n>miku</n></character_1>".into(),
            negative_prompt: "lowres".into(),
            seed: u64::MAX - 3,
            steps: 28,
            cfg_scale: 5.0,
            cfg_trunc: 1.0,
            renorm_cfg: 0.0,
            shift: 6.0,
            sampler: "euler".into(),
            width: 4,
            height: 2,
            precision: "bf16".into(),
            model: "tiny".into(),
            model_hash: "abc".into(),
            worker: "w0".into(),
            job_id: "j".into(),
            index: 3,
            task_id: "t".into(),
            attempt: 1,
            render_ms: 12,
            batch_size: 1,
        }
    }

    #[test]
    fn round_trip() {
        let px: Vec<u8> = (0..24).collect();
        let bytes = encode_png(4, 2, &px, &meta()).unwrap();
        let (w, h, pixels, m, p) = decode_png(&bytes).unwrap();
        assert_eq!((w, h), (4, 2));
        assert_eq!(pixels, px);
        assert_eq!(m.unwrap(), meta());
        let p = p.unwrap();
        assert!(p.starts_with("<character_1>"));
        assert!(p.contains("Negative prompt: lowres\nSteps: 28, Sampler: euler, CFG scale: 5, Seed: 18446744073709551612"));
    }
}

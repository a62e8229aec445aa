//! Tokenizers of the two text encoders behind one trait, [`TextTokenizer`].
//!
//! * [`HfTokenizer`]: a checkpoint's own `tokenizer.json` (Gemma 3's BPE, XLM-RoBERTa's Unigram
//!   for Jina CLIP v2) through the `tokenizers` crate.
//! * [`ByteTokenizer`]: a deterministic stand-in for the random-weight `tiny` models: one token per
//!   UTF-8 byte, so the whole pipeline runs without downloaded files.
//!
//! [`TextTokenizer::encode`] returns the ids of the text alone; the encoders' input builders
//! (`gemma3::gemma_inputs`, `jina::jina_inputs`) add BOS / EOS, truncate and pad, so both
//! implementations are framed identically.

use std::path::{Path, PathBuf};

use tch::Tensor;

/// Errors of tokenizer loading and encoding.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizer {path} has no token {token:?}")]
    UnknownToken { path: PathBuf, token: String },
    #[error("tokenizing failed: {0}")]
    Encode(String),
    #[error("tokenizer has no {0} token")]
    MissingSpecial(&'static str),
}

/// Ids of the special tokens the encoders need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<i64>,
    pub eos: Option<i64>,
    pub pad: Option<i64>,
}

impl SpecialIds {
    /// Gemma 3: `<pad>` = 0, `<eos>` = 1, `<bos>` = 2.
    pub const GEMMA: SpecialIds = SpecialIds {
        bos: Some(2),
        eos: Some(1),
        pad: Some(0),
    };
    /// XLM-RoBERTa (Jina CLIP v2): `<s>` = 0, `<pad>` = 1, `</s>` = 2.
    pub const XLM_ROBERTA: SpecialIds = SpecialIds {
        bos: Some(0),
        eos: Some(2),
        pad: Some(1),
    };
}

/// A text tokenizer for one of the encoders.
pub trait TextTokenizer: Send + Sync {
    /// Token ids of `text` without any special token.
    fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError>;
    /// BOS / EOS / PAD ids.
    fn special_ids(&self) -> SpecialIds;
    /// Number of ids the tokenizer can produce (added tokens included).
    fn vocab_size(&self) -> usize;
}

/// A `tokenizer.json` loaded through the `tokenizers` crate.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialIds,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl HfTokenizer {
    /// Loads `path` (a `tokenizer.json`, or a folder holding one) and looks up the ids of the
    /// given BOS / EOS / PAD token strings in its vocabulary.
    pub fn from_file(path: &Path, bos: &str, eos: &str, pad: &str) -> Result<Self, TokenizerError> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let mut inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| TokenizerError::Load {
            path: file.clone(),
            message: e.to_string(),
        })?;
        // Lengths and padding are the input builders' (512 tokens for Gemma, right padding to a
        // multiple of 8): a truncation or padding rule saved in the file would cut or pad first.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| TokenizerError::Load { path: file.clone(), message: e.to_string() })?;
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .map(i64::from)
                .ok_or_else(|| TokenizerError::UnknownToken {
                    path: file.clone(),
                    token: token.to_string(),
                })
        };
        let special = SpecialIds {
            bos: Some(id(bos)?),
            eos: Some(id(eos)?),
            pad: Some(id(pad)?),
        };
        Ok(Self { inner, special })
    }

    /// Gemma 3's tokenizer (`<bos>`, `<eos>`, `<pad>`), e.g. `gemma-3-4b-it/tokenizer.json`.
    pub fn gemma(path: &Path) -> Result<Self, TokenizerError> {
        Self::from_file(path, "<bos>", "<eos>", "<pad>")
    }

    /// XLM-RoBERTa's tokenizer as shipped with Jina CLIP v2 (`<s>`, `</s>`, `<pad>`).
    pub fn xlm_roberta(path: &Path) -> Result<Self, TokenizerError> {
        Self::from_file(path, "<s>", "</s>", "<pad>")
    }
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    fn special_ids(&self) -> SpecialIds {
        self.special
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Deterministic byte tokenizer for random-weight models: the ids below
/// [`ByteTokenizer::FIRST_BYTE_ID`] are reserved for special tokens, and byte `b` of the UTF-8
/// text maps to `FIRST_BYTE_ID + b mod (vocab_size - FIRST_BYTE_ID)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteTokenizer {
    vocab_size: usize,
    special: SpecialIds,
}

impl ByteTokenizer {
    /// Ids 0..4 are special (PAD/EOS/BOS/UNK in some order); bytes start here.
    pub const FIRST_BYTE_ID: usize = 4;

    /// # Panics
    /// If the vocabulary has no room for at least one byte id.
    pub fn new(vocab_size: usize, special: SpecialIds) -> Self {
        assert!(
            vocab_size > Self::FIRST_BYTE_ID,
            "vocab_size {vocab_size} too small"
        );
        Self { vocab_size, special }
    }

    /// For a Gemma-style model (PAD 0, EOS 1, BOS 2).
    pub fn gemma(vocab_size: usize) -> Self {
        Self::new(vocab_size, SpecialIds::GEMMA)
    }

    /// For an XLM-R-style model (`<s>` 0, `<pad>` 1, `</s>` 2).
    pub fn xlm_roberta(vocab_size: usize) -> Self {
        Self::new(vocab_size, SpecialIds::XLM_ROBERTA)
    }
}

impl TextTokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let span = self.vocab_size - Self::FIRST_BYTE_ID;
        Ok(text
            .bytes()
            .map(|b| (Self::FIRST_BYTE_ID + usize::from(b) % span) as i64)
            .collect())
    }

    fn special_ids(&self) -> SpecialIds {
        self.special
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// Right-pads `seqs` with `pad` to the longest length rounded up to a multiple of `multiple`
/// (1 = no rounding). Returns ids [B, L] and the mask [B, L] (int64, 1 = token), on the CPU.
pub fn pad_right(seqs: &[Vec<i64>], pad: i64, multiple: usize) -> (Tensor, Tensor) {
    let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let multiple = multiple.max(1);
    let len = longest.div_ceil(multiple) * multiple;
    let mut ids = Vec::with_capacity(seqs.len() * len);
    let mut mask = Vec::with_capacity(seqs.len() * len);
    for s in seqs {
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(pad, len - s.len()));
        mask.extend(std::iter::repeat_n(1i64, s.len()));
        mask.extend(std::iter::repeat_n(0i64, len - s.len()));
    }
    let shape = [seqs.len() as i64, len as i64];
    (
        Tensor::from_slice(&ids).reshape(shape),
        Tensor::from_slice(&mask).reshape(shape),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_maps_bytes_into_the_vocab_after_specials() {
        let tok = ByteTokenizer::gemma(10);
        // 'a' = 97 -> 4 + 97 % 6 = 5; 'é' = [0xC3, 0xA9] -> 4 + 195 % 6 = 7, 4 + 169 % 6 = 5.
        assert_eq!(tok.encode("aé").unwrap(), vec![5, 7, 5]);
        assert_eq!(tok.encode("").unwrap(), Vec::<i64>::new());
        let big = ByteTokenizer::xlm_roberta(512);
        let ids = big.encode("hello").unwrap();
        assert_eq!(ids, b"hello".iter().map(|&b| 4 + b as i64).collect::<Vec<_>>());
        assert!(ids.iter().all(|&i| (4..512).contains(&i)));
        assert_eq!(
            big.special_ids(),
            SpecialIds {
                bos: Some(0),
                eos: Some(2),
                pad: Some(1)
            }
        );
        assert_eq!(
            tok.special_ids(),
            SpecialIds {
                bos: Some(2),
                eos: Some(1),
                pad: Some(0)
            }
        );
    }

    #[test]
    fn pad_right_rounds_up_and_masks() {
        let (ids, mask) = pad_right(&[vec![2, 5, 6], vec![2]], 0, 8);
        assert_eq!(ids.size(), vec![2, 8]);
        assert_eq!(
            Vec::<i64>::try_from(ids.reshape([-1])).unwrap(),
            vec![2, 5, 6, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            Vec::<i64>::try_from(mask.sum_dim_intlist(1, false, tch::Kind::Int64)).unwrap(),
            vec![3, 1]
        );
        let (ids, _) = pad_right(&[vec![1; 8]], 0, 8);
        assert_eq!(ids.size(), vec![1, 8]);
        let (ids, _) = pad_right(&[vec![1; 3]], 9, 1);
        assert_eq!(ids.size(), vec![1, 3]);
    }

    /// A Gemma-like file written by the `tokenizers` crate itself: WordLevel model, regex Split
    /// pre-tokenizer, specials `<pad>` 0 / `<eos>` 1 / `<bos>` 2.
    #[test]
    fn hf_tokenizer_loads_a_serialized_tokenizer_json() {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        use tokenizers::SplitDelimiterBehavior;

        let dir = tempfile::tempdir().unwrap();
        let vocab: std::collections::BTreeMap<&str, u32> = [
            ("<pad>", 0),
            ("<eos>", 1),
            ("<bos>", 2),
            ("<unk>", 3),
            ("hello", 4),
            ("world", 5),
            ("1girl,", 6),
        ]
        .into_iter()
        .collect();
        let vocab_path = dir.path().join("vocab.json");
        std::fs::write(&vocab_path, serde_json::to_string(&vocab).unwrap()).unwrap();
        let model = WordLevel::from_file(vocab_path.to_str().unwrap(), "<unk>".into()).unwrap();
        let mut tk = tokenizers::Tokenizer::new(model);
        let split = Split::new(
            SplitPattern::Regex(r"\s+".into()),
            SplitDelimiterBehavior::Removed,
            false,
        )
        .unwrap();
        tk.with_pre_tokenizer(Some(split));
        let path = dir.path().join("tokenizer.json");
        tk.save(&path, false).unwrap();

        // Loading from the folder finds tokenizer.json.
        let tok = HfTokenizer::gemma(dir.path()).unwrap();
        assert_eq!(tok.special_ids(), SpecialIds::GEMMA);
        assert_eq!(tok.vocab_size(), 7);
        assert_eq!(tok.encode("hello  world\t1girl, nope").unwrap(), vec![4, 5, 6, 3]);
        assert!(tok.encode("").unwrap().is_empty());

        // The encoders' framing: BOS + ids, padded.
        let g = crate::model::gemma3::gemma_inputs(&tok, &["hello world", ""]).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(g.input_ids.get(0)).unwrap(),
            vec![2, 4, 5, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            Vec::<i64>::try_from(g.attention_mask.get(1)).unwrap(),
            vec![1, 0, 0, 0, 0, 0, 0, 0]
        );

        // A token string that is not in the vocabulary is an error.
        assert!(matches!(
            HfTokenizer::xlm_roberta(&path),
            Err(TokenizerError::UnknownToken { .. })
        ));
    }

    /// An XLM-R-like file in the layout of Jina CLIP v2's tokenizer.json: Unigram model, regex
    /// Replace normalizer, Metaspace pre-tokenizer and a post-processor adding `<s>` / `</s>`
    /// (which `encode` must not apply: the input builders add the specials themselves).
    #[test]
    fn hf_tokenizer_reads_an_xlm_roberta_style_file() {
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(0, "<s>"), special(1, "<pad>"), special(2, "</s>"), special(3, "<unk>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
            ]},
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
                "special_tokens": {
                    "<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]},
                    "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}
                }
            },
            "decoder": null,
            "model": {"type": "Unigram", "unk_id": 3, "byte_fallback": false, "vocab": [
                ["<s>", 0.0], ["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0],
                ["\u{2581}hello", -1.0], ["\u{2581}world", -1.0], ["\u{2581}", -3.0],
                ["h", -5.0], ["e", -5.0], ["l", -5.0], ["o", -5.0]
            ]}
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let tok = HfTokenizer::xlm_roberta(&path).unwrap();
        assert_eq!(tok.special_ids(), SpecialIds::XLM_ROBERTA);
        assert_eq!(tok.encode("hello   world").unwrap(), vec![4, 5]);
        assert_eq!(tok.encode("hello hole").unwrap(), vec![4, 6, 7, 10, 9, 8]);
        let ids = crate::model::jina::jina_inputs(&tok, &["hello world", "world"]).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(ids.reshape([-1])).unwrap(),
            vec![0, 4, 5, 2, 0, 5, 2, 1]
        );

        // A truncation or padding rule saved in the file is not applied.
        let mut with_rules = json.clone();
        with_rules["truncation"] =
            serde_json::json!({"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0});
        with_rules["padding"] = serde_json::json!({"strategy": {"Fixed": 6}, "direction": "Right",
            "pad_to_multiple_of": null, "pad_id": 1, "pad_type_id": 0, "pad_token": "<pad>"});
        std::fs::write(&path, with_rules.to_string()).unwrap();
        let tok = HfTokenizer::xlm_roberta(&path).unwrap();
        assert_eq!(tok.encode("hello   world").unwrap(), vec![4, 5]);
    }
}

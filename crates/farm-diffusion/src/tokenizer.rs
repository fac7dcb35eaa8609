//! The CLIP tokenizer: byte-level BPE over `vocab.json` + `merges.txt`.
//!
//! Text is cleaned (whitespace collapsed, trimmed, lower-cased), split with CLIP's regex,
//! each piece's UTF-8 bytes are mapped to printable characters (GPT-2's byte-to-unicode
//! table), merged by BPE rank with `</w>` marking the end of a word, and looked up in the
//! vocabulary. Sequences are `<|startoftext|> … <|endoftext|>`, truncated to 77 ids and
//! padded with the pad token (`<|endoftext|>` for SD 1.x).
use std::collections::HashMap;
use std::path::Path;

use regex::Regex;

use crate::{DiffusionError, Result};

/// Sequence length of SD 1.x/2.x text encoders, including BOS and EOS.
pub const MAX_LEN: usize = 77;
pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2/CLIP's reversible byte-to-unicode table, in CLIP's vocabulary order: the
/// printable bytes first (mapping to themselves), then the other bytes mapped to 256.. .
pub fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut out: Vec<(u8, char)> = Vec::with_capacity(256);
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    for b in 0..=255u8 {
        if printable(b) {
            out.push((b, char::from(b)));
        }
    }
    let mut n = 0u32;
    for b in 0..=255u8 {
        if !printable(b) {
            // 256 + n is always a valid scalar value (< 0x200).
            out.push((b, char::from_u32(256 + n).unwrap_or('?')));
            n += 1;
        }
    }
    out
}

/// A CLIP BPE tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_chars: [char; 256],
    re: Regex,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl Tokenizer {
    /// Builds a tokenizer from a vocabulary and the ordered merges. `pad` names the pad
    /// token (default `<|endoftext|>`).
    pub fn new(
        encoder: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad: Option<&str>,
    ) -> std::result::Result<Self, String> {
        let lookup = |t: &str| {
            encoder
                .get(t)
                .copied()
                .ok_or_else(|| format!("token {t:?} is not in the vocabulary"))
        };
        let bos = lookup(BOS)?;
        let eos = lookup(EOS)?;
        let pad = match pad {
            Some(p) => lookup(p)?,
            None => eos,
        };
        let mut byte_chars = ['\0'; 256];
        for (b, c) in bytes_to_unicode() {
            byte_chars[usize::from(b)] = c;
        }
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(i, pair)| (pair, i))
            .collect();
        let re = Regex::new(PATTERN).map_err(|e| e.to_string())?;
        Ok(Self {
            encoder,
            ranks,
            byte_chars,
            re,
            bos,
            eos,
            pad,
        })
    }

    /// Loads `vocab.json`, `merges.txt` and (if present) the pad token named by
    /// `special_tokens_map.json` or `tokenizer_config.json` from a tokenizer folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let text = std::fs::read_to_string(&vocab_path)
            .map_err(|e| DiffusionError::model(&vocab_path, format!("cannot read file: {e}")))?;
        let encoder: HashMap<String, u32> = serde_json::from_str(&text).map_err(|e| {
            DiffusionError::model(&vocab_path, format!("expected a token -> id map: {e}"))
        })?;
        let merges_path = dir.join("merges.txt");
        let text = std::fs::read_to_string(&merges_path)
            .map_err(|e| DiffusionError::model(&merges_path, format!("cannot read file: {e}")))?;
        let mut merges = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    merges.push((a.to_owned(), b.to_owned()))
                }
                _ => {
                    return Err(DiffusionError::model(
                        &merges_path,
                        format!("line {}: expected two space-separated symbols", i + 1),
                    ))
                }
            }
        }
        let mut pad = None;
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if pad.is_none() && path.exists() {
                let j = crate::config::JsonFile::read(&path)?;
                pad = pad_token(&j)?;
            }
        }
        Self::new(encoder, merges, pad.as_deref())
            .map_err(|m| DiffusionError::model(&vocab_path, m))
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Applies BPE to one pre-token (already mapped to byte characters).
    fn bpe(&self, token: &str) -> Vec<String> {
        let chars: Vec<char> = token.chars().collect();
        let Some((last, rest)) = chars.split_last() else {
            return Vec::new();
        };
        let mut word: Vec<String> = rest.iter().map(|c| c.to_string()).collect();
        word.push(format!("{last}</w>"));
        loop {
            let best = word
                .windows(2)
                .filter_map(|w| self.ranks.get(&(w[0].clone(), w[1].clone())))
                .min();
            let Some(&best) = best else { break };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len()
                    && self.ranks.get(&(word[i].clone(), word[i + 1].clone())) == Some(&best)
                {
                    merged.push(format!("{}{}", word[i], word[i + 1]));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
            if word.len() == 1 {
                break;
            }
        }
        word
    }

    /// Token ids of `text` without BOS/EOS, padding or truncation.
    pub fn encode_raw(&self, text: &str) -> Vec<u32> {
        let cleaned = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        let mut ids = Vec::new();
        for m in self.re.find_iter(&cleaned) {
            let piece: String = m
                .as_str()
                .bytes()
                .map(|b| self.byte_chars[usize::from(b)])
                .collect();
            for tok in self.bpe(&piece) {
                // Every byte character and byte character + `</w>` is in a CLIP vocabulary;
                // anything else maps to the unknown token, which is `<|endoftext|>` in CLIP.
                ids.push(self.encoder.get(&tok).copied().unwrap_or(self.eos));
            }
        }
        ids
    }

    /// `[BOS, tokens…, EOS, pad…]`, exactly [`MAX_LEN`] ids (long prompts are truncated).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(MAX_LEN);
        ids.push(self.bos);
        ids.extend(self.encode_raw(text).into_iter().take(MAX_LEN - 2));
        ids.push(self.eos);
        ids.resize(MAX_LEN, self.pad);
        ids
    }
}

/// The `pad_token` of a transformers tokenizer config: a string or `{"content": …}`.
fn pad_token(j: &crate::config::JsonFile) -> Result<Option<String>> {
    match j.value("pad_token") {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(obj) => match obj.get("content").and_then(|c| c.as_str()) {
            Some(s) => Ok(Some(s.to_owned())),
            None => Err(DiffusionError::model(
                j.path(),
                "key `pad_token`: expected a string or an object with `content`",
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = bytes_to_unicode();
        assert_eq!(t.len(), 256);
        let mut chars: Vec<char> = t.iter().map(|(_, c)| *c).collect();
        chars.sort();
        chars.dedup();
        assert_eq!(chars.len(), 256);
        assert_eq!(t[64], (b'a', 'a'));
    }

    #[test]
    fn real_vocab_ids() -> Result<()> {
        let tok = crate::tiny::clip_tokenizer()?;
        let ids = tok.encode("a photograph of an astronaut riding a horse");
        let mut want = vec![49406u32, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407];
        want.resize(MAX_LEN, 49407);
        assert_eq!(ids, want);
        // Whitespace and case are normalised.
        assert_eq!(
            tok.encode("  A   Photograph\tof an ASTRONAUT riding a horse "),
            want
        );
        Ok(())
    }

    #[test]
    fn empty_and_long_prompts() -> Result<()> {
        let tok = crate::tiny::clip_tokenizer()?;
        let ids = tok.encode("");
        assert_eq!(ids.len(), MAX_LEN);
        assert_eq!(&ids[..2], &[49406, 49407]);
        assert!(ids[2..].iter().all(|&i| i == 49407));
        let long = tok.encode(&"horse ".repeat(200));
        assert_eq!(long.len(), MAX_LEN);
        assert_eq!(long[0], 49406);
        assert_eq!(long[MAX_LEN - 1], 49407);
        // Non-ASCII and punctuation go through the byte table without panicking.
        assert_eq!(tok.encode("café, 東京! it's 42°").len(), MAX_LEN);
        Ok(())
    }
}

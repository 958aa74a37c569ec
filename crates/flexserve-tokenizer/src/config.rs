//! The tokenizer description as plain data, and reading it from GGUF metadata.

use flexserve_gguf::{GgufError, Metadata};

use crate::pretokenize::PreTokenizerKind;
use crate::TokenizerError;

/// Metadata keys read by [`TokenizerConfig::from_metadata`].
pub mod keys {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const FIM_PAD_ID: &str = "tokenizer.ggml.fim_pad_token_id";
    pub const FIM_REP_ID: &str = "tokenizer.ggml.fim_rep_token_id";
    pub const FIM_SEP_ID: &str = "tokenizer.ggml.fim_sep_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    /// Spelled as llama.cpp (and so every GGUF file) spells it.
    pub const SEP_ID: &str = "tokenizer.ggml.seperator_token_id";
    pub const ADD_SEP: &str = "tokenizer.ggml.add_sep_token";
    pub const NORMALIZER_LOWERCASE: &str = "tokenizer.ggml.normalizer.lowercase";
    pub const NORMALIZER_STRIP_ACCENTS: &str = "tokenizer.ggml.normalizer.strip_accents";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// The tokenizer algorithm (`tokenizer.ggml.model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// `gpt2`: byte-level BPE with ranked merges.
    Bpe,
    /// `llama`: SentencePiece-style BPE driven by token scores, with byte fallback.
    Spm,
    /// `bert`: WordPiece, greedy longest match over normalized words.
    WordPiece,
}

/// `tokenizer.ggml.token_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Undefined = 0,
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

impl TokenType {
    pub fn from_i32(value: i32) -> Option<TokenType> {
        Some(match value {
            0 => TokenType::Undefined,
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }
}

/// Everything a [`crate::Tokenizer`] is built from. Optional fields left `None`
/// take the per-model defaults described on each.
#[derive(Clone, Debug)]
pub struct TokenizerConfig {
    pub model: ModelKind,
    /// Split rules; used by [`ModelKind::Bpe`] only.
    pub pre: PreTokenizerKind,
    pub tokens: Vec<String>,
    /// One per token; `None` makes every token normal.
    pub token_types: Option<Vec<TokenType>>,
    /// One per token; merge priorities of [`ModelKind::Spm`]. `None` means all 0.
    pub scores: Option<Vec<f32>>,
    /// Ranked merges (earlier = applied first) of [`ModelKind::Bpe`].
    pub merges: Vec<(String, String)>,
    /// `None` for SPM defaults to id 1 (when the vocabulary has it).
    pub bos: Option<u32>,
    /// `None` for SPM defaults to id 2 (when the vocabulary has it).
    pub eos: Option<u32>,
    /// `None` is looked up by text (`<|eot_id|>`, `<|im_end|>`, ...).
    pub eot: Option<u32>,
    /// `None` is looked up by text (`<|eom_id|>`).
    pub eom: Option<u32>,
    /// `None` for SPM defaults to id 0.
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    /// Fill-in-the-middle pad / repo / file-separator tokens; `None` is looked up by text.
    /// They end generation.
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
    /// `None`: true for SPM and the `llama-bpe` pre-tokenizer, false otherwise.
    pub add_bos: Option<bool>,
    /// `None`: false.
    pub add_eos: Option<bool>,
    /// `None`: true for SPM, false for BPE and WordPiece.
    pub add_space_prefix: Option<bool>,
    /// The separator ending a WordPiece sequence. `None` falls back to `eos`,
    /// then to id 102 (when the vocabulary has it).
    pub sep: Option<u32>,
    /// Whether [`ModelKind::WordPiece`] ends a sequence with `sep`. `None`: true.
    pub add_sep: Option<bool>,
    /// WordPiece lower-casing. `None`: true.
    pub lowercase: Option<bool>,
    /// WordPiece accent stripping. `None`: as `lowercase`.
    pub strip_accents: Option<bool>,
}

impl TokenizerConfig {
    /// A config with the given vocabulary and every optional field unset.
    pub fn new(model: ModelKind, tokens: Vec<String>) -> TokenizerConfig {
        TokenizerConfig {
            model,
            pre: PreTokenizerKind::Default,
            tokens,
            token_types: None,
            scores: None,
            merges: Vec::new(),
            bos: None,
            eos: None,
            eot: None,
            eom: None,
            unk: None,
            pad: None,
            fim_pad: None,
            fim_rep: None,
            fim_sep: None,
            add_bos: None,
            add_eos: None,
            add_space_prefix: None,
            sep: None,
            add_sep: None,
            lowercase: None,
            strip_accents: None,
        }
    }

    /// Reads the `tokenizer.ggml.*` keys. Only shapes and types are checked here;
    /// [`crate::Tokenizer::from_config`] checks lengths and ids.
    pub fn from_metadata(meta: &Metadata) -> Result<TokenizerConfig, TokenizerError> {
        let model_name = typed(keys::MODEL, meta.get_str(keys::MODEL))?
            .ok_or(TokenizerError::MissingKey { key: keys::MODEL, what: "the tokenizer type" })?;
        let model = match model_name {
            "gpt2" => ModelKind::Bpe,
            "llama" => ModelKind::Spm,
            "bert" => ModelKind::WordPiece,
            other => return Err(TokenizerError::UnknownModel(other.to_owned())),
        };
        let pre = match typed(keys::PRE, meta.get_str(keys::PRE))? {
            // WordPiece has no split rules of its own to choose (`bert-bge`, ...).
            _ if model == ModelKind::WordPiece => PreTokenizerKind::Default,
            None => PreTokenizerKind::Default,
            Some(name) => PreTokenizerKind::from_name(name).ok_or_else(|| TokenizerError::UnknownPreTokenizer {
                found: name.to_owned(),
                supported: PreTokenizerKind::SUPPORTED,
            })?,
        };
        let tokens: Vec<String> = typed(keys::TOKENS, meta.get_str_array(keys::TOKENS))?
            .ok_or(TokenizerError::MissingKey { key: keys::TOKENS, what: "the vocabulary" })?
            .into_iter()
            .map(str::to_owned)
            .collect();

        let token_types = typed(keys::TOKEN_TYPE, meta.get_i32_array(keys::TOKEN_TYPE))?
            .map(|raw| {
                raw.into_iter()
                    .enumerate()
                    .map(|(index, value)| {
                        TokenType::from_i32(value).ok_or(TokenizerError::BadTokenType { index, value })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let scores = typed(keys::SCORES, meta.get_f32_array(keys::SCORES))?;

        let merges = match model {
            ModelKind::Spm | ModelKind::WordPiece => Vec::new(),
            ModelKind::Bpe => typed(keys::MERGES, meta.get_str_array(keys::MERGES))?
                .ok_or(TokenizerError::MissingKey { key: keys::MERGES, what: "byte-level BPE needs its merge list" })?
                .into_iter()
                .enumerate()
                .map(|(index, entry)| {
                    split_merge(entry).ok_or_else(|| TokenizerError::BadMerge { index, entry: entry.to_owned() })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };

        let id = |key: &'static str| typed(key, meta.get_u32(key));
        let flag = |key: &'static str| typed(key, meta.get_bool(key));
        Ok(TokenizerConfig {
            model,
            pre,
            tokens,
            token_types,
            scores,
            merges,
            bos: id(keys::BOS_ID)?,
            eos: id(keys::EOS_ID)?,
            eot: id(keys::EOT_ID)?,
            eom: id(keys::EOM_ID)?,
            unk: id(keys::UNK_ID)?,
            pad: id(keys::PAD_ID)?,
            fim_pad: id(keys::FIM_PAD_ID)?,
            fim_rep: id(keys::FIM_REP_ID)?,
            fim_sep: id(keys::FIM_SEP_ID)?,
            add_bos: flag(keys::ADD_BOS)?,
            add_eos: flag(keys::ADD_EOS)?,
            add_space_prefix: flag(keys::ADD_SPACE_PREFIX)?,
            sep: id(keys::SEP_ID)?,
            add_sep: flag(keys::ADD_SEP)?,
            lowercase: flag(keys::NORMALIZER_LOWERCASE)?,
            strip_accents: flag(keys::NORMALIZER_STRIP_ACCENTS)?,
        })
    }
}

fn typed<T>(key: &'static str, value: Result<T, GgufError>) -> Result<T, TokenizerError> {
    value.map_err(|source| TokenizerError::WrongType { key, source })
}

/// `"left right"` split at the first space after the first byte (so a part may
/// itself be a lone space only on the left).
fn split_merge(entry: &str) -> Option<(String, String)> {
    let space = entry.as_bytes().iter().skip(1).position(|&b| b == b' ')? + 1;
    let (left, right) = (&entry[..space], &entry[space + 1..]);
    if right.is_empty() {
        return None;
    }
    Some((left.to_owned(), right.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::split_merge;

    #[test]
    fn merge_entries() {
        assert_eq!(split_merge("a b"), Some(("a".into(), "b".into())));
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("  x"), Some((" ".into(), "x".into())));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge("a "), None);
        assert_eq!(split_merge(""), None);
    }
}

//! The tokenizer: vocabulary, special tokens, encode and decode.

use std::collections::HashMap;

use flexserve_gguf::Metadata;

use crate::config::{keys, ModelKind, TokenType, TokenizerConfig};
use crate::merge::{Merger, RankedMerges, ScoredMerges};
use crate::pretokenize::PreTokenizerKind;
use crate::special::{Piece, SpecialTrie, MAX_SPECIAL_TOKEN_BYTES};
use crate::unicode::ByteMap;
use crate::wordpiece::{Normalize, WordPiece, MAX_WORDPIECE_TOKEN_BYTES};
use crate::TokenizerError;

/// Token attribute bits (a token may gain CONTROL when its text marks it as an end token).
mod attr {
    pub const UNKNOWN: u8 = 1 << 0;
    pub const UNUSED: u8 = 1 << 1;
    pub const NORMAL: u8 = 1 << 2;
    pub const CONTROL: u8 = 1 << 3;
    pub const USER_DEFINED: u8 = 1 << 4;
    pub const BYTE: u8 = 1 << 5;
}

fn type_attr(ty: TokenType) -> u8 {
    match ty {
        TokenType::Undefined => 0,
        TokenType::Normal => attr::NORMAL,
        TokenType::Unknown => attr::UNKNOWN,
        TokenType::Control => attr::CONTROL,
        TokenType::UserDefined => attr::USER_DEFINED,
        TokenType::Unused => attr::UNUSED,
        TokenType::Byte => attr::BYTE,
    }
}

/// Texts that mark end-of-turn tokens, most specific first (the first present is `eot()`).
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
/// Every text that ends generation, besides the eos / eot / eom / FIM tokens.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// A tokenizer built from GGUF metadata. Immutable after construction (`Send + Sync`).
pub struct Tokenizer {
    model: ModelKind,
    pre: PreTokenizerKind,
    tokens: Vec<String>,
    attrs: Vec<u8>,
    token_to_id: HashMap<String, u32>,
    /// Byte-level BPE merges (empty for SentencePiece).
    ranked: RankedMerges,
    /// SentencePiece merges (empty for byte-level BPE).
    scored: ScoredMerges,
    /// WordPiece's vocabulary search (empty for the other models).
    wordpiece: WordPiece,
    /// The token of each raw byte in SentencePiece byte fallback.
    spm_byte_tokens: [Option<u32>; 256],
    byte_map: ByteMap,
    /// Decoded bytes of every token, special tokens rendered as their text.
    pieces: Vec<Box<[u8]>>,
    /// Control, user-defined and unknown tokens, found in text in one pass.
    special: SpecialTrie,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    sep: Option<u32>,
    /// Sorted.
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_sep: bool,
    add_space_prefix: bool,
    /// Look whole words up in the vocabulary before merging (Llama 3 rules).
    ignore_merges: bool,
}

impl Tokenizer {
    /// Builds the tokenizer described by the `tokenizer.ggml.*` metadata keys.
    pub fn from_gguf(meta: &Metadata) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_config(TokenizerConfig::from_metadata(meta)?)
    }

    /// Builds a tokenizer from plain data, checking lengths and ids.
    pub fn from_config(config: TokenizerConfig) -> Result<Tokenizer, TokenizerError> {
        let n_vocab = config.tokens.len();
        if n_vocab == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if u32::try_from(n_vocab).is_err() {
            return Err(TokenizerError::VocabTooLarge(n_vocab));
        }
        let check_len = |key: &'static str, found: usize| {
            if found == n_vocab {
                Ok(())
            } else {
                Err(TokenizerError::LengthMismatch { key, expected: n_vocab, found })
            }
        };
        let mut attrs = match &config.token_types {
            Some(types) => {
                check_len(keys::TOKEN_TYPE, types.len())?;
                types.iter().map(|&t| type_attr(t)).collect()
            }
            None => vec![attr::NORMAL; n_vocab],
        };
        let scores = match config.scores {
            Some(scores) => {
                check_len(keys::SCORES, scores.len())?;
                scores
            }
            None => vec![0.0; n_vocab],
        };

        let mut tokens = config.tokens;
        let mut token_to_id = HashMap::with_capacity(n_vocab);
        for (id, text) in tokens.iter_mut().enumerate() {
            let id = id as u32;
            if text.is_empty() {
                // An empty token can never match; give it a unique inert name.
                *text = format!("[EMPTY_{id}]");
            }
            if let Some(first) = token_to_id.insert(text.clone(), id) {
                return Err(TokenizerError::DuplicateToken { text: text.clone(), first, second: id });
            }
        }

        let spm = config.model == ModelKind::Spm;
        let wpm = config.model == ModelKind::WordPiece;
        if wpm {
            if let Some((id, text)) = tokens.iter().enumerate().find(|(_, t)| t.len() > MAX_WORDPIECE_TOKEN_BYTES) {
                let (id, len, max) = (id as u32, text.len(), MAX_WORDPIECE_TOKEN_BYTES);
                return Err(TokenizerError::WordPieceTokenTooLong { id, len, max });
            }
        }
        let byte_map = ByteMap::new();
        let token_id = |text: &str| token_to_id.get(text).copied();
        let ranked = RankedMerges::new(byte_map.chars(), if spm { Vec::new() } else { config.merges }, token_id);
        let scored =
            if spm { ScoredMerges::new(&tokens, &scores, token_id) } else { ScoredMerges::new(&[], &[], token_id) };
        let in_vocab = |key: &'static str, id: Option<u32>| match id {
            Some(id) if id as usize >= n_vocab => Err(TokenizerError::IdOutOfRange { key, id, n_vocab }),
            _ => Ok(id),
        };
        // Conventional ids where the metadata names none (as llama.cpp assumes):
        // SentencePiece's <unk>, <s>, </s> at 0, 1, 2; BERT's [PAD], [UNK],
        // [CLS], [SEP] at 0, 100, 101, 102.
        let conventional = |spm_id: Option<u32>, wpm_id: Option<u32>| {
            let id = match config.model {
                ModelKind::Spm => spm_id,
                ModelKind::WordPiece => wpm_id,
                ModelKind::Bpe => None,
            };
            id.filter(|&id| (id as usize) < n_vocab)
        };
        let bos = in_vocab(keys::BOS_ID, config.bos)?.or_else(|| conventional(Some(1), Some(101)));
        let eos = in_vocab(keys::EOS_ID, config.eos)?.or_else(|| conventional(Some(2), None));
        let unk = in_vocab(keys::UNK_ID, config.unk)?.or_else(|| conventional(Some(0), Some(100)));
        let pad = in_vocab(keys::PAD_ID, config.pad)?.or_else(|| conventional(None, Some(0)));
        let sep = match in_vocab(keys::SEP_ID, config.sep)? {
            Some(id) => Some(id),
            None if wpm => eos.or_else(|| conventional(None, Some(102))),
            None => None,
        };

        // Special tokens the metadata does not name are found by their text; they
        // become control tokens so they are never shown as text.
        let mut find_by_text = |texts: &[&str]| {
            let id = texts.iter().find_map(|t| token_to_id.get(*t).copied());
            if let Some(id) = id {
                attrs[id as usize] |= attr::CONTROL;
            }
            id
        };
        let eot = match in_vocab(keys::EOT_ID, config.eot)? {
            Some(id) => Some(id),
            None => find_by_text(EOT_TEXTS),
        };
        let eom = match in_vocab(keys::EOM_ID, config.eom)? {
            Some(id) => Some(id),
            None => find_by_text(EOM_TEXTS),
        };
        let mut eog = Vec::new();
        for (key, id, texts) in [
            (keys::FIM_PAD_ID, config.fim_pad, FIM_PAD_TEXTS),
            (keys::FIM_REP_ID, config.fim_rep, FIM_REP_TEXTS),
            (keys::FIM_SEP_ID, config.fim_sep, FIM_SEP_TEXTS),
        ] {
            match in_vocab(key, id)? {
                Some(id) => eog.push(id),
                None => eog.extend(find_by_text(texts)),
            }
        }
        for text in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(*text) {
                attrs[id as usize] |= attr::CONTROL;
                eog.push(id);
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        // With the tool-calling ends <|return|> and <|call|>, <|end|> only closes a
        // message inside a turn: it is shown, and generation goes on.
        let has = |text: &str| token_to_id.get(text).is_some_and(|id| eog.contains(id));
        if has("<|return|>") && has("<|call|>") {
            if let Some(&end) = token_to_id.get("<|end|>") {
                eog.retain(|&id| id != end);
                attrs[end as usize] = attr::USER_DEFINED;
            }
        }

        // A flag set in the metadata must be honoured; a default without the token is dropped.
        if config.add_bos == Some(true) && bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken { flag: keys::ADD_BOS, key: keys::BOS_ID });
        }
        let add_bos = config.add_bos.unwrap_or((spm || wpm || config.pre == PreTokenizerKind::Llama3) && bos.is_some());
        let add_eos = config.add_eos.unwrap_or(false);
        let add_space_prefix = config.add_space_prefix.unwrap_or(spm);
        if add_eos && eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken { flag: keys::ADD_EOS, key: keys::EOS_ID });
        }
        // Only WordPiece ends a sequence with a separator (the others' flag is informational).
        if wpm && config.add_sep == Some(true) && sep.is_none() {
            return Err(TokenizerError::MissingSpecialToken { flag: keys::ADD_SEP, key: keys::SEP_ID });
        }
        let add_sep = wpm && config.add_sep.unwrap_or(true) && sep.is_some();
        let lowercase = config.lowercase.unwrap_or(true);
        let normalize = Normalize { lowercase, strip_accents: config.strip_accents.unwrap_or(lowercase) };
        let wordpiece = WordPiece::new(if wpm { &tokens[..] } else { &[] }, normalize, unk);

        let special_ids: Vec<u32> = (0..n_vocab as u32)
            .filter(|&id| attrs[id as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
            .collect();
        if let Some(&id) = special_ids.iter().find(|&&id| tokens[id as usize].len() > MAX_SPECIAL_TOKEN_BYTES) {
            let len = tokens[id as usize].len();
            return Err(TokenizerError::SpecialTokenTooLong { id, len, max: MAX_SPECIAL_TOKEN_BYTES });
        }
        let special = SpecialTrie::new(special_ids.iter().map(|&id| (id, tokens[id as usize].as_str())));

        let pieces = tokens
            .iter()
            .zip(&attrs)
            .map(|(text, &a)| render_piece(config.model, &byte_map, text, a).into_boxed_slice())
            .collect();

        let mut tok = Tokenizer {
            model: config.model,
            pre: config.pre,
            tokens,
            attrs,
            token_to_id,
            ranked,
            scored,
            wordpiece,
            spm_byte_tokens: [None; 256],
            byte_map,
            pieces,
            special,
            bos,
            eos,
            eot,
            eom,
            unk,
            pad,
            sep,
            eog,
            add_bos,
            add_eos,
            add_sep,
            add_space_prefix,
            ignore_merges: !spm && config.pre == PreTokenizerKind::Llama3,
        };
        tok.spm_byte_tokens = std::array::from_fn(|b| tok.byte_token(b as u8));
        Ok(tok)
    }

    /// Token ids for `text`.
    ///
    /// `add_special` adds BOS / EOS (and WordPiece's separator) as the model's
    /// flags say. With `parse_special`, control tokens written literally in the
    /// text (`<|im_start|>`) become those tokens; user-defined tokens are always
    /// split out.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = self.split_special(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        let mut merger = Merger::default();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match self.model {
            ModelKind::Spm => {
                // The space prefix goes on text at the start and after every special token.
                let mut after_special = true;
                let mut escaped = Vec::new();
                for fragment in fragments {
                    match fragment {
                        Piece::Text(text) => {
                            escaped.clear();
                            if self.add_space_prefix && after_special {
                                escaped.push('\u{2581}');
                            }
                            escaped.extend(text.chars().map(|c| if c == ' ' { '\u{2581}' } else { c }));
                            self.encode_spm(&mut merger, &escaped, &mut out);
                            after_special = false;
                        }
                        Piece::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                    }
                }
            }
            ModelKind::Bpe => {
                for fragment in fragments {
                    match fragment {
                        Piece::Text(text) => {
                            for word in self.pre.split(text) {
                                self.encode_bpe_word(&mut merger, word.as_bytes(), &mut out);
                            }
                        }
                        Piece::Token(id) => out.push(id),
                    }
                }
            }
            ModelKind::WordPiece => {
                for fragment in fragments {
                    match fragment {
                        Piece::Text(text) => self.wordpiece.encode(&self.tokens, text, &mut out),
                        Piece::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        if add_special && self.add_sep {
            out.extend(self.sep);
        }
        out
    }

    /// Splits out special tokens; the text between stays for the model.
    fn split_special<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Piece<'t>> {
        self.special.split(text, |id| parse_special || self.attrs[id as usize] & (attr::CONTROL | attr::UNKNOWN) == 0)
    }

    /// One pre-tokenized word (raw bytes).
    fn encode_bpe_word(&self, merger: &mut Merger, word: &[u8], out: &mut Vec<u32>) {
        if self.ignore_merges {
            let mut mapped = String::with_capacity(word.len() * 2);
            self.byte_map.encode_into(word, &mut mapped);
            if let Some(&id) = self.token_to_id.get(&mapped) {
                out.push(id);
                return;
            }
        }
        self.ranked.merge(merger, word, |bytes, token| match token {
            Some(id) => out.push(id),
            // Not in the vocabulary: fall back to the tokens of its bytes whose
            // characters are ASCII (printable ASCII maps to itself); the rest is dropped.
            None => out.extend(
                bytes.iter().filter(|&&b| (0x21..=0x7E).contains(&b)).filter_map(|&b| self.ranked.byte_token(b)),
            ),
        });
    }

    /// SentencePiece BPE over characters whose spaces are already `▁`.
    fn encode_spm(&self, merger: &mut Merger, chars: &[char], out: &mut Vec<u32>) {
        self.scored.merge(merger, chars, |c, token| match token {
            Some(id) => out.push(id),
            None => {
                let mut buf = [0u8; 4];
                for &b in c.encode_utf8(&mut buf).as_bytes() {
                    out.extend(self.spm_byte_tokens[usize::from(b)]);
                }
            }
        });
    }

    /// The token for a raw byte: `<0xXX>`, else the byte as a one-character token,
    /// else the unknown token.
    fn byte_token(&self, b: u8) -> Option<u32> {
        let hex = format!("<0x{b:02X}>");
        if let Some(&id) = self.token_to_id.get(&hex) {
            return Some(id);
        }
        if b.is_ascii() {
            let mut buf = [0u8; 4];
            if let Some(&id) = self.token_to_id.get(&*char::from(b).encode_utf8(&mut buf)) {
                return Some(id);
            }
        }
        self.unk
    }

    /// Decoded bytes of one token. Control, unknown and unused tokens give nothing;
    /// an id outside the vocabulary gives nothing.
    pub fn token_piece(&self, id: u32) -> &[u8] {
        match self.attrs.get(id as usize) {
            Some(a) if a & (attr::CONTROL | attr::UNKNOWN) == 0 => &self.pieces[id as usize],
            _ => &[],
        }
    }

    /// Decoded bytes of one token with control and unknown tokens shown as their text.
    pub fn token_piece_special(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], |p| p)
    }

    /// The text of `ids` (special tokens shown as nothing), invalid UTF-8 replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut state = DecodeState::new(self);
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(state.piece(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End of turn: from `tokenizer.ggml.eot_token_id`, else a token such as `<|im_end|>`.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// End of message (tool call pending): `tokenizer.ggml.eom_token_id` or `<|eom_id|>`.
    pub fn eom(&self) -> Option<u32> {
        self.eom
    }

    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// The separator (`[SEP]`) that WordPiece sequences end with.
    pub fn sep(&self) -> Option<u32> {
        self.sep
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn adds_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether `encode(.., add_special = true, ..)` ends with the separator.
    pub fn adds_sep(&self) -> bool {
        self.add_sep
    }

    /// Whether generating `id` ends generation: eos, eot, eom, fill-in-the-middle
    /// separators and end tokens known by their text (`<|im_end|>`, `<|eot_id|>`, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether `id` is a control token (not shown in decoded text).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs.get(id as usize).is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// The raw vocabulary string of `id`.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id whose raw vocabulary string is `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    pub fn model_kind(&self) -> ModelKind {
        self.model
    }

    pub fn pre_tokenizer(&self) -> PreTokenizerKind {
        self.pre
    }
}

/// Bytes a token shows as, special tokens rendered as their text.
fn render_piece(model: ModelKind, byte_map: &ByteMap, text: &str, a: u8) -> Vec<u8> {
    if a & (attr::CONTROL | attr::UNKNOWN | attr::USER_DEFINED) != 0 {
        return text.as_bytes().to_vec();
    }
    if a & attr::NORMAL != 0 {
        return match model {
            ModelKind::Spm | ModelKind::WordPiece => text.replace('\u{2581}', " ").into_bytes(),
            ModelKind::Bpe => byte_map.decode(text),
        };
    }
    if a & attr::BYTE != 0 && model == ModelKind::Spm {
        // "<0xXX>"
        let hex = text.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'));
        if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            return vec![b];
        }
    }
    Vec::new()
}

/// Per-sequence decoding state shared by [`Tokenizer::decode`] and the stream decoder.
///
/// When the model adds a space prefix, the first piece of text loses its leading
/// space; a leading BOS does not count as that first piece.
pub(crate) struct DecodeState<'a> {
    tok: &'a Tokenizer,
    strip_space: bool,
    first: bool,
}

impl<'a> DecodeState<'a> {
    pub(crate) fn new(tok: &'a Tokenizer) -> Self {
        DecodeState { tok, strip_space: tok.add_space_prefix, first: true }
    }

    /// A state parked by [`DecodeState::flags`], on its tokenizer again.
    pub(crate) fn with_flags(tok: &'a Tokenizer, strip_space: bool, first: bool) -> Self {
        DecodeState { tok, strip_space, first }
    }

    /// (strip_space, first): all of the state but the tokenizer.
    pub(crate) fn flags(&self) -> (bool, bool) {
        (self.strip_space, self.first)
    }

    pub(crate) fn piece(&mut self, id: u32) -> &'a [u8] {
        let first = std::mem::replace(&mut self.first, false);
        if first && Some(id) == self.tok.bos {
            return &[];
        }
        let piece = self.tok.token_piece(id);
        if std::mem::replace(&mut self.strip_space, false) {
            if let Some(rest) = piece.strip_prefix(b" ") {
                return rest;
            }
        }
        piece
    }
}

#[cfg(test)]
mod equivalence;

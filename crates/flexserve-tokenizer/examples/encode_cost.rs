//! Prints how long `encode`, `decode` and the stream decoder take on large adversarial
//! inputs, for the real model's byte-level BPE tokenizer and a synthetic SentencePiece one.
//!
//! `cargo run --release -p flexserve-tokenizer --example encode_cost [-- MAX_BYTES]`
//! (inputs longer than MAX_BYTES, default 2 MiB, are skipped).

use std::path::Path;
use std::time::{Duration, Instant};

use flexserve_gguf::GgufFile;
use flexserve_tokenizer::{ModelKind, PreTokenizerKind, StreamDecoder, TokenType, Tokenizer, TokenizerConfig};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// A small deterministic generator (xorshift64*), so runs compare like with like.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn repeat_to(unit: &str, len: usize) -> String {
    unit.repeat(len / unit.len() + 1)[..len].to_string()
}

fn inputs(max_bytes: usize) -> Vec<(String, String)> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let printable: String = (0..2 * MIB).map(|_| char::from(b' ' + (rng.next() % 95) as u8)).collect();
    let raw: Vec<u8> = (0..MIB).map(|_| rng.next() as u8).collect();
    let lossy = String::from_utf8_lossy(&raw).into_owned();
    let cases = vec![
        ("\"a\" x 64 KiB".to_string(), "a".repeat(64 * KIB)),
        ("\"a\" x 256 KiB".to_string(), "a".repeat(256 * KIB)),
        ("\"a\" x 2 MiB".to_string(), "a".repeat(2 * MIB)),
        ("\"hello world \" to 2 MiB".to_string(), repeat_to("hello world ", 2 * MIB)),
        ("random printable ASCII, 2 MiB".to_string(), printable),
        (format!("1 MiB random bytes, lossy UTF-8 ({} B)", lossy.len()), lossy),
        ("spaces, 2 MiB".to_string(), " ".repeat(2 * MIB)),
        ("digits, 2 MiB".to_string(), repeat_to("0123456789", 2 * MIB)),
    ];
    cases.into_iter().filter(|(_, text)| text.len() <= max_bytes).collect()
}

/// A SentencePiece vocabulary: byte tokens, every printable ASCII character, and
/// runs and words that the inputs above keep merging into.
fn spm_tokenizer() -> Tokenizer {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    types.extend([TokenType::Byte; 256]);
    let mut pieces: Vec<String> = (b'!'..=b'~').map(|b| char::from(b).to_string()).collect();
    pieces.push("\u{2581}".to_string());
    for unit in ["a", "\u{2581}", "0", "ab", "12"] {
        pieces.extend((1..=5).map(|k| unit.repeat(1 << k)));
    }
    for word in ["he", "ll", "llo", "hello", "\u{2581}hello", "wo", "or", "ld", "world", "\u{2581}world"] {
        pieces.push(word.to_string());
    }
    pieces.sort();
    pieces.dedup();
    let n_pieces = pieces.len();
    tokens.extend(pieces);
    types.extend(std::iter::repeat_n(TokenType::Normal, n_pieces));
    let scores = (0..tokens.len()).map(|i| -((i % 7) as f32)).collect();
    let mut config = TokenizerConfig::new(ModelKind::Spm, tokens);
    config.token_types = Some(types);
    config.scores = Some(scores);
    Tokenizer::from_config(config).expect("the synthetic vocabulary is valid")
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

fn measure(name: &str, tok: &Tokenizer, cases: &[(String, String)]) {
    println!("== {name}");
    println!("{:<44} {:>10} {:>10} {:>10} {:>10}", "input", "tokens", "encode s", "decode s", "stream s");
    for (label, text) in cases {
        let (ids, encode) = time(|| tok.encode(text, true, false));
        let (_, decode) = time(|| tok.decode(&ids));
        let (_, stream) = time(|| {
            let mut stream = StreamDecoder::new(tok);
            let mut len: usize = ids.iter().map(|&id| stream.push(id).len()).sum();
            len += stream.finish().len();
            len
        });
        println!(
            "{label:<44} {:>10} {:>10.3} {:>10.3} {:>10.3}",
            ids.len(),
            encode.as_secs_f64(),
            decode.as_secs_f64(),
            stream.as_secs_f64()
        );
    }
}

fn main() {
    let max_bytes = std::env::args().nth(1).map_or(2 * MIB, |a| a.parse().expect("MAX_BYTES is a byte count"));
    let cases = inputs(max_bytes);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    match GgufFile::open(&model) {
        Ok(file) => {
            let (tok, built) = time(|| Tokenizer::from_gguf(&file.header.metadata));
            let tok = tok.expect("the model's tokenizer loads");
            println!("(tokenizer built in {:.3} s)", built.as_secs_f64());
            measure("SmolLM2 byte-level BPE (smollm pre-tokenizer)", &tok, &cases);
        }
        Err(e) => println!("skipping the real model ({}): {e}", model.display()),
    }
    measure("synthetic SentencePiece", &spm_tokenizer(), &cases);

    println!("== pre-tokenizer split alone (s)");
    let names = ["gpt2", "smollm", "llama-bpe", "qwen2", "default"];
    println!("{:<44} {}", "input", names.map(|n| format!("{n:>10}")).concat());
    for (label, text) in &cases {
        let times = names.map(|name| {
            let kind = PreTokenizerKind::from_name(name).expect("a known pre-tokenizer");
            format!("{:>10.3}", time(|| kind.split(text).len()).1.as_secs_f64())
        });
        println!("{label:<44} {}", times.concat());
    }
}

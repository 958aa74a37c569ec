//! Prints a model's logits for a prompt and a few decode steps as JSON, for
//! comparison with another engine (bench/compare_logits.py):
//!
//!   dump_logits MODEL.gguf PROMPT_IDS DECODE_IDS [THREADS]
//!
//! `PROMPT_IDS` and `DECODE_IDS` are comma-separated token ids. The prompt is
//! evaluated as one batch (every position's logits are printed), then each
//! decode id is evaluated alone. `FLEXSERVE_ISA=portable|avx2|avx512` caps
//! the kernel tier (`flexserve_quant::limit_isa`); `FLEXSERVE_LAST=1` asks the
//! prompt for its last row's logits only, as generation does.

use std::sync::Arc;

use flexserve_engine::{Logits, Model, Session};
use flexserve_gguf::GgufFile;

fn ids(arg: &str) -> Vec<u32> {
    arg.split(',').filter(|s| !s.is_empty()).map(|s| s.trim().parse().expect("token ids are integers")).collect()
}

fn json_rows(rows: &[Vec<f32>]) -> String {
    let rows: Vec<String> = rows
        .iter()
        .map(|r| format!("[{}]", r.iter().map(|v| format!("{v:e}")).collect::<Vec<_>>().join(",")))
        .collect();
    format!("[{}]", rows.join(","))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: dump_logits MODEL.gguf PROMPT_IDS DECODE_IDS [THREADS]");
        std::process::exit(2);
    }
    let threads = args.get(4).map_or(2, |t| t.parse().expect("threads is an integer"));
    if let Ok(isa) = std::env::var("FLEXSERVE_ISA") {
        let isa = flexserve_quant::Isa::from_name(&isa)
            .unwrap_or_else(|| panic!("FLEXSERVE_ISA={isa}: portable, avx2, avx512, neon or neon-dot"));
        // Before the model loads: tables are picked as it does.
        flexserve_quant::limit_isa(isa);
    }
    let file = Arc::new(GgufFile::open(&args[1]).expect("model opens"));
    let model = Model::from_gguf(file, threads).expect("model loads");
    let n_vocab = model.config.n_vocab;
    let (prompt, decode) = (ids(&args[2]), ids(&args[3]));
    let mut session = Session::new(&model, prompt.len() + decode.len() + 16);
    let which = if std::env::var_os("FLEXSERVE_LAST").is_some() { Logits::Last } else { Logits::From(0) };
    let all = session.eval(&prompt, which).expect("prompt evaluates");
    let prefill: Vec<Vec<f32>> = all.chunks_exact(n_vocab).map(|c| c.to_vec()).collect();
    let steps: Vec<Vec<f32>> =
        decode.iter().map(|&t| session.eval(&[t], Logits::Last).expect("decode step evaluates")).collect();
    println!("{{\"prefill\":{},\"decode\":{}}}", json_rows(&prefill), json_rows(&steps));
}

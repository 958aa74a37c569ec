//! Time of one batched decode step against batch size, on a GGUF model:
//! `cargo run --release -p flexserve-engine --example batch_step -- MODEL [THREADS [DEPTH [SIZES]]]`
//! (sessions DEPTH tokens deep, 128 by default; SIZES comma-separated, 1,2,4,8,16 by default;
//! `BATCH_STEPS` steps timed per size, 32 by default).

use std::sync::Arc;
use std::time::Instant;

use flexserve_engine::weights::GgufSource;
use flexserve_engine::{Logits, Model, Session};
use flexserve_gguf::GgufFile;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: batch_step MODEL [THREADS]");
    let threads: usize = args.next().map_or(2, |t| t.parse().expect("threads"));
    let depth: u32 = args.next().map_or(128, |d| d.parse().expect("depth"));
    let sizes: Vec<usize> =
        args.next().map_or_else(|| vec![1, 2, 4, 8, 16], |s| s.split(',').map(|n| n.parse().expect("sizes")).collect());
    let source = GgufSource::from_file(Arc::new(GgufFile::open(&path).expect("model")));
    let model = Model::from_source(&source, threads).expect("load");
    let prompt: Vec<u32> = (0..depth).map(|i| 100 + i).collect();
    for n in sizes {
        let mut sessions: Vec<Session> = (0..n).map(|_| Session::new(&model, 512)).collect();
        for s in &mut sessions {
            s.eval(&prompt, Logits::Last).expect("prefill");
        }
        let steps: usize = std::env::var("BATCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(32);
        let t0 = Instant::now();
        for step in 0..steps {
            let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
            let tokens = vec![200 + step as u32; n];
            Session::decode_batch(&mut refs, &tokens).expect("step");
        }
        let per_step = t0.elapsed().as_secs_f64() / steps as f64;
        println!(
            "batch {n:2}: {:6.2} ms per step, {:7.1} tokens/s, {:.2} ms per token",
            per_step * 1e3,
            n as f64 / per_step,
            per_step * 1e3 / n as f64
        );
    }
}

//! The engine's forward pass against a straightforward f32 implementation
//! written independently here, on synthetic models of every architecture and
//! every weight type.

use std::sync::Arc;

use flexserve_engine::synth::{synth_model, SynthSpec};
use flexserve_engine::{Arch, Logits, Model, Session};
use flexserve_gguf::{GgmlType, GgufFile};

struct RefModel {
    arch: Arch,
    n_embd: usize,
    n_head: usize,
    n_head_kv: usize,
    n_vocab: usize,
    eps: f32,
    base: f32,
    file: Arc<GgufFile>,
    /// Gemma 3 only: head width, and the window of its local layers with
    /// the period of its global ones.
    head_dim: Option<usize>,
    window: Option<(usize, usize)>,
}

impl RefModel {
    fn t(&self, name: &str) -> Option<Vec<f32>> {
        let info = self.file.header.tensor(name)?;
        let data = self.file.tensor_data(name).unwrap();
        let mut out = vec![0f32; info.n_elements() as usize];
        flexserve_quant::dequantize_row(info.ty, data, &mut out).unwrap();
        Some(out)
    }

    /// Logits for every position of `tokens`, computed from scratch.
    fn forward(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        let e = self.n_embd;
        let gemma3 = self.arch == Arch::Gemma3;
        let hd = self.head_dim.unwrap_or(e / self.n_head);
        let qd = self.n_head * hd;
        let emb = self.t("token_embd.weight").unwrap();
        let emb_scale = if gemma3 { (e as f32).sqrt() } else { 1.0 };
        let mut xs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| emb[t as usize * e..(t as usize + 1) * e].iter().map(|v| v * emb_scale).collect())
            .collect();
        let n_layer =
            (0..).take_while(|i| self.file.header.tensor(&format!("blk.{i}.attn_q.weight")).is_some()).count();
        for l in 0..n_layer {
            let g = |s: &str| self.t(&format!("blk.{l}.{s}"));
            let (wq, wk, wv, wo) = (
                g("attn_q.weight").unwrap(),
                g("attn_k.weight").unwrap(),
                g("attn_v.weight").unwrap(),
                g("attn_output.weight").unwrap(),
            );
            let (bq, bk, bv) = (g("attn_q.bias"), g("attn_k.bias"), g("attn_v.bias"));
            let (wg, wu, wd) =
                (g("ffn_gate.weight").unwrap(), g("ffn_up.weight").unwrap(), g("ffn_down.weight").unwrap());
            let (an, fnw) = (g("attn_norm.weight").unwrap(), g("ffn_norm.weight").unwrap());
            let (qn, kn) = (g("attn_q_norm.weight"), g("attn_k_norm.weight"));
            let (post_attn, post_ffn) = (g("post_attention_norm.weight"), g("post_ffw_norm.weight"));
            // Gemma 3's local layers: a window, and a rotary base of 10000.
            let window = self.window.filter(|&(_, period)| l % period != period - 1).map(|(w, _)| w);
            let base = if window.is_some() { 10000.0 } else { self.base };
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            let mut qs = Vec::new();
            for (p, x) in xs.iter().enumerate() {
                let h = norm(x, &an, self.eps);
                let mut q = matvec(&wq, &h, bq.as_deref());
                let mut k = matvec(&wk, &h, bk.as_deref());
                let v = matvec(&wv, &h, bv.as_deref());
                if let (Some(qn), Some(kn)) = (&qn, &kn) {
                    q = q.chunks(hd).flat_map(|head| norm(head, qn, self.eps)).collect();
                    k = k.chunks(hd).flat_map(|head| norm(head, kn, self.eps)).collect();
                }
                let factors = self.t("rope_freqs.weight");
                for head in q.chunks_mut(hd).chain(k.chunks_mut(hd)) {
                    rope(head, p, base, self.arch != Arch::Llama, factors.as_deref());
                }
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            for p in 0..xs.len() {
                let mut att = vec![0f32; qd];
                // Positions before the window's start weigh nothing.
                let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
                for h in 0..self.n_head {
                    let kvh = h / (self.n_head / self.n_head_kv);
                    let q = &qs[p][h * hd..(h + 1) * hd];
                    let mut sc: Vec<f32> = (0..=p)
                        .map(|j| {
                            if j < first {
                                return f32::NEG_INFINITY;
                            }
                            q.iter().zip(&ks[j][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f32>()
                                / (hd as f32).sqrt()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let s: f32 = sc
                        .iter_mut()
                        .map(|v| {
                            *v = (*v - m).exp();
                            *v
                        })
                        .sum();
                    for j in 0..=p {
                        for d in 0..hd {
                            att[h * hd + d] += sc[j] / s * vs[j][kvh * hd + d];
                        }
                    }
                }
                let mut o = matvec(&wo, &att, None);
                if let Some(w) = &post_attn {
                    o = norm(&o, w, self.eps);
                }
                for (a, b) in xs[p].iter_mut().zip(&o) {
                    *a += b;
                }
                let h = norm(&xs[p], &fnw, self.eps);
                let gt = matvec(&wg, &h, None);
                let up = matvec(&wu, &h, None);
                let f: Vec<f32> = if gemma3 {
                    gt.iter().zip(&up).map(|(g, u)| gelu(*g) * u).collect()
                } else {
                    gt.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect()
                };
                let mut d = matvec(&wd, &f, None);
                if let Some(w) = &post_ffn {
                    d = norm(&d, w, self.eps);
                }
                for (a, b) in xs[p].iter_mut().zip(&d) {
                    *a += b;
                }
            }
        }
        let on = self.t("output_norm.weight").unwrap();
        let out = self.t("output.weight").unwrap_or(emb);
        let logits: Vec<Vec<f32>> = xs.iter().map(|x| matvec(&out, &norm(x, &on, self.eps), None)).collect();
        assert!(logits.iter().all(|v| v.len() == self.n_vocab));
        logits
    }
}

/// GELU in f64, with tanh's approximation.
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())) as f32
}

fn norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * s * b).collect()
}

fn matvec(w: &[f32], x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let rows = w.len() / x.len();
    (0..rows)
        .map(|r| {
            w[r * x.len()..(r + 1) * x.len()].iter().zip(x).map(|(a, b)| a * b).sum::<f32>()
                + bias.map_or(0.0, |b| b[r])
        })
        .collect()
}

fn rope(head: &mut [f32], pos: usize, base: f32, neox: bool, factors: Option<&[f32]>) {
    let d = head.len();
    for i in 0..d / 2 {
        let factor = factors.map_or(1.0, |f| f[i] as f64);
        let theta = pos as f64 * (base as f64).powf(-2.0 * i as f64 / d as f64) / factor;
        let (s, c) = (theta.sin() as f32, theta.cos() as f32);
        let (a, b) = if neox { (i, i + d / 2) } else { (2 * i, 2 * i + 1) };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
    }
}

fn check(spec: SynthSpec) {
    check_with(spec, &[5, 17, 250, 3, 99, 42, 7, 123], &[5]);
}

/// Prefills the first tokens in batches of the sizes given (all logits),
/// decodes the rest one by one.
fn check_with(spec: SynthSpec, tokens: &[u32], batches: &[usize]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    synth_model(&spec, None).unwrap().write_file(&path).unwrap();
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let model = Model::from_gguf(file.clone(), 2).unwrap();
    let r = RefModel {
        arch: spec.arch,
        n_embd: spec.n_embd,
        n_head: spec.n_head,
        n_head_kv: spec.n_head_kv,
        n_vocab: spec.n_vocab,
        eps: if spec.arch == Arch::Gemma3 { 1e-6 } else { 1e-5 },
        base: spec.rope_base,
        file,
        head_dim: spec.head_dim,
        window: (spec.sliding_window > 0).then_some((spec.sliding_window, spec.sliding_window_pattern as usize)),
    };
    let want = r.forward(tokens);

    let mut s = Session::new(&model, tokens.len().max(128));
    let mut got: Vec<Vec<f32>> = Vec::new();
    let mut done = 0;
    for &size in batches {
        let logits = s.eval(&tokens[done..done + size], Logits::From(0)).unwrap();
        got.extend(logits.chunks(spec.n_vocab).map(|c| c.to_vec()));
        done += size;
    }
    for &t in &tokens[done..] {
        got.push(s.eval(&[t], Logits::Last).unwrap());
    }
    assert_eq!(got.len(), want.len());
    for (p, (g, w)) in got.iter().zip(&want).enumerate() {
        let scale = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        let max_err = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let rms_err = (g.iter().zip(w).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / w.len() as f32).sqrt();
        // Activations are quantized (8-bit) before each matmul and the KV cache is f16:
        // a few percent of the logits' spread is the expected deviation; a wrong
        // rotation, mask or layout gives deviations of the order of the logits themselves.
        assert!(
            rms_err < 0.03 * scale && max_err < 0.15 * scale + 1e-3,
            "{:?} {}: position {p}: logit diff rms {rms_err}, max {max_err}, vs logit rms {scale}",
            spec.arch,
            spec.weight_type
        );
    }
}

#[test]
fn llama_matches_reference_for_every_weight_type() {
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        check(SynthSpec::tiny(Arch::Llama, ty));
    }
}

#[test]
fn qwen2_with_biases_and_separate_output_matches_reference() {
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K] {
        let mut spec = SynthSpec::tiny(Arch::Qwen2, ty);
        spec.tied_output = false;
        spec.embd_type = GgmlType::F16;
        check(spec);
    }
}

#[test]
fn llama3_rope_frequency_factors_match_reference() {
    let mut spec = SynthSpec::tiny(Arch::Llama, GgmlType::Q8_0);
    spec.rope_freq_factors = true;
    spec.rope_base = 500000.0;
    check(spec);
}

#[test]
fn long_prompt_batches_take_the_f32_attention_path_and_match() {
    // 70 prompt tokens (the f32 path starts at 64), then 3 decode steps over them.
    let tokens: Vec<u32> = (0..73u32).map(|i| (i * 37 + 11) % 300).collect();
    check_with(SynthSpec::tiny(Arch::Llama, GgmlType::Q4_1), &tokens, &[70]);
    check_with(SynthSpec::tiny(Arch::Qwen2, GgmlType::Q4_K), &tokens, &[70]);
    // A second long batch after the first: its queries also see the earlier positions.
    let tokens: Vec<u32> = (0..139u32).map(|i| (i * 37 + 11) % 300).collect();
    check_with(SynthSpec::tiny(Arch::Llama, GgmlType::F16), &tokens, &[70, 66]);
}

#[test]
fn gemma3_matches_reference_in_and_beyond_its_window() {
    // Tiny gemma3: heads of 128 (queries twice the embedding), one KV head,
    // layer 0 local with a window of 8, layer 1 global. 20 positions: the
    // local layer's later queries no longer see the first ones.
    let tokens: Vec<u32> = (0..20u32).map(|i| (i * 53 + 7) % 300).collect();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_0, GgmlType::F16] {
        check_with(SynthSpec::tiny(Arch::Gemma3, ty), &tokens, &[5, 3]);
    }
    // Decode only, and an untied output.
    let mut spec = SynthSpec::tiny(Arch::Gemma3, GgmlType::Q6_K);
    spec.tied_output = false;
    check_with(spec, &tokens, &[]);
    // Long batches (the f32 attention path), the window smaller than a query block and larger.
    let tokens: Vec<u32> = (0..139u32).map(|i| (i * 37 + 11) % 300).collect();
    for window in [5, 40] {
        let mut spec = SynthSpec::tiny(Arch::Gemma3, GgmlType::Q4_K);
        spec.sliding_window = window;
        check_with(spec, &tokens, &[70, 66]);
    }
}

#[test]
fn context_overflow_is_a_clear_error() {
    let spec = SynthSpec::tiny(Arch::Llama, GgmlType::Q8_0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    synth_model(&spec, None).unwrap().write_file(&path).unwrap();
    let model = Model::from_gguf(Arc::new(GgufFile::open(&path).unwrap()), 1).unwrap();
    let mut s = Session::new(&model, 4);
    s.eval(&[1, 2, 3], Logits::Last).unwrap();
    let err = s.eval(&[4, 5], Logits::Last).unwrap_err().to_string();
    assert!(err.contains("context is full") && err.contains('5') && err.contains('4'), "{err}");
    let err = s.eval(&[1000], Logits::Last).unwrap_err().to_string();
    assert!(err.contains("1000"), "{err}");
}

/// Caller-provided KV memory (as the secure world's granules), byte-backed.
struct ByteKv(Vec<u64>);

impl flexserve_engine::MemoryBlock for ByteKv {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
}

fn byte_kv(bytes: usize) -> Box<ByteKv> {
    Box::new(ByteKv(vec![0u64; bytes.div_ceil(8)]))
}

#[test]
fn caches_in_caller_memory_and_moved_between_memories_give_the_same_logits() {
    use flexserve_engine::KvCache;
    let spec = SynthSpec::tiny(Arch::Llama, GgmlType::Q4_1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    synth_model(&spec, None).unwrap().write_file(&path).unwrap();
    let model = Model::from_gguf(Arc::new(GgufFile::open(&path).unwrap()), 2).unwrap();
    let per_position = KvCache::bytes_per_position(&model.config);
    let prompt: Vec<u32> = (0..9u32).map(|i| (i * 13 + 5) % 300).collect();
    let next = [17u32, 42, 99];

    let mut heap = Session::new(&model, 64);
    let mut want = vec![heap.eval(&prompt, Logits::Last).unwrap()];
    for &t in &next {
        want.push(heap.eval(&[t], Logits::Last).unwrap());
    }

    // Room for exactly the prompt plus one position (a few spare bytes do not make another).
    let kv = KvCache::in_memory(&model.config, 64, byte_kv(10 * per_position + per_position / 2)).unwrap();
    assert_eq!(kv.n_ctx(), 10);
    let mut s = Session::with_cache(&model, kv).unwrap();
    let mut got = vec![s.eval(&prompt, Logits::Last).unwrap()];
    got.push(s.eval(&next[..1], Logits::Last).unwrap());
    let err = s.eval(&next[1..2], Logits::Last).unwrap_err().to_string();
    assert!(err.contains("context is full"), "{err}");

    // Grow: the filled positions move into a larger memory, capped by max_ctx.
    let state = s.into_state();
    assert_eq!((state.n_past(), state.n_ctx()), (10, 10));
    let err = state.moved_to(64, byte_kv(4 * per_position)).err().unwrap().to_string();
    assert!(err.contains("10 cached positions"), "{err}");
    let mut s = Session::with_cache(&model, KvCache::in_memory(&model.config, 64, byte_kv(12 * per_position)).unwrap())
        .unwrap();
    got = vec![s.eval(&prompt, Logits::Last).unwrap()];
    got.push(s.eval(&next[..1], Logits::Last).unwrap());
    let grown = s.into_state().moved_to(16, byte_kv(100 * per_position)).unwrap();
    assert_eq!(grown.n_ctx(), 16, "capped by max_ctx");
    let mut s = Session::resume(&model, grown).unwrap();
    for &t in &next[1..] {
        got.push(s.eval(&[t], Logits::Last).unwrap());
    }
    assert_eq!(got, want, "the cache in caller memory, grown once, gives the heap session's logits exactly");

    let err = KvCache::in_memory(&model.config, 64, byte_kv(per_position - 8)).err().unwrap().to_string();
    assert!(err.contains("holds no position"), "{err}");
}

/// A scratch source that counts the blocks it hands out.
struct CountingScratch(std::sync::atomic::AtomicUsize);

impl flexserve_engine::ScratchSource for CountingScratch {
    fn block(&self, bytes: usize) -> Result<Box<dyn flexserve_engine::MemoryBlock>, flexserve_engine::EngineError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(byte_kv(bytes))
    }
}

#[test]
fn activations_in_caller_memory_reserved_by_plan_take_no_block_while_running() {
    use std::sync::atomic::Ordering;
    let tokens: Vec<u32> = (0..75u32).map(|i| (i * 29 + 3) % 300).collect();
    for ty in [GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q8_0] {
        let spec = SynthSpec::tiny(Arch::Llama, ty);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        synth_model(&spec, None).unwrap().write_file(&path).unwrap();
        let model = Model::from_gguf(Arc::new(GgufFile::open(&path).unwrap()), 2).unwrap();
        let run = |s: &mut Session| {
            // A long batch (f32 attention, staged matmuls, logits of every position), then decoding.
            let mut out = s.eval(&tokens[..70], Logits::From(0)).unwrap();
            for &t in &tokens[70..] {
                out.extend(s.eval(&[t], Logits::Last).unwrap());
            }
            out
        };
        let want = run(&mut Session::new(&model, 128));

        let source = Arc::new(CountingScratch(Default::default()));
        let mut s = Session::new(&model, 128);
        s.set_scratch_source(source.clone());
        let plan = model.scratch_plan(70, 75, 70);
        s.reserve_scratch(&plan).unwrap();
        let taken = source.0.load(Ordering::Relaxed);
        assert!(taken >= 10, "{ty}: {taken} blocks for {plan:?}");
        assert_eq!(run(&mut s), want, "{ty}: activations in caller memory change nothing");
        assert_eq!(source.0.load(Ordering::Relaxed), taken, "{ty}: a buffer outgrew its plan: {plan:?}");
    }
}

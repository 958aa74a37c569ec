//! Writes a llama/qwen2 model's intermediate tensors for a prompt, named as
//! llama.cpp's graph names them, to find the first operation where the two
//! engines part (bench/trace_compare.py compares them with llama.cpp's own,
//! read through its evaluation callback):
//!
//!   trace_forward MODEL.gguf IDS OUT_DIR
//!
//! `IDS` is a comma-separated list of token ids, evaluated one batch. The
//! layer steps below repeat the engine's forward pass with its public
//! operations (the batch's attention as the one-token path computes it, for
//! batches below the f32 attention's threshold); the last row's logits are
//! checked against `Session::eval` bit for bit, so that the trace is the
//! engine's own arithmetic. Each tensor goes to `OUT_DIR/NAME.f32` (rows of
//! little-endian f32), listed with its row length in `OUT_DIR/index.txt`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flexserve_engine::config::{Arch, RopeScaling};
use flexserve_engine::ops::{self, QuantizedActs};
use flexserve_engine::{memory::Buf, Logits, Model, Session};
use flexserve_gguf::{GgmlType, GgufFile};
use half::f16;

struct Trace {
    dir: PathBuf,
    index: std::fs::File,
}

impl Trace {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("output directory");
        Self { dir: dir.to_path_buf(), index: std::fs::File::create(dir.join("index.txt")).expect("index") }
    }

    fn put(&mut self, name: &str, row: usize, data: &[f32]) {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(self.dir.join(format!("{name}.f32")), bytes).expect("tensor file");
        writeln!(self.index, "{name} {row}").expect("index line");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: trace_forward MODEL.gguf IDS OUT_DIR");
        std::process::exit(2);
    }
    let file = Arc::new(GgufFile::open(&args[1]).expect("model opens"));
    let model = Model::from_gguf(file, 2).expect("model loads");
    let ids: Vec<u32> = args[2].split(',').map(|s| s.trim().parse().expect("token ids are integers")).collect();
    let mut trace = Trace::new(Path::new(&args[3]));
    let c = &model.config;
    assert!(matches!(c.arch, Arch::Llama | Arch::Qwen2), "traces llama and qwen2 models");
    assert!(ids.len() < 64, "traces batches below the f32 attention's threshold");
    let w = &model.weights;
    let n = ids.len();
    let (e, qd, kvd, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
    let mm = &mut Buf::new(flexserve_engine::memory::heap_scratch());
    let mut acts = QuantizedActs::default();
    let mut x = vec![0f32; n * e];
    let embd = ops::kernels(w.token_embd.ty).unwrap();
    for (t, &tok) in ids.iter().enumerate() {
        (embd.dequantize)(w.token_embd.row(tok as usize), &mut x[t * e..(t + 1) * e]);
    }
    trace.put("embd", e, &x);
    let pos_scale = match c.rope_scaling {
        RopeScaling::None => 1.0,
        RopeScaling::Linear { factor } => 1.0 / factor,
    };
    let angles: Vec<Vec<(f32, f32)>> = (0..n)
        .map(|p| {
            let mut a = Vec::new();
            ops::rope_angles(p, c.rope_dim, c.rope_base, pos_scale, w.rope_freq_factors.as_deref(), &mut a);
            a
        })
        .collect();
    let mut kc = vec![0u16; n * kvd];
    let mut vc = vec![0u16; n * kvd];
    let (mut h, mut q, mut k, mut v) =
        (vec![0f32; n * e], vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
    let (mut gate, mut up) = (vec![0f32; n * c.n_ff], vec![0f32; n * c.n_ff]);
    let mut att = vec![0f32; n * qd];
    let neox = c.arch.rope_neox();
    for li in 0..c.n_layer {
        let layer = w.layer(li).unwrap();
        ops::rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut h);
        trace.put(&format!("attn_norm-{li}"), e, &h);
        ops::quantize_for(&mut acts, &h, e, &layer.wq).unwrap();
        ops::matmul(&layer.wq, &acts, &mut q, mm).unwrap();
        ops::reuse_for(&mut acts, &h, e, &layer.wk).unwrap();
        ops::matmul(&layer.wk, &acts, &mut k, mm).unwrap();
        ops::reuse_for(&mut acts, &h, e, &layer.wv).unwrap();
        ops::matmul(&layer.wv, &acts, &mut v, mm).unwrap();
        trace.put(&format!("Qmm-{li}"), qd, &q);
        trace.put(&format!("Kmm-{li}"), kvd, &k);
        trace.put(&format!("Vmm-{li}"), kvd, &v);
        for (t, b) in [(&mut q, &layer.bq), (&mut k, &layer.bk), (&mut v, &layer.bv)] {
            if let Some(b) = b {
                t.chunks_exact_mut(b.len()).for_each(|r| r.iter_mut().zip(b).for_each(|(x, b)| *x += b));
            }
        }
        trace.put(&format!("Vcur-{li}"), kvd, &v);
        for (t, a) in angles.iter().enumerate() {
            q[t * qd..(t + 1) * qd]
                .chunks_exact_mut(hd)
                .for_each(|head| ops::rope_head(&mut head[..c.rope_dim], a, neox));
            k[t * kvd..(t + 1) * kvd]
                .chunks_exact_mut(hd)
                .for_each(|head| ops::rope_head(&mut head[..c.rope_dim], a, neox));
        }
        trace.put(&format!("Qcur-{li}"), qd, &q);
        trace.put(&format!("Kcur-{li}"), kvd, &k);
        for (d, s) in kc.iter_mut().zip(&k) {
            *d = f16::from_f32(*s).to_bits();
        }
        for (d, s) in vc.iter_mut().zip(&v) {
            *d = f16::from_f32(*s).to_bits();
        }
        for t in 0..n {
            for head in 0..c.n_head {
                let o = &mut att[t * qd + head * hd..][..hd];
                attend(c, &kc, &vc, head, t, &q[t * qd + head * hd..][..hd], o);
            }
        }
        trace.put(&format!("kqv_out-{li}"), qd, &att);
        ops::quantize_for(&mut acts, &att, qd, &layer.wo).unwrap();
        ops::matmul(&layer.wo, &acts, &mut h, mm).unwrap();
        trace.put(&format!("attn_out-{li}"), e, &h);
        ops::add_into(&mut x, &h);
        if li + 1 == c.n_layer {
            // The last layer's feed-forward block for the last row only, as
            // the engine and llama.cpp compute it.
            x.drain(..(n - 1) * e);
            h.truncate(e);
            gate.truncate(c.n_ff);
            up.truncate(c.n_ff);
        }
        trace.put(&format!("ffn_inp-{li}"), e, &x);
        ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut h);
        trace.put(&format!("ffn_norm-{li}"), e, &h);
        ops::quantize_for(&mut acts, &h, e, &layer.w_gate).unwrap();
        ops::matmul(&layer.w_gate, &acts, &mut gate, mm).unwrap();
        ops::reuse_for(&mut acts, &h, e, &layer.w_up).unwrap();
        ops::matmul(&layer.w_up, &acts, &mut up, mm).unwrap();
        trace.put(&format!("ffn_gate-{li}"), c.n_ff, &gate);
        trace.put(&format!("ffn_up-{li}"), c.n_ff, &up);
        let silu_mul = flexserve_quant::activations().silu_mul;
        gate.chunks_mut(c.n_ff).zip(up.chunks(c.n_ff)).for_each(|(g, u)| silu_mul(g, u));
        trace.put(&format!("ffn_swiglu-{li}"), c.n_ff, &gate);
        ops::quantize_for(&mut acts, &gate, c.n_ff, &layer.w_down).unwrap();
        ops::matmul(&layer.w_down, &acts, &mut h, mm).unwrap();
        trace.put(&format!("ffn_out-{li}"), e, &h);
        ops::add_into(&mut x, &h);
        trace.put(&format!("l_out-{li}"), e, &x);
    }
    let last = &x[x.len() - e..];
    let mut normed = vec![0f32; e];
    ops::rms_norm(last, &w.output_norm, c.rms_eps, &mut normed);
    trace.put("result_norm", e, &normed);
    ops::quantize_for(&mut acts, &normed, e, &w.output).unwrap();
    let mut logits = vec![0f32; c.n_vocab];
    ops::matmul(&w.output, &acts, &mut logits, mm).unwrap();
    trace.put("result_output", c.n_vocab, &logits);
    let want = Session::new(&model, n + 1).eval(&ids, Logits::Last).unwrap();
    let same = want.iter().zip(&logits).all(|(a, b)| a.to_bits() == b.to_bits());
    let diff = want.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("trace's logits {} the engine's (max |diff| {diff:e})", if same { "equal" } else { "DIFFER FROM" });
}

/// One head's attention at position `last` over positions `0..=last`, as the
/// engine's one-token path computes it (`attend_head` in model/forward.rs).
fn attend(
    c: &flexserve_engine::ModelConfig,
    kc: &[u16],
    vc: &[u16],
    head: usize,
    last: usize,
    q: &[f32],
    o: &mut [f32],
) {
    let (hd, kvd) = (c.head_dim, c.kv_dim());
    let kvh = head / (c.n_head / c.n_head_kv);
    let to_f16 = ops::kernels(GgmlType::F16).unwrap().quantize;
    let acc = flexserve_quant::f16_acc();
    let mut q16 = vec![0u8; hd * 2];
    to_f16(q, &mut q16);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    o.fill(0.0);
    for j in 0..=last {
        let at = j * kvd + kvh * hd;
        let s = (acc.dot)(hd, bytemuck::cast_slice(&kc[at..at + hd]), &q16) * c.kq_scale;
        let (rescale, weight) = if s > max {
            let rescale = (max - s).exp();
            max = s;
            (acc.scale)(o, rescale);
            (rescale, 1.0)
        } else {
            (1.0, (s - max).exp())
        };
        (acc.mad)(o, bytemuck::cast_slice(&vc[at..at + hd]), weight);
        sum = sum.mul_add(rescale, weight);
    }
    let inv = 1.0 / sum;
    o.iter_mut().for_each(|v| *v *= inv);
}

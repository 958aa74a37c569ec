//! The encoder against a plain f64 transcription of the same model (every
//! matrix dequantized, every sum in order), on synthetic nomic-bert models.

use super::*;
use crate::synth::{synth_encoder, EncoderSynthSpec};
use crate::weights::Tensor;
use flexserve_gguf::{Metadata, Value};

fn image(spec: &EncoderSynthSpec) -> Vec<u8> {
    let mut bytes = Vec::new();
    synth_encoder(spec).unwrap().write_to(&mut bytes).unwrap();
    bytes
}

fn load(spec: &EncoderSynthSpec, threads: usize) -> (Encoder, GgufSource) {
    let src = GgufSource::from_bytes(image(spec)).unwrap();
    (Encoder::from_source(&src, threads).unwrap(), src)
}

/// Tensor `name` as f64 rows of its columns.
fn matrix(src: &GgufSource, name: &str) -> Vec<Vec<f64>> {
    let info = src.info(name).unwrap();
    let cols = info.dims[0] as usize;
    let rows = info.dims.iter().skip(1).product::<u64>() as usize;
    let t = Tensor::load(src, name, cols, rows).unwrap().to_f32().unwrap();
    t.chunks_exact(cols).map(|r| r.iter().map(|&v| v as f64).collect()).collect()
}

fn vector(src: &GgufSource, name: &str) -> Vec<f64> {
    matrix(src, name).concat()
}

fn times(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter().map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn layer_norm(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    x.iter().zip(w).zip(b).map(|((v, w), b)| (v - mean) / (var + eps).sqrt() * w + b).collect()
}

/// The model's pooled output for `tokens`, straight from its definition.
fn reference(src: &GgufSource, c: &EncoderConfig, tokens: &[u32]) -> Vec<f64> {
    let (e, hd) = (c.n_embd, c.head_dim);
    let eps = c.norm_eps as f64;
    let embd = matrix(src, "token_embd.weight");
    let type0 = &matrix(src, "token_types.weight")[0];
    let norm = |name: &str, x: &[f64]| {
        layer_norm(x, &vector(src, &format!("{name}.weight")), &vector(src, &format!("{name}.bias")), eps)
    };
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| norm("token_embd_norm", &embd[t as usize].iter().zip(type0).map(|(a, b)| a + b).collect::<Vec<_>>()))
        .collect();
    let rotate = |v: &mut [f64], pos: usize| {
        for head in v.chunks_exact_mut(hd) {
            for i in 0..hd / 2 {
                let theta = pos as f64 * (c.rope_base as f64).powf(-2.0 * i as f64 / hd as f64);
                let (a, b) = (head[i], head[i + hd / 2]);
                head[i] = a * theta.cos() - b * theta.sin();
                head[i + hd / 2] = a * theta.sin() + b * theta.cos();
            }
        }
    };
    for l in 0..c.n_layer {
        let m = |s: &str| matrix(src, &format!("blk.{l}.{s}.weight"));
        let (wqkv, wo, gate, up, down) = (m("attn_qkv"), m("attn_output"), m("ffn_gate"), m("ffn_up"), m("ffn_down"));
        let qkv: Vec<Vec<f64>> = x.iter().map(|r| times(&wqkv, r)).collect();
        let (mut q, mut k): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (Vec::new(), Vec::new());
        for (pos, r) in qkv.iter().enumerate() {
            let (mut qr, mut kr) = (r[..e].to_vec(), r[e..2 * e].to_vec());
            rotate(&mut qr, pos);
            rotate(&mut kr, pos);
            q.push(qr);
            k.push(kr);
        }
        let mut next = Vec::new();
        for (t, xr) in x.iter().enumerate() {
            let mut att = vec![0f64; e];
            for h in 0..c.n_head {
                let hs = h * hd..(h + 1) * hd;
                let scores: Vec<f64> = k
                    .iter()
                    .map(|kr| {
                        q[t][hs.clone()].iter().zip(&kr[hs.clone()]).map(|(a, b)| a * b).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - max).exp() / sum;
                    for d in 0..hd {
                        att[h * hd + d] += p * qkv[j][2 * e + h * hd + d];
                    }
                }
            }
            let o = times(&wo, &att);
            let y =
                norm(&format!("blk.{l}.attn_output_norm"), &o.iter().zip(xr).map(|(a, b)| a + b).collect::<Vec<_>>());
            let g = times(&gate, &y);
            let u = times(&up, &y);
            let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let f = times(&down, &act);
            next.push(norm(
                &format!("blk.{l}.layer_output_norm"),
                &f.iter().zip(&y).map(|(a, b)| a + b).collect::<Vec<_>>(),
            ));
        }
        x = next;
    }
    (0..e).map(|d| x.iter().map(|r| r[d]).sum::<f64>() / x.len() as f64).collect()
}

fn cosine64(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, y)| x as f64 * y).sum();
    let na = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn agrees_with_the_models_definition() {
    // f32 weights: the kernels' rounding is all that differs; f16 and Q8_0
    // activations round more. 40 tokens make three attention blocks, the last short.
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 200).collect();
    for (ty, min_cosine) in [(GgmlType::F32, 0.999_999), (GgmlType::F16, 0.9999), (GgmlType::Q8_0, 0.999)] {
        let (enc, src) = load(&EncoderSynthSpec::tiny(ty), 2);
        let want = reference(&src, &enc.config, &tokens);
        let got = enc.embed(&tokens, Normalization::None).unwrap();
        let cos = cosine64(&got, &want);
        assert!(cos >= min_cosine, "{ty}: cosine {cos} with the reference");
        let scale = want.iter().map(|v| v * v).sum::<f64>().sqrt();
        let got_scale = got.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
        assert!((got_scale / scale - 1.0).abs() < 1e-2, "{ty}: length {got_scale} against {scale}");
    }
}

#[test]
fn single_token_input_and_unit_length() {
    let (enc, src) = load(&EncoderSynthSpec::tiny(GgmlType::F32), 1);
    let got = enc.embed(&[3], Normalization::Euclidean).unwrap();
    let length = got.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
    assert!((length - 1.0).abs() < 1e-5, "length {length}");
    assert!(cosine64(&got, &reference(&src, &enc.config, &[3])) > 0.999_999);
}

#[test]
fn thread_count_does_not_change_the_result() {
    let tokens: Vec<u32> = (0..23).map(|i| (i * 11 + 1) % 200).collect();
    let spec = EncoderSynthSpec::tiny(GgmlType::F16);
    let one = load(&spec, 1).0.embed(&tokens, Normalization::Euclidean).unwrap();
    let two = load(&spec, 2).0.embed(&tokens, Normalization::Euclidean).unwrap();
    assert_eq!(one, two);
}

#[test]
fn pooling_follows_the_metadata() {
    let tokens = [4u32, 8, 15, 16, 23, 42];
    let mean = load(&EncoderSynthSpec::tiny(GgmlType::F32), 1).0.embed(&tokens, Normalization::None).unwrap();
    let cls_spec = EncoderSynthSpec { pooling_type: 2, ..EncoderSynthSpec::tiny(GgmlType::F32) };
    let (cls_enc, _) = load(&cls_spec, 1);
    assert_eq!(cls_enc.config.pooling, Pooling::Cls);
    let cls = cls_enc.embed(&tokens, Normalization::None).unwrap();
    assert_eq!(cls.len(), mean.len());
    assert!(cosine(&cls, &mean) < 0.999, "CLS pooling gave the mean");
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let (enc, _) = load(&EncoderSynthSpec::tiny(GgmlType::F32), 1);
    assert!(matches!(enc.embed(&[], Normalization::None), Err(EngineError::EmptyInput)));
    assert!(matches!(enc.embed(&[1, 200], Normalization::None), Err(EngineError::BadToken { id: 200, n_vocab: 200 })));
    let long = vec![1u32; 65];
    assert!(matches!(enc.embed(&long, Normalization::None), Err(EngineError::ContextFull { n_ctx: 64, needed: 65 })));
}

#[test]
fn metadata_that_is_not_an_encoders_is_refused() {
    let with = |key: &str, value: Value| {
        let mut meta: Metadata =
            GgufSource::from_bytes(image(&EncoderSynthSpec::tiny(GgmlType::F32))).unwrap().header().metadata.clone();
        meta.insert(key.to_string(), value);
        EncoderConfig::from_metadata(&meta)
    };
    let causal = with("nomic-bert.attention.causal", Value::Bool(true)).unwrap_err().to_string();
    assert!(causal.contains("attention.causal"), "{causal}");
    let pooling = with("nomic-bert.pooling_type", Value::U32(4)).unwrap_err().to_string();
    assert!(pooling.contains("pooling_type = 4"), "{pooling}");
    let arch = with("general.architecture", Value::from("llama")).unwrap_err().to_string();
    assert!(arch.contains("\"llama\""), "{arch}");
}

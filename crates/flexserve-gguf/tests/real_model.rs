//! Parses the real SmolLM2 model's header, when the model is present.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use flexserve_gguf::{GgmlType, GgufFile, GgufHeader};

fn model_path() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.exists() {
        Some(path)
    } else {
        println!("skipping: model not found at {}", path.display());
        None
    }
}

#[test]
fn real_model_header() {
    let Some(path) = model_path() else { return };
    let file = GgufFile::open(&path).unwrap();
    let h = &file.header;
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    assert_eq!(h.data_offset, 1_785_664);
    assert_eq!(h.metadata.len(), 33);
    assert_eq!(h.tensors.len(), 272);

    let m = &h.metadata;
    assert_eq!(m.architecture(), Some("llama"));
    assert_eq!(m.get_u32("llama.block_count").unwrap(), Some(30));
    assert_eq!(m.get_u64("llama.embedding_length").unwrap(), Some(576));
    assert_eq!(m.get_u32("llama.attention.head_count_kv").unwrap(), Some(3));
    assert_eq!(m.get_f32("llama.rope.freq_base").unwrap(), Some(100000.0));
    assert_eq!(m.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(), Some(1e-5));
    assert_eq!(m.get_bool("tokenizer.ggml.add_bos_token").unwrap(), Some(false));
    assert_eq!(m.get_str("tokenizer.ggml.model").unwrap(), Some("gpt2"));
    assert_eq!(m.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
    let tokens = m.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[1], "<|im_start|>");
    let types = m.get_i32_array("tokenizer.ggml.token_type").unwrap().unwrap();
    assert_eq!(types.len(), 49152);
    let merges = m.get_str_array("tokenizer.ggml.merges").unwrap().unwrap();
    assert_eq!(merges.len(), 48900);
    assert!(m.get_str("tokenizer.chat_template").unwrap().unwrap().contains("<|im_start|>"));

    let embd = h.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ty, GgmlType::Q8_0);
    assert_eq!(embd.dims, [576, 49152]);
    assert_eq!(embd.offset, 0);
    assert_eq!(file.tensor_data("token_embd.weight").unwrap().len() as u64, 576 / 32 * 34 * 49152);
    let count = |ty| h.tensors.iter().filter(|t| t.ty == ty).count();
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(count(GgmlType::F32), 61);
    assert_eq!(h.tensor("blk.29.ffn_down.weight").unwrap().dims, [1536, 576]);

    // Tensors tile the data section up to its padded end.
    let end = h.tensors.iter().map(|t| t.offset + t.byte_size()).max().unwrap();
    assert!(end <= file.data().len() as u64);
    assert!(file.data().len() as u64 - end < h.alignment);

    // Streaming the header gives the same result as parsing the mapped file.
    let streamed = GgufHeader::read(BufReader::new(File::open(&path).unwrap())).unwrap();
    assert_eq!(streamed.metadata, h.metadata);
    assert_eq!(streamed.tensors, h.tensors);
    assert_eq!(streamed.data_offset, h.data_offset);
}

//! Writer -> reader round trips of every value type and every tensor type.

mod common;

use std::io::{Cursor, Read};

use common::pattern;
use flexserve_gguf::{
    Array, GgmlType, GgufError, GgufFile, GgufHeader, GgufWriter, Metadata, Value, ValueType, ALL_TYPES,
};

fn every_value() -> Vec<(&'static str, Value)> {
    let strings = Array {
        elem_type: ValueType::String,
        values: vec![Value::from("x"), Value::from(""), Value::from("ünï ✓")],
    };
    let ints = Array { elem_type: ValueType::U16, values: vec![Value::U16(0), Value::U16(65535)] };
    vec![
        ("u8", Value::U8(200)),
        ("i8", Value::I8(-100)),
        ("u16", Value::U16(60000)),
        ("i16", Value::I16(-30000)),
        ("u32", Value::U32(4_000_000_000)),
        ("i32", Value::I32(-2_000_000_000)),
        ("u64", Value::U64(u64::MAX)),
        ("i64", Value::I64(i64::MIN)),
        ("f32", Value::F32(-1.5e-7)),
        ("f64", Value::F64(std::f64::consts::PI)),
        ("bool.t", Value::Bool(true)),
        ("bool.f", Value::Bool(false)),
        ("string", Value::from("hello\nworld")),
        ("string.empty", Value::from("")),
        ("array.str", Value::string_array(vec!["a".into(), "b".into()])),
        ("array.i32", Value::i32_array(vec![i32::MIN, 0, i32::MAX])),
        ("array.u32", Value::u32_array(vec![7, 8])),
        ("array.f32", Value::f32_array(vec![0.5, -2.0])),
        ("array.empty", Value::i32_array(vec![])),
        (
            "array.bool",
            Value::Array(Array { elem_type: ValueType::Bool, values: vec![Value::Bool(true), Value::Bool(false)] }),
        ),
        ("array.u8", Value::Array(Array { elem_type: ValueType::U8, values: vec![Value::U8(1), Value::U8(255)] })),
        ("array.f64", Value::Array(Array { elem_type: ValueType::F64, values: vec![Value::F64(1e300)] })),
        ("array.nested", Value::array_of_arrays(vec![strings.clone(), ints, strings])),
        (
            "array.deep",
            Value::array_of_arrays(vec![Array {
                elem_type: ValueType::Array,
                values: vec![Value::i32_array(vec![42])],
            }]),
        ),
    ]
}

/// What one tensor should read back as: name, type, dims, data.
type ExpectedTensor = (String, GgmlType, Vec<u64>, Vec<u8>);

fn every_tensor_type_writer() -> (GgufWriter, Vec<ExpectedTensor>) {
    let mut w = GgufWriter::new();
    let mut expected = Vec::new();
    for (i, &ty) in ALL_TYPES.iter().enumerate() {
        let dims = vec![ty.block_size() as u64 * 2, 3];
        let size = ty.row_size(dims[0]).unwrap() * dims[1];
        let data = pattern(size as usize, i as u8);
        let name = format!("t.{}", ty.name());
        w.add_tensor(name.as_str(), ty, &dims, data.clone()).unwrap();
        expected.push((name, ty, dims, data));
    }
    (w, expected)
}

#[test]
fn every_value_type_round_trips() {
    let mut w = GgufWriter::new();
    for (key, value) in every_value() {
        w.set(key, value);
    }
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();

    let header = GgufHeader::parse(&bytes).unwrap();
    assert_eq!(header.version, 3);
    assert_eq!(header.alignment, 32);
    assert!(header.tensors.is_empty());
    assert_eq!(header.data_offset as usize, bytes.len());
    assert_eq!(header.data_offset % 32, 0);
    let got: Vec<(&str, &Value)> = header.metadata.iter().collect();
    let want = every_value();
    assert_eq!(got.len(), want.len());
    for ((gk, gv), (wk, wv)) in got.iter().zip(&want) {
        assert_eq!(gk, wk);
        assert_eq!(*gv, wv, "value of {wk}");
    }
    assert_eq!(header.metadata, *w.metadata());
}

#[test]
fn every_tensor_type_round_trips_through_a_file() {
    let (mut w, expected) = every_tensor_type_writer();
    w.set("general.architecture", Value::from("test"));
    w.set("general.alignment", Value::U32(64));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    w.write_file(&path).unwrap();
    // Only the final file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);

    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.path(), path);
    let h = &file.header;
    assert_eq!(h.alignment, 64);
    assert_eq!(h.data_offset % 64, 0);
    assert_eq!(h.metadata.architecture(), Some("test"));
    assert_eq!(h.tensors.len(), expected.len());
    for (t, (name, ty, dims, data)) in h.tensors.iter().zip(&expected) {
        assert_eq!(&t.name, name);
        assert_eq!(t.ty, *ty);
        assert_eq!(&t.dims, dims);
        assert_eq!(t.offset % 64, 0, "{name} offset");
        assert_eq!(t.byte_size(), data.len() as u64);
        assert_eq!(t.n_elements(), dims[0] * dims[1]);
        assert_eq!(file.tensor_data(name).unwrap(), &data[..], "{name} data");
        let range = h.tensor_file_range(t);
        assert_eq!(&file.bytes()[range.start as usize..range.end as usize], &data[..]);
    }
    assert!(file.tensor_data("missing").is_none());
    assert_eq!(file.data().len() as u64, file.bytes().len() as u64 - h.data_offset);
}

#[test]
fn read_consumes_exactly_the_header() {
    let (mut w, _) = every_tensor_type_writer();
    for (key, value) in every_value() {
        w.set(key, value);
    }
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    let parsed = GgufHeader::parse(&bytes).unwrap();

    let mut cursor = Cursor::new(&bytes);
    let read = GgufHeader::read(&mut cursor).unwrap();
    assert_eq!(cursor.position(), read.data_offset);
    assert_eq!(read.data_offset, parsed.data_offset);
    assert_eq!(read.metadata, parsed.metadata);
    assert_eq!(read.tensors, parsed.tensors);
    read.check_data_len(bytes.len() as u64 - read.data_offset).unwrap();
    // The rest of the stream is the data section.
    let mut rest = Vec::new();
    cursor.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len() as u64, bytes.len() as u64 - read.data_offset);
}

#[test]
fn writer_replaces_keys_in_place() {
    let mut w = GgufWriter::new();
    w.set("a", Value::from(1u32));
    w.set("b", Value::from(2u32));
    w.set("a", Value::from("again"));
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    let h = GgufHeader::parse(&bytes).unwrap();
    let keys: Vec<&str> = h.metadata.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(h.metadata.get_str("a").unwrap(), Some("again"));
}

#[test]
fn writer_rejects_bad_tensors() {
    let mut w = GgufWriter::new();
    let err = w.add_tensor("short", GgmlType::F32, &[4], vec![0; 15]).unwrap_err();
    assert!(err.to_string().contains("\"short\""), "{err}");
    assert!(err.to_string().contains("15 bytes"), "{err}");

    let err = w.add_tensor("q", GgmlType::Q4_0, &[16], vec![0; 9]).unwrap_err();
    assert!(err.to_string().contains("block size 32"), "{err}");

    let err = w.add_tensor("zero", GgmlType::F32, &[4, 0], vec![]).unwrap_err();
    assert!(err.to_string().contains("dimension 1 is zero"), "{err}");

    let err = w.add_tensor("five", GgmlType::F32, &[1, 1, 1, 1, 1], vec![0; 4]).unwrap_err();
    assert!(err.to_string().contains("5 dimensions"), "{err}");

    w.add_tensor("ok", GgmlType::F32, &[1], vec![0; 4]).unwrap();
    let err = w.add_tensor("ok", GgmlType::F32, &[1], vec![0; 4]).unwrap_err();
    assert!(matches!(err, GgufError::DuplicateTensor { .. }), "{err}");
    assert!(err.to_string().contains("duplicate tensor name \"ok\""), "{err}");
    assert_eq!(w.tensor_count(), 1);
}

#[test]
fn writer_rejects_bad_metadata() {
    let mut w = GgufWriter::new();
    w.set("mixed", Value::Array(Array { elem_type: ValueType::U32, values: vec![Value::U32(1), Value::from("two")] }));
    let err = w.write_to(Vec::new()).unwrap_err();
    assert!(err.to_string().contains("\"mixed\""), "{err}");
    assert!(err.to_string().contains("element 1 is string"), "{err}");

    let mut w = GgufWriter::new();
    w.set("general.alignment", Value::U32(48));
    let err = w.write_to(Vec::new()).unwrap_err();
    assert!(err.to_string().contains("general.alignment"), "{err}");
    assert!(err.to_string().contains("48"), "{err}");
}

#[test]
fn value_accessors_convert_sensibly() {
    assert_eq!(Value::I32(-1).as_u64(), None);
    assert_eq!(Value::I32(7).as_u64(), Some(7));
    assert_eq!(Value::U64(u64::MAX).as_i64(), None);
    assert_eq!(Value::U64(5).as_u32(), Some(5));
    assert_eq!(Value::U64(1 << 32).as_u32(), None);
    assert_eq!(Value::U8(3).as_f32(), Some(3.0));
    assert_eq!(Value::F64(0.25).as_f32(), Some(0.25));
    assert_eq!(Value::from("x").as_f32(), None);
    assert_eq!(Value::Bool(true).as_bool(), Some(true));
    assert_eq!(Value::U8(1).as_bool(), None);
    assert_eq!(Value::from(String::from("s")).as_str(), Some("s"));
    assert!(Value::i32_array(vec![1]).as_array().is_some());
    for ty in ValueType::ALL {
        assert_eq!(ValueType::from_id(ty.id()), Some(ty));
    }
    assert_eq!(ValueType::from_id(13), None);
    assert_eq!(Value::from(1u64).value_type(), ValueType::U64);
    assert_eq!(Value::f32_array(vec![]).value_type(), ValueType::Array);
}

#[test]
fn metadata_typed_getters() {
    let mut m = Metadata::new();
    assert!(m.is_empty());
    m.insert("general.architecture", Value::from("llama"));
    m.insert("n", Value::U64(30));
    m.insert("neg", Value::I32(-3));
    m.insert("eps", Value::F32(1e-5));
    m.insert("yes", Value::Bool(true));
    m.insert("toks", Value::string_array(vec!["a".into(), "b".into()]));
    m.insert("small", Value::Array(Array { elem_type: ValueType::U8, values: vec![Value::U8(1), Value::U8(2)] }));
    m.insert("big", Value::u32_array(vec![1, u32::MAX]));
    assert_eq!(m.len(), 8);
    assert_eq!(m.architecture(), Some("llama"));
    assert_eq!(m.get_u32("n").unwrap(), Some(30));
    assert_eq!(m.get_u64("n").unwrap(), Some(30));
    assert_eq!(m.get_f32("eps").unwrap(), Some(1e-5));
    assert_eq!(m.get_f32("n").unwrap(), Some(30.0));
    assert_eq!(m.get_bool("yes").unwrap(), Some(true));
    assert_eq!(m.get_str_array("toks").unwrap(), Some(vec!["a", "b"]));
    assert_eq!(m.get_i32_array("small").unwrap(), Some(vec![1, 2]));
    assert_eq!(m.get_f32_array("small").unwrap(), Some(vec![1.0, 2.0]));
    assert_eq!(m.get_u32("absent").unwrap(), None);
    assert_eq!(m.get_str_array("absent").unwrap(), None);

    let err = m.get_u32("neg").unwrap_err();
    assert!(matches!(err, GgufError::MetadataType { ref key, .. } if key == "neg"));
    assert!(err.to_string().contains("\"neg\""), "{err}");
    assert!(err.to_string().contains("i32 -3"), "{err}");
    let err = m.get_str("n").unwrap_err();
    assert!(err.to_string().contains("expected string, found u64 30"), "{err}");
    let err = m.get_i32_array("big").unwrap_err();
    assert!(err.to_string().contains("element 1"), "{err}");
    let err = m.get_str_array("n").unwrap_err();
    assert!(err.to_string().contains("array of strings"), "{err}");
    assert!(m.get_bool("n").is_err());

    assert_eq!(m.remove("n"), Some(Value::U64(30)));
    assert_eq!(m.get("n"), None);
    assert_eq!(m.get_bool("yes").unwrap(), Some(true));
    assert_eq!(m.iter().nth(1).map(|(k, _)| k), Some("neg"));
}

#[test]
fn value_display_is_readable() {
    assert_eq!(Value::from("a\"b").to_string(), "\"a\\\"b\"");
    let long = Value::i32_array((0..20).collect());
    assert_eq!(long.to_string(), "[0, 1, 2, 3, 4, 5, 6, 7, ... (20 i32 in all)]");
}

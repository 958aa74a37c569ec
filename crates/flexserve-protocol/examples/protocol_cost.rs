//! Prints what the world boundary costs: encoding and decoding typical
//! messages, a request/reply round trip over a Unix socket pair, and copying
//! bulk data in and out of the shared buffer.
//!
//! `cargo run --release -p flexserve-protocol --example protocol_cost`

use std::hint::black_box;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use flexserve_protocol::{
    decode_reply, decode_request, encode_reply, encode_request, read_reply, read_request, write_reply, write_request,
    BufferRange, GenerateRequest, Input, Reply, Request, Sampling, SharedBuffer,
};

fn per_op(label: &str, iterations: u32, mut op: impl FnMut()) {
    let start = Instant::now();
    for _ in 0..iterations {
        op();
    }
    let nanos = start.elapsed().as_nanos() as f64 / f64::from(iterations);
    println!("{label:<52} {nanos:>10.0} ns");
}

fn main() {
    let generate = Request::Generate(GenerateRequest {
        model: 1,
        conversation: 2,
        input: Input::ChatTurn { system: Some("You are a helpful assistant.".into()), user: "Hello! ".repeat(100) },
        max_tokens: 256,
        n_ctx: 0,
        sampling: Sampling {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 42,
        },
        stop: vec!["<|im_end|>".into()],
    });
    let token = Reply::Token { text: " world".into() };
    let generate_bytes = encode_request(&generate).unwrap();

    println!("Generate request payload: {} bytes", generate_bytes.len());
    per_op("encode Generate (chat turn)", 200_000, || {
        black_box(encode_request(black_box(&generate)).unwrap());
    });
    per_op("decode Generate", 200_000, || {
        black_box(decode_request(black_box(&generate_bytes)).unwrap());
    });
    per_op("encode + decode Token", 1_000_000, || {
        black_box(decode_reply(&encode_reply(black_box(&token)).unwrap()).unwrap());
    });

    let (mut client, mut server) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        while let Ok(request) = read_request(&mut server) {
            if request == Request::Shutdown {
                break;
            }
            write_reply(&mut server, &Reply::Token { text: " world".into() }).unwrap();
        }
    });
    per_op("Status -> Token round trip over a socket pair", 20_000, || {
        write_request(&mut client, &Request::Status).unwrap();
        black_box(read_reply(&mut client).unwrap());
    });
    write_request(&mut client, &Request::Shutdown).unwrap();
    echo.join().unwrap();

    let len = 64 << 20;
    let mut buf = SharedBuffer::create(len).unwrap();
    let data = vec![0x5au8; len];
    let mut out = vec![0u8; len];
    for pass in 0..2 {
        let start = Instant::now();
        buf.copy_in(0, &data).unwrap();
        let copy_in = start.elapsed();
        let start = Instant::now();
        buf.copy_out(0, &mut out).unwrap();
        let copy_out = start.elapsed();
        let gbps = |d: std::time::Duration| len as f64 / d.as_secs_f64() / 1e9;
        println!(
            "shared buffer 64 MiB, pass {pass}: copy_in {:.2} GB/s, copy_out {:.2} GB/s",
            gbps(copy_in),
            gbps(copy_out)
        );
    }
    assert_eq!(out, data);
    black_box(buf.copy_out_vec(BufferRange { offset: 0, len: 16 }).unwrap());
}

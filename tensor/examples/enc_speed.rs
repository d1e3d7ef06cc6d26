//! Speed of the wire encodings on this machine: `cargo run --release -p parasync-tensor --example enc_speed`.
//! "whole" converts one 64 MiB tensor at once; "pieces" converts it 256 Ki elements at a
//! time through a reused buffer, as the data plane does (the wire side stays in cache).
fn main() {
    use parasync_tensor::*;
    let n = 16 << 20;
    let piece = 256 << 10;
    let v: Vec<f32> = (0..n).map(|i| (i as f32) * 0.001).collect();
    let mut out = Vec::with_capacity(n * 4);
    let mut dec = vec![0f32; n];
    let gbs = |secs: f64| (n * 4) as f64 / secs / 1e9;
    for dtype in [DType::F32, DType::Bf16] {
        let t = std::time::Instant::now();
        for _ in 0..5 {
            out.clear();
            encode_f32(&v, dtype, &mut out);
        }
        let e = t.elapsed().as_secs_f64() / 5.0;
        let t = std::time::Instant::now();
        for _ in 0..5 {
            decode_into_checked(&out, dtype, &mut dec).unwrap();
        }
        let d = t.elapsed().as_secs_f64() / 5.0;
        let mut scratch = Vec::with_capacity(piece * 4);
        let t = std::time::Instant::now();
        for _ in 0..5 {
            for c in v.chunks(piece) {
                scratch.clear();
                encode_f32(c, dtype, &mut scratch);
            }
        }
        let ep = t.elapsed().as_secs_f64() / 5.0;
        let wire_piece = out[..piece * dtype.size()].to_vec();
        let t = std::time::Instant::now();
        for _ in 0..5 {
            for c in dec.chunks_mut(piece) {
                decode_into_checked(&wire_piece, dtype, c).unwrap();
            }
        }
        let dp = t.elapsed().as_secs_f64() / 5.0;
        println!(
            "{dtype}: whole: encode {:.2} GB/s, decode+check {:.2} GB/s; pieces: encode {:.2} GB/s, decode+check {:.2} GB/s (of f32 values)",
            gbs(e), gbs(d), gbs(ep), gbs(dp)
        );
    }
}

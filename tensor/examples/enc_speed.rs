//! Speed of the wire encodings on this machine: `cargo run --release -p parasync-tensor --example enc_speed`.
fn main() {
    use parasync_tensor::*;
    let n = 16 << 20;
    let v: Vec<f32> = (0..n).map(|i| (i as f32) * 0.001).collect();
    let mut out = Vec::with_capacity(n * 4);
    let mut dec = vec![0f32; n];
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
        println!("{dtype}: encode {:.2} GB/s, decode+check {:.2} GB/s (of f32 values)", (n * 4) as f64 / e / 1e9, (n * 4) as f64 / d / 1e9);
    }
}

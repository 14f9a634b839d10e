//! Measures sha256 throughput of the manifest hasher on one file: `cargo run --release --example sha_speed FILE`.
fn main() {
    let p = std::env::args().nth(1).expect("FILE");
    let t = std::time::Instant::now();
    let (n, h) = mmfuser_convert::manifest::sha256_file(std::path::Path::new(&p)).unwrap();
    let s = t.elapsed().as_secs_f64();
    println!("{h} {n} bytes in {s:.2} s = {:.2} GB/s", n as f64 / s / 1e9);
}

//! sha256 throughput, the manifest's cost: `cargo run --release --example sha_speed FILE` hashes a
//! file as the manifest does; `... sha_speed mem` hashes 4 GB from memory (cache-hot 1 MiB and
//! cache-cold 256 MiB buffers), the CPU's own limit.
use sha2::{Digest, Sha256};

fn main() {
    let p = std::env::args().nth(1).expect("FILE or 'mem'");
    if p == "mem" {
        for size in [1usize << 20, 256 << 20] {
            let buf: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let total = 4usize << 30;
            let t = std::time::Instant::now();
            let mut h = Sha256::new();
            for _ in 0..total / size {
                h.update(&buf);
            }
            let _ = h.finalize();
            let s = t.elapsed().as_secs_f64();
            println!(
                "buffer {:>4} MiB: {:.2} GB/s",
                size >> 20,
                total as f64 / s / 1e9
            );
        }
        return;
    }
    let t = std::time::Instant::now();
    let (n, h) = mmfuser_convert::ground::digest::sha256_file(std::path::Path::new(&p)).unwrap();
    let s = t.elapsed().as_secs_f64();
    println!("{h} {n} bytes in {s:.2} s = {:.2} GB/s", n as f64 / s / 1e9);
}

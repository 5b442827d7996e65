//! Prints the WGSL matmul's GFLOP/s on the native adapter: `cargo run --release -p ipaflux-gpu --example matmul_gflops [n]`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let ctx = ipaflux_gpu::GpuContext::new_blocking(&Default::default())?;
    let t0 = std::time::Instant::now();
    let now = || t0.elapsed().as_secs_f64() * 1e3;
    for f in ipaflux_gpu::WeightFormat::ALL {
        let g = pollster::block_on(ipaflux_gpu::bench::matmul_gflops(&ctx, n, f, 3, now))?;
        println!("{} matmul {n}³ {f}: {g:.2} GFLOP/s", ctx.adapter());
    }
    Ok(())
}

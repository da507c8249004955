//! Criterion benchmarks (filled in with the benchmark harness).
fn main() {}

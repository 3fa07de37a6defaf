//! `stoa bench`: load generator over real WebSocket connections (placeholder until it lands).

/// Arguments of `stoa bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

/// Run a benchmark.
pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("stoa bench is not built yet")
}

pub async fn run(_d: std::time::Duration) -> anyhow::Result<()> { anyhow::bail!("todo") }

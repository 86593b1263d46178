//! crdgen: prints the OrlyRelay CRD as YAML (`cargo run -p orly-operator --bin crdgen > crds/orlyrelay.yaml`).

fn main() -> anyhow::Result<()> {
    print!("{}", orly_operator::crd::crd_yaml()?);
    Ok(())
}

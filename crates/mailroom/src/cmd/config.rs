//! `mailroom config`: the effective settings, as TOML, secrets redacted.

use std::path::Path;

use mailroom_core::settings::Settings;

/// Prints the settings that `path`, `mailroom.toml` and the environment make.
pub fn run(path: Option<&Path>) -> anyhow::Result<()> {
    let settings = Settings::load(path)?;
    // Secrets serialize redacted, so the whole document is safe to print.
    print!("{}", toml::to_string_pretty(&settings)?);
    match settings.keyring() {
        Ok(ring) => println!(
            "\n# seal: keys loaded: {}; sealing with {}",
            ring.kids().collect::<Vec<_>>().join(", "),
            ring.active().kid()
        ),
        Err(err) => println!("\n# seal: not usable: {err}"),
    }
    Ok(())
}

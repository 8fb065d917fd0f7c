//! The `adt` command line: a thin layer over the library.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "adt", version, about = "Adversarial Diffusion Tuning for Stable Diffusion models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model with ADT (or the plain FT baseline).
    Train {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a configuration value, e.g. --set train.lr_g=1e-5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the effective configuration (with defaults) and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Describe a diffusers pipeline folder, a component folder or a .safetensors file.
    Inspect {
        path: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Train { config, set, print_config } => {
            let cfg = adt::train::config::Config::load(config.as_deref(), &set)?;
            if print_config {
                print!("{}", cfg.to_toml()?);
                return Ok(());
            }
            anyhow::bail!("training is not available in this build");
        }
        Command::Inspect { path } => {
            print!("{}", adt::inspect::inspect(&path)?);
        }
    }
    Ok(())
}

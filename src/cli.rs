//! The command line (SPEC §9): `serve`, `token`, `gen-cert`, `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError};

#[derive(Parser)]
#[command(
    name = "imgate",
    version,
    about = "A real-time gateway for instant-messaging backends"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (no --config: the dev profile on the embedded default).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Issue an HS256 token signed with the configured (or dev) secret.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        platform: Option<String>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Write a self-signed ECDSA P-256 development certificate (cert.pem, key.pem).
    GenCert {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
    },
    /// Load and validate a config file; exit 2 naming the key when it is wrong.
    CheckConfig { file: PathBuf },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::duration::parse(s)
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ConfigError> {
    Config::load(path, std::env::vars())
}

fn config_error(e: ConfigError) -> ExitCode {
    eprintln!("imgate: configuration error: {e}");
    ExitCode::from(2)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            let warnings = match cfg.validate() {
                Ok(w) => w,
                Err(e) => return config_error(e),
            };
            crate::ops::logging::init(&cfg.log);
            for w in warnings {
                tracing::warn!("{w}");
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("imgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(async {
                let running = crate::app::start(cfg).await?;
                running.run_until_signal().await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("imgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token {
            user,
            device,
            platform,
            ttl,
            config,
        } => {
            let cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            let Some(secret) = cfg.jwt_secret() else {
                eprintln!("imgate: no HS256 secret configured (auth.jwt_secret)");
                return ExitCode::from(2);
            };
            match crate::auth::jwt::issue_hs256(
                &secret,
                &user,
                device.as_deref(),
                platform.as_deref(),
                ttl,
            ) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("imgate: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::GenCert { out } => match crate::tls::write_dev_cert(&out) {
            Ok((cert, key)) => {
                println!("wrote {} and {}", cert.display(), key.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("imgate: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::CheckConfig { file } => {
            match load(Some(&file)).and_then(|c| c.validate().map(|w| (c, w))) {
                Ok((cfg, warnings)) => {
                    for w in warnings {
                        eprintln!("warning: {w}");
                    }
                    println!("{}: ok (profile {})", file.display(), cfg.profile.as_str());
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(e),
            }
        }
    }
}

//! `flexserve client`: a plain OpenAI-compatible endpoint on this machine
//! that forwards every chat through an encrypted session to a daemon's secure
//! world (docs/encrypted-sessions.md). The daemon sees sizes and timing only.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct ClientArgs {
    /// The daemon (`flexserve serve`) to talk to, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
    /// Address of the local endpoint (loopback only: it carries plaintext).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port of the local endpoint (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8081)]
    port: u16,
    /// The daemon's API key.
    #[arg(long, env = "FLEXSERVE_API_KEY", hide_env_values = true, conflicts_with = "api_key_file")]
    api_key: Option<String>,
    /// Read the daemon's API key from this file.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// The secure world's identity key (Ed25519, hex), given out of band, instead of the one pinned
    /// on first use in $FLEXSERVE_HOME/pins/.
    #[arg(long)]
    expect: Option<String>,
}

/// The pin file of a daemon: one per address, so two servers never share a pin.
pub(crate) fn pin_path(server: &str) -> Result<PathBuf> {
    let name: String = server
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect();
    Ok(flexserve_normal::flexserve_home()?.join("pins").join(format!("{name}.pin")))
}

pub fn run(args: ClientArgs) -> Result<()> {
    let api_key = match (&args.api_key, &args.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?.trim().to_string())
        }
        (None, None) => None,
    };
    let config = flexserve_client::proxy::ProxyConfig {
        pin_path: pin_path(&args.server)?,
        server: args.server,
        api_key,
        expect: args.expect,
        listen: SocketAddr::new(args.host, args.port),
    };
    flexserve_client::proxy::serve(config, |identity, local| {
        eprintln!("flexserve client: secure world identity {} ({})", identity.key, identity.pin_note);
        println!("listening on http://{local}");
    })
    .map_err(anyhow::Error::msg)
}

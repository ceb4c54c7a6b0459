//! `wb-host-agent --listen ADDR [--data-dir DIR]`: runs a waterbear host agent.

use clap::Parser;
use waterbear_vmm::agent::{HostAgentArgs, run_host_agent};

#[derive(Parser)]
#[command(about = "waterbear host agent: owns this host's VMs")]
struct Cli {
    #[command(flatten)]
    agent: HostAgentArgs,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run_host_agent(cli.agent.into_config()) {
        eprintln!("wb-host-agent: {e}");
        std::process::exit(1);
    }
}

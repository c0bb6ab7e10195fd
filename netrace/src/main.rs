use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};
use netrace::{
    cli::{Cli, Command},
    error::{exit, UsageError},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "netrace",
                &mut std::io::stdout(),
            );
            Ok(exit::CLEAN)
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map(|()| exit::CLEAN)
            .map_err(anyhow::Error::from),
        Command::Probe(args) => netrace::probe::run(&args),
        Command::Watch(args) => match args.validate() {
            Err(e) => Err(anyhow::Error::new(e)),
            Ok(cfg) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(netrace::watch::run(cfg))),
        },
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line: what went wrong, and (in usage errors) what to do.
            if e.downcast_ref::<UsageError>().is_some() {
                eprintln!("netrace: {e}");
            } else {
                eprintln!("netrace: error: {e:#}");
            }
            ExitCode::from(exit::ERROR)
        }
    }
}

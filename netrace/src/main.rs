use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};
use netrace::{
    analyze::AnalyzeConfig,
    cli::{Cli, Command},
    error::{exit, UsageError},
    probe::ProbeConfig,
    watch::WatchConfig,
};

/// A command-line error as one line on standard error (clap's own rendering spans several
/// lines: the error, possible values or a tip, usage, "For more information").
fn usage_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect();
    format!("{}; see --help", parts.join("; "))
}

/// The standard logger on standard error, one line per message (`netrace: warning: ...`).
/// `RUST_LOG` (e.g. `netrace=debug,aya=info`) wins over `-v`.
fn init_logging(verbose: u8) {
    use std::io::Write as _;
    let mut b = env_logger::Builder::new();
    b.filter_level(log::LevelFilter::Warn);
    match verbose {
        0 => {}
        1 => {
            b.filter_module("netrace", log::LevelFilter::Info);
        }
        2 => {
            b.filter_module("netrace", log::LevelFilter::Debug);
        }
        _ => {
            b.filter_level(log::LevelFilter::Trace);
        }
    }
    b.parse_env(env_logger::Env::default())
        .format(|buf, record| {
            let level = match record.level() {
                log::Level::Error => "error",
                log::Level::Warn => "warning",
                log::Level::Info => "info",
                log::Level::Debug => "debug",
                log::Level::Trace => "trace",
            };
            writeln!(buf, "netrace: {level}: {}", record.args())
        })
        .init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version go to standard output with status 0.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(exit::CLEAN);
        }
        // Bare `netrace`: the help, on standard error.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(exit::ERROR);
        }
        Err(e) => {
            eprintln!("netrace: {}", usage_line(&e));
            return ExitCode::from(exit::ERROR);
        }
    };
    init_logging(cli.verbose);
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
        Command::Man { command, out_dir } => {
            netrace::render::man::run(command.as_deref(), out_dir.as_deref())
        }
        Command::Check(args) => netrace::node::check::run(&args),
        Command::Probe(args) => ProbeConfig::from_args(&args)
            .map_err(anyhow::Error::new)
            .and_then(|cfg| netrace::probe::run(&cfg)),
        Command::Analyze(args) => AnalyzeConfig::from_args(&args)
            .map_err(anyhow::Error::new)
            .and_then(netrace::analyze::run),
        Command::Fleet(args) => netrace::fleet::run(&args),
        Command::Watch(args) => match WatchConfig::from_args(&args) {
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

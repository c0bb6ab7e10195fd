//! `netrace man`: one man page per subcommand (netrace.1, netrace-watch.1, ...).

use std::path::Path;

use clap::CommandFactory as _;

use crate::{cli::Cli, error::exit, error::UsageError, files};

/// The pages: (file name, roff).
fn pages() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let top = Cli::command();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    clap_mangen::Man::new(top.clone()).render(&mut buf)?;
    out.push(("netrace.1".to_string(), buf));
    for sub in top.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("netrace-{}", sub.get_name());
        let cmd = sub
            .clone()
            .name(name.clone())
            .bin_name(name.replace('-', " "));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut buf)?;
        out.push((format!("{name}.1"), buf));
    }
    Ok(out)
}

/// Prints netrace(1) or netrace-COMMAND(1), or writes every page into `out_dir`.
pub fn run(command: Option<&str>, out_dir: Option<&Path>) -> anyhow::Result<u8> {
    let pages = pages()?;
    if let Some(dir) = out_dir {
        if !dir.is_dir() {
            return Err(UsageError(format!(
                "--out-dir: directory {} does not exist",
                dir.display()
            ))
            .into());
        }
        for (file, roff) in &pages {
            files::write_new(&dir.join(file), roff)?;
        }
        return Ok(exit::CLEAN);
    }
    let want = match command {
        Some(c) => format!("netrace-{c}.1"),
        None => "netrace.1".to_string(),
    };
    let Some((_, roff)) = pages.iter().find(|(f, _)| *f == want) else {
        let names: Vec<&str> = pages
            .iter()
            .filter_map(|(f, _)| f.strip_prefix("netrace-")?.strip_suffix(".1"))
            .collect();
        return Err(UsageError(format!(
            "no subcommand '{}'; man pages exist for {}",
            command.unwrap_or_default(),
            names.join(", ")
        ))
        .into());
    };
    use std::io::Write as _;
    std::io::stdout().write_all(roff)?;
    Ok(exit::CLEAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_subcommand() {
        let pages = pages().unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "netrace.1",
            "netrace-watch.1",
            "netrace-probe.1",
            "netrace-check.1",
            "netrace-man.1",
        ] {
            assert!(names.contains(&want), "{names:?}");
        }
        let watch = pages
            .iter()
            .find(|(n, _)| n == "netrace-watch.1")
            .map(|(_, r)| String::from_utf8_lossy(r).into_owned())
            .unwrap_or_default();
        assert!(watch.contains("netrace\\-watch"), "{watch}");
        assert!(watch.contains("interval"), "{watch}");
    }
}

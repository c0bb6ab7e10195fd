//! `netrace check`: its arguments.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The uplink to look at. Default: the interface carrying the default route.
    #[arg(short, long = "iface", value_name = "IFACE")]
    pub iface: Option<String>,

    /// Where the node's procfs is mounted (default: /host/proc when mounted, else /proc).
    #[arg(long, value_name = "DIR")]
    pub procfs: Option<PathBuf>,

    /// The host's cgroup2 tree, when running in a pod (e.g. /host/sys/fs/cgroup).
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
}

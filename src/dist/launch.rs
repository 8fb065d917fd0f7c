//! How a rank learns who it is: torchrun's or SLURM's environment, or
//! `adt train --nproc N`, which starts N local ranks itself.

use anyhow::{bail, Context, Result};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A rank's place in the job and the rendezvous address (rank 0 hosts the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// "torchrun", "slurm" or "adt --nproc".
    pub launcher: &'static str,
}

/// torchrun's default port, also the default here.
pub const DEFAULT_PORT: u16 = 29500;

fn parse<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    key: &str,
) -> Result<Option<T>> {
    match get(key) {
        None => Ok(None),
        Some(v) => {
            v.trim().parse().map(Some).map_err(|_| {
                anyhow::anyhow!("environment variable {key}={v:?} is not a valid number")
            })
        }
    }
}

/// The first host of a SLURM node list: `gpu[003-006,9],login1` -> `gpu003`.
pub fn first_slurm_host(list: &str) -> Option<String> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    let end = list.find(',').unwrap_or(list.len());
    let first = match list.find('[') {
        Some(b) if b < end => {
            let prefix = &list[..b];
            let inner = &list[b + 1..list[b..].find(']').map(|i| b + i)?];
            let first_range = inner.split(',').next()?;
            let lo = first_range.split('-').next()?;
            format!("{prefix}{lo}")
        }
        _ => list[..end].to_string(),
    };
    Some(first)
}

impl Launch {
    /// From the process environment; None for a one-process run.
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(&|k| std::env::var(k).ok())
    }

    /// From the variables `get` returns. torchrun's (RANK, WORLD_SIZE) win over
    /// SLURM's (SLURM_PROCID, SLURM_NTASKS); a world of 1 is a one-process run.
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let port_default = |get: &dyn Fn(&str) -> Option<String>| -> Result<u16> {
            Ok(parse::<u16>(get, "MASTER_PORT")?.unwrap_or(DEFAULT_PORT))
        };
        if let (Some(rank), Some(world)) = (
            parse::<usize>(get, "RANK")?,
            parse::<usize>(get, "WORLD_SIZE")?,
        ) {
            if world <= 1 {
                return Ok(None);
            }
            if rank >= world {
                bail!("RANK={rank} is not below WORLD_SIZE={world}");
            }
            let launcher = if get("ADT_NPROC_CHILD").is_some() {
                "adt --nproc"
            } else {
                "torchrun"
            };
            return Ok(Some(Launch {
                rank,
                world,
                local_rank: parse(get, "LOCAL_RANK")?.unwrap_or(rank),
                master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port: port_default(get)?,
                launcher,
            }));
        }
        if let (Some(rank), Some(world)) = (
            parse::<usize>(get, "SLURM_PROCID")?,
            parse::<usize>(get, "SLURM_NTASKS")?,
        ) {
            if world <= 1 {
                return Ok(None);
            }
            if rank >= world {
                bail!("SLURM_PROCID={rank} is not below SLURM_NTASKS={world}");
            }
            let master_addr = match get("MASTER_ADDR") {
                Some(a) => a,
                None => {
                    let list = get("SLURM_JOB_NODELIST")
                        .or_else(|| get("SLURM_NODELIST"))
                        .context("SLURM: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")?;
                    first_slurm_host(&list).with_context(|| {
                        format!("SLURM_JOB_NODELIST={list:?}: cannot read its first host")
                    })?
                }
            };
            // Without MASTER_PORT, a port derived from the job id keeps two jobs on
            // one node apart.
            let master_port = match parse::<u16>(get, "MASTER_PORT")? {
                Some(p) => p,
                None => match parse::<u64>(get, "SLURM_JOB_ID")? {
                    Some(id) => 20000 + (id % 20000) as u16,
                    None => DEFAULT_PORT,
                },
            };
            return Ok(Some(Launch {
                rank,
                world,
                local_rank: parse(get, "SLURM_LOCALID")?.unwrap_or(0),
                master_addr,
                master_port,
                launcher: "slurm",
            }));
        }
        Ok(None)
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free local port")?;
    Ok(l.local_addr()?.port())
}

/// Run `args` (this program's arguments without `--nproc`) as `n` local ranks and
/// wait for them. Each gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
/// MASTER_PORT and its share of the CPU cores as OMP_NUM_THREADS (unless set), with
/// a passive OpenMP wait policy. When a rank fails, the others are given
/// `grace` to notice and exit on their own, then stopped.
pub fn spawn_local(n: usize, args: &[String], grace: Duration) -> Result<()> {
    if n == 0 {
        bail!("--nproc must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the adt executable")?;
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p,
        Err(_) => free_port()?.to_string(),
    };
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    let threads = (cores / n).max(1).to_string();
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(n);
    for r in 0..n {
        let mut c = Command::new(&exe);
        c.args(args)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env("ADT_NPROC_CHILD", "1");
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            c.env("OMP_NUM_THREADS", &threads);
        }
        if std::env::var_os("OMP_WAIT_POLICY").is_none() {
            c.env("OMP_WAIT_POLICY", "PASSIVE");
        }
        let child = c
            .spawn()
            .with_context(|| format!("starting rank {r} ({})", exe.display()))?;
        children.push((r, child));
    }
    let mut failures: Vec<String> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait()? {
                Some(status) => {
                    let (r, _) = children.remove(i);
                    if !status.success() {
                        failures.push(format!("rank {r} {status}"));
                        first_failure.get_or_insert_with(Instant::now);
                    }
                }
                None => i += 1,
            }
        }
        if let Some(t) = first_failure {
            if t.elapsed() > grace {
                for (r, c) in &mut children {
                    let _ = c.kill();
                    failures.push(format!("rank {r} stopped after the failure of another"));
                }
                for (_, c) in &mut children {
                    let _ = c.wait();
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !failures.is_empty() {
        bail!(
            "{} of {n} ranks failed: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_variables() {
        let l = Launch::from_vars(&env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank), (3, 8, 3));
        assert_eq!((l.master_addr.as_str(), l.master_port), ("node7", 1234));
        assert_eq!(l.launcher, "torchrun");
        assert!(
            Launch::from_vars(&env(&[("RANK", "0"), ("WORLD_SIZE", "1")]))
                .unwrap()
                .is_none()
        );
        assert!(Launch::from_vars(&env(&[("RANK", "2"), ("WORLD_SIZE", "2")])).is_err());
        assert!(Launch::from_vars(&env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).is_err());
    }

    #[test]
    fn slurm_variables() {
        let l = Launch::from_vars(&env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[003-006,9],login1"),
            ("SLURM_JOB_ID", "4242"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank), (5, 16, 1));
        assert_eq!(l.master_addr, "gpu003");
        assert_eq!(l.master_port, 24242);
        let l = Launch::from_vars(&env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "a1,a2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29600"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.master_addr.as_str(), l.master_port), ("10.0.0.1", 29600));
        assert_eq!(first_slurm_host("n1"), Some("n1".into()));
        assert_eq!(first_slurm_host("n[10-12]"), Some("n10".into()));
    }
}

//! Rank, world size and rendezvous address from the variables launchers already set
//! (a pure function of a variable lookup, so it is tested without touching the process).
//!
//! Looked at in this order:
//! 1. `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` (torchrun, Kubeflow PyTorchJob);
//! 2. `TF_CONFIG` (TFJob / MultiWorkerMirroredStrategy): ranks are the `chief` then the
//!    `worker` tasks in order; the rendezvous is the first of them (its host, and
//!    `MASTER_PORT` if set, else the port listed there);
//! 3. `SLURM_PROCID`, `SLURM_NTASKS` (srun): the rendezvous is on the first node of
//!    `SLURM_STEP_NODELIST` (else `SLURM_JOB_NODELIST`, `SLURM_NODELIST`), where srun puts
//!    task 0, unless `MASTER_ADDR` says otherwise; its port is `MASTER_PORT`, else
//!    15000 + `SLURM_JOB_ID` mod 20000.
//!
//! `MASTER_PORT` defaults to 29500 (as in torchrun). Under torchrun, whose agent already
//! listens on `MASTER_PORT` (`TORCHELASTIC_USE_AGENT_STORE=True`), the rendezvous takes
//! `MASTER_PORT + 1`. `PARASYNC_MASTER_PORT` overrides both. The job token comes from
//! `PARASYNC_JOB_TOKEN`, else from the launcher's job id.

use crate::error::{Error, Result};

/// Default rendezvous port, as torchrun's.
pub const DEFAULT_PORT: u16 = 29500;

/// Where this process stands in the job, as the launcher described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchInfo {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// `host:port` of rank 0's rendezvous.
    pub master: String,
    /// The job token to present.
    pub token: String,
    /// Which convention the values came from (`torchrun`, `tf_config`, `slurm`).
    pub source: &'static str,
}

fn num(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    match get(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Env(format!("{name}={v:?} is not a non-negative integer"))),
    }
}

fn port(get: &impl Fn(&str) -> Option<String>) -> Result<Option<u16>> {
    let parse = |name: &str, v: String| {
        v.trim()
            .parse::<u16>()
            .map_err(|_| Error::Env(format!("{name}={v:?} is not a port")))
    };
    if let Some(v) = get("PARASYNC_MASTER_PORT") {
        return parse("PARASYNC_MASTER_PORT", v).map(Some);
    }
    let Some(v) = get("MASTER_PORT") else {
        return Ok(None);
    };
    let port = parse("MASTER_PORT", v)?;
    // torchrun's agent already listens on MASTER_PORT (its store for torch.distributed):
    // every rank takes the next port instead.
    if get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return port
            .checked_add(1)
            .map(Some)
            .ok_or_else(|| Error::Env("MASTER_PORT=65535 leaves no port next to torchrun's store".into()));
    }
    Ok(Some(port))
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn token(get: &impl Fn(&str) -> Option<String>) -> String {
    for var in ["PARASYNC_JOB_TOKEN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"] {
        if let Some(t) = get(var).filter(|t| !t.is_empty()) {
            return t;
        }
    }
    "parasync".to_string()
}

fn check(rank: usize, world: usize) -> Result<()> {
    if world == 0 || rank >= world {
        return Err(Error::Env(format!(
            "rank {rank} does not fit a world of {world}"
        )));
    }
    Ok(())
}

/// The first host of a Slurm host list: `node7`, `n[01-04,07]` (→ `n01`), `a[1-2]-ib[3-4]`
/// (→ `a1-ib3`), `x,y[1-3]` (→ `x`). None if it is not one.
pub fn first_host(list: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = list.trim().chars();
    while let Some(c) = chars.next() {
        match c {
            ',' => break,
            '[' => {
                let inner: String = chars.by_ref().take_while(|&c| c != ']').collect();
                let first = inner.split([',', '-']).next().unwrap_or("").trim();
                if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                out.push_str(first);
            }
            ']' => return None,
            c if c.is_whitespace() => return None,
            c => out.push(c),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The rendezvous port of a Slurm job without `MASTER_PORT`: derived from `SLURM_JOB_ID`
/// (15000 + id mod 20000), so that two jobs sharing a node do not collide; else the default.
fn slurm_port(get: &impl Fn(&str) -> Option<String>) -> Result<u16> {
    Ok(match num(get, "SLURM_JOB_ID")? {
        Some(id) => 15_000 + (id % 20_000) as u16,
        None => DEFAULT_PORT,
    })
}

/// Reads the launch description through `get` (a variable lookup such as `std::env::var`).
pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<LaunchInfo> {
    let token = token(&get);
    match (num(&get, "RANK")?, num(&get, "WORLD_SIZE")?) {
        (Some(_), None) => return Err(Error::Env("RANK is set but WORLD_SIZE is not".into())),
        (None, Some(_)) => return Err(Error::Env("WORLD_SIZE is set but RANK is not".into())),
        _ => {}
    }
    if let (Some(rank), Some(world)) = (num(&get, "RANK")?, num(&get, "WORLD_SIZE")?) {
        check(rank, world)?;
        let host = get("MASTER_ADDR").ok_or_else(|| {
            Error::Env("RANK and WORLD_SIZE are set but MASTER_ADDR is not".into())
        })?;
        let master = join_host_port(&host, port(&get)?.unwrap_or(DEFAULT_PORT));
        return Ok(LaunchInfo {
            rank,
            world_size: world,
            master,
            token,
            source: "torchrun",
        });
    }
    if let Some(tf) = get("TF_CONFIG") {
        return from_tf_config(&tf, port(&get)?, token);
    }
    if let (Some(rank), Some(world)) = (num(&get, "SLURM_PROCID")?, num(&get, "SLURM_NTASKS")?) {
        check(rank, world)?;
        // srun places task 0 on the first node of the step.
        let host = match get("MASTER_ADDR") {
            Some(h) => h,
            None => {
                let list = ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"].iter().find_map(|v| get(v));
                let list = list.ok_or_else(|| Error::Env("Slurm job without a node list: set MASTER_ADDR to the host of rank 0".into()))?;
                first_host(&list).ok_or_else(|| {
                    Error::Env(format!("Slurm node list {list:?} is not a host list: set MASTER_ADDR to the host of rank 0"))
                })?
            }
        };
        let port = match port(&get)? {
            Some(p) => p,
            None => slurm_port(&get)?,
        };
        return Ok(LaunchInfo {
            rank,
            world_size: world,
            master: join_host_port(&host, port),
            token,
            source: "slurm",
        });
    }
    Err(Error::Env("no launcher variables: set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, TF_CONFIG, or run under Slurm".into()))
}

/// Reads the launch description from this process's environment.
pub fn from_env() -> Result<LaunchInfo> {
    from_vars(|k| std::env::var(k).ok())
}

fn from_tf_config(tf: &str, master_port: Option<u16>, token: String) -> Result<LaunchInfo> {
    let v: serde_json::Value =
        serde_json::from_str(tf).map_err(|e| Error::Env(format!("TF_CONFIG is not JSON: {e}")))?;
    let list = |kind: &str| -> Vec<String> {
        v["cluster"][kind]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    // TF1-style clusters call the chief "master".
    let (chiefs, workers) = (
        [list("chief"), list("master")].concat(),
        list("worker"),
    );
    let members: Vec<&String> = chiefs.iter().chain(&workers).collect();
    if members.is_empty() {
        return Err(Error::Env("TF_CONFIG has no chief or worker tasks".into()));
    }
    let kind = v["task"]["type"]
        .as_str()
        .ok_or_else(|| Error::Env("TF_CONFIG lacks task.type".into()))?;
    let index = v["task"]["index"]
        .as_u64()
        .ok_or_else(|| Error::Env("TF_CONFIG lacks task.index".into()))? as usize;
    let rank = match kind {
        "chief" | "master" if index < chiefs.len() => index,
        "worker" if index < workers.len() => chiefs.len() + index,
        "chief" | "master" | "worker" => {
            return Err(Error::Env(format!(
                "TF_CONFIG task {kind}:{index} is not in the cluster"
            )))
        }
        other => {
            return Err(Error::Env(format!(
                "TF_CONFIG task type {other:?} does not take part in collectives"
            )))
        }
    };
    let first = members[0];
    let (host, listed) = first
        .rsplit_once(':')
        .and_then(|(h, p)| {
            p.parse::<u16>()
                .ok()
                .map(|p| (h.trim_matches(['[', ']']).to_string(), p))
        })
        .ok_or_else(|| Error::Env(format!("TF_CONFIG address {first:?} is not host:port")))?;
    let master = join_host_port(&host, master_port.unwrap_or(listed));
    Ok(LaunchInfo {
        rank,
        world_size: members.len(),
        master,
        token,
        source: "tf_config",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launcher_table() {
        let tf = r#"{"cluster":{"chief":["c0:2222"],"worker":["w0:2222","w1:2222"],"ps":["p:1"]},"task":{"type":"worker","index":1}}"#;
        type Case<'a> = (Vec<(&'a str, &'a str)>, (usize, usize, &'a str, &'a str));
        let table: Vec<Case> = vec![
            (
                vec![
                    ("RANK", "3"),
                    ("WORLD_SIZE", "8"),
                    ("MASTER_ADDR", "10.0.0.1"),
                    ("MASTER_PORT", "1234"),
                ],
                (3, 8, "10.0.0.1:1234", "torchrun"),
            ),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "h")],
                (0, 1, "h:29500", "torchrun"),
            ),
            (
                vec![
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "::1"),
                    ("MASTER_PORT", "5"),
                ],
                (1, 2, "[::1]:5", "torchrun"),
            ),
            (vec![("TF_CONFIG", tf)], (2, 3, "c0:2222", "tf_config")),
            (
                // torchrun's agent holds MASTER_PORT: the next one
                vec![
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "29400"),
                    ("TORCHELASTIC_USE_AGENT_STORE", "True"),
                ],
                (1, 2, "h:29401", "torchrun"),
            ),
            (
                vec![
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "29400"),
                    ("TORCHELASTIC_USE_AGENT_STORE", "True"),
                    ("PARASYNC_MASTER_PORT", "31000"),
                ],
                (1, 2, "h:31000", "torchrun"),
            ),
            (
                // TF1 calls the chief "master"
                vec![("TF_CONFIG", r#"{"cluster":{"master":["m0:2222"],"worker":["w0:2222"]},"task":{"type":"worker","index":0}}"#)],
                (1, 2, "m0:2222", "tf_config"),
            ),
            (
                vec![("TF_CONFIG", tf), ("MASTER_PORT", "7000")],
                (2, 3, "c0:7000", "tf_config"),
            ),
            (
                vec![
                    ("SLURM_PROCID", "5"),
                    ("SLURM_NTASKS", "6"),
                    ("MASTER_ADDR", "n1"),
                ],
                (5, 6, "n1:29500", "slurm"),
            ),
            (
                vec![
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_NODELIST", "node7"),
                ],
                (0, 2, "node7:29500", "slurm"),
            ),
            (
                // srun alone: the step's first node, a port from the job id
                vec![
                    ("SLURM_PROCID", "3"),
                    ("SLURM_NTASKS", "8"),
                    ("SLURM_JOB_ID", "123456"),
                    ("SLURM_NODELIST", "gpu[01-08]"),
                    ("SLURM_STEP_NODELIST", "gpu[03-04,07]"),
                ],
                (3, 8, "gpu03:18456", "slurm"),
            ),
            (
                vec![
                    ("SLURM_PROCID", "1"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_JOB_ID", "7"),
                    ("SLURM_JOB_NODELIST", "a,b"),
                    ("MASTER_PORT", "6000"),
                ],
                (1, 2, "a:6000", "slurm"),
            ),
        ];
        for (env, (rank, world, master, source)) in table {
            let got = from_vars(vars(&env)).unwrap_or_else(|e| panic!("{env:?}: {e}"));
            assert_eq!(
                (got.rank, got.world_size, got.master.as_str(), got.source),
                (rank, world, master, source),
                "{env:?}"
            );
        }
    }

    #[test]
    fn bad_environments_are_explained() {
        let table: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![], "no launcher variables"),
            (
                // half a torchrun environment must not fall through to Slurm's variables
                vec![("RANK", "1"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("MASTER_ADDR", "h")],
                "WORLD_SIZE is not",
            ),
            (vec![("WORLD_SIZE", "4"), ("TF_CONFIG", "{}")], "RANK is not"),
            (
                vec![("RANK", "x"), ("WORLD_SIZE", "2")],
                "not a non-negative integer",
            ),
            (
                vec![("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
                "does not fit",
            ),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2")],
                "MASTER_ADDR is not",
            ),
            (vec![("TF_CONFIG", "{")], "not JSON"),
            (
                vec![(
                    "TF_CONFIG",
                    r#"{"cluster":{"worker":["a:1"],"ps":["b:2"]},"task":{"type":"ps","index":0}}"#,
                )],
                "does not take part",
            ),
            (
                vec![
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_NODELIST", "n[x-y]"),
                ],
                "is not a host list: set MASTER_ADDR",
            ),
            (vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")], "without a node list"),
            (
                vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_NODELIST", "n1"), ("SLURM_JOB_ID", "x")],
                "SLURM_JOB_ID=\"x\" is not",
            ),
        ];
        for (env, want) in table {
            let err = from_vars(vars(&env)).unwrap_err().to_string();
            assert!(err.contains(want), "{env:?}: {err}");
        }
    }

    #[test]
    fn first_host_of_slurm_host_lists() {
        for (list, want) in [
            ("node7", Some("node7")),
            ("n[01-04,07]", Some("n01")),
            ("n[7,1-3]", Some("n7")),
            ("a[1-2]-ib[3-4]", Some("a1-ib3")),
            ("x,y[1-3]", Some("x")),
            ("rack[2]n[5-6],z", Some("rack2n5")),
            ("10.0.0.5", Some("10.0.0.5")),
            ("", None),
            ("n[", None),
            ("n[a-b]", None),
            ("n]1", None),
        ] {
            assert_eq!(first_host(list).as_deref(), want, "{list:?}");
        }
    }

    #[test]
    fn token_prefers_the_explicit_one() {
        let base = [("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "h")];
        let mut env = base.to_vec();
        env.push(("SLURM_JOB_ID", "42"));
        assert_eq!(from_vars(vars(&env)).unwrap().token, "42");
        env.push(("PARASYNC_JOB_TOKEN", "s3cret"));
        assert_eq!(from_vars(vars(&env)).unwrap().token, "s3cret");
    }
}

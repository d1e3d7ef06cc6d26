//! `parasync tls-certs`: a private certificate authority with a server and a client
//! certificate signed by it, for shards started with `--tls-cert` (and `--tls-client-ca`).
//!
//! Writes `ca.pem`, `server.pem`, `server-key.pem`, `client.pem`, `client-key.pem` (and
//! `ca-key.pem`, to sign more later); keys are readable by their owner only. The server
//! certificate names every `--host` (DNS names and IP addresses alike).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

/// Flags of `parasync tls-certs`.
#[derive(Clone, Debug, clap::Args)]
pub struct CertsArgs {
    /// Folder to write the files to (created if missing; existing files are not overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// A name or IP address clients dial the shards by (repeat for each).
    #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub hosts: Vec<String>,
    /// Days the certificates are valid.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// The civil date (year, month, day) `days` after 1970-01-01 (H. Hinnant's algorithm).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    ((yoe + era * 400 + i64::from(m <= 2)) as i32, m, d)
}

/// `offset_days` from today (UTC), as rcgen takes dates.
fn date(offset_days: i64) -> (i32, u8, u8) {
    let today = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400) as i64;
    civil(today + offset_days)
}

fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = private;
    let mut f = opts.open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Writes the authority and the certificates; returns the paths written.
pub fn run(args: &CertsArgs) -> anyhow::Result<Vec<PathBuf>> {
    if args.hosts.is_empty() || args.days == 0 {
        bail!("give at least one --host and --days of at least 1");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let ymd = |(y, m, d): (i32, u8, u8)| rcgen::date_time_ymd(y, m, d);
    let (from, until) = (ymd(date(-1)), ymd(date(i64::from(args.days))));

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "Parasync private CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (ca.not_before, ca.not_after) = (from, until);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;

    let leaf = |cn: &str, names: Vec<String>, usage: Vec<ExtendedKeyUsagePurpose>| -> anyhow::Result<(String, String)> {
        let mut p = CertificateParams::new(names).with_context(|| format!("the names of the {cn} certificate"))?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = usage;
        (p.not_before, p.not_after) = (from, until);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    // The server certificate serves collective ranks too, which are servers and clients
    // of each other.
    let both = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let (server, server_key) = leaf("parasync server", args.hosts.clone(), both)?;
    let (client, client_key) = leaf("parasync client", Vec::new(), vec![ExtendedKeyUsagePurpose::ClientAuth])?;

    let files = [
        ("ca.pem", ca_cert.pem(), false),
        ("ca-key.pem", ca_key.serialize_pem(), true),
        ("server.pem", server, false),
        ("server-key.pem", server_key, true),
        ("client.pem", client, false),
        ("client-key.pem", client_key, true),
    ];
    if let Some((name, ..)) = files.iter().find(|(name, ..)| args.out.join(name).exists()) {
        bail!("{} already exists: choose another --out", args.out.join(name).display());
    }
    let mut written = Vec::new();
    for (name, pem, private) in files {
        let path = args.out.join(name);
        write(&path, &pem, private)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::civil;

    #[test]
    fn days_since_the_epoch_are_civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_790), (2026, 12, 3));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(-1), (1969, 12, 31));
    }
}

//! `--config file.toml` for every server binary (DESIGN.md §11).
//!
//! The file's keys are flag names (`data-dir` or `data_dir`), its values
//! strings, numbers, booleans or arrays (joined with commas). Precedence, from
//! strongest: command-line flags, `SKV_*` environment variables, the file, the
//! built-in defaults. An unknown key fails like an unknown flag would.
//!
//! A binary may also own named tables of the file (the proxy's `[tenants.<ns>]`):
//! [`parse_with_sections`] leaves them alone and returns the file's path, so the
//! binary reads them itself. Any other table is an error.

use anyhow::Context;
use std::ffi::OsString;
use std::path::PathBuf;

/// Parses `C` from the process arguments, honouring `--config FILE` (or `SKV_CONFIG`).
pub fn parse<C: clap::Parser>() -> C {
    parse_with_sections(&[]).0
}

/// Like [`parse`], leaving the tables named in `sections` to the caller, with the
/// config file's path (if any) to read them from.
pub fn parse_with_sections<C: clap::Parser>(sections: &[&str]) -> (C, Option<PathBuf>) {
    match expand_with_sections(
        std::env::args_os().collect(),
        |k| std::env::var_os(k).is_some(),
        sections,
    ) {
        Ok((args, file)) => (C::parse_from(args), file),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Rewrites `args`: removes `--config FILE`, and inserts `--flag value` for each
/// key of FILE that is neither on the command line nor set in the environment
/// (`env_set("SKV_FLAG_NAME")`).
pub fn expand(args: Vec<OsString>, env_set: impl Fn(&str) -> bool) -> anyhow::Result<Vec<OsString>> {
    expand_with_sections(args, env_set, &[]).map(|(args, _)| args)
}

/// [`expand`], skipping the tables named in `sections`; also returns the file's path.
pub fn expand_with_sections(
    args: Vec<OsString>,
    env_set: impl Fn(&str) -> bool,
    sections: &[&str],
) -> anyhow::Result<(Vec<OsString>, Option<PathBuf>)> {
    let mut out = Vec::with_capacity(args.len());
    let mut file: Option<PathBuf> = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            let path = it.next().context("--config needs a file path")?;
            file = Some(PathBuf::from(path));
        } else if let Some(p) = s.strip_prefix("--config=") {
            file = Some(PathBuf::from(p));
        } else {
            out.push(a);
        }
    }
    if file.is_none() && env_set("SKV_CONFIG") {
        file = std::env::var_os("SKV_CONFIG").map(PathBuf::from);
    }
    let Some(path) = file else { return Ok((out, None)) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing config file {}", path.display()))?;

    let on_command_line = |flag: &str| {
        out.iter().skip(1).any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        })
    };
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        if value.is_table() && sections.contains(&key.as_str()) {
            continue;
        }
        let name = key.replace('_', "-");
        let flag = format!("--{name}");
        let env = format!("SKV_{}", name.replace('-', "_").to_uppercase());
        if on_command_line(&flag) || env_set(&env) {
            continue;
        }
        let rendered = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(true) => {
                extra.push(flag.into());
                continue;
            }
            toml::Value::Boolean(false) => continue,
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    other => Err(anyhow::anyhow!("{key}: unsupported array item {other}")),
                })
                .collect::<anyhow::Result<Vec<_>>>()?
                .join(","),
            other => anyhow::bail!("{key}: unsupported value {other} in {}", path.display()),
        };
        extra.push(flag.into());
        extra.push(rendered.into());
    }
    // Insert right after the program name, so positional arguments keep their place.
    let tail = out.split_off(1.min(out.len()));
    out.extend(extra);
    out.extend(tail);
    Ok((out, Some(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn file_fills_only_what_flags_and_env_leave_open() {
        let dir = tempfile_dir();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:9\"\ndata_dir = \"/d\"\nplacement = [\"http://a\", \"http://b\"]\nheartbeat-interval-ms = 250\nverbose = true\nquiet = false\nmetrics-listen = \"x\"\n",
        )
        .unwrap();
        let out = expand(
            args(&["bin", "--config", f.to_str().unwrap(), "--listen", "127.0.0.1:1"]),
            |k| k == "SKV_METRICS_LISTEN",
        )
        .unwrap();
        let out = strs(out);
        assert_eq!(out[0], "bin");
        assert!(!out.iter().any(|a| a == "--config"));
        // The command line wins over the file.
        assert_eq!(out.iter().filter(|a| *a == "--listen").count(), 1);
        assert!(out.windows(2).any(|w| w[0] == "--listen" && w[1] == "127.0.0.1:1"));
        // The environment wins over the file.
        assert!(!out.iter().any(|a| a == "--metrics-listen"));
        assert!(out.windows(2).any(|w| w[0] == "--data-dir" && w[1] == "/d"));
        assert!(
            out.windows(2)
                .any(|w| w[0] == "--placement" && w[1] == "http://a,http://b")
        );
        assert!(
            out.windows(2)
                .any(|w| w[0] == "--heartbeat-interval-ms" && w[1] == "250")
        );
        assert!(out.iter().any(|a| a == "--verbose"));
        assert!(!out.iter().any(|a| a == "--quiet"));
    }

    #[test]
    fn no_config_leaves_args_alone_and_bad_files_fail_clearly() {
        let a = args(&["bin", "--listen", "x"]);
        assert_eq!(expand(a.clone(), |_| false).unwrap(), a);
        let e = expand(args(&["bin", "--config=/nonexistent/skv.toml"]), |_| false).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/skv.toml"));
        let dir = tempfile_dir();
        let f = dir.join("bad.toml");
        std::fs::write(&f, "listen = [").unwrap();
        assert!(expand(args(&["bin", "--config", f.to_str().unwrap()]), |_| false).is_err());
        assert!(expand(args(&["bin", "--config"]), |_| false).is_err());
    }

    #[test]
    fn named_sections_are_left_to_the_binary() {
        let dir = tempfile_dir();
        let f = dir.join("s.toml");
        std::fs::write(&f, "listen = \"x\"\n[tenants.acme]\nrate-limit = 5\n").unwrap();
        let a = args(&["bin", "--config", f.to_str().unwrap()]);
        let (out, file) = expand_with_sections(a.clone(), |_| false, &["tenants"]).unwrap();
        assert_eq!(file.as_deref(), Some(f.as_path()));
        assert_eq!(strs(out), vec!["bin", "--listen", "x"]);
        // Without the section named, a table is an error as before.
        assert!(expand(a, |_| false).is_err());
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("skv-config-test-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    }
}

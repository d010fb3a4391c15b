//! Command lines as the meshes' Go tools read them (spf13/pflag, which
//! cobra uses): `--name value`, `--name=value`, `-n value`, `-nvalue`,
//! `-n=value`; a boolean flag takes no separate value (`--flag`,
//! `--flag=false`); `--` ends the flags. An unknown flag, a missing value
//! or a bad boolean is an error, as pflag makes it one (the tool would
//! exit before programming anything).
use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};

/// One flag a tool accepts.
#[derive(Clone, Copy, Debug)]
pub(super) struct Flag {
    pub long: &'static str,
    pub short: Option<char>,
    pub boolean: bool,
}

pub(super) const fn value(long: &'static str, short: Option<char>) -> Flag {
    Flag { long, short, boolean: false }
}

pub(super) const fn boolean(long: &'static str, short: Option<char>) -> Flag {
    Flag { long, short, boolean: true }
}

/// The flags given, by long name, last one wins (pflag's `Set` for a
/// scalar), each with how it was written (for messages).
#[derive(Debug, Default)]
pub(super) struct Given {
    pub values: BTreeMap<&'static str, (String, String)>,
    /// Every value of each flag, in order (pflag's slice flags append).
    pub every: BTreeMap<&'static str, Vec<String>>,
    /// Arguments that are not flags.
    pub positional: Vec<String>,
}

impl Given {
    pub fn get(&self, long: &str) -> Option<&str> {
        self.values.get(long).map(|(v, _)| v.as_str())
    }

    /// How the flag was written on the command line (`-p 15001`).
    pub fn written(&self, long: &str) -> String {
        self.values.get(long).map(|(_, w)| w.clone()).unwrap_or_else(|| format!("--{long}"))
    }
}

/// strconv.ParseBool, which pflag's bool flags use.
pub(super) fn parse_bool(s: &str) -> Result<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => bail!("value {s:?} is not a boolean (true, false, 1, 0, t, f)"),
    }
}

/// Parses `args` (without the program name) against `flags`. Flags whose
/// long name starts with one of `free_prefixes` (a tool's logging flags)
/// are accepted with any value and kept.
pub(super) fn parse(args: &[String], flags: &[Flag], free_prefixes: &[&'static str]) -> Result<Given> {
    let mut out = Given::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            out.positional.extend(args[i..].iter().cloned());
            break;
        }
        let (flag, inline) = if let Some(rest) = a.strip_prefix("--") {
            let (name, inline) = match rest.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (rest, None),
            };
            match flags.iter().find(|f| f.long == name) {
                Some(f) => (*f, inline),
                None => match free_prefixes.iter().find(|p| name.starts_with(*p)) {
                    // A logging flag: `--name=value` or `--name value`.
                    Some(_) => {
                        let v = match inline {
                            Some(v) => v,
                            None => {
                                let v = args.get(i).cloned().unwrap_or_default();
                                i += 1;
                                v
                            }
                        };
                        out.positional.push(format!("--{name}={v}"));
                        continue;
                    }
                    None => bail!("unknown flag: --{name}"),
                },
            }
        } else if let Some(rest) = a.strip_prefix('-').filter(|r| !r.is_empty()) {
            let mut chars = rest.chars();
            let c = chars.next().expect("not empty");
            let f = flags
                .iter()
                .find(|f| f.short == Some(c))
                .ok_or_else(|| anyhow!("unknown shorthand flag: {c:?} in {a}"))?;
            let tail: String = chars.collect();
            let inline = match tail.strip_prefix('=') {
                Some(v) => Some(v.to_string()),
                None if tail.is_empty() => None,
                None if f.boolean => bail!("{a}: combined shorthand flags are not read"),
                None => Some(tail),
            };
            (*f, inline)
        } else {
            out.positional.push(a.clone());
            continue;
        };
        let v = match (flag.boolean, inline) {
            (true, Some(v)) => parse_bool(&v).map_err(|e| anyhow!("flag --{}: {e}", flag.long))?.to_string(),
            (true, None) => "true".to_string(),
            (false, Some(v)) => v,
            (false, None) => {
                let v = args.get(i).ok_or_else(|| anyhow!("flag needs an argument: {a}"))?.clone();
                i += 1;
                v
            }
        };
        let written = if flag.boolean { a.clone() } else { format!("{a} {v:?}") };
        out.every.entry(flag.long).or_default().push(v.clone());
        out.values.insert(flag.long, (v, written));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: [Flag; 3] =
        [value("envoy-port", Some('p')), value("istio-service-cidr", Some('i')), boolean("dry-run", Some('n'))];

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_forms_pflag_reads() {
        for form in [&["-p", "1"][..], &["-p1"], &["-p=1"], &["--envoy-port", "1"], &["--envoy-port=1"]] {
            let g = parse(&args(form), &FLAGS, &[]).unwrap();
            assert_eq!(g.get("envoy-port"), Some("1"), "{form:?}");
        }
        // An empty value is a value (`-x ""`).
        let g = parse(&args(&["-i", "", "-n", "--log_output_level=default:info", "x"]), &FLAGS, &["log_"]).unwrap();
        assert_eq!(g.get("istio-service-cidr"), Some(""));
        assert_eq!(g.get("dry-run"), Some("true"));
        assert_eq!(g.positional, ["--log_output_level=default:info", "x"]);
        // Last one wins.
        assert_eq!(parse(&args(&["-p", "1", "-p", "2"]), &FLAGS, &[]).unwrap().get("envoy-port"), Some("2"));
        assert_eq!(parse(&args(&["--dry-run=false"]), &FLAGS, &[]).unwrap().get("dry-run"), Some("false"));
    }

    #[test]
    fn what_pflag_refuses() {
        for (bad, why) in [
            (&["--nope"][..], "unknown flag: --nope"),
            (&["-z", "1"], "unknown shorthand flag: 'z'"),
            (&["-p"], "flag needs an argument: -p"),
            (&["--dry-run=maybe"], "is not a boolean"),
        ] {
            let e = parse(&args(bad), &FLAGS, &[]).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}

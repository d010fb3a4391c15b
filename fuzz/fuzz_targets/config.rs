//! The config file: YAML → mesh settings + workloads (each with its
//! annotations). Checks: bad input is an error (never a panic); the mesh
//! settings are valid; accepted workloads have a name, a namespace (an
//! absolute path or a pid > 0) that no other accepted workload has, an
//! absolute proxy cgroup; every listed workload is either accepted or
//! rejected with an error naming it; parsing is deterministic; written
//! back as a config file, the result parses to itself; each workload
//! compiles into a consistent policy and well-formed map contents; every
//! problem's line and column are in the text.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use redirector_fuzz::{check_annotations, check_entries, check_mesh, check_policy, render_annotations, render_mesh};
use redirector_policy::{compile, map_entries, parse_config, problems_of, Config, NetnsRef, Problem};
use serde_yaml::{Mapping, Value};

fn summary(c: &Config) -> (String, String, Vec<String>) {
    (
        format!("{:?}", c.mesh),
        format!("{:?}", c.workloads),
        c.rejected.iter().map(|(n, e)| format!("{n}: {e:#}")).collect(),
    )
}

/// The config file that says what `c` says (None if its mesh settings
/// cannot be written, see `render_mesh`).
fn render(c: &Config) -> Option<String> {
    let mesh: Value = serde_yaml::from_str(&render_mesh(&c.mesh)?).expect("render_mesh writes YAML");
    let workloads: Vec<Value> = c
        .workloads
        .iter()
        .map(|w| {
            let mut m = Mapping::new();
            m.insert("name".into(), w.name.clone().into());
            match &w.netns {
                NetnsRef::Path(p) => m.insert("netns".into(), p.to_str().expect("utf-8").into()),
                NetnsRef::Pid(pid) => m.insert("pid".into(), (*pid).into()),
            };
            if let Some(p) = &w.proxy_cgroup {
                m.insert("proxyCgroup".into(), p.to_str().expect("utf-8").into());
            }
            let ann: Mapping = render_annotations(c.mesh.preset, &w.annotations)
                .into_iter()
                .map(|(k, v)| (Value::from(k), Value::from(v)))
                .collect();
            m.insert("annotations".into(), ann.into());
            Value::Mapping(m)
        })
        .collect();
    let mut doc = Mapping::new();
    doc.insert("mesh".into(), mesh);
    doc.insert("workloads".into(), workloads.into());
    Some(serde_yaml::to_string(&doc).expect("serializable"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // A problem's line and column are in the text (libyaml, a YAML 1.1
    // parser, also breaks lines at CR, NEL, LS and PS).
    let lines: Vec<&str> = text.split(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}']).collect();
    // A syntax error at the end of the input may be placed at the start of
    // the line after the last one.
    let in_text = |p: &Problem| {
        if let Some(l) = p.line {
            let c = p.column.expect("a line comes with a column");
            if l == lines.len() + 1 && c == 1 {
                return;
            }
            assert!(l >= 1 && l <= lines.len(), "line {l} of {} in {p}", lines.len());
            assert!(c >= 1 && c <= lines[l - 1].chars().count() + 1, "column {c} of line {l} in {p}");
        }
    };
    let c = match parse_config(text) {
        Err(e) => {
            assert!(!format!("{e:#}").is_empty());
            problems_of(&e).iter().for_each(in_text);
            return;
        }
        Ok(c) => c,
    };
    for (_, e) in &c.rejected {
        problems_of(e).iter().for_each(in_text);
    }
    c.warnings.iter().for_each(|(_, p)| in_text(p));
    check_mesh(&c.mesh);
    let again = parse_config(text).expect("parsed once, parses twice");
    assert_eq!(summary(&again), summary(&c), "parsing is not deterministic");

    let mut names = BTreeSet::new();
    let mut namespaces = BTreeSet::new();
    for w in &c.workloads {
        assert!(!w.name.trim().is_empty());
        assert!(names.insert(w.name.clone()), "workload name {:?} accepted twice", w.name);
        match &w.netns {
            NetnsRef::Path(p) => assert!(p.is_absolute()),
            NetnsRef::Pid(pid) => assert!(*pid > 0),
        }
        assert!(namespaces.insert(w.netns.path()), "{} accepted for two workloads", w.netns.path().display());
        assert!(w.proxy_cgroup.as_ref().is_none_or(|p| p.is_absolute()));
        check_annotations(&w.annotations);
        let p = compile(&c.mesh, &w.annotations);
        check_policy(&c.mesh, &w.annotations, &p);
        check_entries(&p, 1, &map_entries(&p, 1));
    }
    for (name, e) in &c.rejected {
        assert!(format!("{e:#}").contains(&format!("workload `{name}`")), "rejection does not name {name:?}: {e:#}");
    }
    // Counted the way the parser reads the document (YAML tags on keys and
    // values are ignored by both).
    #[derive(serde::Deserialize)]
    struct Listed {
        #[serde(default)]
        workloads: Vec<serde::de::IgnoredAny>,
    }
    let listed = serde_yaml::from_str::<Listed>(text).map_or(0, |l| l.workloads.len());
    assert_eq!(c.workloads.len() + c.rejected.len(), listed, "a workload neither accepted nor rejected");

    if let Some(doc) = render(&c) {
        let back = parse_config(&doc).unwrap_or_else(|e| panic!("written back, {doc:?} does not parse: {e:#}"));
        assert!(back.rejected.is_empty(), "written back, {doc:?} rejects {:?}", back.rejected);
        assert_eq!(back.mesh, c.mesh, "written back: {doc}");
        assert_eq!(back.workloads, c.workloads, "written back: {doc}");
    }
});

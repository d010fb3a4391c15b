//! Pod annotations → typed pod settings, in each dialect's vocabulary, and
//! the `--meshed-when` rules. Input: a text whose first line names the
//! preset; each further line `KEY<TAB>VALUE` is an annotation (KEY may be
//! the index of a known key, 0-16); a line without a tab is a meshed-when
//! rule. Checks: errors are errors (never panics) and name the annotation;
//! keys of other dialects change nothing; values are in range and
//! canonical; spaces around commas change nothing; printed back, the
//! settings parse to themselves; compiled with the preset's mesh they give
//! a consistent policy whose map contents decide like the evaluator; a
//! meshed-when rule prints back to itself.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use redirector_fuzz::{
    check_annotations, check_connections, check_entries, check_policy, edge_connections, render_annotations,
    vocabulary, ANNOTATION_KEYS,
};
use redirector_policy::{
    compile, k8s::pods::MeshedWhen, map_entries, parse_annotations, Inclusion, MeshSettings, Preset,
    WorkloadAnnotations,
};

fn parse(preset: Preset, a: &BTreeMap<String, String>) -> Result<WorkloadAnnotations, String> {
    parse_annotations(preset, a).map_err(|e| format!("{e:#}"))
}

/// No port list holds more entries than there are ports: what one
/// annotation can make the agent allocate stays bounded by 65,535 per
/// list, however the value is written.
fn check_bounded(a: &WorkloadAnnotations) {
    let lists = [&a.outbound_port_exclusion, &a.inbound_port_exclusion];
    let incl = [&a.outbound_port_inclusion, &a.inbound_port_inclusion];
    for v in lists.into_iter().chain(incl.into_iter().flatten().filter_map(|i| match i {
        Inclusion::Only(v) => Some(v),
        Inclusion::All => None,
    })) {
        assert!(v.len() <= 65535, "a port list of {} entries", v.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or("");
    let preset = Preset::parse(first.trim()).unwrap_or(Preset::ALL[first.len() % 4]);
    let mut ann = BTreeMap::new();
    for line in lines {
        match line.split_once('\t') {
            Some((k, v)) => {
                let key = match k.parse::<usize>() {
                    Ok(i) if i < ANNOTATION_KEYS.len() => ANNOTATION_KEYS[i].to_string(),
                    _ => k.to_string(),
                };
                ann.insert(key, v.to_string());
            }
            None => {
                if let Ok(rule) = line.parse::<MeshedWhen>() {
                    let printed = rule.to_string();
                    assert_eq!(
                        printed.parse::<MeshedWhen>().ok(),
                        Some(rule.clone()),
                        "{line:?} printed as {printed:?}"
                    );
                }
            }
        }
    }

    let result = parse(preset, &ann);
    // Other dialects' keys (and unknown keys) are ignored.
    let own: BTreeMap<String, String> = ann
        .iter()
        .filter(|(k, _)| vocabulary(preset).contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(parse(preset, &own), result, "keys outside the {preset:?} vocabulary changed the result");
    // Spaces around items change nothing.
    let spaced: BTreeMap<String, String> =
        ann.iter().map(|(k, v)| (k.clone(), format!(" {} ", v.replace(',', " , ")))).collect();
    assert_eq!(parse(preset, &spaced).is_ok(), result.is_ok(), "spaces changed whether {ann:?} parses");
    match result {
        Err(e) => {
            assert!(
                vocabulary(preset).iter().any(|k| e.contains(&format!("annotation `{k}`"))),
                "error names no annotation: {e}"
            );
        }
        Ok(a) => {
            assert_eq!(parse(preset, &spaced).as_ref(), Ok(&a), "spaces changed the result");
            check_annotations(&a);
            check_bounded(&a);
            let again = parse(preset, &render_annotations(preset, &a));
            assert_eq!(again.as_ref(), Ok(&a), "printed back, {a:?} parses differently");
            let mesh = MeshSettings::for_preset(preset);
            let p = compile(&mesh, &a);
            check_policy(&mesh, &a, &p);
            let p = p.with_local_addresses(["198.18.0.1".parse().unwrap()]);
            check_entries(&p, 7, &map_entries(&p, 7));
            let (out, inbound) = edge_connections(&p);
            check_connections(preset, &p, 7, &out, &inbound);
        }
    }
});

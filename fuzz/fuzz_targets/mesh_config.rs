//! Kubernetes mode's mesh settings: the ConfigMap's `mesh.yaml` text and
//! OSM's MeshConfig object (`spec.traffic` lists). Input: the YAML text,
//! then optionally a NUL byte and the MeshConfig as JSON. Checks: errors
//! are errors naming their source; a text that parses but names no preset
//! is refused; the result is valid; `mesh.yaml` means
//! what the `mesh` section of a config file means; the MeshConfig's lists
//! replace the ConfigMap's and the others stay; printed back, the settings
//! parse to themselves.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redirector_fuzz::{check_mesh, render_mesh};
use redirector_policy::{
    k8s::mesh::{ConfigMapSource, MeshSources, Source, MESHCONFIG_TRAFFIC_KEYS},
    parse_config, parse_mesh_document, MeshSettings,
};
use serde_yaml::{Mapping, Value};

const CM: &str = "redirector-system/redirector-config";
const MC: &str = "osm-system/osm-mesh-config";

fn lists(m: &MeshSettings) -> [String; 4] {
    [
        format!("{:?}", m.outbound_ip_range_exclusion),
        format!("{:?}", m.outbound_ip_range_inclusion),
        format!("{:?}", m.outbound_port_exclusion),
        format!("{:?}", m.inbound_port_exclusion),
    ]
}

/// The text as the `mesh` section of a config file means the same.
fn mesh_section_agrees(text: &str, want: Option<&MeshSettings>) {
    let Ok(v @ (Value::Mapping(_) | Value::Null)) = serde_yaml::from_str::<Value>(text) else { return };
    let mut doc = Mapping::new();
    doc.insert("mesh".into(), if v.is_null() { Value::Mapping(Mapping::new()) } else { v });
    // A config file must list its workloads (none here).
    doc.insert("workloads".into(), Value::Sequence(Vec::new()));
    // (serde_yaml cannot write back every value it reads, e.g. some tags)
    let Ok(file) = serde_yaml::to_string(&doc) else { return };
    let as_file = parse_config(&file).map(|c| c.mesh);
    assert_eq!(as_file.as_ref().ok(), want, "mesh.yaml {text:?} and the config file {file:?} differ");
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let (text, json) = match input.split_once('\0') {
        Some((t, j)) => (t, serde_json::from_str::<serde_json::Value>(j).ok()),
        None => (input, None),
    };
    let base = MeshSources { configmap: ConfigMapSource::Present(CM.into(), Some(text.into())), meshconfig: None };
    let base_result = base.resolve();
    let document = parse_mesh_document(Some(text), &[]);
    match &base_result {
        Ok(m) => {
            check_mesh(m);
            if let Some(r) = render_mesh(m) {
                assert_eq!(parse_mesh_document(Some(&r), &[]).ok().as_ref(), Some(m), "printed back: {r}");
            }
        }
        Err((src, e)) => {
            assert_eq!(*src, Source::ConfigMap(CM.into()));
            assert!(format!("{e:#}").contains(CM), "{e:#}");
        }
    }
    match (&base_result, &document) {
        (Ok(m), Ok(d)) => assert_eq!(m, d, "the ConfigMap and the document parser differ"),
        (Err((_, e)), Ok(_)) => assert!(format!("{e:#}").contains("key `preset` is missing"), "{e:#}"),
        (Ok(_), Err(e)) => panic!("accepted in the ConfigMap, refused as a document: {e:#}"),
        (Err(_), Err(_)) => {}
    }
    mesh_section_agrees(text, document.as_ref().ok());

    let Some(object) = json else { return };
    let with = MeshSources { meshconfig: Some((MC.into(), object.clone())), ..base };
    match with.resolve() {
        Ok(m) => {
            check_mesh(&m);
            let Ok(b) = &base_result else { panic!("a bad ConfigMap accepted with a MeshConfig") };
            let traffic = object.pointer("/spec/traffic");
            let (got, was) = (lists(&m), lists(b));
            for (i, key) in MESHCONFIG_TRAFFIC_KEYS.iter().enumerate() {
                match traffic.and_then(|t| t.get(key)).filter(|v| !v.is_null()) {
                    None => assert_eq!(got[i], was[i], "{key} changed without being in the MeshConfig"),
                    Some(v) => {
                        let only = parse_mesh_document(
                            Some(&format!("preset: {}", b.preset.name())),
                            &[(key.to_string(), serde_yaml::to_value(v).unwrap())],
                        )
                        .expect("accepted in the MeshConfig, accepted alone");
                        assert_eq!(got[i], lists(&only)[i], "{key} is not the MeshConfig's");
                    }
                }
            }
            let rest =
                |m: &MeshSettings| (m.preset, m.proxy_uid, m.proxy_gid, m.outbound_port, m.inbound_port, m.loopback);
            assert_eq!(rest(&m), rest(b), "the MeshConfig changed more than its lists");
        }
        Err((Source::ConfigMap(n), e)) => {
            assert_eq!(n, CM);
            assert!(base_result.is_err(), "the ConfigMap failed only with a MeshConfig: {e:#}");
        }
        Err((Source::MeshConfig(n), e)) => {
            assert_eq!(n, MC);
            assert!(format!("{e:#}").contains(MC), "{e:#}");
            assert!(base_result.is_ok());
        }
    }
});

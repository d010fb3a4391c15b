//! Parsing: the mesh-wide settings in Kubernetes mode. The base is the
//! agent's ConfigMap (key `mesh.yaml`: the `mesh` mapping of the config
//! file); when OSM's `MeshConfig` custom resource exists, its
//! `spec.traffic` lists replace the ConfigMap's four lists of the same names.
use anyhow::{anyhow, Context as _, Result};

use crate::{parse_mesh_document, MeshSettings};

/// The ConfigMap key holding the mesh settings.
pub const CONFIGMAP_KEY: &str = "mesh.yaml";

/// The `spec.traffic` fields of OSM's MeshConfig that the agent reads (the
/// ones osm-init turns into iptables rules), under the same key names as
/// in the config file.
pub const MESHCONFIG_TRAFFIC_KEYS: [&str; 4] = [
    "outboundIPRangeExclusionList",
    "outboundIPRangeInclusionList",
    "outboundPortExclusionList",
    "inboundPortExclusionList",
];

/// Where the current mesh settings come from, as last seen through the API.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshSources {
    /// `namespace/name` and the `mesh.yaml` text of the ConfigMap, if it
    /// exists (`None` text: the key is missing).
    pub configmap: Option<(String, Option<String>)>,
    /// `namespace/name` and the whole MeshConfig object, if it exists.
    pub meshconfig: Option<(String, serde_json::Value)>,
}

/// Which source an error is in (for the Event and the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    ConfigMap(String),
    MeshConfig(String),
}

impl MeshSources {
    /// The merged settings, or the error with the source it is in.
    pub fn resolve(&self) -> Result<MeshSettings, (Source, anyhow::Error)> {
        let text = self.configmap.as_ref().and_then(|(_, t)| t.as_deref());
        let base = parse_mesh_document(text, &[]).map_err(|e| {
            let name = self.configmap.as_ref().map(|(n, _)| n.clone()).unwrap_or_default();
            let e = e.context(format!("ConfigMap {name}: key `{CONFIGMAP_KEY}`"));
            (Source::ConfigMap(name), e)
        })?;
        let Some((name, object)) = &self.meshconfig else { return Ok(base) };
        let in_mc = |e: anyhow::Error| (Source::MeshConfig(name.clone()), e.context(format!("MeshConfig {name}")));
        let overrides = traffic_overrides(object).map_err(in_mc)?;
        if overrides.is_empty() {
            return Ok(base);
        }
        parse_mesh_document(text, &overrides).map_err(|e| in_mc(e.context("spec.traffic")))
    }
}

/// The MeshConfig's `spec.traffic` lists, as config-file keys and values.
fn traffic_overrides(object: &serde_json::Value) -> Result<Vec<(String, serde_yaml::Value)>> {
    let traffic = match object.pointer("/spec/traffic") {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(t @ serde_json::Value::Object(_)) => t,
        Some(other) => return Err(anyhow!("spec.traffic: value {other} is not an object")),
    };
    let mut out = Vec::new();
    for key in MESHCONFIG_TRAFFIC_KEYS {
        match traffic.get(key) {
            None | Some(serde_json::Value::Null) => {}
            Some(v) => out.push((
                key.to_string(),
                serde_yaml::to_value(v).with_context(|| format!("spec.traffic.{key}: value {v}"))?,
            )),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Preset;
    use serde_json::json;

    fn cm(text: &str) -> Option<(String, Option<String>)> {
        Some(("redirector-system/redirector-config".into(), Some(text.into())))
    }

    #[test]
    fn no_sources_is_the_osm_default() {
        assert_eq!(MeshSources::default().resolve().unwrap(), MeshSettings::default());
    }

    #[test]
    fn configmap_base_and_meshconfig_lists() {
        let mut s = MeshSources {
            configmap: cm(
                "preset: osm\nproxyUID: 1500\noutboundPortExclusionList: [6379]\ninboundPortExclusionList: [9090]\n",
            ),
            meshconfig: None,
        };
        let m = s.resolve().unwrap();
        assert_eq!(m.outbound_port_exclusion, vec![6379]);
        s.meshconfig = Some((
            "osm-system/osm-mesh-config".into(),
            json!({"spec": {"traffic": {
                "outboundPortExclusionList": [7070, 8080],
                "outboundIPRangeExclusionList": ["198.51.100.0/24"],
                "enableEgress": true
            }}}),
        ));
        let m = s.resolve().unwrap();
        assert_eq!(m.preset, Preset::Osm);
        assert_eq!(m.outbound_port_exclusion, vec![7070, 8080]);
        assert_eq!(m.inbound_port_exclusion, vec![9090], "lists the MeshConfig lacks come from the ConfigMap");
        assert_eq!(m.outbound_ip_range_exclusion, vec!["198.51.100.0/24".parse().unwrap()]);
    }

    #[test]
    fn errors_name_their_source() {
        let s = MeshSources { configmap: cm("proxyUID: -1\n"), meshconfig: None };
        let (src, e) = s.resolve().unwrap_err();
        assert_eq!(src, Source::ConfigMap("redirector-system/redirector-config".into()));
        let msg = format!("{e:#}");
        assert!(
            msg.contains("redirector-system/redirector-config") && msg.contains("proxyUID") && msg.contains("-1"),
            "{msg}"
        );

        let s = MeshSources {
            configmap: None,
            meshconfig: Some((
                "osm-system/osm-mesh-config".into(),
                json!({"spec": {"traffic": {"outboundIPRangeExclusionList": ["10.0.0.0/33"]}}}),
            )),
        };
        let (src, e) = s.resolve().unwrap_err();
        assert_eq!(src, Source::MeshConfig("osm-system/osm-mesh-config".into()));
        let msg = format!("{e:#}");
        assert!(
            msg.contains("osm-mesh-config")
                && msg.contains("outboundIPRangeExclusionList")
                && msg.contains("10.0.0.0/33"),
            "{msg}"
        );

        let s = MeshSources { configmap: None, meshconfig: Some(("a/b".into(), json!({"spec": {"traffic": 3}}))) };
        assert!(format!("{:#}", s.resolve().unwrap_err().1).contains("spec.traffic"));
        let s = MeshSources { configmap: cm("- 1\n"), meshconfig: None };
        assert!(format!("{:#}", s.resolve().unwrap_err().1).contains("expected a mapping"));
    }
}

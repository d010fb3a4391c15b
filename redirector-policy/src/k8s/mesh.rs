//! Parsing: the mesh-wide settings in Kubernetes mode. The base is the
//! agent's ConfigMap (key `mesh.yaml`: the `mesh` mapping of the config
//! file); when OSM's `MeshConfig` custom resource exists, its
//! `spec.traffic` lists replace the ConfigMap's four lists of the same names.
//!
//! A ConfigMap that the agent is told to read must exist, hold `mesh.yaml`
//! and name the preset: its absence is an error, never OSM's defaults (a
//! pruned ConfigMap on an Istio cluster would otherwise send every pod's
//! inbound to OSM's port and stop exempting Envoy's UID).
use anyhow::{anyhow, Context as _, Result};

use crate::{parse_mesh_document, MeshSettings, Preset};

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
    pub configmap: ConfigMapSource,
    /// `namespace/name` and the whole MeshConfig object, if it exists.
    pub meshconfig: Option<(String, serde_json::Value)>,
}

/// The agent's ConfigMap as last seen.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ConfigMapSource {
    /// None is configured (`--configmap ""`): OSM's preset defaults.
    #[default]
    NotUsed,
    /// `namespace/name` is configured and does not exist (never created,
    /// or deleted).
    Missing(String),
    /// `namespace/name` and its `mesh.yaml` text (`None`: the key is
    /// missing).
    Present(String, Option<String>),
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
        let (text, base) = match &self.configmap {
            ConfigMapSource::NotUsed => (None, MeshSettings::default()),
            ConfigMapSource::Missing(name) => {
                return Err((
                    Source::ConfigMap(name.clone()),
                    anyhow!(
                        "ConfigMap {name} does not exist: its key `{CONFIGMAP_KEY}` must name the preset \
                         (no default preset is assumed)"
                    ),
                ))
            }
            ConfigMapSource::Present(name, None) => {
                return Err((
                    Source::ConfigMap(name.clone()),
                    anyhow!(
                        "ConfigMap {name}: key `{CONFIGMAP_KEY}` is missing: it must name the preset \
                         (no default preset is assumed)"
                    ),
                ))
            }
            ConfigMapSource::Present(name, Some(text)) => {
                let in_cm = |e: anyhow::Error| {
                    (Source::ConfigMap(name.clone()), e.context(format!("ConfigMap {name}: key `{CONFIGMAP_KEY}`")))
                };
                let base = parse_mesh_document(Some(text), &[]).map_err(in_cm)?;
                if !names_preset(text) {
                    return Err(in_cm(anyhow!(
                        "key `preset` is missing: it must name the preset (osm, istio, linkerd, kuma); \
                         no default preset is assumed"
                    )));
                }
                (Some(text.as_str()), base)
            }
        };
        let Some((name, object)) = &self.meshconfig else { return Ok(base) };
        let in_mc = |e: anyhow::Error| (Source::MeshConfig(name.clone()), e.context(format!("MeshConfig {name}")));
        let overrides = traffic_overrides(object).map_err(in_mc)?;
        if overrides.is_empty() {
            return Ok(base);
        }
        parse_mesh_document(text, &overrides).map_err(|e| in_mc(e.context("spec.traffic")))
    }

    /// The preset the ConfigMap names (OSM's when no ConfigMap is used);
    /// None while it is missing or invalid. Whether OSM's MeshConfig is
    /// read at all depends on it.
    pub fn configmap_preset(&self) -> Option<Preset> {
        match &self.configmap {
            ConfigMapSource::NotUsed => Some(Preset::Osm),
            ConfigMapSource::Missing(_) | ConfigMapSource::Present(_, None) => None,
            ConfigMapSource::Present(_, Some(text)) if names_preset(text) => {
                parse_mesh_document(Some(text), &[]).ok().map(|m| m.preset)
            }
            ConfigMapSource::Present(_, Some(_)) => None,
        }
    }
}

/// Whether a `mesh.yaml` text has a non-null `preset` key (tags ignored).
fn names_preset(text: &str) -> bool {
    fn untag(v: &serde_yaml::Value) -> &serde_yaml::Value {
        match v {
            serde_yaml::Value::Tagged(t) => untag(&t.value),
            v => v,
        }
    }
    let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(text) else { return false };
    let serde_yaml::Value::Mapping(m) = untag(&doc) else { return false };
    m.iter().any(|(k, v)| untag(k).as_str() == Some("preset") && !untag(v).is_null())
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

    const CM: &str = "redirector-system/redirector-config";

    fn cm(text: &str) -> ConfigMapSource {
        ConfigMapSource::Present(CM.into(), Some(text.into()))
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
            configmap: ConfigMapSource::NotUsed,
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

        let s = MeshSources {
            configmap: ConfigMapSource::NotUsed,
            meshconfig: Some(("a/b".into(), json!({"spec": {"traffic": 3}}))),
        };
        assert!(format!("{:#}", s.resolve().unwrap_err().1).contains("spec.traffic"));
        let s = MeshSources { configmap: cm("- 1\n"), meshconfig: None };
        assert!(format!("{:#}", s.resolve().unwrap_err().1).contains("expected a mapping"));
    }

    /// A ConfigMap the agent reads must exist, hold `mesh.yaml` and name
    /// the preset: none of these falls back to OSM's defaults.
    #[test]
    fn an_absent_configmap_or_preset_is_an_error() {
        let osm_lists = json!({"spec": {"traffic": {"outboundPortExclusionList": [7070]}}});
        for (source, want) in [
            (ConfigMapSource::Missing(CM.into()), "does not exist"),
            (ConfigMapSource::Present(CM.into(), None), "key `mesh.yaml` is missing"),
            (cm("proxyUID: 1337\n"), "key `preset` is missing"),
            (cm(""), "key `preset` is missing"),
            (cm("preset: ~\n"), "key `preset` is missing"),
        ] {
            for meshconfig in [None, Some(("osm-system/osm-mesh-config".to_string(), osm_lists.clone()))] {
                let s = MeshSources { configmap: source.clone(), meshconfig };
                let (src, e) = s.resolve().unwrap_err();
                assert_eq!(src, Source::ConfigMap(CM.into()), "{source:?}");
                let msg = format!("{e:#}");
                assert!(msg.contains(want) && msg.contains(CM) && msg.contains("no default preset"), "{msg}");
                assert_eq!(s.configmap_preset(), None);
            }
        }
        let s = MeshSources { configmap: cm("preset: !x istio\n"), meshconfig: None };
        assert_eq!(s.resolve().unwrap().preset, Preset::Istio, "a tagged preset is named");
        assert_eq!(s.configmap_preset(), Some(Preset::Istio));
        assert_eq!(MeshSources::default().configmap_preset(), Some(Preset::Osm), "no ConfigMap: OSM's defaults");
        let s = MeshSources { configmap: cm("preset: kuma\nproxyUID: -1\n"), meshconfig: None };
        assert_eq!(s.configmap_preset(), None, "an invalid ConfigMap names no preset");
    }
}

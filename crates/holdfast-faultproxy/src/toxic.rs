//! Toxics as values: the typed [`ToxicSpec`] and its Toxiproxy JSON form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Error;

/// Which direction of a connection a toxic acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Client → upstream (requests).
    Upstream,
    /// Upstream → client (responses). Toxiproxy's default.
    Downstream,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Upstream => "upstream",
            Stream::Downstream => "downstream",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stream {
    type Err = Error;

    /// Case-insensitive, like Toxiproxy.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "upstream" => Ok(Stream::Upstream),
            "downstream" => Ok(Stream::Downstream),
            _ => Err(Error::InvalidStream(s.to_owned())),
        }
    }
}

/// A toxic type with its attributes, named and measured as in Toxiproxy (times in
/// milliseconds unless noted). Each acts on one [`Stream`] of every connection it applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toxic {
    /// `latency`: each chunk is delivered `latency` ± `jitter` ms after it arrived.
    Latency { latency: u64, jitter: u64 },
    /// `bandwidth`: at most `rate` KB/s (1 KB = 1000 bytes); `rate: 0` stalls the stream.
    Bandwidth { rate: u64 },
    /// `timeout`: all data is dropped and the connection closed `timeout` ms after the toxic
    /// met it; `timeout: 0` holds it open instead. Removing the toxic closes the connections
    /// it held: their data was lost, so they cannot resume.
    Timeout { timeout: u64 },
    /// `reset_peer`: when data first arrives, drop it, wait `timeout` ms, then reset both
    /// sockets (TCP RST via `SO_LINGER` 0).
    ResetPeer { timeout: u64 },
    /// `slow_close`: the close (FIN) is passed on `delay` ms late.
    SlowClose { delay: u64 },
    /// `slicer`: chunks are cut into pieces of `average_size` ± `size_variation` bytes,
    /// `delay` **microseconds** apart.
    Slicer {
        average_size: u64,
        size_variation: u64,
        delay: u64,
    },
    /// `limit_data`: the connection is closed once `bytes` bytes have passed.
    LimitData { bytes: u64 },
}

impl Toxic {
    /// The Toxiproxy type name (`"latency"`, `"reset_peer"`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            Toxic::Latency { .. } => "latency",
            Toxic::Bandwidth { .. } => "bandwidth",
            Toxic::Timeout { .. } => "timeout",
            Toxic::ResetPeer { .. } => "reset_peer",
            Toxic::SlowClose { .. } => "slow_close",
            Toxic::Slicer { .. } => "slicer",
            Toxic::LimitData { .. } => "limit_data",
        }
    }

    fn attributes(&self) -> Map<String, Value> {
        let pairs: &[(&str, u64)] = match *self {
            Toxic::Latency { latency, jitter } => &[("latency", latency), ("jitter", jitter)],
            Toxic::Bandwidth { rate } => &[("rate", rate)],
            Toxic::Timeout { timeout } | Toxic::ResetPeer { timeout } => &[("timeout", timeout)],
            Toxic::SlowClose { delay } => &[("delay", delay)],
            Toxic::Slicer {
                average_size,
                size_variation,
                delay,
            } => &[
                ("average_size", average_size),
                ("size_variation", size_variation),
                ("delay", delay),
            ],
            Toxic::LimitData { bytes } => &[("bytes", bytes)],
        };
        pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), Value::from(v)))
            .collect()
    }

    /// Builds a toxic from its type name and attributes. As in Toxiproxy, a missing attribute
    /// is 0 and unknown ones are ignored.
    fn from_attributes(type_name: &str, attrs: &Map<String, Value>) -> Result<Self, Error> {
        let get = |key: &str| attribute(attrs, key);
        Ok(match type_name {
            "latency" => Toxic::Latency {
                latency: get("latency")?,
                jitter: get("jitter")?,
            },
            "bandwidth" => Toxic::Bandwidth { rate: get("rate")? },
            "timeout" => Toxic::Timeout {
                timeout: get("timeout")?,
            },
            "reset_peer" => Toxic::ResetPeer {
                timeout: get("timeout")?,
            },
            "slow_close" => Toxic::SlowClose {
                delay: get("delay")?,
            },
            "slicer" => Toxic::Slicer {
                average_size: get("average_size")?,
                size_variation: get("size_variation")?,
                delay: get("delay")?,
            },
            "limit_data" => Toxic::LimitData {
                bytes: get("bytes")?,
            },
            other => return Err(Error::InvalidToxicType(other.to_owned())),
        })
    }
}

fn attribute(attrs: &Map<String, Value>, key: &str) -> Result<u64, Error> {
    match attrs.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v
            .as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                    .map(|f| f as u64)
            })
            .ok_or_else(|| {
                Error::BadRequest(format!("attribute {key} must be a non-negative integer"))
            }),
    }
}

/// A toxic on a proxy: what it does, to which stream, and how often.
///
/// Serializes to Toxiproxy's JSON: `{name, type, stream, toxicity, attributes}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ToxicJson", into = "ToxicJson")]
pub struct ToxicSpec {
    /// Unique per proxy. Empty means Toxiproxy's default, `<type>_<stream>`.
    pub name: String,
    pub stream: Stream,
    /// Probability in `0.0..=1.0` that the toxic applies to a given connection, drawn per
    /// connection when the toxic first meets it (and again when the toxic is updated).
    pub toxicity: f64,
    pub toxic: Toxic,
}

impl ToxicSpec {
    /// A downstream toxic with toxicity 1 and the default name, as Toxiproxy defaults.
    pub fn new(toxic: Toxic) -> Self {
        ToxicSpec {
            name: String::new(),
            stream: Stream::Downstream,
            toxicity: 1.0,
            toxic,
        }
    }

    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn with_stream(mut self, stream: Stream) -> Self {
        self.stream = stream;
        self
    }

    pub fn with_toxicity(mut self, toxicity: f64) -> Self {
        self.toxicity = toxicity;
        self
    }

    /// Fills in the default name and checks the toxicity.
    pub(crate) fn normalized(mut self) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&self.toxicity) {
            return Err(Error::BadRequest(format!(
                "toxicity must be between 0 and 1, got {}",
                self.toxicity
            )));
        }
        if self.name.is_empty() {
            self.name = format!("{}_{}", self.toxic.type_name(), self.stream);
        }
        Ok(self)
    }

    /// This toxic after a Toxiproxy-style partial update: the given attributes replace the
    /// current ones of the same name; type, stream and name stay.
    pub(crate) fn patched(&self, patch: ToxicPatch) -> Result<Self, Error> {
        let mut attrs = self.toxic.attributes();
        attrs.extend(patch.attributes.unwrap_or_default());
        ToxicSpec {
            toxic: Toxic::from_attributes(self.toxic.type_name(), &attrs)?,
            toxicity: patch.toxicity.unwrap_or(self.toxicity),
            ..self.clone()
        }
        .normalized()
    }
}

/// Toxiproxy's toxic JSON, every field optional so defaults and errors match Toxiproxy's.
#[derive(Serialize, Deserialize)]
pub(crate) struct ToxicJson {
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    toxicity: Option<f64>,
    #[serde(default)]
    attributes: Option<Map<String, Value>>,
}

impl TryFrom<ToxicJson> for ToxicSpec {
    type Error = Error;

    fn try_from(json: ToxicJson) -> Result<Self, Error> {
        let toxic = Toxic::from_attributes(
            json.kind.as_deref().unwrap_or_default(),
            &json.attributes.unwrap_or_default(),
        )?;
        ToxicSpec {
            name: json.name.unwrap_or_default(),
            stream: json.stream.as_deref().unwrap_or("downstream").parse()?,
            toxicity: json.toxicity.unwrap_or(1.0),
            toxic,
        }
        .normalized()
    }
}

impl From<ToxicSpec> for ToxicJson {
    fn from(spec: ToxicSpec) -> Self {
        ToxicJson {
            attributes: Some(spec.toxic.attributes()),
            kind: Some(spec.toxic.type_name().to_owned()),
            name: Some(spec.name),
            stream: Some(spec.stream.as_str().to_owned()),
            toxicity: Some(spec.toxicity),
        }
    }
}

/// The body of a toxic update: Toxiproxy reads only these two fields.
#[derive(Deserialize)]
pub(crate) struct ToxicPatch {
    #[serde(default)]
    toxicity: Option<f64>,
    #[serde(default)]
    attributes: Option<Map<String, Value>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ToxicSpec, Error> {
        ToxicSpec::try_from(serde_json::from_str::<ToxicJson>(json).unwrap())
    }

    #[test]
    fn defaults_follow_toxiproxy() {
        let spec = parse(r#"{"type":"latency","attributes":{"latency":100}}"#).unwrap();
        assert_eq!(
            spec,
            ToxicSpec::new(Toxic::Latency {
                latency: 100,
                jitter: 0
            })
            .with_name("latency_downstream")
        );
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "latency_downstream", "type": "latency",
                "stream": "downstream", "toxicity": 1.0,
                "attributes": {"latency": 100, "jitter": 0}})
        );
    }

    #[test]
    fn rejects_what_toxiproxy_rejects_and_out_of_range_values() {
        let check = |json: &str, status: u16| assert_eq!(parse(json).unwrap_err().status(), status);
        check(r#"{"type":"nope"}"#, 400);
        check(r#"{}"#, 400);
        check(r#"{"type":"latency","stream":"sideways"}"#, 400);
        check(r#"{"type":"latency","toxicity":1.5}"#, 400);
        check(r#"{"type":"latency","attributes":{"latency":-1}}"#, 400);
        assert!(parse(r#"{"type":"latency","stream":"UpStream"}"#).is_ok());
    }

    #[test]
    fn patch_merges_attributes() {
        let spec = parse(r#"{"type":"latency","attributes":{"latency":100,"jitter":3}}"#).unwrap();
        let patch = serde_json::from_str(r#"{"attributes":{"jitter":5}}"#).unwrap();
        let patched = spec.patched(patch).unwrap();
        assert_eq!(
            patched.toxic,
            Toxic::Latency {
                latency: 100,
                jitter: 5
            }
        );
        assert_eq!(patched.toxicity, 1.0);
    }
}

//! Where things are in a YAML document, so that every error names the key
//! path, the value and the line: [`Problem`] (one error or warning),
//! [`Problems`] (all of them, as one error), and [`Positions`], the line
//! and column of every key and value of a document.
//!
//! serde_yaml gives a line only for errors raised while it reads text into
//! typed structs, and reports a duplicate key at the line of the mapping
//! that holds it. The documents are read as `serde_yaml::Value` (so that a
//! config file's `mesh` and Kubernetes mode's `mesh.yaml` mean the same),
//! and [`Positions`] reads the same text once more through libyaml, the
//! parser serde_yaml itself uses (`unsafe-libyaml`), as a stream of events
//! with their marks. Only reading: nothing here decides what a document
//! means.
use std::{collections::HashMap, fmt};

use serde::Serialize;
use unsafe_libyaml as unsafe_sys;

/// One thing wrong (or worth a warning) in a document: the key path
/// (`mesh.proxyUID`, `workloads[2].annotations.openservicemesh.io/…`; empty
/// for the document as a whole), where it is, and what is wrong, naming
/// the value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub path: String,
    /// 1-based, when the value is in the text (not for a value that comes
    /// from elsewhere, such as a MeshConfig's lists).
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line, self.column) {
            (false, Some(l), Some(c)) => write!(f, "{} at line {l} column {c}: {}", self.path, self.message),
            (false, Some(l), None) => write!(f, "{} at line {l}: {}", self.path, self.message),
            (false, None, _) => write!(f, "{}: {}", self.path, self.message),
            // serde_yaml's own messages name the line already.
            (true, Some(l), _) if !self.message.contains(" line ") => write!(f, "line {l}: {}", self.message),
            (true, _, _) => f.write_str(&self.message),
        }
    }
}

/// Every problem of a document or of one of its parts, as one error; its
/// text joins them with `; ` (one log line), [`Problems::list`] has each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problems {
    pub list: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.list.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// The problems behind an error returned by this crate's parsers (through
/// any context added to it), or the error as one problem without a path.
pub fn problems_of(e: &anyhow::Error) -> Vec<Problem> {
    match e.downcast_ref::<Problems>() {
        Some(p) => p.list.clone(),
        None => vec![Problem { path: String::new(), line: None, column: None, message: format!("{e:#}") }],
    }
}

/// `base.key`, or `key` at the top.
pub(crate) fn key_path(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

/// `base[index]`.
pub(crate) fn index_path(base: &str, index: usize) -> String {
    format!("{base}[{index}]")
}

/// A mapping key as it appears in a path: a string as it is, another
/// scalar as YAML writes it.
pub(crate) fn key_text(k: &serde_yaml::Value) -> String {
    match k {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Null => "~".into(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        serde_yaml::Value::Number(n) => n.to_string(),
        other => serde_yaml::to_string(other).unwrap_or_default().trim().replace('\n', " "),
    }
}

/// A value as an error message shows it: strings quoted, other scalars as
/// written, a list or mapping by its kind.
pub(crate) fn shown(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => format!("{s:?}"),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        serde_yaml::Value::Null => "null".into(),
        serde_yaml::Value::Sequence(_) => "(a list)".into(),
        serde_yaml::Value::Mapping(_) => "(a mapping)".into(),
        serde_yaml::Value::Tagged(t) => shown(&t.value),
    }
}

/// What kind of value it is, for "… is a string, expected an integer".
pub(crate) fn kind(v: &serde_yaml::Value) -> &'static str {
    match v {
        serde_yaml::Value::Null => "nothing",
        serde_yaml::Value::Bool(_) => "a boolean",
        serde_yaml::Value::Number(n) if n.is_f64() => "a fractional number",
        serde_yaml::Value::Number(_) => "a number",
        serde_yaml::Value::String(_) => "a string",
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::Mapping(_) => "a mapping",
        serde_yaml::Value::Tagged(_) => "a tagged value",
    }
}

/// The edit distance between `a` and `b`, ignoring case (Levenshtein,
/// over characters).
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().flat_map(char::to_lowercase).collect();
    let b: Vec<char> = b.chars().flat_map(char::to_lowercase).collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diag + usize::from(ca != cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// How far a misspelt key may be from the one it was meant to be: three
/// edits (a dropped, doubled or swapped letter, a wrong case anywhere).
pub(crate) const MISSPELT: usize = 3;

/// The candidate closest to `word` (ties: the first), if within
/// [`MISSPELT`] edits.
pub(crate) fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (distance(word, c), c))
        .filter(|(d, _)| *d <= MISSPELT)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Collects the problems of one document, each at the line of the key or
/// value it is about. The positions are read from the text only when a
/// problem is found.
pub(crate) struct Reader<'a> {
    text: Option<&'a str>,
    positions: std::cell::OnceCell<Positions>,
    /// Paths whose values do not come from the text (a MeshConfig's lists).
    forgotten: Vec<String>,
    pub problems: Vec<Problem>,
}

impl<'a> Reader<'a> {
    pub fn new(text: Option<&'a str>) -> Self {
        Self { text, positions: std::cell::OnceCell::new(), forgotten: Vec::new(), problems: Vec::new() }
    }

    /// The value at `path` does not come from the text.
    pub fn forget(&mut self, path: &str) {
        self.forgotten.push(path.to_string());
    }

    pub fn positions(&self) -> Option<&Positions> {
        let text = self.text?;
        Some(self.positions.get_or_init(|| Positions::of(text)))
    }

    fn mark(&self, path: &str, key: bool) -> Option<Mark> {
        let gone = self
            .forgotten
            .iter()
            .any(|f| path == f || path.strip_prefix(f.as_str()).is_some_and(|rest| rest.starts_with(['.', '['])));
        if gone {
            return None;
        }
        let p = self.positions()?;
        if key {
            p.key(path)
        } else {
            p.value(path)
        }
    }

    /// A problem with the value at `path`.
    pub fn at_value(&mut self, path: &str, message: impl Into<String>) {
        let m = self.mark(path, false);
        self.push(path, m, message.into());
    }

    /// A problem with the document as a whole (no line: e.g. a key that
    /// is missing).
    pub fn whole(&mut self, message: impl Into<String>) {
        self.push("", None, message.into());
    }

    /// A problem with the key at `path` (an unknown or misspelt key).
    pub fn at_key(&mut self, path: &str, message: impl Into<String>) {
        let m = self.mark(path, true);
        self.push(path, m, message.into());
    }

    fn push(&mut self, path: &str, m: Option<Mark>, message: String) {
        self.problems.push(Problem {
            path: path.to_string(),
            line: m.map(|m| m.line),
            column: m.map(|m| m.column),
            message,
        });
    }

    /// A problem at `path`, at its key's line, for each key of `map` that
    /// is not one of `known` (with the closest known one, if any).
    pub fn unknown_keys(&mut self, base: &str, map: &serde_yaml::Mapping, known: &[&str]) {
        for k in map.keys() {
            let name = key_text(k);
            if known.contains(&name.as_str()) && k.is_string() {
                continue;
            }
            let hint = match closest(&name, known.iter().copied()) {
                Some(c) => format!(" (did you mean `{c}`?)"),
                None => format!(
                    " (the keys here are {})",
                    known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                ),
            };
            self.at_key(&key_path(base, &name), format!("unknown key `{name}`{hint}"));
        }
    }

    /// An error of serde_yaml reading the text: a duplicate key at the
    /// line of the key given again (serde_yaml names the line of the
    /// mapping), any other error as serde_yaml says it (with its line).
    pub fn yaml_error(&mut self, e: &serde_yaml::Error) {
        let text = e.to_string();
        if text.contains("duplicate entry") {
            if let Some(d) = self.positions().and_then(|p| p.duplicates.first()).cloned() {
                let key = d.path.rsplit('.').next().unwrap_or(&d.path).to_string();
                self.problems.push(Problem {
                    path: d.path.clone(),
                    line: Some(d.again.line),
                    column: Some(d.again.column),
                    message: format!("key `{key}` is given twice (first at line {})", d.first.line),
                });
                return;
            }
        }
        let at = e.location();
        self.problems.push(Problem {
            path: String::new(),
            line: at.as_ref().map(|l| l.line()),
            column: at.as_ref().map(|l| l.column()),
            message: format!("invalid YAML: {text}"),
        });
    }

    /// The problems found, as an error (None if there are none).
    pub fn into_error(mut self) -> Option<Problems> {
        // In the order of the text (those without a line first).
        self.problems.sort_by_key(|p| (p.line, p.column));
        (!self.problems.is_empty()).then_some(Problems { list: self.problems })
    }
}

/// 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub line: usize,
    pub column: usize,
}

impl Mark {
    fn of(m: &unsafe_sys::yaml_mark_t) -> Self {
        Self { line: m.line as usize + 1, column: m.column as usize + 1 }
    }
}

/// A key given twice in one mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duplicate {
    /// The path of the key (`workloads[0].name`).
    pub path: String,
    pub first: Mark,
    pub again: Mark,
}

/// The line and column of each key and value of a document's first YAML
/// document, by path; and the keys given twice in one mapping. Read up to
/// the first syntax error (serde_yaml reports that one with its line).
#[derive(Debug, Default)]
pub struct Positions {
    /// path → (the key's mark, when the node is a mapping value; the
    /// node's own mark).
    nodes: HashMap<String, (Option<Mark>, Mark)>,
    pub duplicates: Vec<Duplicate>,
}

/// What a mapping's keys are compared by, as serde_yaml's `Value` compares
/// them: a quoted scalar is a string; a plain one is a string unless YAML
/// reads it as null, a boolean or a number (approximated: only used to
/// place a duplicate serde_yaml reports).
fn key_identity(text: &str, plain: bool) -> (bool, String) {
    let typed = plain
        && (matches!(
            text,
            "" | "~" | "null" | "Null" | "NULL" | "true" | "True" | "TRUE" | "false" | "False" | "FALSE"
        ) || text.parse::<f64>().is_ok()
            || text.parse::<i128>().is_ok());
    (typed, text.to_string())
}

enum Frame {
    Map {
        path: String,
        /// The key just read (its text and mark), while its value is
        /// awaited.
        key: Option<(String, Mark)>,
        /// A complex key (a list or mapping) is being read.
        complex_key: bool,
        seen: HashMap<(bool, String), Mark>,
    },
    Seq {
        path: String,
        next: usize,
    },
    /// Inside a complex key: nothing is recorded.
    Skip,
}

impl Positions {
    /// Reads `text` through libyaml.
    pub fn of(text: &str) -> Self {
        let mut out = Self::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new(text.as_bytes());
        while let Some(ev) = parser.next() {
            match ev {
                Event::End => break,
                Event::ContainerEnd => {
                    stack.pop();
                    out.node_done(&mut stack);
                }
                Event::Scalar { mark, text, plain } => {
                    if !out.key_read(&mut stack, &text, plain, mark) {
                        out.node_start(&mut stack, mark);
                        out.node_done(&mut stack);
                    }
                }
                Event::Alias { mark } => {
                    if !out.key_read(&mut stack, "*", false, mark) {
                        out.node_start(&mut stack, mark);
                        out.node_done(&mut stack);
                    }
                }
                Event::Start { mark, mapping } => {
                    let in_key = matches!(stack.last(), Some(Frame::Map { key: None, .. } | Frame::Skip));
                    if in_key {
                        if let Some(Frame::Map { complex_key, .. }) = stack.last_mut() {
                            *complex_key = true;
                        }
                        stack.push(Frame::Skip);
                        continue;
                    }
                    let path = out.node_start(&mut stack, mark);
                    stack.push(if mapping {
                        Frame::Map { path, key: None, complex_key: false, seen: HashMap::new() }
                    } else {
                        Frame::Seq { path, next: 0 }
                    });
                }
            }
        }
        out
    }

    /// A scalar in key position: records the key. False if the scalar is
    /// a value.
    fn key_read(&mut self, stack: &mut [Frame], text: &str, plain: bool, mark: Mark) -> bool {
        match stack.last_mut() {
            Some(Frame::Skip) => true,
            Some(Frame::Map { path, key: key @ None, seen, .. }) => {
                let id = key_identity(text, plain);
                match seen.get(&id) {
                    Some(first) => {
                        self.duplicates.push(Duplicate { path: key_path(path, text), first: *first, again: mark })
                    }
                    None => {
                        seen.insert(id, mark);
                    }
                }
                *key = Some((text.to_string(), mark));
                true
            }
            _ => false,
        }
    }

    /// A value node starts: records its position; returns its path.
    fn node_start(&mut self, stack: &mut [Frame], mark: Mark) -> String {
        let (path, key_mark) = match stack.last() {
            None => (String::new(), None),
            Some(Frame::Map { path, key: Some((k, km)), .. }) => (key_path(path, k), Some(*km)),
            // The value of a complex key.
            Some(Frame::Map { path, key: None, .. }) => (key_path(path, "?"), None),
            Some(Frame::Seq { path, next }) => (index_path(path, *next), None),
            Some(Frame::Skip) => return String::new(),
        };
        self.nodes.entry(path.clone()).or_insert((key_mark, mark));
        path
    }

    /// A node (scalar, alias or container) ended: its parent moves on.
    fn node_done(&mut self, stack: &mut [Frame]) {
        match stack.last_mut() {
            Some(Frame::Map { key, complex_key, .. }) => {
                if *complex_key {
                    // The complex key itself ended: its value comes next.
                    *complex_key = false;
                    *key = Some(("?".into(), Mark { line: 0, column: 0 }));
                } else {
                    *key = None;
                }
            }
            Some(Frame::Seq { next, .. }) => *next += 1,
            _ => {}
        }
    }

    /// Where the value at `path` is.
    pub fn value(&self, path: &str) -> Option<Mark> {
        self.nodes.get(path).map(|(_, m)| *m)
    }

    /// Where the key of the mapping value at `path` is (else the value).
    pub fn key(&self, path: &str) -> Option<Mark> {
        self.nodes.get(path).map(|(k, m)| k.unwrap_or(*m))
    }

    /// Forgets `path` (a value that does not come from the text).
    pub fn forget(&mut self, path: &str) {
        let below = format!("{path}.");
        let items = format!("{path}[");
        self.nodes.retain(|p, _| p != path && !p.starts_with(&below) && !p.starts_with(&items));
    }
}

enum Event {
    Start {
        mark: Mark,
        mapping: bool,
    },
    ContainerEnd,
    Scalar {
        mark: Mark,
        text: String,
        plain: bool,
    },
    Alias {
        mark: Mark,
    },
    /// The end of the first document, of the stream, or a syntax error.
    End,
}

/// libyaml's event parser over a borrowed text.
struct Parser<'a> {
    /// Boxed: libyaml keeps a pointer to the parser itself once its input
    /// is set, so it must not move.
    sys: Box<std::mem::MaybeUninit<unsafe_sys::yaml_parser_t>>,
    /// The input must outlive the parser (libyaml reads it in place).
    _input: &'a [u8],
    /// Whether libyaml initialised the parser (only then is it deleted).
    init: bool,
    done: bool,
}

impl<'a> Parser<'a> {
    fn new(input: &'a [u8]) -> Self {
        let mut sys = Box::new(std::mem::MaybeUninit::<unsafe_sys::yaml_parser_t>::uninit());
        // SAFETY: the parser is initialised in place (it is boxed, so it
        // never moves after `yaml_parser_set_input_string` stores a
        // pointer to itself), and the input outlives it (`'a`).
        let ok = unsafe {
            let p = sys.as_mut_ptr();
            if unsafe_sys::yaml_parser_initialize(p).fail {
                false
            } else {
                unsafe_sys::yaml_parser_set_encoding(p, unsafe_sys::YAML_UTF8_ENCODING);
                unsafe_sys::yaml_parser_set_input_string(p, input.as_ptr(), input.len() as u64);
                true
            }
        };
        Self { sys, _input: input, init: ok, done: !ok }
    }

    fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let mut ev = std::mem::MaybeUninit::<unsafe_sys::yaml_event_t>::uninit();
        // SAFETY: the parser was initialised; a parsed event is read, then
        // deleted, before the next call. Scalar data points into the
        // event for `length` bytes.
        unsafe {
            let p = self.sys.as_mut_ptr();
            if unsafe_sys::yaml_parser_parse(p, ev.as_mut_ptr()).fail {
                self.done = true;
                return Some(Event::End);
            }
            let e = &*ev.as_ptr();
            let mark = Mark::of(&e.start_mark);
            let out = match e.type_ {
                unsafe_sys::YAML_STREAM_END_EVENT | unsafe_sys::YAML_DOCUMENT_END_EVENT => {
                    self.done = true;
                    Event::End
                }
                unsafe_sys::YAML_MAPPING_START_EVENT => Event::Start { mark, mapping: true },
                unsafe_sys::YAML_SEQUENCE_START_EVENT => Event::Start { mark, mapping: false },
                unsafe_sys::YAML_MAPPING_END_EVENT | unsafe_sys::YAML_SEQUENCE_END_EVENT => Event::ContainerEnd,
                unsafe_sys::YAML_SCALAR_EVENT => {
                    let s = e.data.scalar;
                    let bytes = if s.value.is_null() {
                        &[][..]
                    } else {
                        std::slice::from_raw_parts(s.value, s.length as usize)
                    };
                    Event::Scalar {
                        mark,
                        text: String::from_utf8_lossy(bytes).into_owned(),
                        plain: s.style == unsafe_sys::YAML_PLAIN_SCALAR_STYLE,
                    }
                }
                unsafe_sys::YAML_ALIAS_EVENT => Event::Alias { mark },
                // Stream and document starts carry nothing of interest.
                _ => {
                    unsafe_sys::yaml_event_delete(ev.as_mut_ptr());
                    return self.next();
                }
            };
            unsafe_sys::yaml_event_delete(ev.as_mut_ptr());
            Some(out)
        }
    }
}

impl Drop for Parser<'_> {
    fn drop(&mut self) {
        if self.init {
            // SAFETY: initialised in `new`, deleted once.
            unsafe { unsafe_sys::yaml_parser_delete(self.sys.as_mut_ptr()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_keys_values_and_items() {
        let text = "mesh:\n  proxyUID: abc\nworkloads:\n  - name: a\n    netns: /x\n  - {name: b, pid: 5}\n";
        let p = Positions::of(text);
        assert_eq!(p.value("mesh.proxyUID"), Some(Mark { line: 2, column: 13 }));
        assert_eq!(p.key("mesh.proxyUID"), Some(Mark { line: 2, column: 3 }));
        assert_eq!(p.value("workloads[0]"), Some(Mark { line: 4, column: 5 }));
        assert_eq!(p.value("workloads[0].netns"), Some(Mark { line: 5, column: 12 }));
        assert_eq!(p.value("workloads[1].pid"), Some(Mark { line: 6, column: 20 }));
        assert_eq!(p.value("workloads[2]"), None);
        assert!(p.duplicates.is_empty());
    }

    #[test]
    fn duplicates_at_the_repeated_key() {
        let text = "mesh:\n  proxyUID: 1\n\n\n  proxyUID: 2\nworkloads:\n  - name: a\n    'name': b\n";
        let p = Positions::of(text);
        assert_eq!(
            p.duplicates,
            vec![
                Duplicate {
                    path: "mesh.proxyUID".into(),
                    first: Mark { line: 2, column: 3 },
                    again: Mark { line: 5, column: 3 }
                },
                Duplicate {
                    path: "workloads[0].name".into(),
                    first: Mark { line: 7, column: 5 },
                    again: Mark { line: 8, column: 5 }
                },
            ]
        );
        // 1 and "1" are different keys to serde_yaml.
        assert!(Positions::of("a:\n  1: x\n  '1': y\n").duplicates.is_empty());
    }

    #[test]
    fn complex_keys_aliases_and_syntax_errors_do_not_derail_it() {
        let text = "a: &x [1, 2]\n? [k, l]\n: v\nb: *x\nc: {d: 1}\n";
        let p = Positions::of(text);
        assert_eq!(p.value("a[1]"), Some(Mark { line: 1, column: 11 }));
        assert_eq!(p.value("b"), Some(Mark { line: 4, column: 4 }));
        assert_eq!(p.value("c.d"), Some(Mark { line: 5, column: 8 }));
        let p = Positions::of("a: 1\nb: [1,\n");
        assert_eq!(p.value("a"), Some(Mark { line: 1, column: 4 }));
        let p = Positions::of("");
        assert_eq!(p.value(""), None);
        // Only the first document.
        let p = Positions::of("a: 1\n---\nb: 2\n");
        assert_eq!((p.value("a").is_some(), p.value("b")), (true, None));
    }

    #[test]
    fn closest_key_within_three_edits_ignoring_case() {
        let keys = ["outboundPort", "inboundPort", "proxyUID"];
        assert_eq!(closest("proxyUid", keys), Some("proxyUID"));
        assert_eq!(closest("outbondPort", keys), Some("outboundPort"));
        assert_eq!(closest("acceleration", keys), None);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("ABC", "abc"), 0);
        assert_eq!(distance("", "abc"), 3);
    }

    #[test]
    fn problems_read_as_one_line() {
        let at = |path: &str, line| Problem { path: path.into(), line, column: Some(3), message: "bad".into() };
        let ps = Problems { list: vec![at("mesh.x", Some(2)), at("y", None)] };
        assert_eq!(ps.to_string(), "mesh.x at line 2 column 3: bad; y: bad");
        let e = anyhow::Error::new(ps.clone()).context("config file /c");
        assert_eq!(problems_of(&e), ps.list);
    }
}

//! Label selectors (`app=x,tier!=db,env in (a,b),!legacy`) and field
//! selectors (`metadata.name=x,status.phase!=Failed`), parsed from query
//! strings and matched against JSON objects.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Req>);

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("unable to parse requirement: {0:?}")]
pub struct ParseError(pub String);

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

fn set_values(rest: &str, part: &str) -> Result<Vec<String>, ParseError> {
    let inner =
        rest.trim().strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(|| ParseError(part.to_owned()))?;
    Ok(inner.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect())
}

fn parse_req(part: &str) -> Result<Req, ParseError> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Req::NotExists(key.trim().to_owned()));
    }
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Req::NotEq(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Req::Eq(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, rest)) = part.split_once(" notin ") {
        return Ok(Req::NotIn(k.trim().to_owned(), set_values(rest, part)?));
    }
    if let Some((k, rest)) = part.split_once(" in ") {
        return Ok(Req::In(k.trim().to_owned(), set_values(rest, part)?));
    }
    if part.contains(['(', ')', ' ']) {
        return Err(ParseError(part.to_owned()));
    }
    Ok(Req::Exists(part.to_owned()))
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        split_top(s).into_iter().map(parse_req).collect::<Result<_, _>>().map(LabelSelector)
    }

    /// From a metav1.LabelSelector object (`matchLabels`, `matchExpressions`).
    pub fn from_object(sel: &Value) -> Self {
        let mut reqs = Vec::new();
        if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in m {
                reqs.push(Req::Eq(k.clone(), v.as_str().unwrap_or_default().to_owned()));
            }
        }
        for e in sel.get("matchExpressions").and_then(Value::as_array).into_iter().flatten() {
            let key = e["key"].as_str().unwrap_or_default().to_owned();
            let values: Vec<String> =
                e["values"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect();
            reqs.push(match e["operator"].as_str() {
                Some("In") => Req::In(key, values),
                Some("NotIn") => Req::NotIn(key, values),
                Some("DoesNotExist") => Req::NotExists(key),
                _ => Req::Exists(key),
            });
        }
        LabelSelector(reqs)
    }

    /// From a plain label map (a Service's `spec.selector`).
    pub fn from_map(map: &Value) -> Self {
        Self::from_object(&serde_json::json!({ "matchLabels": map }))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches_labels(&self, labels: Option<&Value>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v),
            Req::NotEq(k, v) => get(k) != Some(v),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.matches_labels(object.pointer("/metadata/labels"))
    }
}

/// A field selector; any dotted path of the object can be compared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let (path, equal, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, true, v)
            } else {
                return Err(ParseError(part.to_owned()));
            };
            reqs.push((path.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, want)| {
            let pointer = format!("/{}", path.replace('.', "/"));
            let have = match object.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (have == *want) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn label_selectors_match_like_kubernetes() {
        let labels = json!({"app": "hello", "tier": "web"});
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches_labels(Some(&labels));
        assert!(ok("app=hello"));
        assert!(ok("app==hello,tier"));
        assert!(ok("app in (hello, bye),!legacy"));
        assert!(ok("tier notin (db)"));
        assert!(ok(""));
        assert!(!ok("app!=hello"));
        assert!(!ok("legacy"));
        assert!(!ok("app in (bye)"));
        assert!(LabelSelector::parse("app in hello)").is_err());
    }

    #[test]
    fn selector_objects_use_match_labels_and_expressions() {
        let sel = LabelSelector::from_object(&json!({
            "matchLabels": {"app": "x"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]
        }));
        assert!(sel.matches(&json!({"metadata": {"labels": {"app": "x", "tier": "web"}}})));
        assert!(!sel.matches(&json!({"metadata": {"labels": {"app": "x"}}})));
    }

    #[test]
    fn field_selectors_compare_dotted_paths() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n"}, "status": {"phase": "Running"}});
        let ok = |s: &str| FieldSelector::parse(s).unwrap().matches(&pod);
        assert!(ok("metadata.name=p,spec.nodeName=n"));
        assert!(ok("status.phase!=Failed,status.phase!=Succeeded"));
        assert!(!ok("metadata.name=q"));
        assert!(ok("spec.missing="));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,40}") {
            let _ = LabelSelector::parse(&s);
            let _ = FieldSelector::parse(&s);
        }
    }
}

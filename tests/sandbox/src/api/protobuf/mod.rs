//! Request bodies in Kubernetes' protobuf encoding
//! (`application/vnd.kubernetes.protobuf`), turned into the JSON object the
//! rest of the server works on. kubectl's typed clients (`kubectl create
//! deployment`, `create configmap`, ...) send it and do not fall back to JSON.
//!
//! The envelope is the magic `k8s\0` followed by a `runtime.Unknown`
//! (typeMeta = 1, raw = 2); `raw` is the object, decoded field by field with
//! the generated table in [`schema`].

mod schema;

use base64::Engine;
use serde_json::{Map, Value, json};

/// A field: tag, JSON name, type, repeated.
#[derive(Debug)]
pub struct F(pub u32, pub &'static str, pub T, pub bool);

#[derive(Debug)]
pub enum T {
    Str,
    Int,
    Bool,
    Bytes,
    MapStr,
    MapBytes,
    MapQuantity,
    Msg(&'static str),
    IntOrString,
    Quantity,
    Time,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtoError {
    #[error("not a Kubernetes protobuf envelope (missing the k8s\\0 prefix)")]
    Magic,
    #[error("truncated or malformed protobuf")]
    Malformed,
    #[error("the sandbox does not decode protobuf {0} {1}; send JSON (kubectl create -f with a manifest)")]
    Unsupported(String, String),
}

type Result<T> = std::result::Result<T, ProtoError>;

/// One wire value (fixed-width ones are skipped: no served field uses them).
enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32,
}

fn varint(buf: &mut &[u8]) -> Result<u64> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or(ProtoError::Malformed)?;
        *buf = rest;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(out);
        }
    }
    Err(ProtoError::Malformed)
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if buf.len() < n {
        return Err(ProtoError::Malformed);
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

/// Splits a message into (tag, value) pairs.
fn fields(mut buf: &[u8]) -> Result<Vec<(u32, Wire<'_>)>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let tag = u32::try_from(key >> 3).map_err(|_| ProtoError::Malformed)?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(&mut buf)?),
            1 => {
                take(&mut buf, 8)?;
                Wire::Fixed64
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| ProtoError::Malformed)?;
                Wire::Bytes(take(&mut buf, len)?)
            }
            5 => {
                take(&mut buf, 4)?;
                Wire::Fixed32
            }
            _ => return Err(ProtoError::Malformed),
        };
        out.push((tag, wire));
    }
    Ok(out)
}

fn string(w: &Wire) -> Result<String> {
    match w {
        Wire::Bytes(b) => String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Malformed),
        _ => Err(ProtoError::Malformed),
    }
}

fn bytes<'a>(w: &Wire<'a>) -> Result<&'a [u8]> {
    match w {
        Wire::Bytes(b) => Ok(b),
        _ => Err(ProtoError::Malformed),
    }
}

fn schema_of(name: &str) -> Result<&'static [F]> {
    schema::MESSAGES.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).ok_or(ProtoError::Malformed)
}

/// Scalars of a repeated field may come packed in one length-delimited value.
fn scalars(w: &Wire) -> Result<Vec<u64>> {
    match w {
        Wire::Varint(v) => Ok(vec![*v]),
        Wire::Bytes(b) => {
            let mut buf = *b;
            let mut out = Vec::new();
            while !buf.is_empty() {
                out.push(varint(&mut buf)?);
            }
            Ok(out)
        }
        _ => Err(ProtoError::Malformed),
    }
}

fn map_entry<'a>(w: &Wire<'a>) -> Result<(String, Option<Wire<'a>>)> {
    let mut key = String::new();
    let mut value = None;
    for (tag, v) in fields(bytes(w)?)? {
        match tag {
            1 => key = string(&v)?,
            2 => value = Some(v),
            _ => {}
        }
    }
    Ok((key, value))
}

fn int_or_string(w: &Wire) -> Result<Value> {
    let (mut kind, mut int, mut text) = (0, 0i64, String::new());
    for (tag, v) in fields(bytes(w)?)? {
        match (tag, &v) {
            (1, Wire::Varint(k)) => kind = *k,
            (2, Wire::Varint(i)) => int = *i as i64,
            (3, _) => text = string(&v)?,
            _ => {}
        }
    }
    Ok(if kind == 1 { json!(text) } else { json!(int as i32) })
}

fn time(w: &Wire) -> Result<Value> {
    let mut seconds = 0i64;
    for (tag, v) in fields(bytes(w)?)? {
        if let (1, Wire::Varint(s)) = (tag, v) {
            seconds = s as i64;
        }
    }
    // Go's zero time (what an unset creationTimestamp encodes as) is null in JSON.
    if seconds <= 0 {
        return Ok(Value::Null);
    }
    let ts = k8s_openapi::jiff::Timestamp::from_second(seconds).map_err(|_| ProtoError::Malformed)?;
    Ok(json!(ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()))
}

/// `resource.Quantity` is a message holding its string form.
fn quantity(buf: &[u8]) -> Result<Value> {
    let q = fields(buf)?.iter().find(|(t, _)| *t == 1).map(|(_, v)| string(v)).transpose()?;
    Ok(json!(q.unwrap_or_default()))
}

/// One value of a field (one element, for repeated ones).
fn scalar_value(t: &T, w: &Wire) -> Result<Vec<Value>> {
    let b64 = |b: &[u8]| json!(base64::engine::general_purpose::STANDARD.encode(b));
    Ok(match t {
        T::Str => vec![json!(string(w)?)],
        T::Int => scalars(w)?.into_iter().map(|v| json!(v as i64)).collect(),
        T::Bool => scalars(w)?.into_iter().map(|v| json!(v != 0)).collect(),
        T::Bytes => vec![b64(bytes(w)?)],
        T::Msg(name) => vec![message(name, bytes(w)?)?],
        T::IntOrString => vec![int_or_string(w)?],
        T::Quantity => vec![quantity(bytes(w)?)?],
        T::Time => vec![time(w)?],
        T::MapStr | T::MapBytes | T::MapQuantity => return Err(ProtoError::Malformed),
    })
}

/// Decodes a message of the named type to JSON.
fn message(name: &str, buf: &[u8]) -> Result<Value> {
    let schema = schema_of(name)?;
    let mut out = Map::new();
    for (tag, w) in fields(buf)? {
        // Unknown tags are skipped, as protobuf readers do.
        let Some(F(_, json_name, t, repeated)) = schema.iter().find(|f| f.0 == tag) else {
            continue;
        };
        let key = (*json_name).to_owned();
        match t {
            T::MapStr | T::MapBytes | T::MapQuantity => {
                let (k, v) = map_entry(&w)?;
                let value = match (t, v) {
                    (_, None) => json!(""),
                    (T::MapStr, Some(v)) => json!(string(&v)?),
                    (T::MapBytes, Some(v)) => {
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes(&v)?))
                    }
                    (T::MapQuantity, Some(v)) => quantity(bytes(&v)?)?,
                    _ => return Err(ProtoError::Malformed),
                };
                let entry = out.entry(key).or_insert_with(|| json!({}));
                entry[k] = value;
            }
            _ if *repeated => {
                let values = scalar_value(t, &w)?;
                let entry = out.entry(key).or_insert_with(|| json!([]));
                if let Some(list) = entry.as_array_mut() {
                    list.extend(values);
                }
            }
            _ => {
                // Go's encoder writes every non-pointer string, set or not; its
                // JSON omits them (omitempty), and so do we.
                let mut values = scalar_value(t, &w)?;
                if let Some(v) = values.pop().filter(|v| !v.is_null() && v.as_str() != Some("")) {
                    out.insert(key, v);
                }
            }
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a request body in the Kubernetes protobuf envelope.
pub fn decode(body: &[u8]) -> Result<Value> {
    let rest = body.strip_prefix(b"k8s\0").ok_or(ProtoError::Magic)?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (tag, w) in fields(rest)? {
        match tag {
            1 => {
                for (t, v) in fields(bytes(&w)?)? {
                    match t {
                        1 => api_version = string(&v)?,
                        2 => kind = string(&v)?,
                        _ => {}
                    }
                }
            }
            2 => raw = bytes(&w)?,
            _ => {}
        }
    }
    let root = schema::ROOTS
        .iter()
        .find(|(v, k, _)| *v == api_version && *k == kind)
        .ok_or_else(|| ProtoError::Unsupported(api_version.clone(), kind.clone()))?;
    let mut obj = message(root.2, raw)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn len_field(tag: u32, data: &[u8]) -> Vec<u8> {
        let mut out = vec![(tag << 3 | 2) as u8];
        let mut n = data.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(data);
        out
    }

    fn varint_field(tag: u32, v: u64) -> Vec<u8> {
        let mut out = vec![(tag << 3) as u8];
        let mut n = v;
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out
    }

    #[test]
    fn decodes_a_deployment_like_kubectl_create_sends() {
        // metadata{name, labels{app: hello}}, spec{replicas: 2, strategy{}, template{spec{containers[{name, image, ports[{containerPort 8080}]}]}}}
        let label = [len_field(1, b"app"), len_field(2, b"hello")].concat();
        let meta = [len_field(1, b"hello"), len_field(11, &label), len_field(8, &[]), len_field(3, b"")].concat();
        let port = varint_field(3, 8080);
        let container = [len_field(1, b"echo"), len_field(2, b"tpd-test/echo:latest"), len_field(6, &port)].concat();
        let pod_spec = len_field(2, &container);
        let template = len_field(2, &pod_spec);
        let max_surge = [varint_field(1, 1), len_field(3, b"25%")].concat();
        let strategy = len_field(2, &len_field(2, &max_surge));
        let spec = [varint_field(1, 2), len_field(3, &template), len_field(4, &strategy)].concat();
        let raw = [len_field(1, &meta), len_field(2, &spec)].concat();
        let type_meta = [len_field(1, b"apps/v1"), len_field(2, b"Deployment")].concat();
        let body = [b"k8s\0".to_vec(), len_field(1, &type_meta), len_field(2, &raw)].concat();
        let d = decode(&body).unwrap();
        assert_eq!(d["kind"], "Deployment");
        assert_eq!(d["metadata"], json!({"name": "hello", "labels": {"app": "hello"}}));
        assert_eq!(d["spec"]["replicas"], 2);
        assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["ports"], json!([{"containerPort": 8080}]));
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        assert_eq!(decode(b"{}"), Err(ProtoError::Magic));
        assert_eq!(decode(b"k8s\0\x0a\x05"), Err(ProtoError::Malformed));
        let tm = [len_field(1, b"batch/v1"), len_field(2, b"Job")].concat();
        let body = [b"k8s\0".to_vec(), len_field(1, &tm)].concat();
        assert!(matches!(decode(&body), Err(ProtoError::Unsupported(..))));
    }

    #[test]
    fn every_referenced_message_is_in_the_table() {
        for (_, fields) in schema::MESSAGES {
            for F(_, _, t, _) in fields.iter() {
                if let T::Msg(m) = t {
                    assert!(schema_of(m).is_ok(), "{m} is missing");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn never_panics(tail in prop::collection::vec(any::<u8>(), 0..200)) {
            let body = [b"k8s\0".to_vec(), tail].concat();
            let _ = decode(&body);
        }
    }
}

//! DNS questions from the developer's apps and the empty answers built from them.
#![no_main]
use libfuzzer_sys::fuzz_target;

/// The wire labels of the question's name, lower-cased, as `question` read them.
fn labels(data: &[u8], end: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 12;
    while i < end - 4 && data[i] != 0 {
        let len = usize::from(data[i]);
        out.push(data[i + 1..i + 1 + len].to_ascii_lowercase());
        i += 1 + len;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(q) = tpd_wire::dns::question(data) else { return };
    // Routing goes by the name, so it must name exactly the queried labels:
    // one label per dot-separated part.
    let wire = labels(data, q.end);
    let parts: Vec<&str> = if q.name.is_empty() { Vec::new() } else { q.name.split('.').collect() };
    assert_eq!(parts.len(), wire.len(), "{:?} from labels {wire:?}", q.name);
    for (part, label) in parts.iter().zip(&wire) {
        if let Ok(label) = std::str::from_utf8(label) {
            assert_eq!(*part, label);
        }
    }
    let answer =
        tpd_wire::dns::empty_response(data, tpd_wire::dns::RCODE_SERVFAIL).expect("a parsed query has an answer");
    assert_eq!(answer[..2], data[..2]);
});

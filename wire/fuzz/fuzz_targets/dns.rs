//! DNS questions from the developer's apps and the empty answers built from them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if tpd_wire::dns::question(data).is_ok() {
        let answer = tpd_wire::dns::empty_response(data, tpd_wire::dns::RCODE_SERVFAIL).expect("a parsed query has an answer");
        assert_eq!(answer[..2], data[..2]);
    }
});

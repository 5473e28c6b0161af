use bytes::{BufMut, BytesMut};

use super::codec::{ATTR_LEN, kind};
use super::*;
use proptest::prelude::*;

fn roundtrip<M: Message + PartialEq + Clone + std::fmt::Debug>(id: u64, m: &M) {
    let mut buf = BytesMut::new();
    encode(id, m, &mut buf);
    let mut head = BytesMut::new();
    let payload = encode_head(id, m, &mut head);
    head.extend_from_slice(payload.map_or(&[][..], |p| p));
    assert_eq!(head, buf, "the head and its payload make the whole frame");
    // Byte by byte: incomplete frames are "not yet", never errors.
    let whole = buf.clone();
    for cut in 0..whole.len() {
        let mut part = BytesMut::from(&whole[..cut]);
        assert_eq!(decode::<M>(&mut part), Ok(None));
    }
    assert_eq!(decode::<M>(&mut buf), Ok(Some((id, m.clone()))));
    assert!(buf.is_empty());
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..40)
}
fn ts() -> impl Strategy<Value = Timespec> {
    (any::<i64>(), 0u32..1_000_000_000).prop_map(|(sec, nsec)| Timespec { sec, nsec })
}
fn attr() -> impl Strategy<Value = Attr> {
    (any::<[u64; 4]>(), any::<[u32; 5]>(), ts(), ts(), ts()).prop_map(
        |([ino, rdev, size, blocks], [mode, nlink, uid, gid, blksize], atime, mtime, ctime)| Attr {
            ino,
            mode,
            nlink,
            uid,
            gid,
            rdev,
            size,
            blocks,
            blksize,
            atime,
            mtime,
            ctime,
        },
    )
}
fn timeset() -> impl Strategy<Value = TimeSet> {
    prop_oneof![Just(TimeSet::Now), ts().prop_map(TimeSet::At)]
}
fn setattr() -> impl Strategy<Value = SetAttr> {
    (
        any::<Option<u32>>(),
        any::<Option<u32>>(),
        any::<Option<u32>>(),
        any::<Option<u64>>(),
        proptest::option::of(timeset()),
        proptest::option::of(timeset()),
    )
        .prop_map(|(mode, uid, gid, size, atime, mtime)| SetAttr { mode, uid, gid, size, atime, mtime })
}

fn request() -> impl Strategy<Value = Request> {
    use Request::*;
    prop_oneof![
        any::<u16>().prop_map(|version| Hello { version }),
        (any::<u16>(), bytes()).prop_map(|(mount, path)| Stat { mount, path }),
        (any::<u16>(), bytes(), any::<u64>()).prop_map(|(mount, path, cursor)| ReadDir { mount, path, cursor }),
        (any::<u16>(), bytes(), any::<u32>()).prop_map(|(mount, path, flags)| Open { mount, path, flags }),
        (any::<u16>(), bytes(), any::<u32>(), any::<u32>()).prop_map(|(mount, path, mode, flags)| Create {
            mount,
            path,
            mode,
            flags
        }),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(handle, offset, size)| Read { handle, offset, size }),
        (any::<u64>(), any::<u64>(), bytes()).prop_map(|(handle, offset, d)| Write {
            handle,
            offset,
            data: Bytes::from(d)
        }),
        any::<u64>().prop_map(|handle| Release { handle }),
        any::<u64>().prop_map(|handle| Fsync { handle }),
        (any::<u16>(), bytes(), any::<Option<u64>>(), setattr()).prop_map(|(mount, path, handle, set)| SetAttr {
            mount,
            path,
            handle,
            set
        }),
        (any::<u16>(), bytes(), any::<u32>()).prop_map(|(mount, path, mode)| Mkdir { mount, path, mode }),
        (any::<u16>(), bytes()).prop_map(|(mount, path)| Unlink { mount, path }),
        (any::<u16>(), bytes()).prop_map(|(mount, path)| Rmdir { mount, path }),
        (any::<u16>(), bytes(), bytes(), any::<u32>())
            .prop_map(|(mount, from, to, flags)| { Rename { mount, from, to, flags } }),
        (any::<u16>(), bytes(), bytes()).prop_map(|(mount, path, target)| Symlink { mount, path, target }),
        (any::<u16>(), bytes()).prop_map(|(mount, path)| Readlink { mount, path }),
        any::<u16>().prop_map(|mount| Statfs { mount }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    use Response::*;
    prop_oneof![
        (any::<u16>(), proptest::collection::vec(("[a-z0-9-]{0,12}", any::<bool>()), 0..4)).prop_map(|(version, m)| {
            Welcome { version, mounts: m.into_iter().map(|(name, read_only)| MountInfo { name, read_only }).collect() }
        }),
        Just(Ok),
        attr().prop_map(Attr),
        (proptest::collection::vec((bytes(), attr()), 0..5), any::<Option<u64>>()).prop_map(|(e, next)| Entries {
            entries: e.into_iter().map(|(name, attr)| DirEntry { name, attr }).collect(),
            next
        }),
        (any::<u64>(), attr(), proptest::option::of(bytes())).prop_map(|(handle, attr, data)| Opened {
            handle,
            attr,
            data: data.map(Bytes::from)
        }),
        bytes().prop_map(|d| Data(Bytes::from(d))),
        any::<u32>().prop_map(Written),
        bytes().prop_map(Link),
        (any::<[u64; 5]>(), any::<[u32; 3]>()).prop_map(
            |([blocks, bfree, bavail, files, ffree], [bsize, namelen, frsize])| {
                Statfs(self::StatFs { blocks, bfree, bavail, files, ffree, bsize, namelen, frsize })
            }
        ),
        any::<i32>().prop_map(Error),
        (any::<u16>(), bytes(), bytes()).prop_map(|(mount, dir, name)| Changed { mount, dir, name }),
    ]
}

proptest! {
    #[test]
    fn requests_roundtrip(id in any::<u64>(), r in request()) {
        roundtrip(id, &r);
    }

    #[test]
    fn responses_roundtrip(id in any::<u64>(), r in response()) {
        roundtrip(id, &r);
    }

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut a = BytesMut::from(&data[..]);
        let mut b = a.clone();
        while let Ok(Some(_)) = decode::<Request>(&mut a) {}
        while let Ok(Some(_)) = decode::<Response>(&mut b) {}
    }

    /// A valid frame with its body mutated still decodes or reports the
    /// request id, and always consumes exactly that frame.
    #[test]
    fn corrupted_bodies_are_contained(id in any::<u64>(), r in request(), at in any::<usize>(), byte in any::<u8>()) {
        let mut buf = BytesMut::new();
        encode(id, &r, &mut buf);
        let len = buf.len();
        let at = 12 + at % (len - 12).max(1);
        if at < len {
            buf[at] = byte;
        }
        encode(id + 1, &Request::Statfs { mount: 0 }, &mut buf);
        match decode::<Request>(&mut buf) {
            Ok(Some((got, _))) => prop_assert_eq!(got, id),
            Err(DecodeError::Malformed { id: got, .. }) => prop_assert_eq!(got, Some(id)),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
        prop_assert_eq!(decode::<Request>(&mut buf), Ok(Some((id + 1, Request::Statfs { mount: 0 }))));
    }

    #[test]
    fn components_never_yield_escapes(path in proptest::collection::vec(prop_oneof![Just(b'/'), Just(b'.'), Just(b'a'), Just(0u8)], 0..12)) {
        if let Ok(cs) = components(&path) {
            for c in cs {
                prop_assert!(!c.is_empty() && c != b"." && c != b".." && !c.contains(&b'/') && !c.contains(&0));
            }
        }
    }
}

#[test]
fn oversized_length_is_fatal() {
    let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
    assert_eq!(decode::<Request>(&mut buf), Err(DecodeError::TooLarge(u32::MAX as usize)));
}

#[test]
fn forged_list_count_does_not_allocate() {
    let mut body = BytesMut::new();
    body.put_u8(kind::ENTRIES);
    body.put_u32(u32::MAX);
    let mut frame = BytesMut::new();
    frame.put_u32(8 + body.len() as u32);
    frame.put_u64(7);
    frame.put_slice(&body);
    assert!(matches!(decode::<Response>(&mut frame), Err(DecodeError::Malformed { id: Some(7), .. })));
}

/// Each entry is a name's length and an [`Attr`] at least, so a count
/// of 4-byte items let a 4 MiB frame allocate over 100 MiB of entries.
#[test]
fn entry_count_is_checked_against_whole_entries() {
    let mut frame = BytesMut::new();
    frame.put_u32(8 + 1 + 4 + 4000);
    frame.put_u64(7);
    frame.put_u8(kind::ENTRIES);
    frame.put_u32(1000);
    frame.put_bytes(0, 4000);
    let reason = "list longer than its frame";
    assert_eq!(decode::<Response>(&mut frame), Err(DecodeError::Malformed { id: Some(7), reason }));
}

#[test]
fn attr_len_is_what_encode_writes() {
    let mut out = BytesMut::new();
    Attr::default().encode(&mut out);
    assert_eq!(out.len(), ATTR_LEN);
}

#[test]
fn path_rules() {
    assert_eq!(components(b""), Ok(vec![]));
    assert_eq!(components(b"a/..data/b"), Ok(vec![&b"a"[..], b"..data", b"b"]));
    assert_eq!(components(b"a/../b"), Err(PathError::BadComponent));
    assert_eq!(components(b".."), Err(PathError::BadComponent));
    assert_eq!(components(b"a//b"), Err(PathError::BadComponent));
    assert_eq!(components(b"a/"), Err(PathError::BadComponent));
    assert_eq!(components(b"/etc"), Err(PathError::Absolute));
    assert_eq!(components(b"a\0b"), Err(PathError::Nul));
}

#[test]
fn symlink_rules() {
    // What Kubernetes puts in configMap and secret volumes stays inside.
    assert!(symlink_stays_inside(&[], b"..data/key"));
    assert!(symlink_stays_inside(&[b"sub"], b"../x"));
    assert!(symlink_stays_inside(&[b"a", b"b"], b"./../../c"));
    assert!(!symlink_stays_inside(&[], b"../x"));
    assert!(!symlink_stays_inside(&[b"a"], b"../../x"));
    assert!(!symlink_stays_inside(&[b"a"], b"/etc/passwd"));
    assert!(!symlink_stays_inside(&[], b""));
}

#[test]
fn mounts_env_roundtrip() {
    let json = r#"[{"name":"config","mountPath":"/etc/config","readOnly":true},
                   {"name":"data","mountPath":"/data","subPath":"x"}]"#;
    let mounts = parse_mounts(json).expect("valid");
    assert_eq!(mount_dir_name(0, &mounts[0].name), "0-config");
    assert_eq!(mount_dir_name(3, "a/b c"), "3-a_b_c");
    assert!(!mounts[1].read_only);
    assert_eq!(mounts[1].sub_path.as_deref(), Some("x"));
    assert_eq!(parse_mounts(&mounts_env_value(&mounts)).expect("valid"), mounts);
}

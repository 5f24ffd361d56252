//! Rendering: text tables, key/value encodings, JSON.

/// Renders rows as a left-aligned text table with a header line.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            if i + 1 < widths.len() {
                l.extend(std::iter::repeat_n(' ', widths[i].saturating_sub(c.chars().count())));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Shows bytes readably: printable ASCII as is, anything else as `\xNN`.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s
}

/// Decodes a key or value given on the command line (UTF-8, or hex with `--hex`).
pub fn input_bytes(s: &str, hex: bool) -> anyhow::Result<Vec<u8>> {
    if hex {
        hex::decode(s.trim()).map_err(|e| anyhow::anyhow!("{s:?} is not hex: {e}"))
    } else {
        Ok(s.as_bytes().to_vec())
    }
}

/// Shows a key or value: hex with `--hex`, else UTF-8 (escaped if it is not).
pub fn show_bytes(b: &[u8], hex: bool) -> String {
    if hex {
        hex::encode(b)
    } else {
        match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            Err(_) => escape_bytes(b),
        }
    }
}

/// Like [`show_bytes`], for a table cell: control characters (newlines, tabs,
/// other C0/C1 codes) are escaped too, so one entry stays on one line.
pub fn show_cell(b: &[u8], hex: bool) -> String {
    let s = show_bytes(b, hex);
    if !s.chars().any(char::is_control) {
        return s;
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A key or value for JSON: `{"<name>": "..."}` when UTF-8 (and not `--hex`),
/// else `{"<name>_hex": "..."}`.
pub fn json_bytes(obj: &mut serde_json::Map<String, serde_json::Value>, name: &str, b: &[u8], hex: bool) {
    match std::str::from_utf8(b) {
        Ok(s) if !hex => {
            obj.insert(name.to_string(), s.into());
        }
        _ => {
            obj.insert(format!("{name}_hex"), hex::encode(b).into());
        }
    }
}

/// Shows an internal (namespaced) key of the range map: `ns:key` when it
/// starts with a namespace prefix (`u16 len` ++ ns), else escaped bytes.
/// Empty start is `-inf`, empty end `+inf`.
pub fn show_internal_key(b: &[u8], is_end: bool) -> String {
    if b.is_empty() {
        return if is_end { "+inf".into() } else { "-inf".into() };
    }
    if let Some((ns, key)) = skv_common::keys::split_namespace(b)
        && let Ok(ns) = std::str::from_utf8(ns)
        && ns.bytes().all(|c| (0x21..=0x7e).contains(&c))
    {
        return format!("{ns}:{}", escape_bytes(key));
    }
    escape_bytes(b)
}

/// The internal key of `key` in namespace `ns`: `u16 BE len(ns)` ++ ns ++ key.
pub fn internal_key(ns: &str, key: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = skv_common::keys::namespace_prefix(ns.as_bytes())
        .ok_or_else(|| anyhow::anyhow!("a namespace is 1 to 255 bytes, {ns:?} is not"))?;
    out.extend_from_slice(key);
    Ok(out)
}

/// "3.2s ago" for a Unix-millisecond timestamp (0 = never).
pub fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let d = now.saturating_sub(unix_ms);
    if d < 60_000 {
        format!("{:.1}s ago", d as f64 / 1000.0)
    } else if d < 3_600_000 {
        format!("{}m ago", d / 60_000)
    } else {
        format!("{}h ago", d / 3_600_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "NAME"],
            &[vec!["1".into(), "a".into()], vec!["100".into(), "bb".into()]],
        );
        assert_eq!(t, "ID   NAME\n1    a\n100  bb\n");
    }

    #[test]
    fn bytes_rendering() {
        assert_eq!(escape_bytes(b"a\x00\\\xff"), "a\\x00\\\\\\xff");
        assert_eq!(show_bytes(b"hi", false), "hi");
        assert_eq!(show_bytes(b"hi", true), "6869");
        assert_eq!(show_bytes(&[0xff], false), "\\xff");
        assert_eq!(show_cell(b"a\nb\x05", false), "a\\nb\\u{5}");
        assert_eq!(show_cell(b"plain", false), "plain");
        assert_eq!(input_bytes("6869", true).unwrap(), b"hi");
        assert!(input_bytes("zz", true).is_err());
        let mut m = serde_json::Map::new();
        json_bytes(&mut m, "value", b"x", false);
        json_bytes(&mut m, "key", &[0xff], false);
        assert_eq!(
            serde_json::Value::Object(m),
            serde_json::json!({"value": "x", "key_hex": "ff"})
        );
    }

    #[test]
    fn internal_keys() {
        let k = internal_key("default", b"user/1").unwrap();
        assert_eq!(&k[..2], &[0, 7]);
        assert_eq!(show_internal_key(&k, false), "default:user/1");
        assert_eq!(show_internal_key(b"", false), "-inf");
        assert_eq!(show_internal_key(b"", true), "+inf");
        assert_eq!(show_internal_key(&[0, 9, b'a'], false), "\\x00\\x09a");
        assert!(internal_key("", b"k").is_err());
        assert!(ago(0) == "never");
    }
}

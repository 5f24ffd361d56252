//! `--object-store-url`: `s3://bucket[/prefix]` or `file:///absolute/path`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where checkpoints and backups live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectStoreUrl {
    /// An S3-compatible bucket (path-style requests; endpoint, region and keys from the
    /// `AWS_*` variables) and a key prefix ("" for the bucket's root).
    S3 { bucket: String, prefix: String },
    /// A local directory (must exist).
    File { root: PathBuf },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("object store URL {url:?} is not a URL: {reason}")]
    Syntax { url: String, reason: String },
    #[error("object store URL {url:?}: scheme {scheme:?} is not supported (use s3://bucket/prefix or file:///path)")]
    Scheme { url: String, scheme: String },
    #[error("object store URL {url:?}: {reason}")]
    Invalid { url: String, reason: String },
}

fn invalid(url: &str, reason: impl Into<String>) -> UrlError {
    UrlError::Invalid {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// S3 bucket naming rules (3 to 63 of `a-z 0-9 . -`, starting and ending with a letter or digit).
fn valid_bucket(b: &str) -> bool {
    let ok_chars = b
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
    let edges = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&b.len()) && ok_chars && edges(b.bytes().next()) && edges(b.bytes().last()) && !b.contains("..")
}

/// `url` with any user-info (`user:secret@`) replaced, so that an error message never
/// carries a credential pasted into the URL.
fn redacted(url: &str) -> String {
    let Some(start) = url.find("//").map(|i| i + 2) else {
        return url.to_string();
    };
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &url[..start], &url[start + at..]),
        None => url.to_string(),
    }
}

impl FromStr for ObjectStoreUrl {
    type Err = UrlError;

    fn from_str(raw: &str) -> Result<Self, UrlError> {
        let shown = redacted(raw);
        let s = shown.as_str();
        // Checked on the raw text: URL parsing would resolve them silently.
        if raw.split(['/', '?', '#']).any(|p| p == "." || p == "..") {
            return Err(invalid(s, "the path may not contain . or .."));
        }
        let u = url::Url::parse(raw).map_err(|e| UrlError::Syntax {
            url: s.to_string(),
            reason: e.to_string(),
        })?;
        if !u.username().is_empty() || u.password().is_some() {
            return Err(invalid(
                s,
                "credentials do not belong in the URL (use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
            ));
        }
        if u.query().is_some() || u.fragment().is_some() {
            return Err(invalid(s, "no query or fragment allowed"));
        }
        match u.scheme() {
            "s3" => {
                if u.port().is_some() {
                    return Err(invalid(
                        s,
                        "no port in an s3 URL (the endpoint comes from AWS_ENDPOINT)",
                    ));
                }
                let bucket = u.host_str().unwrap_or_default().to_string();
                if !valid_bucket(&bucket) {
                    return Err(invalid(s, format!("{bucket:?} is not a valid bucket name")));
                }
                let segments: Vec<&str> = u.path().split('/').filter(|p| !p.is_empty()).collect();
                if segments.iter().any(|p| *p == "." || *p == "..") {
                    return Err(invalid(s, "the prefix may not contain . or .."));
                }
                Ok(ObjectStoreUrl::S3 {
                    bucket,
                    prefix: segments.join("/"),
                })
            }
            "file" => {
                if !s.starts_with("file:///") || u.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(invalid(s, "a file URL names a local path: file:///absolute/path"));
                }
                let root = u
                    .to_file_path()
                    .map_err(|()| invalid(s, "not an absolute local path"))?;
                if root.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                    return Err(invalid(s, "the path may not contain .."));
                }
                Ok(ObjectStoreUrl::File { root })
            }
            other => Err(UrlError::Scheme {
                url: s.to_string(),
                scheme: other.to_string(),
            }),
        }
    }
}

impl fmt::Display for ObjectStoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectStoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            ObjectStoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            ObjectStoreUrl::File { root } => write!(f, "file://{}", root.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_urls_parse() {
        assert_eq!(
            "s3://skv-backups/prod/eu".parse(),
            Ok(ObjectStoreUrl::S3 {
                bucket: "skv-backups".into(),
                prefix: "prod/eu".into()
            })
        );
        assert_eq!(
            "s3://bkt".parse(),
            Ok(ObjectStoreUrl::S3 {
                bucket: "bkt".into(),
                prefix: String::new()
            })
        );
        assert_eq!(
            "s3://bkt/a/".parse::<ObjectStoreUrl>().map(|u| u.to_string()),
            Ok("s3://bkt/a".to_string())
        );
        assert_eq!(
            "file:///var/lib/skv/objects".parse(),
            Ok(ObjectStoreUrl::File {
                root: "/var/lib/skv/objects".into()
            })
        );
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        for bad in [
            "",
            "bucket/prefix",
            "s3://",
            "s3://Upper",
            "s3://ab",
            "s3://bkt:9000/p",
            "s3://key:secret@bkt/p",
            "s3://bkt/../x",
            "s3://bkt/p?x=1",
            "file://host/path",
            "file:relative",
            "gs://bkt/p",
            "http://127.0.0.1:9000/bkt",
        ] {
            assert!(bad.parse::<ObjectStoreUrl>().is_err(), "{bad:?} was accepted");
        }
        assert!(matches!(
            "gs://bkt".parse::<ObjectStoreUrl>(),
            Err(UrlError::Scheme { .. })
        ));
        // A credential pasted into the URL never reaches the message (logged at start).
        for bad in [
            "s3://key:hunter2secret@bkt/p",
            "s3://key:hunter2secret@bkt/../p",
            "s3://key:hunter2secret@Bad_Bucket/p",
            "file://u:hunter2secret@host/x",
        ] {
            let e = bad
                .parse::<ObjectStoreUrl>()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!e.is_empty(), "{bad:?} was accepted");
            assert!(!e.contains("hunter2secret"), "secret in {e:?}");
            assert!(e.contains("<redacted>"), "{e:?}");
        }
    }
}

//! A typed, map-like view over a key prefix.

use crate::client::{Client, KeyRange, prefix_end};
use crate::error::{Error, Result};
use crate::keycodec;
use futures::stream::{BoxStream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

/// Marks the key and value types without owning them (always Send + Sync).
type Types<K, V> = fn(K, V) -> (K, V);

/// A typed view of the keys under one prefix, used like a `BTreeMap<K, V>`.
/// Get one with [`Client::map`].
///
/// Keys are stored as `prefix ++ key-encoding(K)`, values as
/// [postcard](https://docs.rs/postcard). The key encoding is
/// order-preserving (see [`keycodec`](crate::keycodec)): integers, strings,
/// tuples, `Option`s, derived structs and enums sort in the store exactly as
/// their `Ord` says, so [`TypedMap::iter`] and [`TypedMap::range`] yield
/// entries in map order.
///
/// **Ordering caveats.** The order is that of the encoded bytes. It matches
/// `Ord` for the types above, but not for types with a hand-written `Ord` or
/// `Serialize` that disagree (e.g. a `Reverse<T>` sorts as `T`), floats sort by
/// `total_cmp`, and strings sort by UTF-8 bytes (= by code point). Types that
/// need a self-describing format (`#[serde(flatten)]`, untagged enums) cannot
/// be keys.
///
/// **Prefixes.** Pick prefixes that are not prefixes of one another (end
/// them with a separator like `/`): the map `"user"` would otherwise also see
/// the keys of `"users/"` and fail to decode them.
///
/// Each call is one or two round trips; nothing is cached locally.
///
/// ```no_run
/// # async fn demo(client: skv::Client) -> skv::Result<()> {
/// use futures::TryStreamExt;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Debug)]
/// struct Profile { name: String, karma: i64 }
///
/// let users = client.map::<u64, Profile>("users/");
/// users.insert(&7, &Profile { name: "ada".into(), karma: 10 }).await?;
/// let ada = users.get(&7).await?.expect("just inserted");
/// assert!(users.contains_key(&7).await?);
/// // Entries come back in key order: 1, 2, ..., 7, ...
/// let all: Vec<(u64, Profile)> = users.iter().try_collect().await?;
/// let some: Vec<(u64, Profile)> = users.range(5..10).try_collect().await?;
/// assert!(users.remove(&7).await?);
/// # Ok(()) }
/// ```
pub struct TypedMap<K, V> {
    client: Client,
    prefix: Vec<u8>,
    _types: PhantomData<Types<K, V>>,
}

impl<K, V> Clone for TypedMap<K, V> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            _types: PhantomData,
        }
    }
}

impl<K, V> fmt::Debug for TypedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedMap")
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .finish()
    }
}

impl Client {
    /// A typed, map-like view of the keys under `prefix`. See [`TypedMap`].
    pub fn map<K, V>(&self, prefix: impl Into<Vec<u8>>) -> TypedMap<K, V>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        TypedMap {
            client: self.clone(),
            prefix: prefix.into(),
            _types: PhantomData,
        }
    }
}

impl<K, V> TypedMap<K, V>
where
    K: Serialize + DeserializeOwned + Send + 'static,
    V: Serialize + DeserializeOwned + Send + 'static,
{
    /// The key prefix of this map.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The store key of `key`: the prefix then the order-preserving encoding.
    pub fn raw_key(&self, key: &K) -> Result<Vec<u8>> {
        let mut out = self.prefix.clone();
        keycodec::to_key_into(key, &mut out).map_err(|e| Error::Decode(format!("encoding a key: {e}")))?;
        Ok(out)
    }

    fn decode_key(prefix: &[u8], raw: &[u8]) -> Result<K> {
        let rest = raw
            .strip_prefix(prefix)
            .ok_or_else(|| Error::Decode("a scanned key lies outside the map's prefix".into()))?;
        keycodec::from_key(rest)
            .map_err(|e| Error::Decode(format!("decoding key {:?}: {e}", String::from_utf8_lossy(raw))))
    }

    fn encode_value(value: &V) -> Result<Vec<u8>> {
        postcard::to_stdvec(value).map_err(|e| Error::Decode(format!("encoding a value: {e}")))
    }

    fn decode_value(bytes: &[u8]) -> Result<V> {
        postcard::from_bytes(bytes).map_err(|e| Error::Decode(format!("decoding a value: {e}")))
    }

    /// Reads the value of `key`.
    pub async fn get(&self, key: &K) -> Result<Option<V>> {
        Ok(self.get_versioned(key).await?.map(|(v, _)| v))
    }

    /// Reads the value of `key` with its version (for [`TypedMap::put_if_version`]).
    pub async fn get_versioned(&self, key: &K) -> Result<Option<(V, u64)>> {
        match self.client.get(self.raw_key(key)?).await? {
            Some(e) => Ok(Some((Self::decode_value(&e.value)?, e.version))),
            None => Ok(None),
        }
    }

    /// Whether `key` is present.
    pub async fn contains_key(&self, key: &K) -> Result<bool> {
        Ok(self.client.get(self.raw_key(key)?).await?.is_some())
    }

    /// Sets `key` to `value` and returns the previous value, like
    /// `BTreeMap::insert`. The swap is atomic (a compare-and-swap loop), so the
    /// returned value is exactly the one this write replaced; it costs two
    /// round trips. Use [`TypedMap::put`] when the old value is not needed.
    pub async fn insert(&self, key: &K, value: &V) -> Result<Option<V>> {
        let raw = self.raw_key(key)?;
        let bytes = Self::encode_value(value)?;
        loop {
            let old = self.client.get(&raw).await?;
            let expected = old.as_ref().map_or(0, |e| e.version);
            if self
                .client
                .compare_and_swap(&raw, expected, bytes.clone())
                .await?
                .is_swapped()
            {
                return old.map(|e| Self::decode_value(&e.value)).transpose();
            }
        }
    }

    /// Sets `key` to `value` in one round trip; returns the new version.
    pub async fn put(&self, key: &K, value: &V) -> Result<u64> {
        self.client.put(self.raw_key(key)?, Self::encode_value(value)?).await
    }

    /// Sets `key` only if it is absent; [`Error::ConditionFailed`] otherwise.
    pub async fn put_if_absent(&self, key: &K, value: &V) -> Result<u64> {
        self.client
            .put_if_absent(self.raw_key(key)?, Self::encode_value(value)?)
            .await
    }

    /// Sets `key` only if its version is `version`; [`Error::ConditionFailed`] otherwise.
    pub async fn put_if_version(&self, key: &K, version: u64, value: &V) -> Result<u64> {
        self.client
            .put_if_version(self.raw_key(key)?, version, Self::encode_value(value)?)
            .await
    }

    /// Removes `key`. Returns whether it was present.
    pub async fn remove(&self, key: &K) -> Result<bool> {
        self.client.delete(self.raw_key(key)?).await
    }

    /// Streams every entry in key order.
    pub fn iter(&self) -> BoxStream<'static, Result<(K, V)>> {
        self.decode_stream(KeyRange::prefix(self.prefix.clone()))
    }

    /// Streams the keys in key order (values are still fetched).
    pub fn keys(&self) -> BoxStream<'static, Result<K>> {
        self.iter().map(|r| r.map(|(k, _)| k)).boxed()
    }

    /// Streams the entries whose keys lie in `range`, in key order.
    pub fn range<R: RangeBounds<K>>(&self, range: R) -> BoxStream<'static, Result<(K, V)>> {
        let bound = |b: Bound<&K>, end: bool| -> Result<Vec<u8>> {
            Ok(match b {
                Bound::Included(k) if end => successor(self.raw_key(k)?),
                Bound::Included(k) => self.raw_key(k)?,
                Bound::Excluded(k) if end => self.raw_key(k)?,
                Bound::Excluded(k) => successor(self.raw_key(k)?),
                Bound::Unbounded if end => prefix_end(&self.prefix),
                Bound::Unbounded => self.prefix.clone(),
            })
        };
        match (bound(range.start_bound(), false), bound(range.end_bound(), true)) {
            (Ok(start), Ok(end)) => self.decode_stream(KeyRange { start, end }),
            (Err(e), _) | (_, Err(e)) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    /// Counts the entries (a full scan of the prefix).
    pub async fn len(&self) -> Result<usize> {
        let mut n = 0;
        let mut s = self.client.scan(KeyRange::prefix(self.prefix.clone()));
        while let Some(r) = s.next().await {
            r?;
            n += 1;
        }
        Ok(n)
    }

    /// Whether the map has no entry.
    pub async fn is_empty(&self) -> Result<bool> {
        let mut s = self.client.scan_limit(KeyRange::prefix(self.prefix.clone()), 1);
        match s.next().await {
            None => Ok(true),
            Some(r) => r.map(|_| false),
        }
    }

    fn decode_stream(&self, range: KeyRange) -> BoxStream<'static, Result<(K, V)>> {
        let prefix = self.prefix.clone();
        self.client
            .scan(range)
            .map(move |r| {
                let kv = r?;
                Ok((Self::decode_key(&prefix, &kv.key)?, Self::decode_value(&kv.value)?))
            })
            .boxed()
    }
}

fn successor(mut k: Vec<u8>) -> Vec<u8> {
    k.push(0);
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct V1 {
        a: String,
        b: Vec<u32>,
    }

    async fn map<K, V>(prefix: &str) -> TypedMap<K, V>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        Client::builder()
            .endpoint("http://127.0.0.1:1")
            .connect()
            .await
            .unwrap()
            .map(prefix)
    }

    #[tokio::test]
    async fn raw_keys_keep_order_and_prefix() {
        let m = map::<(String, u32), V1>("t/").await;
        let mut keys = vec![
            ("b".to_string(), 1u32),
            ("a".to_string(), 300),
            ("a".to_string(), 2),
            ("".to_string(), 9),
            ("ab".to_string(), 0),
        ];
        let mut raws: Vec<Vec<u8>> = keys.iter().map(|k| m.raw_key(k).unwrap()).collect();
        for r in &raws {
            assert!(r.starts_with(b"t/"));
        }
        keys.sort();
        raws.sort();
        let decoded: Vec<(String, u32)> = raws
            .iter()
            .map(|r| TypedMap::<(String, u32), V1>::decode_key(b"t/", r).unwrap())
            .collect();
        assert_eq!(decoded, keys);
        assert!(TypedMap::<(String, u32), V1>::decode_key(b"x/", &raws[0]).is_err());
    }

    #[test]
    fn values_use_postcard() {
        let v = V1 {
            a: "hi".into(),
            b: vec![1, 2],
        };
        let b = TypedMap::<u8, V1>::encode_value(&v).unwrap();
        assert_eq!(b, postcard::to_stdvec(&v).unwrap());
        assert_eq!(TypedMap::<u8, V1>::decode_value(&b).unwrap(), v);
        assert!(matches!(
            TypedMap::<u8, V1>::decode_value(&[0xff, 0xff]),
            Err(Error::Decode(_))
        ));
    }
}

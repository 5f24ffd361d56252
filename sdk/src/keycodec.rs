//! An order-preserving ("memcomparable") serde encoding for the keys of
//! typed maps: for most types, `a < b` (by their derived `Ord`) exactly when
//! `encode(a) < encode(b)` byte-wise, so a scan of the store returns the
//! map's entries in the map's order.
//!
//! The format:
//! - `bool`: one byte, 0 or 1. Unsigned integers: big-endian, fixed width.
//!   Signed integers: big-endian with the sign bit flipped. `char`: its `u32`.
//! - Floats: IEEE bits, all bits flipped when negative, else the sign bit
//!   flipped (total order: -inf < -0.0 < 0.0 < +inf; NaNs sort at the ends).
//! - Strings and byte strings: the bytes with each `0x00` escaped as
//!   `0x00 0xFF`, closed by `0x00 0x00`. So `"a" < "a\0" < "ab"` holds.
//! - `Option`: `0` for `None`, `1` then the value for `Some`.
//! - Sequences and maps: each element preceded by `1`, closed by `0`.
//! - Tuples, structs, newtypes: the fields in order, nothing between them.
//!   Structs therefore sort by their fields in declaration order, as `#[derive(Ord)]` does.
//! - Enums: the variant index as big-endian `u32`, then the content.
//!
//! It is not self-describing: `deserialize_any` (untagged enums, `flatten`,
//! `serde_json::Value`) is not supported.

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use serde::ser::{self, Serialize};
use std::fmt;

/// A key could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(pub String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

impl ser::Error for CodecError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        CodecError(msg.to_string())
    }
}

impl de::Error for CodecError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        CodecError(msg.to_string())
    }
}

type Res<T> = Result<T, CodecError>;

/// Encodes `value` in the order-preserving key format.
pub fn to_key<T: Serialize + ?Sized>(value: &T) -> Res<Vec<u8>> {
    let mut s = KeySerializer { out: Vec::new() };
    value.serialize(&mut s)?;
    Ok(s.out)
}

/// Appends the encoding of `value` to `out`.
pub fn to_key_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Res<()> {
    let mut s = KeySerializer {
        out: std::mem::take(out),
    };
    let r = value.serialize(&mut s);
    *out = s.out;
    r
}

/// Decodes a key written by [`to_key`]; all of `bytes` must be used.
pub fn from_key<T: DeserializeOwned>(bytes: &[u8]) -> Res<T> {
    let mut d = KeyDeserializer { input: bytes };
    let v = T::deserialize(&mut d)?;
    if !d.input.is_empty() {
        return Err(CodecError(format!("{} trailing bytes after key", d.input.len())));
    }
    Ok(v)
}

struct KeySerializer {
    out: Vec<u8>,
}

impl KeySerializer {
    fn escaped(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.out.push(b);
            if b == 0 {
                self.out.push(0xff);
            }
        }
        self.out.extend_from_slice(&[0, 0]);
    }
}

impl<'a> ser::Serializer for &'a mut KeySerializer {
    type Ok = ();
    type Error = CodecError;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    fn serialize_bool(self, v: bool) -> Res<()> {
        self.out.push(u8::from(v));
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Res<()> {
        self.out.push((v as u8) ^ 0x80);
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> Res<()> {
        self.out.extend_from_slice(&((v as u16) ^ (1 << 15)).to_be_bytes());
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> Res<()> {
        self.out.extend_from_slice(&((v as u32) ^ (1 << 31)).to_be_bytes());
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> Res<()> {
        self.out.extend_from_slice(&((v as u64) ^ (1 << 63)).to_be_bytes());
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> Res<()> {
        self.out.extend_from_slice(&((v as u128) ^ (1 << 127)).to_be_bytes());
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Res<()> {
        self.out.push(v);
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> Res<()> {
        self.out.extend_from_slice(&v.to_be_bytes());
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> Res<()> {
        self.out.extend_from_slice(&v.to_be_bytes());
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> Res<()> {
        self.out.extend_from_slice(&v.to_be_bytes());
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> Res<()> {
        self.out.extend_from_slice(&v.to_be_bytes());
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Res<()> {
        let b = v.to_bits();
        let b = if b >> 31 == 1 { !b } else { b ^ (1 << 31) };
        self.out.extend_from_slice(&b.to_be_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Res<()> {
        let b = v.to_bits();
        let b = if b >> 63 == 1 { !b } else { b ^ (1 << 63) };
        self.out.extend_from_slice(&b.to_be_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Res<()> {
        self.serialize_u32(v as u32)
    }
    fn serialize_str(self, v: &str) -> Res<()> {
        self.escaped(v.as_bytes());
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Res<()> {
        self.escaped(v);
        Ok(())
    }
    fn serialize_none(self) -> Res<()> {
        self.out.push(0);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Res<()> {
        self.out.push(1);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Res<()> {
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Res<()> {
        Ok(())
    }
    fn serialize_unit_variant(self, _name: &'static str, idx: u32, _variant: &'static str) -> Res<()> {
        self.serialize_u32(idx)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Res<()> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        idx: u32,
        _variant: &'static str,
        value: &T,
    ) -> Res<()> {
        self.out.extend_from_slice(&idx.to_be_bytes());
        value.serialize(self)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Res<Compound<'a>> {
        Ok(Compound { s: self, marked: true })
    }
    fn serialize_tuple(self, _len: usize) -> Res<Compound<'a>> {
        Ok(Compound { s: self, marked: false })
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Res<Compound<'a>> {
        Ok(Compound { s: self, marked: false })
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        idx: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Res<Compound<'a>> {
        self.out.extend_from_slice(&idx.to_be_bytes());
        Ok(Compound { s: self, marked: false })
    }
    fn serialize_map(self, _len: Option<usize>) -> Res<Compound<'a>> {
        Ok(Compound { s: self, marked: true })
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Res<Compound<'a>> {
        Ok(Compound { s: self, marked: false })
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        idx: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Res<Compound<'a>> {
        self.out.extend_from_slice(&idx.to_be_bytes());
        Ok(Compound { s: self, marked: false })
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

/// A sequence, map, tuple or struct in progress. `marked` sequences put a
/// `1` before each element and a `0` at the end, so a prefix sorts first.
struct Compound<'a> {
    s: &'a mut KeySerializer,
    marked: bool,
}

impl Compound<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        if self.marked {
            self.s.out.push(1);
        }
        v.serialize(&mut *self.s)
    }
    fn finish(self) -> Res<()> {
        if self.marked {
            self.s.out.push(0);
        }
        Ok(())
    }
}

impl ser::SerializeSeq for Compound<'_> {
    type Ok = ();
    type Error = CodecError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        self.element(v)
    }
    fn end(self) -> Res<()> {
        self.finish()
    }
}

impl ser::SerializeTuple for Compound<'_> {
    type Ok = ();
    type Error = CodecError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        self.element(v)
    }
    fn end(self) -> Res<()> {
        self.finish()
    }
}

impl ser::SerializeTupleStruct for Compound<'_> {
    type Ok = ();
    type Error = CodecError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        self.element(v)
    }
    fn end(self) -> Res<()> {
        self.finish()
    }
}

impl ser::SerializeTupleVariant for Compound<'_> {
    type Ok = ();
    type Error = CodecError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        self.element(v)
    }
    fn end(self) -> Res<()> {
        self.finish()
    }
}

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = CodecError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Res<()> {
        self.element(k)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        v.serialize(&mut *self.s)
    }
    fn end(self) -> Res<()> {
        self.finish()
    }
}

impl ser::SerializeStruct for Compound<'_> {
    type Ok = ();
    type Error = CodecError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _key: &'static str, v: &T) -> Res<()> {
        self.element(v)
    }
    fn end(self) -> Res<()> {
        self.finish()
    }
}

impl ser::SerializeStructVariant for Compound<'_> {
    type Ok = ();
    type Error = CodecError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _key: &'static str, v: &T) -> Res<()> {
        self.element(v)
    }
    fn end(self) -> Res<()> {
        self.finish()
    }
}

struct KeyDeserializer<'de> {
    input: &'de [u8],
}

impl<'de> KeyDeserializer<'de> {
    fn take<const N: usize>(&mut self) -> Res<[u8; N]> {
        if self.input.len() < N {
            return Err(CodecError("key ends too early".into()));
        }
        let (head, rest) = self.input.split_at(N);
        self.input = rest;
        Ok(head.try_into().expect("length checked"))
    }
    fn byte(&mut self) -> Res<u8> {
        Ok(self.take::<1>()?[0])
    }
    fn escaped(&mut self) -> Res<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            match self.byte()? {
                0 => match self.byte()? {
                    0 => return Ok(out),
                    0xff => out.push(0),
                    b => return Err(CodecError(format!("bad escape 0x00 0x{b:02x} in key"))),
                },
                b => out.push(b),
            }
        }
    }
    fn marker(&mut self) -> Res<bool> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(CodecError(format!("bad element marker {b} in key"))),
        }
    }
}

impl<'de> de::Deserializer<'de> for &mut KeyDeserializer<'de> {
    type Error = CodecError;

    fn deserialize_any<V: Visitor<'de>>(self, _v: V) -> Res<V::Value> {
        Err(CodecError(
            "the key format is not self-describing (deserialize_any)".into(),
        ))
    }
    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        match self.byte()? {
            0 => v.visit_bool(false),
            1 => v.visit_bool(true),
            b => Err(CodecError(format!("bad bool {b} in key"))),
        }
    }
    fn deserialize_i8<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_i8((self.byte()? ^ 0x80) as i8)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_i16((u16::from_be_bytes(self.take()?) ^ (1 << 15)) as i16)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_i32((u32::from_be_bytes(self.take()?) ^ (1 << 31)) as i32)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_i64((u64::from_be_bytes(self.take()?) ^ (1 << 63)) as i64)
    }
    fn deserialize_i128<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_i128((u128::from_be_bytes(self.take()?) ^ (1 << 127)) as i128)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_u8(self.byte()?)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_u16(u16::from_be_bytes(self.take()?))
    }
    fn deserialize_u32<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_u32(u32::from_be_bytes(self.take()?))
    }
    fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_u64(u64::from_be_bytes(self.take()?))
    }
    fn deserialize_u128<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_u128(u128::from_be_bytes(self.take()?))
    }
    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        let b = u32::from_be_bytes(self.take()?);
        let b = if b >> 31 == 1 { b ^ (1 << 31) } else { !b };
        v.visit_f32(f32::from_bits(b))
    }
    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        let b = u64::from_be_bytes(self.take()?);
        let b = if b >> 63 == 1 { b ^ (1 << 63) } else { !b };
        v.visit_f64(f64::from_bits(b))
    }
    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        let c = u32::from_be_bytes(self.take()?);
        v.visit_char(char::from_u32(c).ok_or_else(|| CodecError(format!("bad char {c} in key")))?)
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        self.deserialize_string(v)
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        let s = String::from_utf8(self.escaped()?).map_err(|e| CodecError(format!("key string: {e}")))?;
        v.visit_string(s)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        self.deserialize_byte_buf(v)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_byte_buf(self.escaped()?)
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        match self.byte()? {
            0 => v.visit_none(),
            1 => v.visit_some(self),
            b => Err(CodecError(format!("bad option tag {b} in key"))),
        }
    }
    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, v: V) -> Res<V::Value> {
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, v: V) -> Res<V::Value> {
        v.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_seq(Marked { d: self })
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Res<V::Value> {
        v.visit_seq(Fixed { d: self, left: len })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(self, _name: &'static str, len: usize, v: V) -> Res<V::Value> {
        v.visit_seq(Fixed { d: self, left: len })
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Res<V::Value> {
        v.visit_map(Marked { d: self })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Res<V::Value> {
        v.visit_seq(Fixed {
            d: self,
            left: fields.len(),
        })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Res<V::Value> {
        v.visit_enum(self)
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, _v: V) -> Res<V::Value> {
        Err(CodecError("identifiers are not stored in keys".into()))
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, _v: V) -> Res<V::Value> {
        Err(CodecError("the key format cannot skip values".into()))
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

struct Fixed<'a, 'de> {
    d: &'a mut KeyDeserializer<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Fixed<'_, 'de> {
    type Error = CodecError;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Res<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.d).map(Some)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

struct Marked<'a, 'de> {
    d: &'a mut KeyDeserializer<'de>,
}

impl<'de> de::SeqAccess<'de> for Marked<'_, 'de> {
    type Error = CodecError;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Res<Option<T::Value>> {
        if !self.d.marker()? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.d).map(Some)
    }
}

impl<'de> de::MapAccess<'de> for Marked<'_, 'de> {
    type Error = CodecError;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Res<Option<K::Value>> {
        if !self.d.marker()? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.d).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Res<V::Value> {
        seed.deserialize(&mut *self.d)
    }
}

impl<'de> de::EnumAccess<'de> for &mut KeyDeserializer<'de> {
    type Error = CodecError;
    type Variant = Self;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Res<(V::Value, Self)> {
        let idx = u32::from_be_bytes(self.take()?);
        let v = seed.deserialize(IntoDeserializer::<CodecError>::into_deserializer(idx))?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for &mut KeyDeserializer<'de> {
    type Error = CodecError;
    fn unit_variant(self) -> Res<()> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Res<T::Value> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Res<V::Value> {
        v.visit_seq(Fixed { d: self, left: len })
    }
    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], v: V) -> Res<V::Value> {
        v.visit_seq(Fixed {
            d: self,
            left: fields.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use std::fmt::Debug;

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: T) {
        let b = to_key(&v).unwrap();
        assert_eq!(from_key::<T>(&b).unwrap(), v, "bytes {b:?}");
    }

    /// Checks that the encodings sort as the values do (`values` need not be sorted).
    fn order_preserved<T: Serialize + Ord + Debug + Clone>(values: &[T]) {
        let mut by_value = values.to_vec();
        by_value.sort();
        let mut by_bytes: Vec<(Vec<u8>, T)> = values.iter().map(|v| (to_key(v).unwrap(), v.clone())).collect();
        by_bytes.sort_by(|a, b| a.0.cmp(&b.0));
        let by_bytes: Vec<T> = by_bytes.into_iter().map(|(_, v)| v).collect();
        assert_eq!(by_value, by_bytes);
    }

    #[derive(Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Debug, Clone)]
    struct User {
        team: String,
        id: u32,
    }

    #[derive(Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Debug, Clone)]
    enum Shape {
        Dot,
        Line(i16),
        Rect { w: u8, h: u8 },
        Pair(u8, String),
    }

    #[test]
    fn integers_sort() {
        order_preserved(&[0u64, 1, 255, 256, 65535, 1 << 40, u64::MAX, 7]);
        order_preserved(&[0i64, -1, 1, i64::MIN, i64::MAX, -300, 300]);
        order_preserved(&[0i8, -1, 1, i8::MIN, i8::MAX]);
        order_preserved(&[0i32, -1, 1, i32::MIN, i32::MAX, -70000]);
        order_preserved(&[0i128, -1, 1, i128::MIN, i128::MAX]);
        order_preserved(&[0u16, 1, 300, u16::MAX]);
        order_preserved(&[false, true]);
        order_preserved(&['a', 'b', 'é', '\0', '😀']);
    }

    #[test]
    fn strings_sort() {
        let v: Vec<String> = [
            "", "a", "a\0", "a\0\0", "a\x01", "ab", "b", "\u{ff}", "é", "aa", "a\u{7f}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        order_preserved(&v);
        order_preserved(&[vec![0u8], vec![], vec![0, 0], vec![1], vec![0, 0xff], vec![0xff]]);
        for s in &v {
            roundtrip(s.clone());
        }
        roundtrip(vec![0u8, 0xff, 0, 1]);
    }

    #[test]
    fn floats_sort() {
        let vals = [
            0.0f64,
            -0.0,
            1.5,
            -1.5,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e-300,
            -1e300,
            42.0,
        ];
        let mut sorted = vals.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let mut enc: Vec<(Vec<u8>, f64)> = vals.iter().map(|v| (to_key(v).unwrap(), *v)).collect();
        enc.sort_by(|a, b| a.0.cmp(&b.0));
        let got: Vec<u64> = enc.iter().map(|(_, v)| v.to_bits()).collect();
        let want: Vec<u64> = sorted.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want);
        for v in vals {
            assert_eq!(from_key::<f64>(&to_key(&v).unwrap()).unwrap().to_bits(), v.to_bits());
        }
        assert_eq!(from_key::<f32>(&to_key(&-2.5f32).unwrap()).unwrap(), -2.5);
    }

    #[test]
    fn composites_sort_and_roundtrip() {
        let users = vec![
            User {
                team: "b".into(),
                id: 1,
            },
            User {
                team: "a".into(),
                id: 2,
            },
            User {
                team: "a".into(),
                id: 10,
            },
            User {
                team: "ab".into(),
                id: 0,
            },
            User {
                team: "".into(),
                id: u32::MAX,
            },
        ];
        order_preserved(&users);
        for u in &users {
            roundtrip(u.clone());
        }
        order_preserved(&[(1u8, "z".to_string()), (0, "zz".into()), (1, "a".into())]);
        order_preserved(&[None, Some(0u32), Some(5)]);
        order_preserved(&[vec![1u32, 2], vec![1], vec![], vec![0, 9, 9], vec![1, 2, 0]]);
        let shapes = vec![
            Shape::Rect { w: 1, h: 2 },
            Shape::Dot,
            Shape::Line(-5),
            Shape::Line(3),
            Shape::Pair(1, "x".into()),
            Shape::Rect { w: 0, h: 9 },
        ];
        order_preserved(&shapes);
        for s in &shapes {
            roundtrip(s.clone());
        }
        roundtrip(std::collections::BTreeMap::from([
            (1u8, "a".to_string()),
            (2, "b".into()),
        ]));
        roundtrip(((), Some(Some(true)), 'x', 7u128, -7i16));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(from_key::<u32>(&[1, 2]).is_err());
        assert!(from_key::<u8>(&[1, 2]).is_err(), "trailing bytes");
        assert!(from_key::<String>(b"abc").is_err(), "no terminator");
        assert!(from_key::<String>(&[b'a', 0, 7]).is_err(), "bad escape");
        assert!(from_key::<bool>(&[2]).is_err());
        let mut out = b"pre/".to_vec();
        to_key_into(&5u8, &mut out).unwrap();
        assert_eq!(out, b"pre/\x05");
    }
}

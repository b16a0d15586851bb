//! The model artifacts `edgeloop-int8-v1` and `edgeloop-f32-v1`: the bytes
//! in `ModelUpdate.artifact`.
//!
//! All integers and floats are little-endian; strings are a `u8` length
//! followed by that many UTF-8 bytes. `n_in = 6 × channels`,
//! `n_out = classes`.
//!
//! ```text
//! magic            8 bytes  "EDGELOOP"
//! format           string   "edgeloop-int8-v1" or "edgeloop-f32-v1"
//! window           u32      feature window, readings
//! channels         u8 count, then that many strings
//! classes          u16 count, then that many strings
//! mean             n_in × f32   standardization
//! std              n_in × f32
//! -- edgeloop-f32-v1 --
//! weights          n_out × n_in × f32, row-major (one row per class)
//! bias             n_out × f32
//! -- edgeloop-int8-v1 --
//! input_scale      f32      input_zero_point   i8
//! output_scale     f32      output_zero_point  i8
//! weight_scales    n_out × f32
//! weights          n_out × n_in × i8, row-major, -127..=127
//! bias             n_out × i32
//! multipliers      n_out × (i32 quantized_multiplier, i8 shift)
//! ```
//!
//! Nothing may follow. [`Artifact::decode`] checks every length before
//! reading, validates the model (finite positive scales, multipliers equal
//! to those the scales give, shapes) and never panics on any input.

use super::{FloatModel, Int8Model, ModelError, QuantParams, F32_FORMAT, INT8_FORMAT, MAX_CLASSES};
use crate::features::FeatureSet;

const MAGIC: &[u8; 8] = b"EDGELOOP";

/// Why an artifact could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The bytes do not start with `EDGELOOP`.
    #[error("not an edgeloop model artifact (the magic bytes are missing)")]
    BadMagic,
    /// The bytes end before a field is complete.
    #[error(
        "model artifact is truncated: field `{field}` at byte {offset} needs {needed} more bytes"
    )]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Where it starts.
        offset: usize,
        /// Bytes it needs.
        needed: usize,
    },
    /// A string field is not UTF-8.
    #[error("model artifact field `{field}` at byte {offset} is not UTF-8")]
    BadUtf8 {
        /// The field.
        field: &'static str,
        /// Where it starts.
        offset: usize,
    },
    /// The format string is not one this build knows.
    #[error("unknown model format `{0}`; this build reads {INT8_FORMAT} and {F32_FORMAT}")]
    UnknownFormat(String),
    /// The artifact is of the other format than the one asked for.
    #[error("expected a {expected} artifact, got {got}")]
    WrongFormat {
        /// Wanted.
        expected: &'static str,
        /// Found.
        got: &'static str,
    },
    /// Bytes follow the last field.
    #[error("model artifact has {0} unexpected bytes after its last field")]
    TrailingBytes(usize),
    /// The fields decode but do not make a valid model.
    #[error("model artifact is invalid: {0}")]
    Invalid(#[from] ModelError),
}

/// A decoded artifact of either format.
#[derive(Debug, Clone, PartialEq)]
pub enum Artifact {
    /// `edgeloop-int8-v1`.
    Int8(Int8Model),
    /// `edgeloop-f32-v1`.
    F32(FloatModel),
}

impl Artifact {
    /// The `ModelUpdate.format` string of this artifact.
    pub fn format(&self) -> &'static str {
        match self {
            Artifact::Int8(_) => INT8_FORMAT,
            Artifact::F32(_) => F32_FORMAT,
        }
    }

    /// Encodes the artifact.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Artifact::Int8(m) => m.encode(),
            Artifact::F32(m) => m.encode(),
        }
    }

    /// Decodes either format. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Artifact, CodecError> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take("magic", MAGIC.len())? != MAGIC {
            return Err(CodecError::BadMagic);
        }
        let format = r.string("format")?;
        let int8 = match format.as_str() {
            INT8_FORMAT => true,
            F32_FORMAT => false,
            _ => return Err(CodecError::UnknownFormat(format)),
        };
        let window = r.u32("window")? as usize;
        let n_channels = r.u8("channels")? as usize;
        let channels = (0..n_channels)
            .map(|_| r.string("channels"))
            .collect::<Result<Vec<_>, _>>()?;
        let features = FeatureSet { channels, window };
        let n_classes = r.u16("classes")? as usize;
        if n_classes > MAX_CLASSES {
            return Err(ModelError::Invalid {
                field: "classes",
                reason: format!("{n_classes} classes; at most {MAX_CLASSES} are allowed"),
            }
            .into());
        }
        let classes = (0..n_classes)
            .map(|_| r.string("classes"))
            .collect::<Result<Vec<_>, _>>()?;
        let n_in = features.len();
        let mean = r.f32s("mean", n_in)?;
        let std = r.f32s("std", n_in)?;
        let artifact = if int8 {
            let input = QuantParams {
                scale: r.f32("input_scale")?,
                zero_point: i32::from(r.u8("input_zero_point")? as i8),
            };
            let output = QuantParams {
                scale: r.f32("output_scale")?,
                zero_point: i32::from(r.u8("output_zero_point")? as i8),
            };
            let weight_scales = r.f32s("weight_scales", n_classes)?;
            let weights = r
                .take("weights", n_classes * n_in)?
                .iter()
                .map(|b| *b as i8)
                .collect();
            let bias = (0..n_classes)
                .map(|_| r.i32("bias"))
                .collect::<Result<_, _>>()?;
            let multipliers = (0..n_classes)
                .map(|_| Ok((r.i32("multipliers")?, i32::from(r.u8("multipliers")? as i8))))
                .collect::<Result<_, CodecError>>()?;
            let model = Int8Model {
                features,
                classes,
                mean,
                std,
                input,
                output,
                weights,
                weight_scales,
                bias,
                multipliers,
            };
            model.validate()?;
            Artifact::Int8(model)
        } else {
            let weights = r.f32s("weights", n_classes * n_in)?;
            let bias = r.f32s("bias", n_classes)?;
            let model = FloatModel {
                features,
                classes,
                mean,
                std,
                weights,
                bias,
            };
            model.validate()?;
            Artifact::F32(model)
        };
        let rest = bytes.len() - r.pos.min(bytes.len());
        if rest > 0 {
            return Err(CodecError::TrailingBytes(rest));
        }
        Ok(artifact)
    }
}

impl Int8Model {
    /// The `edgeloop-int8-v1` artifact.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = header(
            INT8_FORMAT,
            &self.features,
            &self.classes,
            &self.mean,
            &self.std,
        );
        w.extend(self.input.scale.to_le_bytes());
        w.push(self.input.zero_point as i8 as u8);
        w.extend(self.output.scale.to_le_bytes());
        w.push(self.output.zero_point as i8 as u8);
        for s in &self.weight_scales {
            w.extend(s.to_le_bytes());
        }
        w.extend(self.weights.iter().map(|v| *v as u8));
        for b in &self.bias {
            w.extend(b.to_le_bytes());
        }
        for (m, s) in &self.multipliers {
            w.extend(m.to_le_bytes());
            w.push(*s as i8 as u8);
        }
        w
    }

    /// Decodes an `edgeloop-int8-v1` artifact. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Int8Model, CodecError> {
        match Artifact::decode(bytes)? {
            Artifact::Int8(m) => Ok(m),
            other => Err(CodecError::WrongFormat {
                expected: INT8_FORMAT,
                got: other.format(),
            }),
        }
    }
}

impl FloatModel {
    /// The `edgeloop-f32-v1` artifact.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = header(
            F32_FORMAT,
            &self.features,
            &self.classes,
            &self.mean,
            &self.std,
        );
        for v in self.weights.iter().chain(&self.bias) {
            w.extend(v.to_le_bytes());
        }
        w
    }

    /// Decodes an `edgeloop-f32-v1` artifact. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<FloatModel, CodecError> {
        match Artifact::decode(bytes)? {
            Artifact::F32(m) => Ok(m),
            other => Err(CodecError::WrongFormat {
                expected: F32_FORMAT,
                got: other.format(),
            }),
        }
    }
}

// Lengths are bounded by validation (channels ≤ 64, names ≤ 255 bytes,
// classes ≤ 256), so the narrowing casts below are exact for valid models.
fn header(
    format: &str,
    features: &FeatureSet,
    classes: &[String],
    mean: &[f32],
    std: &[f32],
) -> Vec<u8> {
    let mut w = Vec::new();
    w.extend(MAGIC);
    put_str(&mut w, format);
    w.extend((features.window as u32).to_le_bytes());
    w.push(features.channels.len() as u8);
    for c in &features.channels {
        put_str(&mut w, c);
    }
    w.extend((classes.len() as u16).to_le_bytes());
    for c in classes {
        put_str(&mut w, c);
    }
    for v in mean.iter().chain(std) {
        w.extend(v.to_le_bytes());
    }
    w
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(255)];
    w.push(bytes.len() as u8);
    w.extend(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n);
        match end.and_then(|end| self.bytes.get(self.pos..end)) {
            Some(slice) => {
                self.pos += n;
                Ok(slice)
            }
            None => Err(CodecError::Truncated {
                field,
                offset: self.pos,
                needed: n,
            }),
        }
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn i32(&mut self, field: &'static str) -> Result<i32, CodecError> {
        Ok(i32::from_le_bytes(self.array(field)?))
    }
    fn f32(&mut self, field: &'static str) -> Result<f32, CodecError> {
        Ok(f32::from_le_bytes(self.array(field)?))
    }
    fn f32s(&mut self, field: &'static str, n: usize) -> Result<Vec<f32>, CodecError> {
        let bytes = self.take(field, n.saturating_mul(4))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn string(&mut self, field: &'static str) -> Result<String, CodecError> {
        let len = self.u8(field)? as usize;
        let offset = self.pos;
        let bytes = self.take(field, len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CodecError::BadUtf8 { field, offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quantize;

    fn models() -> Result<(FloatModel, Int8Model), ModelError> {
        let features = FeatureSet {
            channels: vec!["temp".into(), "hum".into()],
            window: 8,
        };
        let weights: Vec<f32> = (0..36)
            .map(|i| ((i * 37) % 17) as f32 / 4.0 - 2.0)
            .collect();
        let float = FloatModel::new(
            features,
            vec!["normal".into(), "hot".into(), "wet".into()],
            (0..12).map(|i| i as f32).collect(),
            (0..12).map(|i| 1.0 + i as f32 / 10.0).collect(),
            weights,
            vec![0.1, -0.2, 0.3],
        )?;
        let calibration: Vec<Vec<f32>> = (0..20)
            .map(|k| {
                (0..12)
                    .map(|i| (i as f32) + ((k * 5 + i) % 7) as f32 - 3.0)
                    .collect()
            })
            .collect();
        let int8 = quantize(&float, &calibration)?;
        Ok((float, int8))
    }

    #[test]
    fn both_formats_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let (float, int8) = models()?;
        assert_eq!(FloatModel::decode(&float.encode())?, float);
        assert_eq!(Int8Model::decode(&int8.encode())?, int8);
        assert_eq!(Artifact::decode(&int8.encode())?.format(), INT8_FORMAT);
        assert!(matches!(
            Int8Model::decode(&float.encode()),
            Err(CodecError::WrongFormat { .. })
        ));
        Ok(())
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_or_a_valid_model(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (float, int8) = models()?;
        for bytes in [float.encode(), int8.encode()] {
            for cut in 0..bytes.len() {
                assert!(
                    Artifact::decode(&bytes[..cut]).is_err(),
                    "prefix of {cut} bytes decoded"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Artifact::decode(&longer), Err(CodecError::TrailingBytes(1)));
            for i in 0..bytes.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut b = bytes.clone();
                    b[i] ^= flip;
                    // Must not panic; a decoded model must be usable.
                    if let Ok(Artifact::Int8(m)) = Artifact::decode(&b) {
                        let _ = m.predict(&vec![1.0; m.n_inputs()]);
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn errors_name_the_field() -> Result<(), Box<dyn std::error::Error>> {
        let (_, int8) = models()?;
        let mut bytes = int8.encode();
        assert_eq!(Artifact::decode(b"NOTAMODEL"), Err(CodecError::BadMagic));
        let cut = bytes.len() - 3;
        let err = Artifact::decode(&bytes[..cut]).unwrap_err().to_string();
        assert!(err.contains("multipliers"), "{err}");
        // Corrupt the last multiplier's shift: validation catches it.
        if let Some(last) = bytes.last_mut() {
            *last = last.wrapping_add(1);
        }
        let err = Artifact::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("multipliers"), "{err}");
        Ok(())
    }
}

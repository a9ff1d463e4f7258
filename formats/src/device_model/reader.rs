//! The `no_std`, zero-copy device model reader.

use core::cmp::Ordering;

use qdylora_core::double_quant::DoubleQuantRef;
use qdylora_core::dynamic_map::CODE_LEN;
use qdylora_core::infer::{DecoderConfig, DecoderWeights, LinearKind, NormKind};
use qdylora_core::kernels::Nf4Matrix;
use qdylora_core::{ElementType, nf4};

use super::{
    CODE8_OFFSET, DATA_ALIGN, FIXED_HEADER_LEN, MAGIC, Nf4Parts, TABLE_OFFSET, TENSOR_ENTRY_LEN,
    TensorKind, VERSION, field, header_len_for, limits,
};
use crate::elem_view::ElemView;
use crate::error::{Field, FormatError, ModelTensor};
use crate::le::{self, region};

/// A parsed device model over borrowed bytes.
///
/// `parse` checks the header and its checksum, the config, every tensor entry and region
/// (bounds, order, alignment, CRC-32), and that the tensors are exactly the ones the config's
/// decoder needs, with the right kinds and shapes. The buffer's address must be 4-byte aligned
/// (the nested absmax is handed out as `&[f32]`); [`crate::AlignedBytes`] gives such a buffer.
#[derive(Debug, Clone)]
pub struct DeviceModelReader<'a> {
    bytes: &'a [u8],
    config: DecoderConfig,
    fingerprint: [u8; 16],
    code8: [f32; CODE_LEN],
    tensor_count: u32,
    names_len: u32,
    embedding: u32,
    final_norm: u32,
    lm_head: u32,
}

/// A tensor table entry, decoded.
#[derive(Debug, Clone, Copy)]
struct Entry {
    name_offset: u32,
    name_len: u32,
    kind_code: u8,
    ndim: u8,
    reserved: u16,
    dims: [u32; 2],
    blocksize: u32,
    dq_offset: f32,
    crc: u32,
    data_offset: u64,
    data_len: u64,
    reserved_tail: [u8; 16],
}

impl<'a> DeviceModelReader<'a> {
    /// Parses a device model.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        if bytes.len() < MAGIC.len() {
            return Err(FormatError::Truncated {
                field: Field::Magic,
                needed: MAGIC.len() as u64,
                available: bytes.len() as u64,
            });
        }
        if bytes[..MAGIC.len()] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if bytes.len() < TABLE_OFFSET {
            return Err(FormatError::Truncated {
                field: Field::HeaderLen,
                needed: TABLE_OFFSET as u64,
                available: bytes.len() as u64,
            });
        }
        let version = le::u16_at(bytes, field::VERSION);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let header_len = le::u64_at(bytes, field::HEADER_LEN);
        let header = le::checked_header(
            bytes,
            header_len,
            TABLE_OFFSET,
            DATA_ALIGN,
            field::HEADER_CRC,
            FIXED_HEADER_LEN,
        )?;
        let file_len = le::u64_at(header, field::FILE_LEN);
        if (bytes.len() as u64) < file_len {
            return Err(FormatError::Truncated {
                field: Field::FileLen,
                needed: file_len,
                available: bytes.len() as u64,
            });
        }
        if (bytes.len() as u64) > file_len {
            return Err(FormatError::TrailingBytes {
                expected_len: file_len,
                actual_len: bytes.len() as u64,
            });
        }
        for (at, value) in [
            (
                field::RESERVED0,
                u32::from(le::u16_at(header, field::RESERVED0)),
            ),
            (field::RESERVED1, le::u32_at(header, field::RESERVED1)),
        ] {
            if value != 0 {
                return Err(FormatError::InvalidValue {
                    field: Field::Reserved,
                    value: at as u64,
                });
            }
        }
        if header[field::CONFIG + field::CONFIG_LEN..field::HEADER_CRC]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(FormatError::InvalidValue {
                field: Field::Reserved,
                value: (field::CONFIG + field::CONFIG_LEN) as u64,
            });
        }
        let tensor_count = le::u32_at(header, field::TENSOR_COUNT);
        if tensor_count > limits::MAX_TENSORS {
            return Err(FormatError::TooLarge {
                field: Field::TensorCount,
                value: tensor_count.into(),
                limit: limits::MAX_TENSORS.into(),
            });
        }
        let names_len = le::u32_at(header, field::NAMES_LEN);
        if names_len > limits::MAX_NAMES_LEN {
            return Err(FormatError::TooLarge {
                field: Field::NamesLen,
                value: names_len.into(),
                limit: limits::MAX_NAMES_LEN.into(),
            });
        }
        if header_len_for(tensor_count, names_len) != Some(header_len) {
            return Err(FormatError::InvalidValue {
                field: Field::HeaderLen,
                value: header_len,
            });
        }
        let config = decode_config(&header[field::CONFIG..field::CONFIG + field::CONFIG_LEN])?;
        let mut code8 = [0.0f32; CODE_LEN];
        for (i, c) in code8.iter_mut().enumerate() {
            *c = le::f32_at(header, CODE8_OFFSET + 4 * i);
            if !c.is_finite() {
                return Err(FormatError::InvalidValue {
                    field: Field::Code8,
                    value: c.to_bits().into(),
                });
            }
        }
        if !(bytes.as_ptr() as usize).is_multiple_of(4) {
            return Err(FormatError::BufferMisaligned { align: 4 });
        }

        let mut reader = Self {
            bytes,
            config,
            fingerprint: le::bytes16_at(header, field::FINGERPRINT),
            code8,
            tensor_count,
            names_len,
            embedding: 0,
            final_norm: 0,
            lm_head: 0,
        };
        reader.check_table(header_len)?;
        reader.check_model()?;
        Ok(reader)
    }

    /// Checks every entry: names sorted and unique, kinds and shapes valid, regions in order,
    /// aligned, inside the file, of the right length and intact.
    fn check_table(&self, header_len: u64) -> Result<(), FormatError> {
        let mut names_end = 0u32;
        let mut data_end = header_len;
        let mut previous: &[u8] = &[];
        for index in 0..self.tensor_count {
            let e = self.entry(index);
            if e.name_offset != names_end {
                return Err(FormatError::InvalidValue {
                    field: Field::TensorName,
                    value: e.name_offset.into(),
                });
            }
            let name =
                self.name_bytes(e.name_offset, e.name_len)
                    .ok_or(FormatError::OutOfBounds {
                        field: Field::TensorName,
                        index,
                        offset: e.name_offset.into(),
                        len: e.name_len.into(),
                    })?;
            if name.is_empty()
                || core::str::from_utf8(name).is_err()
                || (index > 0 && name <= previous)
            {
                return Err(FormatError::BadName {
                    field: Field::TensorName,
                    index,
                });
            }
            names_end = e.name_offset + e.name_len;
            previous = name;

            if e.reserved != 0 || e.reserved_tail.iter().any(|&b| b != 0) {
                return Err(FormatError::InvalidValue {
                    field: Field::Reserved,
                    value: index.into(),
                });
            }
            let expected_len = entry_data_len(&e, index)?;
            if e.data_len != expected_len {
                return Err(FormatError::InvalidValue {
                    field: Field::TensorData,
                    value: e.data_len,
                });
            }
            if e.data_offset < data_end {
                return Err(FormatError::Overlap {
                    field: Field::TensorData,
                    index,
                    offset: e.data_offset,
                });
            }
            let aligned = le::align_up(data_end, DATA_ALIGN).ok_or(FormatError::OutOfBounds {
                field: Field::TensorData,
                index,
                offset: e.data_offset,
                len: e.data_len,
            })?;
            if e.data_offset != aligned {
                return Err(if e.data_offset.is_multiple_of(DATA_ALIGN) {
                    FormatError::InvalidValue {
                        field: Field::TensorData,
                        value: e.data_offset,
                    }
                } else {
                    FormatError::Misaligned {
                        field: Field::TensorData,
                        offset: e.data_offset,
                        align: DATA_ALIGN as u32,
                    }
                });
            }
            let data = region(
                self.bytes,
                Field::TensorData,
                index,
                e.data_offset,
                e.data_len,
            )?;
            let computed = le::crc32(&[data]);
            if !le::checksum_ok(e.crc, computed) {
                return Err(FormatError::ChecksumMismatch {
                    field: Field::TensorChecksum,
                    index,
                    stored: e.crc,
                    computed,
                });
            }
            data_end = e.data_offset + e.data_len;
        }
        if names_end != self.names_len {
            return Err(FormatError::InvalidValue {
                field: Field::NamesLen,
                value: self.names_len.into(),
            });
        }
        if data_end != self.bytes.len() as u64 {
            return Err(FormatError::InvalidValue {
                field: Field::FileLen,
                value: self.bytes.len() as u64,
            });
        }
        Ok(())
    }

    /// Checks that the table holds exactly the decoder's tensors, and remembers the model-level ones.
    fn check_model(&mut self) -> Result<(), FormatError> {
        let cfg = self.config;
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let dense = [TensorKind::F32, TensorKind::F16];
        self.embedding = self.require(
            ModelTensor::Embedding,
            0,
            &[b"model.embed_tokens.weight"],
            &dense,
            [vocab, hidden],
        )?;
        self.final_norm = self.require(
            ModelTensor::FinalNorm,
            0,
            &[b"model.norm.weight"],
            &dense,
            [hidden, 1],
        )?;
        self.lm_head = if cfg.tie_word_embeddings {
            self.embedding
        } else {
            self.require(
                ModelTensor::LmHead,
                0,
                &[b"lm_head.weight"],
                &dense,
                [vocab, hidden],
            )?
        };
        for layer in 0..cfg.num_layers as usize {
            for which in [NormKind::Input, NormKind::PostAttention] {
                self.require_layer(
                    ModelTensor::Norm(which),
                    layer,
                    norm_name(which),
                    &dense,
                    [hidden, 1],
                )?;
            }
            for which in LinearKind::ALL {
                let shape = which.shape(&cfg);
                self.require_layer(
                    ModelTensor::Linear(which),
                    layer,
                    which.layer_path(),
                    &[TensorKind::Nf4DoubleQuant],
                    [shape.out_features, shape.in_features],
                )?;
            }
        }
        let expected = 2 + u64::from(!cfg.tie_word_embeddings) + 9 * u64::from(cfg.num_layers);
        if u64::from(self.tensor_count) != expected {
            return Err(FormatError::UnexpectedTensors {
                found: self.tensor_count,
                expected: u32::try_from(expected).unwrap_or(u32::MAX),
            });
        }
        Ok(())
    }

    fn require_layer(
        &self,
        tensor: ModelTensor,
        layer: usize,
        path: &str,
        kinds: &[TensorKind],
        dims: [u32; 2],
    ) -> Result<u32, FormatError> {
        let mut digits = [0u8; 20];
        let layer_digits = le::decimal(layer, &mut digits);
        let parts: [&[u8]; 5] = [
            b"model.layers.",
            layer_digits,
            b".",
            path.as_bytes(),
            b".weight",
        ];
        self.require(tensor, layer as u32, &parts, kinds, dims)
    }

    fn require(
        &self,
        tensor: ModelTensor,
        layer: u32,
        name: &[&[u8]],
        kinds: &[TensorKind],
        dims: [u32; 2],
    ) -> Result<u32, FormatError> {
        let problem = |problem| FormatError::ModelTensor {
            tensor,
            layer,
            problem,
        };
        let index = self.find_by(name).ok_or(problem(Field::TensorName))?;
        let e = self.entry(index);
        match TensorKind::from_code(e.kind_code) {
            Some(kind) if kinds.contains(&kind) => {}
            _ => return Err(problem(Field::TensorKind)),
        }
        if e.dims != dims {
            return Err(problem(Field::TensorShape));
        }
        Ok(index)
    }

    fn find_by(&self, parts: &[&[u8]]) -> Option<u32> {
        le::search(self.tensor_count as usize, |i| {
            let e = self.entry(i as u32);
            self.name_bytes(e.name_offset, e.name_len)
                .map_or(Ordering::Greater, |name| le::cmp_concat(name, parts))
        })
        .map(|i| i as u32)
    }

    fn entry(&self, index: u32) -> Entry {
        let at = TABLE_OFFSET + index as usize * TENSOR_ENTRY_LEN;
        let b = self.bytes;
        let mut reserved_tail = [0u8; 16];
        if let Some(tail) = b.get(at + 48..at + 64) {
            reserved_tail.copy_from_slice(tail);
        }
        Entry {
            name_offset: le::u32_at(b, at),
            name_len: le::u32_at(b, at + 4),
            kind_code: le::u8_at(b, at + 8),
            ndim: le::u8_at(b, at + 9),
            reserved: le::u16_at(b, at + 10),
            dims: [le::u32_at(b, at + 12), le::u32_at(b, at + 16)],
            blocksize: le::u32_at(b, at + 20),
            dq_offset: le::f32_at(b, at + 24),
            crc: le::u32_at(b, at + 28),
            data_offset: le::u64_at(b, at + 32),
            data_len: le::u64_at(b, at + 40),
            reserved_tail,
        }
    }

    fn name_bytes(&self, offset: u32, len: u32) -> Option<&'a [u8]> {
        let start = TABLE_OFFSET + self.tensor_count as usize * TENSOR_ENTRY_LEN;
        let names = self.bytes.get(start..start + self.names_len as usize)?;
        names.get(offset as usize..(offset as usize).checked_add(len as usize)?)
    }

    /// The model's shape.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// The fingerprint of the base model ([`crate::fingerprint::model_fingerprint`]).
    pub fn fingerprint(&self) -> [u8; 16] {
        self.fingerprint
    }

    /// The 8-bit absmax code shared by the NF4 tensors.
    pub fn code8(&self) -> &[f32; CODE_LEN] {
        &self.code8
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.tensor_count as usize
    }

    /// Index of the tensor with this HF name (`model.layers.0.self_attn.q_proj.weight`).
    pub fn find_tensor(&self, name: &str) -> Option<usize> {
        self.find_by(&[name.as_bytes()]).map(|i| i as usize)
    }

    /// Name, kind and shape (`[rows, cols]`; `[n, 1]` for vectors) of tensor `index`.
    pub fn tensor_info(
        &self,
        index: usize,
    ) -> Result<(&'a str, TensorKind, [u32; 2]), FormatError> {
        let e = self.checked_entry(index)?;
        let name = self
            .name_bytes(e.name_offset, e.name_len)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("");
        let kind = TensorKind::from_code(e.kind_code).unwrap_or(TensorKind::F32);
        Ok((name, kind, e.dims))
    }

    /// A dense tensor's values (row-major).
    pub fn dense(&self, index: usize) -> Result<ElemView<'a>, FormatError> {
        let e = self.checked_entry(index)?;
        let dtype = match TensorKind::from_code(e.kind_code) {
            Some(TensorKind::F32) => ElementType::F32,
            Some(TensorKind::F16) => ElementType::F16,
            _ => {
                return Err(FormatError::InvalidValue {
                    field: Field::TensorKind,
                    value: e.kind_code.into(),
                });
            }
        };
        ElemView::new(self.data(&e, index as u32)?, dtype)
    }

    /// An NF4 tensor as the core's matrix view.
    pub fn nf4(&self, index: usize) -> Result<Nf4Matrix<'_, DoubleQuantRef<'_>>, FormatError> {
        let e = self.checked_entry(index)?;
        if TensorKind::from_code(e.kind_code) != Some(TensorKind::Nf4DoubleQuant) {
            return Err(FormatError::InvalidValue {
                field: Field::TensorKind,
                value: e.kind_code.into(),
            });
        }
        let data = self.data(&e, index as u32)?;
        let (rows, cols) = (e.dims[0] as usize, e.dims[1] as usize);
        let n = u64::from(e.dims[0]) * u64::from(e.dims[1]);
        let parts = Nf4Parts::new(n, u64::from(e.blocksize)).ok_or(FormatError::InvalidValue {
            field: Field::TensorShape,
            value: n,
        })?;
        let part =
            |offset: u64, len: u64| region(data, Field::TensorData, index as u32, offset, len);
        let packed = part(0, parts.packed_len)?;
        let codes = part(parts.codes_offset, parts.blocks)?;
        let nested = part(parts.nested_offset, 4 * parts.nested_blocks)?;
        let nested: &[f32] =
            bytemuck::try_cast_slice(nested).map_err(|_| FormatError::Misaligned {
                field: Field::TensorData,
                offset: e.data_offset + parts.nested_offset,
                align: 4,
            })?;
        let absmax = DoubleQuantRef::new(&self.code8, codes, nested, e.dq_offset)?;
        Ok(Nf4Matrix::new(
            rows,
            cols,
            e.blocksize as usize,
            packed,
            absmax,
        )?)
    }

    fn checked_entry(&self, index: usize) -> Result<Entry, FormatError> {
        match u32::try_from(index) {
            Ok(i) if i < self.tensor_count => Ok(self.entry(i)),
            _ => Err(FormatError::IndexOutOfRange {
                field: Field::TensorTable,
                index: u32::try_from(index).unwrap_or(u32::MAX),
                count: self.tensor_count,
            }),
        }
    }

    fn data(&self, e: &Entry, index: u32) -> Result<&'a [u8], FormatError> {
        region(
            self.bytes,
            Field::TensorData,
            index,
            e.data_offset,
            e.data_len,
        )
    }

    fn row(&self, tensor: u32, row: usize) -> Result<ElemView<'_>, qdylora_core::Error> {
        let hidden = self.config.hidden_size as usize;
        if row >= self.config.vocab_size as usize {
            return Err(qdylora_core::Error::Shape {
                expected: self.config.vocab_size as usize,
                actual: row,
            });
        }
        let all = self.dense(tensor as usize).map_err(core_error)?;
        let row_bytes = hidden
            .checked_mul(all.dtype().size_bytes())
            .ok_or(qdylora_core::Error::SizeOverflow)?;
        let start = row
            .checked_mul(row_bytes)
            .ok_or(qdylora_core::Error::SizeOverflow)?;
        let end = start
            .checked_add(row_bytes)
            .ok_or(qdylora_core::Error::SizeOverflow)?;
        let bytes = all
            .bytes()
            .get(start..end)
            .ok_or(qdylora_core::Error::SizeOverflow)?;
        ElemView::new(bytes, all.dtype()).map_err(core_error)
    }

    fn layer_tensor(&self, layer: usize, path: &str) -> Result<usize, qdylora_core::Error> {
        let mut digits = [0u8; 20];
        let layer_digits = le::decimal(layer, &mut digits);
        let parts: [&[u8]; 5] = [
            b"model.layers.",
            layer_digits,
            b".",
            path.as_bytes(),
            b".weight",
        ];
        self.find_by(&parts)
            .map(|i| i as usize)
            .ok_or(qdylora_core::Error::Shape {
                expected: self.config.num_layers as usize,
                actual: layer,
            })
    }
}

impl DecoderWeights for DeviceModelReader<'_> {
    type Vector<'w>
        = ElemView<'w>
    where
        Self: 'w;
    type Absmax<'w>
        = DoubleQuantRef<'w>
    where
        Self: 'w;

    fn config(&self) -> &DecoderConfig {
        &self.config
    }

    fn embedding_row(&self, token: usize) -> Result<ElemView<'_>, qdylora_core::Error> {
        self.row(self.embedding, token)
    }

    fn layer_norm(
        &self,
        layer: usize,
        which: NormKind,
    ) -> Result<ElemView<'_>, qdylora_core::Error> {
        let index = self.layer_tensor(layer, norm_name(which))?;
        self.dense(index).map_err(core_error)
    }

    fn final_norm(&self) -> Result<ElemView<'_>, qdylora_core::Error> {
        self.dense(self.final_norm as usize).map_err(core_error)
    }

    fn linear(
        &self,
        layer: usize,
        which: LinearKind,
    ) -> Result<Nf4Matrix<'_, DoubleQuantRef<'_>>, qdylora_core::Error> {
        let index = self.layer_tensor(layer, which.layer_path())?;
        self.nf4(index).map_err(core_error)
    }

    fn lm_head_row(&self, token: usize) -> Result<ElemView<'_>, qdylora_core::Error> {
        self.row(self.lm_head, token)
    }
}

/// A reader error met after `parse` accepted the file (an internal inconsistency) as a core error.
fn core_error(e: FormatError) -> qdylora_core::Error {
    match e {
        FormatError::Core(e) => e,
        _ => qdylora_core::Error::SizeOverflow,
    }
}

fn norm_name(which: NormKind) -> &'static str {
    match which {
        NormKind::Input => "input_layernorm",
        NormKind::PostAttention => "post_attention_layernorm",
    }
}

/// Bytes a tensor's region must have, after checking its kind, shape and NF4 parameters.
fn entry_data_len(e: &Entry, index: u32) -> Result<u64, FormatError> {
    let kind = TensorKind::from_code(e.kind_code).ok_or(FormatError::InvalidValue {
        field: Field::TensorKind,
        value: e.kind_code.into(),
    })?;
    let shape_ok = match e.ndim {
        1 => e.dims[1] == 1,
        2 => true,
        _ => false,
    };
    if !shape_ok || e.dims.iter().any(|&d| d == 0 || d > limits::MAX_DIM) {
        return Err(FormatError::InvalidValue {
            field: Field::TensorShape,
            value: index.into(),
        });
    }
    let n = u64::from(e.dims[0]) * u64::from(e.dims[1]);
    match kind {
        TensorKind::F32 | TensorKind::F16 => {
            if e.blocksize != 0 || e.dq_offset.to_bits() != 0 {
                return Err(FormatError::InvalidValue {
                    field: Field::Reserved,
                    value: index.into(),
                });
            }
            let size = if kind == TensorKind::F32 { 4 } else { 2 };
            Ok(n * size)
        }
        TensorKind::Nf4DoubleQuant => {
            if e.ndim != 2 || nf4::check_blocksize(e.blocksize as usize).is_err() {
                return Err(FormatError::InvalidValue {
                    field: Field::Blocksize,
                    value: e.blocksize.into(),
                });
            }
            if !e.dq_offset.is_finite() {
                return Err(FormatError::InvalidValue {
                    field: Field::TensorData,
                    value: e.dq_offset.to_bits().into(),
                });
            }
            Nf4Parts::new(n, u64::from(e.blocksize))
                .map(|p| p.total)
                .ok_or(FormatError::InvalidValue {
                    field: Field::TensorShape,
                    value: n,
                })
        }
    }
}

fn decode_config(bytes: &[u8]) -> Result<DecoderConfig, FormatError> {
    let word = |i: usize| le::u32_at(bytes, 4 * i);
    let tie = word(9);
    let cfg = DecoderConfig {
        vocab_size: word(0),
        hidden_size: word(1),
        intermediate_size: word(2),
        num_layers: word(3),
        num_heads: word(4),
        num_kv_heads: word(5),
        head_dim: word(6),
        rope_theta: f32::from_bits(word(7)),
        rms_norm_eps: f32::from_bits(word(8)),
        tie_word_embeddings: tie == 1,
    };
    cfg.validate()?;
    let bad = |value: u64| FormatError::InvalidValue {
        field: Field::Config,
        value,
    };
    if tie > 1 {
        return Err(bad(tie.into()));
    }
    for v in [cfg.rope_theta, cfg.rms_norm_eps] {
        if !(v.is_finite() && v > 0.0) {
            return Err(bad(v.to_bits().into()));
        }
    }
    let dims = [
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
    ];
    if let Some(&d) = dims.iter().find(|&&d| d > limits::MAX_DIM) {
        return Err(bad(d.into()));
    }
    // Bounds `q_dim()` and `kv_dim()` (kv heads divide heads), which the core computes in u32.
    let q_dim = u64::from(cfg.num_heads) * u64::from(cfg.head_dim);
    if q_dim > u64::from(limits::MAX_DIM) {
        return Err(bad(q_dim));
    }
    if cfg.num_layers > limits::MAX_TENSORS {
        return Err(bad(cfg.num_layers.into()));
    }
    Ok(cfg)
}

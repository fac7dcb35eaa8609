//! Safetensors weights read through a memory map, one tensor at a time.
//!
//! candle's CPU tensors own their memory, so weights are copied out of the map whatever
//! reads them. What this backend adds: once a tensor is copied, the pages it came from are
//! handed back (`MADV_DONTNEED`), so a model being loaded holds its copies plus the tensor
//! in hand, not the whole mapped file besides (which once made the peak resident set of a
//! worker loading SD 1.5 1.75 times the weights).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors};

/// One safetensors file, mapped read-only.
pub(crate) struct MappedWeights {
    path: PathBuf,
    mmap: Mmap,
    /// Where tensor data starts in the file (after the 8-byte length and the header).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl MappedWeights {
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        // SAFETY: mapped read-only; as with every mmap the file must not be modified while
        // the model loads. Model folders are treated as immutable.
        let mmap = unsafe { Mmap::map(&file)? };
        let (header, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e:?}")))?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(MappedWeights {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header,
            tensors,
        })
    }

    /// What the tensors take once loaded with floats in `dtype` (what a model cache counts;
    /// a file of f32 weights loaded in f16 holds half its size).
    pub(crate) fn held_bytes(&self, dtype: DType) -> u64 {
        self.tensors
            .values()
            .map(|info| {
                let elems: usize = info.shape.iter().product();
                let size = match info.dtype {
                    Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => dtype.size_in_bytes(),
                    other => other.bitsize().div_ceil(8),
                };
                (elems * size) as u64
            })
            .sum()
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            Dtype::I64 => DType::I64,
            Dtype::U8 => DType::U8,
            other => candle_core::bail!(
                "{}: tensor {name} has dtype {other:?}, which this farm does not read",
                self.path.display()
            ),
        };
        let (start, end) = info.data_offsets;
        let (start, end) = (self.data_start + start, self.data_start + end);
        let Some(bytes) = self.mmap.get(start..end) else {
            candle_core::bail!(
                "{}: tensor {name} lies past the end of the file",
                self.path.display()
            );
        };
        let tensor = Tensor::from_raw_buffer(bytes, dtype, &info.shape, device)?;
        // The copy is made: give the mapped pages back. A page shared with the next tensor
        // is read again from the page cache when that tensor is loaded.
        // SAFETY: the map is a read-only shared file mapping and no borrow of it is alive
        // (`bytes` ended above), so dropping its pages only makes a later read fault them in
        // again from the file, with the same contents.
        unsafe {
            let _ = self
                .mmap
                .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start);
        }
        Ok(tensor)
    }
}

impl SimpleBackend for MappedWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, device)?.to_dtype(dtype)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_read_back_as_written_and_a_cut_file_is_an_error() -> candle_core::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("w.safetensors");
        let a = Tensor::arange(0f32, 6000.0, &Device::Cpu)?.reshape((60, 100))?;
        let b = Tensor::arange(0f32, 10.0, &Device::Cpu)?.to_dtype(DType::F16)?;
        candle_core::safetensors::save(
            &HashMap::from([("a".to_string(), a.clone()), ("b".to_string(), b.clone())]),
            &path,
        )?;
        let weights = MappedWeights::open(&path)?;
        assert!(weights.contains_tensor("a") && !weights.contains_tensor("c"));
        assert_eq!(weights.held_bytes(DType::F32), 6000 * 4 + 10 * 4);
        assert_eq!(weights.held_bytes(DType::F16), 6000 * 2 + 10 * 2);
        // Read twice: the second read faults the given-back pages in again.
        for _ in 0..2 {
            let got = weights.get(
                (60, 100).into(),
                "a",
                candle_nn::Init::Const(0.),
                DType::F32,
                &Device::Cpu,
            )?;
            assert_eq!(got.to_vec2::<f32>()?, a.to_vec2::<f32>()?);
        }
        let got = weights.get_unchecked("b", DType::F32, &Device::Cpu)?;
        assert_eq!(
            got.to_vec1::<f32>()?,
            b.to_dtype(DType::F32)?.to_vec1::<f32>()?
        );
        assert!(weights
            .get(
                (6, 1000).into(),
                "a",
                candle_nn::Init::Const(0.),
                DType::F32,
                &Device::Cpu
            )
            .is_err());
        assert!(weights
            .get_unchecked("c", DType::F32, &Device::Cpu)
            .is_err());

        // A file cut short: the header names bytes that are not there.
        let bytes = std::fs::read(&path)?;
        std::fs::write(&path, &bytes[..bytes.len() - 100])?;
        match MappedWeights::open(&path) {
            Err(_) => {}
            Ok(cut) => assert!(
                cut.get_unchecked("a", DType::F32, &Device::Cpu).is_err()
                    || cut.get_unchecked("b", DType::F32, &Device::Cpu).is_err()
            ),
        }
        Ok(())
    }
}

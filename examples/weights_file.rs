//! Writing an example's weights file: fp32 tensors in safetensors format, written beside the
//! target and renamed into place, so an interrupted run never leaves a truncated model.

use std::path::Path;

/// Writes `tensors` (name, shape, values) to `path` atomically.
pub fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<(), String> {
    // safetensors stores little-endian bytes.
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors.iter().zip(&bytes).map(|((name, shape, _), bytes)| {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes);
        (name.to_string(), view.expect("shape matches data"))
    });
    let partial = path.with_extension("partial");
    safetensors::serialize_to_file(views, None, &partial)
        .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    std::fs::rename(&partial, path)
        .map_err(|e| format!("cannot rename {} to {}: {e}", partial.display(), path.display()))
}

//! PNG output with the generation parameters in `tEXt` chunks (like ComfyUI
//! and A1111 do), written deterministically: same pixels and parameters, same bytes.

use std::path::Path;

use crate::{Error, Result};

/// Encodes 8-bit RGB with `(keyword, text)` chunks.
pub fn encode_png(width: usize, height: usize, rgb: &[u8], text: &[(&str, String)]) -> Result<Vec<u8>> {
    let err = |e: png::EncodingError| Error::Io { path: "<png>".into(), reason: e.to_string() };
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            // tEXt is Latin-1; a prompt outside it goes in a UTF-8 iTXt chunk.
            if v.chars().all(|c| u32::from(c) < 0x100) {
                enc.add_text_chunk(k.to_string(), v.clone()).map_err(err)?;
            } else {
                enc.add_itxt_chunk(k.to_string(), v.clone()).map_err(err)?;
            }
        }
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(rgb).map_err(err)?;
        w.finish().map_err(err)?;
    }
    Ok(out)
}

/// Writes [`encode_png`]'s bytes to `path`.
pub fn write_png(path: &Path, width: usize, height: usize, rgb: &[u8], text: &[(&str, String)]) -> Result<()> {
    let bytes = encode_png(width, height, rgb, text)?;
    std::fs::write(path, bytes).map_err(|e| Error::Io { path: path.to_path_buf(), reason: e.to_string() })
}

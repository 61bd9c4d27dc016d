//! The byte encoding of bus messages: the only module that names bincode.
//!
//! bincode is pinned at `=2.0.1` (3.0.0 is an empty crate and 2.0.1 is frozen), so a later swap
//! of the encoding touches this file alone. The configuration is fixed (little endian, varint
//! integers) and carries a decode limit so a hostile length inside a frame cannot make us
//! allocate more than the frame itself could hold.
//!
//! ```
//! let bytes = forkless_bus::codec::encode(&(1u32, String::from("x"))).unwrap();
//! let back: (u32, String) = forkless_bus::codec::decode(&bytes).unwrap();
//! assert_eq!(back, (1, "x".to_string()));
//! ```

use serde::{de::DeserializeOwned, Serialize};

/// Failure to turn a value into bytes or back.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("cannot decode message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("message has {0} trailing bytes after its end")]
    Trailing(usize),
}

/// Largest payload a frame may carry (4 MiB: room for manifests of ~50k tensors); frames are
/// [`crate::channel`]'s, and a decode may allocate no more than one holds.
pub const MAX_FRAME_LEN: u32 = 4 << 20;

/// Upper bound on what one decode may allocate; equal to the frame limit.
const DECODE_LIMIT: usize = MAX_FRAME_LEN as usize;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_variable_int_encoding().with_limit::<DECODE_LIMIT>()
}

/// Encodes `value` into a fresh buffer.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(value, config())?)
}

/// Decodes a whole buffer; bytes left over are an error, not ignored.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

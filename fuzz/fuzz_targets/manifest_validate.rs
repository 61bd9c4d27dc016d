//! `Manifest::validate` on arbitrary decoded manifests. Half the inputs get their layout hash
//! fixed up first, so the checks behind it are reached too. A manifest that validates must
//! really be safe to index with: every tensor inside its arena, no two overlapping, lengths
//! matching dtype × shape; checked here independently of the validator.
#![no_main]

use forkless_bus::codec;
use forkless_bus::manifest::{Manifest, TENSOR_ALIGN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Ok(mut manifest) = codec::decode::<Manifest>(rest) else { return };
    if flags & 1 == 1 {
        manifest.layout_hash = manifest.compute_layout_hash();
    }
    let _ = manifest.total_bytes();
    if manifest.validate().is_ok() {
        assert_safe(&manifest);
    }
});

fn assert_safe(manifest: &Manifest) {
    let mut spans = Vec::new();
    for t in &manifest.tensors {
        let arena = &manifest.arenas[t.arena as usize];
        let end = t.offset.checked_add(t.len).expect("validated tensors do not overflow");
        assert!(end <= arena.size, "{t:?} ends outside {arena:?}");
        assert_eq!(t.offset % TENSOR_ALIGN, 0);
        let elements = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).expect("no overflow");
        assert_eq!(elements.checked_mul(t.dtype.size()), Some(t.len));
        assert!(manifest.tensor(&t.name).is_some());
        if t.len > 0 {
            spans.push((t.arena, t.offset, end));
        }
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        assert!(pair[0].0 != pair[1].0 || pair[0].2 <= pair[1].1, "overlap: {pair:?}");
    }
}

//! config.json parsing on arbitrary JSON: LlavaConfig, SelectLayers (parse and resolve) and the
//! CLIP hyper-parameters (with the same JSON as preprocessor config).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mmfuser_convert::formats::checkpoint::config::{clip_hparams, LlavaConfig, SelectLayers};
use std::path::{Path, PathBuf};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let path = Path::new("config.json");
    let _ = LlavaConfig::from_json(PathBuf::from(path), v.clone());
    let sel_json = v.get("mm_vision_select_layer").unwrap_or(&v);
    let select = match SelectLayers::parse(path, sel_json) {
        Ok(s) => {
            for n in [0usize, 1, 24, 1 << 40, usize::MAX / 2, usize::MAX] {
                if let Ok(r) = s.resolve(path, n) {
                    assert!(r.iter().all(|&i| i <= n));
                }
            }
            s
        }
        Err(_) => SelectLayers::List(vec![-2, -1]),
    };
    let pre = v
        .get("preprocessor")
        .map(|p| (Path::new("preprocessor_config.json"), p));
    if let Ok(h) = clip_hparams(path, &v, pre, &select, path) {
        assert!(h.patch_size > 0 && h.image_size % h.patch_size == 0);
        let _ = (h.n_patches(), h.blocks_needed());
    }
});

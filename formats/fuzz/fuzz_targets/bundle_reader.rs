//! Any bytes: the bundle reader must return an error or a reader whose every accessor works.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qdylora_core::infer::{LinearDelta, LinearKind};
use qdylora_formats::bundle::BundleReader;

fuzz_target!(|data: &[u8]| {
    let _ = BundleReader::header_len_of(data);
    let Ok(reader) = BundleReader::parse(data) else {
        return;
    };
    let complete = reader.complete_rank();
    assert!(complete <= reader.r_max());
    assert!(reader.prefix_len(complete).unwrap() <= data.len());
    let _ = reader.rank_for_budget(data.len() as u64);
    for i in 0..reader.module_count().min(64) {
        let info = reader.module(i).unwrap();
        assert_eq!(reader.find_module(info.name), Some(i));
        for k in 0..complete.min(4) {
            assert_eq!(reader.a_row(i, k).unwrap().bytes().len() % 2, 0);
            reader.b_col(i, k).unwrap();
        }
        assert!(reader.a_row(i, complete).is_err());
    }
    if complete > 0 {
        let view = reader.at_rank(complete).unwrap();
        for i in 0..reader.module_count().min(8) {
            let info = reader.module(i).unwrap();
            if info.in_features > 4096 || info.out_features > 4096 {
                continue;
            }
            let x = vec![1.0f32; info.in_features as usize];
            let mut y = vec![0.0f32; info.out_features as usize];
            // Modules named like decoder linears are reachable through the LinearDelta.
            for layer in 0..2 {
                for kind in LinearKind::ALL {
                    let _ = view.apply(layer, kind, &x, &mut y);
                }
            }
        }
    }
});

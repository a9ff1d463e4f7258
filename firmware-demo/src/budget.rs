//! The RAM budget for the adapter's rank prefix, fixed at build time by exactly one cargo
//! feature: `budget-64k`, `budget-256k` (the default) or `budget-1m`. Choose another preset with
//! `--no-default-features --features budget-64k`.

const PRESETS_ENABLED: usize = cfg!(feature = "budget-64k") as usize
    + cfg!(feature = "budget-256k") as usize
    + cfg!(feature = "budget-1m") as usize;

const _: () = assert!(
    PRESETS_ENABLED == 1,
    "enable exactly one adapter budget feature: budget-64k, budget-256k (default) or budget-1m; \
     add --no-default-features to replace the default"
);

/// Bytes of RAM reserved for the adapter ([`crate::adapter_ram`]).
pub const BYTES: usize = if cfg!(feature = "budget-64k") {
    64 * 1024
} else if cfg!(feature = "budget-1m") {
    1024 * 1024
} else {
    256 * 1024
};

/// The preset's name, for the log.
pub const NAME: &str = if cfg!(feature = "budget-64k") {
    "budget-64k"
} else if cfg!(feature = "budget-1m") {
    "budget-1m"
} else {
    "budget-256k"
};

//! The repository's `config.json`: written once by `init`, read by every command.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepoConfig {
    /// On-disk format version (see `docs/FORMAT.md`).
    pub format_version: u32,
    /// Random id of this repository, 32 hex digits.
    pub id: String,
    /// Size in bytes of the fixed, aligned chunks volumes are cut into. A power of two between
    /// 4 KiB and 16 MiB; fixed for the repository's life so that identical blocks dedup.
    pub chunk_size: u32,
    /// Target size of a pack file in bytes.
    pub pack_size: u32,
    pub created: chrono::DateTime<chrono::Utc>,
}

/// Default chunk size: 64 KiB (see `docs/FORMAT.md`, "Why 64 KiB chunks", for the measurements).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Default pack target size: 32 MiB.
pub const DEFAULT_PACK_SIZE: u32 = 32 * 1024 * 1024;

impl RepoConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.format_version >= 1 && self.format_version <= crate::FORMAT_VERSION,
            "repository format version {} is not supported by this rime (supports up to {})",
            self.format_version,
            crate::FORMAT_VERSION
        );
        anyhow::ensure!(
            self.chunk_size.is_power_of_two() && (4096..=16 << 20).contains(&self.chunk_size),
            "repository chunk size {} is invalid",
            self.chunk_size
        );
        anyhow::ensure!(self.pack_size >= self.chunk_size, "repository pack size {} is invalid", self.pack_size);
        Ok(())
    }
}

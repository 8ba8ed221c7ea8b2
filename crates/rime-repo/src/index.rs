//! The repository's chunk index: where each stored chunk lives.
//!
//! Built at start-up from every `index/<pack>.idx`. Memory: about 60 bytes per unique chunk in
//! the repository (≈ 1 GiB per TiB of unique data at 64 KiB chunks); it does not grow with the
//! size of the volume being read, only with what the repository stores.

use crate::backend::Backend;
use crate::compression::Encoding;
use crate::id::{ChunkId, PackId};
use crate::pack::{self, PackEntry};
use anyhow::Result;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Chunk ids are already uniform hashes: use their first 8 bytes directly.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its bytes (after no length prefix for arrays).
        let mut b = [0u8; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(b);
    }
}

pub type IdMap<V> = HashMap<ChunkId, V, BuildHasherDefault<IdHasher>>;
pub type IdSet = std::collections::HashSet<ChunkId, BuildHasherDefault<IdHasher>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    /// Position of the pack in `ChunkIndex::packs`.
    pub pack: u32,
    pub raw_len: u32,
    pub offset: u64,
    pub stored_len: u32,
    pub encoding: Encoding,
}

impl ChunkLocation {
    /// The pack entry this location describes.
    pub fn entry(&self, id: ChunkId) -> PackEntry {
        PackEntry {
            id,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            encoding: self.encoding,
        }
    }
}

/// Per-pack facts kept by the index.
#[derive(Clone, Debug)]
pub struct PackInfo {
    pub id: PackId,
    pub size: u64,
    pub blobs: u32,
}

#[derive(Default)]
pub struct ChunkIndex {
    pub packs: Vec<PackInfo>,
    map: IdMap<ChunkLocation>,
}

/// An index file that could not be read; reported, never fatal for readers of other packs.
#[derive(Debug, Clone)]
pub struct BadIndex {
    pub path: String,
    pub reason: String,
}

impl ChunkIndex {
    /// Loads all pack index files. Unreadable ones are returned separately.
    pub fn load(backend: &dyn Backend) -> Result<(ChunkIndex, Vec<BadIndex>)> {
        let mut index = ChunkIndex::default();
        let mut bad = Vec::new();
        let mut paths = backend.list("index")?;
        paths.sort();
        for path in paths {
            let Some(pack_id) =
                path.strip_prefix("index/").and_then(|n| n.strip_suffix(".idx")).and_then(PackId::from_hex)
            else {
                continue;
            };
            match backend.read(&path).and_then(|b| pack::decode_index(&b)) {
                Ok((size, entries)) => index.add_pack(pack_id, size, &entries),
                Err(e) => bad.push(BadIndex { path, reason: format!("{e:#}") }),
            }
        }
        Ok((index, bad))
    }

    pub fn add_pack(&mut self, id: PackId, size: u64, entries: &[PackEntry]) {
        let pack = self.packs.len() as u32;
        self.packs.push(PackInfo { id, size, blobs: entries.len() as u32 });
        self.map.reserve(entries.len());
        for e in entries {
            // A chunk may sit in two packs after an interrupted prune; either copy is good.
            self.map.entry(e.id).or_insert(ChunkLocation {
                pack,
                raw_len: e.raw_len,
                offset: e.offset,
                stored_len: e.stored_len,
                encoding: e.encoding,
            });
        }
    }

    pub fn get(&self, id: &ChunkId) -> Option<&ChunkLocation> {
        self.map.get(id)
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.map.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn pack_id(&self, loc: &ChunkLocation) -> PackId {
        self.packs[loc.pack as usize].id
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ChunkId, &ChunkLocation)> {
        self.map.iter()
    }
}

//! Pack files: many compressed chunks (blobs) in one object, with a self-describing trailer.
//!
//! Layout: `RIMEPACK` · u32 version · u32 reserved · blob payloads · entry table · u32 count ·
//! BLAKE3(entry table) · `RIMEPEND`. The same entry table is stored separately as the pack's
//! index file (`index/<pack>.idx`), so the repository index loads without reading packs; the
//! trailer lets an index be rebuilt from the pack alone.

use crate::backend::Backend;
use crate::compression::Encoding;
use crate::id::{ChunkId, PackId};
use anyhow::{ensure, Context, Result};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

pub const PACK_MAGIC: &[u8; 8] = b"RIMEPACK";
pub const PACK_END_MAGIC: &[u8; 8] = b"RIMEPEND";
pub const INDEX_MAGIC: &[u8; 8] = b"RIMEPIDX";
pub const PACK_HEADER_LEN: u64 = 16;
pub const ENTRY_LEN: usize = 32 + 8 + 4 + 4 + 1;
const FOOTER_LEN: usize = 4 + 32 + 8;

/// One blob inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub encoding: Encoding,
}

impl PackEntry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.push(self.encoding as u8);
    }

    fn decode(b: &[u8]) -> Result<PackEntry> {
        debug_assert_eq!(b.len(), ENTRY_LEN);
        Ok(PackEntry {
            id: ChunkId(b[0..32].try_into().unwrap()),
            offset: u64::from_le_bytes(b[32..40].try_into().unwrap()),
            stored_len: u32::from_le_bytes(b[40..44].try_into().unwrap()),
            raw_len: u32::from_le_bytes(b[44..48].try_into().unwrap()),
            encoding: Encoding::from_u8(b[48])?,
        })
    }
}

pub fn pack_path(id: &PackId) -> String {
    let hex = id.to_hex();
    format!("packs/{}/{}.pack", &hex[..2], hex)
}

pub fn index_path(id: &PackId) -> String {
    format!("index/{}.idx", id.to_hex())
}

fn encode_entries(entries: &[PackEntry]) -> Vec<u8> {
    let mut table = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        e.encode(&mut table);
    }
    table
}

fn decode_entries(table: &[u8], pack_size: Option<u64>) -> Result<Vec<PackEntry>> {
    ensure!(
        table.len().is_multiple_of(ENTRY_LEN),
        "entry table length {} is not a multiple of {ENTRY_LEN}",
        table.len()
    );
    let entries = table.chunks_exact(ENTRY_LEN).map(PackEntry::decode).collect::<Result<Vec<_>>>()?;
    if let Some(size) = pack_size {
        for e in &entries {
            ensure!(
                e.offset >= PACK_HEADER_LEN && e.offset + e.stored_len as u64 <= size,
                "blob {} lies outside its pack",
                e.id
            );
        }
    }
    Ok(entries)
}

/// Encodes a pack index file: magic, version, pack size, count, entries, BLAKE3 of all before.
pub fn encode_index(pack_size: u64, entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + entries.len() * ENTRY_LEN + 32);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&crate::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&pack_size.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&encode_entries(entries));
    let digest = blake3::hash(&out);
    out.extend_from_slice(digest.as_bytes());
    out
}

/// Decodes and checks a pack index file; returns the pack's size and its entries.
pub fn decode_index(bytes: &[u8]) -> Result<(u64, Vec<PackEntry>)> {
    ensure!(bytes.len() >= 24 + 32, "index file too short");
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    ensure!(blake3::hash(body).as_bytes() == digest, "index file checksum mismatch");
    ensure!(&body[..8] == INDEX_MAGIC, "not a pack index file");
    let version = u32::from_le_bytes(body[8..12].try_into().unwrap());
    ensure!(version <= crate::FORMAT_VERSION, "pack index version {version} is newer than this rime");
    let pack_size = u64::from_le_bytes(body[12..20].try_into().unwrap());
    let count = u32::from_le_bytes(body[20..24].try_into().unwrap()) as usize;
    ensure!(body.len() - 24 == count * ENTRY_LEN, "index file entry count mismatch");
    Ok((pack_size, decode_entries(&body[24..], Some(pack_size))?))
}

/// Reads the entry table from a pack's own trailer (used by `verify` and index rebuilds).
pub fn read_trailer(backend: &dyn Backend, id: &PackId) -> Result<Vec<PackEntry>> {
    let reader = backend.open(&pack_path(id))?;
    let size = reader.size()?;
    ensure!(size >= PACK_HEADER_LEN + FOOTER_LEN as u64, "pack {id} is truncated");
    let mut footer = [0u8; FOOTER_LEN];
    reader.read_at(size - FOOTER_LEN as u64, &mut footer)?;
    ensure!(&footer[36..44] == PACK_END_MAGIC, "pack {id} has no trailer");
    let count = u32::from_le_bytes(footer[0..4].try_into().unwrap()) as u64;
    let table_len = count * ENTRY_LEN as u64;
    ensure!(table_len + PACK_HEADER_LEN + FOOTER_LEN as u64 <= size, "pack {id} trailer is damaged");
    let mut table = vec![0u8; table_len as usize];
    reader.read_at(size - FOOTER_LEN as u64 - table_len, &mut table)?;
    ensure!(blake3::hash(&table).as_bytes()[..] == footer[4..36], "pack {id} trailer checksum mismatch");
    decode_entries(&table, Some(size - FOOTER_LEN as u64 - table_len))
}

/// Builds one pack in the backend's scratch folder, then publishes it.
pub struct PackWriter {
    id: PackId,
    tmp: PathBuf,
    out: BufWriter<File>,
    len: u64,
    entries: Vec<PackEntry>,
}

/// What a finished pack holds, for the in-memory index.
pub struct FinishedPack {
    pub id: PackId,
    pub size: u64,
    pub entries: Vec<PackEntry>,
}

impl PackWriter {
    pub fn create(backend: &dyn Backend) -> Result<PackWriter> {
        let id = PackId::random();
        let dir = backend.scratch_dir();
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let tmp = dir.join(format!("pack-{}", id.to_hex()));
        let file = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(PACK_MAGIC)?;
        out.write_all(&crate::FORMAT_VERSION.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        Ok(PackWriter { id, tmp, out, len: PACK_HEADER_LEN, entries: Vec::new() })
    }

    pub fn id(&self) -> PackId {
        self.id
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends one blob; returns its entry (offset within this pack).
    pub fn add(&mut self, id: ChunkId, encoding: Encoding, payload: &[u8], raw_len: u32) -> Result<PackEntry> {
        assert!(!id.is_zero_marker(), "the zero marker is never stored");
        let entry = PackEntry { id, offset: self.len, stored_len: payload.len() as u32, raw_len, encoding };
        self.out.write_all(payload).context("write pack")?;
        self.len += payload.len() as u64;
        self.entries.push(entry);
        Ok(entry)
    }

    /// Writes the trailer, fsyncs, moves the pack into place, then writes its index file.
    /// The pack is durable before its index exists, so an index never names a missing pack.
    pub fn finish(mut self, backend: &dyn Backend) -> Result<FinishedPack> {
        let table = encode_entries(&self.entries);
        self.out.write_all(&table)?;
        self.out.write_all(&(self.entries.len() as u32).to_le_bytes())?;
        self.out.write_all(blake3::hash(&table).as_bytes())?;
        self.out.write_all(PACK_END_MAGIC)?;
        let size = self.len + table.len() as u64 + FOOTER_LEN as u64;
        let file = self.out.into_inner().map_err(|e| e.into_error()).context("flush pack")?;
        file.sync_all().context("fsync pack")?;
        drop(file);
        backend.put_file(&self.tmp, &pack_path(&self.id))?;
        backend.write_atomic(&index_path(&self.id), &encode_index(size, &self.entries))?;
        Ok(FinishedPack { id: self.id, size, entries: self.entries })
    }

    /// Drops an unfinished pack.
    pub fn abandon(self) {
        drop(self.out);
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Decodes a blob payload and checks it against its chunk id.
pub fn decode_blob(payload: &[u8], encoding: Encoding, raw_len: u32, id: &ChunkId) -> Result<Vec<u8>> {
    let damaged = |why: String| crate::error::RepoError::ChunkDamaged { id: id.to_string(), why };
    let raw = crate::compression::decode(encoding, payload, raw_len as usize)
        .map_err(|e| damaged(format!("it cannot be decoded: {e:#}")))?;
    if ChunkId::of(&raw) != *id {
        return Err(damaged("digest mismatch".into()).into());
    }
    Ok(raw)
}

/// Reads one blob from an open pack and returns the chunk's raw bytes, checked against its id.
pub fn read_blob(reader: &dyn crate::backend::ObjectReader, entry: &PackEntry) -> Result<Vec<u8>> {
    let mut payload = vec![0u8; entry.stored_len as usize];
    reader.read_at(entry.offset, &mut payload)?;
    decode_blob(&payload, entry.encoding, entry.raw_len, &entry.id)
}

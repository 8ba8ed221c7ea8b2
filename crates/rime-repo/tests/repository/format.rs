//! Round trips and damage detection for the repository's binary objects.

use rime_repo::compression::{Compressor, Encoding};
use rime_repo::pack::{self, PackWriter};
use rime_repo::volume_index::{VolumeIndexReader, VolumeIndexWriter};
use rime_repo::{ChunkId, ChunkIndex, Compression, Repository};

fn chunk(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed)).collect()
}

#[test]
fn packs_round_trip_and_index_loads() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(dir.path().join("r").to_str().unwrap(), 65536).unwrap();
    let backend = repo.backend.as_ref();
    let mut writer = PackWriter::create(backend).unwrap();
    let mut compressor = Compressor::new(Compression::Normal).unwrap();
    let chunks: Vec<Vec<u8>> = (1..=5).map(|s| chunk(s, 65536)).collect();
    for c in &chunks {
        let (enc, payload) = compressor.compress(c).unwrap();
        writer.add(ChunkId::of(c), enc, &payload, c.len() as u32).unwrap();
    }
    let finished = writer.finish(backend).unwrap();
    assert_eq!(pack::read_trailer(backend, &finished.id).unwrap(), finished.entries);

    let (index, bad) = ChunkIndex::load(backend).unwrap();
    assert!(bad.is_empty());
    assert_eq!(index.len(), 5);
    let reader = backend.open(&pack::pack_path(&finished.id)).unwrap();
    for c in &chunks {
        let id = ChunkId::of(c);
        let loc = index.get(&id).expect("chunk indexed");
        assert_eq!(&pack::read_blob(reader.as_ref(), &loc.entry(id)).unwrap(), c);
    }
}

#[test]
fn incompressible_chunks_are_stored_raw() {
    let mut state = 42u64;
    let data: Vec<u8> = (0..65536)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect();
    let (enc, payload) = Compressor::new(Compression::Best).unwrap().compress(&data).unwrap();
    assert_eq!(enc, Encoding::Raw);
    assert_eq!(payload, data);
}

#[test]
fn damaged_blobs_and_indexes_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("r");
    let repo = Repository::init(root.to_str().unwrap(), 65536).unwrap();
    let backend = repo.backend.as_ref();
    let mut writer = PackWriter::create(backend).unwrap();
    let c = chunk(3, 65536);
    writer.add(ChunkId::of(&c), Encoding::Raw, &c, c.len() as u32).unwrap();
    let finished = writer.finish(backend).unwrap();

    // Flip one byte inside the blob: reading it must fail the digest check.
    let pack_file = root.join(pack::pack_path(&finished.id));
    let mut bytes = std::fs::read(&pack_file).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&pack_file, &bytes).unwrap();
    let reader = backend.open(&pack::pack_path(&finished.id)).unwrap();
    let err = pack::read_blob(reader.as_ref(), &finished.entries[0]).unwrap_err();
    assert!(format!("{err:#}").contains("corrupt"), "{err:#}");

    // Flip one byte of the index file: loading reports it instead of trusting it.
    let idx_file = root.join(pack::index_path(&finished.id));
    let mut idx = std::fs::read(&idx_file).unwrap();
    idx[30] ^= 0x80;
    std::fs::write(&idx_file, &idx).unwrap();
    let (index, bad) = ChunkIndex::load(backend).unwrap();
    assert_eq!(index.len(), 0);
    assert_eq!(bad.len(), 1);
}

#[test]
fn volume_index_round_trip_and_tamper_detection() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("r");
    let repo = Repository::init(root.to_str().unwrap(), 65536).unwrap();
    let backend = repo.backend.as_ref();
    let size = 5 * 65536 + 1000;
    let mut w = VolumeIndexWriter::create(backend, 65536, size).unwrap();
    let ids: Vec<ChunkId> = (0..6).map(|i| if i == 2 { ChunkId::ZERO } else { ChunkId::of(&[i as u8]) }).collect();
    for id in &ids {
        w.push(id).unwrap();
    }
    let digest = w.finish(backend, "volumes/x/0.vidx").unwrap();
    let r = VolumeIndexReader::open(backend, "volumes/x/0.vidx").unwrap();
    assert_eq!(r.header.chunk_count, 6);
    assert_eq!(r.header.chunk_len(5), 1000);
    assert_eq!(r.get(4).unwrap(), ids[4]);
    let mut seen = Vec::new();
    r.for_each(Some(&digest), |_, id| {
        seen.push(id);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, ids);
    assert!(r.for_each(Some(&"0".repeat(64)), |_, _| Ok(())).is_err(), "a wrong manifest digest is caught");

    let path = root.join("volumes/x/0.vidx");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[64 + 32 * 3 + 5] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let r = VolumeIndexReader::open(backend, "volumes/x/0.vidx").unwrap();
    assert!(r.for_each(None, |_, _| Ok(())).is_err(), "a flipped record is caught");
}

#[test]
fn init_refuses_existing_repository_and_open_refuses_non_repository() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().join("r");
    Repository::init(loc.to_str().unwrap(), 65536).unwrap();
    assert!(Repository::init(loc.to_str().unwrap(), 65536).is_err());
    assert!(Repository::open(dir.path().to_str().unwrap()).is_err());
    assert!(
        Repository::init(dir.path().join("bad").to_str().unwrap(), 1000).is_err(),
        "chunk size must be a power of two"
    );
}

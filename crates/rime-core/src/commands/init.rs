//! `rime init`: create a repository.

use anyhow::Result;
use rime_repo::Repository;

pub fn init(location: &str, chunk_size: Option<u32>) -> Result<Repository> {
    Ok(Repository::init(location, chunk_size.unwrap_or(rime_repo::config::DEFAULT_CHUNK_SIZE))?)
}

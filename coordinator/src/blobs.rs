//! Result storage: a local directory (the default). Keys are `{job_id}/{index}.png`.
//!
//! Writes go to a temporary file in the same directory, are checked (size, SHA-256), and become visible
//! under their key only by an atomic rename, so a reader never sees half a file.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::fs;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};

pub struct BlobStore {
    root: PathBuf,
}

/// A blob being written; not visible until [`BlobStore::publish`].
pub struct PendingBlob {
    tmp: PathBuf,
    file: Option<fs::File>,
    hasher: Sha256,
    pub size: u64,
}

impl PendingBlob {
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.file.as_mut().expect("open").write_all(data).await?;
        Ok(())
    }

    /// Flushes to disk and returns the lower-case hex SHA-256 of everything written.
    pub async fn finish(&mut self) -> Result<String> {
        let mut f = self.file.take().expect("open");
        f.flush().await?;
        f.sync_all().await?;
        Ok(hex::encode(self.hasher.clone().finalize()))
    }

    pub async fn discard(self) {
        let _ = fs::remove_file(&self.tmp).await;
    }
}

impl BlobStore {
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).await?;
        Ok(BlobStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn key_for(job: &uuid::Uuid, index: u64) -> String {
        format!("{job}/{index}.png")
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.split('/').any(|c| c.is_empty() || c == ".." || c == ".") {
            return Err(Error::Internal(format!("bad blob key {key}")));
        }
        Ok(self.root.join(key))
    }

    /// Starts writing a blob that will be published under `key`.
    pub async fn create(&self, key: &str) -> Result<PendingBlob> {
        let final_path = self.path(key)?;
        let dir = final_path.parent().expect("key has a directory");
        fs::create_dir_all(dir).await?;
        let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        let file = fs::File::create(&tmp).await?;
        Ok(PendingBlob { tmp, file: Some(file), hasher: Sha256::new(), size: 0 })
    }

    /// Makes a finished blob visible under `key` (atomic rename; replaces an uncommitted leftover).
    pub async fn publish(&self, blob: PendingBlob, key: &str) -> Result<()> {
        let final_path = self.path(key)?;
        fs::rename(&blob.tmp, &final_path).await?;
        Ok(())
    }

    pub async fn open_read(&self, key: &str) -> Result<fs::File> {
        let p = self.path(key)?;
        fs::File::open(&p).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!("result blob {key} is missing from storage"))
            } else {
                Error::Storage(e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_check_publish_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let job = uuid::Uuid::new_v4();
        let key = BlobStore::key_for(&job, 7);
        let mut b = store.create(&key).await.unwrap();
        b.write(b"hello ").await.unwrap();
        b.write(b"world").await.unwrap();
        let sha = b.finish().await.unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(b"hello world")));
        assert!(!dir.path().join(&key).exists(), "not visible before publish");
        store.publish(b, &key).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join(&key)).unwrap(), b"hello world");
        assert!(store.path("../etc/passwd").is_err());
        // discarded blobs leave nothing behind
        let b = store.create(&BlobStore::key_for(&job, 8)).await.unwrap();
        b.discard().await;
        let names: Vec<_> = std::fs::read_dir(dir.path().join(job.to_string())).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}

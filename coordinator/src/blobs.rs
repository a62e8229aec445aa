//! Result storage: a local directory (the default) or an S3-compatible bucket. Keys are
//! `{job_id}/{index}.{lease_token}.png` ([`BlobStore::key_for`]); the rest of the coordinator sees
//! only [`BlobStore`] and [`PendingBlob`].
//!
//! `--results` chooses the backend: a directory or `file://DIR`, or `s3://BUCKET[/PREFIX]` with the
//! connection settings taken from the standard `AWS_*` environment (see [`BlobStore::open`]).
//!
//! The invariant for both: a blob becomes visible only through [`BlobStore::publish`], which the
//! upload path calls after it has checked size and SHA-256 against the header, under a key that
//! belongs to that upload's lease token alone; the task row then commits that key in one statement
//! if the token is still current, and a refused commit deletes the blob again (unless the row
//! committed this very key: a retry of the same lease). A result is part of a job only through its
//! row: a blob whose commit was refused is never listed or served, and no upload of another lease
//! can write the key a row committed. Whatever fails before publish leaves nothing behind; a
//! coordinator crash between publish and commit can leave one unreferenced blob.
//!
//! * Local directory: a result up to [`LOCAL_BUFFER_BYTES`] is held in memory and, at publish time,
//!   written to a temporary file in the key's directory, fsynced and renamed into place in one
//!   blocking call; a larger one streams into the temporary file as it arrives. Either way it becomes
//!   visible by an atomic rename, so a reader never sees half a file.
//! * S3: a result up to [`S3_BUFFER_BYTES`] (every PNG the farm renders) is held in memory and written
//!   to its final key with one PUT at publish time, so nothing temporary ever exists in the bucket.
//!   A larger one streams into a multipart upload to a temporary key under `PREFIX/.tmp/`
//!   (memory stays bounded by a few parts); publish copies it to the final key and deletes it, and a
//!   failure aborts the multipart upload or deletes the temporary object. Only a coordinator crash in
//!   the middle of that can leave an incomplete multipart upload or a `.tmp/` object, never a final
//!   key: a bucket lifecycle rule on `PREFIX/.tmp/` (and on incomplete multipart uploads) cleans up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::fs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// Results up to this size are buffered in memory and written with one PUT (S3 backend).
pub const S3_BUFFER_BYTES: usize = 8 << 20;
/// Results up to this size are buffered in memory and written, fsynced and renamed into place by one
/// blocking call at publish time (local backend). Writing each one through a temporary file as its
/// chunks arrived cost a blocking-pool round trip per create, write, flush, fsync and rename, and
/// those thread hand-offs were most of the coordinator's time per upload.
pub const LOCAL_BUFFER_BYTES: usize = 8 << 20;
/// Most bytes all buffered local results together hold in memory; a result that would go over it is
/// written through a temporary file as it arrives instead, so memory stays bounded however many
/// uploads run at once.
pub const LOCAL_MEMORY_BYTES: usize = 256 << 20;
/// Part size of multipart uploads (S3's minimum for every part but the last is 5 MiB).
const S3_PART_BYTES: usize = 5 << 20;
/// Parts of one multipart upload in flight at once.
const S3_PARTS_IN_FLIGHT: usize = 2;
/// Largest chunk a download stream yields (well under gRPC's default message limit).
pub const READ_CHUNK_BYTES: usize = 256 * 1024;

/// A result blob being read: chunks of at most [`READ_CHUNK_BYTES`].
pub type BlobReader = BoxStream<'static, Result<Bytes>>;

pub struct BlobStore {
    backend: Backend,
}

enum Backend {
    Local {
        root: PathBuf,
        /// Results larger than this are written through a temporary file as they arrive.
        buffer_bytes: usize,
        /// The in-memory budget shared by all buffered results, in KiB permits.
        memory: Arc<Semaphore>,
    },
    S3(S3Bucket),
}

struct S3Bucket {
    store: Arc<dyn ObjectStore>,
    /// Keys live below this (empty: the bucket's root).
    prefix: String,
    /// `s3://bucket/prefix`, for messages.
    url: String,
    /// Results larger than this spill into a multipart upload.
    buffer_bytes: usize,
}

/// A blob being written; not visible until [`BlobStore::publish`]. Dropping it without publishing
/// removes what was written (as [`PendingBlob::discard`] does).
pub struct PendingBlob {
    hasher: Sha256,
    pub size: u64,
    /// `None` once published or discarded.
    state: Option<Pending>,
}

enum Pending {
    Local {
        /// Where the temporary file goes (created only when the result outgrows the buffer, or at
        /// publish time).
        tmp: PathBuf,
        buffer: Vec<u8>,
        buffer_bytes: usize,
        /// The store's memory budget, and the KiB of it this buffer holds.
        memory: Arc<Semaphore>,
        reserved: Option<OwnedSemaphorePermit>,
        /// The temporary file once the result outgrew the buffer.
        file: Option<fs::File>,
        /// Whether `tmp` was created (then it must be removed unless renamed into place).
        spilled: bool,
    },
    S3 {
        store: Arc<dyn ObjectStore>,
        /// Where a spilled upload goes (under `PREFIX/.tmp/`).
        tmp: ObjectPath,
        buffer: Vec<u8>,
        buffer_bytes: usize,
        /// The multipart upload, once the result outgrew the buffer; `None` after it completed.
        upload: Option<WriteMultipart>,
        /// Whether a spilled upload was started (then `tmp` exists or an upload is open).
        spilled: bool,
    },
}

/// Makes `reserved` cover `bytes` of `memory` (in KiB permits), taking more without waiting.
/// Returns false when the budget has no room.
fn reserve(memory: &Arc<Semaphore>, reserved: &mut Option<OwnedSemaphorePermit>, bytes: usize) -> bool {
    let need = bytes.div_ceil(1024) as u32;
    let held = reserved.as_ref().map_or(0, |p| p.num_permits() as u32);
    if need <= held {
        return true;
    }
    match memory.clone().try_acquire_many_owned(need - held) {
        Ok(more) => {
            match reserved {
                Some(p) => p.merge(more),
                None => *reserved = Some(more),
            }
            true
        }
        Err(_) => false,
    }
}

fn storage(e: object_store::Error) -> Error {
    Error::Storage(std::io::Error::other(e))
}

async fn delete_tmp(store: &dyn ObjectStore, tmp: &ObjectPath) {
    if let Err(e) = store.delete(tmp).await {
        tracing::warn!(error = %e, key = %tmp, "could not delete a temporary result object");
    }
}

impl PendingBlob {
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        match self.state.as_mut().expect("blob not published") {
            Pending::Local { tmp, buffer, buffer_bytes, memory, reserved, file, spilled } => {
                let needed = buffer.len() + data.len();
                // What the buffer will hold after growing as a Vec does (doubling, capped at the
                // buffer limit) is what counts against the budget.
                let capacity = if needed <= buffer.capacity() {
                    buffer.capacity()
                } else {
                    needed.max(2 * buffer.capacity()).min(*buffer_bytes).max(needed)
                };
                let fits = !*spilled && needed <= *buffer_bytes && reserve(memory, reserved, capacity);
                if fits {
                    buffer.reserve_exact(capacity - buffer.len());
                    buffer.extend_from_slice(data);
                } else {
                    if !*spilled {
                        fs::create_dir_all(tmp.parent().expect("key has a directory")).await?;
                        *spilled = true;
                        let mut f = fs::File::create(&*tmp).await?;
                        f.write_all(buffer).await?;
                        *buffer = Vec::new();
                        *reserved = None;
                        *file = Some(f);
                    }
                    file.as_mut().expect("open").write_all(data).await?;
                }
            }
            Pending::S3 { store, tmp, buffer, buffer_bytes, upload, spilled } => {
                if upload.is_none() && buffer.len() + data.len() <= *buffer_bytes {
                    buffer.extend_from_slice(data);
                } else {
                    if upload.is_none() {
                        let started = store.put_multipart(tmp).await.map_err(storage)?;
                        *spilled = true;
                        let mut writer = WriteMultipart::new_with_chunk_size(started, S3_PART_BYTES);
                        writer.put(Bytes::from(std::mem::take(buffer)));
                        *upload = Some(writer);
                    }
                    let writer = upload.as_mut().expect("started");
                    writer.wait_for_capacity(S3_PARTS_IN_FLIGHT).await.map_err(storage)?;
                    writer.write(data);
                }
            }
        }
        Ok(())
    }

    /// Makes everything written durable (fsync; completes a spilled multipart upload at its
    /// temporary key) and returns the lower-case hex SHA-256 of it.
    pub async fn finish(&mut self) -> Result<String> {
        match self.state.as_mut().expect("blob not published") {
            Pending::Local { file, .. } => {
                // A buffered result is written and fsynced by publish.
                if let Some(mut f) = file.take() {
                    f.flush().await?;
                    f.sync_all().await?;
                }
            }
            Pending::S3 { upload, .. } => {
                if let Some(writer) = upload.take() {
                    writer.finish().await.map_err(storage)?;
                }
            }
        }
        Ok(hex::encode(self.hasher.clone().finalize()))
    }

    /// Removes what was written.
    pub async fn discard(mut self) {
        if let Some(state) = self.state.take() {
            state.remove().await;
        }
    }
}

impl Pending {
    async fn remove(self) {
        match self {
            Pending::Local { tmp, file, spilled, .. } => {
                drop(file);
                if spilled {
                    let _ = fs::remove_file(&tmp).await;
                }
            }
            Pending::S3 { store, tmp, upload, spilled, .. } => match upload {
                Some(writer) => {
                    if let Err(e) = writer.abort().await {
                        tracing::warn!(error = %e, key = %tmp, "could not abort a multipart upload");
                    }
                }
                None if spilled => delete_tmp(store.as_ref(), &tmp).await,
                None => {}
            },
        }
    }
}

impl Drop for PendingBlob {
    fn drop(&mut self) {
        // An upload handler that was cancelled (the worker went away) drops its blob unpublished.
        match self.state.take() {
            None => {}
            Some(Pending::Local { tmp, spilled: true, .. }) => {
                let _ = std::fs::remove_file(tmp);
            }
            Some(Pending::Local { .. }) => {}
            Some(state @ Pending::S3 { spilled: true, .. }) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(state.remove());
                }
            }
            Some(Pending::S3 { .. }) => {}
        }
    }
}

impl BlobStore {
    /// Opens the storage named by `--results`: a directory (created if missing), `file://DIR`, or
    /// `s3://BUCKET[/PREFIX]`. For S3, credentials, region and endpoint come from the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
    /// `AWS_ENDPOINT` or `AWS_ENDPOINT_URL` for S3-compatible servers, `AWS_ALLOW_HTTP=true` for a
    /// plain-HTTP endpoint, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`), and the bucket is listed once so that
    /// a wrong setting fails here rather than at the first upload.
    pub async fn open(results: &str) -> Result<Self> {
        if let Some(rest) = results.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::InvalidArgument(format!("--results {results}: no bucket named")));
            }
            let prefix = prefix.trim_matches('/').to_string();
            if prefix.split('/').any(|c| c == ".." || c == ".") || prefix.contains("//") {
                return Err(Error::InvalidArgument(format!("--results {results}: bad prefix")));
            }
            let store = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| Error::InvalidArgument(format!("--results {results}: S3 settings: {e}")))?;
            let store = BlobStore::s3(Arc::new(store), &prefix, results);
            store.check_reachable().await?;
            return Ok(store);
        }
        let dir = results.strip_prefix("file://").unwrap_or(results);
        if dir.contains("://") {
            return Err(Error::InvalidArgument(format!(
                "--results {results}: expected a directory, a file:// URL or an s3://bucket/prefix URL"
            )));
        }
        BlobStore::local(dir).await
    }

    /// A local directory (created if missing).
    pub async fn local(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).await?;
        Ok(BlobStore {
            backend: Backend::Local {
                root,
                buffer_bytes: LOCAL_BUFFER_BYTES,
                memory: Arc::new(Semaphore::new(LOCAL_MEMORY_BYTES / 1024)),
            },
        })
    }

    /// Any object store (S3 in production) with keys below `prefix`.
    pub fn s3(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Self {
        BlobStore {
            backend: Backend::S3(S3Bucket {
                store,
                prefix: prefix.trim_matches('/').to_string(),
                url: url.to_string(),
                buffer_bytes: S3_BUFFER_BYTES,
            }),
        }
    }

    /// Changes the size above which a result is no longer buffered in memory: it spills into a
    /// temporary file (local) or a multipart upload (S3).
    pub fn with_buffer_bytes(mut self, bytes: usize) -> Self {
        match &mut self.backend {
            Backend::Local { buffer_bytes, .. } => *buffer_bytes = bytes,
            Backend::S3(s3) => s3.buffer_bytes = bytes,
        }
        self
    }

    /// Changes the memory all buffered results of a local store may hold together (see
    /// [`LOCAL_MEMORY_BYTES`]); no effect on S3, where each upload holds at most one buffer or one
    /// multipart upload's parts in flight.
    pub fn with_memory_budget(mut self, bytes: usize) -> Self {
        if let Backend::Local { memory, .. } = &mut self.backend {
            *memory = Arc::new(Semaphore::new(bytes / 1024));
        }
        self
    }

    /// The directory of a local store (`None` for S3).
    pub fn root(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local { root, .. } => Some(root),
            Backend::S3(_) => None,
        }
    }

    /// Where results go, for logs: the directory or the `s3://` URL.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Local { root, .. } => root.display().to_string(),
            Backend::S3(s3) => s3.url.clone(),
        }
    }

    /// The key of a result: `{job}/{index}.{lease_token}.png`. The token makes every upload attempt's
    /// key its own, so a blob can be published before its commit without ever replacing another
    /// attempt's bytes; the task row records the key of the one it committed.
    pub fn key_for(job: &uuid::Uuid, index: u64, lease_token: u64) -> String {
        format!("{job}/{index}.{lease_token}.png")
    }

    /// Removes a published blob whose commit was refused (best effort: logged, not returned).
    pub async fn delete(&self, key: &str) {
        let removed = match &self.backend {
            Backend::Local { root, .. } => match self.path(root, key) {
                Ok(p) => match fs::remove_file(&p).await {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                    _ => Ok(()),
                },
                Err(e) => Err(e.to_string()),
            },
            Backend::S3(s3) => match BlobStore::object_path(s3, key) {
                Ok(path) => s3.store.delete(&path).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        };
        if let Err(e) = removed {
            tracing::warn!(key, error = %e, "could not remove a result whose commit was refused");
        }
    }

    fn check_key(key: &str) -> Result<()> {
        if key.split('/').any(|c| c.is_empty() || c == ".." || c == ".") {
            return Err(Error::Internal(format!("bad blob key {key}")));
        }
        Ok(())
    }

    fn path(&self, root: &Path, key: &str) -> Result<PathBuf> {
        BlobStore::check_key(key)?;
        Ok(root.join(key))
    }

    fn object_path(s3: &S3Bucket, key: &str) -> Result<ObjectPath> {
        BlobStore::check_key(key)?;
        let full = if s3.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", s3.prefix) };
        ObjectPath::parse(&full).map_err(|e| Error::Internal(format!("bad blob key {full}: {e}")))
    }

    /// Lists the prefix once: fails when the bucket or the credentials are wrong.
    async fn check_reachable(&self) -> Result<()> {
        if let Backend::S3(s3) = &self.backend {
            let prefix = (!s3.prefix.is_empty()).then(|| ObjectPath::from(s3.prefix.as_str()));
            s3.store
                .list_with_delimiter(prefix.as_ref())
                .await
                .map_err(|e| Error::Storage(std::io::Error::other(format!("{}: {e}", s3.url))))?;
        }
        Ok(())
    }

    /// Starts writing a blob that will be published under `key`.
    pub async fn create(&self, key: &str) -> Result<PendingBlob> {
        let state = match &self.backend {
            Backend::Local { root, buffer_bytes, memory } => {
                let final_path = self.path(root, key)?;
                let dir = final_path.parent().expect("key has a directory");
                let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
                Pending::Local {
                    tmp,
                    buffer: Vec::new(),
                    buffer_bytes: *buffer_bytes,
                    memory: memory.clone(),
                    reserved: None,
                    file: None,
                    spilled: false,
                }
            }
            Backend::S3(s3) => {
                BlobStore::object_path(s3, key)?;
                Pending::S3 {
                    store: s3.store.clone(),
                    tmp: BlobStore::object_path(s3, &format!(".tmp/{}", uuid::Uuid::new_v4()))?,
                    buffer: Vec::new(),
                    buffer_bytes: s3.buffer_bytes,
                    upload: None,
                    spilled: false,
                }
            }
        };
        Ok(PendingBlob { hasher: Sha256::new(), size: 0, state: Some(state) })
    }

    /// Makes a finished blob visible under `key` (replacing an uncommitted leftover there): an atomic
    /// rename, or one PUT (a copy of the temporary object for a spilled upload). On failure nothing
    /// of the blob is left behind.
    pub async fn publish(&self, mut blob: PendingBlob, key: &str) -> Result<()> {
        let state = blob.state.take().expect("blob not published");
        match (&self.backend, state) {
            (Backend::Local { root, .. }, Pending::Local { tmp, buffer, reserved, file, spilled, .. }) => {
                drop(file);
                let final_path = match self.path(root, key) {
                    Ok(p) => p,
                    Err(e) => {
                        if spilled {
                            let _ = fs::remove_file(&tmp).await;
                        }
                        return Err(e);
                    }
                };
                // One blocking call: (write and fsync the buffered bytes,) rename into place; the
                // temporary file is removed on any failure.
                let placed = tokio::task::spawn_blocking(move || {
                    // The buffer counts against the memory budget until it is written.
                    let _reserved = reserved;
                    let placed = (|| {
                        if !spilled {
                            std::fs::create_dir_all(tmp.parent().expect("key has a directory"))?;
                            let mut f = std::fs::File::create(&tmp)?;
                            std::io::Write::write_all(&mut f, &buffer)?;
                            f.sync_all()?;
                        }
                        // A retried upload may replace a blob that was already committed: only a
                        // new one is taken back out below.
                        let existed = final_path.exists();
                        std::fs::rename(&tmp, &final_path)?;
                        // The rename, and the job's directory if it is new, must survive a crash
                        // once the result row is committed: sync the directory entries too. A
                        // failure there takes a new blob back out (nothing is left behind).
                        sync_dir_and_parent(final_path.parent().expect("key has a directory")).inspect_err(|_| {
                            if !existed {
                                let _ = std::fs::remove_file(&final_path);
                            }
                        })
                    })();
                    if placed.is_err() {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    placed
                })
                .await
                .map_err(|e| Error::Internal(format!("result write task: {e}")))?;
                placed.map_err(Error::from)
            }
            (Backend::S3(s3), Pending::S3 { store, tmp, buffer, upload, spilled, .. }) => {
                if let Some(writer) = upload {
                    let _ = writer.abort().await;
                    return Err(Error::Internal("publishing a blob that was not finished".into()));
                }
                let dest = BlobStore::object_path(s3, key);
                let done = match &dest {
                    Ok(dest) if spilled => store.copy(&tmp, dest).await.map_err(storage),
                    Ok(dest) => {
                        store.put(dest, PutPayload::from(Bytes::from(buffer))).await.map(|_| ()).map_err(storage)
                    }
                    Err(_) => Ok(()),
                };
                if spilled {
                    delete_tmp(store.as_ref(), &tmp).await;
                }
                dest?;
                done
            }
            (_, state) => {
                state.remove().await;
                Err(Error::Internal("blob from another store".into()))
            }
        }
    }

    /// Streams the blob under `key`; NOT_FOUND if it is missing.
    pub async fn open_read(&self, key: &str) -> Result<BlobReader> {
        let missing = || Error::NotFound(format!("result blob {key} is missing from storage"));
        match &self.backend {
            Backend::Local { root, .. } => {
                let p = self.path(root, key)?;
                let mut file = fs::File::open(&p).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        missing()
                    } else {
                        Error::Storage(e)
                    }
                })?;
                let stream = async_stream::stream! {
                    let mut buf = vec![0u8; READ_CHUNK_BYTES];
                    loop {
                        match file.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => yield Ok(Bytes::copy_from_slice(&buf[..n])),
                            Err(e) => { yield Err(Error::Storage(e)); break; }
                        }
                    }
                };
                Ok(stream.boxed())
            }
            Backend::S3(s3) => {
                let path = BlobStore::object_path(s3, key)?;
                let got = s3.store.get(&path).await.map_err(|e| match e {
                    object_store::Error::NotFound { .. } => missing(),
                    other => storage(other),
                })?;
                let mut body = got.into_stream();
                let stream = async_stream::stream! {
                    while let Some(chunk) = body.next().await {
                        match chunk {
                            Ok(mut bytes) => {
                                while bytes.len() > READ_CHUNK_BYTES {
                                    yield Ok(bytes.split_to(READ_CHUNK_BYTES));
                                }
                                if !bytes.is_empty() {
                                    yield Ok(bytes);
                                }
                            }
                            Err(e) => { yield Err(storage(e)); break; }
                        }
                    }
                };
                Ok(stream.boxed())
            }
        }
    }
}

/// fsyncs a directory and its parent (on Unix; a directory cannot be opened for syncing elsewhere).
fn sync_dir_and_parent(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        std::fs::File::open(d)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(store: &BlobStore, key: &str) -> Result<Vec<u8>> {
        let mut reader = store.open_read(key).await?;
        let mut out = Vec::new();
        while let Some(chunk) = reader.next().await {
            let chunk = chunk?;
            assert!(chunk.len() <= READ_CHUNK_BYTES);
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Temporary files in the folder of `key`.
    fn tmp_files(root: &Path, key: &str) -> usize {
        let dir = root.join(key).parent().unwrap().to_path_buf();
        std::fs::read_dir(dir)
            .map(|d| d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-")).count())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn buffered_local_results_stay_within_the_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).await.unwrap().with_memory_budget(1 << 20);
        let job = uuid::Uuid::new_v4();
        let keys: Vec<String> = (0..3).map(|i| BlobStore::key_for(&job, i, 1)).collect();
        let data: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 700 << 10]).collect();
        let write = |key: String, data: Vec<u8>| {
            let store = &store;
            async move {
                let mut b = store.create(&key).await.unwrap();
                for chunk in data.chunks(64 << 10) {
                    b.write(chunk).await.unwrap();
                }
                b
            }
        };
        // 700 KiB fits the 1 MiB budget and stays in memory; a second one at the same time does not
        // fit and goes through a temporary file.
        let first = write(keys[0].clone(), data[0].clone()).await;
        assert_eq!(tmp_files(dir.path(), &keys[0]), 0, "the first result is buffered");
        let second = write(keys[1].clone(), data[1].clone()).await;
        assert_eq!(tmp_files(dir.path(), &keys[1]), 1, "the second result spilled to a temporary file");
        store.publish(first, &keys[0]).await.unwrap();
        // Publishing the first released its share: the third is buffered again.
        let third = write(keys[2].clone(), data[2].clone()).await;
        assert_eq!(tmp_files(dir.path(), &keys[2]), 1, "only the second result's temporary file");
        let mut second = second;
        second.finish().await.unwrap();
        store.publish(second, &keys[1]).await.unwrap();
        store.publish(third, &keys[2]).await.unwrap();
        for (key, bytes) in keys.iter().zip(&data) {
            assert_eq!(&read_all(&store, key).await.unwrap(), bytes, "{key}");
        }
        assert_eq!(tmp_files(dir.path(), &keys[0]), 0, "no temporary file is left");
        // Dropping a buffered result unpublished also returns its share.
        let dropped = write(keys[0].clone(), data[0].clone()).await;
        drop(dropped);
        let again = write(keys[1].clone(), data[1].clone()).await;
        assert_eq!(tmp_files(dir.path(), &keys[1]), 0, "buffered once the dropped result's share is back");
        drop(again);
    }

    #[tokio::test]
    async fn write_check_publish_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().to_str().unwrap()).await.unwrap();
        let job = uuid::Uuid::new_v4();
        let key = BlobStore::key_for(&job, 7, 1);
        let mut b = store.create(&key).await.unwrap();
        b.write(b"hello ").await.unwrap();
        b.write(b"world").await.unwrap();
        let sha = b.finish().await.unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(b"hello world")));
        assert!(!dir.path().join(&key).exists(), "not visible before publish");
        store.publish(b, &key).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join(&key)).unwrap(), b"hello world");
        assert_eq!(read_all(&store, &key).await.unwrap(), b"hello world");
        assert!(store.path(dir.path(), "../etc/passwd").is_err());
        // discarded (or dropped) blobs leave nothing behind
        let b = store.create(&BlobStore::key_for(&job, 8, 1)).await.unwrap();
        b.discard().await;
        let mut b = store.create(&BlobStore::key_for(&job, 9, 1)).await.unwrap();
        b.write(b"half").await.unwrap();
        drop(b);
        let mut b = store.create(&BlobStore::key_for(&job, 10, 1)).await.unwrap();
        b.write(b"z").await.unwrap();
        b.finish().await.unwrap();
        assert!(store.publish(b, "../escape.png").await.is_err(), "a bad key is refused at publish");
        let names: Vec<_> = std::fs::read_dir(dir.path().join(job.to_string())).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert!(matches!(read_all(&store, &BlobStore::key_for(&job, 8, 1)).await, Err(Error::NotFound(_))));
    }

    #[tokio::test]
    async fn a_large_local_blob_reads_back_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&format!("file://{}", dir.path().display()))
            .await
            .unwrap()
            .with_buffer_bytes(150_000);
        let data: Vec<u8> = (0..(3 * READ_CHUNK_BYTES + 17)).map(|i| (i * 31 % 251) as u8).collect();
        let job = uuid::Uuid::new_v4();
        let key = BlobStore::key_for(&job, 0, 1);
        let mut b = store.create(&key).await.unwrap();
        for part in data.chunks(100_000) {
            b.write(part).await.unwrap();
        }
        let on_disk = || std::fs::read_dir(dir.path().join(job.to_string())).map(|d| d.count()).unwrap_or(0);
        assert_eq!(on_disk(), 1, "past the buffer the result streams into a temporary file");
        b.finish().await.unwrap();
        store.publish(b, &key).await.unwrap();
        assert_eq!(read_all(&store, &key).await.unwrap(), data);
        assert_eq!(on_disk(), 1, "the temporary file became the result");
        // A spilled blob that is dropped removes its temporary file.
        let mut b = store.create(&BlobStore::key_for(&job, 1, 1)).await.unwrap();
        b.write(&data).await.unwrap();
        assert_eq!(on_disk(), 2);
        drop(b);
        assert_eq!(on_disk(), 1);
    }

    #[tokio::test]
    async fn unknown_schemes_are_refused() {
        for url in ["gs://bucket/x", "http://host/x", "s3://", "s3:///prefix", "s3://b/../x"] {
            assert!(matches!(BlobStore::open(url).await, Err(Error::InvalidArgument(_))), "{url} must be refused");
        }
    }
    // The S3 backend against a real S3-compatible server (moto, installed by xtask when missing).
    mod s3 {
        use super::*;
        use object_store::aws::AmazonS3;
        use xtask::moto::MotoServer;

        async fn moto_with_bucket(bucket: &'static str) -> MotoServer {
            tokio::task::spawn_blocking(move || {
                let moto = MotoServer::start().expect("start moto (pip install moto[server] when missing)");
                moto.create_bucket(bucket).unwrap();
                moto
            })
            .await
            .unwrap()
        }

        fn client(moto: &MotoServer, bucket: &str) -> AmazonS3 {
            let mut builder = AmazonS3Builder::new().with_bucket_name(bucket);
            for (name, value) in moto.env() {
                builder = builder.with_config(name.to_ascii_lowercase().parse().unwrap(), value);
            }
            builder.build().unwrap()
        }

        fn store(moto: &MotoServer, bucket: &str, prefix: &str) -> BlobStore {
            BlobStore::s3(Arc::new(client(moto, bucket)), prefix, &format!("s3://{bucket}/{prefix}"))
        }

        /// Every object key in the bucket, sorted.
        async fn keys(moto: &MotoServer, bucket: &str) -> Vec<String> {
            let listed: Vec<_> = client(moto, bucket).list(None).collect().await;
            let mut keys: Vec<String> = listed.into_iter().map(|m| m.unwrap().location.to_string()).collect();
            keys.sort();
            keys
        }

        /// Multipart uploads that were started and neither completed nor aborted.
        fn open_uploads(moto: &MotoServer, bucket: &str) -> usize {
            let (status, body) = moto.get(&format!("/{bucket}?uploads")).unwrap();
            assert_eq!(status, 200, "{body}");
            body.matches("<UploadId>").count()
        }

        #[tokio::test]
        async fn a_result_appears_under_its_key_only_when_published() {
            let moto = moto_with_bucket("blobs").await;
            let store = store(&moto, "blobs", "farm/results");
            store.check_reachable().await.unwrap();
            let job = uuid::Uuid::new_v4();
            let key = BlobStore::key_for(&job, 7, 1);
            let mut b = store.create(&key).await.unwrap();
            b.write(b"hello ").await.unwrap();
            b.write(b"world").await.unwrap();
            let sha = b.finish().await.unwrap();
            assert_eq!(sha, hex::encode(Sha256::digest(b"hello world")));
            assert!(keys(&moto, "blobs").await.is_empty(), "nothing in the bucket before publish");
            store.publish(b, &key).await.unwrap();
            assert_eq!(keys(&moto, "blobs").await, vec![format!("farm/results/{job}/7.1.png")]);
            assert_eq!(read_all(&store, &key).await.unwrap(), b"hello world");

            // Discarded and dropped blobs leave nothing; a missing key is NOT_FOUND.
            let mut b = store.create(&BlobStore::key_for(&job, 8, 1)).await.unwrap();
            b.write(b"x").await.unwrap();
            b.discard().await;
            let mut b = store.create(&BlobStore::key_for(&job, 9, 1)).await.unwrap();
            b.write(b"y").await.unwrap();
            drop(b);
            assert_eq!(keys(&moto, "blobs").await.len(), 1);
            assert!(matches!(read_all(&store, &BlobStore::key_for(&job, 8, 1)).await, Err(Error::NotFound(_))));
            assert!(store.path(Path::new("/"), "a/../b").is_err() && BlobStore::check_key("a//b").is_err());
        }

        #[tokio::test]
        async fn a_large_result_streams_through_a_temporary_multipart_upload() {
            let moto = moto_with_bucket("large").await;
            let store = store(&moto, "large", "r").with_buffer_bytes(64 * 1024);
            let data: Vec<u8> = (0..(11usize << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            let job = uuid::Uuid::new_v4();
            let key = BlobStore::key_for(&job, 0, 1);

            let mut b = store.create(&key).await.unwrap();
            for part in data.chunks(1 << 20) {
                b.write(part).await.unwrap();
            }
            assert_eq!(open_uploads(&moto, "large"), 1, "the upload spilled into a multipart upload");
            assert!(keys(&moto, "large").await.is_empty(), "nothing visible while uploading");
            let sha = b.finish().await.unwrap();
            assert_eq!(sha, hex::encode(Sha256::digest(&data)));
            let staged = keys(&moto, "large").await;
            assert!(staged.len() == 1 && staged[0].starts_with("r/.tmp/"), "completed at a temporary key: {staged:?}");
            store.publish(b, &key).await.unwrap();
            assert_eq!(keys(&moto, "large").await, vec![format!("r/{job}/0.1.png")], "the temporary object is gone");
            assert_eq!(open_uploads(&moto, "large"), 0);
            let back = read_all(&store, &key).await.unwrap();
            assert!(back == data, "read back {} bytes, wrote {}", back.len(), data.len());

            // A spilled upload that fails before finishing is aborted; one that finished is deleted.
            let mut b = store.create(&BlobStore::key_for(&job, 1, 1)).await.unwrap();
            b.write(&data[..200_000]).await.unwrap();
            assert_eq!(open_uploads(&moto, "large"), 1);
            b.discard().await;
            assert_eq!(open_uploads(&moto, "large"), 0, "aborted");
            let mut b = store.create(&BlobStore::key_for(&job, 2, 1)).await.unwrap();
            b.write(&data[..200_000]).await.unwrap();
            b.finish().await.unwrap();
            b.discard().await;
            // A handler cancelled mid-upload drops its blob: the abort runs in the background.
            let mut b = store.create(&BlobStore::key_for(&job, 3, 1)).await.unwrap();
            b.write(&data[..200_000]).await.unwrap();
            drop(b);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while open_uploads(&moto, "large") > 0 && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            assert_eq!(open_uploads(&moto, "large"), 0, "a dropped upload is aborted");
            assert_eq!(keys(&moto, "large").await, vec![format!("r/{job}/0.1.png")], "nothing else is left");
        }

        #[tokio::test]
        async fn a_missing_bucket_is_reported_at_open() {
            let moto = moto_with_bucket("present").await;
            let store = store(&moto, "absent", "");
            let err = store.check_reachable().await.unwrap_err();
            assert!(matches!(err, Error::Storage(_)), "{err}");
            assert!(err.to_string().contains("s3://absent"), "{err}");
        }
    }
}

//! Where images live. `FARM_STORAGE` names either a local folder (`file:///abs/dir`, or a plain
//! path) or an S3 bucket (`s3://bucket[/prefix]`, configured by the standard `AWS_*`
//! environment variables). Everything else in the farm sees only [`Storage`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

pub const DEFAULT_STORAGE: &str = "./farm-data/objects";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage {uri:?}: {message}")]
    Config { uri: String, message: String },
    #[error("storage {uri}: key {key:?}: {source}")]
    Object {
        uri: String,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("storage key {0:?} is not a valid object path")]
    BadKey(String),
}

/// An opened object store plus the URI it came from (for messages).
#[derive(Clone)]
pub struct Storage {
    uri: String,
    store: Arc<dyn ObjectStore>,
    /// For `file://` storage: the root folder, so callers can show real paths.
    local_root: Option<PathBuf>,
    /// For S3: signs expiring GET URLs.
    signer: Option<Arc<object_store::aws::AmazonS3>>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("uri", &self.uri).finish()
    }
}

impl Storage {
    /// Opens `uri`: `file:///abs/dir`, a plain (relative or absolute) folder path, or
    /// `s3://bucket`. A local folder is created if missing.
    pub fn open(uri: &str) -> Result<Self, StorageError> {
        let config = |message: String| StorageError::Config {
            uri: uri.to_string(),
            message,
        };
        if let Some(rest) = uri.strip_prefix("s3://") {
            let bucket = rest.split('/').next().unwrap_or_default();
            if bucket.is_empty() {
                return Err(config("no bucket name; expected s3://bucket".into()));
            }
            // Few quick retries inside object_store: the caller's own retry budget (and the
            // task's requeue) governs longer outages.
            let retry = object_store::RetryConfig {
                backoff: object_store::BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
            };
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry);
            // object_store reads AWS_ENDPOINT; the AWS SDKs' name is AWS_ENDPOINT_URL.
            if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                builder = builder.with_endpoint(endpoint);
            }
            if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err()
            {
                builder = builder.with_region("us-east-1");
            }
            let store = builder
                .build()
                .map_err(|e| config(format!("{e}; set AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and AWS_ALLOW_HTTP=true for http endpoints)")))?;
            let store = Arc::new(store);
            return Ok(Storage {
                uri: uri.to_string(),
                store: store.clone(),
                local_root: None,
                signer: Some(store),
            });
        }
        let path = match uri.strip_prefix("file://") {
            Some(p) if !p.starts_with('/') => {
                return Err(config(
                    "file:// URIs need an absolute path, e.g. file:///srv/farm".into(),
                ))
            }
            Some(p) => PathBuf::from(p),
            None if uri.contains("://") => {
                return Err(config(
                    "unsupported scheme; use file:///abs/dir or s3://bucket".into(),
                ))
            }
            None => PathBuf::from(uri),
        };
        std::fs::create_dir_all(&path)
            .map_err(|e| config(format!("cannot create folder {}: {e}", path.display())))?;
        let root = path
            .canonicalize()
            .map_err(|e| config(format!("cannot resolve {}: {e}", path.display())))?;
        let store = LocalFileSystem::new_with_prefix(&root).map_err(|e| config(e.to_string()))?;
        Ok(Storage {
            uri: format!("file://{}", root.display()),
            store: Arc::new(store),
            local_root: Some(root),
            signer: None,
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The local file a key maps to, for `file://` storage.
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.local_root.as_deref().map(|root: &Path| root.join(key))
    }

    fn path(key: &str) -> Result<ObjectPath, StorageError> {
        ObjectPath::parse(key).map_err(|_| StorageError::BadKey(key.to_string()))
    }

    fn object_error(&self, key: &str, source: object_store::Error) -> StorageError {
        StorageError::Object {
            uri: self.uri.clone(),
            key: key.to_string(),
            source,
        }
    }

    /// Writes `bytes` at `key` (whole object, atomically visible).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let path = Self::path(key)?;
        self.store
            .put(&path, PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.object_error(key, e))
    }

    /// [`Storage::put`], retried with exponential backoff (`tries` attempts in all).
    pub async fn put_with_retry(
        &self,
        key: &str,
        bytes: Bytes,
        tries: u32,
    ) -> Result<(), StorageError> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.put(key, bytes.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < tries => {
                    tracing::warn!(key, attempt, error = %e, "upload failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// An expiring URL that GETs `key` without credentials, where the store can sign one
    /// (S3); `None` for a local folder.
    pub async fn presigned_get(
        &self,
        key: &str,
        expires_in: Duration,
    ) -> Result<Option<String>, StorageError> {
        use object_store::signer::Signer;
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let path = Self::path(key)?;
        let url = signer
            .signed_url(http::Method::GET, &path, expires_in)
            .await
            .map_err(|e| self.object_error(key, e))?;
        Ok(Some(url.to_string()))
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        let path = Self::path(key)?;
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.object_error(key, e)),
        }
    }

    /// Every key under `prefix` (recursively), sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        use futures::TryStreamExt;
        let path = Self::path(prefix)?;
        let mut keys: Vec<String> = self
            .store
            .list(Some(&path))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .map_err(|e| self.object_error(prefix, e))?;
        keys.sort();
        Ok(keys)
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = Self::path(key)?;
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.object_error(key, e))?;
        result.bytes().await.map_err(|e| self.object_error(key, e))
    }

    /// Checks that the store answers and the bucket exists (a HEAD of a key that need not
    /// exist), for start-up checks.
    pub async fn check(&self) -> Result<(), StorageError> {
        let probe = ObjectPath::from("farm-healthcheck");
        match self.store.head(&probe).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.object_error("farm-healthcheck", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_folder_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(&format!("file://{}", dir.path().display())).expect("open");
        storage.check().await.expect("check");
        storage
            .put("p/jobs/x/000001-5.png", Bytes::from_static(b"png"))
            .await
            .expect("put");
        assert_eq!(
            storage.get("p/jobs/x/000001-5.png").await.expect("get"),
            Bytes::from_static(b"png")
        );
        assert!(storage
            .local_path("p/jobs/x/000001-5.png")
            .expect("local")
            .exists());
    }

    #[test]
    fn bad_uris_are_refused() {
        assert!(matches!(
            Storage::open("file://relative"),
            Err(StorageError::Config { .. })
        ));
        assert!(matches!(
            Storage::open("gs://bucket"),
            Err(StorageError::Config { .. })
        ));
        assert!(matches!(
            Storage::open("s3://"),
            Err(StorageError::Config { .. })
        ));
    }
}

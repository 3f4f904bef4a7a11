//! The S3 client: put (single and multipart), head, get, presign, and error classes.
//!
//! The SDK's own retries are off: `retry.rs` owns the policy and the catalog remembers
//! attempts across restarts. Request checksums are ours (a precomputed SHA-256 header),
//! never the SDK's default CRC32 or streaming trailer, which S3-compatible servers reject.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart,
};
use aws_sdk_s3::Client;
use sha2::Digest;

use crate::config::Config;
use crate::retry::{self, Class};

/// An S3 failure, classified once, with the server's own words kept for `ferry status`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} {key}: {message}")]
pub struct StoreError {
    pub op: &'static str,
    pub key: String,
    pub class: Class,
    pub code: Option<String>,
    pub status: Option<u16>,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        self.status == Some(404)
            || matches!(self.code.as_deref(), Some("NoSuchKey") | Some("NotFound"))
    }
    pub fn is_transient(&self) -> bool {
        self.class == Class::Transient
    }
}

fn classify<E, R>(op: &'static str, key: &str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus,
{
    let mk = |class, code: Option<String>, status, message: String, retry_after| StoreError {
        op,
        key: key.to_string(),
        class,
        code,
        status,
        message,
        retry_after,
    };
    match &err {
        SdkError::TimeoutError(_) => mk(Class::Transient, None, None, "timed out".into(), None),
        SdkError::DispatchFailure(d) => {
            let what = if d.is_timeout() {
                "timed out"
            } else if d.is_io() {
                "connection failed"
            } else {
                "request failed"
            };
            let detail = std::error::Error::source(&err)
                .map(|s| format!("{what}: {}", error_chain(s)))
                .unwrap_or_else(|| what.to_string());
            mk(Class::Transient, None, None, detail, None)
        }
        SdkError::ConstructionFailure(_) => mk(
            Class::Permanent,
            None,
            None,
            format!("cannot build request: {}", error_chain(&err)),
            None,
        ),
        SdkError::ResponseError(r) => {
            let status = r.raw().status_code();
            mk(
                retry::classify_status(status),
                None,
                Some(status),
                format!("unreadable response (HTTP {status})"),
                None,
            )
        }
        SdkError::ServiceError(s) => {
            let status = s.raw().status_code();
            let retry_after = s.raw().retry_after();
            let code = err.code().map(str::to_string);
            let class = code
                .as_deref()
                .and_then(retry::classify_s3_code)
                .unwrap_or_else(|| retry::classify_status(status));
            let message = match (code.as_deref(), err.message()) {
                (Some(c), Some(m)) => format!("{c}: {m} (HTTP {status})"),
                (Some(c), None) => format!("{c} (HTTP {status})"),
                (None, _) if status == 404 => format!("not found (HTTP {status})"),
                (None, _) => format!("HTTP {status}"),
            };
            if code.as_deref() == Some("RequestTimeTooSkewed") {
                tracing::error!("S3 says this machine's clock is wrong (RequestTimeTooSkewed): fix the clock (NTP)");
            }
            mk(class, code, Some(status), message, retry_after)
        }
        _ => mk(Class::Transient, None, None, error_chain(&err), None),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The bits of a raw HTTP response that classification needs.
pub trait HasStatus {
    fn status_code(&self) -> u16;
    fn retry_after(&self) -> Option<Duration>;
}
impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
    fn retry_after(&self) -> Option<Duration> {
        self.headers()
            .get("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    }
}

/// What a HEAD says about an object.
#[derive(Debug, Clone, Default)]
pub struct Head {
    pub size: u64,
    pub etag: Option<String>,
    pub checksum_sha256: Option<String>,
    pub checksum_type: Option<String>,
    pub metadata: std::collections::HashMap<String, String>,
    /// When S3 stored this version: Last-Modified for nodes that did not upload it.
    pub last_modified: Option<std::time::SystemTime>,
}

/// One part of a multipart upload, hashed before it is sent.
#[derive(Debug, Clone)]
pub struct PartSpec {
    pub number: i32,
    pub offset: u64,
    pub len: u64,
    pub sha256_b64: String,
}

/// What goes on every PUT besides the bytes.
/// What a single PUT's response says about the stored object.
#[derive(Debug, Clone, Default)]
pub struct PutReply {
    pub etag: Option<String>,
    /// `x-amz-checksum-sha256` as echoed (base64), if the server echoed one.
    pub checksum_sha256: Option<String>,
    /// SSE-KMS or SSE-C: the ETag is then not an MD5 of the body.
    pub encrypted_by_key: bool,
}

#[derive(Debug, Clone)]
pub struct PutMeta {
    pub content_type: String,
    pub sha256_hex: String,
    pub mtime: String,
}

#[derive(Clone)]
pub struct Store {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    region: String,
    path_style: bool,
}

impl Store {
    /// Builds the client from config and the standard AWS credential chain.
    pub async fn new(cfg: &Config) -> Store {
        Self::build(cfg, None).await
    }

    /// A client with fixed credentials (tests and tools that must not read the environment).
    pub async fn with_credentials(cfg: &Config, access_key: &str, secret_key: &str) -> Store {
        let creds = aws_sdk_s3::config::Credentials::new(
            access_key,
            secret_key,
            None,
            None,
            "ferry-static",
        );
        Self::build(cfg, Some(creds)).await
    }

    async fn build(cfg: &Config, creds: Option<aws_sdk_s3::config::Credentials>) -> Store {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(cfg.s3.region.clone()));
        if let Some(c) = creds {
            loader = loader.credentials_provider(c);
        }
        if cfg.custom_endpoint() {
            loader = loader.endpoint_url(cfg.s3.endpoint.clone());
        }
        let sdk = loader.load().await;
        let timeouts = aws_smithy_types::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .build();
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.s3.path_style)
            .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
            .timeout_config(timeouts)
            // Our SHA-256 header is the checksum; the SDK's default CRC32 and its streaming
            // trailer are refused by many S3-compatible servers.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if cfg.custom_endpoint() {
            b = b.endpoint_url(cfg.s3.endpoint.clone());
        }
        Store {
            client: Client::from_conf(b.build()),
            bucket: cfg.s3.bucket.clone(),
            prefix: cfg.s3.prefix.clone(),
            endpoint: cfg.s3.endpoint.clone(),
            region: cfg.s3.region.clone(),
            path_style: cfg.s3.path_style,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bucket's own URL, used as the redirect base when `http.redirect_base` is "".
    pub fn bucket_url(&self) -> String {
        if self.endpoint.is_empty() {
            format!("https://{}.s3.{}.amazonaws.com/", self.bucket, self.region)
        } else if self.path_style {
            format!("{}/{}/", self.endpoint.trim_end_matches('/'), self.bucket)
        } else {
            match self.endpoint.split_once("://") {
                Some((scheme, host)) => {
                    format!("{scheme}://{}.{}/", self.bucket, host.trim_end_matches('/'))
                }
                None => format!("{}/{}/", self.endpoint, self.bucket),
            }
        }
    }

    /// PUTs the file hashed as `stat`: the body is read from a descriptor checked to be that
    /// very file (see [`file_body`]), whatever the name points to by now.
    pub async fn put_single(
        &self,
        object_key: &str,
        path: &Path,
        stat: &crate::catalog::FileStat,
        sha256_b64: &str,
        meta: &PutMeta,
    ) -> Result<PutReply, StoreError> {
        let size = stat.size;
        let body = file_body(path, stat, 0, size, "put", object_key).await?;
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(object_key)
            .body(body)
            .content_length(size as i64)
            .content_type(&meta.content_type)
            .checksum_sha256(sha256_b64)
            .metadata("sha256", &meta.sha256_hex)
            .metadata("mtime", &meta.mtime)
            .send()
            .await
            .map_err(|e| classify("put", object_key, e))?;
        // SSE-KMS and SSE-C objects have ETags that are not the MD5 of the body.
        let encrypted_by_key = out.sse_customer_algorithm().is_some()
            || out
                .server_side_encryption()
                .is_some_and(|s| s.as_str().starts_with("aws:kms"));
        Ok(PutReply {
            etag: out.e_tag().map(str::to_string),
            checksum_sha256: out.checksum_sha256().map(str::to_string),
            encrypted_by_key,
        })
    }

    pub async fn create_multipart(
        &self,
        object_key: &str,
        meta: &PutMeta,
    ) -> Result<String, StoreError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(object_key)
            .content_type(&meta.content_type)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_type(ChecksumType::Composite)
            .metadata("sha256", &meta.sha256_hex)
            .metadata("mtime", &meta.mtime)
            .send()
            .await
            .map_err(|e| classify("create-multipart", object_key, e))?;
        out.upload_id()
            .map(str::to_string)
            .ok_or_else(|| StoreError {
                op: "create-multipart",
                key: object_key.to_string(),
                class: Class::Transient,
                code: None,
                status: None,
                message: "server returned no upload id".into(),
                retry_after: None,
            })
    }

    /// Sends one part, streamed from the file; returns the part's ETag.
    pub async fn upload_part(
        &self,
        object_key: &str,
        upload_id: &str,
        path: &Path,
        stat: &crate::catalog::FileStat,
        part: &PartSpec,
    ) -> Result<CompletedPart, StoreError> {
        let body = file_body(path, stat, part.offset, part.len, "upload-part", object_key).await?;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .part_number(part.number)
            .content_length(part.len as i64)
            .checksum_sha256(&part.sha256_b64)
            .body(body)
            .send()
            .await
            .map_err(|e| classify("upload-part", object_key, e))?;
        Ok(CompletedPart::builder()
            .part_number(part.number)
            .set_e_tag(out.e_tag().map(str::to_string))
            .checksum_sha256(&part.sha256_b64)
            .build())
    }

    pub async fn complete_multipart(
        &self,
        object_key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<Option<String>, StoreError> {
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify("complete-multipart", object_key, e))?;
        Ok(out.e_tag().map(str::to_string))
    }

    pub async fn abort_multipart(
        &self,
        object_key: &str,
        upload_id: &str,
    ) -> Result<(), StoreError> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| classify("abort-multipart", object_key, e))?;
        Ok(())
    }

    /// Multipart uploads in progress under the prefix: (object key, upload id).
    pub async fn list_multipart(&self) -> Result<Vec<(String, String)>, StoreError> {
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .send()
            .await
            .map_err(|e| classify("list-multipart", &self.prefix, e))?;
        Ok(out
            .uploads()
            .iter()
            .filter_map(|u| Some((u.key()?.to_string(), u.upload_id()?.to_string())))
            .collect())
    }

    pub async fn head(&self, object_key: &str) -> Result<Head, StoreError> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(object_key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| classify("head", object_key, e))?;
        Ok(Head {
            size: out.content_length().unwrap_or(-1).max(0) as u64,
            etag: out.e_tag().map(str::to_string),
            checksum_sha256: out.checksum_sha256().map(str::to_string),
            checksum_type: out.checksum_type().map(|t| t.as_str().to_string()),
            metadata: out.metadata().cloned().unwrap_or_default(),
            last_modified: out
                .last_modified()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
        })
    }

    /// Reads the whole object back and hashes it: (size, hex SHA-256).
    pub async fn read_back(&self, object_key: &str) -> Result<(u64, String), StoreError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(object_key)
            .send()
            .await
            .map_err(|e| classify("get", object_key, e))?;
        let mut body = out.body;
        let mut h = sha2::Sha256::new();
        let mut n = 0u64;
        loop {
            match body.try_next().await {
                Ok(Some(chunk)) => {
                    n += chunk.len() as u64;
                    h.update(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(StoreError {
                        op: "get",
                        key: object_key.to_string(),
                        class: Class::Transient,
                        code: None,
                        status: None,
                        message: format!("reading body: {}", error_chain(&e)),
                        retry_after: None,
                    })
                }
            }
        }
        Ok((n, hex::encode(h.finalize())))
    }

    pub async fn get(
        &self,
        object_key: &str,
        range: Option<String>,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, StoreError> {
        self.client
            .get_object()
            .bucket(&self.bucket)
            .key(object_key)
            .set_range(range)
            .send()
            .await
            .map_err(|e| classify("get", object_key, e))
    }

    pub async fn put_bytes(
        &self,
        object_key: &str,
        bytes: Vec<u8>,
        metadata: &[(&str, &str)],
    ) -> Result<(), StoreError> {
        let sha = base64_sha256(&bytes);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(object_key)
            .content_length(bytes.len() as i64)
            .checksum_sha256(sha)
            .body(ByteStream::from(bytes));
        for (k, v) in metadata {
            req = req.metadata(*k, *v);
        }
        req.send()
            .await
            .map_err(|e| classify("put", object_key, e))?;
        Ok(())
    }

    pub async fn delete(&self, object_key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(object_key)
            .send()
            .await
            .map_err(|e| classify("delete", object_key, e))?;
        Ok(())
    }

    /// A presigned GET URL valid for `ttl`.
    pub async fn presign_get(&self, object_key: &str, ttl: Duration) -> Result<String, StoreError> {
        let pc = PresigningConfig::expires_in(ttl).map_err(|e| StoreError {
            op: "presign",
            key: object_key.to_string(),
            class: Class::Permanent,
            code: None,
            status: None,
            message: e.to_string(),
            retry_after: None,
        })?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(object_key)
            .presigned(pc)
            .await
            .map_err(|e| classify("presign", object_key, e))?;
        Ok(req.uri().to_string())
    }

    pub async fn head_bucket(&self) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| classify("head-bucket", &self.bucket, e))?;
        Ok(())
    }

    pub async fn create_bucket(&self) -> Result<(), StoreError> {
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| classify("create-bucket", &self.bucket, e))?;
        Ok(())
    }

    /// Lists up to `max` object keys under the prefix.
    pub async fn list(&self, max: i32) -> Result<Vec<String>, StoreError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .max_keys(max)
            .send()
            .await
            .map_err(|e| classify("list", &self.prefix, e))?;
        Ok(out
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect())
    }

    /// Every object key under the prefix, following continuation tokens.
    pub async fn list_all(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let resp = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| classify("list", &self.prefix, e))?;
            for o in resp.contents() {
                if let Some(k) = o.key() {
                    out.push((k.to_string(), o.size().unwrap_or(0).max(0) as u64));
                }
            }
            match resp.next_continuation_token() {
                Some(t) if resp.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }
}

async fn file_body(
    path: &Path,
    stat: &crate::catalog::FileStat,
    offset: u64,
    len: u64,
    op: &'static str,
    key: &str,
) -> Result<ByteStream, StoreError> {
    if len == 0 {
        return Ok(ByteStream::from_static(b""));
    }
    // SECURITY: the body must be the file that was hashed. The name is opened again with
    // O_NOFOLLOW (a symlink swapped in since the hash is refused, so no file outside the
    // spool is ever sent) and the descriptor must still be the hashed inode with the hashed
    // size and times (another file renamed over the name is refused). From here the bytes
    // come from this descriptor, not the name. Each call opens its own file description, so
    // concurrent parts do not share an offset.
    let changed = |what: String| StoreError {
        op,
        key: key.to_string(),
        class: Class::Transient,
        code: None,
        status: None,
        message: format!("{}: {what}; not sent", path.display()),
        retry_after: None,
    };
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| changed(format!("cannot be opened again ({e})")))?
    };
    let now = file
        .metadata()
        .map(|m| crate::catalog::FileStat::of(&m))
        .map_err(|e| changed(format!("cannot be stat'ed ({e})")))?;
    if now != *stat {
        return Err(changed("is no longer the file that was hashed".into()));
    }
    ByteStream::read_from()
        .file(tokio::fs::File::from_std(file))
        .offset(offset)
        .length(Length::Exact(len))
        .build()
        .await
        .map_err(|e| {
            let io = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .map(retry::classify_io);
            StoreError {
                op,
                key: key.to_string(),
                class: io.unwrap_or(Class::Transient),
                code: None,
                status: None,
                message: format!("reading {}: {}", path.display(), error_chain(&e)),
                retry_after: None,
            }
        })
}

pub fn base64_sha256(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
}

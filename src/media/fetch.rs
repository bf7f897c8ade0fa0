//! Getting the bytes an image URL names: `data:` URIs, http(s) URLs (a total timeout that a
//! trickling body cannot outlast, a byte cap enforced while streaming, a redirect cap, an
//! optional domain allowlist checked on every hop, private addresses refused on the address
//! connected to: `address`), and local files under one allowed folder. Everything a client
//! can get wrong is a `MediaError`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use super::MediaError;
use super::address::{AddressRule, GuardedResolver, Refused, SystemLookup};

#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// The whole fetch, connection to last byte.
    pub timeout: Duration,
    pub max_redirects: usize,
    /// Largest media file, however it arrives.
    pub max_bytes: usize,
    /// Hosts http(s) URLs may name (and their subdomains); empty: any host.
    pub allowed_domains: Vec<String>,
    /// The addresses http(s) URLs may reach.
    pub addresses: AddressRule,
    /// The folder `file://` URLs may read from; none: local files are refused.
    pub allowed_local_path: Option<PathBuf>,
}

/// Fetched bytes and the content type the source declared, if any.
#[derive(Debug)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub declared_type: Option<String>,
}

pub struct MediaFetcher {
    client: reqwest::Client,
    config: FetchConfig,
    /// `allowed_local_path`, resolved once.
    local_root: Option<PathBuf>,
}

impl MediaFetcher {
    pub fn new(config: FetchConfig) -> Result<Self, String> {
        // reqwest is built without a TLS crypto provider of its own; rustls's ring is the
        // one the rest of the binary already links. Installed once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (max_redirects, domains) = (config.max_redirects, config.allowed_domains.clone());
        let addresses = config.addresses.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            let checked = check_domain(attempt.url(), &domains).and_then(|()| addresses.check_url(attempt.url()));
            if attempt.previous().len() > max_redirects {
                attempt.error(Refused(MediaError::TooManyRedirects { limit: max_redirects }))
            } else if let Err(err) = checked {
                attempt.error(Refused(err))
            } else {
                attempt.follow()
            }
        });
        let resolver = GuardedResolver {
            lookup: Arc::new(SystemLookup),
            rule: config.addresses.clone(),
        };
        let mut builder = reqwest::Client::builder();
        if !config.addresses.allow_private {
            // Through a proxy the proxy resolves the name, and the address it connects to
            // cannot be checked here.
            builder = builder.no_proxy();
        }
        let client = builder
            .dns_resolver(resolver)
            .redirect(policy)
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("ocellus/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let local_root = match &config.allowed_local_path {
            Some(path) => Some(
                path.canonicalize()
                    .map_err(|e| format!("--allowed-local-media-path {}: {e}", path.display()))?,
            ),
            None => None,
        };
        Ok(Self {
            client,
            config,
            local_root,
        })
    }

    pub async fn fetch(&self, url: &str) -> Result<Fetched, MediaError> {
        let scheme = url
            .split_once(':')
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        match scheme.as_str() {
            "data" => self.data_uri(url),
            "http" | "https" => self.http(url).await,
            "file" => self.local_file(url).await,
            _ => Err(MediaError::UnsupportedUrl {
                scheme: scheme.chars().take(16).collect(),
            }),
        }
    }

    fn data_uri(&self, url: &str) -> Result<Fetched, MediaError> {
        decode_data_uri(url, self.config.max_bytes)
    }

    async fn http(&self, url: &str) -> Result<Fetched, MediaError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| MediaError::BadUrl(e.to_string()))?;
        check_domain(&parsed, &self.config.allowed_domains)?;
        self.config.addresses.check_url(&parsed)?;
        let mut response = self.client.get(parsed).send().await.map_err(fetch_error)?;
        if !response.status().is_success() {
            return Err(MediaError::FetchFailed(format!(
                "the server answered {}",
                response.status()
            )));
        }
        let limit = self.config.max_bytes;
        if response.content_length().is_some_and(|n| n as usize > limit) {
            return Err(MediaError::TooLarge { limit });
        }
        let declared_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_ascii_lowercase());
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(fetch_error)? {
            if bytes.len() + chunk.len() > limit {
                return Err(MediaError::TooLarge { limit });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Fetched { bytes, declared_type })
    }

    async fn local_file(&self, url: &str) -> Result<Fetched, MediaError> {
        let Some(root) = &self.local_root else {
            return Err(MediaError::LocalFilesDisabled);
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| MediaError::BadUrl(e.to_string()))?;
        let path = parsed
            .to_file_path()
            .map_err(|()| MediaError::BadUrl(format!("not a local file path: {url}")))?;
        // Resolving symlinks and `..` first, so that no path escapes the allowed folder.
        let resolved = path
            .canonicalize()
            .map_err(|_| MediaError::FileNotFound(path.display().to_string()))?;
        if !resolved.starts_with(root) {
            return Err(MediaError::PathNotAllowed(path.display().to_string()));
        }
        let size = tokio::fs::metadata(&resolved)
            .await
            .map_err(|e| MediaError::FileNotFound(e.to_string()))?
            .len();
        if size as usize > self.config.max_bytes {
            return Err(MediaError::TooLarge {
                limit: self.config.max_bytes,
            });
        }
        let bytes = tokio::fs::read(&resolved)
            .await
            .map_err(|e| MediaError::FileNotFound(e.to_string()))?;
        Ok(Fetched {
            bytes,
            declared_type: None,
        })
    }
}

fn check_domain(url: &reqwest::Url, allowed: &[String]) -> Result<(), MediaError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let ok = allowed.iter().any(|d| host == *d || host.ends_with(&format!(".{d}")));
    if ok {
        Ok(())
    } else {
        Err(MediaError::DomainNotAllowed(host))
    }
}

/// A reqwest error as the client's problem: a refused redirect or address, a timeout, or a
/// failure.
fn fetch_error(err: reqwest::Error) -> MediaError {
    let mut source: Option<&dyn std::error::Error> = Some(&err);
    while let Some(e) = source {
        if let Some(Refused(inner)) = e.downcast_ref::<Refused>() {
            return inner.clone();
        }
        source = e.source();
    }
    if err.is_timeout() {
        return MediaError::Timeout;
    }
    // The URL is the client's own; the causes (connection refused, DNS) are the news.
    let err = err.without_url();
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        message = format!("{message}: {e}");
        source = e.source();
    }
    MediaError::FetchFailed(message)
}

/// A base64 `data:` URI's bytes and declared type, refused past `max_bytes` before decoding.
pub fn decode_data_uri(url: &str, max_bytes: usize) -> Result<Fetched, MediaError> {
    let rest = url.get("data:".len()..).unwrap_or_default();
    let (header, payload) = rest
        .split_once(',')
        .ok_or_else(|| MediaError::MalformedDataUri("no ',' before the payload".into()))?;
    let declared = header
        .strip_suffix(";base64")
        .ok_or_else(|| MediaError::MalformedDataUri("only base64 payloads are supported".into()))?;
    // Decoded data is 3/4 of its base64: refuse oversized payloads before decoding them.
    let decoded_len = payload.len() / 4 * 3;
    if decoded_len > max_bytes {
        return Err(MediaError::TooLarge { limit: max_bytes });
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| MediaError::Base64(e.to_string()))?;
    let declared_type = Some(declared.to_string()).filter(|t| !t.is_empty());
    Ok(Fetched { bytes, declared_type })
}

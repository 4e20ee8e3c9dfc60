//! The registry HTTP API surface: request routes, media types and the OCI error body.
//!
//! Paths are parsed from the raw (still percent-encoded) request path. Names and references
//! are validated by their grammars, which admit no `%`, so an encoded traversal such as
//! `%2e%2e` is rejected rather than decoded.

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError};
use crate::reference::{ManifestRef, ReferenceError, RepoName};

/// Docker schema 2 image manifest.
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media types a puller can ask for, most specific first; sent upstream when a client gave no
/// `Accept` header.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST_V2,
];
/// Header every registry response carries.
pub const API_VERSION_HEADER: &str = "Docker-Distribution-Api-Version";
pub const API_VERSION: &str = "registry/2.0";
pub const CONTENT_DIGEST_HEADER: &str = "Docker-Content-Digest";

/// Whether `media_type` (without parameters) is one of the manifest types Shoal understands.
pub fn is_manifest_media_type(media_type: &str) -> bool {
    let base = media_type.split(';').next().unwrap_or("").trim();
    MANIFEST_MEDIA_TYPES
        .iter()
        .any(|m| m.eq_ignore_ascii_case(base))
}

/// A request path of the pull side of the distribution API, or of an endpoint a pull mirror
/// must refuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: API version check.
    Base,
    /// `/v2/<name>/manifests/<reference>`
    Manifest {
        name: RepoName,
        reference: ManifestRef,
    },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: RepoName, digest: Digest },
    /// `/v2/<name>/blobs/uploads/...`: the push side.
    BlobUpload { name: RepoName },
    /// `/v2/<name>/tags/list`
    TagsList { name: RepoName },
    /// `/v2/_catalog`
    Catalog,
}

/// Why a path is not a route, already classified into the OCI error it deserves.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("not a registry API path")]
    NotFound,
    #[error("invalid repository name: {0}")]
    Name(ReferenceError),
    #[error("invalid manifest reference: {0}")]
    Reference(ReferenceError),
    #[error("invalid digest: {0}")]
    Digest(DigestError),
}

impl RouteError {
    /// The OCI error code a registry answers this with.
    pub fn code(&self) -> ErrorCode {
        match self {
            RouteError::NotFound => ErrorCode::NotFound,
            RouteError::Name(_) => ErrorCode::NameInvalid,
            RouteError::Reference(ReferenceError::Digest(_)) | RouteError::Digest(_) => {
                ErrorCode::DigestInvalid
            }
            RouteError::Reference(_) => ErrorCode::ManifestInvalid,
        }
    }
}

impl Route {
    /// Parses a raw request path (without query).
    pub fn parse(path: &str) -> Result<Route, RouteError> {
        let Some(rest) = path.strip_prefix("/v2/") else {
            return if path == "/v2" {
                Ok(Route::Base)
            } else {
                Err(RouteError::NotFound)
            };
        };
        if rest.is_empty() {
            return Ok(Route::Base);
        }
        if rest == "_catalog" {
            return Ok(Route::Catalog);
        }
        // The name may contain '/', so the verb is found from the right. Names cannot contain
        // "/manifests/" as a component pair that also ends the path in a valid reference
        // ambiguously: the rightmost match is the one the spec means.
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Ok(Route::TagsList {
                name: RepoName::parse(name).map_err(RouteError::Name)?,
            });
        }
        if let Some(idx) = rest.rfind("/blobs/uploads") {
            let tail = &rest[idx + "/blobs/uploads".len()..];
            if tail.is_empty() || tail.starts_with('/') {
                return Ok(Route::BlobUpload {
                    name: RepoName::parse(&rest[..idx]).map_err(RouteError::Name)?,
                });
            }
        }
        if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
            let name = RepoName::parse(name).map_err(RouteError::Name)?;
            let digest = Digest::parse(digest).map_err(RouteError::Digest)?;
            return Ok(Route::Blob { name, digest });
        }
        if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
            let name = RepoName::parse(name).map_err(RouteError::Name)?;
            let reference = ManifestRef::parse(reference).map_err(RouteError::Reference)?;
            return Ok(Route::Manifest { name, reference });
        }
        Err(RouteError::NotFound)
    }
}

/// Error codes of the OCI distribution spec, plus the few Distribution adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    #[serde(rename = "TOOMANYREQUESTS")]
    TooManyRequests,
    /// Distribution's code for 503.
    Unavailable,
    /// Unsatisfiable or malformed `Range` (no spec code exists; Distribution answers 416).
    RangeInvalid,
    /// A path that is not part of the API.
    NotFound,
    /// A header or query parameter that is malformed.
    BadRequest,
    /// The upstream registry failed or could not be reached.
    UpstreamError,
    /// Something went wrong inside Shoal.
    Internal,
}

impl ErrorCode {
    /// The HTTP status a registry answers with for this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown
            | ErrorCode::NotFound => 404,
            ErrorCode::BlobUploadInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid
            | ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied => 403,
            ErrorCode::Unsupported => 405,
            ErrorCode::RangeInvalid => 416,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Internal => 500,
            ErrorCode::UpstreamError => 502,
            ErrorCode::Unavailable => 503,
        }
    }
}

/// One entry of an OCI error body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// The JSON body of every registry error response: `{"errors":[{code,message,detail}]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub errors: Vec<ErrorInfo>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            errors: vec![ErrorInfo {
                code,
                message: message.into(),
                detail: None,
            }],
        }
    }

    pub fn to_json(&self) -> String {
        // Serialising plain strings and enums into JSON cannot fail.
        serde_json::to_string(self).expect("error body serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "ab".repeat(32))
    }

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/v2/"), Ok(Route::Base));
        assert_eq!(Route::parse("/v2"), Ok(Route::Base));
        assert_eq!(Route::parse("/v2/_catalog"), Ok(Route::Catalog));
        match Route::parse("/v2/library/ubuntu/manifests/latest").unwrap() {
            Route::Manifest { name, reference } => {
                assert_eq!(name.as_str(), "library/ubuntu");
                assert_eq!(reference.to_string(), "latest");
            }
            r => panic!("{r:?}"),
        }
        match Route::parse(&format!("/v2/a/b/blobs/{}", d())).unwrap() {
            Route::Blob { name, digest } => {
                assert_eq!(name.as_str(), "a/b");
                assert_eq!(digest.to_string(), d());
            }
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            Route::parse("/v2/a/blobs/uploads/"),
            Ok(Route::BlobUpload { .. })
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/uploads/0f3a-uuid"),
            Ok(Route::BlobUpload { .. })
        ));
        assert!(matches!(
            Route::parse("/v2/a/tags/list"),
            Ok(Route::TagsList { .. })
        ));
        // A repository literally named "blobs" still works.
        assert!(matches!(
            Route::parse(&format!("/v2/x/blobs/blobs/{}", d())),
            Ok(Route::Blob { .. })
        ));
        // ...and one named "manifests".
        assert!(matches!(
            Route::parse("/v2/manifests/manifests/v1"),
            Ok(Route::Manifest { .. })
        ));
    }

    #[test]
    fn hostile_paths_are_classified() {
        let cases = [
            ("/", ErrorCode::NotFound),
            ("/etc/passwd", ErrorCode::NotFound),
            ("/v2/../../etc/passwd", ErrorCode::NotFound),
            ("/v2/../x/manifests/latest", ErrorCode::NameInvalid),
            ("/v2/%2e%2e/x/manifests/latest", ErrorCode::NameInvalid),
            ("/v2/a/manifests/..", ErrorCode::ManifestInvalid),
            ("/v2/a/manifests/%2e%2e", ErrorCode::ManifestInvalid),
            ("/v2/a/manifests/sha256:XYZ", ErrorCode::DigestInvalid),
            ("/v2/a/blobs/sha256:../../x", ErrorCode::DigestInvalid),
            (
                "/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
                ErrorCode::DigestInvalid,
            ),
            ("/v2/a\\b/manifests/v1", ErrorCode::NameInvalid),
            ("/v2/a\0/manifests/v1", ErrorCode::NameInvalid),
            ("/v2/a/unknown/x", ErrorCode::NotFound),
        ];
        for (path, code) in cases {
            let err = Route::parse(path).expect_err(path);
            assert_eq!(err.code(), code, "{path}: {err}");
        }
    }

    #[test]
    fn error_body_json() {
        let body = ErrorBody::new(ErrorCode::TooManyRequests, "slow down").to_json();
        assert_eq!(
            body,
            r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#
        );
        let body = ErrorBody::new(ErrorCode::BlobUnknown, "x").to_json();
        assert!(body.contains("\"BLOB_UNKNOWN\""));
        let parsed: ErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed.errors[0].code, ErrorCode::BlobUnknown);
    }

    #[test]
    fn manifest_media_types() {
        assert!(is_manifest_media_type(OCI_INDEX));
        assert!(is_manifest_media_type(
            "application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"
        ));
        assert!(!is_manifest_media_type("application/json"));
    }
}

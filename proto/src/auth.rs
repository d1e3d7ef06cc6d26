//! Shared-secret authentication of every Parasync endpoint: a parameter-server shard's gRPC
//! service and data plane, and a collective job's rendezvous and peer connections.
//!
//! A server started with a token (`--auth-token-file PATH`, or `PARASYNC_AUTH_TOKEN`)
//! refuses every call and connection that does not present the same token. gRPC calls
//! carry it as `authorization: Bearer <token>` metadata; the TCP planes in their greeting.
//! Comparisons take the same time wherever the presented token first differs. The token
//! travels as it is: on a network others can read, use TLS as well.
//!
//! Health checks stay open (a load balancer's probe knows no token).

use std::fmt;
use std::sync::Arc;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Request, Status};

/// Environment variable holding the token itself.
pub const ENV_TOKEN: &str = "PARASYNC_AUTH_TOKEN";
/// Environment variable naming a file that holds the token (when [`ENV_TOKEN`] is unset).
pub const ENV_TOKEN_FILE: &str = "PARASYNC_AUTH_TOKEN_FILE";
/// The gRPC metadata key a token travels in.
pub const METADATA_KEY: &str = "authorization";
/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// A shared secret: 1 to [`MAX_TOKEN_BYTES`] printable ASCII characters without spaces
/// (it travels in an HTTP/2 header). Its `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(Arc<str>);

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthToken(<{} bytes>)", self.0.len())
    }
}

impl AuthToken {
    /// Checks `token` (surrounding whitespace, such as a file's final newline, is dropped).
    pub fn new(token: &str) -> Result<AuthToken, String> {
        let t = token.trim();
        if t.is_empty() {
            return Err("the auth token is empty".into());
        }
        if t.len() > MAX_TOKEN_BYTES {
            return Err(format!("the auth token has {} bytes; at most {MAX_TOKEN_BYTES} are allowed", t.len()));
        }
        if let Some(c) = t.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(format!(
                "the auth token must be printable ASCII without spaces (found {c:?}); a random hex or base64 string works"
            ));
        }
        Ok(AuthToken(t.into()))
    }

    /// Reads the token from `path`.
    pub fn from_file(path: &std::path::Path) -> Result<AuthToken, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading the auth token file {}: {e}", path.display()))?;
        AuthToken::new(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The token the environment gives: [`ENV_TOKEN`], else the file [`ENV_TOKEN_FILE`]
    /// names; `None` when neither is set (or both are empty).
    pub fn from_env() -> Result<Option<AuthToken>, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`AuthToken::from_env`] over any variable lookup.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<AuthToken>, String> {
        if let Some(t) = get(ENV_TOKEN).filter(|t| !t.trim().is_empty()) {
            return AuthToken::new(&t).map(Some).map_err(|e| format!("{ENV_TOKEN}: {e}"));
        }
        match get(ENV_TOKEN_FILE).filter(|p| !p.is_empty()) {
            Some(p) => AuthToken::from_file(std::path::Path::new(&p)).map(Some),
            None => Ok(None),
        }
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in a time that depends only on the lengths.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), presented)
    }

    /// Checks a gRPC request's `authorization` metadata.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(value) = metadata.get(METADATA_KEY) else {
            return Err(Status::unauthenticated(
                "this server requires an auth token and the call presented none (set PARASYNC_AUTH_TOKEN, or the client's auth_token option)",
            ));
        };
        let presented = value.as_bytes();
        let presented = presented.strip_prefix(b"Bearer ").unwrap_or(presented);
        if self.matches(presented) {
            Ok(())
        } else {
            Err(Status::unauthenticated("wrong auth token"))
        }
    }

    /// The `authorization` metadata value presenting this token.
    pub fn bearer(&self) -> AsciiMetadataValue {
        format!("Bearer {}", self.0).parse().expect("a token is printable ASCII")
    }
}

/// Byte-string equality whose running time does not depend on where the strings differ.
pub fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = (expected.len() != presented.len()) as u8;
    if expected.is_empty() {
        return presented.is_empty();
    }
    // Walks the presented bytes whatever their length, against the expected ones repeated.
    for (i, &b) in presented.iter().enumerate() {
        diff |= b ^ expected[i % expected.len()];
    }
    std::hint::black_box(diff) == 0
}

/// Server side: refuses calls without the token (`unauthenticated`); lets everything
/// through when the server has none.
#[derive(Clone, Debug, Default)]
pub struct RequireToken(pub Option<AuthToken>);

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match &self.0 {
            Some(t) => t.check(request.metadata()).map(|()| request),
            None => Ok(request),
        }
    }
}

/// Client side: adds the token to every call (nothing when there is none).
#[derive(Clone, Debug, Default)]
pub struct PresentToken(pub Option<AuthToken>);

impl tonic::service::Interceptor for PresentToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            request.metadata_mut().insert(METADATA_KEY, t.bearer());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn tokens_are_checked_and_trimmed() {
        assert_eq!(AuthToken::new("  s3cret\n").unwrap().expose(), "s3cret");
        assert!(AuthToken::new("\n").unwrap_err().contains("empty"));
        assert!(AuthToken::new("two words").unwrap_err().contains("printable ASCII"));
        assert!(AuthToken::new("naïve").unwrap_err().contains("printable ASCII"));
        assert!(AuthToken::new(&"x".repeat(MAX_TOKEN_BYTES + 1)).unwrap_err().contains("at most"));
        assert!(!format!("{:?}", AuthToken::new("s3cret").unwrap()).contains("s3cret"));
    }

    #[test]
    fn comparison_needs_the_whole_token() {
        let t = AuthToken::new("abcdef").unwrap();
        assert!(t.matches(b"abcdef"));
        for wrong in [&b""[..], b"abcde", b"abcdefabcdef", b"abcdeg", b"Abcdef", b"abcdef\0"] {
            assert!(!t.matches(wrong), "{wrong:?}");
        }
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn env_prefers_the_token_then_the_file() {
        let dir = std::env::temp_dir().join(format!("parasync-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let f = file.to_str().unwrap().to_string();
        let lookup = |tok: Option<&str>, path: Option<&str>| {
            let (tok, path) = (tok.map(String::from), path.map(String::from));
            AuthToken::from_lookup(move |k| if k == ENV_TOKEN { tok.clone() } else { path.clone() })
        };
        assert_eq!(lookup(Some("direct"), Some(&f)).unwrap().unwrap().expose(), "direct");
        assert_eq!(lookup(None, Some(&f)).unwrap().unwrap().expose(), "from-file");
        assert_eq!(lookup(Some(""), None).unwrap(), None);
        assert!(lookup(None, Some("/nonexistent/token")).unwrap_err().contains("/nonexistent/token"));
        assert!(lookup(Some("a b"), None).unwrap_err().contains(ENV_TOKEN));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn interceptors_present_and_require_the_token() {
        let t = AuthToken::new("s3cret").unwrap();
        let sent = PresentToken(Some(t.clone())).call(Request::new(())).unwrap();
        assert_eq!(sent.metadata().get(METADATA_KEY).unwrap(), "Bearer s3cret");
        assert!(RequireToken(Some(t.clone())).call(sent).is_ok());
        let bare = RequireToken(Some(t.clone())).call(Request::new(())).unwrap_err();
        assert_eq!(bare.code(), tonic::Code::Unauthenticated);
        assert!(bare.message().contains("presented none"));
        let wrong = PresentToken(Some(AuthToken::new("guess").unwrap())).call(Request::new(())).unwrap();
        let e = RequireToken(Some(t)).call(wrong).unwrap_err();
        assert_eq!((e.code(), e.message()), (tonic::Code::Unauthenticated, "wrong auth token"));
        assert!(RequireToken(None).call(Request::new(())).is_ok());
    }
}

//! Strict parsing of `WWW-Authenticate` challenges (RFC 9110 §11.6.1) and the choice of the
//! one the client answers.
//!
//! Grammar:
//! ```text
//! WWW-Authenticate = 1#challenge
//! challenge        = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
//! auth-param       = token BWS "=" BWS ( token / quoted-string )
//! ```
//! One header value may hold several challenges separated by commas, and a response may carry
//! several header lines. Anything outside the grammar (unterminated quotes, control bytes,
//! bare words, a parameter given twice) rejects the whole value: a registry that sends a
//! broken challenge gets no credentials. Input is bounded before it is looked at.

use reqwest::Url;

/// Longest header value accepted; real challenges are a few hundred bytes.
pub const MAX_HEADER_LEN: usize = 8 * 1024;
/// Most challenges accepted in one response (all header lines together).
pub const MAX_CHALLENGES: usize = 16;
/// Most parameters accepted in one challenge.
pub const MAX_PARAMS: usize = 16;

/// One parsed challenge. Scheme and parameter names are lower-cased (both are
/// case-insensitive); values are unescaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub token68: Option<String>,
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a `WWW-Authenticate` value was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    #[error("WWW-Authenticate is longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
    #[error("WWW-Authenticate holds no challenge")]
    Empty,
    #[error("WWW-Authenticate holds more than {MAX_CHALLENGES} challenges")]
    TooManyChallenges,
    #[error("a challenge has more than {MAX_PARAMS} parameters")]
    TooManyParams,
    #[error("WWW-Authenticate is malformed at byte {at}: {what}")]
    Syntax { at: usize, what: &'static str },
    #[error("parameter {0:?} appears twice in one challenge")]
    DuplicateParam(String),
    #[error("{scheme} challenge has no realm")]
    MissingRealm { scheme: &'static str },
    #[error("token realm is not a valid absolute URL")]
    RealmNotUrl,
    #[error(
        "token realm must be https, or plain http on the registry's own host when the registry itself is plain http"
    )]
    RealmNotAllowed,
}

/// Parses one `WWW-Authenticate` header value into its challenges.
pub fn parse(value: &[u8]) -> Result<Vec<Challenge>, ChallengeError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(ChallengeError::TooLong);
    }
    let mut p = Parser { s: value, i: 0 };
    let mut out = Vec::new();
    loop {
        p.skip_list_separators();
        if p.eof() {
            break;
        }
        if out.len() == MAX_CHALLENGES {
            return Err(ChallengeError::TooManyChallenges);
        }
        out.push(p.challenge()?);
        // A challenge ends at the end of input or at a comma; anything else is garbage.
        p.skip_ows();
        if !p.eof() && p.peek() != Some(b',') {
            return Err(p.err("expected ',' or end after a challenge"));
        }
    }
    if out.is_empty() {
        return Err(ChallengeError::Empty);
    }
    Ok(out)
}

/// Parses every `WWW-Authenticate` line of a response. One bad line rejects them all.
pub fn parse_all<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<Challenge>, ChallengeError> {
    let mut out = Vec::new();
    let mut total = 0usize;
    for v in values {
        total += v.len();
        if total > MAX_HEADER_LEN {
            return Err(ChallengeError::TooLong);
        }
        out.extend(parse(v)?);
        if out.len() > MAX_CHALLENGES {
            return Err(ChallengeError::TooManyChallenges);
        }
    }
    if out.is_empty() {
        return Err(ChallengeError::Empty);
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token68_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)
}

impl Parser<'_> {
    fn eof(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn err(&self, what: &'static str) -> ChallengeError {
        ChallengeError::Syntax { at: self.i, what }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    /// `#rule` lists allow empty elements: `a, , b`.
    fn skip_list_separators(&mut self) {
        self.skip_ows();
        while self.peek() == Some(b',') {
            self.i += 1;
            self.skip_ows();
        }
    }

    fn token(&mut self) -> Option<String> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        // tchar is ASCII, so the lossy conversion never replaces anything.
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn challenge(&mut self) -> Result<Challenge, ChallengeError> {
        let scheme = self
            .token()
            .ok_or(ChallengeError::Syntax {
                at: self.i,
                what: "expected an auth scheme",
            })?
            .to_ascii_lowercase();
        let mut ch = Challenge {
            scheme,
            token68: None,
            params: Vec::new(),
        };
        match self.peek() {
            None | Some(b',') => return Ok(ch),
            Some(b' ') => {}
            Some(_) => return Err(self.err("expected a space after the auth scheme")),
        }
        self.skip_ows();
        if self.eof() || self.peek() == Some(b',') {
            return Ok(ch);
        }
        if let Some(t) = self.try_token68() {
            ch.token68 = Some(t);
            return Ok(ch);
        }
        loop {
            let (name, value) = self.param()?;
            if ch.params.iter().any(|(n, _)| *n == name) {
                return Err(ChallengeError::DuplicateParam(name));
            }
            if ch.params.len() == MAX_PARAMS {
                return Err(ChallengeError::TooManyParams);
            }
            ch.params.push((name, value));
            self.skip_ows();
            if self.eof() {
                return Ok(ch);
            }
            if self.peek() != Some(b',') {
                return Err(self.err("expected ',' between parameters"));
            }
            // After the comma(s) comes either another parameter of this challenge or the
            // scheme of the next one; only a parameter has `token BWS "="`.
            let save = self.i;
            self.skip_list_separators();
            if self.eof() || !self.at_param() {
                self.i = save;
                return Ok(ch);
            }
        }
    }

    /// Whether the input at the cursor starts `token BWS "="`.
    fn at_param(&self) -> bool {
        let mut j = self.i;
        let start = j;
        while self.s.get(j).copied().is_some_and(is_tchar) {
            j += 1;
        }
        if j == start {
            return false;
        }
        while matches!(self.s.get(j), Some(b' ' | b'\t')) {
            j += 1;
        }
        self.s.get(j) == Some(&b'=')
    }

    /// `token68` is only recognised when it is all that follows the scheme: `1*tchar68 *"="`
    /// then the end of the challenge. `a=b` is a parameter, `abc==` a token68.
    fn try_token68(&mut self) -> Option<String> {
        let start = self.i;
        let mut j = start;
        while self.s.get(j).copied().is_some_and(is_token68_char) {
            j += 1;
        }
        if j == start {
            return None;
        }
        while self.s.get(j) == Some(&b'=') {
            j += 1;
        }
        let end = j;
        while matches!(self.s.get(j), Some(b' ' | b'\t')) {
            j += 1;
        }
        if j < self.s.len() && self.s[j] != b',' {
            return None;
        }
        self.i = end;
        Some(String::from_utf8_lossy(&self.s[start..end]).into_owned())
    }

    fn param(&mut self) -> Result<(String, String), ChallengeError> {
        let at = self.i;
        let name = self
            .token()
            .ok_or(ChallengeError::Syntax {
                at,
                what: "expected a parameter name",
            })?
            .to_ascii_lowercase();
        self.skip_ows();
        if self.peek() != Some(b'=') {
            return Err(self.err("expected '=' after a parameter name"));
        }
        self.i += 1;
        self.skip_ows();
        let value = if self.peek() == Some(b'"') {
            self.quoted()?
        } else {
            let at = self.i;
            self.token().ok_or(ChallengeError::Syntax {
                at,
                what: "expected a parameter value",
            })?
        };
        Ok((name, value))
    }

    /// `DQUOTE *( qdtext / quoted-pair ) DQUOTE`. Control bytes and non-ASCII are refused;
    /// every parameter a registry sends (realm URL, service, scope) is ASCII.
    fn quoted(&mut self) -> Result<String, ChallengeError> {
        debug_assert_eq!(self.peek(), Some(b'"'));
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(b) = self.peek() else {
                return Err(self.err("unterminated quoted string"));
            };
            match b {
                b'"' => {
                    self.i += 1;
                    // Only ASCII was pushed, so this cannot fail.
                    return String::from_utf8(out).map_err(|_| self.err("non-ASCII value"));
                }
                b'\\' => {
                    self.i += 1;
                    match self.peek() {
                        Some(c @ (b'\t' | b' ' | 0x21..=0x7e)) => {
                            out.push(c);
                            self.i += 1;
                        }
                        None => return Err(self.err("unterminated quoted string")),
                        Some(_) => return Err(self.err("invalid byte after backslash")),
                    }
                }
                b'\t' | b' ' | 0x21..=0x7e => {
                    out.push(b);
                    self.i += 1;
                }
                _ => return Err(self.err("control or non-ASCII byte in quoted string")),
            }
        }
    }
}

/// The challenge the client answers, already checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthChallenge {
    /// Send the configured username and password to the registry itself.
    Basic,
    /// Get a token from `realm` (with the configured credentials, if any) and send it.
    Bearer {
        realm: Url,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Picks the challenge to answer: Bearer over Basic, unknown schemes ignored. `Ok(None)`
/// means no supported scheme was offered. A Bearer challenge without a realm, or with a
/// realm that is not allowed for `registry`, is an error even if Basic is also offered:
/// a registry sending that is misconfigured or hostile.
pub fn select(
    challenges: &[Challenge],
    registry: &Url,
) -> Result<Option<AuthChallenge>, ChallengeError> {
    let mut basic = false;
    for ch in challenges {
        match ch.scheme.as_str() {
            "bearer" => {
                let realm = ch
                    .param("realm")
                    .ok_or(ChallengeError::MissingRealm { scheme: "Bearer" })?;
                return Ok(Some(AuthChallenge::Bearer {
                    realm: check_realm(realm, registry)?,
                    service: ch.param("service").map(str::to_owned),
                    scope: ch.param("scope").map(str::to_owned),
                }));
            }
            // RFC 7617 requires a realm on Basic, but the client never uses it: Basic
            // credentials only ever go to the registry that asked. A realm-less Basic
            // challenge is accepted.
            "basic" => basic = true,
            _ => {}
        }
    }
    Ok(basic.then_some(AuthChallenge::Basic))
}

/// Credentials are sent to the token realm, so it must be https; plain http is accepted only
/// on the registry's own host name, and only when the registry itself is plain http (an
/// `insecure` test or lab setup). No user info in the URL, no fragment.
pub fn check_realm(realm: &str, registry: &Url) -> Result<Url, ChallengeError> {
    let mut url = Url::parse(realm).map_err(|_| ChallengeError::RealmNotUrl)?;
    if url.cannot_be_a_base() || url.host_str().is_none_or(str::is_empty) {
        return Err(ChallengeError::RealmNotUrl);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ChallengeError::RealmNotAllowed);
    }
    let ok = match url.scheme() {
        "https" => true,
        "http" => registry.scheme() == "http" && url.host_str() == registry.host_str(),
        _ => false,
    };
    if !ok {
        return Err(ChallengeError::RealmNotAllowed);
    }
    url.set_fragment(None);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Challenge {
        let mut v = parse(s.as_bytes()).unwrap();
        assert_eq!(v.len(), 1, "{s}: {v:?}");
        v.remove(0)
    }

    fn https_registry() -> Url {
        Url::parse("https://registry.example:5000").unwrap()
    }

    #[test]
    fn docker_hub_bearer() {
        let c = one(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#,
        );
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(c.param("scope"), Some("repository:library/ubuntu:pull"));
        match select(&[c], &https_registry()).unwrap() {
            Some(AuthChallenge::Bearer { realm, .. }) => {
                assert_eq!(realm.as_str(), "https://auth.docker.io/token")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn basic_realm_and_case_and_whitespace() {
        let c = one(r#"  BASIC   Realm = "Registry Realm" "#);
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.param("realm"), Some("Registry Realm"));
        assert_eq!(
            select(&[c], &https_registry()).unwrap(),
            Some(AuthChallenge::Basic)
        );
        // Unquoted token values are allowed too.
        assert_eq!(one("Basic realm=x").param("realm"), Some("x"));
        // A bare scheme.
        assert!(one("Basic").params.is_empty());
    }

    #[test]
    fn quoted_string_escapes() {
        let c = one(r#"Bearer realm="https://a/t",service="a\"b\\c\d""#);
        assert_eq!(c.param("service"), Some(r#"a"b\cd"#));
        // Comma and '=' inside quotes are data, not separators.
        let c = one(r#"Bearer realm="https://a/t",scope="repository:x:pull,push a=b""#);
        assert_eq!(c.param("scope"), Some("repository:x:pull,push a=b"));
    }

    #[test]
    fn several_challenges_in_one_value_and_across_lines() {
        let v =
            parse(br#"Negotiate abc+/==, Basic realm="r", Bearer realm="https://t/x",service="s""#)
                .unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].scheme, "negotiate");
        assert_eq!(v[0].token68.as_deref(), Some("abc+/=="));
        assert_eq!(v[1].param("realm"), Some("r"));
        assert_eq!(v[2].param("service"), Some("s"));
        // Bearer is preferred over Basic wherever it appears.
        assert!(matches!(
            select(&v, &https_registry()).unwrap(),
            Some(AuthChallenge::Bearer { .. })
        ));

        let lines: [&[u8]; 2] = [b"Basic realm=\"r\"", b"Foo, ,Bar x=1"];
        let v = parse_all(lines).unwrap();
        assert_eq!(
            v.iter().map(|c| c.scheme.as_str()).collect::<Vec<_>>(),
            ["basic", "foo", "bar"]
        );
        // Only unknown schemes: nothing to answer, but not an error.
        assert_eq!(select(&v[1..], &https_registry()).unwrap(), None);
    }

    #[test]
    fn hostile_inputs_are_rejected() {
        let cases: &[&[u8]] = &[
            b"",
            b"   ,  ,",
            br#"Bearer realm="https://a/t"#,    // unterminated quote
            br#"Bearer realm="https://a/t\"#,   // unterminated after escape
            br#"Bearer realm="a" service="b""#, // missing comma
            br#"Bearer realm"#,                 // bare word after scheme is token68...
            br#"Bearer realm="a",realm="b""#,   // duplicate
            br#"Bearer realm="a",REALM="b""#,   // duplicate, case-insensitively
            br#"Bearer realm=,service="x""#,    // missing value
            br#"Bearer realm="a",="b""#,        // missing name
            b"Bearer realm=\"a\x01b\"",         // control byte
            b"Bearer realm=\"caf\xc3\xa9\"",    // non-ASCII
            b"Bearer\trealm=\"a\"",             // scheme must be followed by SP
            br#"Bearer realm="a" garbage"#,
            br#""quoted scheme""#,
            b"Bearer realm=\"a\"\r\nX-Injected: 1",
        ];
        for c in cases {
            // "Bearer realm" parses (realm as token68) but has no realm parameter.
            let res = parse(c).and_then(|v| select(&v, &https_registry()));
            assert!(
                res.is_err(),
                "{:?} gave {res:?}",
                String::from_utf8_lossy(c)
            );
        }
        assert_eq!(
            parse(br#"Bearer realm="a",realm="b""#),
            Err(ChallengeError::DuplicateParam("realm".into()))
        );
    }

    #[test]
    fn huge_and_numerous_inputs_are_bounded() {
        let huge = format!(r#"Bearer realm="https://a/{}""#, "x".repeat(MAX_HEADER_LEN));
        assert_eq!(parse(huge.as_bytes()), Err(ChallengeError::TooLong));
        let many = vec!["Basic"; MAX_CHALLENGES + 1].join(", ");
        assert_eq!(
            parse(many.as_bytes()),
            Err(ChallengeError::TooManyChallenges)
        );
        let params: Vec<String> = (0..=MAX_PARAMS).map(|i| format!("p{i}=v")).collect();
        let s = format!("Bearer {}", params.join(","));
        assert_eq!(parse(s.as_bytes()), Err(ChallengeError::TooManyParams));
        let lines = vec![&b"Basic realm=\"r\""[..]; MAX_CHALLENGES + 1];
        assert_eq!(parse_all(lines), Err(ChallengeError::TooManyChallenges));
        // Deep runs of separators are linear, not a problem.
        let commas = format!("Basic{}", ",".repeat(MAX_HEADER_LEN - 10));
        assert!(parse(commas.as_bytes()).is_ok());
    }

    #[test]
    fn missing_realm_is_rejected() {
        let v = parse(br#"Bearer service="s",scope="x""#).unwrap();
        assert_eq!(
            select(&v, &https_registry()),
            Err(ChallengeError::MissingRealm { scheme: "Bearer" })
        );
        // Even when Basic is offered as well.
        let v = parse(br#"Basic realm="r", Bearer service="s""#).unwrap();
        assert!(select(&v, &https_registry()).is_err());
    }

    #[test]
    fn realm_rules() {
        let https = https_registry();
        let http = Url::parse("http://127.0.0.1:5000").unwrap();
        // https realms anywhere (Docker Hub's token server is on another host).
        assert!(check_realm("https://auth.docker.io/token", &https).is_ok());
        assert!(check_realm("https://auth.docker.io/token", &http).is_ok());
        // Plain http to another host: the credentials would travel in clear to a stranger.
        assert_eq!(
            check_realm("http://evil.example/token", &https),
            Err(ChallengeError::RealmNotAllowed)
        );
        assert_eq!(
            check_realm("http://evil.example/token", &http),
            Err(ChallengeError::RealmNotAllowed)
        );
        // Plain http on the same host: only when the registry is itself plain http.
        assert!(check_realm("http://127.0.0.1:6000/token", &http).is_ok());
        assert_eq!(
            check_realm("http://registry.example:5000/token", &https),
            Err(ChallengeError::RealmNotAllowed)
        );
        for bad in [
            "/token",
            "token",
            "ftp://a/t",
            "file:///etc/passwd",
            "https://user:pw@auth.example/t",
            "javascript:alert(1)",
            "https://",
        ] {
            assert!(check_realm(bad, &https).is_err(), "{bad}");
        }
        // A realm with its own query keeps it; the fragment is dropped.
        let u = check_realm("https://a.example/t?x=1#frag", &https).unwrap();
        assert_eq!(u.as_str(), "https://a.example/t?x=1");

        let v = parse(br#"Bearer realm="http://evil.example/token",service="s""#).unwrap();
        assert_eq!(select(&v, &https), Err(ChallengeError::RealmNotAllowed));
    }
}

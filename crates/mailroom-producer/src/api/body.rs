//! A request's JSON body: its type, its size and its share of
//! `api.max_inflight_bytes`, read only once the caller is known.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use futures_util::StreamExt as _;
use mailroom_core::budget::{FairBudget, FairShare};
use mailroom_core::settings::ApiSettings;

use super::auth::one_header;
use super::problem::Problem;

/// What a body of no declared length first takes of
/// `api.max_inflight_bytes`; one that grows past it takes the rest of
/// `api.body_limit_bytes` then.
const FIRST_SHARE: usize = 64 * 1024;

/// The body's length as its `Content-Length` declares it (none when
/// chunked).
fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .map(|length| usize::try_from(length).unwrap_or(usize::MAX))
}

/// Whether `content_type` is `application/json` or a `+json` type.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// Whether `content_type` names no charset or UTF-8: JSON between systems
/// is UTF-8 (RFC 8259), and a body labelled otherwise would be read as
/// something its sender did not mean.
fn is_utf8(content_type: &str) -> bool {
    content_type.split(';').skip(1).all(|parameter| {
        let Some((name, value)) = parameter.split_once('=') else {
            return true;
        };
        !name.trim().eq_ignore_ascii_case("charset") || {
            let value = value.trim().trim_matches('"');
            value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")
        }
    })
}

/// The body, if it is JSON and within the limit (refused before a byte is
/// read when its declared length is over).
///
/// Every body first takes its tenant's share of `bodies` into `shares`
/// (its declared length, or [`FIRST_SHARE`] when chunked; the rest of the
/// limit if a chunked one grows past that), so what all connections hold
/// at once is bounded, whatever their sizes, and one tenant holds at most
/// half of it. A client trickling bodies holds up others only while it
/// holds its share, for at most `api.request_timeout`.
pub async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    settings: &ApiSettings,
    (bodies, tenant): (&FairBudget, &str),
    shares: &mut Vec<FairShare>,
) -> Result<Bytes, Problem> {
    // Two types would leave which one a proxy checked to a guess.
    let content_type = one_header(headers, header::CONTENT_TYPE.as_str())
        .ok()
        .flatten()
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if !is_json(content_type) {
        return Err(Problem::unsupported_media_type());
    }
    if !is_utf8(content_type) {
        return Err(Problem::unsupported_charset());
    }
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|value| !value.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return Err(Problem::unsupported_encoding());
    }
    let limit = settings.body_limit_bytes;
    let declared = declared_length(headers);
    if declared.is_some_and(|length| length > limit) {
        return Err(Problem::too_large(limit));
    }
    let mut reserved = declared.unwrap_or(FIRST_SHARE.min(limit));
    shares.push(bodies.reserve(tenant, reserved).await);
    let mut read = Vec::with_capacity(reserved.min(FIRST_SHARE));
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|err| unread(&err))?;
        if read.len() + chunk.len() > limit {
            return Err(Problem::too_large(limit));
        }
        if read.len() + chunk.len() > reserved {
            // Held with the first share: the bytes read are still held.
            shares.push(bodies.reserve(tenant, limit - reserved).await);
            reserved = limit;
        }
        read.extend_from_slice(&chunk);
    }
    // RFC 8259 lets a parser ignore a byte-order mark, and some clients
    // (Windows tools) send one.
    let mut body = Bytes::from(read);
    if body.starts_with(b"\xEF\xBB\xBF") {
        body = body.slice(3..);
    }
    Ok(body)
}

/// Why a body could not be read: the client went away before its end
/// (499, as nginx logs it: nobody reads the answer, but the log and the
/// metrics should not call it the client's bad request), or it sent what
/// HTTP cannot read (400).
fn unread(err: &axum::Error) -> Problem {
    use std::io::ErrorKind;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        // hyper says `IncompleteBody` as an unexpected end of the stream.
        let gone = cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
            )
        }) || cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(|err| err.is_incomplete_message() || err.is_canceled());
        if gone {
            return Problem::client_closed();
        }
        source = cause.source();
    }
    Problem::bad_json("the body could not be read".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_taken_in_utf8_or_with_no_charset_only() {
        for taken in [
            "application/json",
            "Application/JSON; charset=UTF-8",
            "application/json;charset=\"utf8\"",
            "application/problem+json; profile=x",
        ] {
            assert!(is_json(taken) && is_utf8(taken), "{taken}");
        }
        for other in ["text/plain", "application/jsonx", ""] {
            assert!(!is_json(other), "{other}");
        }
        for charset in [
            "application/json; charset=latin1",
            "application/json; foo=bar; CHARSET=utf-16",
        ] {
            assert!(!is_utf8(charset), "{charset}");
        }
    }

    #[test]
    fn a_body_cut_off_by_its_client_is_499_and_a_bad_one_400() {
        use std::io::{Error, ErrorKind};
        // As hyper reports a client gone mid-body: an unexpected end.
        let gone = axum::Error::new(Error::new(ErrorKind::UnexpectedEof, "IncompleteBody"));
        assert_eq!(unread(&gone).status, 499);
        let bad = axum::Error::new(Error::new(ErrorKind::InvalidData, "bad chunk size"));
        assert_eq!(unread(&bad).status, 400);
    }
}

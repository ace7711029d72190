//! Opening a session with the relay the settings name: TCP (TLS from the
//! first byte for `implicit`), the greeting, EHLO, STARTTLS and EHLO again,
//! AUTH, all within `smtp.connect_timeout`.

use std::net::IpAddr;
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
#[allow(deprecated)] // Public and kept in 0.11; see `wire`.
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Auth, Ehlo, Starttls};
use lettre::transport::smtp::extension::{ClientId, Extension, ServerInfo};
use lettre::transport::smtp::response::{Category, Code, Detail, Response, Severity};
use mailroom_core::settings::{SmtpSettings, TlsMode};

use super::reply::Reply;
use super::smtp::{Failure, abort, expect, is_done, out_of_step, setup_error};
use super::wire::Wire;
use super::{SendError, TransportError};

/// Where and how to reach the relay.
pub(super) struct Relay {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: TlsMode,
    tls_parameters: Option<TlsParameters>,
    /// `smtp.allow_plaintext`, or the relay is on this host.
    plaintext_allowed: bool,
    hello: ClientId,
    pub(super) credentials: Option<Credentials>,
    connect_timeout: Duration,
    pub(super) command_timeout: Duration,
    pub(super) data_timeout: Duration,
}

/// A connection and what its relay offers.
pub(super) struct Session {
    pub(super) smtp: Wire,
    /// The relay's EHLO extensions.
    pub(super) info: ServerInfo,
    /// RFC 2920: MAIL, RCPT and DATA go out in one write.
    pub(super) pipelining: bool,
    /// RFC 1870: the relay takes `SIZE=`, and its limit (0: none stated).
    pub(super) size_limit: Option<usize>,
}

impl Relay {
    /// The relay `settings` name, and how to reach it.
    pub(super) fn from_settings(settings: &SmtpSettings) -> Result<Self, TransportError> {
        let (host, port) = host_and_port(settings.url.expose(), settings.tls)?;
        let mut tls = settings.tls;
        if settings.url.expose().starts_with("smtps://") {
            tls = TlsMode::Implicit;
        }
        let plaintext_allowed = settings.allow_plaintext || is_loopback(&host);
        if tls == TlsMode::None && !plaintext_allowed {
            return Err(TransportError::PlaintextRefused { host });
        }
        let tls_parameters = match tls {
            TlsMode::None => None,
            _ => Some(tls_parameters(&host, settings)?),
        };
        let hello = settings
            .hello_name
            .clone()
            .map_or_else(ClientId::default, ClientId::Domain);
        let credentials = settings
            .username
            .as_ref()
            .map(|user| Credentials::new(user.clone(), settings.password.expose().to_owned()));
        Ok(Self {
            host,
            port,
            tls,
            tls_parameters,
            plaintext_allowed,
            hello,
            credentials,
            connect_timeout: settings.connect_timeout,
            command_timeout: settings.command_timeout,
            data_timeout: settings.data_timeout,
        })
    }

    /// Connects, greets, upgrades to TLS and authenticates, within
    /// `smtp.connect_timeout`.
    pub(super) async fn connect(&self) -> Result<Session, SendError> {
        let relay = self;
        tokio::time::timeout(relay.connect_timeout, self.open_session())
            .await
            .unwrap_or_else(|_| {
                Err(SendError::transient(
                    None,
                    &format!(
                        "no SMTP session within smtp.connect_timeout ({:?})",
                        relay.connect_timeout
                    ),
                ))
            })
    }

    /// [`Self::connect`] without its time limit.
    async fn open_session(&self) -> Result<Session, SendError> {
        let relay = self;
        let mut wire = self.open_stream().await?;
        let greeting = wire.read_reply().await.map_err(Failure::Wire);
        expect(greeting, |code| code == 220, "the greeting")
            .map_err(|failure| setup_error("greeting", failure))?;
        let mut session = ehlo(wire, &relay.hello).await?;
        let upgrade = match relay.tls {
            TlsMode::StarttlsRequired => {
                if !session.info.supports_feature(Extension::StartTls) {
                    abort(&mut session.smtp).await;
                    return Err(SendError::transient(
                        None,
                        "the relay does not offer STARTTLS and smtp.tls is starttls-required",
                    ));
                }
                true
            }
            TlsMode::Opportunistic => session.info.supports_feature(Extension::StartTls),
            TlsMode::Implicit | TlsMode::None => false,
        };
        if upgrade && let Some(parameters) = relay.tls_parameters.clone() {
            session = starttls(session, parameters, &relay.hello).await?;
        }
        if let Some(credentials) = &relay.credentials {
            // With `opportunistic`, a relay that does not offer STARTTLS
            // may be an attacker who struck it from the EHLO reply: the
            // password goes in clear only where plaintext is allowed.
            if !session.smtp.is_encrypted() && !relay.plaintext_allowed {
                abort(&mut session.smtp).await;
                return Err(SendError::transient(
                    None,
                    "the relay did not offer STARTTLS: AUTH is not sent in clear to a host \
                     that is not loopback unless smtp.allow_plaintext = true",
                ));
            }
            // A refused login is the operator's to fix, not the message's
            // fault: transient, so nothing is dead-lettered for a wrong
            // password.
            if let Err(failure) = authenticate(&mut session, credentials).await {
                abort(&mut session.smtp).await;
                return Err(setup_error("AUTH", failure));
            }
        }
        Ok(session)
    }

    /// A TCP connection to the relay, TLS from the first byte for
    /// `implicit`.
    async fn open_stream(&self) -> Result<Wire, SendError> {
        let relay = self;
        let failed =
            |err: std::io::Error| SendError::transient(None, &format!("connecting: {err}"));
        let tcp = tokio::net::TcpStream::connect((relay.host.as_str(), relay.port))
            .await
            .map_err(failed)?;
        // The end of DATA is a small write right after the body: with Nagle
        // on, it waits for the relay's delayed ACK (~40 ms a message).
        tcp.set_nodelay(true).map_err(failed)?;
        #[allow(deprecated)]
        let mut wire = Wire::new(AsyncNetworkStream::use_existing_tokio1(Box::new(tcp)));
        if let (TlsMode::Implicit, Some(parameters)) = (relay.tls, relay.tls_parameters.clone()) {
            wire.upgrade(parameters)
                .await
                .map_err(|err| setup_error("connecting", Failure::Wire(err)))?;
        }
        Ok(wire)
    }
}

/// Says EHLO and learns what the relay offers; to a relay that does not
/// know EHLO, HELO, which offers nothing.
async fn ehlo(mut wire: Wire, hello: &ClientId) -> Result<Session, SendError> {
    let mut reply = wire
        .command(Ehlo::new(hello.clone()))
        .await
        .map_err(Failure::Wire);
    // RFC 5321 §4.1.4: a server that does not take EHLO refuses it with
    // 500, 502, 504 or 550, and the client falls back to HELO.
    if let Ok(refused) = &reply
        && matches!(refused.code(), 500 | 502 | 504 | 550)
    {
        reply = wire
            .command(format!("HELO {hello}\r\n"))
            .await
            .map_err(Failure::Wire);
    }
    let learned = expect(reply, is_done, "EHLO").and_then(|reply| {
        let pipelining = reply
            .lines()
            .any(|line| line.trim().eq_ignore_ascii_case("PIPELINING"));
        Ok((server_info(&reply)?, pipelining, size_limit(&reply)))
    });
    match learned {
        Ok((info, pipelining, size_limit)) => Ok(Session {
            smtp: wire,
            info,
            pipelining,
            size_limit,
        }),
        Err(failure) => {
            abort(&mut wire).await;
            Err(setup_error("EHLO", failure))
        }
    }
}

/// STARTTLS, then EHLO again: what the relay offered in clear may have
/// been altered on the way.
async fn starttls(
    mut session: Session,
    parameters: TlsParameters,
    hello: &ClientId,
) -> Result<Session, SendError> {
    let wire = &mut session.smtp;
    let reply = wire.command(Starttls).await.map_err(Failure::Wire);
    let upgraded = match expect(reply, |code| code == 220, "STARTTLS") {
        Ok(_) => wire.upgrade(parameters).await.map_err(Failure::Wire),
        Err(failure) => Err(failure),
    };
    if let Err(failure) = upgraded {
        abort(wire).await;
        return Err(setup_error("STARTTLS", failure));
    }
    ehlo(session.smtp, hello).await
}

/// AUTH PLAIN, or LOGIN with its challenges.
async fn authenticate(session: &mut Session, credentials: &Credentials) -> Result<(), Failure> {
    let mechanism = session
        .info
        .get_auth_mechanism(&[Mechanism::Plain, Mechanism::Login])
        .ok_or(Failure::Unsupported(
            "the relay offers neither AUTH PLAIN nor AUTH LOGIN",
        ))?;
    let auth_error = |err: lettre::transport::smtp::Error| Failure::Auth(err.to_string());
    let first = Auth::new(mechanism, credentials.clone(), None).map_err(auth_error)?;
    let mut reply = session.smtp.command(first).await.map_err(Failure::Wire)?;
    // A bound on the challenges, as lettre's: a relay that keeps asking
    // does not hold the connection for ever.
    for _ in 0..10 {
        if reply.code() != 334 {
            break;
        }
        let challenge = lettre_response(&reply)?;
        let answer = Auth::new_from_response(mechanism, credentials.clone(), &challenge)
            .map_err(auth_error)?;
        reply = session.smtp.command(answer).await.map_err(Failure::Wire)?;
    }
    expect(Ok(reply), |code| code == 235, "AUTH").map(drop)
}

/// What the EHLO `reply` offers. lettre reads the keywords; it wants a
/// name on the first line and a keyword on every other, which a bare
/// `250` or a blank line does not give.
fn server_info(reply: &Reply) -> Result<ServerInfo, Failure> {
    let mut lines: Vec<String> = reply.lines().map(|line| line.trim().to_owned()).collect();
    if let Some(first) = lines.first_mut()
        && first.is_empty()
    {
        "relay".clone_into(first);
    }
    let code = lettre_code(reply.code()).ok_or_else(|| out_of_step(reply, "EHLO"))?;
    ServerInfo::from_response(&Response::new(code, lines))
        .map_err(|err| Failure::OutOfStep(format!("EHLO: {err}")))
}

/// The `SIZE` an EHLO `reply` offers (RFC 1870): `Some(0)` when no limit
/// is stated; a number that is not one reads as none stated, so the
/// message goes and the relay judges it.
fn size_limit(reply: &Reply) -> Option<usize> {
    reply.lines().skip(1).find_map(|line| {
        let mut words = line.split_ascii_whitespace();
        let keyword = words.next()?;
        keyword
            .eq_ignore_ascii_case("SIZE")
            .then(|| words.next().and_then(|n| n.parse().ok()).unwrap_or(0))
    })
}

/// `reply` as lettre's type, for its AUTH challenge.
fn lettre_response(reply: &Reply) -> Result<Response, Failure> {
    let code = lettre_code(reply.code()).ok_or_else(|| out_of_step(reply, "AUTH"))?;
    Ok(Response::new(
        code,
        reply.lines().map(str::to_owned).collect(),
    ))
}

/// `code` as lettre's type; the parser lets no other code through.
fn lettre_code(code: u16) -> Option<Code> {
    let severity = match code / 100 {
        2 => Severity::PositiveCompletion,
        3 => Severity::PositiveIntermediate,
        4 => Severity::TransientNegativeCompletion,
        5 => Severity::PermanentNegativeCompletion,
        _ => return None,
    };
    let category = match code / 10 % 10 {
        0 => Category::Syntax,
        1 => Category::Information,
        2 => Category::Connections,
        3 => Category::Unspecified3,
        4 => Category::Unspecified4,
        5 => Category::MailSystem,
        _ => return None,
    };
    let detail = [
        Detail::Zero,
        Detail::One,
        Detail::Two,
        Detail::Three,
        Detail::Four,
        Detail::Five,
        Detail::Six,
        Detail::Seven,
        Detail::Eight,
        Detail::Nine,
    ];
    let detail = *detail.get(usize::from(code % 10))?;
    Some(Code::new(severity, category, detail))
}

fn tls_parameters(host: &str, settings: &SmtpSettings) -> Result<TlsParameters, TransportError> {
    let mut builder = TlsParameters::builder(host.to_owned());
    if let Some(path) = &settings.ca_file {
        let ca_error = |reason: String| TransportError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|err| ca_error(err.to_string()))?;
        let certificate = Certificate::from_pem(&pem).map_err(|err| ca_error(err.to_string()))?;
        builder = builder.add_root_certificate(certificate);
    }
    builder
        .build_rustls()
        .map_err(|err| TransportError::Tls(err.to_string()))
}

/// `host` and `port` of `smtp://host[:port]` or `smtps://host[:port]`;
/// the port defaults to 465 for implicit TLS, 587 otherwise.
fn host_and_port(url: &str, tls: TlsMode) -> Result<(String, u16), TransportError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| TransportError::Url("expected smtp://host:port".to_owned()))?;
    // Anywhere after the scheme: a password with a `/` or `?` in it would
    // end the authority early and pass for a host or a port.
    if rest.contains('@') {
        return Err(TransportError::Url(
            "credentials go in smtp.username and smtp.password, not the URL".to_owned(),
        ));
    }
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port = port
                .parse()
                .map_err(|_| TransportError::Url("the port is not a number".to_owned()))?;
            (host, Some(port))
        }
        _ => (authority, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(TransportError::Url("no host".to_owned()));
    }
    let implicit = scheme == "smtps" || tls == TlsMode::Implicit;
    Ok((
        host.to_owned(),
        port.unwrap_or(if implicit { 465 } else { 587 }),
    ))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use mailroom_core::settings::Secret;

    use super::*;

    #[test]
    fn urls_give_host_and_port() {
        let hp = |url, tls| host_and_port(url, tls).expect("parses");
        assert_eq!(
            hp("smtp://relay:2525", TlsMode::None),
            ("relay".to_owned(), 2525)
        );
        assert_eq!(hp("smtp://relay", TlsMode::StarttlsRequired).1, 587);
        assert_eq!(hp("smtps://relay", TlsMode::StarttlsRequired).1, 465);
        assert_eq!(hp("smtp://[::1]:25", TlsMode::None), ("::1".to_owned(), 25));
        assert!(host_and_port("smtp://u:p@relay:25", TlsMode::None).is_err());
        assert!(host_and_port("smtp://relay:x", TlsMode::None).is_err());
        // A password with a `/` or `?` ended the authority early: its start
        // was shown as the port, or taken for the host.
        for url in [
            "smtp://u:Canary/Smtp@127.0.0.1:25",
            "smtp://u:Canary?Smtp@127.0.0.1:25",
            "smtp://Canary/Smtp@127.0.0.1:25",
        ] {
            let err = host_and_port(url, TlsMode::None).expect_err(url);
            assert!(!err.to_string().contains("Canary"), "{err}");
        }
    }

    #[test]
    fn plaintext_is_refused_off_loopback() {
        let settings = |url: &str, allow| SmtpSettings {
            url: Secret::new(url),
            tls: TlsMode::None,
            allow_plaintext: allow,
            ..SmtpSettings::default()
        };
        assert!(matches!(
            super::super::smtp::SmtpTransport::new(&settings("smtp://relay.example:25", false)),
            Err(TransportError::PlaintextRefused { .. })
        ));
        assert!(
            super::super::smtp::SmtpTransport::new(&settings("smtp://relay.example:25", true))
                .is_ok()
        );
        assert!(
            super::super::smtp::SmtpTransport::new(&settings("smtp://127.0.0.1:25", false)).is_ok()
        );
        assert!(
            super::super::smtp::SmtpTransport::new(&settings("smtp://localhost:25", false)).is_ok()
        );
    }

    #[test]
    fn the_size_a_relay_states_is_read() {
        let reply = |text: &str| {
            let (reply, _) = super::super::reply::parse(text.as_bytes())
                .expect("a reply")
                .expect("whole");
            size_limit(&reply)
        };
        assert_eq!(
            reply("250-relay\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"),
            Some(10_240_000)
        );
        assert_eq!(reply("250-relay\r\n250 size\r\n"), Some(0));
        assert_eq!(reply("250-relay\r\n250 SIZE lots\r\n"), Some(0));
        assert_eq!(reply("250-relay\r\n250 SIZEABLE\r\n"), None);
        assert_eq!(reply("250 SIZE 5\r\n"), None, "the first line is the name");
    }
}

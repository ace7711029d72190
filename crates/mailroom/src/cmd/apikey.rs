//! `mailroom apikey`: create, list, rotate and revoke API keys.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use mailroom_core::ratelimit::Rate;
use mailroom_core::settings::Settings;
use mailroom_core::store::RedisStore;
use mailroom_producer::api::keys::{ApiKeyStore, KeyRecord, NewKey, Rotated, Scope};
use mailroom_producer::api::parse_cidr;
use time::OffsetDateTime;

/// `mailroom apikey ...`
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Make a key; it is printed once and never stored.
    Create(CreateArgs),
    /// Every key: id, tenant, scopes, networks, created, last used. Never the key.
    List,
    /// A new key with the same tenant, scopes and limits; the old one keeps
    /// working for the grace period, then expires.
    Rotate {
        /// The key's id.
        id: String,
        /// How long the old key keeps working.
        #[arg(long, default_value = "24h", value_parser = super::parse_span)]
        grace: Duration,
    },
    /// Revoke a key at once, on every API replica.
    Revoke {
        /// The key's id (from `list`).
        id: String,
    },
}

/// `mailroom apikey create`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The tenant the key sends as.
    #[arg(long)]
    tenant: String,
    /// Comma-separated: send, read.
    #[arg(long, value_delimiter = ',', default_value = "send,read")]
    scopes: Vec<Scope>,
    /// Networks the key may be used from (repeat); anywhere when none.
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    allow_cidrs: Vec<String>,
    /// The key's own rate limit, e.g. 100/s.
    #[arg(long)]
    rate: Option<Rate>,
    /// Expire after this long, e.g. 90d.
    #[arg(long, value_parser = super::parse_lifetime)]
    expires: Option<Duration>,
}

/// Runs an `apikey` subcommand.
pub async fn run(settings: &Settings, command: ApiKeyCommand) -> anyhow::Result<()> {
    let store = RedisStore::connect_once(&settings.redis)
        .await
        .context("cannot reach Redis")?;
    let keys = ApiKeyStore::new(store, settings.hash_key()?);
    match command {
        ApiKeyCommand::Create(args) => create(&keys, args).await,
        ApiKeyCommand::List => {
            print!("{}", table(&keys.list().await?));
            Ok(())
        }
        ApiKeyCommand::Rotate { id, grace } => {
            let until = OffsetDateTime::now_utc() + grace;
            let Some(Rotated {
                key,
                record,
                old_until,
            }) = keys.rotate(&id, until).await?
            else {
                bail!("no key with id {id}");
            };
            eprintln!(
                "mailroom: new key {} for tenant {}, expires {}; {id} stops working at {}",
                record.id,
                record.tenant,
                rfc3339(record.expires_at),
                rfc3339(Some(old_until)),
            );
            println!("{key}");
            Ok(())
        }
        ApiKeyCommand::Revoke { id } => {
            if !keys.revoke(&id).await? {
                bail!("no key with id {id}");
            }
            tracing::info!(key_id = %id, "API key revoked");
            eprintln!("mailroom: revoked {id}");
            Ok(())
        }
    }
}

async fn create(keys: &ApiKeyStore, args: CreateArgs) -> anyhow::Result<()> {
    let (key, record) = keys.create(new_key(args)?).await?;
    tracing::info!(key_id = %record.id, tenant = %record.tenant, "API key created");
    eprintln!(
        "mailroom: key {} for tenant {} (shown once; only its hash is stored)",
        record.id, record.tenant
    );
    println!("{key}");
    Ok(())
}

/// The key `args` describe, checked.
fn new_key(args: CreateArgs) -> anyhow::Result<NewKey> {
    if args.scopes.is_empty() {
        bail!("--scopes: give at least one of send, read");
    }
    let tenant_ok = !args.tenant.is_empty()
        && args.tenant.len() <= 64
        && args
            .tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !tenant_ok {
        bail!("--tenant: 1 to 64 of A-Z a-z 0-9 . _ -");
    }
    let mut allow_cidrs = Vec::new();
    for text in &args.allow_cidrs {
        // `parse_cidr` gives the network (`10.0.0.5/8` is `10.0.0.0/8`), so
        // `list` shows what the key allows, each network once.
        let net = parse_cidr(text).with_context(|| format!("--allow-cidr {text:?}: not a CIDR"))?;
        if !allow_cidrs.contains(&net) {
            allow_cidrs.push(net);
        }
    }
    Ok(NewKey {
        tenant: args.tenant,
        scopes: args.scopes,
        allow_cidrs,
        rate: args.rate,
        expires_at: args.expires.map(|d| OffsetDateTime::now_utc() + d),
    })
}

fn table(listed: &[mailroom_producer::api::keys::Listed]) -> String {
    let mut out = format!(
        "{:<18}  {:<16}  {:<10}  {:<20}  {:<8}  {:<20}  {:<20}  {}\n",
        "ID", "TENANT", "SCOPES", "NETWORKS", "RATE", "CREATED", "EXPIRES", "LAST USED"
    );
    for item in listed {
        let KeyRecord {
            id,
            tenant,
            scopes,
            allow_cidrs,
            rate,
            created_at,
            expires_at,
            ..
        } = &item.record;
        let scopes: Vec<&str> = scopes
            .iter()
            .map(|scope| match scope {
                Scope::Send => "send",
                Scope::Read => "read",
            })
            .collect();
        let networks: Vec<String> = allow_cidrs.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "{id:<18}  {tenant:<16}  {:<10}  {:<20}  {:<8}  {:<20}  {:<20}  {}\n",
            scopes.join(","),
            if networks.is_empty() {
                "any".to_owned()
            } else {
                networks.join(",")
            },
            rate.map_or_else(|| "default".to_owned(), |r| r.to_string()),
            rfc3339(Some(*created_at)),
            rfc3339(*expires_at),
            rfc3339(item.last_used),
        ));
    }
    out
}

/// `at` in RFC 3339 to the second, or `-`.
fn rfc3339(at: Option<OffsetDateTime>) -> String {
    at.and_then(|at| at.replace_nanosecond(0).ok())
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(allow_cidrs: &[&str]) -> CreateArgs {
        CreateArgs {
            tenant: "acme".to_owned(),
            scopes: vec![Scope::Send],
            allow_cidrs: allow_cidrs.iter().map(ToString::to_string).collect(),
            rate: None,
            expires: None,
        }
    }

    #[test]
    fn networks_are_stored_without_host_bits() {
        let key = new_key(args(&[
            "10.0.0.5/8",
            "2001:db8::1/32",
            "192.0.2.7",
            "10.1.2.3/8",
        ]))
        .expect("valid");
        let networks: Vec<String> = key.allow_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(networks, ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]);
        let err = new_key(args(&["10.0.0.0/33"])).expect_err("not a CIDR");
        assert!(err.to_string().contains("--allow-cidr"), "{err}");
    }

    /// An allow list written in IPv4-mapped form admits the IPv4 clients
    /// it names: they are matched as IPv4, so the network is stored so.
    #[test]
    fn mapped_networks_are_stored_as_ipv4() {
        let key = new_key(args(&["::ffff:10.0.0.0/104"])).expect("valid");
        let networks: Vec<String> = key.allow_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(networks, ["10.0.0.0/8"]);
        let ip: std::net::IpAddr = "10.9.8.7".parse().expect("ip");
        assert!(key.allow_cidrs.iter().any(|net| net.contains(&ip)));
    }
}

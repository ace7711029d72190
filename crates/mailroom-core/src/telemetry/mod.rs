//! Telemetry: logs, traces and the trace context that crosses the queue.
//!
//! [`init`] is called once at start-up by every role (API, worker, CLI). It
//! installs a `tracing` subscriber that logs to stderr (JSON in production,
//! pretty in a terminal), exports spans over OTLP/gRPC when an endpoint is
//! configured, and always installs the W3C TraceContext propagator so that
//! [`inject_context`] and [`extract_context`] carry a trace from the producer
//! to the worker through the message headers. [`mask_email`] keeps
//! recipients out of logs and spans.

mod amqp;
mod batched;
mod redact;
mod throttle;

pub use redact::{ERROR_TEXT_MAX, hide_known, mask_email, redact_error};
pub use throttle::OncePerSecond;

use std::io::IsTerminal as _;
use std::time::Duration;

use opentelemetry::global;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{FilterExt as _, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use amqp::{
    FieldTableExtractor, FieldTableInjector, extract_context, extract_traceparent, inject_context,
    inject_span,
};

/// The log filter of a service (`worker`, `api`) when neither `RUST_LOG`
/// nor the settings give one.
const DEFAULT_LOG_FILTER: &str = "info";

/// The same for a command: it reports each broker error itself, with the
/// broker's reason, so lapin's own ERROR line for the same close (raw
/// protocol frames) would say it twice.
const COMMAND_LOG_FILTER: &str = "info,lapin=off";

/// How long dropping a [`TelemetryGuard`] waits for the last spans to go out.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The `[telemetry]` settings section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// How log lines are written to stderr.
    pub log_format: LogFormat,
    /// Log filter (`EnvFilter` syntax) used when `RUST_LOG` is unset;
    /// `info` when this is unset too.
    pub log_filter: Option<String>,
    /// OTLP/gRPC endpoint for spans; overrides `OTEL_EXPORTER_OTLP_ENDPOINT`.
    /// Without either, no spans are exported.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans; overrides `OTEL_SERVICE_NAME`.
    /// Defaults to `mailroom-<role>`.
    pub service_name: Option<String>,
}

crate::setting_enum! {
    /// How log lines are written.
    LogFormat {
        /// JSON when stderr is not a terminal, pretty otherwise.
        Auto = "auto" (default),
        /// One JSON object a line.
        Json = "json",
        /// Human-readable, multi-line, coloured in a terminal.
        Pretty = "pretty",
    }
}

/// Why telemetry could not be set up or shut down.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The thread that writes the log could not start.
    #[error("the log writer thread could not start: {0}")]
    LogThread(std::io::Error),
    /// The log filter does not parse; `origin` says where it came from.
    #[error("invalid log filter {filter:?} from {origin}: {error}")]
    Filter {
        /// `RUST_LOG` or `telemetry.log_filter`.
        origin: &'static str,
        /// The filter as given.
        filter: String,
        /// What is wrong with it.
        #[source]
        error: tracing_subscriber::filter::ParseError,
    },
    /// An OTLP endpoint is configured but `init` runs outside a tokio runtime.
    #[error("telemetry::init must be called inside a tokio runtime to export spans over OTLP")]
    NoRuntime,
    /// The OTLP exporter could not be built (a bad endpoint, usually).
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global `tracing` subscriber is already installed (a second `init`).
    #[error("telemetry is already initialised: {0}")]
    AlreadyInitialized(#[from] tracing_subscriber::util::TryInitError),
    /// The tracer provider failed to flush or shut down.
    #[error("cannot shut telemetry down cleanly: {0}")]
    Shutdown(#[from] OTelSdkError),
}

/// Keeps span export alive; dropping it (or calling
/// [`shutdown`](Self::shutdown)) flushes the last spans and stops the exporter.
///
/// Hold it in `main` for the life of the process. With a current-thread tokio
/// runtime, shut down after leaving the runtime: the export needs the runtime
/// to make progress while shutdown waits for it.
#[must_use = "dropping the guard stops span export"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    shutdown_timeout: Duration,
    /// Flushes the log writer's queue when dropped (after the provider).
    _logs: Option<batched::BatchGuard>,
}

impl TelemetryGuard {
    /// Flushes the spans not yet exported and shuts the exporter down, waiting
    /// at most a few seconds.
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        self.shutdown_provider()
    }

    fn shutdown_provider(&mut self) -> Result<(), TelemetryError> {
        let Some(provider) = self.provider.take() else {
            return Ok(());
        };
        let timeout = self.shutdown_timeout;
        let shutdown = move || provider.shutdown_with_timeout(timeout);
        // Waiting blocks this thread; on a multi-thread runtime tell tokio so
        // that the runtime, which drives the export, keeps going meanwhile.
        let result = match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(shutdown)
            }
            _ => shutdown(),
        };
        Ok(result?)
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown_provider() {
            tracing::warn!(%error, "telemetry shutdown");
        }
    }
}

/// Sets up logging, span export and trace propagation for the process.
///
/// - Logs go to stderr, filtered by `RUST_LOG`, else `settings.log_filter`,
///   else `info` for the `worker` and `api` roles and `info,lapin=off` for
///   any other (a command); JSON or pretty per `settings.log_format`.
/// - When an OTLP endpoint is configured (`settings.otlp_endpoint`, else
///   `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
///   spans are exported over gRPC in batches, with `service.name` taken from
///   `settings.service_name`, else `OTEL_SERVICE_NAME`, else `mailroom-{role}`.
///   This needs a tokio runtime; the exporter connects lazily, so a collector
///   that is down does not stop start-up.
/// - The W3C TraceContext propagator is installed globally in every case.
///
/// A second call fails with [`TelemetryError::AlreadyInitialized`] and
/// changes nothing but the (identical) propagator.
pub fn init(role: &str, settings: &TelemetrySettings) -> Result<TelemetryGuard, TelemetryError> {
    global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = log_filter(role, settings)?;
    let ansi = std::io::stderr().is_terminal();
    let json = match settings.log_format {
        LogFormat::Auto => !ansi,
        LogFormat::Json => true,
        LogFormat::Pretty => false,
    };
    // Log lines are written in batches by a thread of their own, so a
    // request or a delivery never waits on stderr nor wakes a thread for
    // each line; no line is dropped (the access log must be complete).
    let (writer, logs) = batched::batched(Box::new(std::io::stderr()), "mailroom-log")
        .map_err(TelemetryError::LogThread)?;
    let fmt_layer = tracing_subscriber::fmt::layer().with_writer(writer);
    let fmt_layer = if json {
        fmt_layer.json().boxed()
    } else {
        fmt_layer.pretty().with_ansi(ansi).boxed()
    }
    // Logs and traces are filtered apart: the per-message spans of the
    // hot path are DEBUG, so they reach an exporter but cost nothing in
    // the log unless `RUST_LOG` asks for them.
    .with_filter(filter.and(log_caps()));

    let provider = if otlp_configured(settings) {
        Some(tracer_provider(role, settings)?)
    } else {
        None
    };
    let guard = TelemetryGuard {
        provider,
        shutdown_timeout: SHUTDOWN_TIMEOUT,
        _logs: Some(logs),
    };
    let otel_layer = guard.provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("mailroom"))
            .with_filter(traced())
    });

    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()?;
    if let Some(provider) = &guard.provider {
        global::set_tracer_provider(provider.clone());
    }
    Ok(guard)
}

/// What is exported as spans: mailroom's own from DEBUG (the per-message
/// spans), other crates' from INFO, and never the exporter's own machinery
/// (gRPC, HTTP/2, the SDK): exporting those would make more of them,
/// without end. Targets match by plain prefix, hence `tower::`:
/// `tower_http`'s request spans must still be exported.
fn traced() -> Targets {
    [
        "opentelemetry",
        "tonic",
        "h2",
        "hyper",
        "tower::",
        "lapin::returned_messages",
    ]
    .into_iter()
    .fold(
        Targets::new()
            .with_default(LevelFilter::INFO)
            .with_target("mailroom", LevelFilter::DEBUG),
        |targets, target| targets.with_target(target, LevelFilter::OFF),
    )
}

/// Whether the log filter a role would run with (`RUST_LOG`, else
/// `telemetry.log_filter`) parses.
pub fn check_log_filter(settings: &TelemetrySettings) -> Result<(), TelemetryError> {
    log_filter("worker", settings).map(drop)
}

/// The log filter from `RUST_LOG`, else the settings, else the default.
fn log_filter(role: &str, settings: &TelemetrySettings) -> Result<EnvFilter, TelemetryError> {
    let (origin, filter) = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(filter) if !filter.trim().is_empty() => ("RUST_LOG", filter),
        _ => (
            "telemetry.log_filter",
            settings.log_filter.clone().unwrap_or_else(|| {
                match role {
                    "worker" | "api" => DEFAULT_LOG_FILTER,
                    _ => COMMAND_LOG_FILTER,
                }
                .to_owned()
            }),
        ),
    };
    let parsed = EnvFilter::try_new(&filter).map_err(|error| TelemetryError::Filter {
        origin,
        filter,
        error,
    })?;
    Ok(parsed)
}

/// Caps no filter can lift (a filter's more specific directive would win
/// over one added to it, so these stand apart and both must pass):
/// - lapin logs a message the broker returned (unroutable) whole, body and
///   headers, at WARN: a sealed job of up to 64 MiB, with its tenant;
///   mailroom reports the return itself;
/// - lapin's TRACE logs every frame it writes and reads: the login's
///   `Connection.StartOk` (user and password), and every message's
///   headers and body.
fn log_caps() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("lapin", LevelFilter::DEBUG)
        .with_target("amq_protocol", LevelFilter::DEBUG)
        .with_target("lapin::returned_messages", LevelFilter::OFF)
}

fn env_is_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|value| !value.is_empty())
}

fn otlp_configured(settings: &TelemetrySettings) -> bool {
    settings.otlp_endpoint.is_some()
        || env_is_set(opentelemetry_otlp::OTEL_EXPORTER_OTLP_ENDPOINT)
        || env_is_set(opentelemetry_otlp::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
}

/// A tracer provider exporting to the configured OTLP endpoint in batches.
fn tracer_provider(
    role: &str,
    settings: &TelemetrySettings,
) -> Result<SdkTracerProvider, TelemetryError> {
    // tonic spawns its connection task on the current runtime and would panic
    // without one.
    tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;

    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    // Without an endpoint in the settings the exporter reads the
    // OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variables itself.
    if let Some(endpoint) = &settings.otlp_endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    let exporter = exporter.build()?;

    let service_name = settings
        .service_name
        .clone()
        .or_else(|| {
            std::env::var("OTEL_SERVICE_NAME")
                .ok()
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_else(|| format!("mailroom-{role}"));
    let resource = Resource::builder().with_service_name(service_name).build();

    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The process's Prometheus recorder, installed on first call (later calls
/// return the same handle); `None` if another recorder came first.
/// Histograms named `*_seconds` get buckets from 5 ms to an hour.
pub fn prometheus() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                300.0, 900.0, 3600.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &seconds)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn settings_default_and_parse() {
        let settings: TelemetrySettings =
            serde_json::from_str("{}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings, TelemetrySettings::default());
        assert_eq!(settings.log_format, LogFormat::Auto);

        let settings: TelemetrySettings = serde_json::from_str(
            r#"{"log_format": "json", "log_filter": "debug", "service_name": "x"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.log_format, LogFormat::Json);
        assert_eq!(settings.log_filter.as_deref(), Some("debug"));

        assert!(serde_json::from_str::<TelemetrySettings>(r#"{"log_format": "xml"}"#).is_err());
        assert!(serde_json::from_str::<TelemetrySettings>(r#"{"endpoint": "x"}"#).is_err());
    }

    /// The only test that installs the global subscriber: it is process-wide.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn init_exports_lazily_and_shuts_down_in_bounded_time() {
        let settings = TelemetrySettings {
            log_format: LogFormat::Json,
            otlp_endpoint: Some("http://127.0.0.1:4317".to_owned()),
            ..TelemetrySettings::default()
        };
        let mut guard = init("test", &settings).unwrap_or_else(|e| panic!("{e}"));
        assert!(guard.provider.is_some());

        // A span that cannot be delivered: nothing listens on the port.
        tracing::info_span!("mailroom.enqueue").in_scope(|| tracing::info!("queued"));

        let again = init("test", &settings);
        assert!(
            matches!(again, Err(TelemetryError::AlreadyInitialized(_))),
            "{again:?}"
        );

        guard.shutdown_timeout = Duration::from_millis(500);
        let started = Instant::now();
        drop(guard);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn exported_spans_leave_out_the_exporter_only() {
        let targets = traced();
        assert!(targets.would_enable("mailroom_producer::enqueue", &tracing::Level::DEBUG));
        assert!(!targets.would_enable("lapin::channel", &tracing::Level::DEBUG));
        let level = tracing::Level::INFO;
        for quiet in [
            "opentelemetry_sdk",
            "tonic::transport",
            "h2::proto",
            "hyper_util",
            "tower::buffer",
        ] {
            assert!(!targets.would_enable(quiet, &level), "{quiet}");
        }
        for kept in [
            "mailroom_worker::process",
            "tower_http::trace",
            "lapin::channel",
        ] {
            assert!(targets.would_enable(kept, &level), "{kept}");
        }
    }

    #[test]
    fn exporter_needs_a_runtime() {
        let settings = TelemetrySettings {
            otlp_endpoint: Some("http://127.0.0.1:4317".to_owned()),
            ..TelemetrySettings::default()
        };
        assert!(matches!(
            tracer_provider("test", &settings),
            Err(TelemetryError::NoRuntime)
        ));
    }

    #[test]
    fn a_bad_filter_names_its_origin() {
        let settings = TelemetrySettings {
            log_filter: Some("mailroom=loud".to_owned()),
            ..TelemetrySettings::default()
        };
        // RUST_LOG, when set in the test environment, takes precedence.
        if std::env::var_os("RUST_LOG").is_none() {
            let error = log_filter("worker", &settings).err().map(|e| e.to_string());
            assert!(
                error
                    .as_deref()
                    .is_some_and(|e| e.contains("telemetry.log_filter")),
                "{error:?}"
            );
        }
    }

    #[test]
    fn lapin_frames_and_returns_are_never_logged_whatever_the_filter() {
        let caps = log_caps();
        for (target, level, logged) in [
            ("lapin::returned_messages", tracing::Level::ERROR, false),
            ("lapin::io_loop", tracing::Level::TRACE, false),
            ("lapin::channels", tracing::Level::TRACE, false),
            ("amq_protocol::frame", tracing::Level::TRACE, false),
            ("lapin::io_loop", tracing::Level::DEBUG, true),
            ("mailroom_worker", tracing::Level::TRACE, true),
        ] {
            assert_eq!(
                caps.would_enable(target, &level),
                logged,
                "{target} {level}"
            );
        }
        assert!(!traced().would_enable("lapin::returned_messages", &tracing::Level::ERROR));
    }
}

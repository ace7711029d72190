//! W3C trace context across the queue: OpenTelemetry's injector and extractor
//! over AMQP header tables.
//!
//! The producer injects the context of its `mailroom.enqueue` span into the
//! message headers; the worker extracts it and makes it the parent of
//! `mailroom.process`. Both go through the global propagator, which
//! [`init`](super::init) installs, so the two sides always agree on the format.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::Context;
use opentelemetry::global;
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Writes propagation fields into an AMQP header table, as long strings.
pub struct FieldTableInjector<'a>(pub &'a mut FieldTable);

impl Injector for FieldTableInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // A key longer than an AMQP short string (255 bytes) cannot be a
        // header name; no W3C field comes near that, so skipping is safe.
        if let Ok(key) = ShortString::try_new(key) {
            self.0
                .insert(key, AMQPValue::LongString(LongString::from(value)));
        }
    }
}

/// Reads propagation fields from an AMQP header table.
///
/// Values are accepted as long strings (what [`FieldTableInjector`] and most
/// clients write), short strings or byte arrays, as long as they are UTF-8.
pub struct FieldTableExtractor<'a>(pub &'a FieldTable);

impl Extractor for FieldTableExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
            AMQPValue::ShortString(value) => Some(value.as_str()),
            AMQPValue::ByteArray(value) => std::str::from_utf8(value.as_slice()).ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(ShortString::as_str).collect()
    }
}

/// Injects `cx` into `headers` with the global propagator.
pub fn inject_context(cx: &Context, headers: &mut FieldTable) {
    global::get_text_map_propagator(|propagator| {
        propagator.inject_context(cx, &mut FieldTableInjector(headers));
    });
}

/// Injects the OpenTelemetry context of a `tracing` span into `headers`.
pub fn inject_span(span: &tracing::Span, headers: &mut FieldTable) {
    inject_context(&span.context(), headers);
}

/// Extracts the context carried by `headers` with the global propagator.
///
/// A table without (valid) propagation fields gives a context whose span is
/// not valid; making that the parent starts a new trace.
pub fn extract_context(headers: &FieldTable) -> Context {
    global::get_text_map_propagator(|propagator| propagator.extract(&FieldTableExtractor(headers)))
}

/// The two W3C trace-context fields, as a caller sent them.
struct TraceFields<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Extractor for TraceFields<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Extracts the context a caller sent as `traceparent` / `tracestate`
/// (e.g. HTTP request headers).
pub fn extract_traceparent(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let fields = TraceFields {
        traceparent,
        tracestate,
    };
    global::get_text_map_propagator(|propagator| propagator.extract(&fields))
}

#[cfg(test)]
mod tests {
    use lapin::types::ByteArray;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        TracerProvider as _,
    };
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    const TRACE_ID: u128 = 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c;
    const SPAN_ID: u64 = 0xb7ad_6b71_6920_3331;
    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    /// Every test (and `init`) installs the same propagator, so the order in
    /// which the tests run does not matter.
    fn install_propagator() {
        global::set_text_map_propagator(TraceContextPropagator::new());
    }

    fn remote_context() -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(TRACE_ID),
            SpanId::from(SPAN_ID),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    fn header(headers: &FieldTable, key: &str) -> Option<String> {
        FieldTableExtractor(headers).get(key).map(str::to_owned)
    }

    #[test]
    fn injected_context_extracts_to_the_same_span() {
        install_propagator();
        let mut headers = FieldTable::default();
        inject_context(&remote_context(), &mut headers);

        assert_eq!(
            header(&headers, "traceparent").as_deref(),
            Some(TRACEPARENT)
        );
        assert!(matches!(
            headers.inner().get("traceparent"),
            Some(AMQPValue::LongString(_))
        ));

        let cx = extract_context(&headers);
        let span = cx.span();
        let extracted = span.span_context();
        assert!(extracted.is_valid());
        assert!(extracted.is_remote());
        assert!(extracted.is_sampled());
        assert_eq!(extracted.trace_id(), TraceId::from(TRACE_ID));
        assert_eq!(extracted.span_id(), SpanId::from(SPAN_ID));
    }

    #[test]
    fn traceparent_is_well_formed() {
        install_propagator();
        let mut headers = FieldTable::default();
        inject_context(&remote_context(), &mut headers);
        let traceparent = header(&headers, "traceparent").unwrap_or_default();

        let parts: Vec<&str> = traceparent.split('-').collect();
        let lengths: Vec<usize> = parts.iter().map(|part| part.len()).collect();
        assert_eq!(lengths, [2, 32, 16, 2], "{traceparent}");
        assert!(
            parts.iter().all(|part| part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))),
            "{traceparent}"
        );
        assert_eq!(parts[0], "00");
    }

    #[test]
    fn an_http_traceparent_is_continued() {
        install_propagator();
        let cx = extract_traceparent(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None,
        );
        let span = cx.span().span_context().clone();
        assert!(span.is_valid());
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(
            !extract_traceparent(Some("nonsense"), None)
                .span()
                .span_context()
                .is_valid()
        );
        assert!(
            !extract_traceparent(None, None)
                .span()
                .span_context()
                .is_valid()
        );
    }

    #[test]
    fn empty_table_gives_an_invalid_span() {
        install_propagator();
        let cx = extract_context(&FieldTable::default());
        assert!(!cx.span().span_context().is_valid());
    }

    #[test]
    fn garbage_traceparent_gives_an_invalid_span() {
        install_propagator();
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString("nonsense".into()),
        );
        headers.insert("other".into(), AMQPValue::LongLongInt(7));
        let cx = extract_context(&headers);
        assert!(!cx.span().span_context().is_valid());
    }

    #[test]
    fn extraction_accepts_every_string_encoding() {
        install_propagator();
        let values = [
            AMQPValue::LongString(TRACEPARENT.into()),
            AMQPValue::ShortString(TRACEPARENT.into()),
            AMQPValue::ByteArray(ByteArray::from(TRACEPARENT.as_bytes())),
        ];
        for value in values {
            let mut headers = FieldTable::default();
            headers.insert("traceparent".into(), value.clone());
            let cx = extract_context(&headers);
            let span = cx.span();
            assert_eq!(
                span.span_context().trace_id(),
                TraceId::from(TRACE_ID),
                "{value:?}"
            );
            assert_eq!(
                span.span_context().span_id(),
                SpanId::from(SPAN_ID),
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_tracing_span_injects_its_own_trace() {
        install_propagator();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));

        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("mailroom.enqueue");
            let mut headers = FieldTable::default();
            inject_span(&span, &mut headers);

            let expected = span.context().span().span_context().clone();
            assert!(expected.is_valid());
            let extracted = extract_context(&headers);
            let extracted = extracted.span();
            assert_eq!(extracted.span_context().trace_id(), expected.trace_id());
            assert_eq!(extracted.span_context().span_id(), expected.span_id());
        });
    }
}

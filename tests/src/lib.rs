//! End-to-end tests for mailroom live under `tests/`; this library holds their shared fixtures.

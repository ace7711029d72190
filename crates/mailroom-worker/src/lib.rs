//! The mailroom worker pool: consumes sealed jobs, opens, deduplicates, throttles and delivers them over SMTP, retrying and dead-lettering.

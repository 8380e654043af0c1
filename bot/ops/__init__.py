"""Operations: the web server (/healthz, /metrics from the core's prometheus registry and the
figures read from PostgreSQL at scrape time), `doctor` and its credential checks, the scheduler,
admin notices, logging and the configuration reference.

May import everything, read-only; the capabilities import only `notify` and `logs` from it.
"""

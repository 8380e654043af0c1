"""Operations: the web server (/healthz, /metrics), metrics, `doctor` and its credential
checks, the scheduler, admin notices and logging.

May import everything, read-only: nothing else imports ops except `notify`, `logs` and `metrics`.
"""

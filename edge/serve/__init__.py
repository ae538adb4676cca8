"""`edge-agent serve`: the edge as a daemon with an OpenAI-compatible HTTP API.

    config.py    ServeConfig: the daemon's settings (one dataclass)
    text.py      token ids -> text: incremental UTF-8, stop strings held back
    protocol.py  OpenAI request validation and response/chunk shapes
    engine.py    the one drafter and Agent: bounded queue, worker thread, cancellation
    metrics.py   Prometheus metrics and the telemetry snapshot
    app.py       the FastAPI routes
    daemon.py    flags, start-up (models, verifier probe, uvicorn, MQTT), shutdown
"""

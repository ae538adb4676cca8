"""The gRPC metadata names edge and verifier agree on, and nothing else.

    authorization       Bearer TOKEN (when the deployment has one)
    tandem-affinity     a random key chosen before Open; a balancer in front of
                        several verifiers hashes on it (deploy/haproxy.cfg), so
                        every call of one session reaches the same replica
    tandem-session      the session a Close or a Generate stream is about
    tandem-session-key  the per-session secret Open returned (only the client
                        that opened a session can drive it)
    retry-after-ms      trailing metadata of a refused Open: when to try again
"""
from __future__ import annotations

AUTH_HEADER = "authorization"
AFFINITY_HEADER = "tandem-affinity"
SESSION_HEADER = "tandem-session"
SESSION_KEY_HEADER = "tandem-session-key"
RETRY_AFTER_HEADER = "retry-after-ms"


def bearer(token: str) -> str:
    """The `authorization` value that carries `token`."""
    return f"Bearer {token}"

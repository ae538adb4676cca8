"""The deployment's bearer token, read the same way by the edge (which sends
it) and the verifier (which checks it): --token-file, --token or $TANDEM_TOKEN."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

from common.errors import StartupError

TOKEN_ENV = "TANDEM_TOKEN"
SHORT_TOKEN = 16          # below this many characters a token is guessable: warn


def load_token(token_file: Path | None, token_arg: str | None, env: Mapping[str, str] = os.environ,
               warn: Callable[[str], None] = lambda msg: None) -> str | None:
    """The deployment token: --token-file, else --token (warned: visible in `ps`),
    else $TANDEM_TOKEN (when not empty); None when none is given. Giving two sources is an error
    rather than a silent precedence rule."""
    given = [name for name, v in (("--token-file", token_file), ("--token", token_arg)) if v is not None]
    if len(given) > 1:
        raise StartupError("give the token once: --token-file or --token, not both")
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise StartupError(f"cannot read --token-file {token_file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise StartupError(f"--token-file {token_file} is not text") from None
        source = f"--token-file {token_file}"
    elif token_arg is not None:
        warn("--token is visible to every user of this host (ps, /proc): prefer --token-file or $TANDEM_TOKEN")
        token, source = token_arg, "--token"
    elif env.get(TOKEN_ENV, "").strip():          # set but empty counts as unset, as in shells
        token, source = env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    check_token(token, source)
    if len(token) < SHORT_TOKEN:
        warn(f"the token from {source} has {len(token)} characters: use at least {SHORT_TOKEN} random ones "
             "(e.g. `openssl rand -hex 24`)")
    return token


def check_token(token: str, source: str) -> None:
    """A token must fit in gRPC metadata as is: visible ASCII, no spaces."""
    if not token:
        raise StartupError(f"the token from {source} is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise StartupError(f"the token from {source} must be visible ASCII without spaces")

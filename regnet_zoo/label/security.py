"""The label server's access rules, as one ASGI middleware in front of MONAI Label's FastAPI app.

- **Token**: when set, every request (every route, the API docs included) needs
  ``Authorization: Bearer <token>``; anything else gets 401. Compared in constant time.
- **No server paths**: JSON and text responses have every absolute path under the server's own folders
  (studies, work dir, weights folders, the package, the temp dir, the Python prefix, the home folder)
  replaced by its base name, a net under the app's own replies that never name server paths.

CORS is not handled here: :func:`regnet_zoo.label.serve.build_app` removes MONAI Label's allow-every-origin
middleware and adds one only for origins given explicitly.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["TOKEN_ENV", "RequestGuard"]

#: environment variable read for the token when ``--token`` is not given
TOKEN_ENV = "REGNET_ZOO_LABEL_TOKEN"

_TEXT_TYPES = (b"application/json", b"text/")


def _path_pattern(roots: Iterable[str | os.PathLike]) -> re.Pattern | None:
    forms = set()
    for root in roots:
        for form in {os.path.abspath(str(root)), os.path.realpath(str(root))}:
            if len(Path(form).parts) >= 2:  # never "/" itself
                forms.add(form.rstrip("/"))
    if not forms:
        return None
    alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return re.compile(rf"(?:{alternatives})(?:/[^\s\"'<>,;)\]}}]*)?")


class RequestGuard:
    """ASGI middleware: bearer-token check (when ``token``) and server paths removed from text replies."""

    def __init__(self, app, token: str | None = None, hidden_roots: Iterable[str | os.PathLike] = ()) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.pattern = _path_pattern(hidden_roots)

    def _scrub(self, body: bytes) -> bytes:
        if self.pattern is None:
            return body
        text = body.decode("utf-8", errors="surrogateescape")
        scrubbed = self.pattern.sub(lambda m: Path(m.group(0)).name or "<server path>", text)
        return body if scrubbed == text else scrubbed.encode("utf-8", errors="surrogateescape")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.expected is not None:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                detail = "missing or wrong token (Authorization: Bearer <token>)"
                body = json.dumps({"detail": detail}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        start: dict = {}
        chunks: list[bytes] = []

        async def send_scrubbed(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                if self.pattern is not None and ctype.startswith(_TEXT_TYPES):
                    start = message  # buffer the (small) text body to rewrite it
                    return
                await send(message)
            elif message["type"] == "http.response.body" and start:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = self._scrub(b"".join(chunks))
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            else:
                await send(message)

        await self.app(scope, receive, send_scrubbed)

"""``regnet-zoo serve``: run the MONAI Label server (0.8.5) with the regnet_zoo app on a studies folder.

Hook into an argparse CLI with :func:`add_serve_parser` (it sets ``func=serve_main``), or call :func:`serve`.
Also runnable as ``python -m regnet_zoo.label.serve --studies DIR``.

What it does (the same as ``monailabel start_server --app <regnet_zoo/label> --studies DIR --conf ...``, minus
that command's writes into the app folder, with safer defaults): set MONAI Label's settings (also exported
to the environment, as MONAI Label does, so its training subprocesses see them), keep logs and sessions in
the app's ``work_dir``
(default ``<studies>/.regnet_zoo``) and run ``uvicorn`` on MONAI Label's app secured by :func:`build_app`.

Security defaults: listens on 127.0.0.1 only; no CORS headers (browsers on other origins cannot call it)
unless ``--cors-origin`` names origins; a token (``--token`` or the ``REGNET_ZOO_LABEL_TOKEN`` environment
variable) required as ``Authorization: Bearer <token>`` on every route when set; no absolute server path in
any reply; MONAI Label's ``/logs`` and ``/proxy`` routes are not served.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regnet_zoo.label import APP_DIR
from regnet_zoo.label.config import LabelAppConfig, parse_models, parse_weights
from regnet_zoo.label.security import TOKEN_ENV, RequestGuard

__all__ = [
    "add_serve_parser",
    "serve_main",
    "serve",
    "build_app",
    "configure_monailabel",
    "INSTALL_HINT",
    "main",
]

#: MONAI Label routes not served: server logs (full of paths) and an open HTTP proxy
DROPPED_ROUTES = ("/logs", "/proxy")

INSTALL_HINT = (
    "MONAI Label is not installed; install the label extra: pip install -e '.[label]' && "
    "pip install --no-deps monailabel==0.8.5"
)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to argparse ``subparsers``; the parsed args carry ``func=serve_main``."""
    parser = subparsers.add_parser(
        "serve",
        help="serve every bundle as a registration model with MONAI Label",
        description="Run the MONAI Label server with the regnet_zoo app: one infer task per bundle "
        "(fixed = the request's image, moving = params.moving, params.result = warped | warped_label | ddf) "
        "and one training task per bundle.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=serve_main)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--studies", required=True, help="datastore folder of images (labels in labels/final)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--models", default="all", help="comma-separated bundles to serve, e.g. ddrnet,pwc (default: all)"
    )
    parser.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="trained weights of a model (repeatable; default: the bundle's models/model.pt, else the "
        "shipped weights in regnet_zoo/pretrained)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for inference and training")
    parser.add_argument(
        "--work-dir", default=None, help="logs, sessions and training runs (default: <studies>/.regnet_zoo)"
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' on every request (default: ${TOKEN_ENV}; prefer the "
        "environment variable: command lines are visible to other users)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser requests from this origin, e.g. http://localhost:3000 (repeatable; "
        "default: none)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log level"
    )


def configure_monailabel(config: LabelAppConfig, port: int, log_level: str = "info") -> str:
    """Point MONAI Label's settings at the regnet_zoo app and ``config``; return the logging config file.

    The settings are also exported to ``os.environ`` (MONAI Label's training runs in a subprocess that reads
    them from there).
    """
    from monailabel.config import settings
    from monailabel.utils.others.generic import init_log_config

    work_dir = Path(config.work_dir)
    (work_dir / "sessions").mkdir(parents=True, exist_ok=True)
    settings.MONAI_LABEL_APP_DIR = str(APP_DIR)
    settings.MONAI_LABEL_STUDIES = str(Path(config.studies).resolve())
    settings.MONAI_LABEL_APP_CONF = config.to_conf()
    settings.MONAI_LABEL_SERVER_PORT = int(port)
    settings.MONAI_LABEL_SESSION_PATH = str(work_dir / "sessions")
    for key, value in settings.model_dump().items():
        if isinstance(value, list | dict):
            os.environ[key] = json.dumps(value)
        elif value is not None:
            os.environ[key] = str(value)
    # MONAI Label's background tasks read PYTHONPATH unconditionally
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH", ""), str(APP_DIR)) if p
    )
    return init_log_config(None, str(work_dir), "app.log", log_level.upper())


def build_app(
    config: LabelAppConfig, token: str | None = None, cors_origins: Sequence[str] = ()
) -> Any:
    """MONAI Label's FastAPI app with regnet_zoo's access rules (see the module docstring); call after
    :func:`configure_monailabel`. Idempotent: each call replaces the previous call's rules."""
    import tempfile

    from fastapi.middleware.cors import CORSMiddleware
    from monailabel.app import app

    app.user_middleware = [m for m in app.user_middleware if m.cls not in (CORSMiddleware, RequestGuard)]
    app.router.routes = [
        r for r in app.router.routes if not str(getattr(r, "path", "")).startswith(DROPPED_ROUTES)
    ]
    app.middleware_stack = None  # rebuilt with the middleware below on the next request
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE", "HEAD"],
            allow_headers=["Authorization", "Content-Type"],
        )
    hidden = [config.studies, config.work_dir, APP_DIR.parents[1], tempfile.gettempdir(), sys.prefix]
    hidden += [p.parent for p in config.weights.values()] + [Path.home()]
    app.add_middleware(RequestGuard, token=token or None, hidden_roots=hidden)  # outermost: runs first
    app.add_exception_handler(json.JSONDecodeError, _bad_params)  # MONAI Label: a 500
    return app


async def _bad_params(request: Any, err: json.JSONDecodeError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": f"params is not valid JSON ({err.msg})"}, status_code=400)


def serve(
    studies: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    models: str | Sequence[str] | None = "all",
    weights: Sequence[str] | str | None = (),
    device: str = "cpu",
    work_dir: str | os.PathLike | None = None,
    log_level: str = "info",
    token: str | None = None,
    cors_origins: Sequence[str] = (),
) -> int:
    """Run the MONAI Label server until it is stopped (Ctrl-C / SIGTERM); return an exit status.

    ``models``: ``"ddrnet,pwc"``, a list, or ``"all"``; ``weights``: ``["ddrnet=/p/model.pt", ...]``;
    ``token``: default ``$REGNET_ZOO_LABEL_TOKEN``. Bad options print one line to stderr and return 2.
    """
    try:
        import uvicorn  # noqa: F401
        from monailabel.config import settings  # noqa: F401
    except ImportError as err:
        print(f"regnet-zoo serve: {INSTALL_HINT} ({err})", file=sys.stderr)
        return 2
    studies = Path(studies).expanduser().resolve()
    if studies.exists() and not studies.is_dir():
        print(f"regnet-zoo serve: --studies {studies} is not a folder", file=sys.stderr)
        return 2
    try:
        model_list = parse_models(models if isinstance(models, str) or models is None else ",".join(models))
        weight_map = parse_weights(weights if isinstance(weights, str) else ",".join(weights or ()))
    except ValueError as err:
        print(f"regnet-zoo serve: {err}", file=sys.stderr)
        return 2
    missing = [f"{name}={path}" for name, path in weight_map.items() if not path.is_file()]
    if missing:
        print(f"regnet-zoo serve: weights file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    if not model_list:
        print("regnet-zoo serve: no bundle to serve (no bundles/<method>/train.yaml found)", file=sys.stderr)
        return 2
    studies.mkdir(parents=True, exist_ok=True)
    config = LabelAppConfig(
        studies=studies,
        models=model_list,
        weights=weight_map,
        device=device,
        work_dir=Path(work_dir).expanduser().resolve() if work_dir else None,
    )
    token = token or os.environ.get(TOKEN_ENV) or None
    log_config = configure_monailabel(config, port, log_level)
    app = build_app(config, token, cors_origins)
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"regnet-zoo serve: warning: listening on {host} without a token (--token / ${TOKEN_ENV})")
    print(
        f"regnet-zoo serve: MONAI Label on http://{host}:{port}/ (models: {', '.join(model_list)}; "
        f"studies: {studies}; logs: {Path(config.work_dir) / 'logs'}; token: {'yes' if token else 'no'}; "
        f"CORS origins: {', '.join(cors_origins) or 'none'})",
        flush=True,
    )
    import uvicorn

    uvicorn.run(app, host=host, port=int(port), log_level=log_level, log_config=log_config)
    return 0


def serve_main(args: argparse.Namespace) -> int:
    """Run ``serve`` from parsed arguments (see :func:`add_serve_parser`)."""
    return serve(
        studies=args.studies,
        host=args.host,
        port=args.port,
        models=args.models,
        weights=args.weights,
        device=args.device,
        work_dir=args.work_dir,
        log_level=args.log_level,
        token=args.token,
        cors_origins=args.cors_origin,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m regnet_zoo.label.serve [options]`` (the same options as ``regnet-zoo serve``)."""
    parser = argparse.ArgumentParser(prog="python -m regnet_zoo.label.serve")
    _add_arguments(parser)
    return serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The ``sandstorm`` command: run the gateway, manage its images, and use a gateway as a client
(run, exec, ls, rm, status, snapshot, snapshots, resume, cp, files; see
``sandstorm.cli.client``)."""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from sandstorm.cli import admin as cli_admin
from sandstorm.cli import client as cli_client
from sandstorm.cli import images as cli_images
from sandstorm.config import DEFAULT_DATA_DIR, ConfigError, load_config
from sandstorm.images import ImageError
from sandstorm.logs import configure as configure_logs
from sandstorm.native import NativeBuildError
from sandstorm.supervisor.lock import DataDirInUse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandstorm", description=__doc__)
    parser.add_argument(
        "--log-level", default=None, help="INFO for serve and image, WARNING for the client"
    )
    parser.add_argument(
        "--url", default=None, help="gateway URL for the client commands ($SANDSTORM_URL)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 3000, 0 = any)")
    serve.add_argument("--data-dir", default=None, help=f"state directory ({DEFAULT_DATA_DIR})")
    serve.add_argument("--config", default=None, help="TOML configuration file")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="serve beyond loopback without API keys (anyone who can connect runs code)",
    )
    serve.add_argument(
        "--log-format",
        choices=("json", "text"),
        default="json",
        help="stderr log lines: one JSON object each (default) or plain text",
    )

    cli_images.add_commands(sub)
    cli_client.add_commands(sub)
    cli_admin.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    is_client = args.command in cli_client.COMMANDS
    level = (args.log_level or ("WARNING" if is_client else "INFO")).upper()
    if args.command == "serve":
        configure_logs(args.log_format, level)
    else:
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
    if is_client:
        return cli_client.main(args)
    if args.command in cli_admin.COMMANDS:
        return cli_admin.main(args)
    try:
        if args.command == "serve":
            config = load_config(
                args.config,
                host=args.host,
                port=args.port,
                data_dir=args.data_dir,
                insecure_no_auth=args.insecure_no_auth,
            )
            refusal = cli_admin.check_bind(config.host, config.data_dir, config.insecure_no_auth)
            if refusal is not None:
                print(f"sandstorm: {refusal}", file=sys.stderr)
                return 2
            from sandstorm.main import serve

            trio.run(serve, config)
            return 0
        if args.command == "image":
            return cli_images.main(args)
    except ConfigError as exc:
        print(f"sandstorm: {exc}", file=sys.stderr)
        return 2
    except ImageError as exc:
        print(f"sandstorm: image build failed: {exc}", file=sys.stderr)
        return 1
    except (NativeBuildError, DataDirInUse) as exc:
        print(f"sandstorm: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 1

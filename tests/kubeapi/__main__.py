"""Run the test API server as its own process (e.g. inside a network namespace).

    python -m tests.kubeapi --listen 10.0.0.1:6443 --state-dir DIR \\
        [--clock-offset S] [--config accounts.json] [--cert valid|other-ca|expired] \\
        [--namespace NS ...]

Writes ``DIR/ca.pem``, ``DIR/accounts.json`` (tokens, mode 0600),
``DIR/kubeconfig-<user>`` for each account and appends one JSON line per request
to ``DIR/requests.jsonl``. When it accepts connections it writes ``DIR/ready``
(the URL) and prints the URL. SIGTERM or SIGINT stops it (exit 0); SIGUSR1 makes
``/readyz`` fail and SIGUSR2 makes it pass again. ``--config`` is JSON:
``{"namespaces": [...], "accounts": [{"user", "token", "grants": [{"resource",
"namespace", "verbs"}]}]}``; without it a spegeld ServiceAccount and an admin
with random tokens are made.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import trio

from ._accounts import Account
from ._server import DEFAULT_NAMESPACES, default_accounts, open_kube_api


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.kubeapi", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--listen", type=_parse_listen, default=("127.0.0.1", 6443), metavar="HOST:PORT"
    )
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--clock-offset", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--cert", choices=["valid", "other-ca", "expired"], default="valid")
    parser.add_argument("--namespace", action="append", dest="namespaces")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    accounts = default_accounts()
    namespaces = set(args.namespaces or DEFAULT_NAMESPACES)
    if args.config is not None:
        config = json.loads(args.config.read_text(encoding="utf-8"))
        accounts = [Account.from_json(a) for a in config.get("accounts", [])] or accounts
        namespaces = set(config.get("namespaces", namespaces))
    args.state_dir.mkdir(parents=True, exist_ok=True)
    host, port = args.listen
    with trio.open_signal_receiver(
        signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2
    ) as signals:
        async with open_kube_api(
            args.state_dir,
            host=host,
            port=port,
            accounts=accounts,
            namespaces=namespaces,
            clock_offset=args.clock_offset,
            cert=args.cert,
        ) as api:
            ready = args.state_dir / "ready"
            ready.with_suffix(".tmp").write_text(api.url + "\n", encoding="utf-8")
            ready.with_suffix(".tmp").rename(ready)
            print(api.url, flush=True)
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    api.set_ready(False)
                elif signum == signal.SIGUSR2:
                    api.set_ready(True)
                else:
                    break


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    try:
        trio.run(_main, args)
    except KeyError as exc:
        print(f"kubeapi: an account in {args.config} lacks {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"kubeapi: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

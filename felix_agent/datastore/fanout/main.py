"""tortie-fanout: watch the Kubernetes API once and serve every agent from that one watch
set (agents: `fanout_endpoints: host:port`). Runs until SIGTERM/SIGINT; agents connected
to it reconnect elsewhere (or to it again) with backoff and resync.

    tortie-fanout [--kubeconfig PATH] [--listen 0.0.0.0:5473] [--metrics-port 9098]

On the metrics port: /metrics, /readyz (200 once the API watch is in sync, 503 before and
while it is lost) and /livez (200 while its event loop turns); the probes' JSON says why.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from felix_agent import logs
from felix_agent.config import ConfigError, parse_host_port
from felix_agent.datastore.fanout.protocol import DEFAULT_PORT


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tortie-fanout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubeconfig", default="", help="kubeconfig path (default: in-cluster config, else "
                                                     "$KUBECONFIG or ~/.kube/config)")
    ap.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", help="host:port agents connect to "
                                                                      "(default: %(default)s)")
    ap.add_argument("--metrics-port", type=int, default=9098,
                    help="/metrics, /readyz and /livez port on --listen's host (0: off; default: %(default)s)")
    ap.add_argument("--max-queue", type=int, default=10_000,
                    help="updates an agent may fall behind before it is disconnected to resync "
                         "(default: %(default)s)")
    ap.add_argument("--ping-interval", type=float, default=10.0,
                    help="seconds of silence after which the server sends a ping; agents give up "
                         "on a server silent for three (default: %(default)s)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return ap


async def run(args: argparse.Namespace, host: str, port: int) -> None:
    from felix_agent import metrics
    from felix_agent.datastore.fanout.server import REGISTRY, FanoutServer
    from felix_agent.datastore.kubernetes import KubernetesSyncer

    server = FanoutServer(KubernetesSyncer(kubeconfig=args.kubeconfig or None), max_queue=args.max_queue,
                          ping_interval=args.ping_interval)
    if args.metrics_port:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        def probe(what: str) -> metrics.Page:
            return lambda _query: metrics.json_page((doc := server.health())[what], doc)
        metrics.serve_pages(host, args.metrics_port, {
            "/metrics": lambda _query: (200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)),
            "/readyz": probe("ready"), "/livez": probe("live")})
    task = asyncio.create_task(server.run(host, port))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        host, port = parse_host_port(args.listen, "--listen")
        if args.max_queue < 1:
            raise ConfigError(f"--max-queue: must be >= 1, got {args.max_queue}")
        if args.ping_interval <= 0:
            raise ConfigError(f"--ping-interval: must be > 0, got {args.ping_interval}")
        if not 0 <= args.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port: {args.metrics_port} is not a port")
    except ConfigError as e:
        print(f"tortie-fanout: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    logs.setup(args.log_level)
    asyncio.run(run(args, host, port))


if __name__ == "__main__":
    main()

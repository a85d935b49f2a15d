"""``python -m golem_sidecar --listen ADDR [--config FILE | --config-json JSON]``

Exits 0 after SIGTERM/SIGINT (calls in flight get limits.shutdownGraceMs to finish; a second
signal cuts that short), 2 for a bad config, and 1 when the default model cannot be loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from golem_sidecar.config import ConfigError, SidecarConfig, load_config
from golem_sidecar.errors import GolemError
from golem_sidecar.logs import configure_logging

log = logging.getLogger("golem_sidecar")
# How long shutdown waits for the model thread after the last call has ended.
_WORKER_WAIT_S = 2.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="golem-sidecar", description=__doc__)
    parser.add_argument("--listen", help="address to serve on: HOST:PORT or unix:/path.sock")
    parser.add_argument("--config", help="golem's JSON config file")
    parser.add_argument("--config-json", help="golem's config as a JSON string")
    return parser.parse_args(argv)


async def _serve(config: SidecarConfig) -> int:
    # Imported here so a bad config is reported before torch takes seconds to import.
    from golem_sidecar.server import Sidecar

    sidecar = Sidecar(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        starting = asyncio.create_task(sidecar.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stopping
        else:
            starting.cancel()
    except GolemError as err:
        log.error(
            "default model could not be loaded", extra={"reason": err.reason, "error": err.message}
        )
        await sidecar.stop(0)
        return 1
    except Exception:
        log.exception("sidecar failed to start")
        await sidecar.stop(0)
        return 1
    grace_s = config.limits.shutdown_grace_ms / 1000
    log.info("sidecar stopping", extra={"grace_s": grace_s})
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, sidecar.gate.expire)
    await sidecar.stop(grace_s)
    if not await sidecar.engine.wait_idle(_WORKER_WAIT_S):
        # A model load cannot be interrupted, and Python would wait for it at exit.
        log.warning("model thread still busy; exiting without it")
        logging.shutdown()
        os._exit(0)
    log.info("sidecar stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parse_args(argv)
    try:
        config = load_config(args.config, args.config_json, args.listen)
    except (ConfigError, OSError) as exc:
        print(f"golem-sidecar: bad config: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    return asyncio.run(_serve(config))


if __name__ == "__main__":
    sys.exit(main())

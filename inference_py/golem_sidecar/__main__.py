"""``python -m golem_sidecar --listen ADDR [--config FILE | --config-json JSON]
[--exit-with-stdin] [--cleanup-dir DIR]``

Exits 0 after SIGTERM/SIGINT (calls in flight get limits.shutdownGraceMs to finish; a second
signal cuts that short), 2 for a bad config, and 1 when the default model cannot be loaded.
With --exit-with-stdin it also exits (0, at once, whatever the model thread is doing) when its
stdin reaches end of file: the gateway holds the other end, so that happens when the gateway
dies, even by SIGKILL. --cleanup-dir names a folder (the gateway's private socket folder) to
remove on every way out but SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
from typing import TYPE_CHECKING

from golem_sidecar.config import ConfigError, SidecarConfig, load_config
from golem_sidecar.environment import check_environment
from golem_sidecar.errors import GolemError
from golem_sidecar.logs import configure_logging, keep_stderr_from_failing

if TYPE_CHECKING:
    from golem_sidecar.server import Sidecar

log = logging.getLogger("golem_sidecar")
# How long shutdown waits for the model thread after the last call has ended.
_WORKER_WAIT_S = 2.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="golem-sidecar", description=__doc__)
    parser.add_argument("--listen", help="address to serve on: HOST:PORT or unix:/path.sock")
    parser.add_argument("--config", help="golem's JSON config file")
    parser.add_argument("--config-json", help="golem's config as a JSON string")
    parser.add_argument(
        "--exit-with-stdin",
        action="store_true",
        help="exit at once when stdin reaches end of file (the parent that holds it is gone)",
    )
    parser.add_argument("--cleanup-dir", help="a folder to remove on exit (the socket's folder)")
    return parser.parse_args(argv)


def _remove(folder: str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def _exit_when_stdin_closes(cleanup_dir: str | None) -> None:
    """Ends the process once stdin reaches end of file. A plain thread blocked in read() sees it
    even while the event loop or the model thread is busy; os._exit does not wait for either."""

    def watch() -> None:
        try:
            while os.read(sys.stdin.fileno(), 4096):
                pass
        except OSError:
            pass
        # Exiting matters more than the line saying so.
        with contextlib.suppress(Exception):
            log.warning("the gateway is gone (stdin closed): exiting now")
        _remove(cleanup_dir)
        os._exit(0)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def _refuse_hub_downloads_unless_allowed(config: SidecarConfig) -> None:
    # huggingface_hub and transformers read these once, at import: set them before either is.
    if not config.security.allow_hub_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _log_hub_policy(config: SidecarConfig) -> None:
    from huggingface_hub import constants

    # What the library itself believes, not what we meant: the two would differ if it had been
    # imported before the variables were set.
    log.info(
        "hub downloads",
        extra={
            "allowed": config.security.allow_hub_downloads,
            "hf_hub_offline": bool(constants.HF_HUB_OFFLINE),
        },
    )


async def _serve(config: SidecarConfig, cleanup_dir: str | None) -> int:
    # Imported here so a bad config is reported before torch takes seconds to import.
    from golem_sidecar.server import Sidecar
    from golem_sidecar.tracing import tracer_provider

    provider = tracer_provider(config.tracing)
    try:
        return await _serve_sidecar(Sidecar(config, provider), config, cleanup_dir)
    finally:
        # Flushes the spans still batched; the stdin watch's os._exit skips it (and so loses them).
        if provider is not None:
            provider.shutdown()


async def _serve_sidecar(sidecar: Sidecar, config: SidecarConfig, cleanup_dir: str | None) -> int:
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
        _remove(cleanup_dir)
        os._exit(0)
    log.info("sidecar stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    keep_stderr_from_failing()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parse_args(argv)
    if args.exit_with_stdin:
        _exit_when_stdin_closes(args.cleanup_dir)
    try:
        return _run(args)
    finally:
        _remove(args.cleanup_dir)


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.config_json, args.listen)
        check_environment(config.engines)
    except (ConfigError, OSError) as exc:
        print(f"golem-sidecar: bad config: {exc}", file=sys.stderr)
        return 2
    _refuse_hub_downloads_unless_allowed(config)
    configure_logging(config.log_level)
    _log_hub_policy(config)
    return asyncio.run(_serve(config, args.cleanup_dir))


if __name__ == "__main__":
    sys.exit(main())

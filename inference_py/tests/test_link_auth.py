"""The bearer token a sidecar apart from its gateway asks for (sidecar.authTokenEnv): every
ExamService method needs it, health does not, and the token never reaches the log."""

from __future__ import annotations

import logging
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from golem_sidecar.auth import BearerCheck
from golem_sidecar.config import Link
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc, metrics_pb2, metrics_pb2_grpc
from golem_sidecar.server import Sidecar
from tests.conftest import tiny_config
from tests.rpc import failure

TOKEN = "sidecar-token-that-must-never-be-logged"
TOKEN_ENV = "GOLEM_TEST_SIDECAR_TOKEN"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize(
    "metadata",
    [(), bearer("wrong"), bearer(TOKEN + "x"), (("authorization", TOKEN),), bearer(TOKEN[:-1])],
)
def test_a_missing_or_wrong_token_is_unauthenticated(
    metadata: tuple[tuple[str, str], ...],
) -> None:
    with pytest.raises(Exception) as caught:
        BearerCheck(TOKEN).verify(metadata)
    assert getattr(caught.value, "code", None) == grpc.StatusCode.UNAUTHENTICATED


def test_the_right_token_passes_in_any_case_of_the_scheme() -> None:
    BearerCheck(TOKEN).verify((("authorization", f"bearer {TOKEN}"),))


def test_no_token_in_the_environment_asks_for_none() -> None:
    assert BearerCheck.from_environment(TOKEN_ENV, {}) is None
    assert BearerCheck.from_environment(TOKEN_ENV, {TOKEN_ENV: ""}) is None


async def test_every_exam_method_needs_the_token_and_health_does_not(
    tiny: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    config = replace(tiny_config(tiny), preload=False, link=Link(auth_token_env=TOKEN_ENV))
    caplog.set_level(logging.DEBUG)
    sidecar = Sidecar(config)
    await sidecar.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            stub = exam_pb2_grpc.ExamServiceStub(channel)
            for metadata in ((), bearer("wrong")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ListAdapters(exam_pb2.ListAdaptersRequest(), metadata=metadata)
                got = failure(refused.value)
                assert (got.code, got.reason) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "UNAUTHENTICATED",
                )
            # A streaming method goes through the same check, before its request is parsed.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.StreamExam(exam_pb2.TakeExamRequest(), metadata=bearer("x")):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            listing = await stub.ListAdapters(
                exam_pb2.ListAdaptersRequest(), metadata=bearer(TOKEN)
            )
            assert list(listing.adapters) == []
            # The gateway's metrics scrape names models and adapter paths: token too.
            metrics = metrics_pb2_grpc.SidecarMetricsServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await metrics.Scrape(metrics_pb2.ScrapeRequest(), metadata=bearer("wrong"))
            assert failure(refused.value).reason == "UNAUTHENTICATED"
            scraped = await metrics.Scrape(metrics_pb2.ScrapeRequest(), metadata=bearer(TOKEN))
            assert "vllm:num_requests_waiting" in scraped.text
            # Probes carry no token.
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await sidecar.stop(0)
    security = [r for r in caplog.records if r.getMessage() == "sidecar security"]
    assert [(r.bearer_auth, r.token_env) for r in security] == [(True, TOKEN_ENV)]  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if TOKEN in str(r.__dict__)]

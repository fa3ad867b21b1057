"""Health tells the truth: a tier whose engine workers are all gone is NOT_SERVING."""

import os
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.server_config import ServerConfig
from cloud.service import ServerThread, TierSpec


def test_a_tier_with_no_live_worker_reports_not_serving(device_family):
    """Catches: health answering SERVING (overall and for flow.v1.Tier) while every call fails
    UNAVAILABLE because no engine worker is left, so a load balancer keeps sending devices."""
    family_dir, family = device_family
    thread = ServerThread(TierSpec(family_dir, 0, None, ServerConfig(port=0), workers=1), family)
    address = thread.start()
    try:
        channel = grpc.insecure_channel(address)
        health = health_pb2_grpc.HealthStub(channel)

        def statuses():
            return [health.Check(health_pb2.HealthCheckRequest(service=name)).status
                    for name in ("", "flow.v1.Tier")]

        assert statuses() == [health_pb2.HealthCheckResponse.SERVING] * 2
        (worker,) = thread.server.service.engine.workers.values()
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while statuses() != [health_pb2.HealthCheckResponse.NOT_SERVING] * 2:
            assert time.monotonic() < deadline, statuses()
            time.sleep(0.2)
        channel.close()
    finally:
        thread.stop()

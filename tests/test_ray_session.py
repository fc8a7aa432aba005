"""The shared session Ray is a real local cluster that tests can run work on."""

from __future__ import annotations


def test_ray_session_runs_remote_work(ray_session):
    ray = ray_session

    @ray.remote
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    assert ray.cluster_resources()["CPU"] == 2


def test_ray_session_is_shared(ray_session):
    assert ray_session.is_initialized()

"""Local autoscaling end to end: `pagedserve router --autoscale` starts one `pagedserve serve`
replica, adds a second when the queue grows under load, drains and stops it once the load is gone,
and every request gets its full answer."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.serving.router_support import launch_router, wait_until

pytestmark = pytest.mark.slow


def test_scales_one_to_two_and_back_answering_every_request(tiny_llama_dir):
    model = str(tiny_llama_dir)
    serve_args = "--num-blocks 256 --block-size 4 --max-num-seqs 2 --max-queued-requests 64"
    with launch_router("--autoscale", "--model", model, "--serve-args", serve_args, "--min-replicas", "1",
                       "--max-replicas", "2", "--replica-threads", "1", "--target-queue", "1",
                       "--upscale-delay", "0.5", "--downscale-delay", "3", "--autoscale-interval", "0.25") as router:
        assert len(router.backends()) == 1
        stop = threading.Event()
        results: list[tuple[int, int]] = []

        def client(i: int) -> None:
            with httpx.Client(base_url=router.base_url, timeout=120) as c:
                while not stop.is_set():
                    r = c.post("/v1/completions", json={"model": model, "prompt": f"Load {i}:", "max_tokens": 150,
                                                        "ignore_eos": True})
                    results.append((r.status_code, r.json()["usage"]["completion_tokens"] if r.is_success else 0))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        try:
            # 8 clients on 2 seats: the queue grows, a second replica starts and takes requests.
            router.wait_for(lambda: sum(b["healthy"] for b in router.backends()) == 2, timeout=120,
                            what="a second replica serving")
            second = router.backends()[1]["url"]
            wait_until(lambda: router.decisions().get(second, 0) >= 2, timeout=60, what="the new replica used")
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        # Load gone: after the down delay one replica is drained and stopped.
        router.wait_for(lambda: len(router.backends()) == 1, timeout=60, what="back to one replica")
        decisions: dict[str, float] = {}
        for (name, labels), v in router.metrics().items():
            if name == "pagedserve_autoscaler_decisions_total":
                direction = dict(labels)["direction"]
                decisions[direction] = decisions.get(direction, 0) + v
        assert decisions.get("up", 0) >= 1 and decisions.get("down", 0) >= 1
        assert len(results) >= 8 and all(r == (200, 150) for r in results), results
        r = httpx.post(f"{router.base_url}/v1/completions", json={"model": model, "prompt": "after", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200

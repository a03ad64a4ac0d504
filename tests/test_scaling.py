"""Scaling out with plain replicas: two `mullama serve` processes on loopback behind nginx
(Debian's package; `.ci/run` installs it), configured as examples/replicas/nginx.conf. Killing a
replica mid-run loses no non-streamed request, a stream on the dead replica ends with an error its
client sees (never a hang), and SIGTERM drains: the replica refuses new work (503, so nginx sends it
elsewhere) while its requests in flight finish."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from mullama_server import MullamaServer
from upstream import free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "replicas" / "nginx.conf"
PROMPT = "The capital of France is"
BODY = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}


def nginx_binary() -> str:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it, so CI never skips this)")
    return binary


class Balancer:
    """nginx from the example's configuration, its ports replaced by the replicas' and its own."""

    def __init__(self, prefix: Path, replicas: list[MullamaServer]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        text = EXAMPLE.read_text()
        for default, replica in zip(("127.0.0.1:8081", "127.0.0.1:8082"), replicas):
            text = text.replace(default, f"127.0.0.1:{replica.port}")
        text = text.replace("listen 127.0.0.1:8080", f"listen 127.0.0.1:{self.port}")
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        (prefix / "nginx.conf").write_text(text)
        self.process = subprocess.Popen([nginx_binary(), "-p", str(prefix), "-c", "nginx.conf"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, self.process.stdout.read()
            time.sleep(0.1)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture()
def deployment(tmp_path):
    nginx_binary()
    # A drain deadline no busy machine reaches: the drain test checks what happens, not how fast.
    replicas = [MullamaServer("smollm2:135m", parallel=2, ctx_size=512, extra=("--drain-timeout", "900"))
                for _ in range(2)]
    balancer = Balancer(tmp_path, replicas)
    yield balancer, replicas
    balancer.close()
    for replica in replicas:
        if replica.process.poll() is None:
            replica.close()


def expected_text(url: str) -> str:
    response = httpx.post(f"{url}/v1/completions", json=BODY, timeout=120)
    assert response.status_code == 200
    return response.json()["choices"][0]["text"]


def test_killing_a_replica_loses_no_non_streamed_request(deployment):
    balancer, (first, second) = deployment
    expected = expected_text(second.url)
    done, lock = [0], threading.Lock()

    def client(_: int) -> list[tuple[int, str]]:
        answers = []
        with httpx.Client(timeout=120) as http:
            for _ in range(12):
                response = http.post(f"{balancer.url}/v1/completions", json=BODY)
                answers.append((response.status_code, response.json()["choices"][0]["text"]
                                if response.status_code == 200 else response.text))
                with lock:
                    done[0] += 1
        return answers

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        while done[0] < 12:
            time.sleep(0.02)
        first.process.send_signal(signal.SIGKILL)  # mid-run, with requests in flight on it
        answers = [answer for future in futures for answer in future.result()]
    assert len(answers) == 48
    assert answers == [(200, expected)] * 48  # every one answered, by the survivor when need be
    assert first.process.wait(10) == -signal.SIGKILL


def test_a_stream_on_a_dying_replica_ends_with_an_error_its_client_sees(deployment):
    """Killed once every stream has sent its client a token: nginx retries a request elsewhere only until
    the replica's response has begun (non_idempotent), so a stream killed before its first token (its
    prompt still decoding, though counted active) would just be answered by the other replica."""
    balancer, (first, _) = deployment
    outcomes: list[str] = []
    under_way = [threading.Event() for _ in range(4)]

    def stream(i: int) -> None:
        body = {"prompt": f"Story {i}:", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
        lines = []
        try:
            with httpx.stream("POST", f"{balancer.url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if line.startswith("data: {"):
                        under_way[i].set()
            outcomes.append("complete" if "data: [DONE]" in lines else "cut short")
        except httpx.TransportError:
            outcomes.append("error")
        finally:
            under_way[i].set()  # (a stream that failed at once does not keep the test waiting)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    assert all(event.wait(300) for event in under_way)  # (the bound only against a hang)
    assert first.get_json("/health")["active_streams"] > 0  # some of them stream from the first replica
    first.process.send_signal(signal.SIGKILL)
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)  # nobody hangs
    assert len(outcomes) == 4 and "complete" in outcomes  # the other replica's streams finish
    assert set(outcomes) - {"complete"}, outcomes  # the dead one's end visibly: cut short, or an error
    assert set(outcomes) <= {"complete", "cut short", "error"}


def test_sigterm_drains_a_replica_while_the_other_takes_new_work(deployment):
    balancer, (first, _) = deployment
    long_body = {"prompt": "Tell a long story:", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    result: dict = {}

    def in_flight() -> None:
        result["response"] = httpx.post(f"{first.url}/v1/completions", json=long_body, timeout=900)

    worker = threading.Thread(target=in_flight)
    worker.start()
    deadline = time.monotonic() + 300  # (only against a hang)
    while first.get_json("/health")["active_streams"] == 0:  # until the request is in the first replica's engine
        assert time.monotonic() < deadline, "the request never reached the first replica's engine"
        time.sleep(0.02)
    first.process.send_signal(signal.SIGTERM)
    # New work through the balancer is answered (by the other replica) while the first drains.
    for _ in range(4):
        response = httpx.post(f"{balancer.url}/v1/completions", json=BODY, timeout=120)
        assert response.status_code == 200
    worker.join(900)
    response = result["response"]
    assert response.status_code == 200, (response.text, "\n".join(first.log))  # the request in flight finished
    assert response.json()["usage"]["completion_tokens"] == 200
    assert first.process.wait(60) == 0  # then it exits cleanly


def test_health_says_live_and_ready(deployment):
    _, (first, _) = deployment
    assert first.get_json("/health/live") == {"status": "live"}
    ready = first.get_json("/health/ready")
    assert ready["status"] == "ok" and ready["loaded"] == ["smollm2:135m"]

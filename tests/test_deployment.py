"""Deployment checks that run here without a Docker engine: the compose file through a real
compose parser, the Dockerfile's key instructions, the Prometheus config through promtool, a
real Prometheus server scraping the service (started by the container's own entrypoint script),
and graceful SIGTERM."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it with apt-get; it could not here)")
    return path


def test_compose_file_parses_with_a_real_compose_implementation():
    compose = need("docker-compose")
    out = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    import yaml

    cfg = yaml.safe_load(out.stdout)
    api = cfg["services"]["api"]
    assert api["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "8000" in str(api["ports"]) and api["restart"] == "unless-stopped"
    assert "/ready" in " ".join(api["healthcheck"]["test"])
    grace = api["stop_grace_period"]
    assert int(str(grace).rstrip("s")) > int(api["environment"]["APP_DRAIN_TIMEOUT_S"])
    assert any("model_store" in str(v) for v in api["volumes"])
    assert cfg["services"]["train"]["profiles"] == ["train"]
    assert "prometheus" in cfg["services"]


def test_dockerfile_key_instructions():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert text.index("COPY pyproject.toml") < text.index("COPY app ./app")  # deps layer first
    assert re.search(r"^USER app$", text, re.M)
    assert "PYTHONUNBUFFERED=1" in text and re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"HEALTHCHECK[\s\S]*?/ready", text)
    assert "hellaswag-fetch-assets" in text  # assets at build time: the image runs offline
    assert 'ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".cache", "data/", "model_store/*/"} <= set(ignored)


def test_promtool_accepts_prometheus_config():
    promtool = need("promtool")
    out = subprocess.run([promtool, "check", "config", str(ROOT / "docker/prometheus/prometheus.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_dashboard_is_valid_json_with_the_promised_panels():
    dash = json.loads((ROOT / "docker/grafana/dashboards/hellaswag-serve.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for needle in ("llm_requests_total", "llm_request_latency_seconds_bucket", "llm_batch_size", "llm_queue_depth",
                   "llm_generated_tokens_total", "llm_cache_hits_total", "llm_device_memory_bytes"):
        assert needle in exprs


class EntrypointServer:
    """``docker/entrypoint.sh serve`` as a subprocess: the path the image and `make serve` use."""

    def __init__(self, store: Path, tmp: Path, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "APP_MODEL": "tiny",
            "APP_MODEL_STORE_DIR": str(store), "APP_DATA_DIR": str(tmp / "data"), "APP_PORT": str(self.port),
            "APP_HOST": "127.0.0.1", "APP_FETCH_ASSETS_ON_START": "false", "APP_DEVICE": "cpu", **env,
        }
        self.log = open(tmp / "server.log", "wb")

    def __enter__(self):
        self.proc = subprocess.Popen([str(ROOT / "docker/entrypoint.sh"), "serve"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server exited early"
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready")

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.mark.slow
def test_real_prometheus_scrapes_the_service(tiny_store, tmp_path):
    prometheus = need("prometheus")
    promtool = need("promtool")
    with EntrypointServer(tiny_store, tmp_path) as srv:
        for i in range(4):
            httpx.post(srv.url + "/generate", json={"prompt": f"hello {i}", "max_new_tokens": 4})
        metrics_text = httpx.get(srv.url + "/metrics").text
        check = subprocess.run([promtool, "check", "metrics"], input=metrics_text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        prom_port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hellaswag-api\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{srv.port}']\n"
        )
        prom = subprocess.Popen(
            [prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        api = f"http://127.0.0.1:{prom_port}/api/v1/query"
        try:
            def query(q):
                try:
                    return httpx.get(api, params={"query": q}, timeout=2).json()["data"]["result"]
                except (httpx.HTTPError, KeyError, ValueError):
                    return []

            deadline = time.monotonic() + 60
            up = []
            while time.monotonic() < deadline:
                up = query('up{job="hellaswag-api"}')
                if up and up[0]["value"][1] == "1" and query("llm_batch_size_bucket"):
                    break
                time.sleep(0.5)
            assert up and up[0]["value"][1] == "1"
            reqs = query('llm_requests_total{endpoint="/generate",status="200"}')
            assert reqs and float(reqs[0]["value"][1]) >= 4
            assert query('llm_batch_size_bucket{kind="decode"}')
        finally:
            prom.terminate()
            prom.wait(10)


@pytest.mark.slow
def test_sigterm_drains_in_flight_then_exits_zero(tiny_store, tmp_path):
    # One sequence at a time, so the in-flight work surely outlasts the checks made during the drain.
    with EntrypointServer(tiny_store, tmp_path, APP_DRAIN_TIMEOUT_S="20", APP_MAX_BATCH_SIZE="1") as srv:
        results = {}

        def long_request(i):
            r = httpx.post(srv.url + "/generate", json={"prompt": f"drain {i}", "max_new_tokens": 200, "cache": False}, timeout=60)
            results[i] = r.status_code

        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until they are in the engine
            from helpers import metric_value

            text = httpx.get(srv.url + "/metrics").text
            if (metric_value(text, "llm_running_sequences") or 0) + (metric_value(text, "llm_queue_depth") or 0) >= 6:
                break
            time.sleep(0.02)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late = httpx.post(srv.url + "/generate", json={"prompt": "late", "max_new_tokens": 2}, timeout=10)
        assert late.status_code == 503 and late.headers.get("retry-after")
        assert httpx.get(srv.url + "/ready", timeout=5).status_code == 503
        for t in threads:
            t.join(60)
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - started < 20 + 5
        assert results == {i: 200 for i in range(6)}  # in-flight work completed

"""`spa eval --api-base` against a real OpenAI-compatible server this project did not write: llama.cpp's (from
llama-cpp-python, serving the embedded model's GGUF file on a loopback port). `.ci/run` builds it into `.venv-llama`;
elsewhere these tests are skipped unless `SPA_REQUIRE_LLAMA=1` (then a missing server is a failure)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from spa_rl.api import RESPONSES_FILE, ApiConfig, ApiPolicy
from spa_rl.cli import main
from spa_rl.errors import SpaError
from spa_rl.evaluation import EvalConfig, evaluate
from spa_rl.io import read_jsonl
from spa_rl.models import EMBEDDED_MODELS

ROOT = Path(__file__).resolve().parents[1]
KEY = "spa-test-key"
pytest.importorskip("openai")


def _llama_python() -> str | None:
    """A Python that has llama-cpp-python's server: $SPA_LLAMA_PYTHON, the repo's .venv-llama, or this one."""
    for candidate in (os.environ.get("SPA_LLAMA_PYTHON"), str(ROOT / ".venv-llama" / "bin" / "python"), sys.executable):
        if candidate and Path(candidate).is_file() and subprocess.run(
                [candidate, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0:
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gguf() -> Path:
    module, name = EMBEDDED_MODELS["smollm2-135m"]
    return Path(importlib.util.find_spec(module).submodule_search_locations[0]) / name


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """llama.cpp's server on the embedded model, at a free loopback port, asking for the key `KEY`."""
    python = _llama_python()
    if python is None:
        if os.environ.get("SPA_REQUIRE_LLAMA") == "1":
            pytest.fail("SPA_REQUIRE_LLAMA=1 but no llama-cpp-python server: build it (see .ci/run)")
        pytest.skip("llama-cpp-python's server is not installed (.ci/run builds it into .venv-llama)")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("llama") / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(_gguf()), "--model_alias", "smollm2",
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--api_key", KEY,
                             "--n_threads", "2", "--verbose", "False"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama.cpp's server exited ({proc.returncode}): see {log.name}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("llama.cpp's server did not start within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("SPA_TEST_KEY", KEY)
    return ["--api-key-env", "SPA_TEST_KEY"]


SMALL = ["--env", "frozenlake-det", "--puzzles", "4", "--samples", "2", "--max-new-tokens", "48"]


def test_an_api_model_is_evaluated_like_a_local_one(server, key, tmp_path):
    """The same model through llama.cpp's server and loaded here: the same kind of results (every metric a local
    evaluation reports, the episodes written), and a format rate within sampling noise of the local one."""
    assert main(["eval", "--api-base", server, "--model", "smollm2", *key, *SMALL, "--out", str(tmp_path / "api")]) == 0
    assert main(["eval", *SMALL, "--out", str(tmp_path / "local")]) == 0
    api, local = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("api", "local"))
    assert api["config"]["backend"] == "api" and api["config"]["api_base"] == server
    assert api["episodes"] == local["episodes"] == 8
    assert set(local) - set(api) == {"mean_response_tokens"}, "every metric of a local evaluation but token counts"
    assert abs(api["format_rate"] - local["format_rate"]) <= 0.35, (api["format_rate"], local["format_rate"])
    episodes = read_jsonl(tmp_path / "api" / "trajectories.jsonl")
    assert len(episodes) == 8 and all(e["turns"] for e in episodes)
    assert any(t["response"].strip() for e in episodes for t in e["turns"]), "the server's model said something"
    answers = read_jsonl(tmp_path / "api" / RESPONSES_FILE)
    assert len(answers) == sum(len(e["turns"]) for e in episodes)


def test_an_interrupted_api_evaluation_asks_only_for_what_it_lacks(server, key, tmp_path, monkeypatch):
    """Killed after 5 answers, the rerun replays them from responses.jsonl and asks the server only for the rest;
    the finished directory is then not evaluated again."""
    import spa_rl.api as api_module

    made: list[ApiPolicy] = []
    real_init, real_ask = ApiPolicy.__init__, ApiPolicy._ask

    def init(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    calls = {"n": 0}

    def ask_then_die(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_ask(self, *a, **k)

    monkeypatch.setattr(api_module.ApiPolicy, "__init__", init)
    monkeypatch.setattr(api_module.ApiPolicy, "_ask", ask_then_die)
    config = EvalConfig.make(env="frozenlake-det", puzzles=4, samples=2, max_new_tokens=48, api_base=server,
                             model="smollm2", api_key_env="SPA_TEST_KEY", api_concurrency=1, out=str(tmp_path / "e"))
    with pytest.raises(KeyboardInterrupt):
        evaluate(config, quiet=True)
    kept = read_jsonl(tmp_path / "e" / RESPONSES_FILE)
    assert len(kept) == 5
    monkeypatch.setattr(api_module.ApiPolicy, "_ask", real_ask)
    faster = dataclasses.replace(config, api=dataclasses.replace(config.api, api_concurrency=4, api_timeout=300))
    metrics = evaluate(faster, quiet=True)  # how the answers are fetched may change on resume; what is asked not
    second = made[-1]
    turns = sum(len(e["turns"]) for e in read_jsonl(tmp_path / "e" / "trajectories.jsonl"))
    assert second.replayed == 5 and second.asked == turns - 5 and metrics["episodes"] == 8
    assert evaluate(config, quiet=True) == metrics and len(made) == 2, "finished: not asked again"


def test_the_servers_refusals_are_one_line_each(server, key, tmp_path, monkeypatch, capsys):
    cases = [
        (["--api-base", server, "--model", "no-such-model", *key], "serves no model 'no-such-model'"),
        (["--api-base", server, "--model", "smollm2", "--api-key-env", "SPA_WRONG_KEY"], "refused the key (401)"),
        (["--api-base", f"http://127.0.0.1:{_free_port()}/v1", "--model", "smollm2", "--api-retries", "0"],
         "cannot reach the API"),
        (["--api-base", "localhost:8000", "--model", "smollm2"], "is not a URL"),
    ]
    monkeypatch.setenv("SPA_WRONG_KEY", "wrong")
    for flags, message in cases:
        assert main(["eval", *flags, *SMALL, "--out", str(tmp_path / "refused")]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # a refused start lost nothing and blocks nothing: the corrected command runs in the same directory
    assert main(["eval", "--api-base", server, "--model", "smollm2", *key, *SMALL, "--api-timeout", "300",
                 "--out", str(tmp_path / "refused")]) == 0


class _NoText(BaseHTTPRequestHandler):
    """A server whose chat completions carry no text (as a tool-calling or broken model's can)."""

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": None}}]})

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_an_answer_with_no_text_is_one_line():
    """(This one server is ours: llama.cpp always answers with text.)"""
    httpd = HTTPServer(("127.0.0.1", 0), _NoText)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        policy = ApiPolicy(ApiConfig(api_base=f"http://127.0.0.1:{httpd.server_port}/v1"), "m")
        from spa_rl.generation import SamplingConfig

        with pytest.raises(SpaError, match="answered with no text"):
            policy.respond([(0, 0, [{"role": "user", "content": "hi"}])], SamplingConfig())
    finally:
        httpd.shutdown()

"""The endpoint backend: a canary and evaluate against a live server on 127.0.0.1.

A real llama-server (built from the vendored llama.cpp source by `make test`) on a tiny Qwen2 GGUF written here: the
endpoint canary matches the in-process llama.cpp canary on the same file, a server rendering another template is a
canary failure naming it, another model behind the URL is refused. Bad endpoints (a refused connection, a timeout,
HTTP 500, garbage JSON, a tokenizer that disagrees) come from small stdlib servers: each is one `error:` line, exit 2,
within a bounded time."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from emoscope.errors import EmoscopeError
from emoscope.models import load_model
from test_cli import _one_line_error, cli

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ fake servers
class _Fake(BaseHTTPRequestHandler):
    """Answers every request with what `self.server.answer(path, body)` returns: (status, bytes), or sleeps."""

    def _reply(self, body):
        self.server.calls.append(self.path)
        status, raw = self.server.answer(self.path, body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):  # noqa: N802
        self._reply(None)

    def do_POST(self):  # noqa: N802
        n = int(self.headers.get("Content-Length", 0))
        self._reply(json.loads(self.rfile.read(n) or b"{}"))

    def log_message(self, *args):
        pass


def _serve(answer):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    srv.answer, srv.calls, srv.daemon_threads = answer, [], True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


PROPS = {"chat_template": "", "bos_token": "", "default_generation_settings": {"n_ctx": 512}, "build_info": "fake"}
MODELS = {"data": [{"id": "fake.gguf", "meta": {"n_vocab": 320, "n_embd": 64, "ftype": "F32"}}]}


def _llama_like(path, body, tokens=None):
    """A well-formed llama-server answer for every route, with `tokens` from /tokenize."""
    answers = {"/props": PROPS, "/v1/models": MODELS, "/tokenize": {"tokens": tokens or [5, 6, 7]},
               "/detokenize": {"content": "x"}}
    return 200, json.dumps(answers.get(path, {})).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_is_one_line_after_bounded_retries(toy_data, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(EmoscopeError, match="cannot connect.*after 3 tries"):
        load_model(url, backend="endpoint")
    assert time.perf_counter() - t0 < 5  # 0.5 s + 1 s between the tries
    r = cli("evaluate", "--endpoint", url, "--dataset", toy_data, "--per-class", 1, "--out", tmp_path / "e")
    _one_line_error(r, "cannot connect")
    assert not (tmp_path / "e").exists()  # nothing half-written


def test_a_server_that_never_answers_times_out_within_the_stated_bound():
    done = threading.Event()

    def slow(path, body):
        done.wait(10)
        return 200, b"{}"
    srv, url = _serve(slow)
    try:
        t0 = time.perf_counter()
        with pytest.raises(EmoscopeError, match=r"no answer within 0.5 s \(after 3 tries\)"):
            load_model(url, backend="endpoint", timeout=0.5)
        assert time.perf_counter() - t0 < 3 * 0.5 + 1.5 + 1.5  # three timeouts, two pauses, slack
        assert len(srv.calls) == 3
    finally:
        done.set()
        srv.shutdown()


def test_http_500_is_retried_then_one_line_and_a_4xx_is_not_retried(toy_data, tmp_path):
    srv, url = _serve(lambda path, body: (500, b"model crashed\nstack..."))
    try:
        with pytest.raises(EmoscopeError, match="HTTP 500 model crashed"):
            load_model(url, backend="endpoint")
        assert len(srv.calls) == 3
        srv.answer, srv.calls[:] = (lambda path, body: (404, b"not found")), []
        r = cli("evaluate", "--endpoint", url, "--dataset", toy_data, "--per-class", 1, "--out", tmp_path / "e")
        _one_line_error(r, "HTTP 404 not found")
        assert len(srv.calls) == 1 and not (tmp_path / "e").exists()
    finally:
        srv.shutdown()


def test_garbage_json_and_answers_without_the_expected_fields_are_one_line(toy_data, tmp_path):
    srv, url = _serve(lambda path, body: (200, b"<html>hello</html>"))
    try:
        r = cli("evaluate", "--endpoint", url, "--dataset", toy_data, "--per-class", 1)
        _one_line_error(r, "the answer is not JSON ('<html>hello</html>')")
        srv.answer = lambda path, body: (200, b'{"data": []}')  # JSON, but not a llama-server's
        with pytest.raises(EmoscopeError, match="/v1/models: the answer has no data.0"):
            load_model(url, backend="endpoint")
        srv.answer = lambda path, body: (200, b'{"data": [{"meta": [1]}]}' if path == "/v1/models" else b"[]")
        with pytest.raises(EmoscopeError, match="is not a JSON object"):
            load_model(url, backend="endpoint")
        srv.answer = lambda path, body: (200, json.dumps({"data": [{"meta": {"n_vocab": "many"}}]}).encode()
                                         if path == "/v1/models" else b"{}")
        with pytest.raises(EmoscopeError, match="no vocabulary size"):
            load_model(url, backend="endpoint")
    finally:
        srv.shutdown()


def test_a_tokenizer_that_disagrees_is_refused():
    srv, url = _serve(_llama_like)  # /tokenize answers [5, 6, 7] whatever the text
    try:
        lm = load_model(url, backend="endpoint")
        assert lm.supports == {"score", "check_tokens"} and lm.d_model == 64 and len(lm.tokenizer) == 320
        with pytest.raises(EmoscopeError, match="tokenizes a prompt differently .* at token 1 of 3"):
            lm.check_tokens(["a prompt"], [[5, 9, 7]], [" joy"], [[5, 6, 7]])
        with pytest.raises(EmoscopeError, match="tokenizes the label ' joy' differently"):
            lm.check_tokens(["a prompt"], [[5, 6, 7]], [" joy"], [[8]])
        with pytest.raises(EmoscopeError, match="cannot read the residual stream"):
            lm.score_ids([[1, 2]], [[3]], resid_layers=[0])
    finally:
        srv.shutdown()


def test_endpoint_settings_are_checked(toy_data):
    with pytest.raises(EmoscopeError, match="backend endpoint needs the server's URL"):
        load_model("model.gguf", backend="endpoint")
    r = cli("evaluate", "--endpoint", "http://127.0.0.1:1", "--model", "x.gguf", "--dataset", toy_data)
    _one_line_error(r, "--endpoint is the model")
    r = cli("canary", "check", REPO, "--endpoint", "ftp://x")
    assert r.returncode == 2


# ------------------------------------------------------------------------------------------ a real llama-server
@pytest.fixture(scope="module")
def server_binary():
    found = os.environ.get("EMOSCOPE_LLAMA_SERVER") or shutil.which("llama-server") or \
        next((str(p) for p in [REPO / ".venv/bin/llama-server"] if p.exists()), None)
    if found is None:
        if os.environ.get("CI"):  # make test builds it: on CI its absence is a failure, not a skip
            pytest.fail("llama-server is not built (make test builds it from the vendored llama.cpp source)")
        pytest.skip("llama-server is not built (make llama-server)")
    return found


class Server:
    """A llama-server on 127.0.0.1 serving `gguf`, up when /health answers 200; stopped on exit."""

    def __init__(self, binary, gguf, *extra):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # never a pipe: a full pipe would block the server's logging
        self.proc = subprocess.Popen([binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
                                      "-t", "2", "-c", "1024", "-np", "1", "--no-webui", *map(str, extra)],
                                     stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"llama-server exited: {self.log.read()[-2000:].decode(errors='replace')}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("llama-server did not come up within 60 s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory):
    """Anger, joy (one token each in this vocabulary) and surprise (two): a random model ranks label tokens anywhere,
    so most take a whole-vocabulary request (4.6 MB of JSON here); three labels keep the tests short."""
    import csv
    path = tmp_path_factory.mktemp("toy3") / "toy3.csv"
    words = {"anger": "furious", "joy": "happy", "surprise": "amazed"}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i in range(150):
            lab = list(words)[i % 3]
            w.writerow([f"r{i}", f"I feel {words[lab]} about thing {i}", lab])
    return path


@pytest.fixture(scope="module")
def qwen_canary(tmp_path_factory, three_labels):
    """A tiny Qwen2 GGUF (Qwen's chat template with its default system prompt), audited in PyTorch, its canary."""
    pytest.importorskip("llama_cpp")
    import torch

    import emoscope as es
    from emoscope.sae import SAE, SAEConfig
    from emoscope.stages.audit import AuditConfig, audit
    from tiny import tiny_gguf

    d = tmp_path_factory.mktemp("endpoint")
    path = tiny_gguf(d / "tiny-qwen2.gguf", arch="qwen2", n_layers=2)
    ref = load_model(str(path))
    task = es.Task(ref, dataset=str(three_labels), per_class=6)
    ev = es.evaluate(task)
    assert any(len(ids) > 1 for ids in task.label_ids) and ev["labels"] == ["anger", "joy", "surprise"]
    torch.manual_seed(0)
    hooks = {f"blocks.{la}.hook_resid_post": SAE(SAEConfig(d_in=ref.d_model, d_sae=128, k=16,
                                                           hook_name=f"blocks.{la}.hook_resid_post"))
             for la in range(ref.n_layers)}
    causal = {lab: [[1, 3 * i]] for i, lab in enumerate(ev["labels"])}
    acfg = AuditConfig.model_validate({"candidates": [{"name": "int8", "precision": "int8"}],
                                       "causal_features": causal, "n_boot": 100, "ablation_per_emotion": 2})
    out = audit(task, hooks, ev, None, None, acfg)
    folder = es.canary.write(task, hooks, ev, out, config={"n": 8}).save(d / "canary")
    return path, folder


def test_the_endpoint_canary_matches_the_in_process_canary(server_binary, qwen_canary, tmp_path, monkeypatch):
    """bench/endpoint.py on the canary's own file: llama-server over HTTP and llama.cpp in-process give the same
    verdict, flips and predicted flip rate, the same calibrated label log-probs (to llama.cpp's batch-order round-off,
    as between llama.cpp and PyTorch in test_llamacpp: one sequence per request in the server, shared-prefix batches
    in-process; 0.012 on this random-weight model), no template drift, and the feature half unchecked over HTTP."""
    import runpy
    import sys

    path, folder = qwen_canary
    bench = REPO / "bench" / "endpoint.py"
    out = tmp_path / "fig.json"
    monkeypatch.setattr(sys, "argv", [str(bench), str(folder), "--gguf", str(path), "--server", server_binary,
                                      "--threads", "2", "--repeat", "1", "--json", str(out)])
    runpy.run_path(str(bench), run_name="__main__")
    fig = json.loads(out.read_text())
    assert fig["endpoint_check_s"] > 0 and fig["inprocess_check_s"] > 0 and fig["endpoint_template_drift"] == 0
    assert fig["endpoint_passed"] == fig["inprocess_passed"] and fig["endpoint_flips"] == fig["inprocess_flips"]
    assert fig["endpoint_predicted_flip_rate"] == fig["inprocess_predicted_flip_rate"]
    assert fig["max_abs_cal_diff"] < 0.03
    assert (fig["endpoint_unchecked"], fig["inprocess_unchecked"]) == ("features", "")
    assert fig["endpoint_requests"] >= 8 * 2  # every canary example, each with a two-token label


def test_a_server_with_another_template_fails_the_canary_naming_it(server_binary, qwen_canary, tmp_path):
    import emoscope as es

    path, folder = qwen_canary
    from tiny import QWEN_CHAT
    other = QWEN_CHAT.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                              "You are a support agent.")
    assert other != QWEN_CHAT
    (tmp_path / "t.jinja").write_text(other)
    with Server(server_binary, path, "--chat-template-file", tmp_path / "t.jinja") as srv:
        res = es.canary.check(load_model(srv.url, backend="endpoint"), folder)
        assert not res.passed and "template" in res.drifted
        assert res.template[0].startswith("chat template: sha256:")
        assert "system prompt or instruction before the text" in res.template[1]
        assert "You are a support agent." in res.template[1]
        r = cli("canary", "check", folder, "--endpoint", srv.url, "--json")
        assert r.returncode == 1, r.stderr
        got = json.loads(r.stdout)
        assert "template" in got["drifted"] and got["unchecked"] == ["features"] and got["template"] == res.template
    # llama-server's built-in approximation of the template (--no-jinja) drops Qwen's default system prompt
    from emoscope.canary import Canary, _task_on, template_drift
    canary = Canary.load(folder)
    with Server(server_binary, path, "--no-jinja") as srv:
        drift = template_drift(canary, _task_on(canary, load_model(srv.url, backend="endpoint")))
        assert len(drift) == 1 and "before the text" in drift[0] and "You are Qwen" in drift[0]


def test_another_model_behind_the_url_is_refused(server_binary, qwen_canary, three_labels, tmp_path):
    from tiny import tiny_gguf

    _, folder = qwen_canary
    narrow = tiny_gguf(tmp_path / "narrow.gguf", arch="qwen2", n_layers=2, d=32)
    with Server(server_binary, narrow) as srv:
        r = cli("canary", "check", folder, "--endpoint", srv.url)
        _one_line_error(r, "has width 32, the canary's reference")
        # evaluate needs scores alone: it runs on any served model, writing its result
        r = cli("evaluate", "--endpoint", srv.url, "--dataset", three_labels, "--per-class", 1, "--out",
                tmp_path / "e", "--json")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["n"] == 3 and got["model"]["runtime"] == "llama-server" and got["model"]["d_model"] == 32
        assert (tmp_path / "e" / "evaluate" / "result.json").exists()


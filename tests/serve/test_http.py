"""`sdtrt serve`'s entry points and HTTP edge, on the real CLI in a subprocess (uvicorn on loopback, the tiny fp32
export): a server that cannot start says why in one line and exits 2 before it listens; the startup line names where
it listens once it does; uvicorn's access log; bodies that arrive too slowly, shorter than they said, too big, not
UTF-8 or not JSON get each protocol's error shape; a client that goes away is one log line; SIGTERM/SIGINT let the
request in flight finish and exit 0."""

import base64
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image

LISTENING = re.compile(r"^sdtrt serve: listening on http://127\.0\.0\.1:(\d+) \(model tiny, backend "
                       r"CPUExecutionProvider, A1111 /sdapi/v1 \+ OpenAI /v1/images\)$")
A1111, OPENAI = "/sdapi/v1/txt2img", "/v1/images/generations"


def serve(folder, *extra, tmp_path):
    """``sdtrt serve FOLDER --port 0 ...`` with its stdout/stderr in files: (process, url, stdout file, stderr file),
    once the startup line says where it listens."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "serve", str(folder), "--port", "0", "--backend",
                                 "onnxruntime-cpu", *extra], stdout=o, stderr=e, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        lines = err.read_text().splitlines()
        if lines:
            match = LISTENING.match(lines[0])
            assert match and len(lines) == 1, lines  # one line, and only once it listens
            return proc, f"http://127.0.0.1:{match[1]}", out, err
        assert proc.poll() is None, err.read_text()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("no startup line")


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def server(tiny_fp32, tmp_path_factory):
    proc, url, out, err = serve(tiny_fp32[0], "--body-timeout", "1", tmp_path=tmp_path_factory.mktemp("serve_http"))
    yield url, out, err
    stop(proc)


def test_a_server_that_cannot_start_says_why_in_one_line_and_exits_2(tiny_fp32, tmp_path):
    good = tiny_fp32[0]
    broken = {}
    for name in ("corrupt_data", "truncated_manifest"):
        broken[name] = tmp_path / name
        shutil.copytree(good, broken[name])
    data = broken["corrupt_data"] / "unet.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 8] = b"\x7f" * 8  # same size: only the hash can tell
    data.write_bytes(raw)
    manifest = (good / "manifest.json").read_bytes()
    (broken["truncated_manifest"] / "manifest.json").write_bytes(manifest[:len(manifest) // 3])
    cases = {
        "corrupt .onnx.data": ([broken["corrupt_data"]], "unet.onnx.data: its sha256 differs from manifest.json"),
        "truncated manifest": ([broken["truncated_manifest"]], "manifest.json is not valid JSON"),
        "missing folder": ([tmp_path / "nothere"], "does not exist"),
        "bogus backend": ([good, "--backend", "bogus"], "argument --backend: invalid choice: 'bogus'"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "sdtrt", "serve", *map(str, argv)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in cases.items()}
    results = {name: (p.wait(120), *p.communicate()) for name, p in procs.items()}
    for name, (code, out, err) in results.items():
        assert (code, out, len(err.splitlines())) == (2, "", 1), (name, code, err)
        assert err.startswith("sdtrt serve: error: ") and cases[name][1] in err, (name, err)


def test_more_of_those_kinds_in_process(cli, tiny_fp32, tmp_path):
    from sdtrt.serve import ServeConfig, ray_configs

    garbage, no_tokenizer = tmp_path / "garbage", tmp_path / "no_tokenizer"
    shutil.copytree(tiny_fp32[0], garbage)
    (garbage / "manifest.json").write_bytes(b"\x00\xff" * 100)
    shutil.copytree(tiny_fp32[0], no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken:
        code, out, err = cli("serve", tiny_fp32[0], "--port", taken.getsockname()[1])
    assert (code, out) == (2, "") and err.startswith("sdtrt serve: error: cannot listen on 127.0.0.1:") and \
        "Address already in use" in err, err
    for folder, message in ((garbage, "manifest.json"), (no_tokenizer, "tokenizer"),
                            (tiny_fp32[0] / "manifest.json", "is a file, not a folder")):
        code, out, err = cli("serve", folder)
        assert (code, out, len(err.splitlines())) == (2, "", 1) and message in err, err
    from sdtrt.runtime.backends import available_backends

    for backend in sorted({"tensorrt", "onnxruntime-cuda"} - set(available_backends())):  # a name, but not here
        code, out, err = cli("serve", tiny_fp32[0], "--backend", backend)
        assert (code, out, len(err.splitlines())) == (2, "", 1) and err.startswith("sdtrt serve: error: "), err
    for argv, message in ((["--port", "70000"], "must be 1..65535"), (["--port", "65536"], "must be 1..65535"),
                          (["--port", "-1"], "must be 1..65535"),
                          (["--port", "http"], "expected a TCP port"),
                          (["--port", "1e3"], "expected a TCP port"),
                          (["--api-key", ""], "--api-key is blank"), (["--api-key", "\t"], "--api-key is blank"),
                          (["--api-key", "s3cret "], "--api-key contains ' '"),
                          (["--api-key", "sécret"], "--api-key contains 'é'"),
                          (["--api-auth", "ann: "], "--api-auth takes USER:PASS"),
                          (["--api-auth", " :pw"], "--api-auth takes USER:PASS"),
                          (["--body-timeout", "0"], "--body-timeout must be positive"),
                          (["--body-timeout", "-1"], "--body-timeout must be positive"),
                          (["--ray", "--port", "0"], "--ray needs a fixed --port"),
                          (["--ray", "--no-access-log"], "--no-access-log is an option of the server without --ray")):
        code, out, err = cli("serve", tiny_fp32[0], *argv)
        assert (code, out, len(err.splitlines())) == (2, "", 1) and message in err, (argv, err)
    # the library's config, as Ray's application builder and other callers make it, checks the same
    for bad in ({"backend": "bogus"}, {"port": 70000}, {"port": -1}, {"api_key": " "}, {"body_timeout_s": 0.0}):
        with pytest.raises(Exception, match="backend|port|api-key|body-timeout"):
            ServeConfig(folder="x", **bad).check()
    with pytest.raises(Exception, match="unknown backend 'bogus'"):
        ray_configs({"folder": "/x", "backend": "bogus", "api_key": "k"})


def test_the_startup_line_names_where_it_listens_and_each_request_has_an_access_log_line(server):
    url, out, err = server
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.post(f"{url}{A1111}", json={"steps": "many"}).status_code == 422
    time.sleep(0.2)
    log = out.read_text()
    assert re.search(r'127\.0\.0\.1:\d+ - "GET /health HTTP/1\.1" 200', log), log
    assert re.search(r'"POST /sdapi/v1/txt2img HTTP/1\.1" 422', log), log
    assert "Traceback" not in err.read_text()


def _raw(url: str, path: str, body: bytes, declared: int, pause_s: float = 0.0, chunk: int = 0, close: str = ""):
    """POST ``body`` over a plain socket, declaring ``declared`` bytes, ``chunk`` bytes every ``pause_s`` (0: all at
    once); then read the answer until the server closes. (status, headers, JSON body, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    t = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {declared}\r\n{close}\r\n".encode())
        pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
        for piece in pieces:
            try:
                s.sendall(piece)
            except OSError:
                break
            s.settimeout(pause_s or 0.01)
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break  # the server answered already
            except (socket.timeout, BlockingIOError):
                pass
        s.settimeout(10)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:  # a byte sent just after the server's answer and close: the answer is lost
            if not data:
                return None, "", {}, time.monotonic() - t
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode().lower(), json.loads(payload), time.monotonic() - t


def test_a_body_that_is_too_slow_or_shorter_than_declared_is_cut_off_after_the_timeout(server):
    url, _, _ = server
    body = json.dumps({"prompt": "a cat", "steps": 2, "width": 64, "height": 64}).encode()
    clients = {  # (path, bytes sent, bytes declared, seconds between pieces, piece size)
        "1 byte/s, A1111": (A1111, body, len(body), 1.0, 1),
        "1 byte/s, OpenAI": (OPENAI, body, len(body), 1.0, 1),
        "short, A1111": (A1111, body, len(body) + 40, 0, 0),
        "short, OpenAI": (OPENAI, body[:10], len(body), 0, 0),
        "in time, in 3 pieces": (A1111, body, len(body), 0.2, len(body) // 3 + 1, "Connection: close\r\n"),
    }
    got = {}
    threads = [threading.Thread(target=lambda k=k, a=a: got.__setitem__(k, _raw(url, *a))) for k, a in clients.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(got) == set(clients), got
    for name, (status, head, answer, seconds) in got.items():
        if name == "in time, in 3 pieces":
            assert status == 200 and answer["images"], answer
            continue
        if status is None and "byte/s" in name:  # reset: cut off, its answer lost to a byte sent meanwhile
            assert 0.9 < seconds < 4, (name, seconds)
            continue
        # cut off: answered, and the connection closed by the server (the client would still send)
        assert status == 408 and 0.9 < seconds < 4 and "connection: close" in head, (name, status, seconds, head)
        message = "the request body did not arrive within 1 s"
        if "OpenAI" in name:
            assert answer["error"]["code"] == "body_timeout" and message in answer["error"]["message"], answer
        else:
            assert answer["error"] == "body_timeout" and message in answer["detail"], answer
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_body_over_the_limit_without_a_content_length_is_refused(server):
    url, _, _ = server
    host, port = url.removeprefix("http://").split(":")
    piece = b"x" * 2**20
    with socket.create_connection((host, int(port)), timeout=30) as s:  # chunked: no size declared up front
        s.sendall(f"POST {A1111} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(32):  # ServeConfig.max_body_mb, then 1 KB more
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        s.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"413", head
    assert json.loads(payload) == {"error": "too_large", "detail": "the body is over this server's limit of 32 MB"}
    assert httpx.get(f"{url}/health").status_code == 200


def test_json_with_a_utf8_byte_order_mark_is_read_as_python_and_fastapi_read_it(server):
    url, _, _ = server
    body = "\ufeff" + json.dumps({"prompt": "a café", "steps": 2, "width": 64, "height": 64, "seed": 3})
    r = httpx.post(f"{url}{A1111}", content=body.encode("utf-8"), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.text["parameters"].startswith("a café\n")


def test_a_client_that_goes_away_leaves_one_log_line(server):
    url, _, err = server
    before = len(err.read_text().splitlines())
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:  # mid-body
        s.sendall(f"POST {A1111} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 100\r\n\r\n{{\"prompt\"".encode())
        time.sleep(0.3)
    # long enough to be running when the client leaves, on an idle machine too (a 20-step 128x128 tiny image was
    # done, and answered to the still-open socket, within the client's 0.5 s)
    body = json.dumps({"prompt": "slow", "steps": 150, "width": 256, "height": 256}).encode()
    with socket.create_connection((host, int(port))) as s:  # while its image is made
        s.sendall(f"POST {A1111} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
    deadline = time.time() + 60
    while len(err.read_text().splitlines()) < before + 2 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    new = err.read_text().splitlines()[before:]
    assert "Traceback" not in err.read_text(), new
    assert "went away while sending POST /sdapi/v1/txt2img (9 of 100 body bytes)" in new[0], new
    assert len(new) == 2 and "went away before its answer to POST /sdapi/v1/txt2img" in new[1], new
    assert httpx.get(f"{url}/health").status_code == 200


NOT_JSON = {  # body, content type, what the message says
    "not JSON": (b"{not json", "application/json", "body is not valid JSON: Expecting property name enclosed in "
                                                   "double quotes at line 1 column 2"),
    "cut-off JSON": (b'{"prompt": "a cat", "steps": 2', "application/json",
                     "body is not valid JSON: Expecting ',' delimiter at line 1 column 31"),
    "Latin-1": ('{"prompt": "café"}'.encode("latin-1"), "application/json",
                "body is not UTF-8: byte 0xe9 at offset 15"),
    "UTF-16": ('{"prompt": "a"}'.encode("utf-16"), "application/json", "UTF-16 byte order mark"),
    "nested": (b"[" * 100_000 + b"]" * 100_000, "application/json", "nested too deeply"),
    "form": (b'{"prompt": "a"}', "application/x-www-form-urlencoded",
             "the body is application/x-www-form-urlencoded, not JSON"),
}


@pytest.mark.parametrize("kind", NOT_JSON)
def test_a_body_that_is_not_utf8_json_gets_the_protocols_error_shape(server, kind):
    url, _, _ = server
    body, content_type, message = NOT_JSON[kind]
    r = httpx.post(f"{url}{A1111}", content=body, headers={"content-type": content_type})
    assert r.status_code == 422 and r.json()["error"] == "invalid_body" and message in r.json()["detail"], r.text
    r = httpx.post(f"{url}{OPENAI}", content=body, headers={"content-type": content_type})
    error = r.json()["error"]
    assert r.status_code == 400 and message in error.pop("message"), r.text
    assert error == {"type": "invalid_request_error", "param": None, "code": "invalid_body"}, r.text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_lets_the_request_in_flight_finish_then_exits_0(tiny_fp32, tmp_path, sig):
    proc, url, out, err = serve(tiny_fp32[0], "--no-access-log", tmp_path=tmp_path)
    try:
        answer = {}
        body = {"prompt": "in flight", "steps": 10, "width": 128, "height": 128, "seed": 1}
        client = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{url}{A1111}", json=body, timeout=120)))
        client.start()
        while httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"] == 0:
            time.sleep(0.02)
        proc.send_signal(sig)  # while the request waits or runs
        client.join()
        assert proc.wait(60) == 0
    finally:
        stop(proc)
    assert answer["r"].status_code == 200 and len(answer["r"].json()["images"]) == 1
    lines = err.read_text().splitlines()
    assert len(lines) == 2 and f"{sig.name}: stopping; 1 request(s) in flight finish first" in lines[1], lines
    assert out.read_text() == ""  # --no-access-log


def test_localhost_binds_ipv4_even_where_hosts_lists_ipv6_first(monkeypatch):
    """Debian's /etc/hosts names ::1 localhost first; clients call http://127.0.0.1:7860 (uvicorn binds IPv4 too)."""
    import socket

    from sdtrt.serve.http import bind

    real = socket.getaddrinfo

    def hosts_with_ipv6_first(host, port, family=0, *a, **k):
        found = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                 (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        if host != "localhost":
            return real(host, port, family, *a, **k)
        return [f for f in found if family in (0, f[0])]

    monkeypatch.setattr(socket, "getaddrinfo", hosts_with_ipv6_first)
    sock = bind("localhost", 0)
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()

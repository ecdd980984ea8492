"""Attack groups on the request edge: schema fuzzing, hand-made bodies (HTTP and gRPC), slow clients.

Each group takes the `Lab` of bench/attack_adapters.py and returns report rows.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
import threading
import time
from collections import Counter
from typing import Any

from bench.attack_adapters import Lab
from bench.attack_report import MAX_MESSAGE_CHARS, Row, verdict
from bench.attack_server import GOOD_PROMPT
from loramux.v1 import inference_pb2 as pb

DOCUMENTED_5XX = {"501", "503", "504"}
REFUSED = ("suffix", "tools")  # fields loramux refuses (400): removed to reach generation

# -- 3. HTTP fuzzing ----------------------------------------------------------------------------


def _steer(case: Any, base_id: str) -> None:
    """Like tests/test_http_fuzz.py: most requests name a real model; token counts stay small."""
    body = case.body
    if isinstance(body, dict):
        model = body.get("model")
        if isinstance(model, str) and len(model) % 4 != 3:
            body["model"] = base_id if len(model) % 2 == 0 else "good"
            if len(model) % 4 != 0:  # and past the refusals of unsupported fields and roles, to generate
                for refused in REFUSED:
                    body.pop(refused, None)
                messages = body.get("messages")  # negative cases send any JSON value here
                for message in messages if isinstance(messages, list) else []:
                    if isinstance(message, dict) and isinstance(message.get("role"), str):
                        message["role"] = "user"
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 4 < value <= 256:
                body[key] = 4
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and 2 < n <= 16:
            body["n"] = 2


def http_fuzzing(lab: Lab, volume: int, base_id: str) -> list[Row]:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(lab.server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    per_run = max(1, math.ceil(volume / (2 * len(operations))))
    statuses: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    examples: dict[str, str] = {}  # the first request body of each finding
    headers = lab.probe.headers("admin")
    started = time.monotonic()
    for operation, mode in itertools.product(operations, GenerationMode):
        where = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=per_run, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)  # fmt: skip
        def fuzz(case: Any) -> None:
            _steer(case, base_id)
            try:
                response = case.call(headers=headers, timeout=30)
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a finding, not a crash of the probe
                statuses["no answer"] += 1
                problems[f"{where}: no answer ({type(exc).__name__})"] += 1  # noqa: B023 - run at once
                return
            status = str(response.status_code)
            statuses[status] += 1
            place = where  # noqa: B023 - fuzz() runs inside this loop iteration
            if response.status_code >= 500 and status not in DOCUMENTED_5XX:
                problems[f"{place}: {status}"] += 1
                examples.setdefault(f"{place}: {status}", repr(case.body)[:300])
            if response.status_code >= 400 and "json" not in _content_type(response):
                problems[f"{place}: non-JSON {status} body"] += 1
            try:
                case.validate_response(response, headers=headers)
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - schemathesis raises a FailureGroup
                for line in _failure_titles(exc):
                    problems[f"{place}: {line}"] += 1
                    examples.setdefault(f"{place}: {line}", f"{status} for {repr(case.body)[:240]}")

        with contextlib.suppress(Unsatisfiable):  # an operation without inputs has nothing to break
            fuzz()
    seconds = time.monotonic() - started
    sent = sum(statuses.values())
    meanwhile, alive = lab.still_serving()
    failures = {finding: count for finding, count in problems.items() if not _semantic(finding)}
    rows = [Row("3. HTTP fuzzing", f"schemathesis, {len(operations)} operations x positive/negative, {per_run} examples each",
                "no undocumented 5xx, JSON errors, every answer as documented",
                f"{sent:,} requests; statuses {dict(sorted(statuses.items()))}", seconds, meanwhile,
                verdict(not failures and alive), f"{sum(failures.values())} findings")]  # fmt: skip
    for finding, count in problems.most_common(25):
        example = examples.get(finding, "")
        kind = "INFO" if _semantic(finding) else "FAIL"
        rows.append(Row("3. HTTP fuzzing", finding, "none", f"{count} requests", 0.0, "", kind, example))
    return rows


def _semantic(finding: str) -> bool:
    """Findings about what a static schema cannot say, reported as INFO: a well-shaped request
    refused for its meaning (a model or adapter that does not exist, an OpenAI feature loramux
    refuses when set, the chat template's own rules), or unknown extra fields ignored (as
    OpenAI clients send fields newer than the server)."""
    return finding.endswith(("Schema-valid request rejected", "Schema-violating request accepted"))


def _content_type(response: Any) -> str:
    """schemathesis' Response keeps headers as lists, under any case."""
    for key, value in response.headers.items():
        if key.lower() == "content-type":
            return " ".join(value) if isinstance(value, list) else str(value)
    return ""


def _failure_titles(exc: BaseException) -> list[str]:
    inner = getattr(exc, "exceptions", None) or [exc]
    titles = []
    for failure in inner:
        title = getattr(failure, "title", None) or str(failure).strip().splitlines()[0][:120]
        titles.append(str(title))
    return titles


# -- 4. hand-made bodies ------------------------------------------------------------------------

SURROGATE = "\\ud800"  # a JSON escape of a lone surrogate, as raw request text


def _raw_chat(**fields: str) -> str:
    message = {"role": '"user"', "content": '"hi"'} | {
        k: v for k, v in fields.items() if k in ("role", "content")
    }
    model = fields.get("model", '"good"')
    stop = f', "stop": [{fields["stop"]}]' if "stop" in fields else ""
    return (f'{{"model": {model}, "messages": [{{"role": {message["role"]}, "content": {message["content"]}}}], '
            f'"max_tokens": 4{stop}}}')  # fmt: skip


def _http_cases(base_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(attack, path, httpx request kwargs); every one must be a 4xx JSON error, not 429 or 5xx."""
    long = "x" * 10_000
    comp = {"model": base_id, "prompt": "hi", "max_tokens": 4}
    return [
        ("lone surrogate in prompt", "/v1/completions", {"content": f'{{"model": "{base_id}", "prompt": "{SURROGATE}", "max_tokens": 4}}'}),
        ("lone surrogate in stop", "/v1/chat/completions", {"content": _raw_chat(stop=f'"{SURROGATE}"')}),
        ("lone surrogate in chat content", "/v1/chat/completions", {"content": _raw_chat(content=f'"{SURROGATE}"')}),
        ("lone surrogate in role", "/v1/chat/completions", {"content": _raw_chat(role=f'"{SURROGATE}"')}),
        ("lone surrogate in model", "/v1/chat/completions", {"content": _raw_chat(model=f'"{SURROGATE}"')}),
        ("5 MB prompt body", "/v1/completions", {"json": {**comp, "prompt": "a " * (5 << 19)}}),
        ("10,000-char role", "/v1/chat/completions", {"json": {"model": base_id, "messages": [{"role": long, "content": "hi"}]}}),
        ("10,000-char model", "/v1/completions", {"json": {**comp, "model": long}}),
        ("10,000-char lora_name (admin)", "/v1/load_lora_adapter", {"json": {"lora_name": long, "lora_path": "good"}, "headers": "admin"}),
        ("10,000-char lora_path (admin)", "/v1/load_lora_adapter", {"json": {"lora_name": "x", "lora_path": long}, "headers": "admin"}),
        ("temperature 1e308", "/v1/completions", {"json": {**comp, "temperature": 1e308}}),
        ("temperature -1", "/v1/completions", {"json": {**comp, "temperature": -1}}),
        ("top_p 2", "/v1/completions", {"json": {**comp, "top_p": 2}}),
        ("max_tokens 2**63", "/v1/completions", {"json": {**comp, "max_tokens": 2**63}}),
        ("n 10**6", "/v1/completions", {"json": {**comp, "n": 10**6}}),
        ("seed -1", "/v1/completions", {"json": {**comp, "seed": -1}}),
        ("logit_bias huge", "/v1/completions", {"json": {**comp, "logit_bias": {str(i): 1e300 for i in range(1000)}}}),
        ("top_k 2**70", "/v1/completions", {"json": {**comp, "top_k": 2**70}}),
        ("stop: 10,000 strings", "/v1/completions", {"json": {**comp, "stop": ["s"] * 10_000}}),
        ("prompt: 100,000 token ids", "/v1/completions", {"json": {**comp, "prompt": [1] * 100_000}}),
        ("body is a JSON array", "/v1/completions", {"content": "[]"}),
        ("body 100,000 nested arrays", "/v1/completions", {"content": '{"model": "x", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"}),
    ]  # fmt: skip


def _grpc_cases() -> list[tuple[str, dict[str, Any]]]:
    long = "x" * 10_000
    return [
        ("gRPC max_tokens 2**32-1", {"max_tokens": 2**32 - 1}),
        ("gRPC temperature inf", {"temperature": math.inf}),
        ("gRPC temperature NaN", {"temperature": math.nan}),
        ("gRPC top_p NaN", {"top_p": math.nan}),
        ("gRPC top_p 2", {"top_p": 2.0}),
        ("gRPC top_k 2**32-1", {"top_k": 2**32 - 1}),
        ("gRPC token_ids [2**32-1]", {"prompt": None, "token_ids": [2**32 - 1]}),
        ("gRPC stop: 10,000 strings", {"stop": ["s"] * 10_000}),
        ("gRPC stop: one 1 MB string", {"stop": ["s" * (1 << 20)]}),
        ("gRPC 10,000-char adapter name", {"adapter": long}),
        ("gRPC 10,000-char request_id", {"request_id": long}),
        (
            "gRPC 10,000-char chat role",
            {"prompt": None, "messages": [pb.ChatMessage(role=long, content="hi")]},
        ),
        ("gRPC 5 MB prompt", {"prompt": "a " * (5 << 19)}),
        ("gRPC prompt and messages both", {"messages": [pb.ChatMessage(role="user", content="hi")]}),
        (
            "gRPC adapters mixture with weight NaN",
            {"adapters": [pb.WeightedAdapter(name="good", weight=math.nan)]},
        ),
    ]


# What else a gRPC case may answer: a huge top_k is clamped to the vocabulary; a name that is no
# valid adapter name names no adapter (OpenAI's model_not_found); a message over gRPC's 4 MiB
# receive limit gets gRPC's own RESOURCE_EXHAUSTED "larger than max" (documented in the README).
_GRPC_ALSO_ALLOWED = {
    "gRPC top_k 2**32-1": ("OK", "INVALID_ARGUMENT"),
    "gRPC 10,000-char adapter name": ("NOT_FOUND", "INVALID_ARGUMENT"),
    "gRPC 5 MB prompt": ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"),
}


def hand_made(lab: Lab, base_id: str) -> list[Row]:
    rows = []
    for attack, path, kwargs in _http_cases(base_id):
        kwargs = dict(kwargs)
        token = "admin" if kwargs.pop("headers", None) == "admin" else "key"
        if "content" in kwargs:
            kwargs["headers"] = {"content-type": "application/json"}
        reply = lab.probe.http("POST", path, timeout=60, token=token, **kwargs)
        ok = reply.status.startswith("4") and reply.status != "429" and "json" in reply.content_type
        ok = ok and len(reply.message) <= MAX_MESSAGE_CHARS
        meanwhile, alive = lab.still_serving()
        rows.append(Row("4. Hand-made bodies", f"HTTP {path}: {attack}", "4xx JSON error (not 429, not 5xx), message <= 1,000 chars",
                        f"{reply.short()}: {reply.message[:140]}", reply.seconds, meanwhile, verdict(ok and alive)))  # fmt: skip
    for attack, fields in _grpc_cases():
        fields = {"adapter": "good", "prompt": GOOD_PROMPT, "max_tokens": 4, **fields}
        fields = {key: value for key, value in fields.items() if value is not None}
        reply = lab.probe.call("Generate", pb.GenerateRequest(**fields), timeout=60)
        allowed = _GRPC_ALSO_ALLOWED.get(attack, ("INVALID_ARGUMENT",))
        ok = reply.status in allowed and len(reply.message) <= MAX_MESSAGE_CHARS
        if reply.status == "RESOURCE_EXHAUSTED":  # only gRPC's own size limit, never loramux's overload
            ok = ok and "larger than max" in reply.message
        meanwhile, alive = lab.still_serving()
        expected = " or ".join(allowed)
        rows.append(Row("4. Hand-made bodies", attack, f"{expected}, message <= 1,000 chars",
                        f"{reply.status}: {reply.message[:140]}", reply.seconds, meanwhile, verdict(ok and alive)))  # fmt: skip
    rows.append(_reused_request_id(lab))
    return rows


def _reused_request_id(lab: Lab) -> Row:
    """Two requests with one client id at once: each gets its own tokens, or the second is refused."""
    long_reply: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: long_reply.setdefault("r", lab.probe.generate(
        "good", request_id="dup", max_tokens=48, timeout=120)))  # fmt: skip
    worker.start()
    time.sleep(0.3)
    second = lab.probe.generate("good", request_id="dup", timeout=60)
    worker.join()
    first = long_reply["r"]
    second_ok = (second.status == "OK" and second.token_ids == lab.probe.baseline) or second.status in (
        "ALREADY_EXISTS", "INVALID_ARGUMENT", "FAILED_PRECONDITION")  # fmt: skip
    first_ok = first.status == "OK" and first.token_ids[: len(lab.probe.baseline)] == lab.probe.baseline
    meanwhile, alive = lab.still_serving()
    return Row("4. Hand-made bodies", "gRPC: two concurrent Generate with request_id 'dup'",
               "both answered with their own tokens, or the second refused",
               f"first {first.status} ({len(first.token_ids)} tokens{'' if first_ok else ', WRONG'}), second {second.status}: {second.message[:80]}",
               first.seconds, meanwhile, verdict(first_ok and second_ok and alive))  # fmt: skip


# -- 5. slow clients ----------------------------------------------------------------------------


def _half_sent(port: int, body: bool) -> socket.socket | None:
    sock = socket.socket()
    sock.settimeout(5)
    try:
        sock.connect(("127.0.0.1", port))
        if body:  # complete headers, a body that never finishes
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n{\"model\": ")  # fmt: skip
        else:  # headers never finished
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def _still_open(sock: socket.socket) -> bool:
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # closed (b"") or answered (e.g. a 408): either way, not left hanging


def slow_clients(lab: Lab, count: int, hold_s: float) -> list[Row]:
    server = lab.server
    fds_before, log_before = server.open_fds(), server.log_bytes()
    started = time.monotonic()
    socks = [_half_sent(server.http_port, body=i % 2 == 1) for i in range(count)]
    connected = [sock for sock in socks if sock is not None]
    open_s = time.monotonic() - started
    time.sleep(min(3.0, hold_s / 2))
    fds_during = server.open_fds()
    alive_during = lab.probe.alive(timeout=10)
    time.sleep(max(0.0, hold_s - (time.monotonic() - started)))
    still = sum(_still_open(sock) for sock in connected)
    fds_end, log_end = server.open_fds(), server.log_bytes()
    for sock in connected:
        sock.close()
    time.sleep(2.0)
    fds_after = server.open_fds()
    meanwhile, alive = lab.still_serving()
    rows = [
        Row("5. Slow clients", f"{count:,} half-sent HTTP requests (half: headers unfinished; half: body unfinished), held {hold_s:.0f} s",
            f"the server closes them (header/body timeout) well before {hold_s:.0f} s",
            f"{len(connected):,} connected in {open_s:.1f} s; {still:,} still open after {hold_s:.0f} s",
            time.monotonic() - started, alive_during.cell(), verdict(still == 0 and alive_during.ok)),
        Row("5. Slow clients", "server's open file descriptors", "bounded, back to the start after the clients leave",
            f"{fds_before} before, {fds_during} during, {fds_end} at {hold_s:.0f} s, {fds_after} after closing",
            0.0, meanwhile, verdict(fds_during < fds_before + count // 2 and fds_after <= fds_before + 5)),
        Row("5. Slow clients", "server log growth", "< 64 KiB for the whole attack",
            f"+{(log_end - log_before) / 1024:.1f} KiB", 0.0, meanwhile, verdict(log_end - log_before < 64 << 10)),
    ]  # fmt: skip
    if not alive:
        rows[-1].verdict = "FAIL"
    return rows

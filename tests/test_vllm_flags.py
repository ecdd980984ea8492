"""vLLM's launch flags on `loramux serve`: tools that launch `vllm serve` (KServe, llm-d) launch loramux.

The oracle for each alias is loramux's own flag: the two command lines must describe the same
ServerConfig. Two spellings of one setting given different values, a second model, a second
served name and malformed `--lora-modules` are errors that say what was wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.cli import build_parser, server_config
from server.config import ServerConfig


def config_of(*flags: str) -> ServerConfig:
    return server_config(build_parser().parse_args(["serve", *flags]))


def refused(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """The message of a command line the parser refuses (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", *flags])
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def adapter_dirs(tmp_path: Path) -> Path:
    """tmp/loras/{sql,chat}: two directories standing for adapters (parsing does not read them)."""
    for name in ("sql", "chat"):
        (tmp_path / "loras" / name).mkdir(parents=True)
    return tmp_path / "loras"


def test_vllm_spellings_describe_the_server_loramux_flags_describe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAMUX_API_KEY", raising=False)
    monkeypatch.delenv("LORAMUX_ADMIN_TOKEN", raising=False)
    vllm = config_of(
        "/models/base",
        "--port", "9001",
        "--max-loras", "3",
        "--max-lora-rank", "32",
        "--max-num-seqs", "6",
        "--max-num-batched-tokens", "128",
        "--enable-lora",
        "--host", "0.0.0.0",
    )  # fmt: skip
    loramux = config_of(
        "--model", "/models/base",
        "--http-port", "9001",
        "--max-slots", "3",
        "--max-rank", "32",
        "--max-running", "6",
        "--max-batched-tokens", "128",
        "--host", "0.0.0.0",
    )  # fmt: skip
    assert vllm == loramux
    assert (vllm.model, vllm.http_port, vllm.adapters.max_slots, vllm.adapters.max_rank) == (
        "/models/base",
        9001,
        3,
        32,
    )
    assert (vllm.engine.max_running, vllm.engine.max_batched_tokens) == (6, 128)
    assert config_of() == ServerConfig()  # no flags: loramux's defaults, whatever vLLM's are


@pytest.mark.parametrize(
    ("loramux_flag", "vllm_flag", "value"),
    [
        ("--http-port", "--port", 9001),
        ("--max-slots", "--max-loras", 3),
        ("--max-rank", "--max-lora-rank", 32),
        ("--max-running", "--max-num-seqs", 6),
        ("--max-batched-tokens", "--max-num-batched-tokens", 128),
    ],
)
def test_each_alias_alone_and_both_spellings_agreeing(loramux_flag: str, vllm_flag: str, value: int) -> None:
    expected = config_of(loramux_flag, str(value))
    assert expected != ServerConfig()
    assert config_of(vllm_flag, str(value)) == expected
    assert config_of(vllm_flag, str(value), loramux_flag, str(value)) == expected


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("--max-loras", "4"), ("--max-slots", "8")),
        (("--max-slots", "8"), ("--max-loras", "4")),
        (("--port", "9000"), ("--http-port", "9001")),
        (("--max-lora-rank", "8"), ("--max-rank", "64")),
        (("--max-num-seqs", "4"), ("--max-running", "8")),
        (("--max-num-batched-tokens", "64"), ("--max-batched-tokens", "128")),
    ],
)
def test_two_spellings_with_different_values_are_an_error(
    capsys: pytest.CaptureFixture[str], first: tuple[str, str], second: tuple[str, str]
) -> None:
    message = refused(capsys, *first, *second)
    assert f"{first[0]} {first[1]}" in message and f"{second[0]} {second[1]}" in message
    assert "give one of them" in message


def test_one_spelling_given_twice_keeps_the_last_value() -> None:
    assert config_of("--max-loras", "4", "--max-loras", "6").adapters.max_slots == 6


def test_a_second_model_or_served_name_is_an_error() -> None:
    assert config_of("/models/a", "--model", "/models/a").model == "/models/a"
    with pytest.raises(ValueError, match="two models given"):
        config_of("/models/a", "--model", "/models/b")
    assert config_of("--served-model-name", "base").served_model_name == "base"
    assert config_of().served_model_name is None
    with pytest.raises(ValueError, match="one name"):
        config_of("--served-model-name", "base", "alias")


def test_enable_lora_is_accepted_but_not_with_adapters_off() -> None:
    assert config_of("--enable-lora") == config_of()
    with pytest.raises(ValueError, match="--max-slots 0"):
        config_of("--enable-lora", "--max-slots", "0")


def test_lora_modules_as_name_path_and_as_json(adapter_dirs: Path) -> None:
    sql, chat = adapter_dirs / "sql", adapter_dirs / "chat"
    plain = config_of("--lora-modules", f"sql={sql}", f"team-chat={chat}")
    as_json = config_of(
        "--lora-modules",
        json.dumps({"name": "sql", "path": str(sql), "base_model_name": "whatever"}),
        "--lora-modules",
        json.dumps({"name": "team-chat", "path": str(chat)}),
    )
    assert plain == as_json
    real = os.path.realpath(adapter_dirs)
    assert plain.adapters.modules == (("sql", f"{real}/sql"), ("team-chat", f"{real}/chat"))
    assert plain.adapters.roots == (real,)  # the directory holding them, once


def test_lora_modules_inside_an_adapter_root_add_no_root(adapter_dirs: Path, tmp_path: Path) -> None:
    root = str(adapter_dirs.parent)  # holds loras/sql
    config = config_of("--adapter-root", root, "--lora-modules", f"sql={adapter_dirs / 'sql'}")
    assert config.adapters.roots == (root,)
    relative = Path(os.path.relpath(adapter_dirs / "chat"))  # relative to the working directory
    assert config_of("--lora-modules", f"chat={relative}").adapters.modules == (
        ("chat", os.path.realpath(adapter_dirs / "chat")),
    )


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("sql", "expected NAME=PATH"),
        ("=/tmp", "expected NAME=PATH"),
        ("sql=/no/such/dir", "not a directory"),
        ("sql=org/hub-repo-id", "local directories only"),
        ('{"name": "sql"', "not a JSON object"),
        ('{"name": "sql", "path": "/tmp", "rank": 8}', '"base_model_name"'),
        ('{"path": "/tmp"}', "expected NAME=PATH"),
    ],
)
def test_malformed_lora_modules_are_refused(capsys: pytest.CaptureFixture[str], item: str, says: str) -> None:
    message = refused(capsys, "--lora-modules", item)
    assert "--lora-modules" in message and says in message


def test_lora_modules_need_slots_and_distinct_names(adapter_dirs: Path) -> None:
    with pytest.raises(ValueError, match="max_slots >= 1"):
        config_of("--max-loras", "0", "--lora-modules", f"sql={adapter_dirs / 'sql'}")
    with pytest.raises(ValueError, match="given twice.*sql"):
        config_of("--lora-modules", f"sql={adapter_dirs / 'sql'}", f"sql={adapter_dirs / 'chat'}")


def test_the_help_names_the_vllm_spellings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--max-loras MAX_SLOTS", "--max-lora-rank MAX_RANK", "--port HTTP_PORT", "--max-num-seqs"):
        assert flag in text
    assert "--lora-modules" in text and "--enable-lora" in text and "--served-model-name" in text


def test_the_kubernetes_example_passes_flags_loramux_serve_accepts() -> None:
    """deploy/kubernetes/loramux.yaml is not run here (no cluster), but its command line is parsed."""
    yaml = pytest.importorskip("yaml")
    example = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "loramux.yaml"
    (deployment,) = [doc for doc in yaml.safe_load_all(example.read_text()) if doc["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    config = server_config(build_parser().parse_args(container["args"]))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert (config.host, config.http_port, config.grpc_port) == ("0.0.0.0", ports["http"], ports["grpc"])
    assert config.served_model_name == "smollm2-135m"
    assert config.adapters.roots == ("/adapters",) and config.adapters.max_slots == 16

"""`loramux train`: the loss falls, the adapter loads in PEFT unchanged and the server's greedy output
with it equals PEFT's, the same seed gives the same bytes, only the answer (and its end-of-turn
token) is learnt, rendered as the server renders chats, and every bad input gets a clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from server import cli
from server.engine.request import SamplingParams
from server.prompts import chat_ids, chat_prompt_ids
from tests.conftest import start_adapter_engine
from tests.test_engine import submit, wait_idle
from training import TrainConfig, TrainingError
from training.data import IGNORE_INDEX, ChatRow, DataError, answer_labels, read_rows, tokenize_row
from training.trainer import TRAINING_FILE, train

EOS = 2  # <|im_end|>, the SmolLM2 tokenizer's EOS and the tiny model's
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def toy_rows(count: int = 24) -> list[dict[str, Any]]:
    """Short questions with short answers: easy to memorise, some in each input form."""
    rows: list[dict[str, Any]] = []
    for i in range(count):
        prompt, response = f"Color of box {i}?", f"Box {i} is {COLORS[i % len(COLORS)]}."
        if i % 3 == 2:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": response},
                    ]
                }
            )
        else:
            rows.append({"prompt": prompt, "response": response})
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def base_dir(make_tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a 4x final norm: its random 64-wide hidden states cannot otherwise reach the
    logit margins that a confident answer over 49k tokens needs, so its loss would stall near 7."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = make_tiny_model()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    directory = tmp_path_factory.mktemp("tiny-sharp")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "toy.jsonl", toy_rows())


def _config(base_dir: Path, data: Path, out: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(
        rank=8, alpha=16, steps=80, lr=1e-2, batch_size=8, seed=0, max_length=128, threads=1
    )
    return TrainConfig(data=data, out=out, model=str(base_dir), **{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(base_dir, data_file, tmp_path_factory) -> Path:
    """An adapter trained on the toy rows, inside an adapter root (its parent)."""
    out = tmp_path_factory.mktemp("adapter-root") / "toy"
    train(_config(base_dir, data_file, out))
    return out


# -- training and what it writes ---------------------------------------------------------------


def test_the_loss_falls_and_training_json_says_so(trained: Path) -> None:
    summary = json.loads((trained / TRAINING_FILE).read_text())
    assert summary["steps"] == 80 and len(summary["losses"]) == 80 and summary["rows"] == 24
    assert summary["final_loss"] < 0.5 * summary["initial_loss"], summary["losses"]
    assert summary["args"]["rank"] == 8 and summary["args"]["targets"] == "all-linear"
    assert summary["seed"] == 0 and summary["seconds"] > 0


def test_the_output_is_a_standard_peft_directory(trained: Path, base_dir: Path) -> None:
    from safetensors import safe_open

    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == base_dir.name  # a name, not a local path
    assert str(base_dir.parent) not in (trained / "README.md").read_text()  # PEFT's model card
    modes = {(trained / name).stat().st_mode & 0o777 for name in ADAPTER_FILES}
    assert len(modes) == 1  # the weights as readable as the config (PEFT leaves them 0600)
    with safe_open(str(trained / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
        assert {weights.get_tensor(key).dtype for key in keys} == {torch.float16}
    projections = {key.split(".")[-3] for key in keys}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_served_greedy_output_equals_peft_generate(trained: Path, base_dir: Path, tokenizer) -> None:
    """PEFT loads the directory unchanged, and loramux serving it answers as PEFT does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, trained).eval()
    prompts = [chat_prompt_ids(tokenizer, [("user", f"Color of box {i}?")]) for i in (1, 5, 30)]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = peft_model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=EOS
            )
            expected.append(out[0, len(prompt) :].tolist())
    engine = start_adapter_engine(base_dir, trained.parent)
    try:
        greedy = SamplingParams(max_tokens=10, temperature=0.0)
        sinks = [submit(engine, f"train-{i}", list(p), greedy, adapter="toy") for i, p in enumerate(prompts)]
        served = [sink.wait().tokens for sink in sinks]
        wait_idle(engine)
    finally:
        engine.shutdown()
    assert served == expected
    # the adapter learnt the rows' form, and to end its turn where the server stops
    for i, answer in zip((1, 5), served, strict=False):
        text = tokenizer.decode(answer)
        assert text.startswith(f"Box {i} is ") and text.endswith(".<|im_end|>"), text


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not(
    base_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    outs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        outs[name] = tmp_path / name
        train(_config(base_dir, data_file, outs[name], steps=3, seed=seed))
    for file in ADAPTER_FILES:
        assert (outs["a"] / file).read_bytes() == (outs["b"] / file).read_bytes(), file
    weights = "adapter_model.safetensors"
    assert (outs["a"] / weights).read_bytes() != (outs["c"] / weights).read_bytes()


# -- labels: the answer as the server's template renders it --------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        ChatRow(1, (("user", "Hi"),), "Hello!"),
        ChatRow(2, (("system", "Be terse."), ("user", "2+2?")), "\n4, with <|im_end|> as text"),
        ChatRow(3, (("user", "a"), ("assistant", "b"), ("user", "c")), " d  e"),
    ],
)
def test_only_the_answer_and_its_end_of_turn_are_labelled(tokenizer, row: ChatRow) -> None:
    example = tokenize_row(tokenizer, row, {EOS})
    full = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in (*row.messages, ("assistant", row.response))],
        tokenize=True,
        sanitize_control_tokens=True,
    )["input_ids"]
    prompt = chat_prompt_ids(tokenizer, row.messages)  # what the server feeds the model
    answer = len(example.input_ids) - len(prompt)
    assert example.input_ids == tuple(full[: len(example.input_ids)])  # the template's own ids...
    assert example.input_ids[: len(prompt)] == prompt  # ...of which the served prompt is the start
    assert full[len(example.input_ids) :] == tokenizer.encode("\n")  # only the template's newline is left
    assert example.labels == (IGNORE_INDEX,) * len(prompt) + example.input_ids[len(prompt) :]
    assert example.input_ids[-1] == EOS and example.input_ids.count(EOS) == prompt.count(EOS) + 1
    assert tokenizer.decode(example.input_ids[len(prompt) : -1]) == row.response and answer >= 2


def test_answer_labels_refuses_what_the_server_could_not_reproduce() -> None:
    assert answer_labels([5, 6], [5, 6, 7, 8, 2, 9], {2}) == ((5, 6, 7, 8, 2), (-100, -100, 7, 8, 2))
    with pytest.raises(ValueError, match="differently from the prompt"):
        answer_labels([5, 6], [5, 60, 7, 2], {2})  # the answer merged into the prompt's last token
    with pytest.raises(ValueError, match="end-of-turn"):
        answer_labels([5, 6], [5, 6, 7, 8], {2})


def test_training_prompts_are_the_servers_chat_prompts(tokenizer) -> None:
    messages = (("user", "Color of box 1?"),)
    served = chat_ids(tokenizer, messages, add_generation_prompt=True)
    example = tokenize_row(tokenizer, ChatRow(1, messages, "Box 1 is green."), {EOS})
    assert example.input_ids[: len(served)] == served == chat_prompt_ids(tokenizer, messages)


# -- errors a user can cause --------------------------------------------------------------------

GOOD = json.dumps({"prompt": "Hi", "response": "Hello"})
BAD_ROWS = {
    "not JSON": ('{"prompt": "Hi",', "not valid JSON"),
    "not an object": ('["Hi", "Hello"]', "expected a JSON object"),
    "no response": ('{"prompt": "Hi"}', 'missing "response"'),
    "no prompt": ('{"response": "Hi"}', 'missing "prompt"'),
    "number prompt": ('{"prompt": 3, "response": "x"}', '"prompt" must be a string, got a number'),
    "empty response": ('{"prompt": "Hi", "response": "  "}', '"response" is empty'),
    "empty system": ('{"system": "", "prompt": "Hi", "response": "x"}', '"system" is empty'),
    "both forms": ('{"prompt": "Hi", "response": "x", "messages": []}', "not both"),
    "messages not a list": ('{"messages": "Hi"}', '"messages" must be a list'),
    "one message": ('{"messages": [{"role": "assistant", "content": "x"}]}', "at least a prompt"),
    "message not an object": ('{"messages": ["Hi", "x"]}', "messages[0] must be an object"),
    "no content": (
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
        'has no "content"',
    ),
    "unknown role": (
        '{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "x"}]}',
        "messages[0].role is 'human'",
    ),
    "last not assistant": (
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "x"}]}',
        'must be "assistant", got "user"',
    ),
    "empty answer": (
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}',
        "messages[1].content is empty",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_is_refused_naming_its_line(tmp_path: Path, case: str) -> None:
    bad, message = BAD_ROWS[case]
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n{bad}\n{GOOD}\n")  # the blank line 2 is skipped, still counted
    with pytest.raises(DataError, match="line 4: ") as caught:
        read_rows(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_an_empty_or_missing_or_binary_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="holds no rows"):
        read_rows(empty)
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        read_rows(binary)


def test_a_row_longer_than_max_length_says_by_how_much(base_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "long.jsonl",
        [{"prompt": "Hi", "response": "x"}, {"prompt": "Hi", "response": "word " * 200}],
    )
    with pytest.raises(
        DataError, match=r"line 2: \d+ tokens \(prompt \d+ \+ answer \d+\), \d+ more than --max-length 64"
    ):
        train(_config(base_dir, data, tmp_path / "out", max_length=64))
    assert not (tmp_path / "out").exists()  # the run created it and failed: nothing left behind
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(DataError):
        train(_config(base_dir, data, kept, max_length=64))
    assert kept.is_dir()  # a directory the user made stays


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rank": 0}, "--rank must be >= 1, got 0"),
        ({"steps": 0}, "--steps must be >= 1"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"lr": 0.0}, "--lr must be a positive number"),
        ({"alpha": float("nan")}, "--alpha must be a positive number"),
        ({"targets": "q_proj,w_proj"}, "unknown projection 'w_proj'"),
        ({"targets": "q_proj,,v_proj"}, "empty entry"),
        ({"targets": "all-linear,q_proj"}, "stands alone"),
        ({"targets": "q_proj,q_proj"}, "names a projection twice"),
        ({"dtype": "bfloat16"}, "--dtype must be one of float16, float32"),
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainingError, match=message.replace("(", r"\(").replace("+", r"\+")):
        TrainConfig(data=Path("d.jsonl"), out=Path("out"), **overrides)


def test_an_output_that_cannot_be_written_is_refused_before_training(
    base_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(TrainingError, match="parent directory .* does not exist"):
        train(_config(base_dir, data_file, tmp_path / "no" / "such"))
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainingError, match="is a file"):
        train(_config(base_dir, data_file, tmp_path / "file"))


# -- the command line ---------------------------------------------------------------------------


def test_the_cli_parses_its_flags() -> None:
    args = cli.build_parser().parse_args(
        ["train", "--data", "d.jsonl", "--out", "o", "--model", "m", "--rank", "4", "--alpha", "8",
         "--targets", "q_proj,v_proj", "--steps", "7", "--lr", "0.01", "--batch-size", "2", "--seed", "3",
         "--max-length", "99", "--dtype", "float32"]
    )  # fmt: skip
    assert (args.data, args.out, args.model, args.rank, args.alpha, args.targets) == (
        "d.jsonl", "o", "m", 4, 8.0, "q_proj,v_proj"
    )  # fmt: skip
    assert (args.steps, args.lr, args.batch_size, args.seed, args.max_length, args.dtype) == (
        7, 0.01, 2, 3, 99, "float32"
    )  # fmt: skip
    defaults = cli.build_parser().parse_args(["train", "--data", "d", "--out", "o"])
    assert (defaults.model, defaults.rank, defaults.targets, defaults.dtype) == (
        None,
        8,
        "all-linear",
        "float16",
    )


def test_loramux_train_end_to_end(base_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli-adapter"
    argv = ["train", "--data", str(data_file), "--out", str(out), "--model", str(base_dir), "--threads", "1"]
    assert (
        cli.main([*argv, "--steps", "2", "--rank", "4", "--targets", "q_proj,v_proj", "--dtype", "float32"])
        == 0
    )
    assert f"wrote {out}" in capsys.readouterr().out
    assert {path.name for path in out.iterdir()} >= {*ADAPTER_FILES, TRAINING_FILE}
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (
        ["q_proj", "v_proj"],
        ["v_proj", "q_proj"],
    )


def test_loramux_train_errors_exit_nonzero_with_a_message(base_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{GOOD}\n{{oops\n")
    argv = ["train", "--data", str(bad), "--out", str(tmp_path / "o"), "--model", str(base_dir)]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.startswith(f"error: {bad} line 2: not valid JSON")
    assert cli.main([*argv, "--rank", "0"]) == 2
    assert capsys.readouterr().err == "error: --rank must be >= 1, got 0\n"
    good = write_jsonl(tmp_path / "good.jsonl", toy_rows(2))
    missing = ["train", "--data", str(good), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")]
    assert cli.main(missing) == 1
    assert "no such directory" in capsys.readouterr().err

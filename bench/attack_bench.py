"""Attack probe: a real `loramux serve` subprocess attacked as a hostile user would, with a report.

    python -m bench.attack_bench [--model DIR] [--quick] [--json OUT] [--only 1,2,...]

Starts the server on 127.0.0.1 (free ports, an API key and an admin token, `--enable-admin`)
over a tiny random Llama it builds itself (the tokenizer of the default SmolLM2, nothing
downloaded) or over `--model`, with one adapter root holding a good adapter. Then, in order:

1. malformed adapters (bench/attack_corpus.py, 100+ kinds), each moved into the root and requested
   by name over gRPC Generate and HTTP; the catastrophic regex with /health and GetInfo timed
   while it runs; RSS before and after four requests for a 500 MB sparse adapter;
2. stale files: an adapter's files replaced by another valid adapter while it is served;
4. hand-made bodies over HTTP and gRPC (lone surrogates, 5 MB bodies, 10,000-char names, absurd
   sampling, a reused request id);
6. path leaks, as an API-key holder;
3. schemathesis fuzzing of /openapi.json (2,000 requests with --quick, 16,000 without);
5. slow clients: half-sent HTTP requests held open (1,000 with --quick), last because they may
   leave the server unable to serve.

Every attack records what was sent, the answer (gRPC code / HTTP status and content type), its
time, whether gRPC health, /health and a normal completion (same greedy tokens as before any
attack) still answered, and PASS/FAIL. A server that stops serving is restarted and the row says
so. The markdown report goes to stdout (and --out), the rows to --json. See bench/attack_before.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.attack_adapters import Lab, malformed_adapters, path_leaks, stale_files
from bench.attack_corpus import ModelDims, build_corpus, write_good_adapter
from bench.attack_http import hand_made, http_fuzzing, slow_clients
from bench.attack_report import Row, as_json, markdown
from bench.attack_server import REPO, Probe, ServerProcess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="a Llama-family checkpoint directory (default: a tiny random one)"
    )
    parser.add_argument("--quick", action="store_true", help="smaller fuzzing and slow-client volumes")
    parser.add_argument(
        "--fuzz-requests",
        type=int,
        default=None,
        help="schemathesis volume (default 2,000 quick, 16,000 full)",
    )
    parser.add_argument(
        "--slow-clients", type=int, default=None, help="half-sent requests (default 1,000 quick, 4,000 full)"
    )
    parser.add_argument(
        "--slow-hold", type=float, default=None, help="seconds they are held (default 20 quick, 60 full)"
    )
    parser.add_argument("--only", default="1,2,3,4,5,6", help="groups to run, e.g. 1,6")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--out", default=None, help="write the markdown report here too")
    parser.add_argument(
        "--workdir", default=None, help="where the model, adapters and server log go (default: a temp dir)"
    )


def tiny_model(directory: Path) -> Path:
    """A 2-layer random Llama (hidden 64) with the default model's tokenizer, as tests/conftest.py makes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from server.model.loader import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(None)[1])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # widen the timid random init so adapters visibly change greedy tokens
        for param in model.parameters():
            param.normal_(0, 0.08) if param.dim() == 2 else param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    quick = args.quick
    fuzz = args.fuzz_requests or (2000 if quick else 16000)
    slow = args.slow_clients or (1000 if quick else 4000)
    hold = args.slow_hold or (20.0 if quick else 60.0)
    groups = {int(g) for g in args.only.split(",")}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loramux-attack-")).resolve()
    model = Path(args.model).resolve() if args.model else tiny_model(work / "tiny-llama")
    dims = ModelDims.from_config(json.loads((model / "config.json").read_text()))
    root = work / "adapters"
    write_good_adapter(root / "good", dims)
    cases = build_corpus(work / "corpus", dims, work / "outside")
    server = ServerProcess(model, root, work / "server.log")
    server.start()
    probe = Probe(server)
    probe.remember_baseline()
    secrets = (str(work), str(model), str(REPO), str(Path.home()))
    lab = Lab(server, probe, secrets)
    base_id = probe.http("GET", "/v1/models").body["data"][0]["id"]
    rows: list[Row] = []
    timings = []
    plan = [
        (1, lambda: malformed_adapters(lab, cases, work / "corpus", work / "outside")),
        (2, lambda: stale_files(lab, dims, work)),
        (4, lambda: hand_made(lab, base_id)),
        (6, lambda: path_leaks(lab, work / "corpus" / "cfg-bad-json")),
        (3, lambda: http_fuzzing(lab, fuzz, base_id)),
        (5, lambda: slow_clients(lab, slow, hold)),
    ]
    try:
        for number, group in plan:
            if number not in groups:
                continue
            started = time.monotonic()
            print(f"group {number} ...", file=sys.stderr, flush=True)
            rows += group()
            timings.append(f"group {number}: {time.monotonic() - started:.0f} s")
    finally:
        lab.probe.close()
        server.stop()
    malformed = [row for row in rows if row.group.startswith("1.") and row.verdict == "FAIL"]
    wrong_code = sum("WRONG CODE" in row.notes for row in malformed)
    only_paths = sum("reveals path" in row.notes and "WRONG CODE" not in row.notes for row in malformed)
    preamble = [
        f"Command: `python -m bench.attack_bench {' '.join(sys.argv[1:])}`",
        f"Model: {'tiny random Llama (2 layers, hidden 64)' if not args.model else model.name}; "
        f"{len(cases)} malformed-adapter cases; fuzzing {fuzz:,} requests; {slow:,} slow clients held {hold:.0f} s.",
        f"Server starts: {server.starts} (more than 1 = an attack left it unable to serve); "
        f"{os.cpu_count()} CPUs; times: {', '.join(timings)}.",
        f"Group 1 failures: {len(malformed)}, of which {wrong_code} got a wrong status code and "
        f"{only_paths} were refused correctly but their message reveals a server path.",
        "Served meanwhile = gRPC health SERVING, /health 200 and a greedy completion on the good adapter "
        "with the same tokens as before any attack, checked right after each attack.",
    ]
    return rows, preamble


def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    rows, preamble = run(args)
    preamble.append(f"Run time: {time.monotonic() - started:.0f} s.")
    report = markdown(rows, "Attack probe", preamble)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(rows), indent=1))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.attack_bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

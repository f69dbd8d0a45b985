"""Serving throughput: `model.generate`, llama.cpp and our engines in-process vs the Serve app over HTTP.

    .venv/bin/python benchmarks/serve_throughput.py [--engine openvino] [--tokens 128] [--clients 1,4,8,16]

(a) Hugging Face `model.generate` (greedy, the same thread count as the replica), (a2) our
transformers engine and, with ``--engine openvino``, (a3) the OpenVINO engine (int8), all
without HTTP in one plain Python process of their own; (p) llama.cpp on the GGUF file the
project ships (llama-cpp-python in a benchmark-only venv, ``--llamacpp-python``; built with
``CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python==0.3.36`` into .venv-llamacpp, about 4
minutes; skipped when missing); and (b) one stream through Ray Serve with ``--engine`` (OpenAI
API, SSE) read by this process, and (b0) the same app sending each decode step's tokens as their own
message to the ingress (``stream_interval_ms: 0``; (b) batches them every 50 ms): decode tokens/s and
time to first token, medians of --repeats
rounds in which they take turns, each after a --settle pause (the Serve app is up and idle
while the others run). The baselines do not run in this process: here only the HTTP client
runs. Then a conversation's time to first token by turn (10 turns, the history growing), and
aggregate tokens/s through Serve with 1/4/8/16 concurrent streaming clients (each sends
--rounds requests; 8 clients also through (b0)); the replica's own counters give the mean batch and the mean time of its
decode steps. One replica with all cores, batching as in serve_configs/local.yaml. The loads
go 1, 4, 8, 16, then 8 and 1 again, and repeats are averaged: this VM's speed drifts by +-20%
over minutes. Prints a table, writes benchmarks/results/serve_throughput[_ENGINE].json and
.png. Not run by CI.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

Measured = tuple[float, float]  # (decode tokens/s, TTFT s)
PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and the sea."}]


def generate_runner(model_dir: Path, tokens: int) -> Callable[[], tuple[float, float]]:
    """(a): `model.generate`, greedy, exactly ``tokens`` new tokens; TTFT = a 1-token generate.
    Returns a function measuring one (decode tokens/s, TTFT s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    common = {"do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    model.generate(ids, max_new_tokens=8, **common)  # warm-up

    def once() -> tuple[float, float]:
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **common)
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **common)
            total = time.perf_counter() - start
        return (tokens - 1) / (total - ttft), ttft

    return once


def engine_runner(model_dir: Path, tokens: int, threads: int) -> Callable[[], tuple[float, float]]:
    """(a2): our batching engine for one request, no HTTP; one (decode tokens/s, TTFT s) per call."""
    from ray_app.serving.engine import GenerationRequest, SamplingParams, TransformersEngine

    engine = TransformersEngine(model_dir, threads=threads)
    ids = engine.chat_prompt_ids(PROMPT)

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        produced = 0
        for [delta] in engine.generate([GenerationRequest(ids, SamplingParams(max_tokens=tokens, temperature=0))]):
            if first is None:
                first = time.perf_counter()
            produced = delta.completion_tokens
        end = time.perf_counter()
        return (produced - 1) / (end - first), first - start

    once()  # warm-up
    return once


def openvino_runner(ir_dir: Path, tokens: int, threads: int) -> Callable[[], tuple[float, float]]:
    """(a3): the OpenVINO engine (int8 weights) for one request, no HTTP; one (decode tokens/s, TTFT s) per call."""
    import queue

    from ray_app.serving.engine import GenerationRequest, SamplingParams
    from ray_app.serving.openvino_engine import OpenVINOBatcher, OpenVINOEngine

    batcher = OpenVINOBatcher(lambda: OpenVINOEngine(ir_dir, threads=threads, precision="f32"))
    ids = batcher.engine.chat_prompt_ids(PROMPT)

    def once() -> tuple[float, float]:
        deltas: queue.Queue = queue.Queue()
        start = time.perf_counter()
        # The same prompt every round: its TTFT is a prefix-cache hit (the transformers engine has none).
        batcher.submit(GenerationRequest(ids, SamplingParams(max_tokens=tokens, temperature=0)), deltas.put)
        first = None
        while True:
            delta = deltas.get(timeout=600)
            if first is None:
                first = time.perf_counter()
            if delta.finish_reason:
                break
        return (delta.completion_tokens - 1) / (time.perf_counter() - first), first - start

    once()  # warm-up
    return once


def baseline_process(conn, model_dir: str, ir_dir: str | None, tokens: int, threads: int) -> None:
    """Child process: hold (a), (a2) and (a3) and answer "a_..." / "a2_..." / "a3_..." with one (tokens/s, TTFT s)."""
    import torch

    torch.set_num_threads(threads)
    runners = {
        "a_model_generate_in_process": generate_runner(Path(model_dir), tokens),
        "a2_engine_in_process": engine_runner(Path(model_dir), tokens, threads),
    }
    if ir_dir:
        runners["a3_openvino_in_process"] = openvino_runner(Path(ir_dir), tokens, threads)
    conn.send(list(runners))
    while (name := conn.recv()) is not None:
        conn.send(runners[name]())


def stream_once(base_url: str, key: str, model: str, tokens: int) -> tuple[float, float, int, int]:
    """One streamed chat completion: (time to first content, end time, completion tokens, content
    chunks), times from the request's start."""
    import httpx

    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first, produced, chunks = None, 0, 0
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {key}"}) as response:  # fmt: skip
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                produced = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start, produced, chunks


def conversation_ttfts(base_url: str, key: str, model: str, turns: int = 10, tokens: int = 32) -> list[float]:
    """Time to first token of each turn of one conversation through Serve (the history grows every turn)."""
    import httpx

    messages: list[dict[str, str]] = []
    ttfts = []
    topic = os.urandom(4).hex()  # a new conversation each call: earlier calls' cached prefixes do not help
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": f"Conversation {topic}, question {turn}: tell me about the sea."})
        body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True}
        start, first, answer = time.perf_counter(), None, ""
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600,
                          headers={"Authorization": f"Bearer {key}"}) as response:  # fmt: skip
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if event["choices"] and event["choices"][0]["delta"].get("content"):
                        first = first or time.perf_counter() - start
                        answer += event["choices"][0]["delta"]["content"]
        ttfts.append(first or 0.0)
        messages.append({"role": "assistant", "content": answer})
    return ttfts


def llamacpp_runner(python: Path, threads: int, tokens: int) -> tuple[subprocess.Popen, Callable[[], Measured]]:
    """(p): llama.cpp on the GGUF the project ships, in its own venv's process (benchmarks/llamacpp_peer.py)."""
    from ray_app.models import default_gguf_path

    argv = [str(python), str(ROOT / "benchmarks" / "llamacpp_peer.py"), str(default_gguf_path()), str(threads),
            str(tokens), json.dumps(PROMPT)]  # fmt: skip
    peer = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if json.loads(peer.stdout.readline() or "null") != "ready":
        raise RuntimeError(f"{python} could not run llama.cpp (exit {peer.poll()})")

    def once() -> tuple[float, float]:
        peer.stdin.write("go\n")
        peer.stdin.flush()
        rate, ttft = json.loads(peer.stdout.readline())
        return rate, ttft

    return peer, once


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_cli() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens for the single-stream runs")
    parser.add_argument("--load-tokens", type=int, default=64, help="new tokens per request under load")
    parser.add_argument("--repeats", type=int, default=6, help="single-stream rounds")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of pause before each single-stream run")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client under load")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--engine", default="transformers", choices=("transformers", "openvino"),
                        help="the Serve app's engine (b); openvino also adds (a3), the engine in-process")  # fmt: skip
    parser.add_argument("--llamacpp-python", type=Path, default=ROOT / ".venv-llamacpp" / "bin" / "python",
                        help="a Python with llama-cpp-python for the peer row (p); skipped if missing")  # fmt: skip
    return parser.parse_args()


def start_baselines(args, model_dir: Path, ir_dir: str | None, cores: int) -> tuple[dict, Callable[[], None]]:
    """(a), (a2), (a3) in a process of their own and (p) in its venv's: {name: one measurement}, and a stop."""
    import multiprocessing

    conn, child_conn = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=baseline_process, args=(child_conn, str(model_dir), ir_dir, args.tokens, cores), daemon=True
    )
    child.start()

    def in_child(name: str) -> Callable[[], Measured]:
        def once() -> Measured:
            conn.send(name)
            return conn.recv()

        return once

    single: dict[str, Callable[[], Measured]] = {name: in_child(name) for name in conn.recv()}
    peer = None
    if args.llamacpp_python.is_file():
        peer, single["p_llamacpp_same_gguf"] = llamacpp_runner(args.llamacpp_python, cores, args.tokens)
    else:
        print(f"no llama.cpp peer: {args.llamacpp_python} is missing (see this script's docstring)")

    def stop() -> None:
        conn.send(None)
        child.join(timeout=30)
        if peer is not None:
            peer.stdin.close()
            peer.wait(timeout=30)

    return single, stop


def start_serve(settings, cores: int) -> int:
    """Ray (room for two one-replica apps: only one runs at a time) and Serve's proxy; its port."""
    import ray
    from ray import serve

    from ray_app import credentials

    credentials.apply_ray_client_env(settings)
    ray.init(num_cpus=2 * cores, include_dashboard=False, runtime_env={"env_vars": settings.worker_env()})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def start_app(args, settings, model_dir: Path, cores: int, port: int, app: str, **extra) -> tuple[str, str, str]:
    """The Serve app ``app`` with ``args.engine`` (and ``extra`` args), one replica of all cores: (base URL,
    API key, model name)."""
    from ray import serve

    from ray_app.serving.app import bind_app
    from ray_app.serving.config import parse_args, pin_model
    from ray_app.serving.protocol import hash_key

    key = "sk-bench-" + os.urandom(8).hex()
    limit = max(args.tokens, args.load_tokens)
    serve_args = parse_args({"model": str(model_dir), "max_batch_size": args.max_batch_size, "max_tokens_limit": limit,
                             "default_max_tokens": limit, "torch_threads": cores, "engine": args.engine,
                             **extra})  # fmt: skip
    served = pin_model(serve_args, settings)
    one_replica = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": cores}}
    serve.run(bind_app(serve_args, served, [hash_key(key)], **one_replica), name=app, route_prefix=f"/{app}")
    base_url = f"http://127.0.0.1:{port}/{app}"
    stream_once(base_url, key, served.name, 8)  # warm-up
    return base_url, key, served.name


def single_streams(single: dict[str, Callable[[], Measured]], repeats: int, settle_s: float) -> dict[str, dict]:
    """This VM's speed drifts by +-20% over minutes: the runners take turns, one repeat each, with
    the Serve app up (idle while the others run) so all see the same machine."""
    measured: dict[str, list[Measured]] = {name: [] for name in single}
    for _ in range(repeats):
        for name, once in single.items():
            time.sleep(settle_s)
            measured[name].append(once())
    return {
        name: {
            "decode_tokens_per_s": statistics.median(rate for rate, _ in runs),
            "ttft_s": statistics.median(ttft for _, ttft in runs),
            "decode_tokens_per_s_runs": [rate for rate, _ in runs],
        }
        for name, runs in measured.items()
    }


def under_load(args, app: tuple[str, str, str], clients: int) -> dict[str, float]:
    """``clients`` streaming clients at once, --rounds requests each; the replica's counters around them."""
    from ray import serve

    from ray_app.serving.app import ChatServer

    base_url, key, model = app
    replica = serve.get_deployment_handle(ChatServer.name, app_name=base_url.rsplit("/", 1)[1])

    def client(_: int) -> tuple[int, list[float], int]:
        produced, firsts, chunks = 0, [], 0
        for _round in range(args.rounds):
            first, _end, tokens, pieces = stream_once(base_url, key, model, args.load_tokens)
            produced, chunks = produced + tokens, chunks + pieces
            firsts.append(first)
        return produced, firsts, chunks

    before = replica.batching_stats.remote().result()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    after = replica.batching_stats.remote().result()
    steps = after["decode_steps"] - before["decode_steps"]
    return {
        "mean_decode_batch": (after["decode_rows"] - before["decode_rows"]) / max(1, steps),
        "mean_decode_step_ms": 1000 * (after["decode_seconds"] - before["decode_seconds"]) / max(1, steps),
        "aggregate_tokens_per_s": sum(tokens for tokens, _, _ in outcomes) / wall,
        "median_ttft_s": statistics.median(f for _, fs, _ in outcomes for f in fs),
        "tokens_per_chunk": sum(t for t, _, _ in outcomes) / max(1, sum(c for _, _, c in outcomes)),
    }


def main() -> int:
    args = parse_cli()
    import ray
    from ray import serve

    from ray_app.models import resolve_model
    from ray_app.settings import load_settings

    settings = load_settings(home=Path(tempfile.mkdtemp(prefix="llmops-bench-")))
    model_dir = resolve_model(None if args.model == "default" else args.model, settings)
    cores = os.cpu_count() or 1
    ir_dir = None
    if args.engine == "openvino":
        from ray_app.serving.openvino_export import openvino_model

        ir_dir = str(openvino_model(model_dir, settings, "int8"))  # converted once, here; Serve finds it cached

    single, stop_baselines = start_baselines(args, model_dir, ir_dir, cores)
    port = start_serve(settings, cores)
    # (b) as configured; (b0) sending every step's tokens as their own message (stream_interval_ms 0).
    apps = {"b": start_app(args, settings, model_dir, cores, port, "bench"),
            "b0": start_app(args, settings, model_dir, cores, port, "per_step", stream_interval_ms=0)}  # fmt: skip

    def serve_once(app: tuple[str, str, str]) -> Callable[[], Measured]:
        def once() -> Measured:
            first, end, produced, _chunks = stream_once(*app, args.tokens)
            return (produced - 1) / (end - first), first

        return once

    single["b_serve_one_stream"] = serve_once(apps["b"])
    single["b0_serve_one_stream_per_step"] = serve_once(apps["b0"])
    results = single_streams(single, args.repeats, args.settle)
    stop_baselines()
    # A conversation's time to first token by turn (twice; one app, one engine).
    conversations = [conversation_ttfts(*apps["b"]) for _ in range(2)]
    ttft_by_turn = [statistics.median(run[turn] for run in conversations) for turn in range(len(conversations[0]))]
    passes, per_step = loads(args, apps)
    serve.shutdown()
    ray.shutdown()
    report(args, model_dir.name, cores, results, passes, ttft_by_turn, per_step)
    return 0


def loads(args, apps: dict[str, tuple[str, str, str]]) -> tuple[dict[int, list[dict]], list[dict]]:
    """Each load level through (b), the smallest and 8 clients (the ratio the target is about) again in
    reverse order, and 8 clients through (b0) after each 8 through (b): {clients: runs}, (b0)'s runs."""
    levels = sorted(int(c) for c in args.clients.split(","))
    order = levels + [c for c in (8, levels[0]) if c in levels and c != levels[-1]]
    passes: dict[int, list[dict[str, float]]] = {}
    per_step: list[dict[str, float]] = []
    for clients in order:
        passes.setdefault(clients, []).append(under_load(args, apps["b"], clients))
        if clients == 8:
            per_step.append(under_load(args, apps["b0"], clients))
    return passes, per_step


def report(args, model: str, cores: int, results: dict, passes: dict, ttft_by_turn: list[float],
           per_step: list[dict]) -> None:  # fmt: skip
    """The tables on stdout; JSON and PNG in benchmarks/results/."""
    load = {str(c): {key: statistics.mean(run[key] for run in runs) for key in runs[0]} for c, runs in passes.items()}
    if per_step:
        load["8 (b0)"] = {key: statistics.mean(run[key] for run in per_step) for key in per_step[0]}
    base = results["a_model_generate_in_process"]["decode_tokens_per_s"]
    pairs = zip(results["a_model_generate_in_process"]["decode_tokens_per_s_runs"],
                results["b_serve_one_stream"]["decode_tokens_per_s_runs"], strict=True)  # fmt: skip
    per_round = statistics.median(b / a for a, b in pairs)
    one = load[str(min(passes))]["aggregate_tokens_per_s"]
    print(f"\nmodel {model}, {cores} cores, threads {cores}, engine {args.engine}, greedy, {args.tokens} new tokens")
    print(f"{'single stream':<32}{'decode tok/s':>14}{'vs (a)':>9}{'TTFT s':>9}")
    for name, row in results.items():
        ratio = row["decode_tokens_per_s"] / base
        print(f"{name:<32}{row['decode_tokens_per_s']:>14.1f}{ratio:>9.2f}{row['ttft_s']:>9.3f}")
    print(f"(b)/(a) round by round, median: {per_round:.2f}")
    print(f"\n{'concurrent clients':<20}{'aggregate tok/s':>16}{'vs 1 client':>13}{'median TTFT s':>15}"
          f"{'tokens/chunk':>14}{'decode batch':>14}{'step ms':>9}")  # fmt: skip
    for clients, row in load.items():
        ratio = row["aggregate_tokens_per_s"] / one
        print(f"{clients:<20}{row['aggregate_tokens_per_s']:>16.1f}{ratio:>13.2f}{row['median_ttft_s']:>15.3f}"
              f"{row['tokens_per_chunk']:>14.2f}{row['mean_decode_batch']:>14.2f}"
              f"{row['mean_decode_step_ms']:>9.1f}")  # fmt: skip
    print(f"\nconversation TTFT s by turn: {' '.join(f'{v:.3f}' for v in ttft_by_turn)}; "
          f"turn {len(ttft_by_turn)} / turn 1 = {ttft_by_turn[-1] / ttft_by_turn[0]:.2f}")  # fmt: skip
    summary = {
        "b_over_a_single_stream": results["b_serve_one_stream"]["decode_tokens_per_s"] / base,
        "b_over_a_single_stream_median_of_rounds": per_round,
        "aggregate_8_over_1": load["8"]["aggregate_tokens_per_s"] / one if "8" in load else None,
        "stream_interval_over_per_step_8_clients": (
            load["8"]["aggregate_tokens_per_s"] / load["8 (b0)"]["aggregate_tokens_per_s"] if per_step else None
        ),
        "stream_interval_over_per_step_single_stream": results["b_serve_one_stream"]["decode_tokens_per_s"]
        / results["b0_serve_one_stream_per_step"]["decode_tokens_per_s"],
        "conversation_ttft_s_by_turn": ttft_by_turn,
        **peer_ratios(results, load),
        "ttft_last_turn_over_first": ttft_by_turn[-1] / ttft_by_turn[0],
    }
    suffix = "" if args.engine == "transformers" else f"_{args.engine}"
    out = ROOT / "benchmarks" / "results" / f"serve_throughput{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model, "engine": args.engine, "cores": cores, "tokens": args.tokens,
                               "load_tokens": args.load_tokens, "rounds": args.rounds,
                               "max_batch_size": args.max_batch_size, "single_stream": results,
                               "concurrency": load, "concurrency_runs": {str(c): runs for c, runs in passes.items()},
                               "summary": summary}, indent=2) + "\n")  # fmt: skip
    chart(out.with_suffix(".png"), results, load)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def peer_ratios(single: dict[str, dict[str, float]], load: dict[str, dict[str, float]]) -> dict[str, float]:
    """The issue's targets against llama.cpp's one stream, when the peer ran."""
    if "p_llamacpp_same_gguf" not in single:
        return {}
    peer = single["p_llamacpp_same_gguf"]["decode_tokens_per_s"]
    ratios = {"b_over_llamacpp_single_stream": single["b_serve_one_stream"]["decode_tokens_per_s"] / peer}
    if "8" in load:
        ratios["aggregate_8_over_llamacpp_single_stream"] = load["8"]["aggregate_tokens_per_s"] / peer
    print("\n" + ", ".join(f"{name} {value:.2f}" for name, value in ratios.items()))
    return ratios


def chart(path: Path, single: dict[str, dict[str, float]], load: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(single)
    colors = ["#1f77b4" if n.startswith("b_") else "#d62728" if n.startswith("p_") else "#999" for n in names]
    left.bar(range(len(names)), [single[n]["decode_tokens_per_s"] for n in names], color=colors)
    left.set_xticks(range(len(names)), [n.split("_", 1)[0] for n in names])
    left.set_title("one stream: decode tokens/s")
    clients = [int(c) for c in load if c.isdigit()]
    right.plot(clients, [load[str(c)]["aggregate_tokens_per_s"] for c in clients], marker="o")
    right.set_xlabel("concurrent streaming clients")
    right.set_title("through Serve: aggregate tokens/s")
    right.set_xticks(clients)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())

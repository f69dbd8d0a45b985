"""Many LoRA adapters on one base: aggregate decode tokens/s of concurrent clients, base vs adapters.

    .venv/bin/python benchmarks/lora_throughput.py [--engine transformers|openvino] [--clients 8] [--adapters 4]
        [--tokens 96] [--rounds 4]

The replica's engine and decode loop (``TransformersEngine`` in a ``ContinuousBatcher``, as a
``ChatServer`` with ``engine: transformers`` runs them; no HTTP, whose cost is the same either
way) on the default model, with all cores. --clients threads each send one greedy request at
once and wait for its end; aggregate tokens/s = all completion tokens / wall time. Variants:
(a) the plain engine, every client on the base; (b) the adapter engine (``max_adapters``), the
clients spread over --adapters LoRA adapters (r 16 on q/k/v/o, the recipe's default shape,
random weights so that every adapter computes); (c) the adapter engine, every client on the base
(what holding adapters costs requests that use none). Every request decodes exactly --tokens
(EOS ignored, so the variants do the same work). The variants take turns, --rounds times, in
alternating order (this VM drifts); medians. Prints a table, writes
benchmarks/results/lora_throughput.json and .png. Not run by CI.

``--engine openvino``: the same variants on the OpenVINO engine (``OpenVINOEngine`` in an
``OpenVINOBatcher``, int8 weights as served by default): there adapters are served in
per-adapter groups, one pipeline each on the fp16 IR, stepped in turn (see
``ray_app/serving/openvino_engine.py``), so (b) measures what that costs; (d) is the transformers
engine's (b) in the same run, the peer, and the memory each adapter's pipeline adds to the
pipeline process is reported. Writes lora_throughput_openvino.json and .png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from charts import bar_chart  # noqa: E402 (this folder, on the path as the script's own)

PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how tides work, in detail.",
           "Describe a walk through a forest in autumn.", "Tell me about the history of bread."]  # fmt: skip


def random_adapters(model_dir: Path, count: int, out: Path) -> list[Path]:
    """``count`` LoRA adapters of the model with random (non-zero) weights, saved as PEFT folders."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for index in range(count):
        torch.manual_seed(index)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            init_lora_weights=False)  # fmt: skip
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
        folder = out / f"adapter-{index}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def batcher(engine: str, model_dir: Path, threads: int, clients: int, max_adapters: int = 0):
    if engine == "openvino":
        return openvino_batcher(model_dir, threads, clients, max_adapters)
    from ray_app.serving.engine import ContinuousBatcher, TransformersEngine

    def build() -> TransformersEngine:
        engine = TransformersEngine(model_dir, threads=threads, max_adapters=max_adapters)
        engine.eos_ids = set()  # every request decodes exactly its max_tokens: the same work in every variant
        return engine

    return ContinuousBatcher(build, max_batch_size=clients, gather_s=0.05)


def openvino_batcher(model_dir: Path, threads: int, clients: int, max_adapters: int = 0):
    from ray_app.serving.openvino_engine import OpenVINOBatcher, OpenVINOEngine
    from ray_app.serving.openvino_export import lora_base_model, openvino_model
    from ray_app.settings import get_settings

    settings = get_settings()
    ir_dir = openvino_model(model_dir, settings, "int8")
    adapter_ir = lora_base_model(model_dir, settings, "int8") if max_adapters else None

    def build() -> OpenVINOEngine:
        engine = OpenVINOEngine(ir_dir, threads, clients, adapter_ir_dir=adapter_ir, max_adapters=max_adapters)
        engine.eos_ids = set()  # as below: exactly max_tokens each
        return engine

    return OpenVINOBatcher(build, clients)


def round_of(loop, adapters: list, tokens: int) -> float:
    """One request per entry of ``adapters`` (None: the base), all at once; aggregate tokens/s."""
    from ray_app.serving.engine import GenerationRequest, SamplingParams

    def ask(index: int) -> int:
        done, produced = threading.Event(), [0]

        def emit(item) -> None:
            if isinstance(item, BaseException):
                raise item
            produced[0] = item.completion_tokens
            if item.finish_reason:
                done.set()

        prompt = loop.engine.chat_prompt_ids([{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}])
        params = SamplingParams(max_tokens=tokens, temperature=0)
        loop.submit(GenerationRequest(prompt, params, adapter=adapters[index]), emit)
        done.wait(600)
        return produced[0]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(adapters)) as pool:
        produced = sum(pool.map(ask, range(len(adapters))))
    return produced / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("transformers", "openvino"), default="transformers")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    from ray_app.models import resolve_model
    from ray_app.serving.lora import Adapter

    model_dir = resolve_model(None)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as scratch:  # the adapters are read once, when loaded
        folders = random_adapters(model_dir, args.adapters, Path(scratch))
        adapters = [Adapter(f"adapter-{i}", folder) for i, folder in enumerate(folders)]
        plain = batcher(args.engine, model_dir, cores, args.clients)
        lora = batcher(args.engine, model_dir, cores, args.clients, len(adapters))
        spread = [adapters[i % len(adapters)] for i in range(args.clients)]
        round_of(lora, spread, 4)  # warm-up: every adapter loaded
        variants = {"a_plain_engine_base": (plain, [None] * args.clients),
                    f"b_{args.adapters}_adapters": (lora, spread),
                    "c_adapter_engine_base": (lora, [None] * args.clients)}  # fmt: skip
        if args.engine == "openvino":
            peer = batcher("transformers", model_dir, cores, args.clients, len(adapters))
            round_of(peer, spread, 4)
            variants[f"d_transformers_{args.adapters}_adapters"] = (peer, spread)
    round_of(plain, [None] * args.clients, 4)
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(args.rounds):
        for name in variants if index % 2 == 0 else reversed(variants):
            loop, asked = variants[name]
            runs[name].append(round_of(loop, asked, args.tokens))
    memory = pipeline_memory(plain, lora, len(adapters)) if args.engine == "openvino" else {}
    report(args, model_dir.name, cores, runs, lora.engine.lora.loads, memory)
    return 0


def pipeline_memory(plain, lora, adapters: int) -> dict:
    """OpenVINO: the memory each adapter's pipeline adds to the pipeline process (RSS, MiB)."""
    import psutil

    rss = [psutil.Process(loop.engine.process.pid).memory_info().rss for loop in (plain, lora)]
    return {"rss_mib_per_adapter_pipeline": round((rss[1] - rss[0]) / adapters / 2**20)}


def report(args, model: str, cores: int, runs: dict[str, list[float]], loads: int, memory: dict) -> None:
    results = {name: {"tokens_per_s": statistics.median(rates), "rounds": rates} for name, rates in runs.items()}
    base = results["a_plain_engine_base"]["tokens_per_s"]
    print(f"engine {args.engine}, model {model}, {cores} cores, {args.clients} clients x {args.tokens} tokens, "
          f"{args.rounds} rounds, {args.adapters} adapters (r 16, q/k/v/o; {loads} loads) {memory or ''}")  # fmt: skip
    print(f"{'variant':<28}{'tokens/s':>10}{'vs (a)':>9}")
    for name, row in results.items():
        row["vs_base"] = row["tokens_per_s"] / base
        print(f"{name:<28}{row['tokens_per_s']:>10.1f}{row['vs_base']:>9.2f}")
    suffix = "" if args.engine == "transformers" else f"_{args.engine}"
    out = ROOT / "benchmarks" / "results" / f"lora_throughput{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"engine": args.engine, "model": model, "cores": cores, "clients": args.clients,
                               "tokens": args.tokens, "adapters": args.adapters, "results": results, **memory},
                              indent=2))  # fmt: skip
    chart(out.with_suffix(".png"), results)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def chart(path: Path, results: dict) -> None:
    names = list(results)
    colors = ["#7f7f7f", "#d62728", "#ff9896", "#1f77b4"][: len(names)]
    bar_chart(path, names, [results[name]["tokens_per_s"] for name in names], colors,
              "aggregate decode tokens/s", "Concurrent clients on the base vs spread over LoRA adapters",
              mark=lambda axis: axis.axhline(0.7 * results[names[0]]["tokens_per_s"], color="k", linestyle="--",
                                             label="target: 0.7x (a)"))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput in fp32 and in bf16 (AMX): a plain PyTorch loop vs the recipe on Ray Train + DeepSpeed.

    .venv/bin/python benchmarks/train_throughput.py [--model default] [--steps 3] [--seq-len 256] [--micro-batch 8]

Each in fp32 and in bf16 (``precision: bf16``: on CPU, ``torch.autocast`` over fp32 weights, gradients
and all-reduces): (a) a plain single-process PyTorch loop (torch's fused AdamW, the optimizer kernel
the recipe uses on CPU, all cores); (b) the recipe with 1 worker (all cores); (c) 2 workers ZeRO-2.
Tokens/s is the median over steps after each run's first
(warm-up) step; every variant runs twice, the second time in reverse order, and the steps are
pooled, because this VM's speed drifts. Model FLOPs utilisation is 6 * params * tokens/s against
the measured bf16 GEMM peak of this CPU (its peak; the fp32 peak is reported beside it). Prints a
table; writes benchmarks/results/train_throughput.json and .png. Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def gemm_peak_flops(dtype: str = "fp32", size: int = 2048, repeats: int = 5) -> float:
    """Best observed matmul FLOP/s in ``dtype`` (fp32 or bf16) with the current torch thread count."""
    import torch

    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def plain_loop(model_dir: Path, rows, steps: int, micro_batch: int, bf16: bool = False) -> list[float]:
    """(a): the same model and batches in one process, no Ray, no DeepSpeed, torch's fused AdamW
    (the recipe's optimizer on CPU); with ``bf16`` the forward under bf16 autocast, as the recipe's."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.runtime import autocast

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    rates = []
    for step in range(steps):
        batch = [rows[(step * micro_batch + i) % len(rows)] for i in range(micro_batch)]  # always full
        ids = torch.tensor([row["input_ids"] for row in batch])
        mask = torch.tensor([row["attention_mask"] for row in batch])
        labels = torch.tensor([row["labels"] for row in batch])
        start = time.perf_counter()
        with autocast(bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        rates.append(int(mask.sum()) / (time.perf_counter() - start))
    return rates


def recipe_rates(settings, model_dir: Path, data: str, **values) -> list[float]:
    """(b)-(d): tokens/s per step as the recipe logged them to MLflow."""
    from mlflow import MlflowClient

    from training.config import load_config
    from training.sft import run

    cfg = load_config(None, [], model=str(model_dir), train_data=[data], registered_model=None, eval_data=[],
                      experiment="benchmark", checkpoint_every=10_000, **values)  # fmt: skip
    result = run(cfg, settings)
    history = MlflowClient(settings.mlflow_tracking_uri).get_metric_history(result.mlflow_run_id, "tokens_per_s")
    return [point.value for point in sorted(history, key=lambda p: p.step)]


def runners(settings, model_dir: Path, rows, args, cores: int) -> dict:
    """The variants, by name: each a closure returning its tokens/s per step."""
    common = {"seq_len": args.seq_len, "micro_batch_size": args.micro_batch, "max_steps": args.steps,
              "learning_rate": 1e-5, "lr_schedule": "constant", "pack": True}  # fmt: skip
    one = {"num_workers": 1, "cpus_per_worker": cores, "torch_threads": cores}
    out = {}
    for precision in ("fp32", "bf16"):
        out[f"a_plain_pytorch_{precision}"] = lambda p=precision: plain_loop(
            model_dir, rows, args.steps, args.micro_batch, bf16=p == "bf16"
        )
        out[f"b_recipe_1worker_{precision}"] = lambda p=precision: recipe_rates(
            settings, model_dir, args.data, precision=p, **one, **common
        )
        out[f"c_recipe_2workers_zero2_{precision}"] = lambda p=precision: recipe_rates(
            settings, model_dir, args.data, num_workers=2, deepspeed="zero2.json", precision=p, **common
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--source", default=str(ROOT / "training" / "data" / "chat_sft.jsonl"))
    parser.add_argument("--repeat-data", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated name prefixes of the variants to run (a_, b_, c_)")
    args = parser.parse_args()

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from ray_app import credentials
    from ray_app.models import resolve_model
    from ray_app.settings import load_settings
    from training.data import prepare_dataset

    home = Path(tempfile.mkdtemp(prefix="llmops-bench-"))
    # The shipped set packs into 8 rows of 256: repeated, every worker gets full micro-batches of 8.
    args.data = str(home / "train.jsonl")
    Path(args.data).write_text(Path(args.source).read_text() * args.repeat_data)
    settings = load_settings(home=home, mlflow_tracking_uri=f"sqlite:///{home}/mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = str(settings.mlflow_tracking_uri)
    model_dir = resolve_model(None if args.model == "default" else args.model, settings)
    credentials.apply_ray_client_env(settings)
    ray.init(runtime_env={"env_vars": settings.worker_env() | {"DS_ACCELERATOR": "cpu"}})
    cores = int(ray.cluster_resources()["CPU"])
    rows_ds, _ = prepare_dataset([args.data], str(model_dir), args.seq_len, True, settings)
    rows = rows_ds.take_all()
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())

    torch.set_num_threads(cores)
    peaks = {dtype: gemm_peak_flops(dtype) for dtype in ("fp32", "bf16")}
    variants = runners(settings, model_dir, rows, args, cores)
    if args.only:
        variants = {name: run for name, run in variants.items() if name.startswith(tuple(args.only.split(",")))}
    # This VM's speed drifts by +-20% over minutes: every variant runs again in reverse order;
    # each run's first (warm-up) step is dropped and the two runs' steps pooled.
    runs: dict[str, list[list[float]]] = {}
    for name in [*variants, *reversed(variants)]:
        runs.setdefault(name, []).append(variants[name]())
    results = {}
    for name, repeats in runs.items():
        warm = [rates[1:] or rates for rates in repeats]
        tokens_per_s = statistics.median(rate for rates in warm for rate in rates)
        mfu, medians = 6 * params * tokens_per_s / peaks["bf16"], [statistics.median(rates) for rates in warm]
        results[name] = {"tokens_per_s": tokens_per_s, "mfu": mfu, "steps": sum(map(len, warm)), "runs": medians}
    report(results, params, peaks, args, cores, model_dir.name)
    return 0


def report(results: dict, params: int, peaks: dict, args, cores: int, model: str) -> None:
    """The table (each variant against the plain fp32 loop and against its own fp32 twin), JSON and PNG."""
    fp32, bf16 = peaks["fp32"] / 1e9, peaks["bf16"] / 1e9
    print(f"model {model}: {params / 1e6:.1f} M params, seq {args.seq_len}, micro-batch {args.micro_batch}, "
          f"{cores} cores, GEMM peak fp32 {fp32:.0f} / bf16 {bf16:.0f} GFLOP/s")  # fmt: skip
    base = results["a_plain_pytorch_fp32"]["tokens_per_s"]
    print(f"{'run':<32}{'tokens/s':>10}{'vs (a) fp32':>13}{'vs its fp32':>13}{'MFU (bf16 peak)':>17}")
    for name, row in results.items():
        rate, twin = row["tokens_per_s"], results.get(name.replace("_bf16", "_fp32"), {}).get("tokens_per_s")
        row["vs_fp32"] = rate / twin if twin and name.endswith("_bf16") else None
        versus = f"{row['vs_fp32']:.2f}" if row["vs_fp32"] else "-"
        print(f"{name:<32}{rate:>10.1f}{rate / base:>13.2f}{versus:>13}{row['mfu']:>17.1%}")
    out = ROOT / "benchmarks" / "results" / "train_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model, "params": params, "peak_flops": peaks, "cores": cores,
                               "seq_len": args.seq_len, "micro_batch": args.micro_batch, "results": results},
                              indent=2))  # fmt: skip
    chart(out.with_suffix(".png"), results)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def chart(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    colours = ["#d62728" if name.endswith("bf16") else "#7f7f7f" for name in names]
    ax.barh(names, [results[name]["tokens_per_s"] for name in names], color=colours)
    ax.invert_yaxis()
    ax.set_xlabel("trained tokens/s (median of steps; grey fp32, red bf16 autocast)")
    ax.set_title("Training throughput on this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput: a plain PyTorch loop vs the recipe on Ray Train + DeepSpeed, side by side.

    .venv/bin/python benchmarks/train_throughput.py [--model default] [--steps 6] [--seq-len 256] [--micro-batch 4]

(a) a plain single-process PyTorch loop (AdamW, same batch and sequence length, all cores),
(a2) the same loop with torch's fused AdamW (the optimizer kernel the recipe uses on CPU),
(b) the recipe with 1 worker (all cores), (c) 2 workers ZeRO-2, (d) 2 workers ZeRO-3.
Tokens/s is the median over steps after each run's first (warm-up) step; (a), (a2) and (b) run
twice (first, then again in reverse order after (d)) and pool their steps, because this VM's
speed drifts; the JSON keeps each run's median. Model FLOPs utilisation
is 6 * params * tokens/s against a measured fp32 GEMM peak of this CPU. Prints a table and
writes JSON to benchmarks/results/train_throughput.json. Not run by CI.
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


def gemm_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best observed fp32 matmul FLOP/s with the current torch thread count."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def plain_loop(model_dir: Path, rows, steps: int, micro_batch: int, fused: bool = False) -> list[float]:
    """(a): the same model and batches in one process, no Ray, no DeepSpeed (torch's default AdamW,
    or with ``fused`` its fused CPU kernel, which the recipe uses)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    rates = []
    for step in range(steps):
        batch = [rows[(step * micro_batch + i) % len(rows)] for i in range(micro_batch)]  # always full
        ids = torch.tensor([row["input_ids"] for row in batch])
        mask = torch.tensor([row["attention_mask"] for row in batch])
        labels = torch.tensor([row["labels"] for row in batch])
        start = time.perf_counter()
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--data", default=str(ROOT / "training" / "data" / "chat_sft.jsonl"))
    args = parser.parse_args()

    import ray
    import torch

    from ray_app import credentials
    from ray_app.models import resolve_model
    from ray_app.settings import load_settings
    from training.data import prepare_dataset

    home = Path(tempfile.mkdtemp(prefix="llmops-bench-"))
    settings = load_settings(home=home, mlflow_tracking_uri=f"sqlite:///{home}/mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = str(settings.mlflow_tracking_uri)
    model_dir = resolve_model(None if args.model == "default" else args.model, settings)
    credentials.apply_ray_client_env(settings)
    ray.init(runtime_env={"env_vars": settings.worker_env() | {"DS_ACCELERATOR": "cpu"}})
    cores = int(ray.cluster_resources()["CPU"])
    rows_ds, _ = prepare_dataset([args.data], str(model_dir), args.seq_len, True, settings)
    rows = rows_ds.take_all()
    params = sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir).parameters()
    )

    torch.set_num_threads(cores)
    peak = gemm_peak_flops()
    common = {"seq_len": args.seq_len, "micro_batch_size": args.micro_batch, "max_steps": args.steps,
              "learning_rate": 1e-5, "lr_schedule": "constant", "pack": True}  # fmt: skip
    runners = {
        "a_plain_pytorch_1proc": lambda: plain_loop(model_dir, rows, args.steps, args.micro_batch),
        "a2_plain_pytorch_fused_adamw": lambda: plain_loop(model_dir, rows, args.steps, args.micro_batch, fused=True),
        "b_recipe_1worker": lambda: recipe_rates(
            settings, model_dir, args.data, num_workers=1, cpus_per_worker=cores, torch_threads=cores, **common
        ),
        "c_recipe_2workers_zero2": lambda: recipe_rates(
            settings, model_dir, args.data, num_workers=2, deepspeed="zero2.json", **common
        ),
        "d_recipe_2workers_zero3": lambda: recipe_rates(
            settings, model_dir, args.data, num_workers=2, deepspeed="zero3.json", **common
        ),
    }
    # This VM's speed drifts by +-20% over minutes: (a), (a2) and (b) run again in reverse order
    # after the rest; each run's first (warm-up) step is dropped and the repeats' steps pooled.
    order = [*runners, "b_recipe_1worker", "a2_plain_pytorch_fused_adamw", "a_plain_pytorch_1proc"]
    runs: dict[str, list[list[float]]] = {}
    for name in order:
        runs.setdefault(name, []).append(runners[name]())
    results = {}
    for name, repeats in runs.items():
        warm = [rates[1:] or rates for rates in repeats]
        steady = [rate for rates in warm for rate in rates]
        tokens_per_s = statistics.median(steady)
        results[name] = {"tokens_per_s": tokens_per_s, "mfu": 6 * params * tokens_per_s / peak,
                         "steps": len(steady), "runs": [statistics.median(rates) for rates in warm]}  # fmt: skip
    base = results["a_plain_pytorch_1proc"]["tokens_per_s"]
    print(f"model {model_dir.name}: {params / 1e6:.1f} M params, seq {args.seq_len}, micro-batch {args.micro_batch}, "
          f"{cores} cores, fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
    fused = results["a2_plain_pytorch_fused_adamw"]["tokens_per_s"]
    print(f"{'run':<30}{'tokens/s':>10}{'vs (a)':>9}{'vs (a2)':>9}{'MFU':>8}")
    for name, row in results.items():
        rate = row["tokens_per_s"]
        print(f"{name:<30}{rate:>10.1f}{rate / base:>9.2f}{rate / fused:>9.2f}{row['mfu']:>8.1%}")
    out = ROOT / "benchmarks" / "results" / "train_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model_dir.name), "params": params, "peak_flops": peak, "cores": cores,
                               "seq_len": args.seq_len, "micro_batch": args.micro_batch, "results": results},
                              indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

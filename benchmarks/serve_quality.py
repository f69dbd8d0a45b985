"""What the OpenVINO engine's weight formats cost in quality: held-out loss against the fp32 model.

    .venv/bin/python benchmarks/serve_quality.py [--model default] [--variants int8/f32,int8/bf16,int4/f32]

The loss is training/evaluate.py's (mean NLL per assistant token of training/data/chat_eval.jsonl,
the same tokenization): (ref) the Hugging Face model in fp32 with torch, and each variant
WEIGHTS/ACTIVATIONS as the engine runs it: the converted IR (int8 or int4 weights,
ray_app.serving.openvino_export) compiled by OpenVINO with f32 or bf16 inference precision, the
whole conversation in one forward pass. Then the greedy answer of the served default config
(int8, f32) to "What is the capital of France?" through the OpenVINO engine. Target: every
variant the engine ships by default within 2% of the reference. Prints a table, writes
benchmarks/results/serve_quality.json and .png. Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charts import bar_chart  # noqa: E402 (this folder, on the path as the script's own)

EVAL_DATA = ROOT / "training" / "data" / "chat_eval.jsonl"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class OpenVINOForLoss:
    """An IR folder as ``heldout_nll`` calls a model: ``model(input_ids=...).logits`` and ``parameters()``."""

    def __init__(self, ir_dir: Path, precision: str):
        import openvino

        compiled = openvino.Core().compile_model(
            str(ir_dir / "openvino_model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": precision}
        )
        self.request = compiled.create_infer_request()

    def parameters(self):
        import torch

        yield torch.zeros(1)  # heldout_nll reads the device from here: CPU

    def __call__(self, input_ids):
        import numpy as np
        import torch

        ids = input_ids.numpy().astype(np.int64)
        self.request.reset_state()  # the IR is stateful (its KV cache): each conversation from scratch
        self.request.infer({"input_ids": ids, "attention_mask": np.ones_like(ids),
                            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :],
                            "beam_idx": np.zeros(ids.shape[0], dtype=np.int32)})  # fmt: skip
        logits = torch.from_numpy(self.request.get_tensor("logits").data.copy())
        return type("Output", (), {"logits": logits})()


def served_answer(ir_dir: Path) -> str:
    from ray_app.serving.engine import GenerationRequest, SamplingParams
    from ray_app.serving.openvino_engine import OpenVINOBatcher, OpenVINOEngine

    batcher = OpenVINOBatcher(lambda: OpenVINOEngine(ir_dir, threads=2, precision="f32"))
    try:
        deltas: queue.Queue = queue.Queue()
        prompt = batcher.engine.chat_prompt_ids(QUESTION)
        batcher.submit(GenerationRequest(prompt, SamplingParams(max_tokens=24, temperature=0)), deltas.put)
        text = ""
        while True:
            delta = deltas.get(timeout=120)
            text += delta.text
            if delta.finish_reason:
                return text
    finally:
        batcher.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--variants", default="int8/f32,int8/bf16,int4/f32")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_app.models import resolve_model
    from ray_app.serving.openvino_export import openvino_model
    from ray_app.settings import load_settings
    from training.evaluate import heldout_examples, heldout_nll

    settings = load_settings(home=Path(tempfile.mkdtemp(prefix="llmops-quality-")))
    model_dir = resolve_model(None if args.model == "default" else args.model, settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = heldout_examples([str(EVAL_DATA)], tokenizer, args.seq_len, settings)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, tokens = heldout_nll(reference, examples)
    losses = {"ref_torch_fp32": nll / tokens}
    del reference
    irs = {}
    for variant in args.variants.split(","):
        weights, precision = variant.split("/")
        irs[weights] = irs.get(weights) or openvino_model(model_dir, settings, weights)
        nll, _ = heldout_nll(OpenVINOForLoss(irs[weights], precision), examples)
        losses[f"openvino_{weights}_{precision}"] = nll / tokens
    answer = served_answer(irs.get("int8") or openvino_model(model_dir, settings, "int8"))

    ref = losses["ref_torch_fp32"]
    print(
        f"\nmodel {model_dir.name}: held-out loss on {EVAL_DATA.name} ({len(examples)} conversations, {tokens} tokens)"
    )
    print(f"{'variant':<26}{'loss':>9}{'vs fp32':>10}")
    for name, loss in losses.items():
        print(f"{name:<26}{loss:>9.4f}{(loss / ref - 1) * 100:>9.2f}%")
    print(f"served default (int8, f32) answers: {answer!r}")
    out = ROOT / "benchmarks" / "results" / "serve_quality.json"
    out.write_text(json.dumps({"model": model_dir.name, "data": EVAL_DATA.name, "tokens": tokens, "losses": losses,
                               "relative_to_fp32": {k: v / ref - 1 for k, v in losses.items()},
                               "served_answer": answer}, indent=2) + "\n")  # fmt: skip
    chart(out.with_suffix(".png"), losses)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


def chart(path: Path, losses: dict[str, float]) -> None:
    names, ref = list(losses), losses["ref_torch_fp32"]
    colors = ["#999"] + ["#1f77b4"] * (len(names) - 1)

    def band(axis) -> None:
        axis.axhspan(ref * 0.98, ref * 1.02, color="#2ca02c", alpha=0.2, label="fp32 +-2%")

    bar_chart(path, [n.replace("openvino_", "") for n in names], [losses[n] for n in names], colors, "held-out loss",
              ylim=(ref * 0.9, max(losses.values()) * 1.03), mark=band)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

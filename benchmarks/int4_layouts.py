"""Why one stream stays under 0.8x llama.cpp: weight layouts of the default model, their held-out loss and speed.

    .venv/bin/python benchmarks/int4_layouts.py [--rounds 4] [--tokens 128]

The default model is a Q4_1 GGUF (4-bit blocks of 32 with a float scale and a float minimum; the
embedding Q8_0); the project's fp32 model is that file dequantized. Decoding one stream reads every
weight once a token, so bytes decide the speed. Variants, each an OpenVINO IR run by the
ContinuousBatchingPipeline the engine uses (greedy, 2 threads, f32 activations):

- int8: the engine's default (NNCF, per channel); int4_g64 / int4_g32: NNCF data-free int4;
- gguf_reader: OpenVINO GenAI reading the GGUF itself (its IR saved with ``enable_save_ov_model``);
- exact_float_zp: the Q4_1 grid written exactly (u4 weights, float zero points, f16 scales; the
  embedding as i8 blocks of 32), built here from the fp32 export;
- rounded_zp: the same grid with the zero point rounded to an integer (what the fast kernels take)
  and the scale refit by least squares; rounded_zp_bias: plus bias correction from the mean input
  of each layer over ``chat_sft.jsonl``;

and (p) llama.cpp on the GGUF (benchmark-only venv, see serve_throughput.py). Held-out loss is
training/evaluate.py's on ``chat_eval.jsonl`` and ``chat_sft.jsonl`` against the fp32 model; speed
is decode tokens/s of one stream, the variants in turn for --rounds rounds (medians). Beside it,
what a serving default must not lose: 8 streams decoded together (aggregate tokens/s) and the
prefill of a 600-token prompt, in the same pipeline (OpenVINO variants only; a layout with float
zero points misses the CPU plugin's fast path there). Prints a table, writes
benchmarks/results/int4_layouts.json and .png. Not run by CI.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from charts import bar_chart  # noqa: E402 (this folder, on the path as the script's own)

GROUP = 32  # Q4_1's and Q8_0's block
DATA = ("chat_eval", "chat_sft")
IR_EXTRAS = ("openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml",
             "openvino_detokenizer.bin", "config.json", "generation_config.json")  # fmt: skip
EXPORT_ENV = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ} | {
    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}  # fmt: skip


# --- the Q4_1 grid, rewritten ---------------------------------------------------------------------
def q4_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(levels 0..15, scale, minimum) per block of 32 when ``weight`` lies exactly on a 16-level grid
    per block (a dequantized Q4_1 tensor), else None."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // GROUP, GROUP).astype(np.float64)
    low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    scale = (high - low) / 15
    levels = np.rint((blocks - low) / np.where(scale == 0, 1, scale))
    error = np.abs(levels * scale + low - blocks)
    return (levels.astype(np.uint8), scale, low) if (error <= 1e-3 * np.abs(scale) + 1e-12).all() else None


def q8_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 values, scale) per block of 32 when ``weight`` is a dequantized Q8_0 tensor, else None."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // GROUP, GROUP).astype(np.float64)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    values = np.rint(blocks / np.where(scale == 0, 1, scale))
    exact = (np.abs(values * scale - blocks) <= 1e-3 * scale + 1e-12).all()
    return (values.astype(np.int8), scale) if exact else None


def zero_point_and_scale(levels, scale, low, exact: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(zero point, scale, error of each weight) writing levels*scale + low as (levels - zero point) * scale:
    exact (a float zero point), or with the zero point rounded (floor or ceil, whichever fits better once
    the scale is refit by least squares: the fast kernels take integer zero points only)."""
    target = levels * scale + low
    if exact:
        zero = -low / np.where(scale == 0, 1, scale)
        return zero, scale, np.zeros_like(target)
    below, best = np.floor(-low / np.where(scale == 0, 1, scale)), None
    for zero in (np.clip(below, 0, 15), np.clip(below + 1, 0, 15)):
        shifted = levels - zero
        fit = (shifted * target).sum(-1, keepdims=True) / np.maximum((shifted**2).sum(-1, keepdims=True), 1e-30)
        fit = fit.astype(np.float16).astype(np.float64)
        error = shifted * fit - target
        if best is None:
            best = (zero, fit, error)
        else:
            better = (error**2).sum(-1, keepdims=True) < (best[2] ** 2).sum(-1, keepdims=True)
            best = tuple(np.where(better, new, old) for new, old in zip((zero, fit, error), best, strict=True))
    return best


def rewrite_q4_1(fp32_xml: Path, out_xml: Path, mode: str, means: dict[str, np.ndarray] | None = None) -> dict:
    """The fp32 IR with every linear weight on a Q4_1 grid as u4 blocks (``mode``: exact | rounded) and the
    Q8_0 embedding as i8 blocks; with ``means``, each layer's mean output error on them is added as a bias."""
    import openvino as ov
    import openvino.opset13 as ops

    model = ov.Core().read_model(str(fp32_xml))
    counts = {"q4": 0, "q8": 0, "kept": 0}
    for op in model.get_ordered_ops():
        shape = op.get_output_partial_shape(0)
        if op.get_type_name() != "Constant" or op.get_output_element_type(0) != ov.Type.f32 or len(shape) != 2:
            continue
        if "MatMul" not in {target.get_node().get_type_name() for target in op.output(0).get_target_inputs()}:
            continue
        weight = op.get_data()
        if weight.shape[1] % GROUP:
            continue
        if (q4 := q4_blocks(weight)) is not None:
            zero, scale, error = zero_point_and_scale(*q4, exact=mode == "exact")
            kind = ov.Type.f16 if mode == "exact" else ov.Type.u4
            zero_node = ops.constant(zero.astype(np.float16 if mode == "exact" else np.uint8), kind)
            values = ops.subtract(ops.convert(ops.constant(q4[0], ov.Type.u4), ov.Type.f16),
                                  zero_node if mode == "exact" else ops.convert(zero_node, ov.Type.f16))  # fmt: skip
            decompressed = ops.multiply(values, ops.constant(scale.astype(np.float16)))
            name = op.get_friendly_name().removeprefix("self.").removesuffix(".weight")
            if means is not None and name in means:
                _add_bias(op, -(error.reshape(weight.shape) @ means[name]))
            counts["q4"] += 1
        elif (q8 := q8_blocks(weight)) is not None:
            decompressed = ops.multiply(ops.convert(ops.constant(q8[0], ov.Type.i8), ov.Type.f16),
                                        ops.constant(q8[1].astype(np.float16)))  # fmt: skip
            counts["q8"] += 1
        else:
            counts["kept"] += 1
            continue
        flat = ops.reshape(decompressed, ops.constant(np.array(weight.shape, dtype=np.int64)), False)
        op.output(0).replace(ops.convert(flat, ov.Type.f32).output(0))
    ov.save_model(model, str(out_xml), compress_to_fp16=False)
    return counts


def _add_bias(weight_op, bias: np.ndarray) -> None:
    import openvino.opset13 as ops

    for target in list(weight_op.output(0).get_target_inputs()):
        matmul = target.get_node()
        if matmul.get_type_name() == "MatMul":
            users = list(matmul.output(0).get_target_inputs())
            added = ops.add(matmul.output(0), ops.constant(bias.astype(np.float32)))
            for user in users:
                user.replace_source_output(added.output(0))


def layer_input_means(model_dir: Path, examples) -> dict[str, np.ndarray]:
    """The mean input of every linear layer of the fp32 model over ``examples`` (calibration for the bias)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(_module, inputs, _output):
            rows = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + rows.sum(0)
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        for input_ids, _labels in examples:
            model(input_ids=torch.tensor([input_ids]))
    return {name: (sums[name] / counts[name]).numpy() for name in sums}


# --- the variants ------------------------------------------------------------------------------------
def build_variants(model_dir: Path, settings, work: Path, examples: dict) -> dict[str, Path]:
    """Every variant's IR folder (converted or rewritten here; the engine's own cached ones reused)."""
    import shutil

    from ray_app.models import default_gguf_path
    from ray_app.serving.openvino_export import openvino_model

    irs = {"int8": openvino_model(model_dir, settings, "int8"), "int4_g64": openvino_model(model_dir, settings, "int4")}
    fp32 = openvino_model(model_dir, settings, "fp32")
    cli = ROOT / ".venv-openvino" / "bin" / "optimum-cli"
    irs["int4_g32"] = work / "int4_g32"
    subprocess.run([str(cli), "export", "openvino", "--model", str(model_dir), "--task", "text-generation-with-past",
                    "--weight-format", "int4", "--group-size", "32", "--ratio", "1.0", str(irs["int4_g32"])],
                   check=True, capture_output=True, env=EXPORT_ENV)  # fmt: skip
    irs["gguf_reader"] = gguf_ir(default_gguf_path(), work / "gguf_reader")
    means = layer_input_means(model_dir, examples["chat_sft"])
    for name, mode, calibration in (("exact_float_zp", "exact", None), ("rounded_zp", "rounded", None),
                                    ("rounded_zp_bias", "rounded", means)):  # fmt: skip
        folder = work / name
        folder.mkdir()
        for extra in IR_EXTRAS:
            if (fp32 / extra).is_file():
                shutil.copy(fp32 / extra, folder / extra)
        counts = rewrite_q4_1(fp32 / "openvino_model.xml", folder / "openvino_model.xml", mode, calibration)
        print(f"{name}: {counts}")
        irs[name] = folder
    return irs


def gguf_ir(gguf: Path, folder: Path) -> Path:
    """The IR OpenVINO GenAI builds from the GGUF (its reader saves it beside a copy of the file)."""
    import shutil

    import openvino_genai

    folder.mkdir()
    shutil.copy(gguf, folder / gguf.name)  # kept: the speed runs read the GGUF, as a user of the reader would
    openvino_genai.LLMPipeline(str(folder / gguf.name), "CPU", {"enable_save_ov_model": True})
    return folder


def losses(irs: dict[str, Path], model_dir: Path, examples: dict) -> dict[str, dict[str, float]]:
    """Held-out loss per data set: the fp32 reference, then each IR."""
    import torch
    from serve_quality import OpenVINOForLoss
    from transformers import AutoModelForCausalLM

    from training.evaluate import heldout_nll

    def mean(model) -> dict[str, float]:
        out = {}
        for data, rows in examples.items():
            nll, tokens = heldout_nll(model, rows)
            out[data] = nll / tokens
        return out

    found = {"fp32": mean(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())}
    for name, folder in irs.items():
        found[name] = mean(OpenVINOForLoss(folder, "f32"))
    return found


@functools.cache
def _pipeline(folder: Path):
    """One ContinuousBatchingPipeline per variant (greedy, 2 threads, f32 activations, up to 8 sequences)."""
    import openvino_genai

    scheduler = openvino_genai.SchedulerConfig()
    scheduler.cache_size, scheduler.max_num_seqs, scheduler.max_num_batched_tokens = 1, 8, 2048
    scheduler.enable_prefix_caching = False  # every prefill measured is computed
    return openvino_genai.ContinuousBatchingPipeline(
        str(folder), scheduler, "CPU", {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"}
    )


def pipeline_runner(folder: Path, prompt_ids: list[int], tokens: int):
    """Decode tokens/s of one greedy stream in the ContinuousBatchingPipeline (the engine's), in this process;
    ``folder``: an IR folder or a GGUF file."""
    import openvino
    import openvino_genai

    pipeline = _pipeline(folder)
    ids = openvino.Tensor(np.asarray([prompt_ids], dtype=np.int64))
    counter = iter(range(1 << 30))

    def once() -> float:
        config = openvino_genai.GenerationConfig()
        config.max_new_tokens, config.ignore_eos = tokens, True
        handle = pipeline.add_request(next(counter), ids, config)
        produced, first = 0, None
        while handle.get_status() == openvino_genai.GenerationStatus.RUNNING or handle.can_read():
            pipeline.step()
            if handle.can_read():
                produced += sum(len(output.generated_ids) for output in handle.read().values())
                first = first or time.perf_counter()
        return (produced - 1) / (time.perf_counter() - first)

    once()  # warm-up
    return once


def batch_runners(folder: Path, prompt_ids: list[int], clients: int = 8, tokens: int = 96):
    """(aggregate tokens/s of ``clients`` streams decoded together, seconds to prefill 600 tokens), each a
    callable measuring once, on the ContinuousBatchingPipeline the engine uses."""
    import openvino
    import openvino_genai

    pipeline = _pipeline(folder)
    counter = iter(range(1 << 31, 1 << 32))  # request ids apart from the one-stream runner's

    def run(ids: list[list[int]], new_tokens: int) -> int:
        handles = []
        for row in ids:
            config = openvino_genai.GenerationConfig()
            config.max_new_tokens, config.ignore_eos = new_tokens, True
            tensor = openvino.Tensor(np.asarray([row], dtype=np.int64))
            handles.append(pipeline.add_request(next(counter), tensor, config))
        produced = 0
        while pipeline.has_non_finished_requests():
            pipeline.step()
            produced += sum(len(out.generated_ids) for h in handles if h.can_read() for out in h.read().values())
        return produced

    def batch() -> float:
        started = time.perf_counter()
        produced = run([[*prompt_ids, 10 + client] for client in range(clients)], tokens)  # distinct prompts
        return produced / (time.perf_counter() - started)

    def prefill() -> float:
        started = time.perf_counter()
        run([(prompt_ids * (600 // len(prompt_ids) + 1))[:600]], 1)
        return time.perf_counter() - started

    batch(), prefill()  # warm-up
    return batch, prefill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--llamacpp-python", type=Path, default=ROOT / ".venv-llamacpp" / "bin" / "python")
    args = parser.parse_args()

    from serve_throughput import PROMPT, llamacpp_runner
    from transformers import AutoTokenizer

    from ray_app.models import default_gguf_path, resolve_model
    from ray_app.settings import load_settings
    from training.evaluate import heldout_examples

    settings = load_settings(home=Path(tempfile.mkdtemp(prefix="llmops-int4-")))
    model_dir = resolve_model(None, settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = {data: heldout_examples([str(ROOT / "training" / "data" / f"{data}.jsonl")], tokenizer, 512, settings)
                for data in DATA}  # fmt: skip
    irs = build_variants(model_dir, settings, Path(tempfile.mkdtemp(prefix="llmops-int4-irs-")), examples)
    loss = losses(irs, model_dir, examples)
    prompt = tokenizer(tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False).input_ids  # fmt: skip
    gguf_name = default_gguf_path().name
    runners = {name: pipeline_runner(folder / gguf_name if (folder / gguf_name).is_file() else folder, prompt,
                                     args.tokens) for name, folder in irs.items()}  # fmt: skip
    for name, folder in irs.items():
        if not (folder / gguf_name).is_file():
            batch, prefill = batch_runners(folder, prompt)
            runners[f"{name}{BATCH}"], runners[f"{name}{PREFILL}"] = batch, prefill
    peer = None
    if args.llamacpp_python.is_file():
        peer, llamacpp = llamacpp_runner(args.llamacpp_python, 2, args.tokens)
        runners["llamacpp_q4_1"] = lambda: llamacpp()[0]
        loss["llamacpp_q4_1"] = llamacpp_loss(args.llamacpp_python, default_gguf_path(), examples)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):  # in turn: this VM's speed drifts by +-20% over minutes
        for name, once in runners.items():
            time.sleep(1.0)
            rates[name].append(once())
    if peer is not None:
        peer.stdin.close()
        peer.wait(timeout=30)
    sizes = {name: (folder / "openvino_model.bin").stat().st_size / 1e6 for name, folder in irs.items()}
    report(loss, rates, sizes | {"llamacpp_q4_1": default_gguf_path().stat().st_size / 1e6})
    return 0


def llamacpp_loss(python: Path, gguf: Path, examples: dict) -> dict[str, float]:
    """llama.cpp's held-out loss on the same token ids (the peer script's --loss mode, in its own venv)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(examples, file)
        file.flush()
        argv = [str(python), str(ROOT / "benchmarks" / "llamacpp_peer.py"), "--loss", str(gguf), file.name]
        return json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


BATCH, PREFILL = " 8 streams", " prefill"  # the suffixes of the batched and prefill runs' names


def report(loss: dict, rates: dict, sizes: dict[str, float]) -> None:
    reference, peer = loss["fp32"], statistics.median(rates.get("llamacpp_q4_1") or [float("nan")])
    base = {suffix: statistics.median(rates[f"int8{suffix}"]) for suffix in (BATCH, PREFILL)}
    rows = {}
    print(f"\n{'variant':<18}{'MB':>7}{'tok/s':>8}{'vs llama.cpp':>14}" + "".join(f"{d + ' loss':>22}" for d in DATA)
          + f"{'8 streams vs int8':>19}{'prefill vs int8':>17}")  # fmt: skip
    for name in (name for name in rates if not name.endswith((BATCH, PREFILL))):
        size = sizes[name]
        rate = statistics.median(rates[name])
        change = {data: loss[name][data] / reference[data] - 1 for data in DATA}
        batch, prefill = (rates.get(f"{name}{suffix}") for suffix in (BATCH, PREFILL))
        relative = {"batch_vs_int8": statistics.median(batch) / base[BATCH] if batch else None,
                    "prefill_s_vs_int8": statistics.median(prefill) / base[PREFILL] if prefill else None}  # fmt: skip
        rows[name] = {"mb": size, "tokens_per_s": rate, "vs_llamacpp": rate / peer, "loss": loss[name],
                      "loss_vs_fp32": change, "runs": rates[name], **relative,
                      "batch_runs": batch, "prefill_runs": prefill}  # fmt: skip
        shown = "".join(f"{value:>17.2f}" if value else f"{'-':>17}" for value in relative.values())
        print(f"{name:<18}{size:>7.1f}{rate:>8.1f}{rate / peer:>14.2f}"
              + "".join(f"{loss[name][d]:>14.4f} ({change[d]:+.1%})" for d in DATA) + shown)  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "int4_layouts.json"
    out.write_text(json.dumps({"reference_loss": reference, "variants": rows}, indent=2) + "\n")
    names = list(rows)
    bar_chart(out.with_suffix(".png"), names, [rows[n]["vs_llamacpp"] for n in names],
              ["#d62728" if rows[n]["loss_vs_fp32"]["chat_eval"] > 0.02 else "#1f77b4" for n in names],
              "decode tok/s vs llama.cpp", "one stream; red: held-out loss > +2% of fp32",
              mark=lambda axis: axis.axhline(0.8, color="k", linestyle="--", label="target 0.8x"))  # fmt: skip
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    raise SystemExit(main())

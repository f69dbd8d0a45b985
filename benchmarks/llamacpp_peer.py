"""The llama.cpp peer of serve_throughput.py, run by a benchmark-only venv's Python (llama-cpp-python).

    .venv-llamacpp/bin/python benchmarks/llamacpp_peer.py GGUF THREADS TOKENS PROMPT_JSON
    .venv-llamacpp/bin/python benchmarks/llamacpp_peer.py --loss GGUF EXAMPLES_JSON   # held-out loss, one JSON line

Loads the GGUF (the very file the project ships as its default model), then answers each line
"go" on stdin with one JSON line ``[decode tokens/s, TTFT s]``: greedy, exactly TOKENS new
tokens for the chat-templated PROMPT (EOS does not stop it). ``n_batch=1``: on this CPU a
native build's batched prompt processing (the AMX path) segfaults (../shared/FINDINGS.md).
Imports nothing of the project: that venv has only llama-cpp-python.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> int:
    from llama_cpp import Llama

    if sys.argv[1] == "--loss":
        print(json.dumps(held_out_loss(Llama, sys.argv[2], sys.argv[3])), flush=True)
        return 0

    gguf, threads, tokens, messages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=1, n_ubatch=1,
                verbose=False)  # fmt: skip
    prompt = llm.tokenize(apply_template(llm, messages).encode(), add_bos=False, special=True)

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        first, produced = None, 0
        for _token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            produced += 1
            if first is None:
                first = time.perf_counter()
            if produced == tokens:
                break
        return (produced - 1) / (time.perf_counter() - first), first - start

    once()  # warm-up
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        print(json.dumps(once()), flush=True)
    return 0


def held_out_loss(llama, gguf: str, examples_json: str) -> dict[str, float]:
    """Mean NLL of the labelled tokens of ``{set: [[input_ids, labels], ...]}`` (labels -100: not scored),
    as training/evaluate.py computes it, from llama.cpp's logits of every position."""
    import math

    import numpy as np

    llm = llama(model_path=gguf, n_ctx=1024, n_threads=2, n_batch=1, n_ubatch=1, logits_all=True, verbose=False)
    out = {}
    for name, examples in json.loads(Path(examples_json).read_text()).items():
        nll, count = 0.0, 0
        for input_ids, labels in examples:
            llm.reset()
            llm.eval(input_ids)
            logits = np.asarray(llm.scores[: len(input_ids)], dtype=np.float64)
            for position in range(len(input_ids) - 1):
                if labels[position + 1] != -100:
                    row = logits[position]
                    top = row.max()
                    nll -= row[labels[position + 1]] - top - math.log(np.exp(row - top).sum())
                    count += 1
        out[name] = nll / count
    return out


def apply_template(llm, messages: list[dict[str, str]]) -> str:
    """The GGUF's own chat template (ChatML for SmolLM2) with the assistant turn opened."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata["tokenizer.chat_template"]
    eos = llm.detokenize([llm.token_eos()]).decode()
    return Jinja2ChatFormatter(template, eos_token=eos, bos_token="").__call__(messages=messages).prompt


if __name__ == "__main__":
    raise SystemExit(main())

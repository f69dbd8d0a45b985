"""The llama.cpp peer of serve_throughput.py, run by a benchmark-only venv's Python (llama-cpp-python).

    .venv-llamacpp/bin/python benchmarks/llamacpp_peer.py GGUF THREADS TOKENS PROMPT_JSON

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


def main() -> int:
    from llama_cpp import Llama

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


def apply_template(llm, messages: list[dict[str, str]]) -> str:
    """The GGUF's own chat template (ChatML for SmolLM2) with the assistant turn opened."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata["tokenizer.chat_template"]
    eos = llm.detokenize([llm.token_eos()]).decode()
    return Jinja2ChatFormatter(template, eos_token=eos, bos_token="").__call__(messages=messages).prompt


if __name__ == "__main__":
    raise SystemExit(main())

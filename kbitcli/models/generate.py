"""generate: text from a dense or k-bit causal LM (greedy by default), with timing."""

from __future__ import annotations

import time

import torch

from kbitcli.errors import bad_input
from kbitcli.formats.kbit_format import looks_kbit
from kbitcli.models.load import load_model


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
                  seed: int | None = None, top_k: int | None = None) -> dict:
    """Continue `prompt` with an already loaded model; temperature 0 = greedy."""
    if not getattr(model, "can_generate", lambda: False)():
        raise bad_input(f"{type(model).__name__} cannot generate text (an encoder?); "
                        "`kbit generate` needs a causal LM such as LlamaForCausalLM or GPT2LMHeadModel")
    if tokenizer is None:
        raise bad_input("the model folder has no tokenizer files (tokenizer.json / tokenizer_config.json); copy them in")
    if max_new_tokens < 1:
        raise bad_input(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise bad_input(f"--temperature must be >= 0, got {temperature}")
    enc = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
                  if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_k=top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    seconds = time.perf_counter() - t0
    n_prompt = enc["input_ids"].shape[1]
    new = out[0, n_prompt:].tolist()
    return {"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
            "text": tokenizer.decode(out[0], skip_special_tokens=True), "prompt_tokens": n_prompt,
            "new_tokens": len(new), "token_ids": new, "greedy": temperature == 0, "seconds": round(seconds, 4),
            "tokens_per_s": round(len(new) / seconds, 2) if seconds > 0 else None}


def generate(path: str, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0, seed: int | None = None,
             dtype=None, device: str = "cpu") -> dict:
    """Load `path` (dense or k-bit) and continue `prompt`."""
    model, tok = load_model(path, dtype=dtype, device=device)
    result = generate_text(model, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    info = getattr(model, "kbit_info", None)
    return {"model": path, "kbit": looks_kbit(path), "architecture": type(model).__name__,
            "quantization": info["quantization_config"] if info else None, **result}

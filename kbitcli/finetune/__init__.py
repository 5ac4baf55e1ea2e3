"""QLoRA-style finetuning: LoRA adapters trained in full precision on a frozen k-bit base.

    from kbitcli.finetune import finetune, TrainConfig
    summary = finetune("stories-nf4", "run1", "train.txt", TrainConfig(rank=8, steps=200), eval_data="valid.txt")

Modules: config (settings), lora (the adapter module), data (text -> blocks), train (the loop),
checkpoint (resume state), peft_io (PEFT files), merge (fold into k-bit or dense), run (the whole run).
"""

from kbitcli.finetune.config import TrainConfig, load_config, with_flags
from kbitcli.finetune.run import finetune

__all__ = ["TrainConfig", "finetune", "load_config", "with_flags"]

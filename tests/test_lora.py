"""LoRA (pia_torch/lora.py): every file layout fuses to W + w·(α/r)·up @ down, unfuse is bit-exact,
forward-time frames equal fused frames, stacked adapters add up, and the fused UNet and text encoder
equal diffusers + peft where diffusers is right (uniform alpha).

LoRA files are random tensors written with safetensors into tmp_path. Weight tests use the "small" UNet
(SD1.5 block layout: 4 levels, 2 layers per block, so LDM names reach input_blocks_11); frame tests use
pia_torch.demo.tiny_pipeline().
"""

from __future__ import annotations

import copy
import json

import diffusers
import numpy as np
import pytest
import torch
from conftest import make_unet2d
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from pia_torch.demo import demo_image, tiny_pipeline
from pia_torch.loading import MotionAdapter, load_table, load_unet, remap
from pia_torch.lora import LoraAdapters, lora_names
from pia_torch.pipeline import PIAPipeline

# kohya names with diffusers paths -> pia_torch targets: attention Linears, 1x1 proj convs, LoCon 3x3 and
# 1x1 resnet convs, the stride-2 downsampler, an upsampler, a motion module; both text-encoder prefixes.
KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k": "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0": "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj": "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.proj_in",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": "unet.mid_block.attentions.0.transformer_blocks.0.ff.proj_out",
    "lora_unet_down_blocks_2_attentions_0_proj_in": "unet.down_blocks.2.attentions.0.proj_in",
    "lora_unet_up_blocks_3_attentions_0_proj_out": "unet.up_blocks.3.attentions.0.proj_out",
    "lora_unet_down_blocks_0_resnets_0_conv1": "unet.down_blocks.0.resnets.0.conv1",
    "lora_unet_up_blocks_0_resnets_2_conv2": "unet.up_blocks.0.resnets.2.conv2",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "unet.down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_down_blocks_3_resnets_1_time_emb_proj": "unet.down_blocks.3.resnets.1.time_emb_proj",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "unet.down_blocks.0.downsample.conv",
    "lora_unet_up_blocks_2_upsamplers_0_conv": "unet.up_blocks.2.upsample.conv",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.encoder.layers.0.self_attn.q_proj",
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj": "text_encoder.encoder.layers.1.self_attn.out_proj",
    "lora_te1_text_model_encoder_layers_1_mlp_fc1": "text_encoder.encoder.layers.1.mlp.fc1",
}
MOTION = {
    "lora_unet_down_blocks_1_motion_modules_0_transformer_blocks_0_attn1_to_q": "unet.down_blocks.1.motion_modules.0.transformer_blocks.0.attn1.to_q"
}
# LDM (SGM) names, spec/checkpoints.md §3 arithmetic with layers_per_block = 2, worked out by hand.
LDM = {
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_input_blocks_4_0_in_layers_2": "unet.down_blocks.1.resnets.0.conv1",
    "lora_unet_input_blocks_4_0_skip_connection": "unet.down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsample.conv",
    "lora_unet_input_blocks_8_1_proj_out": "unet.down_blocks.2.attentions.1.proj_out",
    "lora_unet_middle_block_1_proj_in": "unet.mid_block.attentions.0.proj_in",
    "lora_unet_middle_block_2_out_layers_3": "unet.mid_block.resnets.1.conv2",
    "lora_unet_output_blocks_5_2_conv": "unet.up_blocks.1.upsample.conv",
    "lora_unet_output_blocks_8_0_skip_connection": "unet.up_blocks.2.resnets.2.conv_shortcut",
    "lora_unet_output_blocks_11_1_transformer_blocks_0_ff_net_2": "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.proj_out",
    "lora_unet_output_blocks_0_0_emb_layers_1": "unet.up_blocks.0.resnets.0.time_emb_proj",
}
# diffusers gets these wrong: its substring test "input_blocks_1" also gathers input_blocks_10/11 keys
# (KeyError when both occur), and output_blocks_2_1_conv becomes up_blocks.0.attentions.2.conv (not found).
LDM_DIFFUSERS_GETS_WRONG = {
    "lora_unet_input_blocks_10_0_in_layers_2": "unet.down_blocks.3.resnets.0.conv1",
    "lora_unet_input_blocks_11_0_emb_layers_1": "unet.down_blocks.3.resnets.1.time_emb_proj",
    "lora_unet_output_blocks_2_1_conv": "unet.up_blocks.0.upsample.conv",
}
# diffusers / PEFT names (diffusers paths; text encoder with and without text_model.) -> pia_torch targets
PEFT = {
    "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v": "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
    "unet.up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.0": "unet.up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out",
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "unet.mid_block.attentions.0.transformer_blocks.0.ff.proj_in",
    "unet.down_blocks.2.resnets.1.conv2": "unet.down_blocks.2.resnets.1.conv2",
    "unet.up_blocks.1.upsamplers.0.conv": "unet.up_blocks.1.upsample.conv",
    "unet.down_blocks.1.attentions.0.proj_in": "unet.down_blocks.1.attentions.0.proj_in",
    "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": "text_encoder.encoder.layers.0.self_attn.k_proj",
    "text_encoder.encoder.layers.1.mlp.fc2": "text_encoder.encoder.layers.1.mlp.fc2",
}
PEFT_METADATA = {
    "unet.r": 4,
    "unet.lora_alpha": 8,
    "unet.alpha_pattern": {"up_blocks.1.upsamplers.0.conv": 1.0},
    "unet.rank_pattern": {"mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": 2},
    "unet.target_modules": [n.removeprefix("unet.") for n in PEFT if n.startswith("unet.")],
    "text_encoder.r": 4,
    "text_encoder.lora_alpha": 2,
    "text_encoder.target_modules": ["encoder.layers.0.self_attn.k_proj", "encoder.layers.1.mlp.fc2"],
}


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_text_encoder(hidden: int, seed: int = 30) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


@pytest.fixture
def small(checkpoints) -> LoraAdapters:
    """LoRA manager on a fresh "small" pia_torch UNet (SD1.5 block layout) and a CLIP text encoder."""
    folders = checkpoints("small")
    unet = load_unet(folders["unet"], MotionAdapter.from_pretrained(folders["adapter"]), convention="diffusers")
    return LoraAdapters(unet, make_text_encoder(32))


def target(lora: LoraAdapters, key: str) -> nn.Module:
    component, path = key.split(".", 1)
    return getattr(lora, component).get_submodule(path)


def lora_file(path, lora: LoraAdapters, names: dict[str, str], rank=4, alpha=None, peft=False, metadata=None, seed=0):
    """Random down/up pairs (std 0.1) for each name -> target, saved to `path`. rank/alpha: a number or
    {name: value}; alpha None = no .alpha key. Returns {target: (α/r, up, down)} with α = r if absent."""
    g, sd, expect = torch.Generator().manual_seed(seed), {}, {}
    for name, key in names.items():
        weight = target(lora, key).weight
        r = rank[name] if isinstance(rank, dict) else rank
        a = alpha.get(name) if isinstance(alpha, dict) else alpha
        down = 0.1 * torch.randn(r, *weight.shape[1:], generator=g)
        up = 0.1 * torch.randn(weight.shape[0], r, *[1] * (weight.ndim - 2), generator=g)
        sd[name + (".lora_A.weight" if peft else ".lora_down.weight")] = down
        sd[name + (".lora_B.weight" if peft else ".lora_up.weight")] = up
        if a is not None:
            sd[name + ".alpha"] = torch.tensor(float(a))
        expect[key] = ((r if a is None else a) / r, up, down)
    save_file(sd, path, metadata=None if metadata is None else {"lora_adapter_metadata": json.dumps(metadata)})
    return expect


def formula(weight: torch.Tensor, terms: list[tuple[float, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """W + Σ c · up @ down, in float64 (the reference the float32 merge must be within rounding of)."""
    delta = sum(c * (up.double().flatten(1) @ down.double().flatten(1)) for c, up, down in terms)
    return weight.double() + delta.view(weight.shape)


def snapshot(lora: LoraAdapters) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(lora, c).state_dict().items()}


def assert_fused(lora: LoraAdapters, before: dict, expect: dict[str, list]) -> None:
    """Targets equal the formula to float32 rounding; every other tensor is untouched, bit for bit."""
    after = snapshot(lora)
    for key, value in before.items():
        module_key = key.removesuffix(".weight")
        if module_key in expect:
            torch.testing.assert_close(after[key].double(), formula(value, expect[module_key]), rtol=1e-6, atol=1e-7)
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key


def assert_restored(lora: LoraAdapters, before: dict) -> None:
    after = snapshot(lora)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def run(pipe: PIAPipeline, seed: int = 0) -> np.ndarray:
    return pipe(
        demo_image().resize((32, 32)),
        "a cat in a field",
        num_frames=4,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).frames


# --------------------------------------------------------------------------------------------- layouts


def test_kohya_diffusers_names_per_module_alpha_locon(small, tmp_path):
    """kohya names, mixed ranks, a different alpha per module and one missing (α = r), LoCon convs."""
    names = {**KOHYA, **MOTION}
    ranks = {n: (2, 4, 8)[i % 3] for i, n in enumerate(names)}
    alphas = {n: 0.5 + i for i, n in enumerate(names) if i != 3}
    expect = lora_file(tmp_path / "k.safetensors", small, names, ranks, alphas)
    before = snapshot(small)
    small.load(tmp_path / "k.safetensors", "k")
    small.set_adapters("k", 0.7)
    small.fuse(lora_scale=0.5)
    assert_fused(small, before, {k: [(0.7 * 0.5 * s, up, down)] for k, (s, up, down) in expect.items()})
    small.unfuse()
    assert_restored(small, before)


def test_kohya_ldm_names(small, tmp_path):
    """LDM (SGM) block names, including input_blocks_10/11 and the output blocks' upsample convs."""
    names = {**LDM, **LDM_DIFFUSERS_GETS_WRONG}
    expect = lora_file(tmp_path / "ldm.safetensors", small, names, rank=4, alpha=2)
    before = snapshot(small)
    small.load(tmp_path / "ldm.safetensors")
    small.fuse()
    assert_fused(small, before, {k: [(s, up, down)] for k, (s, up, down) in expect.items()})


@pytest.mark.parametrize("metadata", [True, False], ids=["metadata", "no-metadata"])
def test_peft_names(small, tmp_path, metadata):
    """PEFT lora_A/lora_B; alphas from lora_adapter_metadata (lora_alpha, alpha_pattern, rank_pattern),
    or α = r without it."""
    rank = {n: 2 if "ff.net" in n else 4 for n in PEFT}
    expect = lora_file(
        tmp_path / "p.safetensors", small, PEFT, rank, peft=True, metadata=PEFT_METADATA if metadata else None
    )
    if metadata:
        alpha = {k: 1.0 if "upsample" in k else 2 if k.startswith("text") else 8 for k in expect}
        expect = {k: (alpha[k] / up.shape[1], up, down) for k, (_, up, down) in expect.items()}
    before = snapshot(small)
    small.load(tmp_path / "p.safetensors")
    small.fuse()
    assert_fused(small, before, {k: [(s, up, down)] for k, (s, up, down) in expect.items()})


def test_stacked_adapters_add_up(small, tmp_path):
    kohya = {n: KOHYA[n] for n in list(KOHYA)[:8]}
    a = lora_file(tmp_path / "a.safetensors", small, kohya, rank=4, alpha=3, seed=1)
    b = lora_file(tmp_path / "b.safetensors", small, {**dict(list(KOHYA.items())[4:]), **PEFT}, rank=2, seed=2)
    before = snapshot(small)
    assert (
        small.load(tmp_path / "a.safetensors") == "default_0" and small.load(tmp_path / "b.safetensors") == "default_1"
    )
    assert small.weights == {"default_1": 1.0}  # as diffusers: the last loaded adapter alone is active
    small.set_adapters(["default_0", "default_1"], [0.5, -1.5])
    small.fuse(lora_scale=2.0)
    expect = {}
    for w, adapter in ((0.5, a), (-1.5, b)):
        for k, (s, up, down) in adapter.items():
            expect.setdefault(k, []).append((2.0 * w * s, up, down))
    assert len([k for k in expect if len(expect[k]) == 2]) >= 4
    assert_fused(small, before, expect)
    small.unfuse()
    assert_restored(small, before)


def test_pt_file_and_state_dict_read_like_safetensors(small, tmp_path):
    """.pt (torch.load(weights_only=True)) and an in-memory state dict fuse like the .safetensors file."""
    lora_file(tmp_path / "a.safetensors", small, KOHYA, rank=4, alpha=2)
    sd = load_file(tmp_path / "a.safetensors")
    torch.save(sd, tmp_path / "a.pt")
    fused = []
    for source in (tmp_path / "a.safetensors", tmp_path / "a.pt", sd):
        small.load(source, "a")
        small.fuse()
        fused.append(snapshot(small))
        small.unfuse()
        small.unload()
    assert all(torch.equal(f[k], fused[0][k]) for f in fused[1:] for k in fused[0])
    with pytest.raises(ValueError, match="must be .safetensors"):
        small.load(tmp_path / "a.txt")


# --------------------------------------------------------------------------------------------- frames


def test_forward_time_equals_fused_frames(tmp_path):
    """Unfused (hooks) and fused give the same frames within 1e-5; unfuse and unload restore the base."""
    pipe = tiny_pipeline(convention="diffusers")
    pipe.set_progress_bar_config(disable=True)
    lora = LoraAdapters(pipe.unet, pipe.text_encoder)
    names = lora_names(pipe.unet, pipe.text_encoder)
    sgm = ("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block")
    kohya = {
        n: key
        for n, (key, _) in names.items()
        if n.startswith(("lora_unet_", "lora_te_"))
        and not n.startswith(sgm)
        and n.endswith(
            (
                "to_q",
                "attn2_to_k",
                "ff_net_0_proj",
                "proj_in",
                "conv1",
                "downsamplers_0_conv",
                "upsamplers_0_conv",
                "conv_shortcut",
                "time_emb_proj",
                "to_out_0",
                "fc1",
            )
        )
    }
    ldm = {
        n: key
        for n, (key, _) in names.items()
        if n.startswith(sgm) and n.endswith(("in_layers_2", "op", "conv", "proj_in", "attn2_to_v"))
    }
    assert {type(names[n][1]) for n in kohya} == {type(names[n][1]) for n in ldm} == {nn.Linear, nn.Conv2d}
    lora_file(tmp_path / "a.safetensors", lora, kohya, rank=4, alpha=2, seed=1)
    lora_file(tmp_path / "b.safetensors", lora, ldm, rank=2, seed=2)
    base = run(pipe)
    lora.load(tmp_path / "a.safetensors", "a")
    lora.load(tmp_path / "b.safetensors", "b")
    lora.set_adapters(["a", "b"], [0.6, -0.8])
    hooked = run(pipe)
    lora.fuse()
    fused = run(pipe)
    assert np.abs(hooked - base).max() > 1e-2
    assert np.abs(hooked - fused).max() <= 1e-5, np.abs(hooked - fused).max()
    lora.unfuse()
    assert np.array_equal(run(pipe), hooked)
    lora.set_adapters("a", 0.3)  # weights change between calls
    assert np.abs(run(pipe) - hooked).max() > 1e-3
    lora.unload()
    assert np.array_equal(run(pipe), base)


def test_unload_keeps_fused_weights_as_diffusers(small, tmp_path):
    lora_file(tmp_path / "a.safetensors", small, KOHYA, rank=4, alpha=2)
    small.load(tmp_path / "a.safetensors")
    small.fuse()
    fused = snapshot(small)
    small.unload()
    assert_restored(small, fused)
    assert not small.adapters and not any(m._forward_hooks for m in small.unet.modules())


def test_pipeline_methods(tmp_path):
    pipe = tiny_pipeline(convention="diffusers")
    pipe.set_progress_bar_config(disable=True)
    layers = {}  # every Linear / Conv2d once, by its first kohya name (the diffusers-style one)
    for n, (k, _) in lora_names(pipe.unet, pipe.text_encoder).items():
        if n.startswith(("lora_unet_", "lora_te_")):
            layers.setdefault(k, n)
    names = {n: k for k, n in layers.items()}
    lora_file(tmp_path / "a.safetensors", LoraAdapters(pipe.unet, pipe.text_encoder), names, rank=2, alpha=1)
    base = run(pipe)
    pipe.load_lora_weights(tmp_path / "a.safetensors", adapter_name="a")
    pipe.set_adapters(["a"], [0.5])
    hooked = run(pipe)
    pipe.fuse_lora(lora_scale=1.0)
    assert np.abs(run(pipe) - hooked).max() <= 1e-5
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert np.array_equal(run(pipe), base)


# --------------------------------------------------------------------------------------------- errors


def test_dora_is_refused(small, tmp_path):
    lora_file(tmp_path / "d.safetensors", small, KOHYA, rank=2)
    sd = {"lora_unet_down_blocks_0_resnets_0_conv1.dora_scale": torch.ones(1, 32, 1, 1)}
    with pytest.raises(ValueError, match="DoRA"):
        small.load({**sd, "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 32, 3, 3)})
    with pytest.raises(ValueError, match="DoRA"):
        small.load({"unet.conv_in.lora_magnitude_vector": torch.ones(32)})


def test_unmatched_and_malformed_keys_are_listed(small):
    good = "lora_unet_down_blocks_0_attentions_0_proj_in"
    w = small.unet.get_submodule("down_blocks.0.attentions.0.proj_in").weight
    sd = {
        f"{good}.lora_down.weight": torch.ones(2, w.shape[1], 1, 1),
        f"{good}.lora_up.weight": torch.ones(w.shape[0], 2, 1, 1),
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.ones(2, 4),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(4, 2),
        "lora_unet_conv_in.hada_w1_a": torch.ones(2, 2),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 32, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_down.weight": torch.ones(2, 7, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_up.weight": torch.ones(32, 2, 1, 1),
    }
    before = snapshot(small)
    with pytest.raises(ValueError) as err:
        small.load(sd)
    for key in (
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight",
        "lora_unet_conv_in.hada_w1_a",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
        "lora_unet_down_blocks_0_resnets_0_conv1: no up",
        "lora_unet_down_blocks_0_resnets_0_conv2: down (2, 7, 3, 3), up (32, 2, 1, 1) do not fit",
    ):
        assert key in str(err.value)
    assert good not in str(err.value) and not small.adapters and not small.hooks
    assert_restored(small, before)


def test_misuse_is_refused(small, tmp_path):
    lora_file(tmp_path / "a.safetensors", small, KOHYA, rank=2)
    small.load(tmp_path / "a.safetensors", "a")
    with pytest.raises(ValueError, match="already in use"):
        small.load(tmp_path / "a.safetensors", "a")
    with pytest.raises(ValueError, match="unknown adapters"):
        small.set_adapters(["b"])
    with pytest.raises(ValueError, match="2 weights"):
        small.set_adapters(["a"], [1.0, 2.0])
    small.fuse()
    for call in (lambda: small.set_adapters("a", 0.5), small.fuse, lambda: small.load(tmp_path / "a.safetensors", "b")):
        with pytest.raises(ValueError, match="unfuse_lora"):
            call()


# --------------------------------------------------------------------------------------------- tables


def test_names_table_round_trips_and_matches_diffusers_modules(small):
    """diffusers.json's "to_diffusers" rules invert its renames on every UNet layer, and give exactly
    diffusers' own Linear / Conv2d module names (motion modules aside)."""
    names = lora_names(small.unet, small.text_encoder)
    paths = {
        n.removeprefix("unet."): key.removeprefix("unet.") for n, (key, _) in names.items() if n.startswith("unet.")
    }
    assert remap(paths)[0] == {p: p for p in paths.values()}  # diffusers.json maps each diffusers path back
    reference = {n for n, m in make_unet2d("small").named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert {p for p in paths if "motion_modules" not in p} == reference
    text = {n for n, m in small.text_encoder.named_modules() if isinstance(m, nn.Linear)}
    assert {k.removeprefix("text_encoder.") for k, _ in names.values() if k.startswith("text_encoder.")} == text
    assert all(len(rule) == 3 for rule in load_table("diffusers")["to_diffusers"])


# --------------------------------------------------------------------------------------------- diffusers


def diffusers_fused(unet2d, text_encoder, path, lora_scale):
    """diffusers + peft: load_lora_weights, fuse_lora, unload (fused weights stay) -> the two state dicts.
    unet_config is passed as SDXL's loader does: SD1.5's load_lora_weights leaves LDM names unmapped."""
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet2d,
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(path), unet_config=unet2d.config)
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()
    return remap(unet2d.state_dict())[0], text_encoder.state_dict()


@pytest.mark.parametrize("layout", ["kohya", "ldm", "peft"])
def test_fused_equals_diffusers_peft(small, tmp_path, layout):
    names, kwargs = {
        "kohya": (KOHYA, dict(alpha=3)),
        "ldm": (LDM, dict(alpha=3)),
        "peft": (PEFT, dict(peft=True, metadata=PEFT_METADATA)),
    }[layout]
    rank = {n: 2 if "ff.net" in n else 4 for n in names}
    lora_file(tmp_path / "f.safetensors", small, names, rank, **kwargs)
    reference_text = copy.deepcopy(small.text_encoder)
    unet, text = diffusers_fused(make_unet2d("small"), reference_text, tmp_path / "f.safetensors", 0.8)
    before = snapshot(small)
    small.load(tmp_path / "f.safetensors")
    small.fuse(lora_scale=0.8)
    ours = snapshot(small)
    changed = 0
    for prefix, reference in (("unet.", unet), ("text_encoder.", text)):
        for key, value in reference.items():
            if key.startswith("conv_in."):  # PIA's 9-channel conv_in is not the 2-D UNet's; no LoRA targets it
                continue
            torch.testing.assert_close(ours[prefix + key], value, rtol=1e-6, atol=1e-7, msg=key)
            changed += not torch.equal(before[prefix + key], value)
    assert changed == len(names)

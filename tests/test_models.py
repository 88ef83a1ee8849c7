"""Models: shapes and named stage outputs across sampled configs, head replacement, size counts."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from harness import config as C
from harness.config import ModelConfig
from harness.models import CNN, build_model, count_macs, count_parameters

# A seeded sample of the family (every value of every option appears), plus the default network.
OPTIONS = {
    "stages": [1, 2, 3, 4],
    "convs_per_stage": [1, 2],
    "kernel_size": [3, 5],
    "batch_norm": [True, False],
    "residual": [False, True],
    "pool": ["max", "avg"],
    "activation": ["relu", "gelu", "silu"],
    "head_width": [0, 24],
}


def _sample_configs(n: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        # cycle through each option's values so all of them occur, in a shuffled pairing
        out.append({k: v[(i + rng.randrange(len(v))) % len(v)] if i >= len(v) else v[i % len(v)]
                    for k, v in OPTIONS.items()})
    return out


SAMPLED = _sample_configs()


def _model_config(p: dict) -> ModelConfig:
    widths = [6, 12, 10, 16][:p["stages"]]
    return ModelConfig(widths=widths, convs_per_stage=p["convs_per_stage"], kernel_size=p["kernel_size"],
                       batch_norm=p["batch_norm"], dropout=0.1, pool=p["pool"], activation=p["activation"],
                       residual=p["residual"], head_width=p["head_width"])


def test_the_sample_covers_every_option_value():
    for key, values in OPTIONS.items():
        assert {p[key] for p in SAMPLED} == set(values), key


@pytest.mark.parametrize("p", SAMPLED, ids=lambda p: "-".join(f"{v}" for v in p.values()))
def test_shapes_and_stage_outputs(p):
    cfg = _model_config(p)
    model = build_model(cfg, num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        emb = model.embed(x)
        logits2, emb2 = model.forward_with_embedding(x)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    names = [f"stage{k}" for k in range(1, p["stages"] + 1)]
    assert model.stage_names == names and list(feats) == names
    for k, (name, width) in enumerate(zip(names, cfg.widths), 1):
        side = 32 // 2 ** k
        assert feats[name].shape == (3, width, side, side), name
    flat = cfg.widths[-1] * (32 // 2 ** p["stages"]) ** 2
    expected_dim = p["head_width"] or flat
    assert model.embedding_dim == expected_dim and emb.shape == (3, expected_dim)
    assert torch.allclose(emb, emb2) and torch.allclose(logits, logits2)
    # only some stages, and the embedding, on request
    some = model.features(x, names=[names[-1], "embedding"])
    assert list(some) == [names[-1], "embedding"] and torch.allclose(some["embedding"], emb)
    # the model's parts are what the config says
    convs = [m for m in model.stages.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    assert len(convs) == p["stages"] * p["convs_per_stage"]
    assert all(c.kernel_size == (p["kernel_size"],) * 2 for c in convs)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == p["batch_norm"]
    pool = nn.MaxPool2d if p["pool"] == "max" else nn.AvgPool2d
    assert sum(isinstance(m, pool) for m in model.modules()) == p["stages"]
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[p["activation"]]
    assert any(isinstance(m, act) for m in model.modules())
    assert all(not isinstance(m, a) for m in model.modules()
               for a in {nn.ReLU, nn.GELU, nn.SiLU} - {act})
    assert all((getattr(b, "shortcut", None) is not None) == p["residual"] for b in
               (model.stages[i].block for i in range(p["stages"])))
    assert count_parameters(model) > 0 and count_macs(model) > 0


@pytest.mark.parametrize("p", SAMPLED[:4], ids=lambda p: f"stages{p['stages']}")
def test_replace_head_changes_the_class_count_and_keeps_the_rest(p):
    model = build_model(_model_config(p), num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb = model.embed(x)
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    model.replace_head(100)
    assert model.num_classes == 100
    with torch.no_grad():
        assert model(x).shape == (2, 100)
        assert torch.allclose(model.embed(x), emb)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in body.items())


def test_dropout_applies_in_training_only():
    model = build_model(ModelConfig(widths=[8], head_width=16, dropout=0.5), 10)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_default_network_is_the_seed_kind():
    cfg = C.load(C.DEFAULT_CONFIG)
    model = build_model(cfg.model, 10)
    assert model.stage_names == ["stage1", "stage2", "stage3"]
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 2  # a hidden FC layer and the output
    # 3->32->64->128 convs (no bias beside BatchNorm), BN, 2048->256 and 256->10
    params = (3 * 32 * 9 + 32 * 64 * 9 + 64 * 128 * 9) + 2 * (32 + 64 + 128) + (2048 * 256 + 256) + (256 * 10 + 10)
    assert count_parameters(model) == params


def test_counts_match_a_hand_computation():
    # one stage: conv 3->4 (3x3, bias, no BN) on 32x32, 2x pooling to 4x16x16, then a linear 1024->10
    model = CNN(ModelConfig(widths=[4], batch_norm=False, head_width=0, dropout=0.0), num_classes=10)
    assert count_parameters(model) == (3 * 4 * 9 + 4) + (1024 * 10 + 10)
    assert count_macs(model) == 32 * 32 * 4 * 3 * 9 + 1024 * 10
    # two stages and a hidden head: + conv 4->8 on 16x16 + 512->16 + 16->10
    model = CNN(ModelConfig(widths=[4, 8], batch_norm=False, head_width=16, dropout=0.0), num_classes=10)
    assert count_macs(model) == 32 * 32 * 4 * 3 * 9 + 16 * 16 * 8 * 4 * 9 + 8 * 8 * 8 * 16 + 16 * 10
    # a 5x5 kernel costs 25/9 of a 3x3 one
    model = CNN(ModelConfig(widths=[4], batch_norm=False, head_width=0, kernel_size=5, dropout=0.0), 10)
    assert count_macs(model) == 32 * 32 * 4 * 3 * 25 + 1024 * 10


def test_count_macs_leaves_the_model_as_it_was():
    model = build_model(ModelConfig(widths=[8], head_width=0), 10)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BN stats untouched


@pytest.mark.parametrize("stages, residual", [(1, False), (5, False), (5, True)])
def test_extreme_depths_and_identity_shortcuts(stages, residual):
    """Equal widths give identity shortcuts (only the first stage, from 3 channels, projects)."""
    model = build_model(ModelConfig(widths=[8] * stages, head_width=0, residual=residual), 10).eval()
    if residual:
        assert isinstance(model.stages.stage1.block.shortcut, nn.Conv2d)
        assert all(isinstance(s.block.shortcut, nn.Identity) for s in list(model.stages)[1:])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model.features(torch.randn(1, 3, 32, 32))[f"stage{stages}"].shape[-1] == 32 // 2 ** stages

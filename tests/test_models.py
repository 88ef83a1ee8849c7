"""Models: shapes and named stage outputs across sampled configs, head replacement, size counts."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from harness import config as C
from harness.config import ModelConfig
from harness.models import CNN, build_model, count_macs, count_parameters
from harness.recipes import DEFAULT_CONFIG

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
    "stem": ["none", "whiten"],
    "global_pool": ["none", "max", "avg"],
}


def _sample_configs(n: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        # cycle through each option's values so all of them occur, in a shuffled pairing
        out.append(
            {k: v[(i + rng.randrange(len(v))) % len(v)] if i >= len(v) else v[i % len(v)] for k, v in OPTIONS.items()}
        )
    return out


SAMPLED = _sample_configs()


def _model_config(p: dict) -> ModelConfig:
    widths = [6, 12, 10, 16][: p["stages"]]
    return ModelConfig(
        widths=widths,
        convs_per_stage=p["convs_per_stage"],
        kernel_size=p["kernel_size"],
        batch_norm=p["batch_norm"],
        dropout=0.1,
        pool=p["pool"],
        activation=p["activation"],
        residual=p["residual"],
        head_width=p["head_width"],
        stem=p["stem"],
        global_pool=p["global_pool"],
    )


def _structure(model: nn.Module) -> list:
    """What a network is made of: each module's type and each parameter's shape, in order."""
    return [type(m).__name__ for m in model.modules()] + [
        (name, tuple(p.shape)) for name, p in model.named_parameters()
    ]


@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_value_of_an_option_builds_another_network(option):
    """No option is silently ignored: changing it alone (from the first sampled config) changes what is built.

    (That every value is exercised by test_shapes_and_stage_outputs holds by construction: the first
    configs of the sample cycle through each option's values, as its ids show.)"""
    built = []
    for value in OPTIONS[option]:
        torch.manual_seed(0)
        built.append(_structure(build_model(_model_config({**SAMPLED[0], option: value}), num_classes=7)))
    assert all(a != b for i, a in enumerate(built) for b in built[i + 1 :]), option


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
    image = 31 if p["stem"] == "whiten" else 32  # the 2x2 stem has no padding
    for k, (name, width) in enumerate(zip(names, cfg.widths), 1):
        side = image // 2**k
        assert feats[name].shape == (3, width, side, side), name
    flat = cfg.widths[-1] * (1 if p["global_pool"] != "none" else image // 2 ** p["stages"]) ** 2
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
    assert all(not isinstance(m, a) for m in model.modules() for a in {nn.ReLU, nn.GELU, nn.SiLU} - {act})
    assert all(
        (getattr(b, "shortcut", None) is not None) == p["residual"]
        for b in (model.stages[i].block for i in range(p["stages"]))
    )
    assert (model.stem is not None) == (p["stem"] == "whiten")
    pools = {"max": nn.AdaptiveMaxPool2d, "avg": nn.AdaptiveAvgPool2d}
    assert [type(m) for m in model.embedding.modules() if type(m) in pools.values()] == (
        [pools[p["global_pool"]]] if p["global_pool"] != "none" else []
    )
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
    cfg = C.load(DEFAULT_CONFIG)
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


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"residual": True, "widths": [8, 16], "head_width": 12},
        {"stem": "whiten", "convs_per_stage": 2, "pool_first": True, "global_pool": "max", "head_width": 0},
    ],
)
def test_count_macs_agrees_with_torchs_flop_counter(overrides):
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(ModelConfig(**overrides), 10).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    assert count_macs(model) == counter.get_total_flops() // 2


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
    assert model.features(torch.randn(1, 3, 32, 32))[f"stage{stages}"].shape[-1] == 32 // 2**stages


# ----------------------------------------------------------------------------
# The fast recipe's parts: whitening stem, pooling after the first conv, global pooling, logit scale


def fast_model_config(**kw) -> ModelConfig:
    from harness.recipes import config_path

    return C.replace(C.load(config_path("fast"), profile="quick"), {"model": kw}).model


def test_fast_network_shapes_stages_and_cost():
    cfg = fast_model_config()
    model = build_model(cfg, 10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x, names=[*model.stage_names, "embedding"])
        logits, emb = model.forward_with_embedding(x)
    # the 2x2 stem (no padding) leaves 31x31; each stage pools right after its first conv
    assert [tuple(f.shape[1:]) for f in feats.values()] == [(32, 15, 15), (64, 7, 7), (128, 3, 3), (128,)]
    assert logits.shape == (3, 10) and model.embedding_dim == 128 and torch.allclose(emb, feats["embedding"])
    with torch.no_grad():  # the head scales its logits by 1/9
        assert torch.allclose(logits, model.classifier(emb) * cfg.logit_scale)
    assert isinstance(model.stem[0], nn.Conv2d) and not model.stem[0].weight.requires_grad
    block = model.stages.stage1.block.convs
    assert [type(m) for m in block][:4] == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.GELU]
    # pooling first: the second conv of each stage runs on a quarter of the pixels
    plain = build_model(
        C.replace(
            C.Config(),
            {"model": {**C.to_dict(C.Config())["model"], "widths": cfg.widths, "convs_per_stage": 2, "head_width": 0}},
        ).model,
        10,
    )
    assert count_macs(model) < 0.6 * count_macs(plain)


def test_whiten_stem_decorrelates_patches_and_freezing_keeps_it_fixed(cifar10_data):
    from harness.data import make_normalize
    from harness.models import whiten_stem

    model = build_model(fast_model_config(), 10)
    images = make_normalize("cpu")(torch.from_numpy(cifar10_data.train_images[:200]))
    whiten_stem(model, images)
    with torch.no_grad():
        out = model.stem[0](images)[:, :12]  # the 12 eigen-filters (the other 12 are their negatives)
        torch.testing.assert_close(model.stem[0](images)[:, 12:], -out)
    z = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = (z.T @ z / len(z)).numpy()
    off = cov - torch.diag(torch.diag(torch.from_numpy(cov))).numpy()
    assert abs(off).max() < 0.02  # decorrelated
    assert ((cov.diagonal() > 0.3) & (cov.diagonal() < 1.01)).all()  # unit variance, less where eps dominates
    assert "stem" in model.freeze(1) and model.trainable_parameters()
    assert not any(p.requires_grad for p in model.stem.parameters())

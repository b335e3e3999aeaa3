"""All4One (Estepa et al., ICCV 2023; solo-learn's ``all4one``): its loss against a slow reference written from the
paper's three objectives, gradients into the modules it owns (``Method.extras``), the methods without such modules
unchanged, and a command-line run that trains, checkpoints and resumes."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import SMALLER_HEADS

from nnclr import all4one
from nnclr.checkpoint import CHECKPOINT_NAME, load_checkpoint
from nnclr.config import load_config
from nnclr.errors import UserError
from nnclr.methods import METHODS
from nnclr.model import build_model
from nnclr.selectors import NeighboursSelector
from nnclr.step import StepInputs, all4one_loss, contrastive_step
from nnclr.support import SupportSet

B, D, K, TAU = 6, 16, 3, 0.2  # SMALLER_HEADS: model.proj_dim=16, two dimensions per attention head


def _config(*more: str):
    return load_config(None, [*SMALLER_HEADS, "method.name=all4one", f"method.neighbours={K}", *more])


def _inputs(rows: int, seed: int = 0) -> StepInputs:
    """Float64 views' t, z and p of B samples (labels 0..3), a support set of ``rows`` random unit rows whose row r
    has label r % 4, and the method's modules (float64, weights from the seed)."""
    torch.manual_seed(seed)
    support = SupportSet(32, D)
    if rows:
        support.enqueue(torch.randn(rows, D), torch.arange(rows) % 4, torch.arange(100, 100 + rows), step=0)
    t1, t2, z1, z2 = (F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1) for _ in range(4))
    modules = all4one.build_modules(_config()).double()
    return StepInputs(z1=z1.requires_grad_(), z2=z2.requires_grad_(), p1=torch.randn(B, D, dtype=torch.float64),
                      p2=torch.randn(B, D, dtype=torch.float64), support=support, selector=NeighboursSelector(k=K),
                      labels=torch.arange(B) % 4, indices=torch.arange(B), step=1, uniforms=torch.zeros(2, B),
                      temperature=TAU, instance_weight=0.0, t1=t1, t2=t2, extras=modules)


# --- the reference, one sample and one feature at a time ------------------------------------------------------


def _neighbours(t: torch.Tensor, stored: torch.Tensor) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Each query's K nearest stored rows by cosine, nearest first, padded with the query itself where the support
    set has fewer than K rows; and each query's nearest row (-1 for none)."""
    sequences, nearest = [], []
    for i in range(len(t)):
        order = sorted(range(len(stored)), key=lambda r: -float(t[i] @ stored[r]))[:K]
        sequences.append([stored[r] for r in order] + [t[i]] * (K - len(order)))
        nearest.append(order[0] if order else -1)
    return sequences, nearest


def _info_nce(anchors: list[torch.Tensor], others: list[torch.Tensor], tau: float) -> torch.Tensor:
    """1/n Σ_i -log( exp(â_i·ô_i / τ) / Σ_j exp(â_i·ô_j / τ) )."""
    total = torch.zeros((), dtype=torch.float64)
    for i, anchor in enumerate(anchors):
        logits = torch.stack([F.normalize(anchor, dim=0) @ F.normalize(other, dim=0) / tau for other in others])
        total = total - (logits[i] - torch.logsumexp(logits, dim=0))
    return total / len(anchors)


def _encoding() -> torch.Tensor:
    """solo-learn's PositionalEncodingPermute1D(k) for k = 3 written out: c = 4, frequencies 1 and 10000^(-1/2)."""
    return torch.tensor([[math.sin(d) for d in range(D)], [math.cos(d) for d in range(D)],
                         [math.sin(d / 100.0) for d in range(D)]], dtype=torch.float64)


def _correlation(t: torch.Tensor, z: torch.Tensor) -> list[list[float]]:
    """C_de = Σ_n t_nd z_ne / (sqrt(Σ_n t_nd²) sqrt(Σ_n z_ne²))."""
    t, z = t.tolist(), z.tolist()
    n = len(t)
    return [[sum(t[b][d] * z[b][e] for b in range(n))
             / (math.sqrt(sum(t[b][d] ** 2 for b in range(n))) * math.sqrt(sum(z[b][e] ** 2 for b in range(n))))
             for e in range(D)] for d in range(D)]


@torch.no_grad()
def _reference(x: StepInputs) -> dict[str, float]:
    stored = x.support.embeddings[: int(x.support.num_filled)].double()
    seq1, nearest1 = _neighbours(x.t1, stored)
    seq2, _ = _neighbours(x.t2, stored)
    # 1. neighbour contrast: NNCLR's loss with the nearest neighbour of the other view's target projection
    neighbour = 0.5 * (_info_nce([s[0] for s in seq1], list(x.p2), TAU) + _info_nce([s[0] for s in seq2], list(x.p1),
                                                                                     TAU))
    # 2. centroid contrast: the transformer's first token on each sequence (+ the encoding), one sample at a time
    q1, q2 = x.extras["predictor"](torch.cat([x.z1, x.z2])).chunk(2)  # one batch of both views, as the heads

    def first_token(sequence: list[torch.Tensor]) -> torch.Tensor:
        return x.extras["transformer"]((torch.stack(sequence) + _encoding())[None])[0, 0]

    rich1, rich2 = ([first_token(s) for s in seq] for seq in (seq1, seq2))
    shifted1 = [first_token([q1[i], *seq1[i][: K - 1]]) for i in range(B)]
    shifted2 = [first_token([q2[i], *seq2[i][: K - 1]]) for i in range(B)]
    centroid = 0.5 * (_info_nce(rich1, shifted2, 0.1) + _info_nce(rich2, shifted1, 0.1))
    # 3. feature contrast: the cross-correlations of t1 with z2 and of t2 with z1, feature by feature
    on, off = [], []
    for t, z in ((x.t1, x.z2), (x.t2, x.z1)):
        c = _correlation(t, z.detach())
        on.append(sum((c[d][d] - 1) ** 2 for d in range(D)) / D)
        off.append(sum(c[d][e] ** 2 for d in range(D) for e in range(D) if d != e) / (D * (D - 1)))
    feature = 10 * (0.5 * math.sqrt((on[0] + on[1]) / 2) + 0.5 * math.sqrt((off[0] + off[1]) / 2))
    labels = [r % 4 for r in nearest1]
    found = [i for i in range(B) if nearest1[i] >= 0]
    return {"loss": 0.5 * float(centroid) + 0.5 * float(neighbour) + 0.5 * feature, "neighbour_loss": float(neighbour),
            "centroid_loss": float(centroid), "feature_loss": feature,
            "nn_label_agreement": sum(labels[i] == i % 4 for i in found) / len(found) if found else math.nan}


@pytest.mark.parametrize("rows", [32, 2, 0], ids=["full", "filling", "empty"])
def test_the_loss_is_the_papers_three_objectives(rows: int) -> None:
    """L = 1/2 L_centroid + 1/2 L_neighbour + 1/2 L_feature against per-sample and per-feature loops; with fewer
    than k rows in the support set each sequence is padded with the query's own t (with none, t is its neighbour)."""
    x = _inputs(rows)
    out = all4one_loss(x)
    expected = _reference(x)
    assert out.loss.item() == pytest.approx(expected["loss"], rel=1e-9)
    for key in ("neighbour_loss", "centroid_loss", "feature_loss"):
        assert out.diagnostics[key] == pytest.approx(expected[key], rel=1e-9), key
    assert out.diagnostics["nn_label_agreement"] == pytest.approx(expected["nn_label_agreement"], nan_ok=True)
    assert out.z1 is x.t1  # the support set stores the target projections


def test_the_encoding_is_solo_learns_for_five_neighbours() -> None:
    """PositionalEncodingPermute1D(5) on (b, 5, D): the feature index is the position, the slot the channel."""
    e = all4one.sequence_encoding(5, 256, dtype=torch.float64)
    d = torch.arange(256, dtype=torch.float64)
    slow = 10000 ** (-1 / 3)
    for slot, wave in enumerate([d.sin(), d.cos(), (d * slow).sin(), (d * slow).cos(), (d * slow**2).sin()]):
        torch.testing.assert_close(e[slot], wave)


def test_gradients_reach_the_transformer_and_the_second_predictor() -> None:
    config = _config()
    model = build_model(config)
    assert isinstance(model.extras, torch.nn.ModuleDict) and set(model.extras) == {"predictor", "transformer"}
    support = SupportSet(32, D)
    support.enqueue(torch.randn(32, D), torch.arange(32) % 4, torch.arange(100, 132), step=0)
    out = contrastive_step(model, torch.rand(2 * B, 3, 32, 32), loss=METHODS["all4one"].loss, temperature=TAU,
                           support=support, selector=NeighboursSelector(k=K), labels=torch.arange(B) % 4,
                           indices=torch.arange(B), step=1, target=model.target, extras=model.extras)
    out.loss.backward()
    for name, p in model.extras.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.target.parameters())


@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.extras is None])
def test_a_method_without_extras_builds_the_model_it_always_had(name: str) -> None:
    """No ``extras.*`` weights (their checkpoints load as before) and the same initial weights as without the
    field: the modules of a method with extras are built last."""
    torch.manual_seed(0)
    model = build_model(load_config(None, [*SMALLER_HEADS, "method.num_clusters=4", f"method.name={name}"]))
    assert model.extras is None and not any(key.startswith("extras") for key in model.state_dict())


def test_the_heads_draw_the_same_weights_with_and_without_the_extras() -> None:
    torch.manual_seed(0)
    a = build_model(load_config(None, [*SMALLER_HEADS, "method.name=nnbyol"])).state_dict()
    torch.manual_seed(0)
    b = build_model(_config()).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_width_the_heads_cannot_split_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model.proj_dim=20 must be a multiple of 8"):
        load_config(None, ["model.proj_dim=20", "method.name=all4one"])


def test_a_command_line_run_trains_checkpoints_and_resumes(tmp_path: Path, tiny_run: tuple[str, ...],
                                                           tiny_data: Path) -> None:
    settings = [*tiny_run, f"data.name=npz:{tiny_data}", "data.image_size=16", "data.test_split=", "train.report=false",
                "method.name=all4one", "method.support_size=64", "train.epochs=1", "train.threads=1"]

    def pretrain(steps: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nnclr", "pretrain", "--run-dir", "run", "--set", *settings,
                               f"train.max_steps={steps}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    first = pretrain(2)
    assert first.returncode == 0, first.stderr
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert state["step"] == 2 and int(state["support"]["num_filled"]) == 64
    extras = {key: value for key, value in state["model"].items() if key.startswith("extras.")}
    assert any(key.startswith("extras.transformer.") for key in extras)
    assert any(key.startswith("extras.predictor.") for key in extras)
    second = pretrain(3)
    assert second.returncode == 0 and "resuming" in second.stdout, second.stderr
    after = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert after["step"] == 3
    assert any(not torch.equal(after["model"][key], value) for key, value in extras.items())  # they trained

"""All4One's own modules and its two objectives beyond NNCLR's: the centroid and the feature contrast.

All4One (Estepa, Sarasúa, Nagarajan, Radeva, *All4One: Symbiotic Neighbour Contrastive Learning via Self-Attention
and Redundancy Reduction*, ICCV 2023, arXiv 2303.09417) adds to NNCLR's neighbour contrast (:func:`nnclr.step.
all4one_loss` puts the three together):

- the **centroid contrast**: a small transformer encoder reads the sequence of a view's k nearest support-set
  neighbours (nearest first) and its first output token is that view's "rich" centroid; the other view's sequence
  with a second predictor's output p' shifted in at the front (its farthest neighbour dropped) gives the second
  centroid; an InfoNCE between the two (:func:`centroid_loss`);
- the **feature contrast**: the feature-wise normalised cross-correlation of one view's target projections with the
  other view's online projections, its diagonal pulled to 1 and the rest to 0 (:func:`feature_contrast`).

Every detail follows the authors' code, which is solo-learn's ``all4one`` (``solo/methods/all4one.py``; the
authors' repository ImaGonEs/all4one holds the same code): 3 post-norm layers, 8 heads, a feed-forward width of 2·D,
ReLU, the sinusoidal encoding of :func:`sequence_encoding`, an InfoNCE temperature of 0.1 for the centroids, the
objectives weighted 0.5 each and the feature contrast scaled by 10. Written for nnclr from the paper and that code,
not copied. Differences (docs/methods.md, "Where methods differ from their papers"): no dropout in the transformer
(solo-learn: 0.1), so that a resumed run replays an uninterrupted one; the run's optimiser and learning rate for
every parameter (solo-learn: the transformer at a fixed learning rate of 0.1); p' and the feature contrast use the
L2-normalised z (solo-learn: the projector's output before normalisation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnclr import distributed
from nnclr.config import Config
from nnclr.errors import UserError
from nnclr.heads import prediction_head
from nnclr.losses import at_least_fp32, nnclr_loss

HEADS = 8  # attention heads of the transformer (solo-learn's nhead=8)
LAYERS = 3  # transformer encoder layers
CENTROID_TEMPERATURE = 0.1  # the centroids' InfoNCE (solo-learn calls nnclr_loss_func with its default, 0.1)
FEATURE_SCALE = 10.0  # the feature contrast's factor
WEIGHT = 0.5  # each objective's weight in the total loss


def build_modules(config: Config) -> nn.ModuleDict:
    """All4One's trainable modules besides the heads: ``predictor``, the second prediction MLP p' = q'(z) (the same
    shape as the first, ``model.pred_hidden_dim``; the identity when that is 0), and ``transformer``, the encoder
    over the neighbour sequences (d_model = ``model.proj_dim``, 8 heads, feed-forward 2·d, 3 layers, no dropout).

    Raises:
        UserError: ``model.proj_dim`` is not a multiple of the 8 attention heads.
    """
    m = config.model
    if m.proj_dim % HEADS:
        raise UserError(f"config key model.proj_dim={m.proj_dim} must be a multiple of {HEADS} for "
                        f"method.name={config.method.name}: its transformer splits z into {HEADS} attention heads")
    predictor = prediction_head(m.proj_dim, hidden_dim=m.pred_hidden_dim) if m.pred_hidden_dim > 0 else nn.Identity()
    layer = nn.TransformerEncoderLayer(d_model=m.proj_dim, nhead=HEADS, dim_feedforward=2 * m.proj_dim, dropout=0.0,
                                       batch_first=True)
    transformer = nn.TransformerEncoder(layer, num_layers=LAYERS, enable_nested_tensor=False)
    return nn.ModuleDict({"predictor": predictor, "transformer": transformer})


def sequence_encoding(k: int, dim: int, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> Tensor:
    """The fixed sinusoidal encoding added to a sequence of k vectors of width ``dim``: (k, dim).

    It is what solo-learn's ``Summer(PositionalEncodingPermute1D(5))`` adds to the (b, 5, D) neighbour sequences (the
    ``positional-encodings`` package, 6.0.1): that module permutes its input to (b, D, 5), so the *feature index* d
    plays the position and the sequence slot s the channel. With c = 2·ceil(k / 2) and ω_j = 10000^(-2j / c)::

        E[s, d] = sin(d · ω_{s // 2})   for even s,      E[s, d] = cos(d · ω_{s // 2})   for odd s

    (Vaswani et al.'s encoding transposed). For k = 5: slot 0 gets sin(d), slot 1 cos(d), slots 2 and 3 sin and cos
    of d / 10000^(1/3), slot 4 sin(d / 10000^(2/3)): a different wave over the features for each slot, of norm about
    sqrt(D / 2) for slots 0-3, while the neighbours are unit vectors.
    """
    channels = 2 * math.ceil(k / 2)
    d = torch.arange(dim, dtype=torch.float64)
    slot = torch.arange(k)
    omega = 10000.0 ** (-2.0 * (slot // 2).double() / channels)  # (k,)
    angle = omega[:, None] * d[None, :]  # (k, dim)
    encoding = torch.where((slot % 2 == 0)[:, None], angle.sin(), angle.cos())
    return encoding.to(device=device, dtype=dtype)


def centroids(modules: nn.ModuleDict, sequence1: Tensor, sequence2: Tensor, z1: Tensor, z2: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four centroids of a batch: the first output token of the transformer on each view's neighbour sequence
    ("rich", c_1 and c_2), and on that sequence with p' = q'(z) of the same view shifted in at the front and the
    last neighbour dropped ("shifted", c'_1 and c'_2).

    Args:
        modules: :func:`build_modules`'s.
        sequence1, sequence2: (b, k, D) each view's k nearest support-set neighbours of its target projection,
            nearest first (detached).
        z1, z2: (b, D) the views' projections (with gradient); q' sees both views in one batch, as the heads do.

    Returns:
        (b, D) each: c_1, c_2, c'_1, c'_2.
    """
    b, k, dim = sequence1.shape
    q1, q2 = modules["predictor"](torch.cat([z1, z2])).chunk(2)  # (b, D) each
    dtype = torch.promote_types(sequence1.dtype, q1.dtype)
    sequences = [sequence1.to(dtype), sequence2.to(dtype)]
    shifted = [torch.cat([q[:, None].to(dtype), s[:, : k - 1]], dim=1) for q, s in zip((q1, q2), sequences)]
    tokens = torch.cat([*sequences, *shifted]) + sequence_encoding(k, dim, dtype=dtype, device=sequence1.device)
    first = modules["transformer"](tokens)[:, 0]  # (4b, D): the four batches in one call (no token sees another's)
    c1, c2, s1, s2 = first.chunk(4)
    return c1, c2, s1, s2


def centroid_loss(modules: nn.ModuleDict, sequence1: Tensor, sequence2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """All4One's centroid contrast: 1/2 [InfoNCE(c_1, c'_2) + InfoNCE(c_2, c'_1)] at temperature 0.1, each
    :func:`~nnclr.losses.nnclr_loss` (the second argument's batch are the negatives); gradients flow into both
    centroids, so into the transformer and q' (:func:`centroids`)."""
    c1, c2, s1, s2 = centroids(modules, sequence1, sequence2, z1, z2)
    return 0.5 * (nnclr_loss(c1, s2, temperature=CENTROID_TEMPERATURE)
                  + nnclr_loss(c2, s1, temperature=CENTROID_TEMPERATURE))


def cross_correlation(t: Tensor, z: Tensor) -> Tensor:
    """(D, D) feature-wise normalised cross-correlation of the global batch: C_de = Σ_n t_nd z_ne / (‖t_·d‖ ‖z_·e‖),
    t (b, D) without gradient, z (b, D) with gradient (gathered from every process with it), in at least fp32.
    The columns are L2-normalised over the batch, not centred (solo-learn's ``normalize(x, dim=0)``)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        dtype = torch.promote_types(at_least_fp32(t).dtype, at_least_fp32(z).dtype)
        t_all = F.normalize(distributed.gather_no_grad(t).to(dtype), dim=0)
        z_all = F.normalize(distributed.gather_with_grad(at_least_fp32(z).to(dtype)), dim=0)
        return t_all.T @ z_all


def feature_contrast(t1: Tensor, t2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """All4One's feature contrast (redundancy reduction) with C_12 = C(t1, z2) and C_21 = C(t2, z1)
    (:func:`cross_correlation`)::

        on  = sqrt( 1/2 [ mean_d (C12_dd - 1)² + mean_d (C21_dd - 1)² ] )
        off = sqrt( 1/2 [ mean_{d≠e} C12_de² + mean_{d≠e} C21_de² ] )
        L_feature = 10 · (on / 2 + off / 2)

    The same value on every process (the global batch's).
    """
    parts = []
    for t, z in ((t1, z2), (t2, z1)):
        c = cross_correlation(t, z)
        off_diagonal = ~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
        parts.append(((c.diagonal() - 1).pow(2).mean(), c[off_diagonal].pow(2).mean()))
    on = (0.5 * (parts[0][0] + parts[1][0])).sqrt()
    off = (0.5 * (parts[0][1] + parts[1][1])).sqrt()
    return FEATURE_SCALE * (0.5 * on + 0.5 * off)

"""The NNCLR support set Q: a FIFO queue of past projections with nearest-neighbour lookup.

Dwibedi et al., "With a Little Help from My Friends" (ICCV 2021, arXiv 2104.14548), Sec. 3:
"we use a support set Q that is a queue of the embeddings of the previous batches ... the
support set is updated with the embeddings of the current batch at the end of each training
step", 98,304 entries in the paper, and NN(z, Q) = argmax_q ||z·q|| (cosine, top-1; sampling
one of the top-k was worse in their ablation).

Compared with common implementations this one (DESIGN.md section 2):

- keeps everything in persistent buffers, so the queue is in every ``state_dict``/checkpoint and
  a resumed run looks up exactly the same neighbours;
- gathers the batch from all ranks before enqueueing, so every rank holds the same queue;
- never returns an unfilled row (the queue starts empty, not as random vectors);
- can exclude the query's own sample index (a stale copy of itself from an earlier epoch);
- wraps around the end of the ring for any batch size (no silently dropped rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from nnclr import distributed
from nnclr.runtime import cpu_has_fast_bf16

GROUP = 512  # rows per maximum kept by the bf16 scan: the unit in which candidates are read again
ALIGN = 16  # the fp32 matmuls of the low-precision path use at least this many queries and rows (see _rescore)
BF16_ROUNDOFF, FP32_ROUNDOFF = 2.0**-8, 2.0**-24  # unit roundoff (round to nearest even) of bf16 and fp32
CALL_COST = 2**22  # multiply-adds worth one more small matmul call (about 0.1 ms), for _rescore's choice


class SupportSet(torch.nn.Module):
    """FIFO ring buffer of L2-normalised embeddings with sample labels, indices and write steps.

    Buffers (all persistent): ``embeddings`` float32 (size, dim) zeros; ``labels``, ``indices``
    and ``steps`` int64 (size,) -1 (label of the sample, its index in the data set, the training
    step it was written); ``ptr`` int64 scalar (next row to write); ``num_filled`` int64 scalar.
    Rows [0, num_filled) are the filled ones (the ring fills from row 0 before it wraps).

    Args:
        size: number of entries (98,304 in the paper for ImageNet at batch 4096).
        dim: embedding dimension (the projector output, 256 in the paper).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be >= 1, got size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("embeddings", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("steps", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))
        # bf16 shadow of `embeddings` for the low-precision lookup, and per row ||r|| and ||r - bf16(r)||
        # (for its error bound); rebuilt lazily, kept in step by enqueue, invalidated when a state_dict
        # is loaded. Not saved.
        self.register_buffer("_embeddings_lp", torch.empty(0, dim, dtype=torch.bfloat16),
                             persistent=False)
        self.register_buffer("_lp_norms", torch.empty(0, 2), persistent=False)
        self._lp_valid = False
        self.register_load_state_dict_post_hook(SupportSet._invalidate_lp)

    @property
    def fill_fraction(self) -> float:
        """Share of the rows that hold an embedding, in [0, 1]."""
        return int(self.num_filled) / self.size

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, filled={int(self.num_filled)}"

    @torch.no_grad()
    def enqueue(self, z: Tensor, labels: Tensor | None, indices: Tensor | None, step: int) -> None:
        """Append a batch, overwriting the oldest rows; gathers the batch from all ranks first.

        Works for any batch size: writes wrap around the end of the ring, and a (global) batch
        larger than ``size`` keeps only its last ``size`` rows, exactly as enqueueing the rows one
        by one would. Every rank must pass the same B (``drop_last=True``).

        Args:
            z: (B, D) projections of this rank's batch; detached and L2-normalised here.
            labels: (B,) int labels, -1 for unlabelled (None = all -1).
            indices: (B,) sample indices in the data set (None = all -1, disables self-exclusion).
            step: the training step, stored to measure neighbour age.
        """
        z = F.normalize(z.detach().float(), dim=1)  # (B, D)
        labels = _or_minus_one(labels, z)
        indices = _or_minus_one(indices, z)
        z, labels, indices = (distributed.gather_no_grad(t) for t in (z, labels, indices))
        total = z.shape[0]
        keep = min(total, self.size)
        z, labels, indices = z[total - keep :], labels[total - keep :], indices[total - keep :]
        start = (int(self.ptr) + total - keep) % self.size
        rows = (start + torch.arange(keep, device=self.embeddings.device)) % self.size  # (keep,)
        self.embeddings[rows] = z.to(self.embeddings.device)
        self.labels[rows] = labels.to(self.labels.device)
        self.indices[rows] = indices.to(self.indices.device)
        self.steps[rows] = step
        if self._lp_valid:
            z = z.to(self._embeddings_lp.device)
            self._embeddings_lp[rows], self._lp_norms[rows] = _rounded_with_norms(z)
        self.ptr.fill_((int(self.ptr) + total) % self.size)
        self.num_filled.fill_(min(self.size, int(self.num_filled) + total))

    @torch.no_grad()
    def nearest(
        self,
        z: Tensor,
        *,
        exclude_indices: Tensor | None = None,
        k: int = 1,
        generator: torch.Generator | None = None,
        uniform: Tensor | None = None,
        chunk_size: int = 4096,
        low_precision: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Nearest support row of each query by cosine similarity, among filled rows only.

        The default (fp32) path scans the queue in blocks of ``chunk_size`` rows with a running
        max (running top-k for k > 1). ``low_precision=True`` returns the same rows (the same
        top-k for k > 1), faster where bf16 matmuls are fast (:func:`low_precision_is_fast`):

        1. a bf16 scan of a cached bf16 copy of the queue, in blocks of ``chunk_size`` rows
           (rounded to a multiple of 512), keeping the scores and the maximum of every 512 rows.
           The scan computes ``q~.r~ - 1`` (an extra column), so that the rounding of its bf16
           output is relative to the distance from a perfect match, not to the score;
        2. the candidates of a query: every row whose bf16 output reaches a threshold below the
           best one (k > 1: the k-th largest 512-row maximum, a lower bound of the k-th best) by a
           proven bound on the bf16 error: 2 e + 2^-7 (1 - score), e about 0.004 for unit vectors
           in D = 256 (:func:`error_bound`, :func:`candidate_threshold` derive it). The fp32 best row
           (each of the fp32 top k) is a candidate by construction, however close the other rows;
           only the 512-row groups whose maximum reaches the threshold are read again;
        3. the candidates re-scored in fp32 by the fp32 path's own matmul (:func:`_rescore`:
           bitwise the fp32 path's scores on the CPUs tested) and the best taken, ties to the lowest
           row as in the fp32 scan.

        A query whose threshold is reached in more than 3/4 of the 512-row groups (and more
        than 16), or by more than max(256, n / 256) + k rows (near-duplicates within bf16
        resolution all over the queue) is scanned in fp32 instead, with the other such queries of
        the batch (at least 16 queries per such scan, the whole batch if it is smaller): such
        batches cost the bf16 scan on top of the fp32 one (BENCHMARKS.md, "When the fp32 fallback
        runs"), never exactness. Early in training, when the projections are nearly collapsed (nearest-neighbour
        similarity 0.995 at initialisation), most queries take that path; the queue is short
        then. For k > 1 the k-th largest group maximum can lie far below the k-th best score when
        the k best rows share a group; there are then more candidates.

        The bf16 copy is kept in step by :meth:`enqueue` (write to the buffers only through
        :meth:`enqueue`/``load_state_dict``); converting each block to bf16 on the fly costs more
        than the bf16 matmul saves. Timings: BENCHMARKS.md, section "Support-set lookup: exact bf16"
        (measurements live there, not in this docstring).

        Args:
            z: (B, D) queries; normalised here.
            exclude_indices: (B,) sample index of each query; a row storing the same sample index
                is never returned (the stale-self-copy problem). None = no exclusion.
            k: 1 = argmax (the paper's choice); k > 1 = one of the top-k, uniformly at random
                (the paper's ablation).
            generator: random source for the top-k pick (when ``uniform`` is None).
            uniform: (B,) uniforms in [0, 1) that choose the top-k pick: candidate ``floor(u * count)``. The
                trainer draws them for the global batch, so that a resumed run and W processes pick alike.
            chunk_size: queue rows per block.
            low_precision: use the bf16 scan + exact fp32 re-score of the candidates.

        Returns:
            rows: (B,) int64 support rows, -1 where no filled, non-excluded row exists.
            similarity: (B,) float32 cosine similarity to that row, -inf where rows is -1.
        """
        vals, rows = self.topk(z, k=k, exclude_indices=exclude_indices, chunk_size=chunk_size,
                               low_precision=low_precision)
        return _pick(vals, rows, generator, uniform)

    @torch.no_grad()
    def topk(
        self,
        z: Tensor,
        *,
        k: int,
        exclude_indices: Tensor | None = None,
        chunk_size: int = 4096,
        low_precision: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The k nearest filled, non-excluded rows of each query, nearest first (see :meth:`nearest`).

        Returns:
            similarity: (B, k) float32 cosine similarities, descending; -inf where fewer than k rows exist.
            rows: (B, k) int64 support rows; -1 where fewer than k rows exist.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        z = F.normalize(z.detach().float(), dim=1).to(self.embeddings.device)  # (B, D)
        if exclude_indices is not None:
            exclude_indices = exclude_indices.to(self.indices.device)
        n = int(self.num_filled)
        with torch.autocast(self.embeddings.device.type, enabled=False):  # exact fp32 scores
            if low_precision and n > 0:
                return self._topk_low_precision(z, exclude_indices, k, n, chunk_size)
            return scan_topk(z, self.embeddings[:n], self.indices[:n], exclude_indices, k, chunk_size)

    @torch.no_grad()
    def nearest_by_sample(
        self,
        space: Tensor,
        query_indices: Tensor,
        *,
        exclude_indices: Tensor | None = None,
        k: int = 1,
        uniform: Tensor | None = None,
        chunk_size: int = 4096,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`nearest`, with the rows chosen in another space: see :meth:`topk_by_sample`.

        Returns rows (B,) (-1 = none) and their similarity (B,) in ``space`` (-inf where rows is -1).
        """
        vals, rows = self.topk_by_sample(space, query_indices, k=k, exclude_indices=exclude_indices,
                                         chunk_size=chunk_size)
        return _pick(vals, rows, None, uniform)

    @torch.no_grad()
    def topk_by_sample(
        self,
        space: Tensor,
        query_indices: Tensor,
        *,
        k: int,
        exclude_indices: Tensor | None = None,
        chunk_size: int = 4096,
    ) -> tuple[Tensor, Tensor]:
        """The k filled rows whose samples lie nearest the queries' own samples in another embedding ``space``.

        A prior space (GPS-SSL, Feizi et al., arXiv 2401.01990): ``space`` (N, Dp) holds one L2-normalised
        vector per sample of the data set; the score of query q and row r is ``space[query_indices[q]] ·
        space[indices[r]]``, so only the sample indices the rows hold matter, not their embeddings. Rows without a
        sample index (-1) are never returned. A sample held by several rows (a queue larger than an epoch) is one
        candidate, its most recently written row (the freshest ``z``); ties between samples go to the lowest row.

        Args:
            space: (N, Dp) vectors of the data set's samples.
            query_indices: (B,) the queries' sample indices, each in [0, N).
            k: rows per query.
            exclude_indices: (B,) as in :meth:`nearest` (a row holding the query's own sample is never returned).
            chunk_size: candidate rows per block of the scan.

        Returns:
            similarity: (B, k) float32 in ``space``, descending; -inf where fewer than k rows exist.
            rows: (B, k) int64 support rows; -1 where fewer than k rows exist.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = int(self.num_filled)
        held, steps = self.indices[:n], self.steps[:n]
        # the newest row of each sample: rows ordered by (sample, step), the last of each sample's run
        by_step = torch.argsort(steps, stable=True)
        order = by_step[torch.argsort(held[by_step], stable=True)]  # (n,) by sample, then by step
        samples = held[order]
        last = torch.ones_like(samples, dtype=torch.bool)
        last[:-1] = samples[1:] != samples[:-1]
        rows = order[last & (samples >= 0)].sort().values  # (m,) candidate rows, ascending
        if rows.numel() == 0:
            b = query_indices.shape[0]
            return (torch.full((b, k), float("-inf"), device=self.embeddings.device),
                    torch.full((b, k), -1, dtype=torch.long, device=self.embeddings.device))
        if exclude_indices is not None:
            exclude_indices = exclude_indices.to(self.indices.device)
        space_device = space.device
        queries = space[query_indices.to(space_device)].to(self.embeddings.device)  # (B, Dp)
        bank = space[held[rows].to(space_device)].to(self.embeddings.device)  # (m, Dp)
        with torch.autocast(self.embeddings.device.type, enabled=False):
            vals, local = scan_topk(queries.float(), bank.float(), held[rows], exclude_indices, k, chunk_size)
        return vals, torch.where(local >= 0, rows[local.clamp_min(0)], -1)

    def rows_info(self, rows: Tensor) -> dict[str, Tensor]:
        """Labels, sample indices and write steps of ``rows`` (B,); -1 where ``rows`` is -1."""
        safe = rows.clamp_min(0)
        return {name: torch.where(rows >= 0, getattr(self, name)[safe], -1)
                for name in ("labels", "indices", "steps")}

    @torch.no_grad()
    def diagnostics(
        self,
        rows: Tensor,
        similarity: Tensor,
        *,
        labels: Tensor | None,
        indices: Tensor | None,
        step: int,
    ) -> dict[str, float]:
        """Neighbour diagnostics that show whether NNCLR is working (DESIGN.md section 2).

        Args:
            rows, similarity: the output of :meth:`nearest` for a batch.
            labels: (B,) the queries' labels (-1 = unknown) or None.
            indices: (B,) the queries' sample indices or None.
            step: the current training step.

        Returns:
            ``nn_found`` share of queries with a neighbour; over those: ``nn_similarity`` mean
            cosine, ``nn_age`` mean steps since the neighbour was written, ``nn_self_hit`` share
            whose neighbour is a copy of the query itself, ``nn_label_agreement`` share whose
            neighbour has the same label (where both labels are known; NaN if none).
            ``support_fill`` the fill fraction.
        """
        found = rows >= 0
        info = self.rows_info(rows)
        nan = float("nan")
        out = {"nn_found": found.float().mean().item(), "support_fill": self.fill_fraction}
        if not bool(found.any()):
            return out | {"nn_similarity": nan, "nn_age": nan, "nn_self_hit": nan,
                          "nn_label_agreement": nan}
        out["nn_similarity"] = similarity[found].float().mean().item()
        out["nn_age"] = (step - info["steps"][found]).float().mean().item()
        if indices is not None:
            query = indices.to(rows.device)
            hit = (info["indices"] == query) & (query >= 0)
            out["nn_self_hit"] = hit[found].float().mean().item()
        else:
            out["nn_self_hit"] = nan
        out["nn_label_agreement"] = _label_agreement(info["labels"], labels, found)
        return out

    def _topk_low_precision(
        self, z: Tensor, exclude: Tensor | None, k: int, n: int, chunk_size: int
    ) -> tuple[Tensor, Tensor]:
        """The (B, k) fp32 top-k of :func:`scan_topk`, from a bf16 scan and an fp32 re-score of the candidates."""
        bank_lp, norms = self.low_precision_bank()
        zq = shifted_queries(z, bank_lp.shape[1])  # (B, W) bf16
        with _fp32_accumulation(z.device):
            scores, maxima = scan_groups(zq, bank_lp[:n], self.indices[:n], exclude, chunk_size)
        if k == 1:
            best = maxima.max(dim=1).values  # (B,)
        elif maxima.shape[1] >= k:
            best = maxima.topk(k, dim=1).values[:, -1]  # a lower bound of the k-th best score
        else:
            best = torch.full_like(maxima[:, 0], float("-inf"))  # all rows are candidates
        threshold = candidate_threshold(best, error_bound(z, zq[:, : z.shape[1]], norms[:n]))
        flagged = maxima >= threshold[:, None]  # (B, groups) the groups to read again
        # Near-ties all over the queue (in 3/4 of the groups, or more candidates than the cap): those
        # queries are scanned in fp32 instead, which costs less than reading and re-scoring them.
        heavy = flagged.sum(dim=1) > max(16, flagged.shape[1] * 3 // 4)  # (B,)
        cand_q, cand_r = candidates(scores, flagged & ~heavy[:, None], threshold)
        del scores
        heavy |= torch.bincount(cand_q, minlength=z.shape[0]) > max(256, n // 256) + k
        if bool(heavy.any()):
            light = ~heavy[cand_q]
            cand_q, cand_r = cand_q[light], cand_r[light]
        vals, rows = _rescore(z, self.embeddings, cand_q, cand_r, k)
        if bool(heavy.any()):
            which = _with_companions(heavy)
            if bool(which.all()):
                return scan_topk(z, self.embeddings[:n], self.indices[:n], exclude, k, chunk_size)
            sub = None if exclude is None else exclude[which]
            vals[which], rows[which] = scan_topk(z[which], self.embeddings[:n], self.indices[:n], sub, k,
                                                  chunk_size)
        return vals, rows

    def low_precision_bank(self) -> tuple[Tensor, Tensor]:
        """The bf16 scan's copy of ``embeddings`` (size, W) and per row ||r||, ||r - bf16(r)|| (size, 2)."""
        valid = self._lp_valid and self._embeddings_lp.shape[0] == self.size
        if not valid or self._embeddings_lp.device != self.embeddings.device:
            self._embeddings_lp, self._lp_norms = _rounded_with_norms(self.embeddings)
            self._lp_valid = True
        return self._embeddings_lp, self._lp_norms

    @staticmethod
    def _invalidate_lp(module: torch.nn.Module, _incompatible: object) -> None:
        module._lp_valid = False


def _or_minus_one(values: Tensor | None, like: Tensor) -> Tensor:
    if values is None:
        return torch.full((like.shape[0],), -1, dtype=torch.long, device=like.device)
    return values.to(like.device, torch.long)


# The steps of the two scans (:meth:`SupportSet.topk`) are public: the tests check the bf16 scan's error bound and
# threshold on them and count the fp32 scans, and bench/lookup.py times scan_topk on its own.


def scan_topk(
    z: Tensor, bank: Tensor, bank_indices: Tensor, exclude: Tensor | None, k: int, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Running top-k of ``z @ bank.T`` over blocks of rows, excluded rows masked to -inf.

    Returns (B, k) float32 values (descending, -inf = no row) and (B, k) int64 rows (-1 = none).
    For k = 1, ties resolve to the lowest row (torch.max returns the first maximum).
    """
    b = z.shape[0]
    best_vals = torch.full((b, k), float("-inf"), device=z.device)
    best_rows = torch.full((b, k), -1, dtype=torch.long, device=z.device)
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    pair_q, pair_r = _exclusion_pairs(bank_indices, exclude)  # (P,), (P,)
    for start in range(0, bank.shape[0], chunk_size):
        block = z @ bank[start : start + chunk_size].T  # (B, c)
        if pair_q.numel():
            inside = (pair_r >= start) & (pair_r < start + block.shape[1])
            block.index_put_((pair_q[inside], pair_r[inside] - start), neg_inf)
        if k == 1:
            vals, cols = block.max(dim=1, keepdim=True)  # (B, 1)
            better = vals.float() > best_vals
            best_vals = torch.where(better, vals.float(), best_vals)
            best_rows = torch.where(better, cols + start, best_rows)
            continue
        top = block.topk(min(k, block.shape[1]), dim=1)
        merged_vals = torch.cat([best_vals, top.values.float()], dim=1)
        merged_rows = torch.cat([best_rows, top.indices + start], dim=1)
        keep = merged_vals.topk(k, dim=1)
        best_vals, best_rows = keep.values, merged_rows.gather(1, keep.indices)
    best_rows = torch.where(torch.isfinite(best_vals), best_rows, -1)
    return best_vals, best_rows


def _rounded_with_norms(rows: Tensor) -> tuple[Tensor, Tensor]:
    """The bf16 scan's copy of ``rows`` (n, D) fp32, and per row (||r||, ||r - bf16(r)||) as (n, 2) fp32.

    The copy is (n, D + 2): bf16(r), then -1 (the shift of :func:`shifted_queries`), then 0 (an even
    width: 0.6 ms slower than D = 256 alone at 98,304 x 256, a width of 272 cost 2 ms).
    """
    n, d = rows.shape
    rounded = torch.zeros(n, d + 2, dtype=torch.bfloat16, device=rows.device)
    rounded[:, :d] = rows
    rounded[:, d] = -1.0
    errors = (rows - rounded[:, :d].float()).norm(dim=1)
    return rounded, torch.stack([rows.norm(dim=1), errors], dim=1)


def shifted_queries(z: Tensor, width: int) -> Tensor:
    """``z`` (B, D) in bf16, then 1, then zeros: (B, width). Against the copy of :func:`_rounded_with_norms`
    the bf16 scan computes ``q~.r~ - 1`` in one matmul, whose bf16 output is rounded by
    ``2^-8 |score - 1|``: far less than ``2^-8 |score|`` for the close rows that matter."""
    b, d = z.shape
    zq = torch.zeros(b, width, dtype=torch.bfloat16, device=z.device)
    zq[:, :d] = z
    zq[:, d] = 1.0
    return zq


def error_bound(z: Tensor, zq: Tensor, row_norms: Tensor) -> Tensor:
    """Per query, a bound e (B,) on |(q~.r~ - 1 as the bf16 scan sums it) - (fp32 score - 1)|, every row.

    With q a query (fp32), r a row, q~ and r~ their bf16 roundings, g = m 2^-24 / (1 - m 2^-24) the
    error factor of an m-term fp32 sum, and R = max ||r||, rho = max ||r - r~|| over the filled
    rows (``row_norms``, kept with the bf16 copy):

    - inputs: q.r - q~.r~ = (q - q~).r + q~.(r - r~), so by Cauchy-Schwarz
      |q.r - q~.r~| <= ||q - q~|| R + ||q~|| rho (about 0.0017 + 0.0021 for unit vectors in
      D = 256; the element-wise worst case (2u + u^2) ||q|| ||r||, u = 2^-8, would be 0.0078);
    - accumulation: products of two bf16 numbers (and the shift 1 x -1) are exact in fp32, and
      the matmul sums the D + 1 of them in fp32 (oneDNN on CPU, cuBLAS with reduced-precision
      reduction off), which is off by at most g_{D+1} (sum |q~_i r~_i| + 1) <= g_{D+1} (||q~|| (R + rho) + 1);
    - the fp32 path's score, which the result must match, is off from q.r by at most g_D ||q|| R.

    e is the sum, times 1 + 2^-10 for the rounding of these norms and of the bound itself, plus
    2^-24 for subnormals a bf16 kernel may flush (D 2^-126 at most). About 0.004 for unit vectors.
    The rounding of the matmul's bf16 output is handled by :func:`candidate_threshold`.
    """
    d = z.shape[1]
    gamma = (d + 1) * FP32_ROUNDOFF / (1 - (d + 1) * FP32_ROUNDOFF)
    norm_r, err_r = row_norms.max(dim=0).values.tolist()
    zq = zq.float()
    norm_q, norm_zq, err_q = z.norm(dim=1), zq.norm(dim=1), (z - zq).norm(dim=1)  # (B,) each
    bound = err_q * norm_r + norm_zq * err_r + gamma * (norm_zq * (norm_r + err_r) + 1) + gamma * norm_q * norm_r
    return bound * (1 + 2.0**-10) + FP32_ROUNDOFF


def candidate_threshold(best: Tensor, error: Tensor) -> Tensor:
    """The lowest bf16 scan output (B,) that an fp32 top-k row can have, given a bf16 output ``best`` (B,)
    that at least k rows reach and the bound ``error`` (B,) of :func:`error_bound`.

    Write a for the fp32 sum inside the bf16 matmul and x = bf16(a) for its output, so that
    |x - a| <= u |a| (u = 2^-8) and a >= x - u |x| / (1 - u). The k rows with x >= best have fp32
    scores - 1 >= best - u |best| / (1 - u) - e, so the k-th best fp32 score does too, and every
    fp32 top-k row has a >= L = best - u |best| / (1 - u) - 2 e. Rounding is monotonic, so its output
    is x >= bf16(L) >= L - u |L|. For a best output near 0 (a score near 1: the shift) the two
    roundings cost almost nothing; the margin best - threshold is about 2 e + 2 u |best|.
    """
    u = BF16_ROUNDOFF
    low = best - u * best.abs() / (1 - u) - 2 * error
    margin = (best - (low - u * low.abs())) * (1 + 2.0**-10) + FP32_ROUNDOFF
    return torch.where(torch.isfinite(best), best - margin, float("-inf"))


@contextlib.contextmanager
def _fp32_accumulation(device: torch.device) -> Iterator[None]:
    """On CUDA, bf16 matmuls that accumulate in fp32 throughout (the bound of :func:`error_bound`)."""
    if device.type != "cuda":
        yield
        return
    settings = torch.backends.cuda.matmul
    before = settings.allow_bf16_reduced_precision_reduction
    settings.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        settings.allow_bf16_reduced_precision_reduction = before


def scan_groups(
    zq: Tensor, bank: Tensor, bank_indices: Tensor, exclude: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """bf16 scores of every query against every row, block by block, and every GROUP rows' maximum.

    Returns the scores (blocks, B, c) bf16, c a multiple of GROUP, -inf at excluded rows and past
    the last row (block j holds rows [j c, (j + 1) c)), and the maxima (B, blocks * c / GROUP) fp32.
    Each block's maxima are taken while it is still in cache (``amax`` costs a third of ``topk``);
    the excluded rows are masked after the scan, and only their groups' maxima taken again (masking
    block by block cost 3 ms at 98,304 rows, in small calls).
    """
    b, n = zq.shape[0], bank.shape[0]
    c = min(max(GROUP, chunk_size // GROUP * GROUP), -(-n // GROUP) * GROUP)
    blocks, per_block = -(-n // c), c // GROUP
    scores = torch.empty(blocks, b, c, dtype=torch.bfloat16, device=zq.device)
    maxima = torch.empty(blocks, b, per_block, dtype=torch.bfloat16, device=zq.device)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.bfloat16, device=zq.device)
    for j in range(blocks):
        start, block = j * c, scores[j]
        if start + c <= n:
            torch.mm(zq, bank[start : start + c].T, out=block)
        else:
            block[:, : n - start] = zq @ bank[start:].T
            block[:, n - start :] = neg_inf
        torch.amax(block.view(b, per_block, GROUP), dim=2, out=maxima[j])
    maxima = maxima.permute(1, 0, 2).reshape(b, -1)  # (B, groups)
    query, row = _exclusion_pairs(bank_indices, exclude)  # (P,), (P,)
    if query.numel():
        scores.index_put_((row // c, query, row % c), neg_inf)
        group = row // GROUP
        grouped = scores.view(blocks, b, per_block, GROUP)[group // per_block, query, group % per_block]
        maxima[query, group] = grouped.amax(dim=1)
    return scores, maxima.float()


def candidates(scores: Tensor, flagged: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """(query, row) pairs with a bf16 score >= the query's ``threshold`` (B,) in the ``flagged`` (B, groups)
    GROUP-row groups, ordered by query, then row. Excluded rows never."""
    b = flagged.shape[0]
    query, group = flagged.nonzero(as_tuple=True)  # (G,) groups to read
    per_block = scores.shape[2] // GROUP
    values = scores.view(scores.shape[0], b, per_block, GROUP)[group // per_block, query, group % per_block]
    hit = (values.float() >= threshold[query, None]) & (values > float("-inf"))  # (G, GROUP)
    which, col = hit.nonzero(as_tuple=True)
    return query[which], group[which] * GROUP + col


def _rescore(z: Tensor, bank: Tensor, cand_q: Tensor, cand_r: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """fp32 top-k of each query among its candidate rows (sorted by query, then row): (B, k) values, rows.

    The scores come from ``z[queries] @ bank[rows].T``, the fp32 scan's own matmul on the same
    operands, with at least ALIGN queries and the distinct candidate rows padded to a multiple of
    ALIGN: on the CPUs tested this gives bitwise the scan's numbers (a matmul with one query, or
    a few rows, takes another kernel that sums in another order, and near-ties could then order
    differently). All queries in one matmul when that is cheap, else ALIGN queries at a time (when
    the queries have many candidates, mostly different ones). Ties go to the lowest row (the first
    maximum), as in the scan.
    """
    b = z.shape[0]
    counts = torch.bincount(cand_q, minlength=b)  # (B,)
    width = max(k, int(counts.max()) if b else 0)
    vals = torch.full((b, width), float("-inf"), device=z.device)
    rows = torch.full((b, width), -1, dtype=torch.long, device=z.device)
    if cand_q.numel():
        starts = counts.cumsum(0) - counts  # (B,) first pair of each query
        exact = torch.empty(cand_q.numel(), device=z.device)  # (P,) fp32 score of each pair
        distinct, inverse = torch.unique(cand_r, return_inverse=True)
        calls = CALL_COST // z.shape[1] * (b // ALIGN)  # row products worth b / ALIGN matmul calls
        step = b if b * distinct.numel() <= ALIGN * cand_q.numel() + calls else ALIGN
        bounds = list(range(0, b, step))
        if len(bounds) > 1 and b - bounds[-1] < ALIGN:
            bounds.pop()  # the last chunk has ALIGN queries or more too
        bounds.append(b)
        starts_list = torch.cat([starts, counts.sum()[None]]).tolist()
        for q0, q1 in zip(bounds[:-1], bounds[1:], strict=True):
            p0, p1 = starts_list[q0], starts_list[q1]
            if p0 == p1:
                continue
            these, where = (distinct, inverse) if step == b else torch.unique(cand_r[p0:p1], return_inverse=True)
            padded = torch.cat([these, these[:1].expand((-these.numel()) % ALIGN)])
            scores = z[q0:q1] @ bank[padded].T  # (q1 - q0, U)
            exact[p0:p1] = scores[cand_q[p0:p1] - q0, where]
        col = torch.arange(cand_q.numel(), device=z.device) - starts[cand_q]
        vals[cand_q, col] = exact
        rows[cand_q, col] = cand_r
    if k == 1:
        best, cols = vals.max(dim=1, keepdim=True)  # first maximum = lowest row
    else:
        best, cols = vals.topk(k, dim=1)
    return best, torch.where(torch.isfinite(best), rows.gather(1, cols), -1)


def _with_companions(which: Tensor) -> Tensor:
    """``which`` (B,) bool with the first other queries added up to ALIGN in all (or all B): a fallback
    scan of so many queries runs the fp32 scan's kernel (one or two queries take another, summing in
    another order)."""
    missing = ALIGN - int(which.sum())
    if missing > 0:
        which = which.clone()
        which[(~which).nonzero()[:missing, 0]] = True
    return which


def _exclusion_pairs(bank_indices: Tensor, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    """All (query, row) pairs where row stores the query's own sample index (index >= 0).

    Found by binary search in the sorted stored indices, so the cost is O((n + B) log n) plus
    the number of copies, instead of comparing every query with every row.
    """
    empty = torch.empty(0, dtype=torch.long, device=bank_indices.device)
    if exclude is None or bank_indices.numel() == 0:
        return empty, empty
    sorted_idx, order = bank_indices.sort()
    lo = torch.searchsorted(sorted_idx, exclude, right=False)  # (B,)
    hi = torch.searchsorted(sorted_idx, exclude, right=True)  # (B,)
    counts = torch.where(exclude >= 0, hi - lo, 0)
    if int(counts.sum()) == 0:
        return empty, empty
    queries = torch.repeat_interleave(torch.arange(exclude.numel(), device=exclude.device), counts)
    offsets = torch.arange(queries.numel(), device=exclude.device)
    offsets = offsets - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return queries, order[lo[queries] + offsets]


def _pick(vals: Tensor, rows: Tensor, generator: torch.Generator | None, uniform: Tensor | None
          ) -> tuple[Tensor, Tensor]:
    """One of each query's valid top-k candidates, uniformly (the first when k = 1)."""
    if vals.shape[1] == 1:
        return rows[:, 0], vals[:, 0]
    count = torch.isfinite(vals).sum(dim=1)  # (B,)
    if uniform is None:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        uniform = torch.rand(vals.shape[0], generator=generator, device=gen_device)
    u = uniform.to(vals.device)
    choice = (u * count).long().clamp_max((count - 1).clamp_min(0))[:, None]  # (B, 1)
    return rows.gather(1, choice)[:, 0], vals.gather(1, choice)[:, 0]


def _label_agreement(nn_labels: Tensor, labels: Tensor | None, found: Tensor) -> float:
    if labels is None:
        return float("nan")
    known = found & (nn_labels >= 0) & (labels.to(nn_labels.device) >= 0)
    if not bool(known.any()):
        return float("nan")
    return (nn_labels[known] == labels.to(nn_labels.device)[known]).float().mean().item()


def low_precision_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 matmuls are fast on ``device``: CUDA with bf16 support, or a CPU with
    AVX512-BF16/AMX (read from /proc/cpuinfo; False where that is unavailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()

"""Experts reduced to the rank they use (SPEC.md section 4's kohya LoRA format; kohya's networks/resize_lora.py).

A trained LoRA keeps most of its energy in far fewer singular values than its nominal rank. Each layer's delta
M = c * up @ down (c = alpha / rank) is factored exactly through two thin QR decompositions and the SVD of their
small r x r product (never a d_out x d_in SVD), then cut to k singular values, written as kohya's resize script
writes them: up' = U_k S_k, down' = Vh_k, alpha' = c * k (so c' = c: the scale is unchanged). At k >= the true
rank the pair reproduces M to float error.

The gates stay valid without retraining: the local gate and the paper variant's global gate read the layer input,
and the official global gate is w_i . mean_n(R_i(X)), which folds through any (down, up) pair (ops.MoLELayer).

Rules (`RankRule`), one per load or file:
  full            nothing changes
  fixed k         k singular values per layer (at most the layer's own rank)
  energy p        the fewest singular values whose squares keep a share p of the layer's Frobenius energy
                  (sum of squared singular values); the error of the delta is then at most sqrt(1 - p)
  sv_fro p        kohya's --dynamic_method sv_fro, as kohya computes it: the Frobenius *norm* share p (energy p^2)
  sv_cumulative p kohya's: the share p of the sum of the singular values
  sv_ratio p      kohya's: singular values above the largest / p
kohya's three methods keep kohya's indexing (one value more than the share needs, at least 2, capped by
--new_rank), so a pasted resize command keeps the ranks kohya's script would.

The reduced expert remembers its source (`ExpertFile.source`: the file's sha256, rank and alpha, and the rule), so
gate files trained on the full experts find them; a file written by `python -m trainer resize-experts` records the
same under the metadata key `mole.resized_from`.
"""
from __future__ import annotations

import json
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import safetensors_io
from .errors import MoLEError
from .expert_file import SOURCE_KEY, ExpertFile, LoRAWeights

METHODS = ("full", "fixed", "energy", "sv_fro", "sv_cumulative", "sv_ratio")
KOHYA_METHODS = ("sv_fro", "sv_cumulative", "sv_ratio")
# What the loader nodes offer (a combo: any of these, nothing else)
NODE_OPTIONS = ("full", "99% energy", "95% energy", "90% energy", "128", "64", "32", "16")


@dataclass(frozen=True)
class RankRule:
    method: str = "full"
    param: float = 0.0              # energy / kohya share or ratio
    max_rank: int | None = None     # fixed: the rank; otherwise a cap (kohya's --new_rank), or None

    def __post_init__(self):
        if self.method not in METHODS:
            raise MoLEError(f"rank rule {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "fixed" and (self.max_rank is None or self.max_rank < 1):
            raise MoLEError(f"a fixed rank must be a whole number >= 1, got {self.max_rank}")
        if self.max_rank is not None and self.max_rank < 1:
            raise MoLEError(f"a rank cap must be >= 1, got {self.max_rank}")
        if self.method in ("energy", "sv_fro", "sv_cumulative") and not 0.0 < self.param <= 1.0:
            raise MoLEError(f"{self.method} keeps a share in (0, 1], got {self.param}")
        if self.method == "sv_ratio" and not self.param >= 1.0:
            raise MoLEError(f"sv_ratio keeps singular values above the largest / ratio; the ratio must be >= 1, "
                            f"got {self.param}")

    @classmethod
    def parse(cls, text: str) -> "RankRule":
        """A node's or a command's rank setting: "full", "64" (fixed) or "99% energy" / "energy 0.99"."""
        value = str(text).strip().lower()
        if value in ("", "full"):
            return cls()
        if value.isdigit():
            return cls("fixed", max_rank=int(value))
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%\s*energy|energy\s+(0?\.\d+|1(?:\.0*)?)", value)
        if m:
            share = float(m.group(1)) / 100 if m.group(1) else float(m.group(2))
            return cls("energy", share)
        raise MoLEError(f"rank setting {text!r}: expected 'full', a whole number (a fixed rank, e.g. 64) or a share "
                        "of energy (e.g. '99% energy')")

    @property
    def full(self) -> bool:
        return self.method == "full"

    def label(self) -> str:
        if self.method == "full":
            return "full rank"
        if self.method == "fixed":
            return f"rank {self.max_rank}"
        cap = f", at most {self.max_rank}" if self.max_rank else ""
        if self.method == "energy":
            return f"{self.param:.0%} energy{cap}".replace(".0%", "%")
        return f"{self.method} {self.param:g}{cap}"

    def keep(self, s: torch.Tensor, rank: int, width: int) -> int:
        """How many of the descending singular values `s` of a rank-`rank` layer to keep; `width` is
        min(d_out, d_in), which kohya's indexing clamps to."""
        limit = min(rank, len(s))
        if self.method == "full":
            return rank
        if self.method == "fixed":
            return min(self.max_rank, limit)
        s = s.double()
        if self.method == "energy":
            sq = s.square()
            total = float(sq.sum())
            if total == 0.0:
                k = 1
            else:
                share = torch.cumsum(sq, 0) / total
                k = int(torch.searchsorted(share, torch.tensor(self.param - 1e-12, dtype=share.dtype))) + 1
        else:
            k = _kohya_index(self.method, s, self.param, width) + 1
        k = max(1, min(k, limit))
        return min(k, self.max_rank) if self.max_rank else k


def _kohya_index(method: str, s: torch.Tensor, target: float, width: int) -> int:
    """kohya's index_sv_* (networks/resize_lora.py), clamped as kohya clamps: to [1, width - 1]."""
    if method == "sv_ratio":
        index = int((s > s[0] / target).sum())
    elif method == "sv_cumulative":
        total = float(s.sum())
        index = int(torch.searchsorted(torch.cumsum(s, 0) / total, torch.tensor(target, dtype=s.dtype))) + 1 \
            if total else 1
    else:                                              # sv_fro: the norm share, so the energy share target ** 2
        sq = s.square()
        total = float(sq.sum())
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / total, torch.tensor(target ** 2, dtype=s.dtype))) + 1 \
            if total else 1
    return max(1, min(index, width - 1))


# -- one layer --------------------------------------------------------------------------------------------------
def factor(w: LoRAWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) with up @ down = U diag(S) Vh exactly (fp32), through QR of up and down.T: U (d_out, m),
    S (m,) descending, Vh (m, d_in), m = min(rank, d_out, d_in)."""
    up, down = w.up.detach().float(), w.down.detach().float()
    qu, ru = torch.linalg.qr(up)                  # (d_out, a), (a, r)
    qd, rd = torch.linalg.qr(down.T)              # (d_in, b), (b, r)
    u, s, vh = torch.linalg.svd(ru @ rd.T)        # (a, b)
    return qu @ u, s, vh @ qd.T


def cut(w: LoRAWeights, k: int, usv=None) -> LoRAWeights:
    """The layer at rank k, written as kohya writes a resized layer: up = U_k S_k, down = Vh_k, alpha = c * k,
    in the layer's own dtype."""
    u, s, vh = usv if usv is not None else factor(w)
    scale = w.alpha / w.rank
    dtype = w.down.dtype
    return LoRAWeights((vh[:k]).to(dtype).contiguous(), (u[:, :k] * s[:k]).to(dtype).contiguous(), scale * k,
                       w.conv)


def relative_error(a: LoRAWeights, b: LoRAWeights) -> float:
    """||c_a up_a down_a - c_b up_b down_b||_F / ||c_a up_a down_a||_F, measured on the stored tensors (float64,
    through r x r Gram matrices: no d_out x d_in product)."""
    ua, da, ub, db = (t.double() for t in (a.up, a.down, b.up, b.down))
    ca, cb = a.alpha / a.rank, b.alpha / b.rank
    aa = float(((ua.T @ ua) * (da @ da.T)).sum()) * ca * ca
    bb = float(((ub.T @ ub) * (db @ db.T)).sum()) * cb * cb
    ab = float(((ua.T @ ub) * (da @ db.T)).sum()) * ca * cb
    if aa <= 0.0:
        return 0.0 if bb <= 0.0 else math.inf
    return math.sqrt(max(aa - 2 * ab + bb, 0.0) / aa)


# -- a whole expert ---------------------------------------------------------------------------------------------
@dataclass
class Stats:
    """What a reduction did to one expert: per layer (kohya name) the rank kept, the rank it had, the measured
    relative error of its delta (sqrt of the energy dropped) and the energy share kept."""

    rule: RankRule
    kept: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)

    def summary(self, name: str) -> str:
        kept = list(self.kept.values())
        errs = list(self.errors.values()) or [0.0]
        was = sorted(set(self.ranks.values()))
        was_text = str(was[0]) if len(was) == 1 else f"{was[0]}-{was[-1]}"
        span = f"{min(kept)}" if min(kept) == max(kept) else f"{min(kept)}-{max(kept)} (mean {sum(kept) / len(kept):.1f})"
        return (f"{name}: {self.rule.label()}: rank {span} of {was_text} on {len(kept)} layers, "
                f"{sum(kept) / max(sum(self.ranks.values()), 1):.0%} of the parameters; delta error max "
                f"{max(errs):.2%}, mean {sum(errs) / len(errs):.2%}")

    def to_json(self) -> dict:
        return {"rule": self.rule.label(), "kept": self.kept, "errors": {k: round(v, 6) for k, v in self.errors.items()}}


class Reduction:
    """A reduced expert's layers and stats, shared by every loader node with the same file and rule."""

    def __init__(self, layers: dict[str, LoRAWeights], stats: Stats, sha256: str, source: dict):
        self.layers, self.stats, self.sha256, self.source = layers, stats, sha256, source


_cache: "weakref.WeakValueDictionary[tuple, Reduction]" = weakref.WeakValueDictionary()


def source_of(expert: ExpertFile, rule: RankRule) -> dict:
    """What a reduced expert records of where it came from (its source's own source, if it was reduced before)."""
    if expert.source:
        return {**expert.source, "rule": rule.label() + " of " + str(expert.source.get("rule", "?"))}
    return {"sha256": expert.sha256, "rank": max(expert.ranks), "alpha": max(expert.alphas), "rule": rule.label()}


def factors(expert: ExpertFile) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every layer's (U, S, Vh) (`factor`), for reducing one expert by several rules (`reduce(..., usv=)`)."""
    return {name: factor(w) for name, w in expert.layers.items()}


def reduce(expert: ExpertFile, rule: RankRule, progress: Callable[[int, int], None] | None = None,
           usv: dict | None = None) -> ExpertFile:
    """`expert` at the ranks `rule` keeps, with its stats (`expert.reduction.stats`); full rank returns it
    unchanged. Cached per (file content, rule) while anything holds the result, so five loaders of the same file
    and setting reduce it once. `usv`: the expert's `factors`, when they are at hand."""
    if rule.full:
        return expert
    key = (expert.sha256, rule) if expert.sha256 else None
    red = _cache.get(key) if key else None
    if red is None:
        stats, layers = Stats(rule), {}
        total = len(expert.layers)
        for i, (name, w) in enumerate(expert.layers.items()):
            f = usv[name] if usv is not None else factor(w)
            k = rule.keep(f[1], w.rank, min(w.down.shape[1], w.up.shape[0]))
            new = cut(w, k, f)
            sq = f[1].double().square()
            layers[name] = new
            stats.kept[name], stats.ranks[name] = k, w.rank
            # the delta's relative error is exactly sqrt(dropped energy / energy) (`relative_error` measures the
            # same on the stored tensors; tests hold the two together): no d x r product per layer, which on SDXL's
            # 1444 expert layers took minutes
            total_sq = float(sq.sum())
            stats.energy[name] = float(sq[:k].sum()) / total_sq if total_sq else 1.0
            stats.errors[name] = math.sqrt(float(sq[k:].sum()) / total_sq) if total_sq else 0.0
            if progress is not None:
                progress(i + 1, total)
        tensors = ExpertFile(expert.name, layers).tensors()
        red = Reduction(layers, stats, safetensors_io.data_sha256(tensors), source_of(expert, rule))
        if key:
            _cache[key] = red
    out = ExpertFile(expert.name, red.layers, dict(expert.metadata), red.sha256, expert.path, source=red.source)
    out.reduction = red
    return out


# -- a resized kohya file ------------------------------------------------------------------------------------
def resized_metadata(expert: ExpertFile, reduced: ExpertFile, rule: RankRule) -> dict[str, str]:
    """kohya's resize metadata (ss_training_comment, ss_network_dim / ss_network_alpha, "Dynamic" for a dynamic
    method), MoLE's source record (`mole.resized_from`) and the new data hash (sshs_model_hash)."""
    meta = dict(expert.metadata)
    comment = meta.get("ss_training_comment", "")
    old = max(expert.ranks)
    if rule.method == "fixed":
        meta["ss_training_comment"] = f"dimension is resized from {old} to {rule.max_rank}; {comment}"
        meta["ss_network_dim"] = str(rule.max_rank)
        alphas = sorted(reduced.alphas)
        meta["ss_network_alpha"] = f"{alphas[0]:g}" if len(alphas) == 1 else "Dynamic"
    else:
        method = "energy (MoLE)" if rule.method == "energy" else rule.method
        meta["ss_training_comment"] = f"Dynamic resize with {method}: {rule.param:g} from {old}; {comment}"
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
    meta[SOURCE_KEY] = json.dumps(reduced.source, sort_keys=True)
    meta["mole.resize_stats"] = json.dumps(reduced.reduction.stats.to_json(), sort_keys=True)
    meta["sshs_model_hash"] = reduced.sha256
    meta.pop("sshs_legacy_hash", None)
    return meta


def write_resized(path, expert: ExpertFile, rule: RankRule, dtype: torch.dtype | None = None,
                  progress: Callable[[int, int], None] | None = None) -> ExpertFile:
    """Reduce `expert` by `rule` and write it as a kohya LoRA at `path` (temp file and rename); `dtype` casts
    the saved tensors (kohya's --save_precision). Returns the reduced expert as written."""
    if rule.full:
        raise MoLEError("resizing to full rank writes the same file; give a rank or a dynamic method")
    reduced = reduce(expert, rule, progress)
    if dtype is not None and dtype != next(iter(reduced.layers.values())).down.dtype:
        layers = {n: LoRAWeights(w.down.to(dtype), w.up.to(dtype), w.alpha, w.conv) for n, w in reduced.layers.items()}
        sha = safetensors_io.data_sha256(ExpertFile(expert.name, layers).tensors())
        kept = reduced.reduction
        reduced = ExpertFile(expert.name, layers, dict(expert.metadata), sha, expert.path, source=reduced.source)
        reduced.reduction = Reduction(layers, kept.stats, sha, kept.source)
    tensors = reduced.tensors()
    safetensors_io.write(path, tensors, resized_metadata(expert, reduced, rule))
    return reduced

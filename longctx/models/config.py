"""The model config (megatron-core's field names) and the FLOP counter used for MFU.

:class:`ModelConfig` describes a GPT/Llama-style decoder: RMSNorm, RoPE, GQA attention, SwiGLU.
Unset derived fields are filled in as megatron-core does (``num_query_groups`` = heads,
``kv_channels`` = hidden / heads, ``ffn_hidden_size`` = the SwiGLU size of a 4h MLP); every field
is checked, and a bad one raises ``ValueError`` naming the field and what to choose instead.

Example::

    >>> from longctx.models.config import ModelConfig, flops_per_token
    >>> cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
    ...                   num_query_groups=2, vocab_size=64, seq_length=32)
    >>> cfg.kv_channels, cfg.ffn_hidden_size
    (8, 128)
    >>> ModelConfig.from_dict({"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
    ...                        "vocab_size": 64}).num_query_groups
    4
    >>> int(flops_per_token(cfg, seq_len=32))  # training (x3), causal
    208896
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .sparse.config import MobaConfig, NSAConfig, sparse_config_from

__all__ = [
    "ATTENTION_KINDS",
    "ModelConfig",
    "attention_flops_per_token",
    "flops_per_token",
    "matmul_flops_per_token",
    "num_params",
]

ATTENTION_KINDS = ("softmax", "linear", "moba", "nsa")


def _swiglu_ffn_size(hidden_size: int, multiple_of: int = 64) -> int:
    """SwiGLU width with the parameter count of a ``4 * hidden`` MLP: ``8/3 h``, rounded up."""
    return multiple_of * math.ceil(8 * hidden_size / 3 / multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    """A GPT/Llama-style decoder (pre-norm RMSNorm, RoPE, GQA, SwiGLU), megatron-core's names.

    Fields left at ``None`` are derived in ``__post_init__`` (recorded in ``derived_fields``);
    :meth:`replace` re-derives them, so ``cfg.replace(hidden_size=64)`` gets a new head dim.
    """

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA groups (= kv heads); None: = num_attention_heads
    ffn_hidden_size: int | None = None  # None: 8/3 * hidden_size rounded up to a multiple of 64
    seq_length: int = 2048  # global training sequence length (before CP sharding)
    vocab_size: int = 256
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    kv_channels: int | None = None  # head dim; None: hidden_size // num_attention_heads
    # per layer "softmax" (Attention) or "linear" (LinearAttention: decayed linear attention,
    # LASP-2 CP on the contiguous layout); None: all softmax. MiniMax-01: 7 linear, 1 softmax.
    attention_kinds: tuple[str, ...] | None = None
    # "moba" / "nsa" layers: their parameters (a mapping in YAML; None: the defaults)
    moba: MobaConfig | None = None
    nsa: NSAConfig | None = None
    derived_fields: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        derived = []

        def derive(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)
            derived.append(name)

        if self.num_query_groups is None:
            derive("num_query_groups", self.num_attention_heads)
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; choose a hidden_size that is "
                    f"a multiple of the head count, or set kv_channels (the head dim) explicitly"
                )
            derive("kv_channels", self.hidden_size // self.num_attention_heads)
        if self.ffn_hidden_size is None:
            derive("ffn_hidden_size", _swiglu_ffn_size(self.hidden_size))
        if self.attention_kinds is not None:
            object.__setattr__(self, "attention_kinds", tuple(self.attention_kinds))
        for kind in ("moba", "nsa"):
            if getattr(self, kind) is not None:
                object.__setattr__(self, kind, sparse_config_from(kind, getattr(self, kind)))
        object.__setattr__(self, "derived_fields", tuple(derived))
        self._check_values()

    # -- validation -----------------------------------------------------------------------------
    def _check_types(self) -> None:
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            kind = _FIELD_KINDS[f.name]
            ok = {
                "int": isinstance(value, int) and not isinstance(value, bool),
                "int?": value is None or (isinstance(value, int) and not isinstance(value, bool)),
                "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                "bool": isinstance(value, bool),
                "kinds?": value is None
                or (isinstance(value, (tuple, list)) and all(isinstance(k, str) for k in value)),
                "sparse?": value is None or isinstance(value, (Mapping, MobaConfig, NSAConfig)),
            }[kind]
            if not ok:
                want = {
                    "int": "an int",
                    "int?": "an int or None",
                    "float": "a number",
                    "bool": "true or false",
                    "kinds?": f"None or a list of {ATTENTION_KINDS} (one per layer)",
                    "sparse?": "None or a mapping of the layer's parameters",
                }[kind]
                raise ValueError(
                    f"ModelConfig.{f.name} must be {want}, got {value!r} ({type(value).__name__})"
                )

    def _check_values(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "seq_length", "vocab_size", "kv_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rotary_base", "norm_epsilon", "init_method_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        H, G = self.num_attention_heads, self.num_query_groups
        if H % G:
            divisors = [g for g in range(1, H + 1) if H % g == 0]
            raise ValueError(
                f"ModelConfig.num_attention_heads={H} is not divisible by num_query_groups={G}; "
                f"choose num_query_groups in {divisors}"
            )
        if self.kv_channels % 2:
            raise ValueError(
                f"ModelConfig.kv_channels={self.kv_channels} (the head dim) must be even for "
                "rotary embeddings; change hidden_size / num_attention_heads or set kv_channels"
            )
        if self.attention_kinds is not None:
            if len(self.attention_kinds) != self.num_layers:
                raise ValueError(
                    f"ModelConfig.attention_kinds has {len(self.attention_kinds)} entries but "
                    f"num_layers={self.num_layers}; give one of {ATTENTION_KINDS} per layer"
                )
            bad = sorted({k for k in self.attention_kinds if k not in ATTENTION_KINDS})
            if bad:
                raise ValueError(
                    f"ModelConfig.attention_kinds has unknown kinds {bad}; allowed values: "
                    f"{list(ATTENTION_KINDS)}"
                )

    # -- derived sizes --------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Alias of ``kv_channels``."""
        return self.kv_channels  # type: ignore[return-value]

    def sparse_config(self, kind: str) -> MobaConfig | NSAConfig:
        """The parameters of the ``"moba"`` / ``"nsa"`` layers (defaults where unset)."""
        return sparse_config_from(kind, getattr(self, kind))

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The attention kind of every layer (``"softmax"`` where ``attention_kinds`` is None)."""
        return self.attention_kinds or ("softmax",) * self.num_layers

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.init)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping (e.g. a YAML section); unknown keys raise, listing allowed ones."""
        allowed = cls.allowed_keys()
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown ModelConfig key(s) {unknown}; allowed keys: {list(allowed)}"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """All fields (derived ones filled in); ``from_dict(to_dict())`` round-trips."""
        out = {name: getattr(self, name) for name in self.allowed_keys()}
        if out["attention_kinds"] is not None:
            out["attention_kinds"] = list(out["attention_kinds"])
        for kind in ("moba", "nsa"):
            if out[kind] is not None:
                out[kind] = out[kind].to_dict()
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; fields that were derived are derived again."""
        given = {n: getattr(self, n) for n in self.allowed_keys() if n not in self.derived_fields}
        given.update(changes)
        return ModelConfig.from_dict(given)


_FIELD_KINDS = {
    "num_layers": "int",
    "hidden_size": "int",
    "num_attention_heads": "int",
    "num_query_groups": "int?",
    "ffn_hidden_size": "int?",
    "seq_length": "int",
    "vocab_size": "int",
    "rotary_base": "float",
    "norm_epsilon": "float",
    "init_method_std": "float",
    "untie_embeddings_and_output_weights": "bool",
    "kv_channels": "int?",
    "attention_kinds": "kinds?",
    "moba": "sparse?",
    "nsa": "sparse?",
}
assert set(_FIELD_KINDS) == {f.name for f in dataclasses.fields(ModelConfig) if f.init}


# -- parameter and FLOP counts ------------------------------------------------------------------
def num_params(config: ModelConfig, include_embedding: bool = True) -> int:
    """Number of parameters of :class:`~longctx.models.llama.LlamaModel` built from ``config``.

    ``include_embedding=False`` leaves out the input embedding (not the output projection).
    """
    h, f, V = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    H, G, D = config.num_attention_heads, config.num_query_groups, config.kv_channels
    attn = h * H * D + 2 * h * G * D + H * D * h  # wq, wk, wv, wo
    mlp = 3 * h * f  # w1, w3, w2
    per_layer = attn + mlp + 2 * h  # + two RMSNorm weights
    body = config.num_layers * per_layer + h  # + final norm
    if "nsa" in config.layer_kinds:  # gates (h -> 3 H) and two block compressors
        nsa = config.sparse_config("nsa")
        hidden = nsa.compress_hidden or D
        compressor = nsa.compress_block * D + nsa.compress_block * D * hidden + hidden * D
        body += config.layer_kinds.count("nsa") * (h * 3 * H + 2 * compressor)
    untied = config.untie_embeddings_and_output_weights
    if include_embedding:
        return body + V * h + (V * h if untied else 0)
    return body + V * h  # the output projection (tied: the shared matrix, counted once)


def matmul_flops_per_token(config: ModelConfig) -> float:
    """Forward FLOPs per token of every weight matmul (2 FLOPs per multiply-add).

    Per layer: ``2 h (H D)`` (wq) + ``2 * 2 h (G D)`` (wk, wv) + ``2 (H D) h`` (wo)
    + ``3 * 2 h f`` (w1, w3, w2); plus the output projection ``2 h V``. The embedding lookup,
    norms, RoPE and activations are not matmuls and are not counted.
    """
    h, f, V = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    H, G, D = config.num_attention_heads, config.num_query_groups, config.kv_channels
    per_layer = 2 * h * H * D + 4 * h * G * D + 2 * H * D * h + 6 * h * f
    return float(config.num_layers * per_layer + 2 * h * V)


def attention_flops_per_token(config: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of the attention scores and the weighted sum, all layers.

    Softmax layers: a query attends to ``seq_len`` keys: ``Q K^T`` costs ``2 S H D`` and ``P V``
    another ``2 S H D``, so ``4 S H D`` per token per layer; causal attention does half
    (``2 S H D``).  Linear layers (always causal) count their recurrent form, independent of
    ``S``: the state update ``k^T v`` and the read-out ``q S``, ``2 H D^2`` each, so ``4 H D^2``
    (the chunked kernel's intra-chunk products are an implementation cost, not counted).
    MoBA layers count the keys a query attends to: ``top_k - 1`` whole blocks and half its own
    (at most the causal ``S / 2``); NSA layers the compressed tokens (``S / 2`` over the stride),
    ``top_n`` selected blocks plus half the own one, and the window, each at most ``S / 2``.
    """
    H, D = config.num_attention_heads, config.kv_channels
    half = seq_len * (0.5 if causal else 1.0)
    softmax = 4 * seq_len * H * D * (0.5 if causal else 1.0)
    per_kind = {"softmax": softmax, "linear": 4 * H * D * D}
    if "moba" in config.layer_kinds:
        m = config.sparse_config("moba")
        keys = min(half, (m.top_k - 0.5) * m.block_size)
        per_kind["moba"] = 4 * H * D * keys
    if "nsa" in config.layer_kinds:
        n = config.sparse_config("nsa")
        keys = (half / n.compress_stride + min(half, (n.top_n + 0.5) * n.select_block)
                + min(half, n.window))
        per_kind["nsa"] = 4 * H * D * keys
    return float(sum(per_kind[kind] for kind in config.layer_kinds))


def flops_per_token(
    config: ModelConfig, seq_len: int | None = None, causal: bool = True, training: bool = True
) -> float:
    """Model FLOPs per token, for MFU = ``flops_per_token * tokens/s / peak FLOP/s``.

    ``forward = matmul_flops_per_token + attention_flops_per_token(seq_len, causal)`` (see those
    two), and ``training`` multiplies by 3: the backward pass costs twice the forward (gradient
    with respect to the input and to the weight of every matmul; ``dQ, dK`` and ``dV, dP`` for
    attention). These are *model* FLOPs (the PaLM MFU convention): recomputation by activation
    checkpointing and flash attention's backward recompute of ``Q K^T`` are not counted, so the
    ratio reflects useful work. Document masks (packed sequences) are ignored: the count assumes
    one causal sequence of ``seq_len`` tokens (default ``config.seq_length``).

    For dense weights this is ``6 N`` per token with ``N`` the non-embedding parameter count
    (output projection included), plus ``6 S H D L`` (causal) for attention.
    """
    if seq_len is None:
        seq_len = config.seq_length
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    forward = matmul_flops_per_token(config) + attention_flops_per_token(config, seq_len, causal)
    return forward * (3.0 if training else 1.0)

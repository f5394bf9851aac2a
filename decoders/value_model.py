"""Value models for value-augmented sampling (VAS, Han et al. 2024, arXiv 2405.06639).

A value model scores every top-k candidate next token ``z`` of a state ``s`` (prompt + the
tokens generated so far) in ONE forward pass:

    V(s, z) = head([h_last(s) ; h_pool(s)], E[z])

* ``h_last`` is the residual stream after the first ``L`` decoder layers of the FROZEN base model
  at the last token of ``s`` (the "trunk"), ``h_pool`` the mean of that residual stream over the
  response tokens of ``s`` so far (a running sum kept in the request's cache). The trunk is run
  by the small PyTorch Llama implementation below (RMSNorm, RoPE, GQA attention, SwiGLU MLP) with
  a per-request KV cache, so each decoding step costs one token through ``L`` of the base's layers.
* ``E[z]`` is the frozen base token embedding of the candidate.
* ``head`` is a small trained MLP with a multiplicative state/candidate interaction
  (:class:`ValueHead`). Only the head is trained and saved: a checkpoint is a few MB.

``V(s, z)`` estimates the expected (standardized) terminal reward of the prefix ``s + z`` when the
base model continues it, i.e. Q(s, z) of the base policy. See docs/vas.md for the design and the
checkpoint format, and decoders/train_value.py for training (TD(lambda), :func:`td_lambda_targets`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT_NAME = "alignserve.vas.value_model"
FORMAT_VERSION = 1
CONFIG_FILE = "value_model.json"
HEAD_FILE = "head.safetensors"
HEAD_TYPE = "pooled_bilinear_mlp_v1"


# --------------------------------------------------------------------------------------------
# Base model description and fingerprints
# --------------------------------------------------------------------------------------------

@dataclass
class LlamaTrunkConfig:
    """The parts of a Llama-architecture ``config.json`` that the trunk needs."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    architecture: str = "LlamaForCausalLM"
    name: str = ""

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], name: str = "") -> "LlamaTrunkConfig":
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope = dict(rope) if isinstance(rope, dict) else {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"trunk supports SwiGLU (silu) MLPs only, config has hidden_act={act!r}")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            hidden_act=act,
            architecture=str(archs[0]),
            name=name or str(cfg.get("_name_or_path") or ""),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> "LlamaTrunkConfig":
        path = Path(model_dir)
        cfg = json.loads((path / "config.json").read_text())
        return cls.from_dict(cfg, name=path.name)


def base_model_name(model_dir: str | os.PathLike) -> str:
    return Path(model_dir).name


def tokenizer_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 of the base tokenizer's vocabulary (token -> id, added tokens included).

    Read from ``tokenizer.json`` when present (no transformers import), else from
    ``AutoTokenizer.get_vocab()``. Two tokenizers with the same fingerprint map every id to the
    same token string, which is what a value head (indexing by token id) depends on.
    """
    path = Path(model_dir)
    tj = path / "tokenizer.json"
    vocab: dict[str, int]
    if tj.exists():
        data = json.loads(tj.read_text(encoding="utf-8"))
        model_vocab = (data.get("model") or {}).get("vocab") or {}
        if isinstance(model_vocab, list):  # unigram: [[piece, score], ...]
            vocab = {str(piece[0]): i for i, piece in enumerate(model_vocab)}
        else:
            vocab = {str(k): int(v) for k, v in model_vocab.items()}
        for tok in data.get("added_tokens") or []:
            vocab[str(tok["content"])] = int(tok["id"])
    else:
        from transformers import AutoTokenizer

        vocab = {str(k): int(v) for k, v in AutoTokenizer.from_pretrained(str(path)).get_vocab().items()}
    canon = json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading base weights (safetensors, single file or sharded)
# --------------------------------------------------------------------------------------------

def _safetensors_index(model_dir: Path) -> dict[str, Path]:
    """tensor name -> file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                out[name] = f
    return out


def _load_tensors(model_dir: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    where = _safetensors_index(model_dir)
    by_file: dict[Path, list[str]] = {}
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name in where:
            by_file.setdefault(where[name], []).append(name)
    for f, fnames in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for name in fnames:
                out[name] = sf.get_tensor(name)
    return out


# --------------------------------------------------------------------------------------------
# The trunk: the base model's first L decoder layers with a per-request KV cache
# --------------------------------------------------------------------------------------------

def _rope_inv_freq(cfg: LlamaTrunkConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq.float()
    kind = rs.get("rope_type", "default")
    if kind == "linear":
        return (inv_freq / float(rs["factor"])).float()
    if kind == "llama3":
        factor = float(rs["factor"])
        low = float(rs.get("low_freq_factor", 1.0))
        high = float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float()
    if kind == "dynamic":
        # Dynamic NTK only changes frequencies beyond the original context; the trunk serves
        # short chat turns, where it equals the default.
        return inv_freq.float()
    raise ValueError(f"trunk does not implement rope_type={kind!r}")


class KVCache:
    """Per-request state of one trunk: K and V of every trunk layer for the tokens seen so far,
    plus the trunk output at every position (for the pooled response feature).

    Storage is one tensor [layers, 2, kv_heads, capacity, head_dim] (and [capacity, hidden]) grown
    by doubling; ``tokens`` are the token ids already processed (a prefix of the request's prompt +
    output); positions >= ``pool_from`` (the prompt length) are the response, whose trunk outputs
    are averaged into the pooled feature.
    """

    __slots__ = ("kv", "hid", "length", "tokens", "pool_from", "pool_sum")

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", capacity: int = 64, hidden: int = 0, pool_from: int = 0):
        self.kv = torch.zeros(layers, 2, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.hid = torch.zeros(capacity, hidden, dtype=dtype, device=device)
        self.length = 0
        self.tokens: list[int] = []
        self.pool_from = pool_from
        self.pool_sum = torch.zeros(hidden, dtype=torch.float32, device=device)

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        cap = self.capacity
        while cap < total:
            cap *= 2
        new = self.kv.new_zeros(*self.kv.shape[:3], cap, self.kv.shape[4])
        new[:, :, :, : self.length] = self.kv[:, :, :, : self.length]
        self.kv = new
        hid = self.hid.new_zeros(cap, self.hid.shape[1])
        hid[: self.length] = self.hid[: self.length]
        self.hid = hid

    def truncate(self, n: int) -> None:
        """Forget everything after the first ``n`` tokens (stale rows are simply overwritten)."""
        n = max(0, min(n, self.length))
        if n < self.length and self.hid.shape[1]:
            self.pool_sum = self.hid[self.pool_from:n].float().sum(0) if n > self.pool_from \
                else torch.zeros_like(self.pool_sum)
        self.length = n
        del self.tokens[n:]

    def pooled(self) -> torch.Tensor:
        """Mean trunk output over the response positions seen so far (zeros before the first)."""
        n = self.length - self.pool_from
        return self.pool_sum / n if n > 0 else torch.zeros_like(self.pool_sum)

    def clone(self) -> "KVCache":
        c = KVCache.__new__(KVCache)
        c.kv = self.kv.clone()
        c.hid = self.hid.clone()
        c.length = self.length
        c.tokens = list(self.tokens)
        c.pool_from = self.pool_from
        c.pool_sum = self.pool_sum.clone()
        return c

    def common_prefix(self, token_ids: Sequence[int]) -> int:
        """Length of the longest common prefix of the cached tokens and ``token_ids``."""
        n = min(self.length, len(token_ids))
        toks = self.tokens
        if n and toks[n - 1] == token_ids[n - 1] and toks[:n] == list(token_ids[:n]):
            return n
        i = 0
        while i < n and toks[i] == token_ids[i]:
            i += 1
        return i


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class _Layer(nn.Module):
    def __init__(self, cfg: LlamaTrunkConfig, qkv_bias: bool, o_bias: bool, mlp_bias: bool):
        super().__init__()
        h, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        # q, k, v (and gate, up) fused into one matmul each: fewer, larger kernels per step
        self.qkv_proj = nn.Linear(h, (nh + 2 * nkv) * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(nh * hd, h, bias=o_bias)
        self.gate_up_proj = nn.Linear(h, 2 * cfg.intermediate_size, bias=mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=mlp_bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaTrunk(nn.Module):
    """The first ``num_layers`` decoder layers of a Llama-architecture model (frozen).

    ``extend(caches, new_tokens)`` runs a packed batch: row ``i`` appends ``new_tokens[i]`` (any
    number >= 1 of tokens) to ``caches[i]``; projections and MLPs run once over all new tokens of
    all rows, attention runs per row against that row's own cache (so rows with different cache
    lengths need no padding). It returns the residual stream after the last trunk layer (no final
    norm) at the last new token of each row, or at every new token with ``return_all=True``.
    """

    def __init__(self, cfg: LlamaTrunkConfig, num_layers: int, *, qkv_bias: bool = False,
                 o_bias: bool = False, mlp_bias: bool = False, dtype: torch.dtype = torch.float32,
                 embed_dtype: torch.dtype | None = None):
        super().__init__()
        if not 1 <= num_layers <= cfg.num_hidden_layers:
            raise ValueError(f"trunk_layers must be in [1, {cfg.num_hidden_layers}], got {num_layers}")
        self.cfg = cfg
        self.num_layers = num_layers
        self.dtype = dtype
        # The embedding table is only gathered from, so it can stay in the (smaller) stored dtype.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=embed_dtype or dtype)
        self.layers = nn.ModuleList(_Layer(cfg, qkv_bias, o_bias, mlp_bias) for _ in range(num_layers))
        self.layers.to(dtype)
        self.register_buffer("inv_freq", _rope_inv_freq(cfg), persistent=False)
        self.weights_sha256: str = ""
        self.model_dir: str = ""
        self.requires_grad_(False)
        self.eval()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, num_layers: int, *,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "LlamaTrunk":
        path = Path(model_dir)
        cfg = LlamaTrunkConfig.from_model_dir(path)
        where = _safetensors_index(path)
        prefix = "model." if "model.embed_tokens.weight" in where else ""
        if f"{prefix}embed_tokens.weight" not in where:
            raise ValueError(f"{path}: no embed_tokens weight; is this a Llama-architecture checkpoint?")
        names = [f"{prefix}embed_tokens.weight"]
        for i in range(num_layers):
            p = f"{prefix}layers.{i}."
            names += [p + n for n in (
                "input_layernorm.weight", "post_attention_layernorm.weight",
                "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                "mlp.down_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
                "self_attn.v_proj.bias", "self_attn.o_proj.bias", "mlp.gate_proj.bias",
                "mlp.up_proj.bias", "mlp.down_proj.bias")]
        tensors = _load_tensors(path, names)
        qkv_bias = f"{prefix}layers.0.self_attn.q_proj.bias" in tensors
        o_bias = f"{prefix}layers.0.self_attn.o_proj.bias" in tensors
        mlp_bias = f"{prefix}layers.0.mlp.gate_proj.bias" in tensors
        emb = tensors[f"{prefix}embed_tokens.weight"]
        embed_dtype = emb.dtype if emb.dtype in (torch.bfloat16, torch.float16, torch.float32) else dtype
        trunk = cls(cfg, num_layers, qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, dtype=dtype,
                    embed_dtype=embed_dtype)
        originals = {"embed_tokens.weight": emb}
        state = {"embed_tokens.weight": emb}
        for i in range(num_layers):
            p = f"{prefix}layers.{i}."
            for src, dst in (("input_layernorm", "input_layernorm"),
                             ("post_attention_layernorm", "post_attention_layernorm"),
                             ("self_attn.o_proj", "o_proj"), ("mlp.down_proj", "down_proj")):
                for kind in ("weight", "bias"):
                    key = f"{p}{src}.{kind}"
                    if key in tensors:
                        state[f"layers.{i}.{dst}.{kind}"] = tensors[key]
            for parts, dst in ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv_proj"),
                               (("mlp.gate_proj", "mlp.up_proj"), "gate_up_proj")):
                for kind in ("weight", "bias"):
                    keys = [f"{p}{src}.{kind}" for src in parts]
                    if all(k in tensors for k in keys):
                        state[f"layers.{i}.{dst}.{kind}"] = torch.cat([tensors[k] for k in keys])
            # digest names: layers.{i}.<module>.<kind> with the unfused module names
            originals.update({f"layers.{i}.{k[len(p):].removeprefix('self_attn.').removeprefix('mlp.')}": v
                              for k, v in tensors.items() if k.startswith(p)})
        missing, unexpected = trunk.load_state_dict(state, strict=False)
        missing = [m for m in missing if m != "inv_freq"]
        if missing or unexpected:
            raise ValueError(f"{path}: trunk weights do not fit (missing={missing}, unexpected={unexpected})")
        trunk.weights_sha256 = _weights_digest(originals)
        trunk.model_dir = str(path)
        return trunk.to(device)

    # -- helpers --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def key(self) -> tuple:
        """Trunks with the same key compute the same features (value models may share one)."""
        return (self.model_dir, self.num_layers, str(self.dtype), self.weights_sha256)

    def new_cache(self, capacity: int = 64, pool_from: int = 0) -> KVCache:
        """An empty per-request cache; ``pool_from`` = prompt length (start of the response)."""
        return KVCache(self.num_layers, self.cfg.num_key_value_heads, self.cfg.head_dim, self.dtype,
                       self.device, capacity, hidden=self.cfg.hidden_size, pool_from=pool_from)

    @property
    def feature_size(self) -> int:
        return 2 * self.cfg.hidden_size

    def features(self, caches: Sequence[KVCache], new_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Extend the caches and return the state features [B, 2H] = [trunk output at the last
        token ; mean trunk output over the response tokens so far] (see :meth:`state_features`)."""
        last = self.extend(caches, new_tokens)
        return torch.cat([last.float(), torch.stack([c.pooled() for c in caches])], dim=-1)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Frozen base token embeddings of ``token_ids`` (any shape) in the trunk dtype."""
        return self.embed_tokens(token_ids).to(self.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the given positions, from a table grown by doubling (computed once)."""
        need = int(positions.max()) + 1
        table = getattr(self, "_rope_table", None)
        if table is None or table[0].shape[0] < need or table[0].device != positions.device:
            size = 256
            while size < need:
                size *= 2
            pos = torch.arange(size, dtype=torch.float32, device=positions.device)
            freqs = pos[:, None] * self.inv_freq.to(positions.device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            table = (emb.cos().to(self.dtype), emb.sin().to(self.dtype))
            self._rope_table = table
        return table[0][positions], table[1][positions]

    # -- forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def extend(self, caches: Sequence[KVCache], new_tokens: Sequence[Sequence[int]],
               return_all: bool = False) -> torch.Tensor | list[torch.Tensor]:
        if len(caches) != len(new_tokens):
            raise ValueError("one list of new tokens per cache")
        if not caches:
            return torch.empty(0, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        lens = [len(t) for t in new_tokens]
        if min(lens) < 1:
            raise ValueError("every row must bring at least one new token")
        cfg = self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dev = self.device
        flat = [int(t) for toks in new_tokens for t in toks]
        ids = torch.tensor(flat, dtype=torch.long, device=dev)
        starts = [c.length for c in caches]
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)]).to(dev)
        for c, s, n in zip(caches, starts, lens):
            c.reserve(s + n)
        cos, sin = self._rope(positions)
        cos, sin = cos[:, None, :], sin[:, None, :]
        x = self.embed(ids)
        N = x.shape[0]
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        masks: list[torch.Tensor | None] = []
        for s, n in zip(starts, lens):
            if n == 1:
                masks.append(None)
            else:
                key_pos = torch.arange(s + n, device=dev)
                masks.append(key_pos[None, :] <= (s + torch.arange(n, device=dev))[:, None])
        nq = nh * hd
        nk = nkv * hd
        group = nh // nkv
        scale = 1.0 / math.sqrt(hd)
        inter = cfg.intermediate_size
        for li, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            qkv = layer.qkv_proj(h)
            q = qkv[:, :nq].view(N, nh, hd)
            k = qkv[:, nq:nq + nk].view(N, nkv, hd)
            v = qkv[:, nq + nk:].view(N, nkv, hd)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            attn = torch.empty(N, nh, hd, dtype=x.dtype, device=dev)
            for r, c in enumerate(caches):
                a, b, s = offsets[r], offsets[r + 1], starts[r]
                n = b - a
                end = s + n
                c.kv[li, 0, :, s:end] = k[a:b].transpose(0, 1)
                c.kv[li, 1, :, s:end] = v[a:b].transpose(0, 1)
                # plain-math attention (the fused CPU SDPA kernel has a large fixed cost for the
                # one-query decode case): query heads grouped by their KV head (GQA)
                qh = q[a:b].view(n, nkv, group, hd).permute(1, 2, 0, 3).reshape(nkv, group * n, hd)
                scores = torch.bmm(qh, c.kv[li, 0, :, :end].transpose(1, 2)).float() * scale
                if masks[r] is not None:
                    scores.masked_fill_(~masks[r].repeat(group, 1)[None], float("-inf"))
                probs = torch.softmax(scores, dim=-1).to(x.dtype)
                o = torch.bmm(probs, c.kv[li, 1, :, :end])  # [nkv, group * n, hd]
                attn[a:b] = o.view(nkv, group, n, hd).permute(2, 0, 1, 3).reshape(n, nh, hd)
            x = x + layer.o_proj(attn.reshape(N, nh * hd))
            h = layer.post_attention_layernorm(x)
            gu = layer.gate_up_proj(h)
            x = x + layer.down_proj(F.silu(gu[:, :inter]) * gu[:, inter:])
        for r, (c, toks, s, n) in enumerate(zip(caches, new_tokens, starts, lens)):
            if c.hid.shape[1]:
                c.hid[s:s + n] = x[offsets[r]:offsets[r + 1]]
                lo = max(s, c.pool_from)
                if lo < s + n:
                    c.pool_sum = c.pool_sum + x[offsets[r] + lo - s:offsets[r + 1]].float().sum(0)
            c.length = s + n
            c.tokens.extend(int(t) for t in toks)
        if return_all:
            return [x[offsets[r]:offsets[r + 1]] for r in range(len(caches))]
        return x[torch.tensor([o - 1 for o in offsets[1:]], device=dev)]

    @torch.inference_mode()
    def forward(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Hidden states [T, H] after the trunk for one full sequence (a fresh cache)."""
        toks = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
        return self.extend([self.new_cache(max(64, len(toks)))], [toks], return_all=True)[0]

    def state_features(self, input_ids: Sequence[int], prompt_len: int) -> torch.Tensor:
        """Features [T - prompt_len + 1, 2H] of every state s_t = input_ids[:prompt_len + t],
        t = 0..T-prompt_len, from one full forward (training; equals :meth:`features` stepwise)."""
        h = self(input_ids).float()
        return pooled_state_features(h[prompt_len - 1:])


def pooled_state_features(h: torch.Tensor) -> torch.Tensor:
    """``h`` = trunk outputs at positions prompt_len-1, prompt_len, ... (the last prompt token,
    then each response token). Row t of the result is the feature of the state with t response
    tokens: [h[t] ; mean(h[1..t])] (zeros for t = 0)."""
    h = h.float()
    csum = torch.cumsum(h[1:], dim=0)
    counts = torch.arange(1, h.shape[0], dtype=h.dtype, device=h.device)[:, None]
    pooled = torch.cat([torch.zeros_like(h[:1]), csum / counts])
    return torch.cat([h, pooled], dim=-1)


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the trunk weights as bf16 (independent of the stored dtype)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to(torch.bfloat16).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The value head
# --------------------------------------------------------------------------------------------

class ValueHead(nn.Module):
    """V(s, z) for K candidates per state in one pass.

    The state feature is [h_last ; h_pool] (trunk output at the last token; mean trunk output over
    the response so far, see :meth:`LlamaTrunk.features`); E[z] is the frozen base embedding:

        u = W_s [LN_1(h_last) ; LN_2(h_pool)]   (state,     [B, d])
        c = W_z RMS(E[z])                       (candidate, [B, K, d])
        x = [gelu(u + c), u * c]                (additive and multiplicative interaction, [B, K, 2d])
        V = w_2 gelu(W_1 x + b_1) + b_2

    The state projection runs once per state, not per candidate; per candidate it is one
    d x E projection and a 2d -> d -> 1 MLP.
    """

    def __init__(self, hidden_size: int, embed_size: int, dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.hidden_size, self.embed_size, self.dim = hidden_size, embed_size, dim
        self.dropout = nn.Dropout(dropout)  # training-time regularizer only (identity in eval)
        self.last_norm = nn.LayerNorm(hidden_size)
        self.pool_norm = nn.LayerNorm(hidden_size)
        self.state_proj = nn.Linear(2 * hidden_size, dim)
        self.cand_proj = nn.Linear(embed_size, dim, bias=False)
        self.mlp_in = nn.Linear(2 * dim, dim)
        self.mlp_out = nn.Linear(dim, 1)
        nn.init.zeros_(self.mlp_out.weight)
        nn.init.zeros_(self.mlp_out.bias)

    def dims(self) -> dict[str, int]:
        return {"hidden_size": self.hidden_size, "embed_size": self.embed_size, "dim": self.dim}

    def state_features(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        H = self.hidden_size
        x = torch.cat([self.last_norm(h[:, :H]), self.pool_norm(h[:, H:])], dim=-1)
        return self.state_proj(self.dropout(x))

    def candidate_features(self, e: torch.Tensor) -> torch.Tensor:
        """c = W_z RMS(E[z]) for candidate embeddings e [..., E] -> [..., d]."""
        e = e.float()
        return self.cand_proj(e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6))

    def score(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """u: [B, d] projected states, c: [B, K, d] projected candidates -> values [B, K]."""
        u = u[:, None, :]
        x = torch.cat((F.gelu(u + c), u * c), dim=-1)
        return self.mlp_out(self.dropout(F.gelu(self.mlp_in(x)))).squeeze(-1)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """h: [B, 2H] state features, e: [B, K, E] candidate embeddings -> values [B, K]."""
        return self.score(self.state_features(h), self.candidate_features(e))


# --------------------------------------------------------------------------------------------
# Value model = trunk (shared, frozen) + head (trained) + metadata
# --------------------------------------------------------------------------------------------

@dataclass
class ValueModel:
    objective: str
    trunk: LlamaTrunk
    head: ValueHead
    meta: dict[str, Any] = field(default_factory=dict)

    # Serving precomputes the candidate projection W_z RMS(E[z]) of the whole vocabulary once
    # (vocab x d float32, 50 MB for SmolLM2 at d=256): per candidate it is then a row lookup.
    precompute_candidates: bool = True

    def __post_init__(self) -> None:
        self.head.eval()  # serving: no dropout
        self._cand_table: torch.Tensor | None = None

    @torch.inference_mode()
    def candidate_table(self) -> torch.Tensor:
        if self._cand_table is None:
            w = self.trunk.embed_tokens.weight
            self._cand_table = torch.cat([self.head.candidate_features(w[i:i + 8192].to(self.trunk.dtype))
                                          for i in range(0, w.shape[0], 8192)])
        return self._cand_table

    @torch.inference_mode()
    def values(self, h: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """h: [B, 2H] state features (LlamaTrunk.features), candidates: [B, K] token ids -> [B, K]."""
        candidates = candidates.to(self.trunk.device)
        if self.precompute_candidates:
            c = self.candidate_table()[candidates]
        else:
            c = self.head.candidate_features(self.trunk.embed(candidates))
        return self.head.score(self.head.state_features(h), c).float()

    def save(self, out_dir: str | os.PathLike, extra_meta: dict[str, Any] | None = None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = build_meta(self.objective, self.trunk, self.head, {**self.meta, **(extra_meta or {})})
        from safetensors.torch import save_file

        state = {k: v.detach().float().contiguous().cpu() for k, v in self.head.state_dict().items()}
        tmp_head = out / f".{HEAD_FILE}.tmp"
        save_file(state, str(tmp_head), metadata={"format": FORMAT_NAME, "objective": self.objective})
        os.replace(tmp_head, out / HEAD_FILE)
        tmp_cfg = out / f".{CONFIG_FILE}.tmp"
        tmp_cfg.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
        os.replace(tmp_cfg, out / CONFIG_FILE)
        for f in (HEAD_FILE, CONFIG_FILE):
            os.chmod(out / f, 0o644)
        self.meta = meta
        return out


_META_KEYS_OWNED = ("format", "format_version", "objective", "base_model", "trunk_layers", "head")


def build_meta(objective: str, trunk: LlamaTrunk, head: ValueHead, extra: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "objective": objective,
        "base_model": {
            "name": base_model_name(trunk.model_dir) if trunk.model_dir else trunk.cfg.name,
            "path": trunk.model_dir,
            "architecture": trunk.cfg.architecture,
            "hidden_size": trunk.cfg.hidden_size,
            "num_hidden_layers": trunk.cfg.num_hidden_layers,
            "vocab_size": trunk.cfg.vocab_size,
            "tokenizer_sha256": tokenizer_fingerprint(trunk.model_dir) if trunk.model_dir else "",
            "trunk_weights_sha256": trunk.weights_sha256,
        },
        "trunk_layers": trunk.num_layers,
        "head": {"type": HEAD_TYPE, **head.dims()},
    }
    for k, v in extra.items():
        if k not in _META_KEYS_OWNED:
            meta[k] = v
    return meta


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a value-model checkpoint (no {CONFIG_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT_NAME!r})")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} is newer than "
                         f"this code supports ({FORMAT_VERSION})")
    return meta


def load_value_model(ckpt_dir: str | os.PathLike, base_model_dir: str | os.PathLike | None = None, *,
                     trunk: LlamaTrunk | None = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", check_trunk_weights: bool = True) -> ValueModel:
    """Load a checkpoint against a base model (``base_model_dir`` or an already built ``trunk``).

    Raises ValueError when the base tokenizer's fingerprint, the hidden size or (by default) the
    trunk weights differ from the ones the head was trained with.
    """
    ckpt = Path(ckpt_dir)
    meta = read_meta(ckpt)
    base_meta = meta.get("base_model") or {}
    if trunk is None:
        if base_model_dir is None:
            base_model_dir = base_meta.get("path")
        if not base_model_dir or not Path(base_model_dir).exists():
            raise ValueError(f"{ckpt}: base model dir {base_model_dir!r} not found; pass base_model_dir")
        base_model_dir = Path(base_model_dir)
    else:
        base_model_dir = Path(trunk.model_dir) if trunk.model_dir else None
    want_tok = base_meta.get("tokenizer_sha256", "")
    if base_model_dir is not None and want_tok:
        have_tok = tokenizer_fingerprint(base_model_dir)
        if have_tok != want_tok:
            raise ValueError(
                f"value model {ckpt} (objective {meta.get('objective')!r}) was trained for a base model "
                f"with a different tokenizer: checkpoint tokenizer_sha256={want_tok[:16]}..., base model "
                f"{base_model_dir} has {have_tok[:16]}...; retrain it for this base "
                f"(python -m decoders.train_value ...)")
    layers = int(meta["trunk_layers"])
    if trunk is None:
        trunk = LlamaTrunk.from_pretrained(base_model_dir, layers, dtype=dtype, device=device)
    elif trunk.num_layers != layers:
        raise ValueError(f"{ckpt}: needs a {layers}-layer trunk, got {trunk.num_layers}")
    hmeta = meta["head"]
    if hmeta.get("type") != HEAD_TYPE:
        raise ValueError(f"{ckpt}: unknown head type {hmeta.get('type')!r}")
    if int(hmeta["hidden_size"]) != trunk.hidden_size or int(hmeta["embed_size"]) != trunk.hidden_size:
        raise ValueError(f"{ckpt}: head expects hidden size {hmeta['hidden_size']}, base has {trunk.hidden_size}")
    want_w = base_meta.get("trunk_weights_sha256", "")
    if check_trunk_weights and want_w and trunk.weights_sha256 and want_w != trunk.weights_sha256:
        raise ValueError(f"{ckpt}: trunk weights of base {base_model_dir} differ from the ones the head was "
                         f"trained on (same tokenizer, different model?); retrain the value model")
    head = ValueHead(int(hmeta["hidden_size"]), int(hmeta["embed_size"]), int(hmeta["dim"]))
    from safetensors.torch import load_file

    head.load_state_dict(load_file(str(ckpt / HEAD_FILE)))
    head.requires_grad_(False)
    head.eval()
    head.to(trunk.device)
    return ValueModel(objective=str(meta["objective"]), trunk=trunk, head=head, meta=meta)


def load_value_models(ckpt_dirs: dict[str, str], base_model_dir: str | os.PathLike, *,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict[str, ValueModel]:
    """Load several checkpoints; checkpoints with the same trunk depth share one trunk."""
    trunks: dict[int, LlamaTrunk] = {}
    out: dict[str, ValueModel] = {}
    for objective, d in ckpt_dirs.items():
        meta = read_meta(d)
        layers = int(meta["trunk_layers"])
        if layers not in trunks:
            # Check the tokenizer before paying for the weights.
            want_tok = (meta.get("base_model") or {}).get("tokenizer_sha256", "")
            if want_tok and tokenizer_fingerprint(base_model_dir) != want_tok:
                load_value_model(d, base_model_dir, dtype=dtype, device=device)  # raises the clear error
            trunks[layers] = LlamaTrunk.from_pretrained(base_model_dir, layers, dtype=dtype, device=device)
        vm = load_value_model(d, trunk=trunks[layers])
        if vm.objective != objective:
            vm = ValueModel(objective=objective, trunk=vm.trunk, head=vm.head, meta=vm.meta)
        out[objective] = vm
    return out


# --------------------------------------------------------------------------------------------
# TD(lambda) targets
# --------------------------------------------------------------------------------------------

def td_lambda_targets(q: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor,
                      lam: float = 0.95, gamma: float = 1.0) -> torch.Tensor:
    """lambda-returns for action values along trajectories with a single terminal reward.

    ``q[n, t]`` = the current head's V(s_t, y_{t+1}) (the value of the prefix after the taken
    token t+1), for t < lengths[n]; ``rewards[n]`` = terminal reward R of trajectory n. Returns
    targets of the same shape (0 beyond each length):

        G[T-1] = R
        G[t]   = gamma * ((1 - lam) * q[t+1] + lam * G[t+1])        for t < T-1

    lam = 1 gives Monte-Carlo targets (gamma^(T-1-t) R), lam = 0 the one-step bootstrap
    gamma * q[t+1].
    """
    q = q.detach().float()
    n, tmax = q.shape
    lengths = lengths.to(torch.long)
    out = torch.zeros(n, tmax, dtype=torch.float32, device=q.device)
    g = torch.zeros(n, dtype=torch.float32, device=q.device)
    rewards = rewards.float()
    for t in range(tmax - 1, -1, -1):
        last = lengths == t + 1
        inside = lengths > t + 1
        nxt = q[:, t + 1] if t + 1 < tmax else torch.zeros_like(g)
        g = torch.where(last, rewards, torch.where(inside, gamma * ((1 - lam) * nxt + lam * g), torch.zeros_like(g)))
        out[:, t] = g
    return out

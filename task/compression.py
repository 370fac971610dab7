"""Uplink compression of client updates (``upload.compression``), plain PyTorch.

A codec encodes the client's *update* (uploaded tensors minus the global tensors it received;
a key the server did not send counts from zero), and the server adds the decoded update back to
what it sent, before validating and aggregating. Coding the update, not the weights, keeps the
quantization error proportional to how far one round moved the adapter.

Codecs (bytes per float32 value, before Flower's per-array headers):
- ``none``: the tensors as they are (4 bytes; no packing, the default).
- ``bf16``: bfloat16, round to nearest (2 bytes).
- ``int8``: one float32 scale per tensor, int8 values with stochastic rounding (1 byte), which
  makes the decoded update unbiased (E[decode(encode(x))] = x; Alistarh et al., QSGD, 2017).
- ``int8-row``: as int8 with one scale per slice along the tensor's smaller dimension (a LoRA
  A (r x d) gets r scales, B (d x r) gets r scales): tighter ranges for a few bytes more.
- ``topk``: the ``upload-topk-fraction`` largest-magnitude entries of every tensor (int32 index
  + float32 value: 8 bytes per kept value) with error feedback (Stich et al., "Sparsified SGD
  with Memory", NeurIPS 2018): what was not sent is kept on the client as a residual, added to
  its next update and persisted beside its personal adapter, so nothing is lost, only delayed.

Every codec packs all tensors into a few flat arrays (Flower adds about 500 bytes of header per
array; a LoRA adapter has 120 of them on SmolLM2) plus a 20-byte digest of the key names and
shapes, so the server still rejects an update whose layout differs from the global adapter.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from task.config import UPLOAD_CODECS as CODECS
PREFIX = "codec:"  # every encoded array's key starts with it; plain adapters never do
LAYOUT = PREFIX + "layout"

State = dict[str, torch.Tensor]
Layout = list[tuple[str, tuple[int, ...]]]


def layout_of(state: dict) -> Layout:
    """The (key, shape) list that fixes the packing order: sorted by key."""
    return [(k, tuple(state[k].shape)) for k in sorted(state)]


def layout_digest(layout: Layout) -> torch.Tensor:
    return torch.frombuffer(bytearray(hashlib.sha1(repr(layout).encode()).digest()),
                            dtype=torch.uint8)


def is_encoded(keys) -> bool:
    return any(str(k).startswith(PREFIX) for k in keys)


def _flat_update(update: State, reference: State, layout: Layout) -> torch.Tensor:
    parts = []
    for key, shape in layout:
        ref = reference.get(key)
        value = update[key].detach().float().reshape(-1)
        if ref is not None and tuple(ref.shape) == shape:
            value = value - torch.as_tensor(ref).float().reshape(-1)
        parts.append(value)
    return torch.cat(parts) if parts else torch.zeros(0)


def _is_tall(shape: tuple[int, ...]) -> bool:
    """More rows than columns (flattened to 2-D): int8-row groups its columns instead."""
    return len(shape) >= 2 and shape[0] > math.prod(shape) // max(shape[0], 1)


def _num_groups(shape: tuple[int, ...]) -> int:
    """int8-row scales of a tensor: one per slice along its smaller dimension."""
    if len(shape) < 2 or math.prod(shape) == 0:
        return 1
    return min(shape[0], math.prod(shape) // shape[0])


def _tensor_groups(chunk: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(groups, size) view of one tensor's flat values, one row per int8-row scale."""
    if len(shape) < 2:
        return chunk.reshape(1, -1)
    matrix = chunk.reshape(shape[0], -1)
    return matrix.t() if _is_tall(shape) else matrix


def _ungroup(grouped: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return (grouped.t() if _is_tall(shape) else grouped).reshape(-1)


def stochastic_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """floor(x + u), u ~ U[0, 1): unbiased, E[result] = x."""
    return torch.floor(x + torch.rand(x.shape, generator=generator))


def _quantize_int8(flat: torch.Tensor, layout: Layout, per_row: bool,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    values, scales, offset = [], [], 0
    for _, shape in layout:
        n = math.prod(shape)
        chunk = flat[offset:offset + n]
        offset += n
        groups = _tensor_groups(chunk, shape) if per_row and n else chunk.reshape(1, -1)
        scale = groups.abs().amax(dim=1, keepdim=True) / 127.0 if n else torch.zeros(1, 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = stochastic_round(groups / scale, generator).clamp_(-127, 127)
        values.append((_ungroup(q, shape) if per_row else q.reshape(-1)).to(torch.int8))
        scales.append(scale.reshape(-1))
    return torch.cat(values), torch.cat(scales).float()


def _dequantize_int8(values: torch.Tensor, scales: torch.Tensor, layout: Layout,
                     per_row: bool) -> torch.Tensor:
    out, offset, s_offset = [], 0, 0
    for _, shape in layout:
        n = math.prod(shape)
        groups = _num_groups(shape) if per_row else 1
        chunk = values[offset:offset + n].float()
        scale = scales[s_offset:s_offset + groups].reshape(-1, 1)
        if chunk.numel() != n or scale.numel() != groups:
            raise ValueError("encoded update: int8 payload shorter than the global adapter")
        grouped = _tensor_groups(chunk, shape) if per_row else chunk.reshape(1, -1)
        out.append(_ungroup(grouped * scale, shape) if per_row else (grouped * scale).reshape(-1))
        offset += n
        s_offset += groups
    if offset != values.numel() or s_offset != scales.numel():
        raise ValueError(f"int8 payload holds {values.numel()} values and {scales.numel()} "
                         f"scales, the global adapter needs {offset} and {s_offset}")
    return torch.cat(out) if out else torch.zeros(0)


def _topk(flat: torch.Tensor, layout: Layout, fraction: float) -> torch.Tensor:
    """Global indices of the largest-magnitude ``fraction`` of every tensor's entries."""
    picked, offset = [], 0
    for _, shape in layout:
        n = math.prod(shape)
        k = min(n, max(1, math.ceil(fraction * n))) if n else 0
        if k:
            picked.append(flat[offset:offset + n].abs().topk(k, sorted=False).indices + offset)
        offset += n
    return torch.sort(torch.cat(picked)).values if picked else torch.zeros(0, dtype=torch.long)


def encode_update(update: State, reference: State, codec: str, *, seed: int = 0,
                  topk_fraction: float = 0.1, residual: torch.Tensor | None = None
                  ) -> tuple[State, torch.Tensor | None]:
    """(encoded arrays, new residual) of ``update`` relative to ``reference``.

    ``residual`` (topk only) is the flat error-feedback memory of this client, None at first;
    the returned one replaces it. Other codecs return None.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown upload compression {codec!r}; one of {CODECS}")
    if codec == "none":
        return dict(update), None
    layout = layout_of(update)
    flat = _flat_update(update, reference, layout)
    encoded: State = {LAYOUT: layout_digest(layout)}
    new_residual = None
    if codec == "bf16":
        encoded[PREFIX + "bf16"] = flat.to(torch.bfloat16).view(torch.int16)
    elif codec in ("int8", "int8-row"):
        generator = torch.Generator().manual_seed(seed)
        values, scales = _quantize_int8(flat, layout, codec == "int8-row", generator)
        encoded[PREFIX + codec] = values
        encoded[PREFIX + "scales"] = scales
    else:  # topk with error feedback
        if residual is not None and residual.shape == flat.shape:
            flat = flat + residual
        index = _topk(flat, layout, topk_fraction)
        value = flat[index]
        new_residual = flat.clone()
        new_residual[index] = 0.0
        encoded[PREFIX + "topk-index"] = index.to(torch.int32)
        encoded[PREFIX + "topk-value"] = value
    return encoded, new_residual


def decode_update(encoded: dict, layout: Layout, reference: dict) -> State:
    """The float32 tensors ``reference + update`` for every (key, shape) of ``layout``, or
    ValueError when the payload does not fit that layout (the server then rejects it)."""
    arrays = {k: torch.tensor(v) for k, v in encoded.items()}  # a copy: Flower's are read-only
    digest = arrays.get(LAYOUT)
    if digest is None or not torch.equal(digest.to(torch.uint8), layout_digest(layout)):
        raise ValueError("encoded update: its keys or shapes differ from the global adapter")
    total = sum(math.prod(s) for _, s in layout)
    codec_keys = sorted(k for k in arrays if k != LAYOUT)
    if codec_keys == [PREFIX + "bf16"]:
        flat = arrays[PREFIX + "bf16"].to(torch.int16).view(torch.bfloat16).float()
    elif codec_keys in ([PREFIX + "int8", PREFIX + "scales"], [PREFIX + "int8-row", PREFIX + "scales"]):
        name = codec_keys[0]
        flat = _dequantize_int8(arrays[name].to(torch.int8), arrays[PREFIX + "scales"].float(),
                                layout, per_row=name.endswith("-row"))
    elif codec_keys == [PREFIX + "topk-index", PREFIX + "topk-value"]:
        index = arrays[PREFIX + "topk-index"].long()
        value = arrays[PREFIX + "topk-value"].float()
        if index.shape != value.shape or (index.numel() and (index.min() < 0 or index.max() >= total)):
            raise ValueError("encoded update: top-k indices out of range")
        flat = torch.zeros(total)
        flat[index] = value
    else:
        raise ValueError(f"encoded update: unknown array set {codec_keys}")
    if flat.numel() != total:
        raise ValueError(f"encoded update holds {flat.numel()} values, the global adapter {total}")
    out, offset = {}, 0
    for key, shape in layout:
        n = math.prod(shape)
        value = flat[offset:offset + n].reshape(shape)
        ref = reference.get(key)
        if ref is not None and tuple(ref.shape) == shape:
            value = value + torch.tensor(ref).float()
        out[key] = value.contiguous()
        offset += n
    return out


# --------------------------------------------------------------------------- client side
def residual_path(client_dir: Path) -> Path:
    return client_dir / "upload-residual.safetensors"


def compress_upload(upload: State, received: State, codec: str, *, seed: int,
                    topk_fraction: float, client_dir: Path) -> State:
    """Encode a client's upload; topk's error-feedback residual is read from and written to
    ``client_dir`` (beside the personal adapter), so it survives restarts."""
    path = residual_path(client_dir)
    residual = load_file(str(path))["residual"] if codec == "topk" and path.exists() else None
    encoded, new_residual = encode_update(upload, received, codec, seed=seed,
                                          topk_fraction=topk_fraction, residual=residual)
    if new_residual is not None:
        client_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"residual": new_residual.contiguous()}, str(tmp))
        tmp.replace(path)
    return encoded

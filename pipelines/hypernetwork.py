"""A1111 hypernetworks (``<hypernet:name:w>``) applied to a diffusers UNet through attention processors.

File format (A1111 ``modules/hypernetworks/hypernetwork.py``): a pickled dict whose
integer keys are context widths (768, 320, 640, 1280, …), each mapping to a pair
``[k_state_dict, v_state_dict]`` of small MLPs, plus metadata: ``layer_structure``
(default ``[1, 2, 1]``), ``activation_func`` (default None = linear),
``is_layer_norm`` (False), ``use_dropout`` (False), ``last_layer_dropout`` (False),
``dropout_structure`` (newer files), ``activate_output`` (True when absent),
``weight_initialization``, ``name``, ``step``, ``sd_checkpoint``, ….

MLP, as A1111 builds it, for each pair of consecutive ``layer_structure`` entries:
``Linear(dim·a, dim·b)``, then the activation (not after the last Linear unless
``activate_output``; never for "linear"/None), then ``LayerNorm`` if
``is_layer_norm`` (after every Linear, the last one included), then ``Dropout``
where the dropout structure says so.  Dropout is the identity at inference but
occupies an index in the ``Sequential``, so it must be there for the state-dict
keys (``linear.0.weight``, ``linear.2.weight``, …) to line up.  A1111 maps
"swish" to ``Hardswish`` and accepts every ``torch.nn`` activation by lower-cased
class name ("mish", "gelu", "silu", …); so do we.

Application: in every attention layer whose *context* width is one of the file's
sizes (self-attention's context is its own hidden states), the inputs of
``to_k``/``to_v`` become ``x + mlp_k(x)·w`` and ``x + mlp_v(x)·w``; several
hypernetworks chain in request order (each acts on the previous one's output);
layers whose width matches nothing are left alone, as in A1111.  We do this with
:class:`HypernetworkAttnProcessor`, which wraps the layer's existing processor
(SDPA, xformers, …) and hands it a stand-in for the attention module whose
``to_k``/``to_v`` see the modified context — no library code is patched.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from pipelines.errors import ModelNotFound, ModelRejected

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".ckpt", ".bin")
SHORTHASH_LEN = 10  # A1111's Hypernetwork.shorthash(): sha256[:10]
_OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


class HypernetSpec(NamedTuple):
    """One ``<hypernet:name:w>`` as resolved by the server: local file, its sha256, the name used, the strength."""

    path: str | os.PathLike
    sha256: str
    name: str
    strength: float = 1.0


@functools.cache
def activation_classes() -> dict[str, type[nn.Module] | None]:
    """A1111's activation table: its fixed names, then every torch.nn activation by lower-cased class name."""
    table: dict[str, type[nn.Module] | None] = {
        "linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
        "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    }
    module = torch.nn.modules.activation
    for cls_name, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__:
            table[cls_name.lower()] = cls
    return table


def dropout_structure(layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's default dropout per layer when a file has no ``dropout_structure``: 0.3 on hidden layers."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    last = 0.3 if last_layer_dropout else 0.0
    return [0.0] + [0.3] * (len(layer_structure) - 3) + [last, 0.0]


class HypernetMLP(nn.Module):
    """One of a size's two MLPs; ``forward`` returns only the residual ``mlp(x)`` (strength is applied outside)."""

    def __init__(self, dim: int, layer_structure, activation_func, add_layer_norm, activate_output, dropouts):
        super().__init__()
        layers: list[nn.Module] = []
        count = len(layer_structure)
        for i in range(count - 1):
            width_out = int(dim * layer_structure[i + 1])
            layers.append(nn.Linear(int(dim * layer_structure[i]), width_out))
            if activation_func not in (None, "linear") and (i < count - 2 or activate_output):
                cls = activation_classes().get(activation_func)
                if cls is None:
                    raise ValueError(f"unsupported activation function {activation_func!r}")
                layers.append(cls())
            if add_layer_norm:
                layers.append(nn.LayerNorm(width_out))
            if dropouts[i + 1] > 0:
                layers.append(nn.Dropout(p=float(dropouts[i + 1])))
        self.linear = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@dataclass
class Hypernetwork:
    """A loaded file: ``layers[width] = (mlp_k, mlp_v)`` plus what the file says about itself."""

    filename: str
    sha256: str
    layers: dict[int, tuple[HypernetMLP, HypernetMLP]]
    internal_name: str | None = None

    @property
    def sizes(self) -> list[int]:
        return sorted(self.layers)


def _unpickle(path: Path) -> dict:
    from pipelines.checkpoint import safe_torch_load

    data = safe_torch_load(path, "hypernetwork")
    if not isinstance(data, dict):
        raise ModelRejected(f"{path.name}: holds a {type(data).__name__}, not an A1111 hypernetwork dict")
    return data


def load_hypernetwork(path: str | os.PathLike, sha256: str = "") -> Hypernetwork:
    """Read an A1111 hypernetwork ``.pt`` safely (``weights_only``) and build its MLPs on the CPU in float32.

    Raises ModelNotFound for a missing file and ModelRejected (naming the file)
    for an unsafe pickle, a file that is not a hypernetwork, or weights that do
    not fit the structure its metadata describes.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"{path.name}: no such hypernetwork file ({path})")
    if path.suffix.lower() not in SUFFIXES:
        raise ModelRejected(f"{path.name}: A1111 hypernetworks are pickled .pt files, not {path.suffix!r}")
    data = _unpickle(path)
    sizes = {k: v for k, v in data.items() if type(k) is int}
    if not sizes:
        raise ModelRejected(f"{path.name}: not an A1111 hypernetwork (no integer size keys; keys: {list(data)[:6]})")
    structure = list(data.get("layer_structure") or [1, 2, 1])
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
        raise ModelRejected(f"{path.name}: layer_structure {structure} must start and end with 1")
    use_dropout = bool(data.get("use_dropout", False))
    dropouts = data.get("dropout_structure")
    if dropouts is not None and any(dropouts):
        use_dropout = True
    if dropouts is None:
        dropouts = dropout_structure(structure, use_dropout, bool(data.get("last_layer_dropout", False)))
    options = {
        "layer_structure": structure,
        "activation_func": data.get("activation_func"),
        "add_layer_norm": bool(data.get("is_layer_norm", False)),
        "activate_output": bool(data.get("activate_output", True)),
        "dropouts": list(dropouts),
    }
    layers = {}
    for size, pair in sizes.items():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(p, dict) for p in pair):
            raise ModelRejected(f"{path.name}: size {size} does not hold a [k, v] pair of state dicts")
        mlps = []
        for state in pair:
            state = {_OLD_KEYS.get(k, k): v for k, v in state.items()}
            try:
                mlp = HypernetMLP(size, **options)
                mlp.load_state_dict(state, strict=True)
            except (ValueError, RuntimeError, IndexError, TypeError) as exc:
                raise ModelRejected(f"{path.name}: size {size} does not fit its metadata ({exc})") from exc
            mlps.append(mlp.eval().requires_grad_(False))
        layers[size] = (mlps[0], mlps[1])
    name = data.get("name")
    return Hypernetwork(path.name, sha256, layers, name if isinstance(name, str) else None)


def _chain(x: torch.Tensor, stack: tuple[tuple[nn.Module, float], ...]) -> torch.Tensor:
    for mlp, strength in stack:
        x = x + mlp(x) * strength
    return x


class _PreProjection:
    """``to_k``/``to_v`` as the wrapped processor sees them: the real Linear fed the hypernetwork-modified context."""

    def __init__(self, linear: nn.Module, stack):
        self._linear, self._stack = linear, stack

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(_chain(x, self._stack))

    def __getattr__(self, name):  # weight, bias, … of the real projection
        return getattr(self._linear, name)


class _AttentionView:
    """Stands in for one ``Attention`` module during one call; everything but ``to_k``/``to_v`` is the module's own."""

    def __init__(self, attn: nn.Module, k_stack, v_stack):
        self._attn = attn
        self.to_k = _PreProjection(attn.to_k, k_stack)
        self.to_v = _PreProjection(attn.to_v, v_stack)

    def __getattr__(self, name):
        return getattr(self._attn, name)


class HypernetworkAttnProcessor:
    """Wraps an attention processor: ``to_k``/``to_v`` inputs get ``x + mlp(x)·w`` for each hypernetwork in order.

    ``k_stack``/``v_stack`` are tuples of ``(mlp, strength)``; ``inner`` is the
    processor the layer had before (restored by :class:`HypernetworkManager`).
    """

    def __init__(self, inner, k_stack, v_stack):
        self.inner, self.k_stack, self.v_stack = inner, tuple(k_stack), tuple(v_stack)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if temb is not None:
            kwargs["temb"] = temb
        view = _AttentionView(attn, self.k_stack, self.v_stack)
        return self.inner(view, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)


def _module_of(unet, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name.removesuffix(".processor"))


class HypernetworkManager:
    """Applies a list of hypernetworks to one pipeline's UNet; files are cached by sha256 (LRU of ``max_cached``).

    ``apply([])`` (or all strengths 0) puts every layer's original processor back,
    so the base output is reproduced exactly.  Not thread-safe: one job at a time.
    """

    def __init__(self, pipe, *, max_cached: int = 4):
        self.pipe = pipe
        self.max_cached = max_cached
        self._cache: OrderedDict[str, Hypernetwork] = OrderedDict()
        self._installed: tuple = ()
        self._warnings: list[str] = []
        self.active: list[HypernetSpec] = []

    def _get(self, spec: HypernetSpec) -> Hypernetwork:
        key = spec.sha256 or str(Path(spec.path).resolve())
        net = self._cache.pop(key, None)
        if net is None:
            net = load_hypernetwork(spec.path, spec.sha256)
        unet = self.pipe.unet
        for mlp_pair in net.layers.values():
            for mlp in mlp_pair:
                mlp.to(device=unet.device, dtype=unet.dtype)
        self._cache[key] = net
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)  # processors still installed keep their MLPs alive
        return net

    def apply(self, specs: Iterable[HypernetSpec | tuple]) -> list[str]:
        """Make exactly ``specs`` active (in order); returns warnings (a hypernetwork that matched no layer).

        Loads each file once (cache by sha256); reinstalls processors only when
        the (sha256, strength) list changed.  Strength 0 entries are skipped: they
        add ``mlp(x)·0`` in A1111, i.e. nothing.
        """
        specs = [HypernetSpec(*s) for s in specs]
        key = tuple((s.sha256 or str(s.path), float(s.strength)) for s in specs if float(s.strength) != 0.0)
        if key == self._installed and (not key or self._still_installed()):
            self.active = specs
            return list(self._warnings)
        nets = [(self._get(s), float(s.strength), s) for s in specs if float(s.strength) != 0.0]
        unet = self.pipe.unet
        current = unet.attn_processors
        widths = {name: _module_of(unet, name).cross_attention_dim for name in current}
        warnings = []
        for net, _, spec in nets:
            if not set(net.sizes) & set(widths.values()):
                msg = (f"hypernetwork {spec.name}: none of its sizes {net.sizes} match this model's attention "
                       f"widths {sorted(set(widths.values()))}; it has no effect")
                log.warning(msg)
                warnings.append(msg)
        processors, wrapped = {}, False
        for name, proc in current.items():
            inner = proc.inner if isinstance(proc, HypernetworkAttnProcessor) else proc
            matching = [(net.layers[widths[name]], w) for net, w, _ in nets if widths[name] in net.layers]
            if matching:
                k_stack = [(pair[0], w) for pair, w in matching]
                v_stack = [(pair[1], w) for pair, w in matching]
                processors[name] = HypernetworkAttnProcessor(inner, k_stack, v_stack)
                wrapped = True
            else:
                processors[name] = inner
        if wrapped or any(isinstance(p, HypernetworkAttnProcessor) for p in current.values()):
            unet.set_attn_processor(processors)
        self._installed, self._warnings, self.active = key, warnings, specs
        return list(warnings)

    def _still_installed(self) -> bool:
        """False when someone replaced our processors since (``set_attn_processor``, xformers, …)."""
        return any(isinstance(p, HypernetworkAttnProcessor) for p in self.pipe.unet.attn_processors.values())

    def clear(self) -> None:
        """Remove every hypernetwork (same as ``apply([])``)."""
        self.apply([])

    def cached(self) -> list[str]:
        """sha256 keys of the files held in memory, least recently used first."""
        return list(self._cache)


def infotext_params(specs: Iterable[HypernetSpec | tuple]) -> dict[str, object]:
    """``Hypernet`` / ``Hypernet strength`` as A1111 (pre-1.0) wrote them; several are comma-joined.

    A1111 1.x keeps ``<hypernet:name:w>`` in the prompt and adds no keys; older
    versions wrote ``Hypernet: <name>`` and ``Hypernet strength: <w>`` (strength
    only when not the default 1).  Values with commas get JSON-quoted by
    :func:`pipelines.infotext.build_infotext`.
    """
    specs = [HypernetSpec(*s) for s in specs]
    if not specs:
        return {}
    names = ", ".join(s.name for s in specs)
    strengths = [float(s.strength) for s in specs]
    strength = None if all(w == 1.0 for w in strengths) else ", ".join(str(w) for w in strengths)
    if strength is not None and len(strengths) == 1:
        strength = strengths[0]
    return {"Hypernet": names, "Hypernet strength": strength}


def records(specs: Iterable[HypernetSpec | tuple]) -> list[dict[str, object]]:
    """What ``params.json`` records per hypernetwork: name, strength, A1111 short hash and full sha256."""
    return [
        {"name": s.name, "strength": float(s.strength), "hash": s.sha256[:SHORTHASH_LEN] or None, "sha256": s.sha256}
        for s in (HypernetSpec(*x) for x in specs)
    ]

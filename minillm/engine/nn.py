"""Modules: parameters that know their names, and the layers built from them.

Chapter 03 teaches this. The names and behaviour follow ``torch.nn``: a ``Module`` finds its parameters
by attribute assignment, names them with dotted paths (``0.weight``, ``attn.c_proj.bias``) exactly as torch
does, so a torch twin's ``state_dict()`` loads 1:1. Every layer's forward calls
``minillm.engine.functional``; the module only owns the parameters.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterator

import numpy as np

from minillm.engine import functional as F
from minillm.engine.random import default_generator
from minillm.engine.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module registers as a trainable weight (a leaf with ``requires_grad=True``)."""

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Module:
    """Base class of every layer and model. Subclasses assign Parameters and Modules in ``__init__``
    and write ``forward``; calling the module calls ``forward``."""

    def __init__(self):
        # Written through object.__setattr__ because our own __setattr__ needs these dicts to exist.
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            if isinstance(value, (Parameter, Module)):
                raise AttributeError(f"cannot assign {name!r} before Module.__init__() has run; "
                                     "call super().__init__() first in your __init__")
            return object.__setattr__(self, name, value)
        if isinstance(value, Parameter):
            home = self._parameters
        elif isinstance(value, Module):
            home = self._modules
        else:
            home = self.__dict__
        # A name lives in exactly one place, so re-assigning `self.fc = ...` replaces, never duplicates;
        # replacing within the same registry keeps the name's position (and so state_dict order), as torch.
        for registry in (self._parameters, self._modules, self.__dict__):
            if registry is not home:
                registry.pop(name, None)
        if home is self.__dict__:
            object.__setattr__(self, name, value)
        else:
            home[name] = value

    def __getattr__(self, name: str):
        # Only called when normal lookup fails, i.e. for registered parameters and sub-modules.
        for registry in ("_parameters", "_modules"):
            entries = self.__dict__.get(registry, {})
            if name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for registry in (self._parameters, self._modules):
            if name in registry:
                del registry[name]
                return
        object.__delattr__(self, name)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --- walking the tree -------------------------------------------------------------------------

    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def children(self) -> Iterator[Module]:
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module, then every sub-module depth first, with dotted names (torch's order)."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def _all_named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        for module_name, module in self.named_modules():
            for name, param in module._parameters.items():
                yield (f"{module_name}.{name}" if module_name else name), param

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """Dotted name and Parameter; a Parameter shared by two modules (tied weights) is listed once."""
        seen = set()
        for name, param in self._all_named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param

    def parameters(self) -> Iterator[Parameter]:
        for _, param in self.named_parameters():
            yield param

    # --- modes, gradients, dtype --------------------------------------------------------------------

    def train(self, mode: bool = True) -> Module:
        """Set training mode here and in every sub-module (Dropout reads it); returns self."""
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        """Forget every gradient (``p.grad = None``), torch's default ``set_to_none=True``."""
        for param in self.parameters():
            param.grad = None

    def to(self, dtype) -> Module:
        """Cast every parameter to ``dtype`` (np.float32 or np.float64) in place; returns self."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"Module.to: parameters must be float32 or float64, got {dtype}")
        for param in self.parameters():
            param.data = param.data.astype(dtype)
            param.grad = None
        return self

    def float(self) -> Module:
        return self.to(np.float32)

    def double(self) -> Module:
        return self.to(np.float64)

    # --- saving and loading -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every parameter's dotted name -> a copy of its array (tied weights appear under each name)."""
        return {name: param.data.copy() for name, param in self._all_named_parameters()}

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> IncompatibleKeys:
        """Copy arrays into the parameters, keeping each parameter's dtype.

        Values may be numpy arrays or anything ``np.asarray`` reads (a detached torch tensor, a list).
        With ``strict`` a missing or unexpected key is an error; a shape mismatch always is.
        """
        own = dict(self._all_named_parameters())
        missing = [key for key in own if key not in state_dict]
        unexpected = [key for key in state_dict if key not in own]
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict for {type(self).__name__}: missing keys {missing}, "
                             f"unexpected keys {unexpected}; expected exactly {list(own)}")
        values = {key: np.asarray(state_dict[key]) for key in own if key in state_dict}
        for key, value in values.items():  # check every shape before changing anything
            if value.shape != own[key].shape:
                raise ValueError(f"load_state_dict: size mismatch for {key!r}: the checkpoint has shape "
                                 f"{value.shape}, the parameter in the model has shape {own[key].shape}")
        for key, value in values.items():
            own[key].data[...] = value
        return IncompatibleKeys(missing, unexpected)

    # --- printing -----------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + repr(child).replace("\n", "\n  ") for name, child in self._modules.items()]
        if not lines:
            return f"{type(self).__name__}({self.extra_repr()})"
        return f"{type(self).__name__}(\n  " + "\n  ".join(lines) + "\n)"


# --- layers -----------------------------------------------------------------------------------------


class Linear(Module):
    """``y = x @ weight.T + bias`` with weight (out_features, in_features), as ``torch.nn.Linear``.

    Initialised like torch: weight and bias uniform in ±1/sqrt(in_features), which keeps the output's
    variance near the input's for unit-variance inputs.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / np.sqrt(in_features)
        rng = default_generator()
        self.weight = Parameter(rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32))
        self.bias = Parameter(rng.uniform(-bound, bound, out_features).astype(np.float32)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Embedding(Module):
    """A lookup table: row ``i`` of ``weight`` (num_embeddings, embedding_dim) is the vector of id ``i``.
    Initialised N(0, 1) like ``torch.nn.Embedding``."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        weight = default_generator().standard_normal((num_embeddings, embedding_dim))
        self.weight = Parameter(weight.astype(np.float32))

    def forward(self, ids) -> Tensor:
        return F.embedding(ids, self.weight)  # (...) -> (..., embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise the last dimension(s) to zero mean and unit variance, then scale and shift
    (``weight`` starts at 1, ``bias`` at 0), as ``torch.nn.LayerNorm``."""

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.weight = Parameter(np.ones(self.normalized_shape, dtype=np.float32))
        self.bias = Parameter(np.zeros(self.normalized_shape, dtype=np.float32))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    """Zero each element with probability ``p`` while training and scale the rest by 1/(1-p);
    the identity in eval mode. Same as ``torch.nn.Dropout`` (not the same random draws)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.tanh(x)


class GELU(Module):
    """GPT-2's GELU, the tanh approximation: ``torch.nn.GELU(approximate="tanh")``.

    torch's default is the exact erf form; this engine has only the tanh form, so asking for another
    one is an error rather than a silent difference.
    """

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        if approximate != "tanh":
            raise ValueError(f"GELU: only approximate='tanh' is implemented, got approximate={approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class Sequential(Module):
    """Modules applied in order; they are named "0", "1", ... as in ``torch.nn.Sequential``."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, module in enumerate(modules):
            if not isinstance(module, Module):
                raise TypeError(f"Sequential: argument {i} must be a Module, got {type(module).__name__}")
            setattr(self, str(i), module)

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def forward(self, x):
        for module in self:
            x = module(x)
        return x


class MLP(Sequential):
    """``MLP([784, 512, 10])`` = Linear(784, 512), activation, Linear(512, 10): no activation after the
    last layer, because the loss (cross-entropy) wants raw logits. A torch.nn.Sequential with the same
    layers has the same state_dict keys."""

    def __init__(self, sizes: list[int], activation: type[Module] = ReLU):
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got sizes={sizes}")
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(Linear(fan_in, fan_out))
            if i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)

"""Checks for chapter 03's exercises: torch.nn judges module registration and parameter names, torch.optim judges
the optimizer steps, and numpy's sliding windows judge the context windows.

Three build exercises plug into the engine: `Module.__setattr__` (3.1), `Module.named_parameters` (3.2) and
`AdamW.step` (3.3). With any of them swapped in, `end_to_end_training()` re-runs the chapter's parity check:
minillm's MLP loads a torch twin's weights by name and trains 20 AdamW steps beside torch.nn + torch.optim.AdamW.
"""

import numpy as np
import torch

from minillm.engine import Tensor, nn, optim
from minillm.engine import functional as F
from minillm.engine.random import default_generator
from minillm.exercises import Mismatch, check, exercise, expect_equal, verdict

# --- 3.1 registration in __setattr__ ----------------------------------------------------------------------------

REGISTRIES = ("_parameters", "_modules", "__dict__")


def _homes(module, name: str) -> list[str]:
    """Where `name` is stored on `module` (ours or torch's): some of _parameters, _modules, __dict__."""
    return [registry for registry in REGISTRIES
            if name in (vars(module) if registry == "__dict__" else vars(module).get(registry, {}))]


def _make_value(kind: str, module_class):
    """A fresh "parameter", "module" (holding one parameter) or "plain" value for `module_class`'s side:
    torch's when it is `torch.nn.Module`, ours (Parameters of the engine) otherwise."""
    theirs = module_class is torch.nn.Module
    if kind == "parameter":
        return torch.nn.Parameter(torch.zeros(3)) if theirs else nn.Parameter(np.zeros(3))
    if kind == "plain":
        return [1, 2]  # a list: must stay an ordinary attribute
    child = module_class()
    child.weight = torch.nn.Parameter(torch.ones(2)) if theirs else nn.Parameter(np.ones(2))
    return child


def _assignments_case(your_module, assignments: list[tuple[str, str]]):
    """Apply `self.name = <kind>` in order to a fresh module of each side; both must file every name alike."""
    def run():
        ours, theirs = your_module(), torch.nn.Module()
        done = []
        for name, kind in assignments:
            value = _make_value(kind, your_module)
            setattr(ours, name, value)
            setattr(theirs, name, _make_value(kind, torch.nn.Module))
            done.append(f"self.{name} = <{kind}>")
            where = f"after {'; '.join(done)}"
            for seen in dict.fromkeys(n for n, _ in assignments[:len(done)]):
                got, expected = _homes(ours, seen), _homes(theirs, seen)
                if got != expected:
                    raise Mismatch(f"{where}: {seen!r} should live in {' and '.join(expected)} (as in torch.nn.Module)"
                                   f", found in {' and '.join(got) or 'none of _parameters, _modules, __dict__'}")
            if getattr(ours, name) is not value:
                raise Mismatch(f"{where}: self.{name} does not read back the value just assigned")
        for registry in ("_parameters", "_modules"):
            got, expected = list(vars(ours)[registry]), list(getattr(theirs, registry))
            if got != expected:
                raise Mismatch(f"after {'; '.join(done)}: {registry} holds {got}, torch's {expected} "
                               "(a re-assigned name keeps its place)")
        got = [n for n, _ in ours.named_parameters()]
        expected = [n for n, _ in theirs.named_parameters()]
        if got != expected:
            raise Mismatch(f"after {'; '.join(done)}: named_parameters() gives {got}, torch's {expected}")
    return run


def _before_init_case(your_module, kind: str):
    """Assigning `kind` before Module.__init__() ran: torch allows plain values and raises AttributeError otherwise."""
    def outcome(module_class):
        class Early(module_class):
            def __init__(self):
                self.early = _make_value(kind, module_class)
                super().__init__()
        try:
            Early()
        except NotImplementedError:
            raise
        except Exception as error:  # noqa: BLE001 - the exception's type is the answer being judged
            return type(error).__name__
        return "no error"

    def run():
        expected, got = outcome(torch.nn.Module), outcome(your_module)
        if got != expected:
            raise Mismatch(f"`self.early = <{kind}>` before super().__init__(): torch gives {expected}, yours {got}")
    return run


@exercise("3.1", "module registration", kind="build", component="module_setattr",
          replaces="minillm.engine.nn:Module.__setattr__", hides=("nn.Module.__setattr__",))
def check_module_setattr(module_setattr) -> None:
    """Exercise 3.1: `Module.__setattr__(self, name, value)` files Parameters, Modules and plain values as torch.nn does."""
    your_module = type("YourModule", (nn.Module,), {"__setattr__": module_setattr})
    cases = [
        _assignments_case(your_module, [("scale", "plain"), ("weight", "parameter"), ("inner", "module"),
                                        ("bias", "parameter"), ("notes", "plain")]),
        _assignments_case(your_module, [("w", "parameter"), ("x", "parameter"), ("fc", "module"), ("w", "parameter"),
                                        ("fc", "parameter")]),
        _assignments_case(your_module, [("y", "plain"), ("y", "parameter"), ("z", "plain"), ("z", "module")]),
        _before_init_case(your_module, "plain"),
        _before_init_case(your_module, "parameter"),
        _before_init_case(your_module, "module"),
    ]
    check("3.1", cases,
          hint="a name lives in exactly one place: a Parameter in self._parameters, a Module in self._modules, "
               "anything else in the instance's own __dict__",
          more="before storing a value, take its name out of the other two places (normal attribute lookup reads "
               "__dict__ first, so a stale entry there hides the registries). Store plain values with "
               "object.__setattr__ so your function does not call itself. Before Module.__init__ has run there are "
               "no registries yet: plain values still work, Parameters and Modules raise AttributeError.")


# --- 3.2 named_parameters ----------------------------------------------------------------------------------------


def _tied_model(lib):
    """The same small model in torch.nn (`lib=torch.nn`) or ours (`lib=nn`): nested containers, an own parameter
    registered after a child, a layer without bias, and an output head tied to the embedding."""
    model = lib.Module()
    model.wte = lib.Embedding(6, 4)
    model.scale = torch.nn.Parameter(torch.ones(4)) if lib is torch.nn else nn.Parameter(np.ones(4, dtype=np.float32))
    model.blocks = lib.Sequential(lib.Linear(4, 4), lib.ReLU(),
                                  lib.Sequential(lib.LayerNorm(4), lib.Linear(4, 4, bias=False)))
    model.head = lib.Linear(4, 6, bias=False)
    model.head.weight = model.wte.weight
    return model


def _named_parameters_case(named_parameters, build, what: str):
    def run():
        ours, theirs = build(nn), build(torch.nn)
        got = named_parameters(ours)
        if got is None or isinstance(got, (str, bytes)) or not hasattr(got, "__iter__"):
            raise Mismatch(f"{what}: expected an iterator of (name, Parameter) pairs, got {got!r:.60}")
        got = list(got)
        for item in got:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], nn.Parameter)):
                raise Mismatch(f"{what}: every item must be a (name, Parameter) pair, got {item!r:.60}")
        names, expected = [name for name, _ in got], [name for name, _ in theirs.named_parameters()]
        for position, (name, wanted) in enumerate(zip(names, expected)):
            if name != wanted:
                raise Mismatch(f"{what}: position {position}: expected {wanted!r} (torch's order), got {name!r}")
        if len(names) != len(expected):
            raise Mismatch(f"{what}: expected {len(expected)} parameters {expected}, got {len(names)}: {names}")
        for name, param in got:
            owner = ours
            for part in name.split("."):
                owner = getattr(owner, part)
            if param is not owner:
                raise Mismatch(f"{what}: the Parameter yielded as {name!r} is not the object at model.{name}")
    return run


@exercise("3.2", "named parameters", kind="build", component="named_parameters",
          replaces="minillm.engine.nn:Module.named_parameters",
          hides=("nn.Module.named_parameters", "nn.Module.named_modules"))
def check_named_parameters(named_parameters) -> None:
    """Exercise 3.2: `Module.named_parameters(self)` yields torch's dotted names in torch's order, tied weights once."""
    cases = [
        _named_parameters_case(named_parameters, lambda lib: lib.Linear(4, 3), "Linear(4, 3)"),
        _named_parameters_case(named_parameters, lambda lib: lib.Sequential(lib.Linear(5, 8), lib.Tanh(),
                                                                            lib.Linear(8, 2)),
                               "Sequential(Linear(5, 8), Tanh(), Linear(8, 2))"),
        _named_parameters_case(named_parameters, _tied_model,
                               "a model with nested Sequentials, its own `scale` and a head tied to the embedding"),
    ]
    check("3.2", cases,
          hint="a module's own parameters first, then each child's, depth first in registration order, every name "
               "prefixed with the path of child names that leads to it",
          more="the names join with dots and a top-level parameter has no prefix ('weight', not '.weight'). Walking "
               "self._parameters and then recursing into each entry of self._modules with the prefix so far is the "
               "simplest route. Remember which Parameter objects were already yielded (by identity: id(p)) so a "
               "tied weight appears once, under the first name the walk reaches.")


# --- 3.3 AdamW.step -------------------------------------------------------------------------------------------


def _adamw_case(adamw_step, rng, dtype, groups: list[dict], steps: int = 6, late: int | None = None):
    """Run `steps` steps of the learner's step on `optim.AdamW` and of `torch.optim.AdamW` on twin parameters.

    `groups` are parameter groups (`shapes` plus hyper-parameters); parameter number `late` has no gradient on the
    first two steps, so it must be skipped and its own step count starts later.
    """
    tol = dict(atol=1e-12, rtol=1e-9) if dtype == np.float64 else dict(atol=1e-6, rtol=1e-5)
    shapes = [shape for group in groups for shape in group["shapes"]]
    starts = [rng.normal(size=shape).astype(dtype) for shape in shapes]
    grads = [[rng.normal(scale=1.0 + step, size=shape).astype(dtype) for shape in shapes] for step in range(steps)]

    def run():
        ours = [nn.Parameter(start.copy()) for start in starts]
        theirs = [torch.nn.Parameter(torch.from_numpy(start.copy())) for start in starts]

        def param_groups(params):
            it = iter(params)
            return [{**{k: v for k, v in g.items() if k != "shapes"}, "params": [next(it) for _ in g["shapes"]]}
                    for g in groups]
        optimizer = optim.AdamW(param_groups(ours))
        reference = torch.optim.AdamW(param_groups(theirs), foreach=False)
        settings = "; ".join(", ".join(f"{k}={v}" for k, v in g.items()) for g in groups)
        for step in range(1, steps + 1):
            for i, (p, t) in enumerate(zip(ours, theirs)):
                has_grad = not (i == late and step <= 2)
                p.grad = grads[step - 1][i].copy() if has_grad else None
                t.grad = torch.from_numpy(grads[step - 1][i].copy()) if has_grad else None
            adamw_step(optimizer)
            reference.step()
            for i, (p, t) in enumerate(zip(ours, theirs)):
                where = f"parameter {i} (group settings: {settings}) after step {step}"
                if not isinstance(p.data, np.ndarray) or p.data.dtype != dtype:
                    got = p.data.dtype if isinstance(p.data, np.ndarray) else type(p.data).__name__
                    raise Mismatch(f"{where}: p.data must stay a {np.dtype(dtype)} numpy array, got {got}")
                expect_equal(p.data, t.detach().numpy(), what=f"values of {where}", **tol)
                if t not in reference.state:
                    continue
                state = optimizer.state.get(p) or {}
                missing = [key for key in ("step", "exp_avg", "exp_avg_sq") if key not in state]
                if missing:
                    raise Mismatch(f"{where}: self.state[p] has no {', '.join(map(repr, missing))}")
                expect_equal(state["step"], float(reference.state[t]["step"]), what=f"state['step'] of {where}")
                for key in ("exp_avg", "exp_avg_sq"):
                    expect_equal(state[key], reference.state[t][key].numpy(), what=f"state[{key!r}] of {where}", **tol)
    return run


@exercise("3.3", "AdamW step", kind="build", component="adamw_step", replaces="minillm.engine.optim:AdamW.step",
          hides=("optim.AdamW.step",))
def check_adamw_step(adamw_step) -> None:
    """Exercise 3.3: `AdamW.step(self)` over param_groups and per-parameter state, judged by ``torch.optim.AdamW``."""
    rng = np.random.default_rng(33)
    cases = [
        _adamw_case(adamw_step, rng, np.float64, [dict(shapes=[(4,), (3, 5)])]),  # torch's defaults
        _adamw_case(adamw_step, rng, np.float64,
                    [dict(shapes=[(2, 3), (3,)], lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                     dict(shapes=[(5,)], lr=0.3, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.0)], late=1),
        _adamw_case(adamw_step, rng, np.float32, [dict(shapes=[(3, 4)], lr=0.01, weight_decay=0.1)]),
    ]
    check("3.3", cases,
          hint="AdamW keeps two running averages per parameter, corrects their start-at-zero bias with the "
               "parameter's own step count, and shrinks the weights directly instead of adding decay to the gradient",
          more="read lr, betas, eps and weight_decay from each group, not from self.defaults. A parameter whose "
               "grad is None is skipped and gets no state. self.state[p] is created the first time p has a gradient, "
               "with 'step' = 0 and zero arrays 'exp_avg' and 'exp_avg_sq' of p's shape and dtype; 'step' then "
               "counts p's own updates from 1. Update p.data (keep its dtype), never p.grad.")


# --- the plugged-in end-to-end check: the chapter's twenty steps beside torch -------------------------------------

E2E_TOLERANCE = 1e-12  # float64: rounding is ~1e-16 per operation; 20 steps of a 10-32-3 MLP stay far below this


def train_mlp_twins(steps: int = 20):
    """Section 2's parity run: minillm's float64 `nn.MLP([10, 32, 3])` loads a torch twin's weights by name; both take
    `steps` AdamW steps (lr=0.01, betas=(0.9, 0.99), weight_decay=0.1) on the same batch.

    Returns (our parameter names, torch's names, our final arrays by name, torch's by name). Neither the engine's
    nor torch's global random state changes.
    """
    engine_rng = default_generator().bit_generator.state
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            theirs = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).double()
        ours = nn.MLP([10, 32, 3], activation=nn.Tanh).double()
    finally:
        default_generator().bit_generator.state = engine_rng
    ours.load_state_dict(theirs.state_dict())
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 10)), rng.integers(0, 3, size=16)  # (B, in), (B,)
    settings = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    optimizer, reference = optim.AdamW(ours.parameters(), **settings), torch.optim.AdamW(theirs.parameters(), **settings)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(ours(Tensor(x)), y).backward()
        optimizer.step()
        reference.zero_grad()
        torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        reference.step()
    ours_final = {name: p.data.copy() for name, p in ours.named_parameters()}
    theirs_final = {name: p.detach().numpy().copy() for name, p in theirs.named_parameters()}
    return list(ours_final), list(theirs_final), ours_final, theirs_final


def end_to_end_training() -> bool:
    """Plug-in verdict for 3.1-3.3: with the learner's component inside the engine, minillm's MLP and AdamW take the
    chapter's 20 steps beside torch.nn + torch.optim.AdamW; names must agree and every parameter stay within
    `E2E_TOLERANCE` (not bit for bit: the two sides use different matmul kernels and operation orders)."""
    claim = f"minillm's MLP + AdamW, 20 steps on your code, equal torch.nn + torch.optim.AdamW (max|Δ| < {E2E_TOLERANCE:g})"
    try:
        names, expected_names, ours, theirs = train_mlp_twins()
    except NotImplementedError:
        raise
    except Exception as error:  # noqa: BLE001 - the learner's code broke the run: report it, do not crash the cell
        return verdict(False, claim, f"the run raised {type(error).__name__}: {error}")
    if names != expected_names:
        return verdict(False, claim, f"parameter names {names}, torch's {expected_names}")
    errors = {name: float(np.abs(ours[name] - theirs[name]).max()) for name in names}
    worst = max(errors, key=errors.get)
    return verdict(errors[worst] < E2E_TOLERANCE, claim, f"{worst} is off by {errors[worst]:.3g}")


# --- practice ----------------------------------------------------------------------------------------------------


def _gradients(rng: np.random.Generator, shape: tuple[int, ...], steps: int) -> list[np.ndarray]:
    # Gradients that change sign and size from step to step, so a missing term cannot hide.
    return [rng.normal(scale=1.0 + i, size=shape) for i in range(steps)]


@exercise("3.4", "SGD with momentum")
def check_sgd_momentum_step(sgd_momentum_step) -> None:
    """Exercise 3.4: one step of SGD with (heavy-ball) momentum, as ``torch.optim.SGD(momentum=...)``."""
    rng = np.random.default_rng(31)

    def case(shape, lr, momentum, steps=5):
        start, grads = rng.normal(size=shape), _gradients(rng, shape, steps)

        def run():
            reference = torch.tensor(start, requires_grad=True)
            optimizer = torch.optim.SGD([reference], lr=lr, momentum=momentum)
            param, buf = start.copy(), None
            for step, grad in enumerate(grads, start=1):
                reference.grad = torch.from_numpy(grad)
                optimizer.step()
                param, buf = sgd_momentum_step(param, grad.copy(), buf, lr, momentum)
                where = f"step {step} (shape {shape}, lr={lr}, momentum={momentum})"
                expect_equal(buf, optimizer.state[reference]["momentum_buffer"].numpy(),
                             what=f"momentum buffer after {where}", atol=1e-12, rtol=1e-10)
                expect_equal(param, reference.detach().numpy(), what=f"param after {where}", atol=1e-12, rtol=1e-10)
        return run

    cases = [case((5,), lr=0.1, momentum=0.9), case((3, 4), lr=0.02, momentum=0.5), case((2, 3, 1), lr=1.0, momentum=0.99)]
    check("3.4", cases,
          hint="torch's momentum buffer is a running sum of gradients, not an average of them, and on the first step "
               "there is no buffer yet",
          more="the first step starts the buffer from the gradient itself (a copy, so later in-place updates cannot "
               "change grad); later steps scale the old buffer by momentum before adding the new gradient, with no "
               "(1 - momentum) factor. The parameter then moves against the buffer, not the raw gradient.")


@exercise("3.5", "context windows")
def check_build_context_windows(build_context_windows) -> None:
    """Exercise 3.5: every (context of block_size ids, next id) pair of a 1-D int array, as two integer arrays."""
    rng = np.random.default_rng(34)

    def case(ids, block_size):
        def run():
            expected_x = np.lib.stride_tricks.sliding_window_view(ids, block_size)[:-1]  # (N, block_size)
            expected_y = ids[block_size:]  # (N,)
            got = build_context_windows(ids.copy(), block_size)
            if not (isinstance(got, tuple) and len(got) == 2):
                raise Mismatch(f"expected a tuple (X, Y), got {type(got).__name__}")
            what = f"an array of {len(ids)} ids with block_size={block_size}"
            expect_equal(got[0], expected_x, what=f"X for {what}")
            expect_equal(got[1], expected_y, what=f"Y for {what}")
        return run

    cases = [case(np.arange(10), 3), case(rng.integers(0, 60, size=57), 8), case(np.array([4, 1, 7, 7, 2]), 4),
             case(rng.integers(0, 5, size=31), 1)]
    check("3.5", cases,
          hint="there are len(ids) - block_size pairs, and the target of a window is the id right after its last one",
          more="for every start position i the context is the block_size ids from i on; a (N, block_size) array of "
               "positions, whose row i counts up from i, picks all windows at once when it indexes the numpy array "
               "(broadcast a column of starts against a row of offsets).")

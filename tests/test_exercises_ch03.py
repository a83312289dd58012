"""Chapter 03's checks pass right answers, flag plausible wrong ones and wait for untouched stubs; the three build
exercises, plugged into the engine, drive the chapter's 20-step parity with torch and leave nothing behind."""

import numpy as np
import pytest

from minillm.engine import nn, optim
from minillm.exercises import ch03, use
from exercise_helpers import outputs, run_three, stub

# --- 3.1 module registration ---------------------------------------------------------------------------------


def module_setattr(self, name, value):
    if isinstance(value, nn.Parameter):
        home = "_parameters"
    elif isinstance(value, nn.Module):
        home = "_modules"
    else:
        home = "__dict__"
    if "_parameters" not in self.__dict__:  # Module.__init__ has not run: no registries yet
        if home != "__dict__":
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() has run")
        return object.__setattr__(self, name, value)
    for registry in ("_parameters", "_modules"):
        if registry != home:
            self.__dict__[registry].pop(name, None)
    if home == "__dict__":
        object.__setattr__(self, name, value)
    else:
        self.__dict__.pop(name, None)
        self.__dict__[home][name] = value


def setattr_parameters_only(self, name, value):  # forgets sub-modules: they become plain attributes
    if isinstance(value, nn.Parameter) and "_parameters" in self.__dict__:
        self.__dict__["_parameters"][name] = value
    else:
        object.__setattr__(self, name, value)


def setattr_leaves_stale_entries(self, name, value):  # files new values but never removes the old home
    if isinstance(value, nn.Parameter):
        self.__dict__["_parameters"][name] = value
    elif isinstance(value, nn.Module):
        self.__dict__["_modules"][name] = value
    else:
        object.__setattr__(self, name, value)


def test_module_setattr_check(capsys):
    passed, stubbed, wrong = run_three(ch03.check_module_setattr, module_setattr, setattr_parameters_only, capsys)
    assert passed == "Exercise 3.1 (module registration): passed ✓"
    assert stubbed.startswith("Exercise 3.1 (module registration): not attempted yet")
    assert wrong == ("Exercise 3.1 (module registration): not yet ✗ - case 1: after self.scale = <plain>; "
                     "self.weight = <parameter>; self.inner = <module>: 'inner' should live in _modules (as in "
                     "torch.nn.Module), found in __dict__")
    ch03.check_module_setattr(setattr_leaves_stale_entries)
    assert outputs(capsys)[0] == (
        "Exercise 3.1 (module registration): not yet ✗ - case 2: after self.w = <parameter>; self.x = <parameter>; "
        "self.fc = <module>; self.w = <parameter>; self.fc = <parameter>: 'fc' should live in _parameters (as in "
        "torch.nn.Module), found in _parameters and _modules")


def test_module_setattr_check_judges_assignment_before_init_by_torch(capsys):
    def reads_a_registry_first(self, name, value):  # touches self._parameters even for a plain value before __init__
        if name in self._parameters and not isinstance(value, nn.Parameter):
            del self._parameters[name]
        module_setattr(self, name, value)

    ch03.check_module_setattr(reads_a_registry_first)
    assert outputs(capsys)[0] == ("Exercise 3.1 (module registration): not yet ✗ - case 4: `self.early = <plain>` "
                                  "before super().__init__(): torch gives no error, yours AttributeError")


# --- 3.2 named parameters ------------------------------------------------------------------------------------


def named_parameters(self):
    seen = set()

    def walk(module, prefix):
        for name, param in module._parameters.items():
            if id(param) not in seen:
                seen.add(id(param))
                yield prefix + name, param
        for name, child in module._modules.items():
            yield from walk(child, prefix + name + ".")
    yield from walk(self, "")


def named_parameters_leading_dot(self, prefix=""):  # joins with a dot even at the top: ".weight", ".0.weight"
    for name, param in self._parameters.items():
        yield f"{prefix}.{name}", param
    for name, child in self._modules.items():
        yield from named_parameters_leading_dot(child, f"{prefix}.{name}")


def named_parameters_with_duplicates(self):  # a tied weight comes out twice
    for module_name, module in self.named_modules():
        for name, param in module._parameters.items():
            yield (f"{module_name}.{name}" if module_name else name), param


def test_named_parameters_check(capsys):
    passed, stubbed, wrong = run_three(ch03.check_named_parameters, named_parameters, named_parameters_leading_dot,
                                       capsys)
    assert passed == "Exercise 3.2 (named parameters): passed ✓"
    assert stubbed.startswith("Exercise 3.2 (named parameters): not attempted yet")
    assert wrong == ("Exercise 3.2 (named parameters): not yet ✗ - case 1: Linear(4, 3): position 0: expected "
                     "'weight' (torch's order), got '.weight'")
    ch03.check_named_parameters(named_parameters_with_duplicates)
    ch03.check_named_parameters(lambda self: None)
    duplicates, nothing = outputs(capsys)
    assert duplicates.startswith("Exercise 3.2 (named parameters): not yet ✗ - case 3: a model with nested "
                                 "Sequentials, its own `scale` and a head tied to the embedding: expected 7 parameters")
    assert nothing.endswith("expected an iterator of (name, Parameter) pairs, got None")


# --- 3.3 AdamW step --------------------------------------------------------------------------------------------


def adamw_step(self):
    for group in self.param_groups:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state.setdefault(p, {})
            if not state:
                state.update(step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data))
            state["step"] += 1
            t = state["step"]
            p.data = p.data * (1 - lr * weight_decay)
            state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * p.grad
            state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * p.grad**2
            m_hat = state["exp_avg"] / (1 - beta1**t)
            v_hat = state["exp_avg_sq"] / (1 - beta2**t)
            p.data = p.data - lr * m_hat / (np.sqrt(v_hat) + eps)


def adam_with_l2(self):  # torch.optim.Adam's coupled decay: lambda * p goes into the gradient, through the moments
    for group in self.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = p.grad + group["weight_decay"] * p.data
    decays = [group["weight_decay"] for group in self.param_groups]
    for group in self.param_groups:
        group["weight_decay"] = 0.0
    try:
        adamw_step(self)
    finally:
        for group, decay in zip(self.param_groups, decays):
            group["weight_decay"] = decay


def adamw_without_bias_correction(self):
    for group in self.param_groups:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state.setdefault(p, {"step": 0, "exp_avg": 0 * p.data, "exp_avg_sq": 0 * p.data})
            state["step"] += 1
            p.data = p.data * (1 - lr * weight_decay)
            state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * p.grad
            state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * p.grad**2
            p.data = p.data - lr * state["exp_avg"] / (np.sqrt(state["exp_avg_sq"]) + eps)


def test_adamw_step_check(capsys):
    passed, stubbed, coupled = run_three(ch03.check_adamw_step, adamw_step, adam_with_l2, capsys)
    ch03.check_adamw_step(adamw_without_bias_correction)
    (uncorrected,) = outputs(capsys)
    assert passed == "Exercise 3.3 (AdamW step): passed ✓"
    assert stubbed.startswith("Exercise 3.3 (AdamW step): not attempted yet")
    # Case 1 uses torch's default weight decay 0.01, so coupled decay already moves parameter 0 on step 1.
    assert coupled.startswith("Exercise 3.3 (AdamW step): not yet ✗ - case 1: values of parameter 0 (group "
                              "settings: shapes=[(4,), (3, 5)]) after step 1: first mismatch at index (")
    assert uncorrected.startswith("Exercise 3.3 (AdamW step): not yet ✗ - case 1: values of parameter 0")


def test_adamw_step_check_wants_a_per_parameter_step_count(capsys):
    def global_step_count(self):  # counts optimizer steps, so the late parameter's first step is "step 3"
        self.__dict__["calls"] = self.__dict__.get("calls", 0) + 1
        adamw_step(self)
        for state in self.state.values():
            state["step"] = self.__dict__["calls"]

    ch03.check_adamw_step(global_step_count)
    assert "case 2: state['step'] of parameter 1" in outputs(capsys)[0]


# --- the plug-in ---------------------------------------------------------------------------------------------

RIGHT_AND_WRONG = [  # component, the right answer, a known-wrong one
    ("module_setattr", module_setattr, setattr_parameters_only),
    ("named_parameters", named_parameters, named_parameters_leading_dot),
    ("adamw_step", adamw_step, adamw_without_bias_correction),
]
CLAIM = "minillm's MLP + AdamW, 20 steps on your code, equal torch.nn + torch.optim.AdamW (max|Δ| < 1e-12)"


def test_end_to_end_holds_on_the_package_itself(capsys):
    assert ch03.end_to_end_training()
    assert capsys.readouterr().out == f"{CLAIM}: ✓\n"


@pytest.mark.parametrize("component, right, wrong", RIGHT_AND_WRONG, ids=[c for c, _, _ in RIGHT_AND_WRONG])
def test_plug_in_verdict(component, right, wrong, capsys):
    with use(**{component: right}):
        assert ch03.end_to_end_training()
    with use(**{component: wrong}):
        assert not ch03.end_to_end_training()
    right_line, wrong_line = capsys.readouterr().out.splitlines()
    assert right_line == f"{CLAIM}: ✓"
    assert wrong_line.startswith(f"{CLAIM}: ✗ - ")


def test_plug_in_failures_name_the_first_mismatch(capsys):
    with use(module_setattr=setattr_parameters_only):
        ch03.end_to_end_training()
    with use(named_parameters=named_parameters_leading_dot):
        ch03.end_to_end_training()
    with use(adamw_step=adamw_without_bias_correction):
        ch03.end_to_end_training()
    setattr_line, names_line, adamw_line = capsys.readouterr().out.splitlines()
    assert setattr_line.endswith("✗ - the run raised ValueError: load_state_dict for MLP: missing keys [], unexpected "
                                 "keys ['0.weight', '0.bias', '2.weight', '2.bias']; expected exactly []")
    assert names_line.endswith("✗ - parameter names ['.0.weight', '.0.bias', '.2.weight', '.2.bias'], torch's "
                               "['0.weight', '0.bias', '2.weight', '2.bias']")
    assert " ✗ - " in adamw_line and "is off by" in adamw_line


def test_plug_in_of_a_stub_is_skipped(capsys):
    for component, _, _ in RIGHT_AND_WRONG:
        with use(**{component: stub}):
            ch03.end_to_end_training()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" is not written")[0] for line in lines] == [
        "plug-in skipped: your module_setattr (exercise 3.1)", "plug-in skipped: your named_parameters (exercise 3.2)",
        "plug-in skipped: your adamw_step (exercise 3.3)"]


@pytest.mark.parametrize("component, right, wrong", RIGHT_AND_WRONG, ids=[c for c, _, _ in RIGHT_AND_WRONG])
def test_plug_in_leaves_the_package_unchanged(component, right, wrong):
    originals = (nn.Module.__setattr__, nn.Module.named_parameters, optim.AdamW.step)
    before = ch03.train_mlp_twins()
    with use(**{component: wrong}):
        ch03.end_to_end_training()
    with pytest.raises(RuntimeError, match="boom"), use(**{component: right}):
        raise RuntimeError("boom")
    assert (nn.Module.__setattr__, nn.Module.named_parameters, optim.AdamW.step) == originals
    after = ch03.train_mlp_twins()
    assert before[:2] == after[:2]
    assert all(np.array_equal(before[2][name], after[2][name]) for name in before[0])


def test_end_to_end_keeps_the_global_random_state():
    from minillm.engine.random import default_generator
    import torch

    engine, theirs = default_generator().bit_generator.state, torch.random.get_rng_state()
    ch03.train_mlp_twins()
    assert default_generator().bit_generator.state == engine
    assert torch.equal(torch.random.get_rng_state(), theirs)


# --- 3.4 SGD with momentum -----------------------------------------------------------------------------------


def sgd_momentum_step(param, grad, buf, lr, momentum):
    buf = grad.copy() if buf is None else momentum * buf + grad
    return param - lr * buf, buf


def sgd_momentum_step_ema(param, grad, buf, lr, momentum):  # the "average" form torch does not use
    buf = grad.copy() if buf is None else momentum * buf + (1 - momentum) * grad
    return param - lr * buf, buf


def test_sgd_momentum_check(capsys):
    passed, stubbed, wrong = run_three(ch03.check_sgd_momentum_step, sgd_momentum_step, sgd_momentum_step_ema, capsys)
    assert passed == "Exercise 3.4 (SGD with momentum): passed ✓"
    assert stubbed.startswith("Exercise 3.4 (SGD with momentum): not attempted yet")
    assert wrong.startswith("Exercise 3.4 (SGD with momentum): not yet ✗ - case 1: momentum buffer after step 2")
    assert "first mismatch at index (0,)" in wrong


# --- 3.5 context windows -------------------------------------------------------------------------------------


def build_context_windows(ids, block_size):
    n = len(ids) - block_size
    index = np.arange(n)[:, None] + np.arange(block_size)  # (n, block_size)
    return ids[index], ids[block_size:]


def build_context_windows_off_by_one(ids, block_size):  # the target is the last context id, not the next one
    x, _ = build_context_windows(ids, block_size)
    return x, ids[block_size - 1:-1]


def test_build_context_windows_check(capsys):
    passed, stubbed, off_by_one = run_three(ch03.check_build_context_windows, build_context_windows,
                                            build_context_windows_off_by_one, capsys)
    ch03.check_build_context_windows(lambda ids, block_size: [[0]])
    (not_a_pair,) = outputs(capsys)
    assert passed == "Exercise 3.5 (context windows): passed ✓"
    assert "not attempted yet" in stubbed
    assert off_by_one == ("Exercise 3.5 (context windows): not yet ✗ - case 1: Y for an array of 10 ids with "
                          "block_size=3: first mismatch at index (0,): expected 3, got 2")
    assert "case 1: expected a tuple (X, Y), got list" in not_a_pair

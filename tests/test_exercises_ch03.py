"""Chapter 03's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import numpy as np

from minillm.engine import nn
from minillm.exercises import ch03
from exercise_helpers import stub, outputs


# --- 3.1 SGD with momentum ------------------------------------------------------------------------


def sgd_momentum_step(param, grad, buf, lr, momentum):
    buf = grad.copy() if buf is None else momentum * buf + grad
    return param - lr * buf, buf


def sgd_momentum_step_ema(param, grad, buf, lr, momentum):  # the "average" form torch does not use
    buf = grad.copy() if buf is None else momentum * buf + (1 - momentum) * grad
    return param - lr * buf, buf


def test_sgd_momentum_check(capsys):
    ch03.check_sgd_momentum_step(sgd_momentum_step)
    ch03.check_sgd_momentum_step(stub)
    ch03.check_sgd_momentum_step(sgd_momentum_step_ema)
    passed, stubbed, wrong = outputs(capsys)[:3]
    assert passed == "Exercise 3.1 (SGD with momentum): passed ✓"
    assert stubbed.startswith("Exercise 3.1 (SGD with momentum): not attempted yet")
    assert wrong.startswith("Exercise 3.1 (SGD with momentum): not yet ✗ - case 1: momentum buffer after step 2")
    assert "first mismatch at index (0,)" in wrong


# --- 3.2 AdamW ------------------------------------------------------------------------------------


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    param = param * (1 - lr * weight_decay)
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad**2
    m_hat = exp_avg / (1 - beta1**step)
    v_hat = exp_avg_sq / (1 - beta2**step)
    return param - lr * m_hat / (np.sqrt(v_hat) + eps), exp_avg, exp_avg_sq


def adam_with_l2(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    # torch.optim.Adam's coupled decay: the decay goes through the moments instead of straight to the weights.
    return adamw_step(param, grad + weight_decay * param, exp_avg, exp_avg_sq, step, lr, betas, eps, 0.0)


def adamw_without_bias_correction(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    param = param * (1 - lr * weight_decay)
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad**2
    return param - lr * exp_avg / (np.sqrt(exp_avg_sq) + eps), exp_avg, exp_avg_sq


def test_adamw_check(capsys):
    ch03.check_adamw_step(adamw_step)
    ch03.check_adamw_step(stub)
    ch03.check_adamw_step(adam_with_l2)
    ch03.check_adamw_step(adamw_without_bias_correction)
    passed, stubbed, coupled, uncorrected = outputs(capsys)[:4]
    assert passed == "Exercise 3.2 (AdamW): passed ✓"
    assert "not attempted yet" in stubbed
    # Case 1 has no weight decay, so coupled decay only shows up in case 2, already in the first moment.
    assert coupled.startswith("Exercise 3.2 (AdamW): not yet ✗ - case 2: exp_avg after step 1")
    assert uncorrected.startswith("Exercise 3.2 (AdamW): not yet ✗ - case 1: param after step 1")
    assert "first mismatch at index (0,)" in uncorrected


# --- 3.3 Linear module ----------------------------------------------------------------------------


class Linear(nn.Module):
    def __init__(self, in_features, out_features, init=None):
        super().__init__()
        bound = 1 / np.sqrt(in_features)
        rng = np.random.default_rng(0)
        init = init or (lambda shape: rng.uniform(-bound, bound, shape).astype(np.float32))
        self.weight = nn.Parameter(init(self.weight_shape(in_features, out_features)))
        self.bias = nn.Parameter(rng.uniform(-bound, bound, out_features).astype(np.float32))

    def weight_shape(self, in_features, out_features):
        return (out_features, in_features)

    def forward(self, x):
        return x @ self.weight.T + self.bias


class LinearStoredTransposed(Linear):  # weight (in, out), the other common layout, but not torch's
    def weight_shape(self, in_features, out_features):
        return (in_features, out_features)

    def forward(self, x):
        return x @ self.weight + self.bias


class LinearWithoutBiasInForward(Linear):
    def forward(self, x):
        return x @ self.weight.T


class LinearStub(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        raise NotImplementedError


def test_linear_module_check(capsys):
    ch03.check_linear_module(Linear)
    ch03.check_linear_module(LinearStub)
    ch03.check_linear_module(LinearStoredTransposed)
    ch03.check_linear_module(LinearWithoutBiasInForward)
    passed, stubbed, transposed, unbiased = outputs(capsys)[:4]
    assert passed == "Exercise 3.3 (Linear module): passed ✓"
    assert "not attempted yet" in stubbed
    assert transposed == ("Exercise 3.3 (Linear module): not yet ✗ - case 1: named_parameters() of Linear(5, 3): "
                          "expected [('weight', (3, 5)), ('bias', (3,))], got [('weight', (5, 3)), ('bias', (3,))]")
    assert unbiased.startswith("Exercise 3.3 (Linear module): not yet ✗ - case 3: output of Linear(5, 3) on an "
                               "input of shape (4, 5): first mismatch at index (0, 0)")


def test_linear_module_check_catches_an_untorchlike_initialisation(capsys):
    class LinearUnitNormalInit(Linear):
        def __init__(self, in_features, out_features):
            super().__init__(in_features, out_features, init=lambda shape: np.random.default_rng(1).normal(size=shape))

    ch03.check_linear_module(LinearUnitNormalInit)
    assert "case 2: weight of Linear(400, 7): values should be spread uniformly in ±1/sqrt(in_features)" \
        in outputs(capsys)[0]


# --- 3.4 context windows --------------------------------------------------------------------------


def build_context_windows(ids, block_size):
    ids = np.asarray(ids)
    n = len(ids) - block_size
    index = np.arange(n)[:, None] + np.arange(block_size)  # (n, block_size)
    return ids[index], ids[block_size:]


def build_context_windows_off_by_one(ids, block_size):  # the target is the last context id, not the next one
    ids = np.asarray(ids)
    x, _ = build_context_windows(ids, block_size)
    return x, ids[block_size - 1:-1]


def test_build_context_windows_check(capsys):
    ch03.check_build_context_windows(build_context_windows)
    ch03.check_build_context_windows(stub)
    ch03.check_build_context_windows(build_context_windows_off_by_one)
    ch03.check_build_context_windows(lambda ids, block_size: [[0]])
    passed, stubbed, off_by_one, not_a_pair = outputs(capsys)[:4]
    assert passed == "Exercise 3.4 (context windows): passed ✓"
    assert "not attempted yet" in stubbed
    assert off_by_one == ("Exercise 3.4 (context windows): not yet ✗ - case 1: Y for a sequence of 10 ids with "
                          "block_size=3: first mismatch at index (0,): expected 3, got 2")
    assert "case 1: expected a tuple (X, Y), got list" in not_a_pair

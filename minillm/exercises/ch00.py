"""Checks for chapter 00's warm-up exercises; torch judges every answer."""

import numpy as np
import torch

from minillm.exercises import check, expect_equal


def check_softmax(softmax) -> None:
    """Exercise 0.1: a numerically stable softmax over the last axis of a numpy array."""
    rng = np.random.default_rng(0)

    def case(x):
        def run():
            expected = torch.softmax(torch.from_numpy(x), dim=-1).numpy()
            expect_equal(softmax(x), expected, what=f"softmax of a {x.shape} array", atol=1e-12)
        return run

    cases = [case(rng.normal(size=5)), case(rng.normal(size=(3, 7))), case(np.array([[1000.0, 1001.0, 1002.0]]))]
    check("Exercise 0.1 (softmax)", cases, hint="subtract the row max before np.exp, then divide by the row sum "
          "(keepdims=True keeps the shapes broadcastable)")


def check_count_parameters(count_parameters) -> None:
    """Exercise 0.2: the number of parameters of a linear layer, with and without bias."""

    def case(d_in, d_out, bias):
        def run():
            expected = sum(p.numel() for p in torch.nn.Linear(d_in, d_out, bias=bias).parameters())
            expect_equal(count_parameters(d_in, d_out, bias), expected, what=f"Linear({d_in}, {d_out}, bias={bias})")
        return run

    cases = [case(3, 4, True), case(784, 512, True), case(64, 10, False)]
    check("Exercise 0.2 (count parameters)", cases, hint="a weight matrix of d_out x d_in, plus d_out biases")


def check_one_hot(one_hot) -> None:
    """Exercise 0.3: one-hot encode integer class ids as a float array."""

    def case(ids, num_classes):
        def run():
            expected = torch.nn.functional.one_hot(torch.tensor(ids), num_classes).numpy().astype(np.float32)
            got = one_hot(np.array(ids), num_classes)
            expect_equal(got, expected, what=f"one_hot({ids}, {num_classes})")
        return run

    cases = [case([0, 2, 1], 3), case([4], 6), case([[1, 0], [3, 3]], 4)]
    check("Exercise 0.3 (one-hot)", cases, hint="start from np.zeros(ids.shape + (num_classes,)) and set one entry "
          "per id; np.eye(num_classes)[ids] does it in one line")

"""``python -m expandfx demo``: expand a compact net, train it on real data, contract, compare.

The data is scikit-learn's 8×8 handwritten digits (shipped with the package, no
download). The model is the paper's SmallNet shape adapted to 8×8 inputs.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import expandfx as efx
from expandfx.counting import param_count
from expandfx.models import smallnet_digits


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) of scikit-learn's digits, 75/25 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.75 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
          seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def demo(rule: str = "CK", r: float = 4, epochs: int = 40) -> int:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    print(f"data: scikit-learn digits, {len(ytr)} train / {len(yte)} test images of 8x8")
    compact = smallnet_digits()
    print(efx.plan(compact, rule, r, example_inputs=(xtr[:1],)))

    torch.manual_seed(1)
    plain = smallnet_digits()
    t0 = time.perf_counter()
    train(plain, xtr, ytr, epochs)
    t_plain = time.perf_counter() - t0

    torch.manual_seed(1)
    big = efx.expand(smallnet_digits(), rule=rule, r=r)
    t0 = time.perf_counter()
    train(big, xtr, ytr, epochs)
    t_big = time.perf_counter() - t0
    small = efx.contract(big)

    with torch.no_grad():
        big.eval()
        small.eval()
        ref, out = big(xte), small(xte)
        err = ((ref - out).abs().max() / ref.abs().max()).item()
    deployed = smallnet_digits()
    deployed.load_state_dict(small.state_dict())  # same class, same keys
    print()
    print(f"{'model':<28}{'params':>10}{'test acc':>10}{'train s':>9}")
    print(f"{'compact, trained directly':<28}{param_count(plain):>10}"
          f"{accuracy(plain, xte, yte):>10.3f}{t_plain:>9.1f}")
    print(f"{'expanded ' + rule + f' r={r:g}':<28}{param_count(big):>10}"
          f"{accuracy(big, xte, yte):>10.3f}{t_big:>9.1f}")
    print(f"{'contracted (deployable)':<28}{param_count(small):>10}"
          f"{accuracy(deployed, xte, yte):>10.3f}{'':>9}")
    print(f"\ncontract(big) vs big on the test set: max |diff| / max |out| = {err:.2e} "
          f"(contract: DESIGN tolerance 1e-5)")
    if err > 1e-5:
        print("FAILED: the contracted model does not match the expanded one", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expandfx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="expand, train on scikit-learn digits, contract, compare")
    d.add_argument("--rule", default="CK", help="expansion rule (default: CK)")
    d.add_argument("--r", type=float, default=4, help="expansion rate (default: 4)")
    d.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    args = parser.parse_args(argv)
    return demo(args.rule, args.r, args.epochs)


if __name__ == "__main__":
    raise SystemExit(main())

"""The paper's CIFAR-10/100 experiments, for users with a GPU: SmallNet or MobileNet with any
variant (compact, FC, CL, CK, CL+FC, CK+FC, CK+FC+Init, compander, compander+CK).

Uses torchvision's CIFAR datasets (downloaded on first use, elsewhere; this machine has no
internet) and the paper's recipe by default: SGD momentum 0.9, weight decay 5e-4, lr 0.01
divided by 10 at 1/3 and 2/3 of training, batch 128, random crop + flip, with the learning
rates of ``expandfx.param_groups`` (lr/N for the factors of an N-factor block). ``+Init``
trains twice (nonlinear counterpart, then ExpandNet), as the paper does. The trained
expanded model is contracted, exported to ONNX and verified.

    python benchmarks/cifar.py --dataset cifar10 --model smallnet_7x7 --variant CK+FC \\
        --epochs 150 --data ~/data --out runs/ck_fc
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from variants import VARIANTS, build_variant, phases  # noqa: E402

import expandfx as efx  # noqa: E402
from expandfx.models import MobileNetV1, smallnet_3x3, smallnet_7x7  # noqa: E402

MODELS = {"smallnet_3x3": smallnet_3x3, "smallnet_7x7": smallnet_7x7,
          "mobilenet_v1": lambda num_classes: MobileNetV1(num_classes=num_classes,
                                                          width_mult=1.0)}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def datasets(name: str, root: str, download: bool, verify: bool):
    import torchvision
    from torchvision import transforms as T

    base = {"cifar10": torchvision.datasets.CIFAR10,
            "cifar100": torchvision.datasets.CIFAR100}[name]
    if not verify:  # for data written in CIFAR's on-disk format that is not the real CIFAR
        base = type(base.__name__, (base,), {"_check_integrity": lambda self: True,
                                             "_load_meta": _load_meta_unchecked})
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(MEAN, STD)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    return (base(root, train=True, transform=train_tf, download=download),
            base(root, train=False, transform=test_tf, download=download))


def _load_meta_unchecked(self) -> None:
    """torchvision's ``_load_meta`` without the md5 check of the metadata file."""
    import pickle

    path = Path(self.root) / self.base_folder / self.meta["filename"]
    with open(path, "rb") as f:
        self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
    self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: str) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
        total += len(y)
    return correct / max(total, 1)


def train_phase(model: torch.nn.Module, loader, test_loader, args: argparse.Namespace,
                history: list[dict], chain_lr: str) -> None:
    """The paper's recipe, with the learning rates of :func:`expandfx.param_groups`."""
    groups = efx.param_groups(model, args.lr, weight_decay=5e-4, chain_lr=chain_lr,
                              decay_bias_and_norm=True)  # the paper's recipe decays everything
    opt = torch.optim.SGD(groups, momentum=0.9)
    milestones = [args.epochs // 3, 2 * args.epochs // 3]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            if args.max_steps is not None and step >= args.max_steps:
                break
            opt.zero_grad()
            loss = F.cross_entropy(model(x.to(args.device)), y.to(args.device))
            (loss + groups.penalty()).backward()
            opt.step()
        sched.step()
        acc = evaluate(model, test_loader, args.device)
        history.append({"epoch": len(history) + 1, "test_acc": acc, "loss": loss.item(),
                        "seconds": time.perf_counter() - t0})
        print(f"epoch {epoch + 1}/{args.epochs}: test accuracy {acc:.4f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--model", choices=list(MODELS), default="smallnet_7x7")
    p.add_argument("--variant", choices=VARIANTS, default="CK+FC")
    p.add_argument("--r", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--data", default="data", help="dataset folder")
    p.add_argument("--out", default="runs/cifar", help="output folder")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--skip-integrity-check", action="store_true",
                   help="accept files in CIFAR's format that are not the real CIFAR (tests)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch early")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    train_set, test_set = datasets(args.dataset, args.data, not args.no_download,
                                   not args.skip_integrity_check)
    classes = 10 if args.dataset == "cifar10" else 100
    loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True,
                                         num_workers=args.workers, drop_last=False)
    test_loader = torch.utils.data.DataLoader(test_set, 256, num_workers=args.workers)
    torch.manual_seed(0)
    model = build_variant(args.variant, lambda: MODELS[args.model](num_classes=classes),
                          r=args.r).to(args.device)
    history: list[dict] = []
    for phase in range(phases(args.variant)):
        if phase == 1:  # +Init: the counterpart is trained; linearize it, calibrated
            batches = [x.to(args.device) for x, _ in itertools.islice(loader, 8)]
            model = efx.linearize(model, calibrate=batches)
        # +Init's second phase: factor steps sized to the trained factors' norms
        train_phase(model, loader, test_loader, args, history, "norm" if phase else "1/N")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.cpu().eval()
    small = efx.contract(model) if args.variant != "compact" else model
    x = next(iter(test_loader))[0][:4]
    report = efx.export_onnx(model, (x,), out / "model.onnx")
    deployed_acc = evaluate(small, test_loader, "cpu")
    result = {"args": vars(args), "history": history, "final_test_acc": history[-1]["test_acc"],
              "deployed_test_acc": deployed_acc, "onnx_passed": report.passed,
              "params_train": sum(p.numel() for p in model.parameters()),
              "params_test": sum(p.numel() for p in small.parameters())}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    torch.save(small.state_dict(), out / "compact.pt")
    print(f"deployed (contracted) test accuracy {deployed_acc:.4f}; ONNX verified: "
          f"{report.passed}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Random small networks through the whole pipeline: expand → train step → contract → export.

A few examples in CI; the fuzz profile (see README) runs many more and records in
benchmarks/results/fuzz.md how many cases ran.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import count, examples, randomize, rel_err, sgd_steps
from torch import nn

import expandfx as efx


@st.composite
def networks(draw):
    """A random conv net: conv layers (any kernel, stride, padding mode, groups), norms,
    activations, pooling, a shared layer, then a linear head."""
    channels, size = draw(st.integers(1, 4)), draw(st.integers(12, 20))
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 3)) * 2
        groups = draw(st.sampled_from([g for g in (1, 2, channels) if channels % g == 0
                                       and out % g == 0]))
        k = draw(st.sampled_from([1, 3, 5, 7, (1, 5), (3, 5)]))
        kk = (k, k) if isinstance(k, int) else k
        pad = draw(st.sampled_from(["same", "valid", 1, (kk[0] // 2, kk[1] // 2)]))
        stride = 1 if pad == "same" else draw(st.integers(1, 2))
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        if pad == "valid":
            mode = "zeros"
        layers.append(nn.Conv2d(channels, out, kk, stride=stride, padding=pad, groups=groups,
                                bias=draw(st.booleans()), padding_mode=mode))
        try:
            out_shape = nn.Sequential(*layers)(torch.zeros(1, layers[0].in_channels, size,
                                                           size)).shape
        except RuntimeError:  # the kernel no longer fits the feature map: stop here
            out_shape = None
        if out_shape is None or min(out_shape[2:]) < 3:
            layers.pop()
            break
        channels = out
        layers.append(draw(st.sampled_from([nn.ReLU(), nn.BatchNorm2d(out), nn.Tanh(),
                                            nn.Identity()])))
    first_in = layers[0].in_channels if layers else channels
    body = nn.Sequential(*layers)
    features = body(torch.zeros(1, first_in, size, size)).numel()
    hidden = draw(st.integers(2, 12))
    head = nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(),
                         nn.Linear(hidden, 3))
    return nn.Sequential(body, head), (2, first_in, size, size)


@settings(max_examples=examples(6, 150), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(net=networks(), rule=st.sampled_from(["CL", "CK", "FC", "CL+FC", "CK+FC"]),
       r=st.sampled_from([0.5, 1.0, 2.0, 3.0]), mode=st.sampled_from(["auto", "sequential"]),
       seed=st.integers(0, 9))
def test_random_network_pipeline(net, rule, r, mode, seed):
    model, shape = net
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = efx.expand(model, rule, r, mode=mode)
    randomize(big, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    sgd_steps(big, x, steps=1, lr=0.01)
    big.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = efx.contract(big)
    with torch.no_grad():
        out = big(x)
        assert torch.isfinite(out).all()
        assert rel_err(out, small(x)) <= 1e-5
    assert list(small.state_dict()) == list(model.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        report = efx.export_onnx(big, (x,), os.path.join(tmp, "m.onnx"))
    assert report.passed
    count("random networks: expand → SGD step → contract → export → onnxruntime")

"""Non-finite is an error (issue 28, point 2): fold, contract, compand and bake refuse NaN/inf
in parameters, buffers, inputs and outputs, naming the tensor; nothing reports NaN as 0."""

from __future__ import annotations

import math

import pytest
import torch
from expandfx.passes.fold import FoldReport
from torch import nn

import expandfx as efx
from expandfx.errors import ConfigError, ContractionError, NonFiniteError
from expandfx.finite import check_materialized, finite_rel_error

INF, NAN = float("inf"), float("nan")


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


def x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class Masked(nn.Module):
    """Log-probabilities with -inf at masked positions (finite everywhere else)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("mask", torch.arange(4 * 36).reshape(1, -1) % 3 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.bn(self.conv(x)).flatten(1).log_softmax(-1)
        return logits.masked_fill(self.mask, -INF)


class MakesNaN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).log()  # NaN where the conv is negative


def raises_naming(where: str, fn, *args, **kwargs) -> NonFiniteError:
    with pytest.raises(NonFiniteError) as caught:
        fn(*args, **kwargs)
    assert caught.value.where == where and f"'{where}'" in str(caught.value)
    assert "non-finite" in str(caught.value)
    return caught.value


def test_fold_refuses_a_nan_weight() -> None:
    model = cnn()
    with torch.no_grad():
        model[0].weight[1, 0, 0, 0] = NAN
    err = raises_naming("0.weight", efx.fold, model, (x(),))
    assert err.numbers == {"nan": 1, "inf": 0} and err.to_dict()["code"] == "non_finite"


def test_fold_refuses_a_nan_running_var() -> None:
    model = cnn()
    model[1].running_var[2] = NAN
    raises_naming("1.running_var", efx.fold, model, (x(),))


def test_fold_refuses_an_inf_input() -> None:
    bad = x()
    bad[0, 1, 2, 3] = INF
    raises_naming("example_inputs[0]", efx.fold, cnn(), (bad,))


def test_fold_refuses_nan_outputs() -> None:
    err = raises_naming("output[0]", efx.fold, MakesNaN().eval(), (x(),))
    assert "allow_nonfinite_outputs=True" in str(err)


def test_fold_of_masked_outputs_passes_when_allowed() -> None:
    model = Masked().eval()
    raises_naming("output[0]", efx.fold, model, (x(),))  # refused by default
    out = efx.fold(model, (x(),), allow_nonfinite_outputs=True)
    report = out.meta["expandfx.fold"]
    assert report.folded and math.isfinite(report.error) and report.error < 1e-5
    want, got = model(x()), out(x())
    assert torch.equal(torch.isinf(want), torch.isinf(got)) and torch.isinf(got).any()


def test_finite_rel_error_fails_where_the_non_finite_values_differ() -> None:
    ref = torch.tensor([-INF, 1.0, 4.0])
    assert finite_rel_error(ref, torch.tensor([-INF, 1.0, 3.0])) == 0.25  # finite ones only
    assert finite_rel_error(ref, torch.tensor([0.0, 1.0, 4.0])) == INF  # finite where -inf
    assert finite_rel_error(ref, torch.tensor([INF, 1.0, 4.0])) == INF  # another value
    assert finite_rel_error(ref, torch.tensor([-INF, NAN, 4.0])) == INF  # NaN where finite


def test_fold_report_never_prints_nan_as_zero() -> None:
    text = str(FoldReport(error=NAN))
    assert "non-finite" in text and "0.0e+00" not in text
    assert "not measured" in str(FoldReport(error=None))


def test_fold_of_a_meta_model_says_materialize() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ConfigError) as caught:
        efx.fold(model, (x(),))
    text = str(caught.value)
    assert "'0.weight'" in text and "meta" in text and "to_empty" in text
    assert caught.value.code == "meta_device" and not isinstance(caught.value, NonFiniteError)


def test_check_materialized_names_a_meta_buffer() -> None:
    model = cnn()
    model[1].register_buffer("running_var", torch.empty(4, device="meta"))
    with pytest.raises(ConfigError, match="buffer '1.running_var'"):
        check_materialized(model, "export_onnx")


def test_contract_refuses_a_nan_factor() -> None:
    big = efx.expand(cnn(), "CL", 2)
    with torch.no_grad():
        big[0].layers[1].weight[0, 0, 0, 0] = NAN
    raises_naming("0.layers.1.weight", efx.contract, big)
    raises_naming("0.layers.1.weight", efx.fold, big.eval(), (x(),))  # fold checks first


def test_contract_refuses_a_nan_branch_statistic() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    big = efx.expand(model, efx.RepVGG(norm="bn")).eval()
    name = next(n for n, _ in big.named_buffers() if n.endswith("running_var"))
    big.get_buffer(name)[0] = NAN
    raises_naming(name, efx.contract, big)


def test_contract_refuses_a_weight_that_overflows_its_dtype() -> None:
    big = efx.expand(cnn(), "CL", 2).half()
    with torch.no_grad():
        for layer in big[0].layers:
            layer.weight.fill_(300.0)  # finite factors, a product beyond float16's 65504
    err = raises_naming("0.weight", efx.contract, big)
    assert "float16" in str(err) and err.numbers["max_abs"] > 65504


def test_compand_refuses_a_nan_weight() -> None:
    model = cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = NAN
    raises_naming("0.weight", efx.compand, model)


def test_bake_refuses_a_non_finite_v_before_baking_anything() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    c = efx.compand(model, inplace=True)
    with torch.no_grad():  # arctan(inf) = π/2 is finite: only v shows it
        c[1].parametrizations.weight.original[0, 0] = INF
    raises_naming("1.parametrizations.weight.original", efx.bake, c, inplace=True)
    assert len(efx.companded(c)) == 2  # nothing baked


def test_fold_never_swallows_non_finite_into_the_recorded_fallback() -> None:
    class Untraceable(nn.Module):  # FX cannot trace data-dependent control flow
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > -1e9 else -y

    model = Untraceable().eval()
    assert efx.fold(model, (x(),)).meta["expandfx.fold"].graph == "recorded forward"
    model.bn.running_mean[0] = INF
    raises_naming("bn.running_mean", efx.fold, model, (x(),))


def test_a_wrong_fold_is_not_passed_as_exact() -> None:
    from expandfx.passes import fold as fold_pass

    out = efx.fold(cnn(), (x(),))
    report = out.meta[fold_pass.META_KEY]
    with torch.no_grad():
        next(out.parameters())[0].fill_(NAN)
    with pytest.raises(ContractionError, match="non-finite"):
        fold_pass._verified(out, (x(),), cnn()(x()), report)

"""One standard error for every number reported with one (stats.mean_se): sd / sqrt(n) with the sample
standard deviation, and NaN, never None or 0, where one example leaves no spread to estimate."""

import math
import statistics
from types import SimpleNamespace

import torch

from pyro_vae.evaluation.compare import compare
from pyro_vae.evaluation.evaluate import test_accuracy as accuracy_of
from pyro_vae.evaluation.report import paired_difference
from pyro_vae.stats import mean_se

from .test_estimators import X0, Tiny


def test_mean_se_is_the_sample_sd_over_root_n_against_a_float64_reference():
    values = torch.tensor([0.25, -1.5, 3.0, 7.125, 2.0], dtype=torch.float64)
    reference = [float(v) for v in values]
    mean, se = mean_se(values)
    assert math.isclose(mean, statistics.fmean(reference), rel_tol=1e-15)
    assert math.isclose(se, statistics.stdev(reference) / math.sqrt(len(reference)), rel_tol=1e-12)


def test_mean_se_of_one_value_is_that_value_and_nan():
    mean, se = mean_se(torch.tensor([3.5]))
    assert mean == 3.5 and math.isnan(se)
    assert all(math.isnan(v) for v in mean_se(torch.tensor([])))


def test_a_standard_error_over_one_example_is_nan_wherever_it_is_reported():
    """evaluate's accuracy, report's paired difference and compare's reference log p(x) (None before)."""
    one = torch.tensor([1.25])
    assert math.isnan(paired_difference(one, one + 1.0)[1])
    model = SimpleNamespace(predict=lambda x: torch.zeros(x.shape[0], dtype=torch.long))
    data = SimpleNamespace(test_x=X0[:1], test_y=torch.zeros(1, dtype=torch.long))
    accuracy, accuracy_se = accuracy_of(model, data)
    assert accuracy == 1.0 and math.isnan(accuracy_se)
    record = compare(Tiny(), X0[:1], estimators=["mc:1"], repeats=2, eval_k=4)
    assert isinstance(record["log_px_ref_se"], float) and math.isnan(record["log_px_ref_se"])

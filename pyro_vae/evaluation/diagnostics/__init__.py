"""Inference diagnostics: how good is the amortized q(z|x)? Importance weights and PSIS k-hat
(importance.py), the per-example optimal guide q* and the gaps (optimal_guide.py), the true posterior
by NUTS (nuts.py), the whole measurement (diagnosis.py) and its files (report.py). ArviZ is imported
only when k-hat or the NUTS summaries are computed, so `import pyro_vae` stays fast."""

from .diagnosis import Diagnosis, diagnose
from .report import write_report

__all__ = ["Diagnosis", "diagnose", "write_report"]

"""Config is plain data and imports no model (issue 23): what depends on a model kind or a registered
part is checked and settled where a Config becomes a run (models/kind.py's check_config)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_vae import Config, InputError, train
from pyro_vae.models.kind import check_config

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"
TINY = dict(train_size=100, test_size=30, hidden=[8], z_dim=2, epochs=1, eval_k=3)
# pyro_vae/__init__.py imports every layer, so the package is stood in for by a bare one: what is then
# imported is what config.py itself imports
IMPORT_CONFIG_ALONE = f"""
import json, sys, types
package = types.ModuleType("pyro_vae")
package.__path__ = [{str(PACKAGE)!r}]
sys.modules["pyro_vae"] = package
from pyro_vae.config import Config
config = Config.from_dict({{"likelihood": "gaussian"}})
print(json.dumps({{"modules": sorted(m for m in sys.modules if m.startswith("pyro_vae.")),
                   "binarize": config.binarize}}))
"""
ABOVE_CONFIG = ("pyro_vae.inference", "pyro_vae.models", "pyro_vae.figures", "pyro_vae.training",
                "pyro_vae.evaluation", "pyro_vae.sweeps", "pyro_vae.cli")


def test_importing_config_imports_no_model():
    done = subprocess.run([sys.executable, "-c", IMPORT_CONFIG_ALONE], capture_output=True, text=True,
                          check=True)
    loaded = json.loads(done.stdout)
    assert "pyro_vae.config" in loaded["modules"]
    above = [m for m in loaded["modules"] if m.startswith(ABOVE_CONFIG)]
    assert not above, f"pyro_vae.config imports layers above it: {above}"
    assert loaded["binarize"] is None  # the likelihood's choice is settled at the run, not by Config


@pytest.mark.parametrize("settings, message", [
    ({"likelihood": "gaussian", "binarize": "dynamic"}, "makes binary data"),
    ({"model": "hvae", "guide": "iaf"}, "--model hvae has its own guide"),
    ({"prior": "normal", "prior_components": 3}, "--prior-components applies to the mixture priors"),
    ({"prior": "vampire"}, "unknown prior 'vampire'"),
])
def test_a_bad_combination_built_in_python_is_refused_by_train(tmp_path, settings, message):
    """Constructing the Config checks nothing; train refuses it before anything is written."""
    config = Config(**TINY, **settings)
    with pytest.raises(InputError, match=message):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(InputError, match=message):
        check_config(config)


def test_the_run_records_the_binarization_its_likelihood_chose(tmp_path):
    config = Config(**TINY, likelihood="gaussian")
    result = train(config, tmp_path / "run", progress=False)
    assert json.loads((result.out / "config.json").read_text())["binarize"] == "none"
    assert config.binarize is None  # the caller's Config is left as it was
    assert check_config(config) == check_config(Config.from_dict(config.to_dict()))
    assert check_config(Config(likelihood="bernoulli")).binarize == "dynamic"

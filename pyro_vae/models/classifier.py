"""The classifier baseline's model kind ("classifier"): M2's q(y|x) alone (LabelClassifier, models/m2.py),
trained by maximum likelihood on the labelled examples only. It has no latent, no likelihood of x and
no ELBO: its metric is the test accuracy (--early-stop watches the validation accuracy); it draws no
pictures and compare and sample refuse it."""

from __future__ import annotations

from torch import Tensor

from ..data import Dataset
from ..errors import InputError
from ..inference.program import Program
from ..stats import mean_se
from .kind import (
    LATENT_SETTINGS,
    MODEL_KINDS,
    LabelledKind,
    changed,
    check_discrete,
    check_labels,
    check_parts,
    flags,
)
from .m2 import LabelClassifier, build_m2


class ClassifierKind(LabelledKind):
    """--model classifier: the settings of the latent and of the model of x cannot apply."""

    name = "classifier"
    latent = False
    bound = False
    comparison = None
    figures = ()

    def check(self, config) -> None:
        given = changed(config, LATENT_SETTINGS)
        if given:
            raise InputError(f"--model classifier learns q(y|x) alone and has no latent z, no prior, no "
                             f"likelihood of x and no ELBO, so {flags(given)} cannot apply; drop "
                             f"{'it' if len(given) == 1 else 'them'} or use --model m2")
        check_parts(config)
        check_labels(config, self)
        check_discrete(config, self)
        self.check_labelled(config)

    def build(self, config, x_shape: tuple[int, ...]) -> LabelClassifier:
        return build_m2(x_shape, config.classes, encoder=config.encoder, hidden=config.hidden,
                        model="classifier")

    def label_rest(self, data: Dataset, labelled: Tensor) -> Dataset:
        """Only the labelled examples are kept: the baseline learns from nothing else."""
        return Dataset(data.name, data.train_x[labelled], data.test_x, data.train_y[labelled], data.test_y,
                       data.val_x, data.val_y)

    def test_metrics(self, program: Program, data: Dataset) -> dict[str, float | None]:
        return {"test_accuracy": mean_se(self.accuracy(program, data)["correct"])[0]}

    def epoch_line(self, row: dict) -> str:
        return f"test accuracy {row['test_accuracy']:.4f}"

    def per_example(self, program: Program, x: Tensor, k: int = 5000, elbo_samples: int = 10,
                    progress: bool = False) -> dict[str, Tensor]:
        return {}

    def summarize(self, program: Program, x: Tensor, values: dict[str, Tensor], k: int) -> dict:
        return {"n_examples": int(x.shape[0])}

    def evaluation_rows(self, k: int) -> tuple[tuple[str, str], ...]:
        return (("test_accuracy", "test accuracy"),)

    def evaluation_notes(self, result: dict, config) -> list[str]:
        return []

    def result_line(self, summary: dict) -> str:
        return f"test accuracy {summary['test_accuracy']:.4f} ± {summary['test_accuracy_se']:.4f}"

    def refusal(self, command: str, what: str) -> str | None:
        if command in ("compare", "compare-config"):
            return (f"{what} is the classifier baseline (model 'classifier'): it has no latent and no ELBO "
                    "to estimate; compare an M2 or a VAE run")
        if command == "sample":
            return (f"{what} trained the classifier baseline (--model classifier): it generates no images; "
                    "sample an M2 or VAE run")
        if command == "diagnose":
            return (f"{what} trained the classifier baseline (--model classifier): it has no latent to "
                    "diagnose; diagnose a VAE run")
        return None


CLASSIFIER_KIND = MODEL_KINDS.builtin(ClassifierKind())

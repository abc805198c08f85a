"""Early stopping on a validation measure (--early-stop PATIENCE): the validation ELBO, or what the model
kind watches instead (ModelKind.early_stop_metric: the validation accuracy of q(y|x) for M2 and the
classifier); higher is better. The parameters of the epoch with the best value are kept (the trainer
writes them to best.pt when `update` says so), and training stops once PATIENCE epochs in a row have not
beaten it. The count, the best epoch and the measure are plain data in the checkpoint, so a resumed run
continues them (one written before the measure was recorded watched the validation ELBO, and still
does). With --early-stop-rule authors the count is set back to 0
while the epoch is inside the KL warm-up (epoch < --kl-anneal) and training stops once it exceeds
PATIENCE (PATIENCE + 1 epochs), as the authors' loop does."""

from __future__ import annotations

from typing import Any


class EarlyStopping:
    """The bookkeeping of --early-stop `patience` (None: off) on the validation measure `metric` (a key of
    the metrics row): `state` is {"best_epoch", "best_" + metric, "epochs_since_best"}, None before the
    first value (or as a checkpoint has it; its "best_..." key then says the measure)."""

    def __init__(self, patience: int | None, state: dict | None = None, rule: str = "plain", warmup: int = 0,
                 metric: str = "validation_elbo"):
        self.patience, self.rule, self.warmup = patience, rule, warmup
        self.state = None if state is None else dict(state)
        self.metric = metric if state is None else \
            next(key[len("best_"):] for key in state if key.startswith("best_") and key != "best_epoch")

    @classmethod
    def of_run(cls, config: Any, checkpoint: dict | None = None,
               metric: str = "validation_elbo") -> EarlyStopping:
        """The bookkeeping of a run's --early-stop and --early-stop-rule (the warm-up: --kl-anneal epochs)
        on `metric` (the kind's), continued from `checkpoint`'s count and measure if given."""
        state = None if checkpoint is None else checkpoint.get("early_stop")
        return cls(config.early_stop, state, rule=config.early_stop_rule, warmup=config.kl_anneal,
                   metric=metric)

    def update(self, epoch: int, value: float) -> bool:
        """Count epoch `epoch`, whose validation measure is `value`: a new best resets the count (returns
        True: keep its parameters), otherwise the count of epochs since the best grows (rule 'authors':
        it stays 0 while epoch < warmup)."""
        best = "best_" + self.metric
        if self.state is None or value > self.state[best]:
            self.state = {"best_epoch": epoch, best: value, "epochs_since_best": 0}
            return True
        self.state["epochs_since_best"] += 1
        if self.rule == "authors" and epoch < self.warmup:
            self.state["epochs_since_best"] = 0  # the authors' count stays 0 while the warm-up lasts
        return False

    @property
    def best_epoch(self) -> int:
        """The epoch with the best validation measure so far (after the first update)."""
        return self.state["best_epoch"]

    def stopped(self) -> bool:
        """Whether `patience` epochs in a row have not beaten the best validation measure (rule 'authors':
        patience + 1, the authors' loop stops once its count exceeds the patience)."""
        if self.patience is None or self.state is None:
            return False
        patience = self.patience + 1 if self.rule == "authors" else self.patience
        return self.state["epochs_since_best"] >= patience

    def record(self) -> dict:
        """What a checkpoint holds of it: {"early_stop": state}, or nothing before the first update."""
        return {"early_stop": dict(self.state)} if self.state is not None else {}

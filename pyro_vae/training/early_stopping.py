"""Early stopping on the validation ELBO (--early-stop PATIENCE): the parameters of the epoch with the
best validation ELBO are kept (the trainer writes them to best.pt when `update` says so), and training
stops once PATIENCE epochs in a row have not beaten it. The count and the best epoch are plain data in
the checkpoint, so a resumed run continues them. With --early-stop-rule authors the count is set back to 0
while the epoch is inside the KL warm-up (epoch < --kl-anneal) and training stops once it exceeds
PATIENCE (PATIENCE + 1 epochs), as the authors' loop does."""

from __future__ import annotations

from typing import Any


class EarlyStopping:
    """The bookkeeping of --early-stop `patience` (None: off): `state` is {"best_epoch",
    "best_validation_elbo", "epochs_since_best"}, None before the first validation ELBO (or as a
    checkpoint has it)."""

    def __init__(self, patience: int | None, state: dict | None = None, rule: str = "plain", warmup: int = 0):
        self.patience, self.rule, self.warmup = patience, rule, warmup
        self.state = None if state is None else dict(state)

    @classmethod
    def of_run(cls, config: Any, checkpoint: dict | None = None) -> EarlyStopping:
        """The bookkeeping of a run's --early-stop and --early-stop-rule (the warm-up: --kl-anneal epochs),
        continued from `checkpoint`'s count if given."""
        state = None if checkpoint is None else checkpoint.get("early_stop")
        return cls(config.early_stop, state, rule=config.early_stop_rule, warmup=config.kl_anneal)

    def update(self, epoch: int, value: float) -> bool:
        """Count epoch `epoch`, whose validation ELBO is `value`: a new best resets the count (returns
        True: keep its parameters), otherwise the count of epochs since the best grows (rule 'authors':
        it stays 0 while epoch < warmup)."""
        if self.state is None or value > self.state["best_validation_elbo"]:
            self.state = {"best_epoch": epoch, "best_validation_elbo": value, "epochs_since_best": 0}
            return True
        self.state["epochs_since_best"] += 1
        if self.rule == "authors" and epoch < self.warmup:
            self.state["epochs_since_best"] = 0  # the authors' count stays 0 while the warm-up lasts
        return False

    @property
    def best_epoch(self) -> int:
        """The epoch with the best validation ELBO so far (after the first update)."""
        return self.state["best_epoch"]

    def stopped(self) -> bool:
        """Whether `patience` epochs in a row have not beaten the best validation ELBO (rule 'authors':
        patience + 1, the authors' loop stops once its count exceeds the patience)."""
        if self.patience is None or self.state is None:
            return False
        patience = self.patience + 1 if self.rule == "authors" else self.patience
        return self.state["epochs_since_best"] >= patience

    def record(self) -> dict:
        """What a checkpoint holds of it: {"early_stop": state}, or nothing before the first update."""
        return {"early_stop": dict(self.state)} if self.state is not None else {}

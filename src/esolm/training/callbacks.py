"""Lightning callbacks of a run besides checkpointing: the EMA of the weights, and Ctrl-C detection."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(WeightAveraging):
    """Exponential moving average of the weights after every optimizer step (foreach update)."""

    def __init__(self, decay: float):
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay

    def should_update(self, step_idx=None, epoch_idx=None) -> bool:
        return step_idx is not None

    def on_train_end(self, trainer, pl_module) -> None:
        """Keep the raw weights in the module at the end of ``fit``: the final ``last.ckpt`` (written after
        this hook) must hold them as ``current_model_state`` to stay resumable. Validation and checkpoints
        still swap in the EMA weights."""


class InterruptWatch(Callback):
    """Records whether ``fit`` ended on Ctrl-C: Lightning turns a KeyboardInterrupt into ``sys.exit(1)``,
    and :func:`esolm.training.train` turns it back (the command line then exits 130)."""

    def __init__(self):
        self.interrupted = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.interrupted = isinstance(exception, KeyboardInterrupt)

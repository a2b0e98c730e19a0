"""Lightning training for every esolm objective (Eso-LM A/B, MDLM, AR, BD3-LM).

The modules, in the order a run uses them (:func:`train`):

* :mod:`~esolm.training.run` — :func:`prepare` (every check that can fail on user input: config, machine,
  output folder, resume checkpoint and overrides, data — before any work), :func:`build_trainer`,
  :func:`train`;
* :mod:`~esolm.training.datamodule` — :class:`EsoLMData`: an endless, exactly resumable training stream
  and a rank-sharded validation split;
* :mod:`~esolm.training.module` — :class:`LitEsoLM`: backbone + objective, AdamW with warmup then constant
  or cosine, exact global loss aggregation (:func:`reduce_loss`), randomness as a function of
  (seed, micro-batch, rank) (:func:`noise_generators`), non-finite loss/weight checks;
* :mod:`~esolm.training.callbacks` — :class:`EMA` of the weights (validation, checkpoints' ``state_dict``
  and export use it), Ctrl-C detection;
* :mod:`~esolm.training.checkpoints` — ``OUT/checkpoints/{stepNNNNNNNN,last}.ckpt``, written atomically by
  :class:`AtomicCheckpointIO` (never with non-finite weights), orphaned temporary files cleaned up;
"""

from esolm.errors import CheckpointError, NonFiniteLossError
from esolm.training.callbacks import EMA, InterruptWatch
from esolm.training.checkpoints import (
    AtomicCheckpointIO,
    Checkpoints,
    checkpoint_dir,
    clean_orphans,
    last_checkpoint,
    read_checkpoint,
)
from esolm.training.datamodule import EsoLMData
from esolm.training.module import LitEsoLM, lr_factor, noise_generators, reduce_loss, step_seed
from esolm.training.run import RESUME_MAY_CHANGE, Prepared, build_trainer, prepare, resume_changes, train

__all__ = [
    "AtomicCheckpointIO", "CheckpointError", "Checkpoints", "EMA", "EsoLMData", "InterruptWatch", "LitEsoLM",
    "NonFiniteLossError", "Prepared", "RESUME_MAY_CHANGE", "build_trainer", "checkpoint_dir", "clean_orphans",
    "last_checkpoint", "lr_factor", "noise_generators", "prepare", "read_checkpoint",
    "reduce_loss", "resume_changes", "step_seed", "train",
]

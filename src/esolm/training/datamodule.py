"""The run's data: an endless, exactly resumable training stream and a rank-sharded validation split."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from esolm.data import DataSplits, ResumableBatchSampler
from esolm.recipes import RunConfig


class EsoLMData(pl.LightningDataModule):
    """Training stream (resumable, sharded by rank) and validation split (each rank a disjoint slice).

    The training loader is a :class:`~esolm.data.ResumableBatchSampler` stream: its position is the number
    of micro-batches consumed (``LitEsoLM.consumed``, saved in every checkpoint), so a resumed run continues
    with exactly the next batch."""

    def __init__(self, cfg: RunConfig, splits: DataSplits):
        super().__init__()
        self.cfg, self.splits = cfg, splits

    def train_dataloader(self):
        t = self.trainer
        start = t.lightning_module.consumed if t is not None else 0
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        sampler = ResumableBatchSampler(len(self.splits.train), self.cfg.micro_batch, seed=self.cfg.trainer.seed,
                                        rank=rank, world_size=world, start=start)
        return torch.utils.data.DataLoader(self.splits.train, batch_sampler=sampler,
                                           num_workers=self.cfg.data.num_workers)

    def val_dataloader(self):
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        rows = list(range(rank, len(self.splits.validation), world))
        return torch.utils.data.DataLoader(torch.utils.data.Subset(self.splits.validation, rows),
                                           batch_size=self.cfg.micro_batch, shuffle=False,
                                           num_workers=self.cfg.data.num_workers)

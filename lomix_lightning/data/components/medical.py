"""The loaders shared by the medical data modules: 2-D slices to train and validate on, whole volumes to test on."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lomix_lightning.data.components.loaders import make_loader
from lomix_lightning.data.components.slices import SliceDataset
from lomix_lightning.data.components.volumes import VolumeDataset


class SliceVolumeDataModule(pl.LightningDataModule):
    """Base of :class:`~lomix_lightning.data.SynapseDataModule` and :class:`~lomix_lightning.data.ACDCDataModule`.

    Subclasses set ``batch_size``, ``num_workers`` and ``seed`` in ``__init__`` and the three datasets in ``setup``;
    each loader calls ``setup`` for its stage if that has not happened yet.
    """

    batch_size: int
    num_workers: int
    seed: int
    train_set: SliceDataset | None = None
    val_set: SliceDataset | None = None
    test_set: VolumeDataset | None = None

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training slices."""
        if self.train_set is None:
            self.setup("fit")
        return make_loader(self.train_set, self.batch_size, self.num_workers, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader | list:
        """Validation slices, resized only (an empty list when there are none, e.g. Synapse with ``val_cases=[]``)."""
        if self.val_set is None:
            self.setup("validate")
        if len(self.val_set) == 0:
            return []
        return make_loader(self.val_set, self.batch_size, self.num_workers, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test volumes, one per batch."""
        if self.test_set is None:
            self.setup("test")
        return make_loader(self.test_set, 1, self.num_workers, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test volumes."""
        return self.test_dataloader()

"""LightningDataModule, data set builders, batch order; imports ddpm.utils only."""

"""Shared helpers (atomic writes, the cache folder, image grids); imports no other ddpm code."""

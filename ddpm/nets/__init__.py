"""Networks (x, t[, y]) -> tensor that know no diffusion: pure torch; imports ddpm.utils only."""

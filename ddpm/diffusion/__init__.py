"""The math (schedules, timesteps, losses, samplers, rng): pure torch; imports ddpm.utils only."""

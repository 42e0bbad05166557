"""FID/KID feature extractors, metrics, reference statistics; imports ddpm.data, ddpm.utils."""

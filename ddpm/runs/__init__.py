"""From a config to a finished run (cli, prepare, build, resume); Hydra; imports every layer."""

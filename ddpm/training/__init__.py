"""Lightning parts (module, callbacks, EMA, precision, guards); imports every layer but runs."""

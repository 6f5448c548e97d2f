"""Every error class of gqa-convert. Each message names the problem and the fix; the CLI prints it as one
`error:` line and exits 2."""


class ConversionError(ValueError):
    """A bad input to a conversion (checkpoint, config, OUTPUT, options)."""


class DataError(ValueError):
    """A text source that cannot be used (missing file, unknown column, too little text)."""


class SpanCorruptionError(ValueError):
    """A bad span-corruption setting or a tokenizer without sentinels."""


class SettingsError(ValueError):
    """Bad uptraining settings or inputs, found before any compute."""


class TrainingError(RuntimeError):
    """A fault during training (a non-finite loss)."""


class WriteError(RuntimeError):
    """Writing a checkpoint or the model failed: a full disk, a file-size limit, a lost mount."""


class MissingExtra(ImportError):
    """A part of gqa-convert was used whose optional dependencies are not installed."""

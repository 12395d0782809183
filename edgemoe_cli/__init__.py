"""edgemoe: ERNIE-4.5-21B-A3B (Thinking and PT) onto Armv9 boards with llama.cpp."""

__version__ = "0.1.0"

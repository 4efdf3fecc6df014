"""Hugging Face models and files, and minigpt's attention inside ``transformers``.

- ``minigpt.hf.plugin``: our attention as a transformers attention implementation
  (``minigpt.hf.register()``, re-exported here).
- ``minigpt.hf.pretrained``: GPT-2 and Llama checkpoints (Hugging Face directories, hub ids,
  GGUF files) as minigpt models and tokenizers; ``GPT.from_pretrained`` calls it.
- ``minigpt.hf.convert``: the rules that map Hugging Face configs and weight names to minigpt's
  and back (GPT-2, Llama), shared by loading and exporting.
- ``minigpt.hf.gguf_file``: reading llama.cpp's GGUF files.
- ``minigpt.hf.export``: a minigpt checkpoint as a Hugging Face directory or a safetensors file.
- ``minigpt.hf.chat``: chat templates of instruct models (``sample.py --chat``).

Nothing here is imported by ``import minigpt``; ``transformers`` is imported only when it is
needed (``pip install "minigpt-kernels[hf]"``).
"""

from minigpt.hf.plugin import attention_forward, causal_mask, mask_plan, register

__all__ = ["register", "attention_forward", "causal_mask", "mask_plan"]
